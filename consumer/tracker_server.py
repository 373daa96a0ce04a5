"""A local session-based tracker (Myfxbook style): the other end of the ``tracker`` adapter, for
tests, the demo and the chaos run.

It is a real HTTP server on loopback (aiohttp, in a background thread with its own event loop),
like :class:`consumer.receiver.WebhookReceiver`, and as strict as a real tracker where the
adapter could go wrong:

- sessions are random, answered URL-encoded (as Myfxbook does) and contain ``+``, ``/`` and
  ``=``, so a client that forgets to decode or to re-encode them gets "Invalid session";
- sessions expire after ``session_ttl`` or on demand (:meth:`TrackerServer.expire_sessions`),
  and an expired one is answered with 401 or with ``{"error": true}`` and 200, alternately by
  default, since trackers do both;
- payloads are validated field by field (required and known fields only, exact decimal strings,
  ``buy``/``sell``, RFC 3339 times), so a mapping mistake is a 400, not a silently stored trade;
- repeats of an idempotency key are accepted but stored once, and counted;
- rate limiting (a steady rate, or the next *n* requests) answers 429 with ``Retry-After``.

Routes live under ``/api`` (``base_url`` includes it), so the adapter's joining of a base path
and the call paths is exercised too.

``python -m consumer.tracker_server`` runs it as a separate process, printing one JSON line per
stored trade on stdout and a summary of its counters on stderr when it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hmac
import itertools
import json
import math
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from types import FrameType
from typing import Any, Literal
from urllib.parse import quote

from aiohttp import web

from consumer._loopback import LoopbackServer

#: Paths under ``base_url``; the adapter's defaults.
LOGIN_PATH = "/login.json"
POST_PATH = "/add-trade.json"
LOGOUT_PATH = "/logout.json"
_PREFIX = "/api"

#: How an invalid or expired session is answered: HTTP 401, ``error: true`` with 200, or both
#: in turn.
ExpiredReply = Literal["401", "error", "alternate"]
Endpoint = Literal["login", "post", "logout"]

#: Fields a trade must carry, and those that may be null.
REQUIRED_FIELDS = frozenset(
    {
        "ticket",
        "symbol",
        "action",
        "lots",
        "openPrice",
        "closePrice",
        "profit",
        "commission",
        "swap",
        "currency",
        "openTime",
        "closeTime",
        "ref",
    }
)
NULLABLE_FIELDS = frozenset({"signal", "closeReason"})
KNOWN_FIELDS = REQUIRED_FIELDS | NULLABLE_FIELDS
_DECIMAL_FIELDS = ("lots", "openPrice", "closePrice", "profit", "commission", "swap")
_DECIMAL = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_CLOSE_REASONS = frozenset({"TAKE_PROFIT", "STOP_LOSS", "MANUAL", "MARGIN_CALL", "EXPIRY"})


@dataclass(frozen=True, slots=True)
class Trade:
    """One trade the tracker stored."""

    #: 1, 2, 3, ... in the order stored.
    seq: int
    #: Wall clock, epoch ms.
    wall_ms: int
    #: The idempotency key it was stored under.
    ref: str
    #: The JSON body as sent.
    payload: dict[str, Any]
    #: Header names lower-cased.
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Counts:
    """What the tracker has seen so far (a snapshot)."""

    logins: int = 0
    #: Logins refused for wrong credentials.
    failed_logins: int = 0
    logouts: int = 0
    #: Every post request, whatever its answer.
    posts: int = 0
    #: Trades stored (duplicates not included).
    stored: int = 0
    #: Posts of an idempotency key already stored: accepted, not stored again.
    duplicates: int = 0
    #: Requests answered "invalid session".
    invalid_sessions: int = 0
    #: Requests answered 429.
    rate_limited: int = 0
    #: Posts refused for their payload.
    rejected: int = 0


@dataclass(frozen=True, slots=True)
class _Scripted:
    """The answer planned for one upcoming request of an endpoint."""

    status: int | None
    retry_after: int | None = None
    #: Seconds to hold the request before answering (cut short by stop()).
    delay: float = 0.0


class _Bucket:
    """A token bucket: ``rate`` requests a second, bursts of up to ``max(1, rate)``."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 when the request may go; else the seconds until it could."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


def _new_session() -> str:
    # Standard base64 of 19 bytes: always one '=', often '+' and '/', as Myfxbook's tokens.
    return base64.b64encode(secrets.token_bytes(19)).decode()


def _parse_time(text: str) -> datetime | None:
    if not _RFC3339.match(text):
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:  # matches the shape, but e.g. month 13
        return None


def validate_trade(payload: Any) -> str | None:
    """What is wrong with a trade body, or None. Names fields, never quotes values."""
    if not isinstance(payload, dict):
        return "the body must be a JSON object"
    unknown = sorted(set(payload) - KNOWN_FIELDS)
    if unknown:
        return f"unknown fields: {', '.join(unknown)}"
    missing = sorted(f for f in REQUIRED_FIELDS if payload.get(f) in (None, ""))
    if missing:
        return f"missing fields: {', '.join(missing)}"
    for name in REQUIRED_FIELDS | (NULLABLE_FIELDS & payload.keys()):
        value = payload[name]
        if not (isinstance(value, str) or (value is None and name in NULLABLE_FIELDS)):
            return f"{name}: must be a string"
    for name in _DECIMAL_FIELDS:
        if not _DECIMAL.match(payload[name]):
            return f"{name}: must be a decimal string"
    if payload["lots"].startswith("-") or not payload["lots"].strip("0."):
        return "lots: must be positive"
    if payload["action"] not in ("buy", "sell"):
        return "action: must be buy or sell"
    if not _CURRENCY.match(payload["currency"]):
        return "currency: must be an ISO 4217 code"
    times = []
    for name in ("openTime", "closeTime"):
        text = payload[name]
        when = _parse_time(text)
        if when is None:
            return f"{name}: must be an RFC 3339 time"
        times.append(when)
    if times[1] < times[0]:
        return "closeTime: before openTime"
    reason = payload.get("closeReason")
    if reason is not None and reason not in _CLOSE_REASONS:
        return "closeReason: unknown value"
    return None


class TrackerServer(LoopbackServer):
    """A tracker API on 127.0.0.1 that enforces sessions and stores the trades it accepts.

    Use it as a context manager: entering returns once the port is listening, leaving closes
    every connection and joins the thread.
    """

    _label = "the tracker server"
    _thread_name = "tracker-server"

    def __init__(
        self,
        email: str,
        password: str,
        *,
        session_ttl: float | None = 3600.0,
        rate_limit: float | None = None,
        expired_reply: ExpiredReply = "alternate",
        record_error_status: int = 400,
        host: str = "127.0.0.1",
        port: int = 0,
        on_store: Callable[[Trade], None] | None = None,
    ) -> None:
        """``session_ttl`` None: sessions expire only on demand. ``rate_limit``: requests a
        second across all endpoints (None: unlimited). ``record_error_status``: the status of a
        payload rejection (400; 200 gives Myfxbook's ``error: true`` with 200). ``on_store`` is
        called in the server thread for each stored trade."""
        if rate_limit is not None and rate_limit <= 0:
            raise ValueError("rate_limit must be positive")
        super().__init__(host, port)
        self._email = email
        self._password = password
        self._ttl = session_ttl
        self._bucket = _Bucket(rate_limit) if rate_limit is not None else None
        self._expired_reply: ExpiredReply = expired_reply
        self._record_error_status = record_error_status
        self._on_store = on_store
        self._cond = threading.Condition()
        # token -> monotonic expiry (inf: never)
        self._sessions: dict[str, float] = {}
        self._trades: list[Trade] = []
        self._refs: set[str] = set()
        self._counts = Counts()
        self._scripts: dict[Endpoint, deque[_Scripted]] = {
            "login": deque(),
            "post": deque(),
            "logout": deque(),
        }
        self._invalid_answers = itertools.count()
        self._seq = itertools.count(1)

    # -- what tests read and steer ---------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}{_PREFIX}"

    @property
    def trades(self) -> list[Trade]:
        """A snapshot, safe to iterate while trades keep arriving."""
        with self._cond:
            return list(self._trades)

    @property
    def counts(self) -> Counts:
        with self._cond:
            return self._counts

    @property
    def sessions(self) -> list[str]:
        """Sessions currently valid (tests check that secrets never leak)."""
        now = time.monotonic()
        with self._cond:
            return [token for token, until in self._sessions.items() if until > now]

    def expire_sessions(self) -> None:
        """Make every session issued so far invalid, as a tracker's expiry would."""
        with self._cond:
            self._sessions.clear()

    def set_expired_reply(self, reply: ExpiredReply) -> None:
        with self._cond:
            self._expired_reply = reply

    def limit_next(self, n: int, retry_after: int = 1, *, endpoint: Endpoint = "post") -> None:
        """Answer the next ``n`` requests of ``endpoint`` with 429 and ``Retry-After``."""
        self._script(endpoint, n, _Scripted(429, retry_after))

    def fail_next(
        self, n: int, status: int = 500, *, endpoint: Endpoint = "post", delay: float = 0.0
    ) -> None:
        """Answer the next ``n`` requests of ``endpoint`` with ``status``, after ``delay``."""
        self._script(endpoint, n, _Scripted(status, delay=delay))

    def slow_next(self, n: int, seconds: float, *, endpoint: Endpoint = "post") -> None:
        """Hold the next ``n`` requests of ``endpoint`` for ``seconds``, then answer normally."""
        self._script(endpoint, n, _Scripted(None, delay=seconds))

    def _script(self, endpoint: Endpoint, n: int, step: _Scripted) -> None:
        with self._cond:
            self._scripts[endpoint].extend([step] * n)

    def wait_for(self, count: int, timeout: float = 5.0) -> bool:
        """Block until ``count`` trades are stored; False when ``timeout`` passes first."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._trades) >= count, timeout)

    # -- the server thread -----------------------------------------------------------------

    def _make_app(self) -> web.Application:
        # The base server keeps no access log: these URLs carry passwords and sessions.
        app = web.Application()
        app.router.add_get(_PREFIX + LOGIN_PATH, self._login)
        app.router.add_post(_PREFIX + POST_PATH, self._post)
        app.router.add_get(_PREFIX + LOGOUT_PATH, self._logout)
        return app

    def _count(self, **increments: int) -> None:
        # Called with self._cond held.
        fields = asdict(self._counts)
        for name, by in increments.items():
            fields[name] += by
        self._counts = Counts(**fields)

    async def _gate(self, endpoint: Endpoint) -> web.Response | None:
        """A scripted or rate-limit answer that pre-empts the endpoint's own, if any."""
        with self._cond:
            script = self._scripts[endpoint]
            step = script.popleft() if script else None
        if step is not None and step.delay > 0 and self._stopping is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(step.delay):
                    await self._stopping.wait()
        if step is not None and step.status is not None:
            return self._refuse(step.status, step.retry_after)
        if self._bucket is not None:
            with self._cond:
                wait = self._bucket.take()
            if wait > 0:
                return self._refuse(429, max(1, math.ceil(wait)))
        return None

    def _refuse(self, status: int, retry_after: int | None) -> web.Response:
        headers = {}
        if status == 429:
            with self._cond:
                self._count(rate_limited=1)
            headers["Retry-After"] = str(retry_after if retry_after is not None else 1)
        message = "Too many requests" if status == 429 else f"HTTP {status}"
        return _answer({"error": True, "message": message}, status, headers)

    def _check_session(self, request: web.Request) -> str | web.Response:
        """The request's valid session, or the invalid-session answer."""
        token = request.query.get("session", "")
        now = time.monotonic()
        with self._cond:
            until = self._sessions.get(token)
            if until is not None and until > now:
                return token
            self._sessions.pop(token, None)
            self._count(invalid_sessions=1)
            mode = self._expired_reply
        if mode == "alternate":
            mode = "401" if next(self._invalid_answers) % 2 == 0 else "error"
        body = {"error": True, "message": "Invalid session."}
        return _answer(body, 401 if mode == "401" else 200)

    async def _login(self, request: web.Request) -> web.Response:
        refused = await self._gate("login")
        if refused is not None:
            return refused
        email = request.query.get("email", "")
        password = request.query.get("password", "")
        # Both compared, always, in constant time: the answer must not tell which was wrong.
        ok_email = hmac.compare_digest(email.encode(), self._email.encode())
        ok_password = hmac.compare_digest(password.encode(), self._password.encode())
        if not (ok_email and ok_password):
            with self._cond:
                self._count(failed_logins=1)
            return _answer({"error": True, "message": "Invalid credentials"})
        token = _new_session()
        until = time.monotonic() + self._ttl if self._ttl is not None else math.inf
        with self._cond:
            self._sessions[token] = until
            self._count(logins=1)
        return _answer({"error": False, "message": "", "session": quote(token, safe="")})

    async def _logout(self, request: web.Request) -> web.Response:
        refused = await self._gate("logout")
        if refused is not None:
            return refused
        session = self._check_session(request)
        if isinstance(session, web.Response):
            return session
        with self._cond:
            self._sessions.pop(session, None)
            self._count(logouts=1)
        return _answer({"error": False, "message": ""})

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._cond:
            self._count(posts=1)
        refused = await self._gate("post")
        if refused is not None:
            return refused
        session = self._check_session(request)
        if isinstance(session, web.Response):
            return session
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        problem = validate_trade(payload)
        key = request.headers.get("Idempotency-Key")
        if problem is None and key is not None and key != payload["ref"]:
            problem = "ref: differs from the Idempotency-Key header"
        if problem is not None:
            with self._cond:
                self._count(rejected=1)
            return _answer({"error": True, "message": problem}, self._record_error_status)
        ref = payload["ref"]
        headers = {name.lower(): value for name, value in request.headers.items()}
        with self._cond:
            if ref in self._refs:
                self._count(duplicates=1)
                return _answer({"error": False, "message": "Duplicate, already stored"})
            self._refs.add(ref)
            trade = Trade(next(self._seq), time.time_ns() // 1_000_000, ref, payload, headers)
            self._trades.append(trade)
            self._count(stored=1)
            self._cond.notify_all()
        if self._on_store is not None:
            self._on_store(trade)
        return _answer({"error": False, "message": "", "id": trade.seq})


def _answer(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _emit(trade: Trade) -> None:
    line = {"seq": trade.seq, "wall_ms": trade.wall_ms, "ref": trade.ref, "trade": trade.payload}
    sys.stdout.write(json.dumps(line, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m consumer.tracker_server",
        description="A local session-based tracker printing one JSON line per stored trade.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--email-env", metavar="VAR", required=True)
    parser.add_argument("--password-env", metavar="VAR", required=True)
    parser.add_argument("--session-ttl", type=float, default=3600.0, metavar="SECONDS")
    parser.add_argument("--rate-limit", type=float, default=None, metavar="PER_SECOND")
    parser.add_argument(
        "--expired-reply", choices=["401", "error", "alternate"], default="alternate"
    )
    args = parser.parse_args(argv)

    credentials = []
    for var in (args.email_env, args.password_env):
        value = os.environ.get(var)
        if not value:
            sys.stderr.write(f"environment variable {var} is not set or empty\n")
            return 2
        credentials.append(value)

    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with TrackerServer(
        credentials[0],
        credentials[1],
        session_ttl=args.session_ttl,
        rate_limit=args.rate_limit,
        expired_reply=args.expired_reply,
        host=args.host,
        port=args.port,
        on_store=_emit,
    ) as server:
        # On stderr, so that stdout holds nothing but trades.
        sys.stderr.write(json.dumps({"listening": server.base_url}) + "\n")
        sys.stderr.flush()
        done.wait()
        counts = server.counts
    sys.stderr.write(json.dumps({"counts": asdict(counts)}) + "\n")
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "KNOWN_FIELDS",
    "LOGIN_PATH",
    "LOGOUT_PATH",
    "NULLABLE_FIELDS",
    "POST_PATH",
    "REQUIRED_FIELDS",
    "Counts",
    "ExpiredReply",
    "TrackerServer",
    "Trade",
    "main",
    "validate_trade",
]
