"""A local Standard Webhooks receiver: the other end of the webhook adapter, for tests, the demo,
the chaos run and the benchmarks.

It is a real HTTP server on loopback (aiohttp, in a background thread with its own event loop),
so the adapter is exercised through real sockets, keep-alive and timeouts rather than a mock.
A *policy* decides each answer, so a test can make the receiver fail, ask for a later retry or
answer too slowly, and swap that behaviour while deliveries are in flight.

``python -m consumer.receiver`` runs it as a separate process, printing one JSON line per
delivery on stdout (the only module where writing to stdout is intended).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from consumer._loopback import LoopbackServer


@dataclass(frozen=True, slots=True)
class Reply:
    """What the receiver answers to one request."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: Seconds to hold the answer back (to provoke client timeouts); cut short by stop().
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class Received:
    """One request as it arrived, and what the receiver answered."""

    #: 1, 2, 3, ... in arrival order.
    seq: int
    #: ``time.monotonic()`` in ms: system-wide on Linux, so comparable across processes.
    monotonic_ms: float
    #: Wall clock, epoch ms (to compare with a record's due time).
    wall_ms: int
    method: str
    #: Path and query string.
    path: str
    #: The client's ``host:port``: one per connection, so it shows keep-alive at work.
    peer: str
    #: Header names lower-cased; repeated headers joined with ", ".
    headers: dict[str, str]
    body: bytes
    #: The parsed JSON body, or None if it was not JSON.
    payload: Any
    #: The status answered. A policy is shown 200, the answer unless it decides otherwise.
    status: int
    #: Whether the Standard Webhooks signature verified; None when no secret was given.
    verified: bool | None

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")


#: Decides the answer to one request: a Reply, a bare status, or None for 200.
Policy = Callable[[Received], Reply | int | None]


def _retry_headers(retry_after: int | str | None) -> dict[str, str]:
    return {} if retry_after is None else {"Retry-After": str(retry_after)}


def always(status: int, *, retry_after: int | str | None = None) -> Policy:
    """Answer every request with ``status``."""
    reply = Reply(status, _retry_headers(retry_after))
    return lambda _: reply


def fail_first(n: int, status: int = 503, *, retry_after: int | str | None = None) -> Policy:
    """Fail the first ``n`` attempts of every webhook-id, then accept it.

    Counting per id rather than globally makes the outcome independent of how concurrent
    deliveries interleave.
    """
    reply = Reply(status, _retry_headers(retry_after))
    attempts: dict[str | None, int] = {}
    lock = threading.Lock()

    def policy(received: Received) -> Reply | None:
        with lock:
            seen = attempts[received.webhook_id] = attempts.get(received.webhook_id, 0) + 1
        return reply if seen <= n else None

    return policy


def fail_fraction(
    p: float, seed: int = 0, *, status: int = 503, retry_after: int | str | None = None
) -> Policy:
    """Fail each request with probability ``p``, reproducibly for a given seed and order."""
    if not 0.0 <= p <= 1.0:
        raise ValueError("p must be between 0 and 1")
    reply = Reply(status, _retry_headers(retry_after))
    rng = random.Random(seed)
    lock = threading.Lock()

    def policy(_: Received) -> Reply | None:
        with lock:
            fail = rng.random() < p
        return reply if fail else None

    return policy


def slow(seconds: float, status: int = 200) -> Policy:
    """Hold every answer back for ``seconds`` (longer than a client timeout, to provoke it)."""
    reply = Reply(status, delay=seconds)
    return lambda _: reply


def _as_reply(answer: Reply | int | None) -> Reply:
    if answer is None:
        return Reply()
    if isinstance(answer, int):
        return Reply(answer)
    return answer


class WebhookReceiver(LoopbackServer):
    """A webhook endpoint on 127.0.0.1 that records every request it gets.

    Use it as a context manager: entering returns once the port is listening, leaving closes
    every connection and joins the thread, so no socket or thread outlives the ``with``.
    """

    _label = "the receiver"
    _thread_name = "webhook-receiver"

    def __init__(
        self,
        secret: str | None = None,
        *,
        fail: Policy | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        keep: bool = True,
        on_receive: Callable[[Received], None] | None = None,
    ) -> None:
        """``keep=False`` only counts requests (long benchmarks would otherwise hold every body);
        ``on_receive`` is called in the server thread for each request, after it is recorded."""
        super().__init__(host, port)
        self._webhook = Webhook(secret) if secret is not None else None
        self._policy = fail
        self._keep = keep
        self._on_receive = on_receive
        self._cond = threading.Condition()
        self._received: list[Received] = []
        self._count = 0
        self._seq = itertools.count(1)

    # -- what tests read -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}/webhook"

    @property
    def received(self) -> list[Received]:
        """A snapshot, safe to iterate while requests keep arriving."""
        with self._cond:
            return list(self._received)

    @property
    def count(self) -> int:
        """Requests answered so far, kept or not."""
        with self._cond:
            return self._count

    def clear(self) -> None:
        with self._cond:
            self._received.clear()
            self._count = 0

    def set_policy(self, policy: Policy | None) -> None:
        """Change how the following requests are answered (None: always 200)."""
        with self._cond:
            self._policy = policy

    def wait_for(
        self, condition: int | Callable[[Sequence[Received]], bool], timeout: float = 5.0
    ) -> bool:
        """Block until ``condition`` holds (a count of requests, or a predicate over them).

        Returns False when ``timeout`` passes first. The predicate runs with the receiver's lock
        held, on the live list: keep it quick and do not keep the list.
        """
        if isinstance(condition, int):
            target = condition

            def check() -> bool:
                return self._count >= target
        else:
            predicate = condition

            def check() -> bool:
                return predicate(self._received)

        with self._cond:
            return self._cond.wait_for(check, timeout)

    # -- the server thread -----------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def _verify(self, body: bytes, headers: dict[str, str]) -> bool | None:
        if self._webhook is None:
            return None
        try:
            self._webhook.verify(body, headers, json_parse=False)
        except (WebhookVerificationError, ValueError):
            # ValueError: a malformed signature header or a body that is not UTF-8.
            return False
        return True

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        monotonic_ms = time.monotonic() * 1000
        wall_ms = time.time_ns() // 1_000_000
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        draft = Received(
            seq=next(self._seq),
            monotonic_ms=monotonic_ms,
            wall_ms=wall_ms,
            method=request.method,
            path=request.path_qs,
            peer=_peer(request),
            headers=headers,
            body=body,
            payload=payload,
            status=200,
            verified=self._verify(body, headers),
        )
        policy = self._policy
        reply = _as_reply(policy(draft)) if policy is not None else Reply()
        received = replace(draft, status=reply.status)
        with self._cond:
            self._count += 1
            if self._keep:
                self._received.append(received)
            self._cond.notify_all()
        if self._on_receive is not None:
            self._on_receive(received)
        if reply.delay > 0 and self._stopping is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(reply.delay):
                    await self._stopping.wait()
        return web.Response(status=reply.status, headers=dict(reply.headers), body=reply.body)


def _peer(request: web.Request) -> str:
    transport = request.transport
    peername = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return "?"


def _json_line(received: Received) -> str:
    line: dict[str, Any] = {
        "seq": received.seq,
        "wall_ms": received.wall_ms,
        "monotonic_ms": round(received.monotonic_ms, 3),
        "webhook_id": received.webhook_id,
        "status": received.status,
        "verified": received.verified,
        "payload": received.payload,
    }
    return json.dumps(line, separators=(",", ":")) + "\n"


def _emit(received: Received) -> None:
    sys.stdout.write(_json_line(received))
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m consumer.receiver",
        description="A local webhook receiver printing one JSON line per delivery on stdout.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--secret-env", metavar="VAR", help="environment variable holding the whsec_ secret"
    )
    parser.add_argument("--fail-fraction", type=float, default=0.0, metavar="P")
    parser.add_argument("--fail-first", type=int, default=0, metavar="N", help="per webhook-id")
    parser.add_argument("--fail-status", type=int, default=503)
    parser.add_argument("--retry-after", default=None, help="Retry-After value on failures")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    secret = None
    if args.secret_env:
        secret = os.environ.get(args.secret_env)
        if not secret:
            sys.stderr.write(f"environment variable {args.secret_env} is not set or empty\n")
            return 2
    policy: Policy | None = None
    if args.fail_first:
        policy = fail_first(args.fail_first, args.fail_status, retry_after=args.retry_after)
    elif args.fail_fraction:
        policy = fail_fraction(
            args.fail_fraction, args.seed, status=args.fail_status, retry_after=args.retry_after
        )

    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with WebhookReceiver(
        secret, fail=policy, host=args.host, port=args.port, keep=False, on_receive=_emit
    ) as receiver:
        # On stderr, so that stdout holds nothing but deliveries.
        sys.stderr.write(json.dumps({"listening": receiver.url}) + "\n")
        sys.stderr.flush()
        done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "Policy",
    "Received",
    "Reply",
    "WebhookReceiver",
    "always",
    "fail_first",
    "fail_fraction",
    "main",
    "slow",
]
