"""The builtin HTTP/1.1 client against real servers on loopback that answer in scripted ways.

Each server is a plain asyncio server whose handler reads requests off the socket and writes
whatever bytes the test gives it, so the client meets the framings and failures real servers
produce: chunked bodies, closing after an answer, closing an idle connection, interim answers,
broken heads, TLS with a certificate it does or does not trust.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from consumer.adapters.http1 import BadResponse, Http1Pool, HttpError, Response

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

#: Reads one request (head and Content-Length body) off the connection, or None at its end.
ReadRequest = Callable[[], Awaitable[bytes | None]]
Handler = Callable[[int, ReadRequest, asyncio.StreamWriter], Awaitable[None]]


def request(body: bytes = b'{"a":1}', path: bytes = b"/hook") -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body


class Server:
    """Counts connections and requests; ``handler(conn_no, read_request, writer)`` answers."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.open = 0
        self.most_open = 0
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        number = self.connections

        async def read_request() -> bytes | None:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            data = head + await reader.readexactly(length)
            self.requests.append(data)
            return data

        try:
            await self.handler(number, read_request, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()


@asynccontextmanager
async def serving(
    handler: Handler, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Server]:
    server = Server(handler)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=ssl_context)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


def answer_each(*answers: bytes) -> Handler:
    """Answer requests with ``answers`` in turn, whichever connection they come on; the last
    answer is repeated."""
    count = 0

    async def handler(_: int, read: ReadRequest, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        while await read() is not None:
            writer.write(answers[min(count, len(answers) - 1)])
            count += 1
            await writer.drain()

    return handler


def pool(
    server: Server,
    *,
    limit: int = 4,
    idle_timeout: float = 15.0,
    ssl_context: ssl.SSLContext | None = None,
) -> Http1Pool:
    return Http1Pool(
        "127.0.0.1", server.port, limit=limit, idle_timeout=idle_timeout, ssl_context=ssl_context
    )


def go(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


@dataclass
class Exchange:
    """``count`` requests sent one after the other, and what came of each."""

    outcomes: list[Response | Exception]
    server: Server
    client: Http1Pool

    @property
    def statuses(self) -> list[int | str]:
        return [o.status if isinstance(o, Response) else type(o).__name__ for o in self.outcomes]


def exchange(handler: Handler, count: int, *bodies: bytes, idle_timeout: float = 15.0) -> Exchange:
    async def test() -> Exchange:
        async with serving(handler) as server:
            client = pool(server, idle_timeout=idle_timeout)
            outcomes: list[Response | Exception] = []
            for i in range(count):
                try:
                    outcomes.append(await client.request(request(*bodies[i : i + 1])))
                except (HttpError, OSError) as exc:
                    outcomes.append(exc)
            await client.close()
        return Exchange(outcomes, server, client)

    return asyncio.run(asyncio.wait_for(test(), 20))


# -- framing ------------------------------------------------------------------------------------


def test_keep_alive_reuses_one_connection_for_sequential_requests() -> None:
    done = exchange(answer_each(OK), 5)
    assert done.statuses == [200] * 5
    assert done.server.connections == 1 and done.client.opened == 1
    assert done.server.requests[0].endswith(b'{"a":1}')


def test_chunked_bodies_with_extensions_and_trailers_are_read_to_their_end() -> None:
    chunked = (
        b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\nRetry-After: 7\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1A\r\n" + b"x" * 26 + b"\r\n0\r\nTrailer-Field: t\r\n\r\n"
    )
    done = exchange(answer_each(chunked, OK), 2)
    # The chunked body was consumed exactly: the next answer on the connection parses.
    assert done.statuses == [202, 200] and done.server.connections == 1
    first = done.outcomes[0]
    assert isinstance(first, Response) and first.headers[b"retry-after"] == b"7"


def test_connection_close_and_http_1_0_answers_are_not_reused() -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
    ]
    done = exchange(answer_each(*answers), 4)
    # Two closed by their answers; the third kept (HTTP/1.0 with keep-alive) and reused.
    assert done.statuses == [200] * 4 and done.client.opened == 3


def test_an_answer_without_length_is_read_until_the_server_closes() -> None:
    async def handler(_: int, read: ReadRequest, writer: asyncio.StreamWriter) -> None:
        await read()
        writer.write(b"HTTP/1.1 500 Oops\r\n\r\n")
        writer.write(b"some body " * 1000)
        await writer.drain()
        writer.close()

    done = exchange(handler, 2)
    assert done.statuses == [500, 500] and done.server.connections == 2


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # Interim answers (103 Early Hints, 100 Continue) come before the final one.
        (b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n" + OK, 200),
        # 204 and 304 carry no body, with or without a length.
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204),
        # A body bigger than the read buffer's high-water mark: reading pauses and resumes.
        (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (3 << 20) + b"z" * (3 << 20), 200),
    ],
)
def test_answers_are_read_exactly_to_their_end(first: bytes, second: int) -> None:
    done = exchange(answer_each(first, OK), 2)
    assert done.statuses == [second, 200] and done.server.connections == 1


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"SMTP ready\r\n\r\n", "status line"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", "conflicting"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "not a number"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "hexadecimal"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
            "longer than its size",
        ),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", "longer than"),
    ],
)
def test_broken_answers_are_bad_responses(answer: bytes, message: str) -> None:
    (outcome,) = exchange(answer_each(answer), 1).outcomes
    assert isinstance(outcome, BadResponse)
    assert re.search(message, str(outcome))
    # The message names the problem, never the bytes the server sent.
    assert "aaaa" not in str(outcome) and "SMTP" not in str(outcome)


# -- connections that end ---------------------------------------------------------------------


def test_a_request_on_an_idle_connection_the_server_dropped_is_sent_again_once() -> None:
    async def handler(number: int, read: ReadRequest, writer: asyncio.StreamWriter) -> None:
        await read()
        writer.write(OK)
        await writer.drain()
        if number == 1:
            # The second request arrives, and the server closes without a byte of answer, as
            # one closing an idle connection at that moment does.
            await read()
            writer.transport.abort()
            return
        while await read() is not None:
            writer.write(OK)
            await writer.drain()

    done = exchange(handler, 2, b'{"n":1}', b'{"n":2}')
    assert done.statuses == [200, 200] and done.server.connections == 2
    assert [r[-7:] for r in done.server.requests] == [b'{"n":1}', b'{"n":2}', b'{"n":2}']


def test_a_new_connection_closed_before_the_answer_is_an_error_not_retried() -> None:
    async def handler(_: int, read: ReadRequest, writer: asyncio.StreamWriter) -> None:
        await read()
        writer.transport.abort()

    done = exchange(handler, 1)
    assert done.statuses == ["RemoteClosed"] and done.server.connections == 1


def test_a_connection_closed_mid_answer_is_an_error_not_retried() -> None:
    async def handler(number: int, read: ReadRequest, writer: asyncio.StreamWriter) -> None:
        await read()
        writer.write(OK)
        await read()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        writer.transport.abort()

    done = exchange(handler, 2)
    # Part of an answer came: no second try.
    assert done.statuses == [200, "RemoteClosed"] and done.server.connections == 1


def test_connections_idle_past_the_timeout_are_not_reused() -> None:
    done = exchange(answer_each(OK), 2, idle_timeout=0.0)
    assert done.statuses == [200, 200] and done.server.connections == 2


def test_a_cancelled_request_aborts_its_connection_and_the_pool_goes_on() -> None:
    async def handler(number: int, read: ReadRequest, writer: asyncio.StreamWriter) -> None:
        if number == 1:
            await read()
            await read()  # never answers; returns when the client aborts
            return
        await answer_each(OK)(number, read, writer)

    async def test() -> None:
        async with serving(handler) as server:
            client = pool(server, limit=1)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.request(request()), 0.2)
            # The slot was given back and the half-used connection was not: a new one answers.
            assert (await client.request(request())).status == 200
            await client.close()
        assert server.connections == 2

    go(test)


def test_connection_refused_is_an_os_error() -> None:
    async def test() -> None:
        async with serving(answer_each(OK)) as server:
            port = server.port
        client = Http1Pool("127.0.0.1", port, limit=1)
        with pytest.raises(OSError):
            await client.request(request())
        await client.close()
        with pytest.raises(HttpError, match="closed"):
            await client.request(request())

    go(test)


def test_no_more_than_limit_connections_are_open_at_once() -> None:
    async def handler(number: int, read: ReadRequest, writer: asyncio.StreamWriter) -> None:
        while await read() is not None:
            await asyncio.sleep(0.01)  # holds each answer back so that requests overlap
            writer.write(OK)
            await writer.drain()

    async def test() -> None:
        async with serving(handler) as server:
            client = pool(server, limit=3)
            results = await asyncio.gather(*(client.request(request()) for _ in range(12)))
            await client.close()
        assert [r.status for r in results] == [200] * 12
        assert server.most_open == 3 and server.connections == 3

    go(test)


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "auto-trace test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    where = tmp_path_factory.mktemp("tls")
    cert_path, key_path = where / "cert.pem", where / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_with_a_trusted_certificate_works_and_an_untrusted_one_is_refused(
    certificate: tuple[Path, Path],
) -> None:
    cert_path, key_path = certificate
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert_path, key_path)

    async def test() -> None:
        async with serving(answer_each(OK), server_side) as server:
            trusting = ssl.create_default_context(cafile=str(cert_path))
            client = pool(server, ssl_context=trusting)
            assert (await client.request(request())).status == 200
            assert (await client.request(request())).status == 200
            await client.close()
            assert server.connections == 1
            # The default trust store does not know a self-signed certificate.
            client = pool(server, ssl_context=ssl.create_default_context())
            with pytest.raises(ssl.SSLCertVerificationError):
                await client.request(request())
            await client.close()

    go(test)
