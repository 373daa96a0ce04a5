"""Benchmark inputs: realistic ``trade.closed`` JSON and the records later stages read.

Trades come from :func:`consumer.samples.sample_trade` (every field filled, realistic values)
with the two optional free-form personal fields left out (``comment`` and ``client_ip``: both
optional in the contract), which brings a record from ~590 to ~525 bytes of JSON. The rest of
the record is required by the contract, so it cannot be closer to the issue's ~350 bytes
without changing the data's shape.

``sample_trade`` costs ~0.1 ms, so a pool of distinct samples is built once and each record
takes one from the pool with its own ``event_id``, ``trade_id`` and ``close_time``.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from consumer import headers as h
from consumer.decode import JsonDecoder
from consumer.records import (
    decode_trace,
    encode_trace,
    idempotency_key,
    render_time,
    to_json_bytes,
)
from consumer.samples import sample_trade, to_json

__all__ = [
    "TRIMMED",
    "Record",
    "to_json",
    "trace_record",
    "trade",
    "trade_pool",
    "trade_records",
    "webhook_body",
]
from consumer.trade import epoch_ms, project, record_key

#: Optional fields left out of every benchmark trade.
TRIMMED = ("comment", "client_ip")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_POOL = 2000

#: key, value, headers
Record = tuple[bytes | None, bytes, h.Headers | None]


def trade_pool(close_ms: int, seed: int = 7, size: int = _POOL) -> list[dict[str, Any]]:
    """Distinct trades closed at ``close_ms`` (so any later close_time keeps them valid)."""
    pool = []
    for i in range(size):
        trade = sample_trade(i, seed=seed, close_time_ms=close_ms)
        for name in TRIMMED:
            trade.pop(name, None)
        pool.append(trade)
    return pool


def trade(pool: list[dict[str, Any]], i: int, close_ms: int, rng: random.Random) -> dict[str, Any]:
    """Trade number ``i``: a pool sample with its own ids and close time."""
    out = dict(pool[i % len(pool)])
    out["event_id"] = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    out["trade_id"] = f"B-{i:010d}"
    out["close_time"] = render_time(_EPOCH + timedelta(milliseconds=close_ms))
    return out


def trade_records(
    pool: list[dict[str, Any]], count: int, close_start_ms: int, seed: int = 1
) -> Iterator[Record]:
    """``trade.closed`` records keyed by trade id, close times 1 ms apart from the start."""
    rng = random.Random(seed)
    for i in range(count):
        t = trade(pool, i, close_start_ms + i, rng)
        yield t["trade_id"].encode(), to_json(t), None


def trace_record(raw_json: bytes, window_ms: int = 0, due_ms: int | None = None) -> Record:
    """What ingest writes for one trade (and release copies to each sink topic)."""
    validated = JsonDecoder().decode(raw_json)
    record = project(validated)
    close = epoch_ms(record["close_time"])
    due = close + window_ms if due_ms is None else due_ms
    headers: h.Headers = [(h.DUE_MS, str(due).encode())]
    return record_key(validated), encode_trace(record), headers


def webhook_body(value: bytes, adapter: str) -> tuple[str, bytes]:
    """The webhook-id and body the adapter sends for a sink record (same code path)."""
    record = decode_trace(value)
    return idempotency_key(record["trade_id"], adapter), to_json_bytes(record)
