"""A small HTTP/1.1 client for one origin: what the webhook adapter needs, and nothing more.

Why it exists: a POST through aiohttp costs ~165-240 µs of CPU on the bench box, and this
~30 µs (FACTS.md). The webhook sink is CPU-bound, so that difference is most of a delivery's
cost (``make bench`` R4). aiohttp spends it on things a webhook never uses: cookie and redirect
handling, a request object per call, header multidicts, a streaming reader.

What it does: requests written as bytes by the caller to one ``scheme://host:port``, a
keep-alive pool of at most ``limit`` connections, TLS with certificate verification, and
responses framed by ``Content-Length``, ``Transfer-Encoding: chunked`` or the connection's end
(their bodies are read and thrown away, so a connection can be used again). Interim ``1xx``
answers are skipped. What it leaves to others: proxies (the adapter goes through aiohttp when
one is configured), redirects (the adapter treats them as answers), compression (never asked
for), HTTP/2, pipelining.

A request on a reused connection that the server closed before sending a byte of its answer is
sent once more on a new connection: servers close idle connections whenever they like, and
the request may have been written just as they did. The webhook is at-least-once with a stable
``webhook-id``, so a request the server did see is one the receiver drops as a repeat.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Final, NamedTuple

#: Limits on what a server may send before it counts as a broken answer.
MAX_HEAD: Final = 64 * 1024
MAX_LINE: Final = 8 * 1024
#: Reading pauses above this much buffered and unread data, and resumes below a quarter of it.
HIGH_WATER: Final = 256 * 1024

#: Statuses whose answers never carry a body (RFC 9112 §6.3).
_NO_BODY: Final = frozenset({204, 304})


class HttpError(Exception):
    """A request that got no usable answer: the connection failed or the answer was broken.

    Messages never quote what the server sent (it could echo a token or a record value back).
    """


class RemoteClosed(HttpError):
    """The server closed the connection before its answer was complete."""


class BadResponse(HttpError):
    """The server's answer is not HTTP/1.x as RFC 9112 frames it."""


class Response(NamedTuple):
    status: int
    #: Header names lower-cased; for a repeated header, its last value.
    headers: dict[bytes, bytes]


class _Connection(asyncio.Protocol):
    """One socket's bytes, buffered, with a way for the reading coroutine to wait for more."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        #: Bytes received over the connection's life: did a request get any answer at all?
        self.received = 0
        self.closed = False
        self.paused = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None

    # -- protocol callbacks (the event loop calls these) --------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.received += len(data)
        if len(self.buffer) > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self.closed = True
        self._wake()
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- reading (the request's coroutine calls these) ----------------------------------------

    async def more(self) -> None:
        """Wait for bytes beyond what is buffered; RemoteClosed if none can come."""
        if self.closed:
            raise RemoteClosed("the server closed the connection mid-answer")
        if self.paused and len(self.buffer) < HIGH_WATER // 4 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        await waiter

    async def until(self, delimiter: bytes, limit: int, what: str) -> bytes:
        """Bytes up to ``delimiter`` (consumed with it, not returned)."""
        start = 0
        while True:
            end = self.buffer.find(delimiter, start)
            if end >= 0:
                if end > limit:
                    break
                out = bytes(self.buffer[:end])
                del self.buffer[: end + len(delimiter)]
                return out
            if len(self.buffer) > limit:
                break
            start = max(0, len(self.buffer) - len(delimiter) + 1)
            await self.more()
        raise BadResponse(f"{what} longer than {limit} bytes")

    async def crlf(self) -> None:
        """Consume the line end that closes a chunk's data."""
        while len(self.buffer) < 2:
            await self.more()
        if self.buffer[:2] != b"\r\n":
            raise BadResponse("a chunk is longer than its size")
        del self.buffer[:2]

    async def skip(self, count: int) -> None:
        """Consume ``count`` bytes without keeping them."""
        while True:
            taken = min(count, len(self.buffer))
            del self.buffer[:taken]
            count -= taken
            if not count:
                return
            await self.more()

    async def skip_to_end(self) -> None:
        """Consume everything until the server closes the connection."""
        while True:
            self.buffer.clear()
            try:
                await self.more()
            except RemoteClosed:
                return

    def reusable(self) -> bool:
        return not self.closed and not self.buffer and self.transport is not None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.closed = True


def _parse_head(head: bytes) -> tuple[int, bool, dict[bytes, bytes]]:
    """Status, whether the version is HTTP/1.1, and the header fields of an answer's head."""
    lines = head.split(b"\r\n")
    status_line = lines[0]
    # "HTTP/1.1 200 OK": the reason phrase may be empty, and the space before it may be missing.
    if (
        len(status_line) < 12
        or not status_line.startswith(b"HTTP/1.")
        or status_line[8:9] != b" "
        or not status_line[9:12].isdigit()
        or (len(status_line) > 12 and status_line[12:13] != b" ")
    ):
        raise BadResponse("not an HTTP/1.x status line")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or b" " in name:
            # Includes obsolete line folding (a line starting with whitespace), which RFC 9112
            # lets a client reject.
            raise BadResponse("a header line is malformed")
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"content-length" and headers.get(name, value) != value:
            raise BadResponse("conflicting Content-Length headers")
        if name in headers and name in (b"transfer-encoding", b"connection"):
            value = headers[name] + b", " + value  # list-valued: keep every element
        headers[name] = value
    return int(status_line[9:12]), status_line[7:8] == b"1", headers


def _tokens(value: bytes | None) -> list[bytes]:
    if not value:
        return []
    return [t.strip().lower() for t in value.split(b",")]


async def _skip_chunked(conn: _Connection) -> None:
    while True:
        line = await conn.until(b"\r\n", MAX_LINE, "a chunk-size line")
        size_text = line.partition(b";")[0].strip()  # chunk extensions are ignored
        try:
            size = int(size_text, 16)
        except ValueError:
            raise BadResponse("a chunk size is not hexadecimal") from None
        if size < 0:
            raise BadResponse("a chunk size is not hexadecimal")
        if size == 0:
            # Trailer fields, then the empty line that ends the message.
            while await conn.until(b"\r\n", MAX_LINE, "a trailer line"):
                pass
            return
        await conn.skip(size)
        await conn.crlf()


async def _read_response(conn: _Connection) -> tuple[Response, bool]:
    """Read one answer; the bool says whether the connection can carry another request."""
    while True:
        status, http11, headers = _parse_head(await conn.until(b"\r\n\r\n", MAX_HEAD, "the head"))
        if 100 <= status < 200 and status != 101:
            continue  # interim answer (100 Continue, 103 Early Hints): the final one follows
        break
    connection = _tokens(headers.get(b"connection"))
    keep = (b"close" not in connection) if http11 else (b"keep-alive" in connection)
    coding = _tokens(headers.get(b"transfer-encoding"))
    if 100 <= status < 200 or status in _NO_BODY:
        pass
    elif coding:
        if coding[-1] == b"chunked":
            await _skip_chunked(conn)
            keep = keep and b"content-length" not in headers
        else:
            await conn.skip_to_end()
            keep = False
    elif b"content-length" in headers:
        text = headers[b"content-length"]
        if not text.isdigit():
            raise BadResponse("Content-Length is not a number")
        await conn.skip(int(text))
    else:
        await conn.skip_to_end()
        keep = False
    return Response(status, headers), keep and status != 101


class Http1Pool:
    """Keep-alive connections to one origin, at most ``limit`` open at once.

    Not thread-safe: one event loop uses it. Each call holds one connection from writing the
    request until its answer is read; a call cancelled meanwhile aborts that connection, since
    what is left of the answer on it is unknown.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        limit: int,
        ssl_context: ssl.SSLContext | None = None,
        idle_timeout: float = 15.0,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.idle_timeout = idle_timeout
        self._slots = asyncio.Semaphore(limit)
        #: Connections waiting for a request, the most recently used last.
        self._idle: list[_Connection] = []
        self._closed = False
        #: Connections opened so far (tests and the bench read it).
        self.opened = 0

    async def request(self, data: bytes) -> Response:
        """Send ``data`` (a whole request: head and body) and read the answer."""
        if self._closed:
            raise HttpError("the connection pool is closed")
        async with self._slots:
            conn = self._take_idle()
            if conn is not None:
                before = conn.received
                try:
                    return await self._exchange(conn, data)
                except RemoteClosed:
                    if conn.received != before:
                        raise
                    # Nothing of an answer arrived: the server closed an idle connection as
                    # the request went out. Once more, on a new connection.
            conn = await self._connect()
            return await self._exchange(conn, data)

    async def _exchange(self, conn: _Connection, data: bytes) -> Response:
        assert conn.transport is not None
        try:
            conn.transport.write(data)
            response, keep = await _read_response(conn)
        except BaseException:
            conn.abort()
            raise
        if keep and conn.reusable() and not self._closed:
            conn.idle_since = asyncio.get_running_loop().time()
            self._idle.append(conn)
        else:
            conn.close()
        return response

    def _take_idle(self) -> _Connection | None:
        now = asyncio.get_running_loop().time()
        while self._idle:
            conn = self._idle.pop()
            # Bytes on an idle connection are an answer to nothing (often a 408 before the
            # server closes it): the connection is not in a known state.
            if conn.reusable() and now - conn.idle_since < self.idle_timeout:
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            _Connection,
            self.host,
            self.port,
            ssl=self.ssl_context,
            server_hostname=self.host if self.ssl_context is not None else None,
        )
        self.opened += 1
        return conn

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        # Give the transports a turn of the loop to release their sockets.
        await asyncio.sleep(0)


__all__ = ["BadResponse", "Http1Pool", "HttpError", "RemoteClosed", "Response"]
