"""The raw HTTP baselines of make bench R4 against a real receiver on loopback: each client must
really send every request, signed as the adapter signs it, or the ratios compare nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench import rawhttp
from consumer.receiver import WebhookReceiver


@pytest.mark.parametrize("client", ["aiohttp", "httpx", "builtin"])
def test_each_raw_client_posts_every_body_with_its_headers(tmp_path: Path, client: str) -> None:
    bodies = tmp_path / "bodies.txt"
    bodies.write_bytes(b"".join(b'at_%03d {"n":%d}\n' % (i, i) for i in range(30)))
    requests = rawhttp.load(bodies)
    runner = {
        "aiohttp": rawhttp.run_aiohttp,
        "httpx": rawhttp.run_httpx,
        "builtin": rawhttp.run_builtin,
    }[client]
    with WebhookReceiver() as receiver:
        errors = asyncio.run(runner(receiver.url, requests, 4))
        got = receiver.received
    assert errors == 0
    assert sorted(r.headers["webhook-id"] for r in got) == [f"at_{i:03d}" for i in range(30)]
    assert all(r.payload == {"n": int(r.headers["webhook-id"][3:])} for r in got)
    assert all(r.headers["webhook-signature"].startswith("v1,") for r in got)
    assert len({r.peer for r in got}) <= 4  # kept alive, at most one connection per worker


def test_a_non_2xx_answer_is_counted_as_an_error(tmp_path: Path) -> None:
    bodies = tmp_path / "bodies.txt"
    bodies.write_bytes(b"at_1 {}\nat_2 {}\n")
    with WebhookReceiver(fail=lambda r: 503 if r.headers["webhook-id"] == "at_2" else None) as rx:
        errors = asyncio.run(rawhttp.run_builtin(rx.url, rawhttp.load(bodies), 1))
    assert errors == 1
