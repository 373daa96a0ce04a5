"""Coarse time limits for many short awaits, at a fraction of ``asyncio.timeout``'s cost.

Every delivery was bounded twice (the engine's guard against a hung adapter, and the adapter's
own timeout), and each ``asyncio.timeout`` schedules a timer and cancels it again: ~10 µs of
CPU per delivery for limits that almost never fire, and a timer heap full of cancelled
entries. A :class:`Deadlines` notes when each call started and checks them all from one
periodic callback; a call over its limit has its task cancelled, and the code around the call
turns that cancellation into its own timeout error::

    task = deadlines.start()
    try:
        await call
    except asyncio.CancelledError:
        if deadlines.expired(task):
            raise TimeoutError from None
        raise
    finally:
        deadlines.end(task)

A call is cancelled between ``limit`` and ``limit + period`` after it started (``period`` is a
quarter of the limit, at most a second). Nested limits on one task and cancellations from
elsewhere (shutdown) stay apart: ``expired`` is true only when this limit alone cancelled it.
"""

from __future__ import annotations

import asyncio


class Deadlines:
    """One limit for the calls of one event loop."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.period = min(1.0, max(0.01, limit / 4))
        self._started: dict[asyncio.Task[object], float] = {}
        self._expired: set[asyncio.Task[object]] = set()
        self._check: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> asyncio.Task[object]:
        """Bound the current task's call from now on; returns the task for :meth:`end`."""
        task = asyncio.current_task()
        assert task is not None, "Deadlines.start() outside a task"
        loop = task.get_loop()
        self._started[task] = loop.time()
        if self._check is None or self._loop is not loop:
            self._loop = loop
            self._check = loop.call_later(self.period, self._sweep, loop)
        return task

    def end(self, task: asyncio.Task[object]) -> None:
        """The call is over (whatever the outcome)."""
        self._started.pop(task, None)
        if task in self._expired:
            # Cancelled, but the call swallowed the cancellation and finished: forget it.
            self._expired.discard(task)
            task.uncancel()

    def expired(self, task: asyncio.Task[object]) -> bool:
        """In ``except CancelledError``: True when this limit, and nothing else, cancelled it."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        return task.uncancel() == 0

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:
            return  # a sweep of an earlier event loop
        self._check = None
        if not self._started:
            return  # the next start() schedules the next sweep
        late = loop.time() - self.limit
        for task, started in self._started.items():
            if started <= late and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        self._check = loop.call_later(self.period, self._sweep, loop)
