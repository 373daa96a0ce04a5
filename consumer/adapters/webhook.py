"""The ``webhook`` adapter: one signed HTTP POST per record, the Standard Webhooks way.

Receivers verify us with any Standard Webhooks library (https://www.standardwebhooks.com):
``webhook-id`` is the delivery's idempotency key, so it is also what they deduplicate on, and it
is repeated as ``Idempotency-Key`` for receivers that only know that convention.

The default transport is :mod:`consumer.adapters.http1`, a small keep-alive HTTP/1.1 client for
the one origin the adapter posts to: the sink worker is CPU-bound, and an aiohttp POST cost
five to six times its CPU (FACTS.md, ``make bench`` R4). When a proxy applies to the URL the
adapter posts through an aiohttp session instead, which knows proxies. httpx's own connection
pool slows down as concurrency grows (FACTS.md): ``transport="httpx"`` keeps a plain httpx
client, and ``transport="aiohttp"`` an aiohttp session, for comparison.

Every error message here ends up in a dead-letter header and a log line, so it says what kind
of failure happened and nothing else: no URL (it may carry a token), no response body, no
header value, no secret.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
import ssl
import time
import urllib.request
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Final, Literal

import aiohttp
import httpx
import yarl

from consumer import __version__
from consumer.adapters import http1
from consumer.adapters.base import Adapter, Delivery
from consumer.config import SecretRef, WebhookAdapterSettings, format_duration
from consumer.deadline import Deadlines
from consumer.errors import ConfigError, FatalDeliveryError, RetriableDeliveryError

Transport = Literal["builtin", "aiohttp", "httpx"]

#: The transport used when the caller does not choose one (see the module docstring).
DEFAULT_TRANSPORT: Final[Transport] = "builtin"

USER_AGENT: Final = f"auto-trace/{__version__}"

#: Statuses that say "not now" rather than "never": the record goes to a retry tier.
RETRIABLE_STATUSES: Final = frozenset({408, 425, 429})

_SECRET_PREFIX = "whsec_"
_DELTA_SECONDS = re.compile(r"^[0-9]+$")

#: Headers the adapter sets itself; configured extra headers may not replace them, or the
#: signature or the deduplication key would silently stop meaning anything.
_RESERVED_HEADERS: Final = frozenset(
    {"content-type", "webhook-id", "webhook-timestamp", "webhook-signature", "idempotency-key"}
)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date).

    A value we cannot read is ignored rather than guessed at: the retry tiers still apply. A
    date in the past means "now", never a negative wait.
    """
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.match(value):
        return float(int(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # RFC 9110 HTTP-dates are always GMT; "-0000" comes back naive.
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _decode_secret(secret: str) -> bytes | None:
    """The HMAC key of a ``whsec_<base64>`` secret, or None if it is not one."""
    if not secret.startswith(_SECRET_PREFIX):
        return None
    encoded = secret[len(_SECRET_PREFIX) :]
    # Unpadded base64 is accepted, as the reference library accepts it.
    encoded += "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None
    return key or None


class WebhookAdapter(Adapter):
    """Signs and POSTs each record; classifies the answer for the sink engine."""

    def __init__(
        self, settings: WebhookAdapterSettings, *, transport: Transport = DEFAULT_TRANSPORT
    ) -> None:
        super().__init__(settings.name)
        where = f"adapters.{settings.name}"
        keys = [
            self._load_key(f"{where}.secrets.{i}", ref) for i, ref in enumerate(settings.secrets)
        ]
        # Keyed once: each signature copies a keyed HMAC instead of padding and hashing the key
        # again (HMAC setup was most of a signature's cost).
        self._macs = tuple(hmac.new(key, digestmod=hashlib.sha256) for key in keys)
        try:
            url = httpx.URL(settings.url)
        except httpx.InvalidURL:
            # The URL may carry a token: name the field, not the value.
            raise ConfigError(f"{where}.url: not a valid URL") from None
        # Credentials in the URL become an explicit Basic auth: httpx would add the header
        # and still pass them in the URL, which aiohttp refuses ("Cannot combine
        # AUTHORIZATION header with ... credentials encoded in URL").
        self._auth = httpx.BasicAuth(url.username, url.password) if url.userinfo else None
        self._url = url.copy_with(userinfo=b"")
        # aiohttp deprecates its BasicAuth helper: the header is built once, here.
        self._aio_auth: dict[str, str] = {}
        if url.userinfo:
            pair = f"{url.username}:{url.password}".encode()
            self._aio_auth["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        # Already percent-encoded by httpx: aiohttp must send it byte for byte.
        self._aio_url = yarl.URL(str(self._url), encoded=True)
        clashes = sorted(h for h in settings.headers if h.lower() in _RESERVED_HEADERS)
        if clashes:
            raise ConfigError(
                f"{where}.headers: {', '.join(clashes)} is set by the adapter and cannot be "
                "configured"
            )
        self._extra_headers = dict(settings.headers)
        # The builtin transport writes every request from this head, built once: request line,
        # Host, and the headers that are the same on every request.
        fixed = {
            "Host": self._url.netloc.decode("ascii"),
            "User-Agent": USER_AGENT,
            **self._extra_headers,
            **self._aio_auth,
            "Content-Type": "application/json",
        }
        self._head = (
            b"POST "
            + self._url.raw_path
            + b" HTTP/1.1\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        )
        self._timeout = settings.timeout.total_seconds()
        self._deadlines = Deadlines(self._timeout)
        self._timeout_text = format_duration(settings.timeout)
        self._concurrency = settings.concurrency
        self._transport: Transport = transport
        self._client: httpx.AsyncClient | None = None
        self._pool: http1.Http1Pool | None = None
        self._session: aiohttp.ClientSession | None = None
        self._proxy: yarl.URL | None = None
        self._proxy_headers: dict[str, str] = {}

    @staticmethod
    def _load_key(path: str, ref: SecretRef) -> bytes:
        try:
            secret = ref.resolve().get_secret_value()
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        key = _decode_secret(secret)
        if key is None:
            # Never quote the value, not even a prefix of it.
            raise ConfigError(f"{path}: expected a Standard Webhooks secret 'whsec_<base64>'")
        return key

    def sign(self, msg_id: str, timestamp: int, body: bytes) -> str:
        """The ``webhook-signature`` value: one ``v1,`` signature per secret, space-separated.

        During a rotation every configured secret signs, so receivers holding either the old or
        the new one keep verifying.
        """
        prefix = f"{msg_id}.{timestamp}.".encode()
        signatures = []
        for keyed in self._macs:
            mac = keyed.copy()
            mac.update(prefix)
            mac.update(body)
            signatures.append("v1," + base64.b64encode(mac.digest()).decode())
        return " ".join(signatures)

    async def start(self) -> None:
        if self._client is not None or self._session is not None or self._pool is not None:
            return
        if self._transport != "httpx":
            self._resolve_proxy()
        if self._transport == "builtin" and self._proxy is None:
            https = self._url.scheme == "https"
            self._pool = http1.Http1Pool(
                self._url.raw_host.decode("ascii"),  # IDNA-encoded, IPv6 without brackets
                self._url.port or (443 if https else 80),
                limit=self._concurrency,
                ssl_context=ssl.create_default_context() if https else None,
            )
        elif self._transport != "httpx":
            # aiohttp, chosen or because a proxy applies (the builtin client only speaks to
            # the origin directly). No session timeout: deliver() bounds each whole call
            # itself. No trust_env: it re-reads the environment and parses ~/.netrc on every
            # request (~0.3 ms of CPU each, measured), so the proxy is resolved once, above.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._concurrency),
                timeout=aiohttp.ClientTimeout(total=None),
                # A webhook carries no session: cookies a receiver sets are never sent back,
                # and the jar's per-request filtering is not paid for.
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
            )
        else:
            limits = httpx.Limits(
                max_connections=self._concurrency, max_keepalive_connections=self._concurrency
            )
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self._timeout), limits=limits)

    def _resolve_proxy(self) -> None:
        """The proxy for the one URL this adapter posts to, from ``HTTP_PROXY``/``HTTPS_PROXY``
        and ``NO_PROXY``, as httpx and curl read them. Credentials in the proxy URL become a
        ``Proxy-Authorization`` header so they never travel in a request line."""
        host = self._url.host
        proxy = urllib.request.getproxies_environment().get(self._url.scheme)
        if not proxy or urllib.request.proxy_bypass(host):
            self._proxy, self._proxy_headers = None, {}
            return
        try:
            url = httpx.URL(proxy)
        except httpx.InvalidURL:
            raise ConfigError(f"{self._url.scheme}_proxy: not a valid URL") from None
        self._proxy_headers = {}
        if url.userinfo:
            pair = f"{url.username}:{url.password}".encode()
            self._proxy_headers["Proxy-Authorization"] = "Basic " + base64.b64encode(pair).decode()
        self._proxy = yarl.URL(str(url.copy_with(userinfo=b"")), encoded=True)

    def connections_opened(self) -> int | None:
        return self._pool.opened if self._pool is not None else None

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def deliver(self, delivery: Delivery) -> None:
        if self._client is None and self._session is None and self._pool is None:
            raise RuntimeError("WebhookAdapter.start() must be awaited before deliver()")
        body = delivery.json_body()
        msg_id = delivery.idempotency_key
        timestamp = int(time.time())
        signature = self.sign(msg_id, timestamp, body)
        # Bounds the whole call (httpx's timeout is per phase: connect, each read, ...), so a
        # receiver trickling bytes cannot hold a worker slot forever.
        task = self._deadlines.start()
        try:
            if self._pool is not None:
                status, retry_after = await self._post_builtin(
                    self._pool, body, msg_id, timestamp, signature
                )
            else:
                headers = {
                    **self._extra_headers,
                    "User-Agent": USER_AGENT,
                    "Content-Type": "application/json",
                    "Idempotency-Key": msg_id,
                    "webhook-id": msg_id,
                    "webhook-timestamp": str(timestamp),
                    "webhook-signature": signature,
                }
                if self._session is not None:
                    status, retry_after = await self._post_aiohttp(self._session, body, headers)
                else:
                    assert self._client is not None
                    status, retry_after = await self._post(self._client, body, headers)
        except asyncio.CancelledError:
            if self._deadlines.expired(task):
                raise RetriableDeliveryError(f"timeout after {self._timeout_text}") from None
            raise
        except (OSError, http1.HttpError, httpx.RequestError, aiohttp.ClientError) as exc:
            # OSError includes TimeoutError, refused and reset connections and TLS failures.
            raise self._transport_failure(exc) from exc
        finally:
            self._deadlines.end(task)
        if 200 <= status < 300:
            return
        message = f"HTTP {status} from webhook"
        if status in RETRIABLE_STATUSES or 500 <= status < 600:
            raise RetriableDeliveryError(message, retry_after=parse_retry_after(retry_after))
        raise FatalDeliveryError(message)

    async def _post_builtin(
        self, pool: http1.Http1Pool, body: bytes, msg_id: str, timestamp: int, signature: str
    ) -> tuple[int, str | None]:
        # The same headers as deliver() gives the other transports, written directly; every
        # value here is ASCII the adapter made itself (the id, digits, base64).
        head = (
            f"Content-Length: {len(body)}\r\nIdempotency-Key: {msg_id}\r\nwebhook-id: {msg_id}"
            f"\r\nwebhook-timestamp: {timestamp}\r\nwebhook-signature: {signature}\r\n\r\n"
        )
        response = await pool.request(self._head + head.encode() + body)
        retry_after = response.headers.get(b"retry-after")
        return response.status, None if retry_after is None else retry_after.decode("latin-1")

    async def _post(
        self, client: httpx.AsyncClient, body: bytes, headers: dict[str, str]
    ) -> tuple[int, str | None]:
        request = client.stream("POST", self._url, content=body, headers=headers, auth=self._auth)
        async with request as response:
            # Drain without keeping the body, so the connection goes back to the pool.
            async for _ in response.aiter_raw():
                pass
            return response.status_code, response.headers.get("retry-after")

    async def _post_aiohttp(
        self, session: aiohttp.ClientSession, body: bytes, headers: dict[str, str]
    ) -> tuple[int, str | None]:
        # allow_redirects=False: as with httpx, a redirect is an answer (fatal), not a new
        # destination for a signed body.
        if self._aio_auth:
            headers = {**headers, **self._aio_auth}
        if self._proxy_headers and self._url.scheme == "http":
            # A plain-HTTP request goes to the proxy itself, so its credentials ride on it;
            # for https aiohttp sends proxy_headers on the CONNECT that opens the tunnel.
            headers = {**headers, **self._proxy_headers}
        request = session.post(
            self._aio_url,
            data=body,
            headers=headers,
            allow_redirects=False,
            proxy=self._proxy,
            proxy_headers=self._proxy_headers or None,
        )
        async with request as response:
            # Drain without keeping the body, so the connection goes back to the pool.
            while await response.content.readany():
                pass
            return response.status, response.headers.get("retry-after")

    def _transport_failure(self, exc: BaseException) -> RetriableDeliveryError:
        cause = exc
        if isinstance(cause, TimeoutError | httpx.TimeoutException):
            return RetriableDeliveryError(f"timeout after {self._timeout_text}")
        return RetriableDeliveryError(f"connection error: {type(cause).__name__}")


__all__ = [
    "DEFAULT_TRANSPORT",
    "RETRIABLE_STATUSES",
    "Transport",
    "WebhookAdapter",
    "parse_retry_after",
]
