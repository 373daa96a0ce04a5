"""The raw HTTP baselines of R4: POST the same bodies, with the same headers the webhook adapter
sends, to the same receiver at the same concurrency, with a plain aiohttp session or a plain
httpx client and nothing else (no Kafka, no decoding). Run as its own process:

    python -m bench.rawhttp --client aiohttp|httpx|builtin --url URL --concurrency N BODIES_FILE

BODIES_FILE holds one delivery per line: ``<webhook-id> <json body>``. The receiver times the
run (first to last arrival), as it does for the sink worker.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aiohttp
import httpx

from consumer.adapters.http1 import Http1Pool

Request = tuple[bytes, dict[str, str]]
Post = Callable[[bytes, dict[str, str]], Awaitable[int]]

_KEY = b"bench-signing-key-not-a-secret!!"


def load(path: Path) -> list[Request]:
    """Headers as the adapter builds them (signature included), computed before timing."""
    timestamp = str(int(time.time()))
    out: list[Request] = []
    for line in path.read_bytes().splitlines():
        msg_id, _, body = line.partition(b" ")
        ident = msg_id.decode()
        signed = f"{ident}.{timestamp}.".encode() + body
        signature = base64.b64encode(hmac.new(_KEY, signed, hashlib.sha256).digest()).decode()
        out.append(
            (
                body,
                {
                    "Content-Type": "application/json",
                    "Idempotency-Key": ident,
                    "webhook-id": ident,
                    "webhook-timestamp": timestamp,
                    "webhook-signature": "v1," + signature,
                },
            )
        )
    return out


async def _drive(requests: list[Request], concurrency: int, post: Post) -> int:
    """``concurrency`` workers taking the next request; returns the number of non-2xx."""
    it = iter(requests)
    errors = 0

    async def worker() -> None:
        nonlocal errors
        for body, headers in it:
            status = await post(body, headers)
            if not 200 <= status < 300:
                errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


async def run_aiohttp(url: str, requests: list[Request], concurrency: int) -> int:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(body: bytes, headers: dict[str, str]) -> int:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                return response.status

        return await _drive(requests, concurrency, post)


async def run_builtin(url: str, requests: list[Request], concurrency: int) -> int:
    """The webhook adapter's own client (:mod:`consumer.adapters.http1`), requests written as
    the adapter writes them: how much of R4 is the client, and how much the sink around it."""
    target = httpx.URL(url)
    client = Http1Pool(target.raw_host.decode(), target.port or 80, limit=concurrency)
    head = b"POST " + target.raw_path + b" HTTP/1.1\r\nHost: " + target.netloc + b"\r\n"

    async def post(body: bytes, headers: dict[str, str]) -> int:
        fields = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        data = head + f"{fields}Content-Length: {len(body)}\r\n\r\n".encode() + body
        return (await client.request(data)).status

    try:
        return await _drive(requests, concurrency, post)
    finally:
        await client.close()


async def run_httpx(url: str, requests: list[Request], concurrency: int) -> int:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def post(body: bytes, headers: dict[str, str]) -> int:
            response = await client.post(url, content=body, headers=headers)
            return response.status_code

        return await _drive(requests, concurrency, post)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rawhttp")
    parser.add_argument("--client", choices=["aiohttp", "httpx", "builtin"], required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--limit", type=int, default=0, help="only the first N bodies")
    parser.add_argument("bodies", type=Path)
    args = parser.parse_args(argv)
    requests = load(args.bodies)
    if args.limit:
        requests = requests[: args.limit]
    runner = {"aiohttp": run_aiohttp, "httpx": run_httpx, "builtin": run_builtin}[args.client]
    errors = asyncio.run(runner(args.url, requests, args.concurrency))
    if errors:
        sys.stderr.write(f"{errors} requests were not answered 2xx\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
