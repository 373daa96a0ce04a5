"""The lifecycle shared by the local test servers (:mod:`consumer.receiver`,
:mod:`consumer.tracker_server`).

Each is a real aiohttp server on loopback, run in a background thread with its own event loop,
so that synchronous tests and the demo can drive a real HTTP peer without an event loop of their
own. The servers differ only in their routes; starting, stopping and reporting the bound port
live here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from abc import ABC, abstractmethod
from types import TracebackType
from typing import ClassVar, Self

from aiohttp import web


class LoopbackServer(ABC):
    """An aiohttp server in its own thread, listening once :meth:`start` returns.

    Use it as a context manager: entering returns once the port is listening, leaving closes
    every connection and joins the thread, so no socket or thread outlives the ``with``.
    """

    #: How errors name the server ("the receiver is not started").
    _label: ClassVar[str] = "the server"
    #: The server thread's name, so it can be told apart in a thread dump.
    _thread_name: ClassVar[str] = "loopback-server"

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set on stop(); handlers that hold a request back wait on it too, so a stop is not
        # delayed by a deliberately slow answer.
        self._stopping: asyncio.Event | None = None
        self._bound_port: int | None = None

    @abstractmethod
    def _make_app(self) -> web.Application:
        """The application to serve; called in the server thread, inside its event loop."""

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self._label} is already started")
        self._ready.clear()
        self._startup_error = None
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise self._startup_error

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            # The loop may have ended on its own (a crash): then there is nothing to wake.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        thread.join()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._bound_port is None:
            raise RuntimeError(f"{self._label} is not started")
        return self._bound_port

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - handed to start(), which re-raises it
            self._startup_error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        app = self._make_app()
        # No access log: some URLs carry passwords and sessions. A short shutdown: handlers
        # held back by a delay are woken by _stopping anyway.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
            self._bound_port = int(runner.addresses[0][1])
            self._ready.set()
            await self._stopping.wait()
        finally:
            await runner.cleanup()
