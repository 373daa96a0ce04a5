"""The ``tracker`` adapter: a performance tracker's session API, the Myfxbook way.

The conversation with the tracker::

    GET  <base_url><login_path>?email=...&password=...   -> {"error": false, "session": "..."}
    POST <base_url><post_path>?session=...               one trade as a JSON body
    GET  <base_url><logout_path>?session=...             once, on close()

Myfxbook's own API passes everything as GET query parameters. Credentials and the session stay
in the query because that is what such trackers accept, but the trade goes as a JSON body
(``Content-Type: application/json``): exact decimals as strings survive a JSON body unchanged,
and a body keeps trade values out of the URLs that proxies and access logs record.

**One session, shared.** Every delivery reuses the adapter's one session. When the tracker says
the session is invalid or expired (HTTP 401, or ``{"error": true}`` with a message about the
session), the delivery logs in once more and posts the same record again at once, inside the
same :meth:`TrackerAdapter.deliver` call. An :class:`asyncio.Lock` makes that re-login single
flight: 16 deliveries that all find the session expired wait for one login and all post with
its session; had that login failed, the waiters share its failure instead of trying again, so a
struggling tracker sees one login per wave of deliveries, never one per record.

**Classification**, once, here:

- 429 (and 408, 425), 5xx, timeouts, connection errors: :class:`RetriableDeliveryError`,
  carrying ``Retry-After`` when the tracker sent one.
- The tracker refuses the credentials (``error: true`` or 401/403 at login), or refuses the
  endpoint itself (403, 404, 405, 410 on a post: a wrong path or a locked account), or
  rejects a session it has just issued: :class:`AdapterUnavailable`. No record is to blame, so
  none may be dead-lettered for it; the engine pauses the whole adapter instead.
- Any other 4xx, or ``error: true`` about the record: :class:`FatalDeliveryError`.
- A 2xx whose body is not the tracker's JSON answer (a proxy's page, a truncated body):
  retriable, since we cannot tell whether the trade was stored, and the idempotency key makes
  a repeat harmless.

**Secrets.** The email, the password and the session token travel in URLs. No URL, response
body or tracker message is ever put into an error or a log line, and a foreign exception is
translated without being chained (``__cause__`` and ``__context__`` stay empty): httpx and
aiohttp exceptions hold the request, and so the URL with the password or the session, and a
traceback printed anywhere would leak it.

**Duplicates.** Each post carries the delivery's idempotency key twice: as the
``Idempotency-Key`` header and as the ``ref`` field of the body, for trackers that can only
store fields. The key is stable across retries and replays, so the tracker can drop repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal
from urllib.parse import unquote

import aiohttp
import httpx
from httpx_aiohttp import HttpxAiohttpClient
from pydantic import SecretStr

from consumer.adapters.base import Adapter, Delivery
from consumer.adapters.webhook import DEFAULT_TRANSPORT, Transport, parse_retry_after
from consumer.config import SecretRef, TrackerAdapterSettings, format_duration
from consumer.errors import (
    AdapterUnavailable,
    ConfigError,
    DeliveryError,
    FatalDeliveryError,
    RetriableDeliveryError,
)
from consumer.log import get_logger
from consumer.records import to_json_dict

log = get_logger("tracker")

#: TraceRecord field -> tracker field: the one place a record's shape meets the tracker's.
#: ``event_id`` is left out on purpose (it names one publication, not the trade; ``ref`` is
#: what deduplicates). Decimals go as exact strings, times as RFC 3339 UTC, ``side`` as
#: ``buy``/``sell``; ``signal`` and ``closeReason`` may be null.
TRACKER_FIELDS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "trade_id": "ticket",
        "signal_id": "signal",
        "instrument": "symbol",
        "side": "action",
        "volume": "lots",
        "entry_price": "openPrice",
        "exit_price": "closePrice",
        "profit_loss": "profit",
        "commission": "commission",
        "swap": "swap",
        "currency": "currency",
        "open_time": "openTime",
        "close_time": "closeTime",
        "close_reason": "closeReason",
    }
)

#: The body field carrying the delivery's idempotency key (also sent as ``Idempotency-Key``).
REF_FIELD: Final = "ref"

#: TraceRecord fields that may be null; every other mapped field must be present.
OPTIONAL_FIELDS: Final = frozenset({"signal_id", "close_reason"})

#: Statuses that say "not now" rather than "never".
RETRIABLE_STATUSES: Final = frozenset({408, 425, 429})

#: Post statuses that condemn the endpoint or the account, not the record.
ADAPTER_STATUSES: Final = frozenset({403, 404, 405, 410})

#: How a tracker says that the session is invalid or expired inside an ``error: true`` answer
#: ("Invalid session.", "Session expired", ...). Narrower than any mention of "session": a
#: record error such as "trading session closed" must stay fatal for that record, not be taken
#: for an expiry (which, repeated after a fresh login, would pause the whole adapter).
_SESSION_MESSAGE = re.compile(
    r"\b(invalid|expired|unknown|bad|missing)\s+session\b"
    r"|\bsession\s+(is\s+|has\s+)?(invalid|expired|timed\s+out|not\s+found|unknown)\b",
    re.IGNORECASE,
)

#: Answers are small JSON objects; a bigger body is read no further (and then is unreadable).
_MAX_ANSWER_BYTES = 64 * 1024


def tracker_payload(record: Mapping[str, Any], ref: str) -> dict[str, str | None]:
    """The tracker's body for one TraceRecord: exactly ``TRACKER_FIELDS`` and ``ref``.

    Built from the allow-list, never by copying the record, so a field added to the TraceRecord
    later reaches the tracker only once someone maps it here. A missing required field is the
    record's fault, so it is fatal for that record alone.
    """
    values = to_json_dict({field: record.get(field) for field in TRACKER_FIELDS})
    body: dict[str, str | None] = {}
    for field, name in TRACKER_FIELDS.items():
        value = values[field]
        if value is None:
            if field not in OPTIONAL_FIELDS:
                raise FatalDeliveryError(f"record has no {field}")
            body[name] = None
            continue
        text = str(value)
        body[name] = text.lower() if field == "side" else text
    body[REF_FIELD] = ref
    return body


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    retry_after: str | None
    #: The JSON object answered, or None when the body was not one.
    payload: dict[str, Any] | None

    @property
    def says_error(self) -> bool:
        return self.payload is not None and self.payload.get("error") is not False

    @property
    def about_session(self) -> bool:
        """401, or an ``error: true`` whose message is about the session."""
        if self.status == 401:
            return True
        if self.payload is None or self.payload.get("error") is not True:
            return False
        message = self.payload.get("message")
        return isinstance(message, str) and _SESSION_MESSAGE.search(message) is not None


Call = Literal["login", "post", "logout"]


class TrackerAdapter(Adapter):
    """Logs in lazily, shares one session across concurrent deliveries, logs out on close.

    The first delivery logs in, not :meth:`start`: a tracker that is down when the worker starts
    must not crash the worker; its failure is classified like any other, per record.
    """

    def __init__(
        self, settings: TrackerAdapterSettings, *, transport: Transport = DEFAULT_TRANSPORT
    ) -> None:
        super().__init__(settings.name)
        where = f"adapters.{settings.name}"
        self._email = self._resolve(f"{where}.email", settings.email)
        self._password = self._resolve(f"{where}.password", settings.password)
        base = settings.base_url.rstrip("/")
        try:
            self._login_url = httpx.URL(base + settings.login_path)
            self._post_url = httpx.URL(base + settings.post_path)
            self._logout_url = httpx.URL(base + settings.logout_path)
        except httpx.InvalidURL:
            raise ConfigError(f"{where}.base_url: not a valid URL") from None
        self._session_param = settings.session_param
        self._timeout = settings.timeout.total_seconds()
        self._timeout_text = format_duration(settings.timeout)
        # One more connection than deliveries, so a re-login never queues behind the posts
        # that are waiting for it.
        self._connections = settings.concurrency + 1
        self._transport: Transport = transport
        self._client: httpx.AsyncClient | None = None
        self._lock: asyncio.Lock | None = None
        # The session token (decoded), or None before the first login and after a failed one.
        self._session: SecretStr | None = None
        # Login attempts that have finished, whatever their outcome; counted when they end, so
        # that a delivery arriving during a login knows it waited for that one.
        self._logins_finished = 0
        #: The failure of the latest login attempt, shared with deliveries that waited for it.
        self._login_failure: DeliveryError | None = None
        self._logins = 0

    @staticmethod
    def _resolve(path: str, ref: SecretRef) -> SecretStr:
        try:
            return ref.resolve()
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @property
    def logins(self) -> int:
        """Successful logins so far (the first one included)."""
        return self._logins

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is not None:
            return
        # Created here, not in __init__, so that the lock belongs to the loop that delivers.
        self._lock = asyncio.Lock()
        limits = httpx.Limits(
            max_connections=self._connections, max_keepalive_connections=self._connections
        )
        timeout = httpx.Timeout(self._timeout)
        if self._transport == "aiohttp":
            self._client = HttpxAiohttpClient(timeout=timeout, limits=limits)
        else:
            self._client = httpx.AsyncClient(timeout=timeout, limits=limits)

    async def close(self) -> None:
        """Log out (best effort: the session expires anyway), then close the connections."""
        client, self._client = self._client, None
        session, self._session = self._session, None
        if client is None:
            return
        try:
            if session is not None:
                await self._logout(client, session)
        finally:
            await client.aclose()

    async def _logout(self, client: httpx.AsyncClient, session: SecretStr) -> None:
        outcome = "ok"
        try:
            async with asyncio.timeout(self._timeout):
                answer = await self._call(client, "logout", session=session)
        except TimeoutError:
            outcome = "timeout"
        except RetriableDeliveryError as exc:
            outcome = str(exc)
        else:
            if not 200 <= answer.status < 300 or answer.says_error:
                outcome = f"HTTP {answer.status}" + (", error" if answer.says_error else "")
        log.info("tracker logout", extra={"fields": {"adapter": self.name, "outcome": outcome}})

    # -- delivering --------------------------------------------------------------------------

    async def deliver(self, delivery: Delivery) -> None:
        """Post one trade, logging in first or again when the session requires it.

        ``timeout`` bounds the whole call, re-login and second post included, so a slow login
        cannot hold a worker slot longer than one delivery may take.
        """
        client = self._client
        if client is None:
            raise RuntimeError("TrackerAdapter.start() must be awaited before deliver()")
        body = json.dumps(
            tracker_payload(delivery.record, delivery.idempotency_key),
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()
        headers = {"Content-Type": "application/json", "Idempotency-Key": delivery.idempotency_key}
        answer: _Answer | None = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                answer = await self._post(client, body, headers)
        if answer is None:
            # Raised here, not in an except block: the error has no context to carry along.
            raise RetriableDeliveryError(f"timeout after {self._timeout_text}")
        self._classify_post(answer)

    async def _post(
        self, client: httpx.AsyncClient, body: bytes, headers: dict[str, str]
    ) -> _Answer:
        """Post with the current session; on "invalid session", log in again and post again."""
        session = await self._session_after(None)
        answer = await self._call(client, "post", session=session, body=body, headers=headers)
        if not answer.about_session:
            return answer
        log.info(
            "tracker session no longer valid; logging in again",
            extra={"fields": {"adapter": self.name, "status": answer.status}},
        )
        session = await self._session_after(session)
        answer = await self._call(client, "post", session=session, body=body, headers=headers)
        if answer.about_session:
            raise AdapterUnavailable("tracker rejected a session it had just issued")
        return answer

    @staticmethod
    def _classify_post(answer: _Answer) -> None:
        status = answer.status
        if status in RETRIABLE_STATUSES or 500 <= status < 600:
            raise RetriableDeliveryError(
                f"HTTP {status} from tracker", retry_after=parse_retry_after(answer.retry_after)
            )
        if status in ADAPTER_STATUSES:
            raise AdapterUnavailable(f"HTTP {status} from tracker: check post_path and the account")
        if not 200 <= status < 300:
            raise FatalDeliveryError(f"HTTP {status} from tracker: the record was refused")
        if answer.payload is None or "error" not in answer.payload:
            raise RetriableDeliveryError(f"HTTP {status} from tracker with an unreadable answer")
        if answer.says_error:
            # The tracker's message may quote the record's values: it is not repeated.
            raise FatalDeliveryError(f"HTTP {status} from tracker: error about the record")

    # -- the session -------------------------------------------------------------------------

    async def _session_after(self, stale: SecretStr | None) -> SecretStr:
        """A session other than ``stale``: the current one if it is newer, else a new login.

        Deliveries that wait here while another logs in take its session, or its failure; only
        a delivery that finds neither logs in itself.
        """
        assert self._lock is not None
        current = self._session
        if current is not None and current is not stale:
            return current
        finished_seen = self._logins_finished
        async with self._lock:
            current = self._session
            if current is not None and current is not stale:
                return current
            failure = self._login_failure
            if self._logins_finished != finished_seen and failure is not None:
                # A fresh instance: one exception object raised in many tasks would gather
                # all their tracebacks.
                raise type(failure)(str(failure), retry_after=failure.retry_after)
            self._session = None
            self._login_failure = None
            try:
                session = await self._login()
            except DeliveryError as exc:
                # A copy without the traceback, which would keep this call's frames alive.
                self._login_failure = type(exc)(str(exc), retry_after=exc.retry_after)
                log.warning(
                    "tracker login failed",
                    extra={
                        "fields": {
                            "adapter": self.name,
                            "error_class": type(exc).__name__,
                            "error": str(exc),
                        }
                    },
                )
                raise
            finally:
                self._logins_finished += 1
            self._session = session
            self._logins += 1
            log.info(
                "tracker login", extra={"fields": {"adapter": self.name, "logins": self._logins}}
            )
            return session

    async def _login(self) -> SecretStr:
        client = self._client
        if client is None:
            raise RetriableDeliveryError("the adapter is closing")
        answer = await self._call(client, "login")
        status = answer.status
        if status in RETRIABLE_STATUSES or 500 <= status < 600:
            raise RetriableDeliveryError(
                f"HTTP {status} from tracker login",
                retry_after=parse_retry_after(answer.retry_after),
            )
        if status in (401, 403):
            raise AdapterUnavailable(f"tracker rejected the credentials (HTTP {status})")
        if not 200 <= status < 300:
            # A wrong login_path or a tracker that changed its API: no record is to blame.
            raise AdapterUnavailable(f"HTTP {status} from tracker login")
        payload = answer.payload
        if payload is None:
            raise RetriableDeliveryError(
                f"HTTP {status} from tracker login with an unreadable answer"
            )
        if payload.get("error") is not False and payload.get("error") is not None:
            raise AdapterUnavailable("tracker rejected the credentials")
        session = payload.get("session")
        if not isinstance(session, str) or not session:
            raise RetriableDeliveryError("tracker login answered no session")
        # Myfxbook answers the token URL-encoded; httpx encodes it again when sending, so
        # decode it once here or the tracker would receive '%2F' for '/'.
        return SecretStr(unquote(session))

    # -- one HTTP exchange -------------------------------------------------------------------

    async def _call(
        self,
        client: httpx.AsyncClient,
        call: Call,
        *,
        session: SecretStr | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> _Answer:
        """One request and its answer; transport failures become retriable errors, unchained."""
        if call == "login":
            method, url = "GET", self._login_url
            params = {
                "email": self._email.get_secret_value(),
                "password": self._password.get_secret_value(),
            }
        else:
            assert session is not None
            method = "POST" if call == "post" else "GET"
            url = self._post_url if call == "post" else self._logout_url
            params = {self._session_param: session.get_secret_value()}
        failure: RetriableDeliveryError | None = None
        try:
            request = client.stream(method, url, params=params, content=body, headers=headers)
            async with request as response:
                raw = await self._read(response)
                status, retry_after = response.status_code, response.headers.get("retry-after")
        except (httpx.RequestError, aiohttp.ClientError) as exc:
            failure = self._transport_failure(call, exc)
        if failure is not None:
            # Raised outside the except block: the foreign exception holds the URL, with the
            # password or the session in it, and must not ride along as __context__.
            raise failure
        return _Answer(status, retry_after, _parse(raw))

    @staticmethod
    async def _read(response: httpx.Response) -> bytes | None:
        """The body, or None past ``_MAX_ANSWER_BYTES`` (drained, so the connection is reused)."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size <= _MAX_ANSWER_BYTES:
                chunks.append(chunk)
        return b"".join(chunks) if size <= _MAX_ANSWER_BYTES else None

    def _transport_failure(self, call: Call, exc: BaseException) -> RetriableDeliveryError:
        # httpx-aiohttp reports every aiohttp connection error as httpx.ConnectTimeout; the
        # aiohttp cause tells what really happened (FACTS.md).
        cause = exc.__cause__ if isinstance(exc.__cause__, aiohttp.ClientError) else exc
        where = "" if call == "post" else f" during {call}"
        if isinstance(cause, TimeoutError | httpx.TimeoutException):
            return RetriableDeliveryError(f"timeout after {self._timeout_text}{where}")
        return RetriableDeliveryError(f"connection error{where}: {type(cause).__name__}")


def _parse(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        payload = json.loads(raw)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


__all__ = [
    "ADAPTER_STATUSES",
    "OPTIONAL_FIELDS",
    "REF_FIELD",
    "RETRIABLE_STATUSES",
    "TRACKER_FIELDS",
    "TrackerAdapter",
    "tracker_payload",
]
