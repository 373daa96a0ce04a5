"""A minimal webhook receiver for the benchmark, run as its own process (``python -m
bench.server``), so neither the sink worker nor the raw clients share its GIL.

It is a bare asyncio protocol speaking just enough HTTP/1.1 (keep-alive, Content-Length
bodies): several times cheaper per request than an aiohttp application, so the receiver is
never what limits a client, and the ratios compare clients, not receivers. Each run reports
its own CPU use next to the rates to show it.

    POST <any path>     a delivery: 200, or 503 for the first attempt of each webhook-id in
                        fail-first mode
    GET  /stats         counts, and arrival times (epoch ms) of the first request, the first
                        and last success and the last failure, as JSON
    POST /reset?fail_first=0|1   forget everything, set the mode

The listening port is printed on stdout as ``port=<n>``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Sequence

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_FAIL = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class State:
    def __init__(self) -> None:
        self.reset(False)

    def reset(self, fail_first: bool) -> None:
        self.fail_first = fail_first
        self.ok = 0
        self.failed = 0
        self.bytes = 0
        self.first_ms: int | None = None
        self.last_ok_ms: int | None = None
        self.first_ok_ms: int | None = None
        self.last_failed_ms: int | None = None
        self.seen: set[bytes] = set()
        self.delivered: set[bytes] = set()
        self.unsigned = 0

    def stats(self) -> bytes:
        return json.dumps(
            {
                "ok": self.ok,
                "failed": self.failed,
                "distinct_ok": len(self.delivered),
                "bytes": self.bytes,
                "first_ms": self.first_ms,
                "last_ok_ms": self.last_ok_ms,
                "first_ok_ms": self.first_ok_ms,
                "last_failed_ms": self.last_failed_ms,
                "unsigned": self.unsigned,
            }
        ).encode()

    def delivery(self, webhook_id: bytes | None, signed: bool, size: int) -> bytes:
        now = time.time_ns() // 1_000_000
        if self.first_ms is None:
            self.first_ms = now
        self.bytes += size
        if not signed:
            self.unsigned += 1
        key = webhook_id or b""
        if self.fail_first and key not in self.seen:
            self.seen.add(key)
            self.failed += 1
            self.last_failed_ms = now
            return _FAIL
        self.ok += 1
        self.last_ok_ms = now
        if self.first_ok_ms is None:
            self.first_ok_ms = now
        self.delivered.add(key)
        return _OK


def _json_response(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


class Http(asyncio.Protocol):
    def __init__(self, state: State) -> None:
        self.state = state
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) != 3:
                self.transport.write(_BAD)
                self.transport.close()
                return
            method, target = parts[0], parts[1]
            length = 0
            webhook_id = None
            signed = False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"webhook-id":
                    webhook_id = value.strip()
                elif name == b"webhook-signature":
                    signed = True
            total = end + 4 + length
            if len(self.buf) < total:
                return
            del self.buf[:total]
            self.transport.write(self._answer(method, target, webhook_id, signed, length))

    def _answer(
        self, method: bytes, target: bytes, webhook_id: bytes | None, signed: bool, length: int
    ) -> bytes:
        if method == b"GET" and target == b"/stats":
            return _json_response(self.state.stats())
        if method == b"POST" and target.startswith(b"/reset"):
            self.state.reset(target.endswith(b"fail_first=1"))
            return _json_response(b"{}")
        return self.state.delivery(webhook_id, signed, length)


async def serve(host: str, port: int) -> None:
    state = State()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Http(state), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"port={bound}\n")
    sys.stdout.flush()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    async with server:
        await done.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
