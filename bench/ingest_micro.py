"""``python -m bench.ingest_micro``: ingest's per-record CPU on each of its three paths.

In one process, on the same benchmark-shaped records (:mod:`bench.data`), without Kafka: the
stage's own per-record ``_one`` with no fast path (the pydantic path: decode, validate, project,
fastavro), with the Python fast path (:mod:`consumer.fastpath`) and with the native one
(``auto_trace_native``, when installed), in interleaved rounds so that the load of a shared
machine hits them alike; the ratios of the medians are the figures to trust, the µs are for
orientation. Every path's outputs are compared first, so a speed-up that changed a byte would
not print.

Also timed: each fast path alone, msgspec's parse (the Python fast path's first step), and
librdkafka's ``produce()`` of the same outputs (queued, no broker): the part of a record's cost
that is not ingest's Python.

Environment: ``MICRO_RECORDS`` (default 5000), ``MICRO_ROUNDS`` (default 7).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from confluent_kafka import Producer

from bench.data import trade_pool, trade_records
from consumer import fastpath
from consumer.clients import positional_produce
from consumer.config import load_settings
from consumer.delayed import now_ms
from consumer.fastpath import _DECODER
from consumer.health import Health
from consumer.ingest import IngestStage, trace_headers
from consumer.metrics import Metrics
from consumer.native import FastPath, load_native
from consumer.stage import InFlight


class _Msg:
    """The part of confluent_kafka.Message that ingest reads."""

    __slots__ = ("_key", "_offset", "_value")

    def __init__(self, key: bytes | None, value: bytes, offset: int) -> None:
        self._key, self._value, self._offset = key, value, offset

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def topic(self) -> str:
        return "trade.closed"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def headers(self) -> None:
        return None


class _Out:
    """Collects each record's output, as the stage would send it."""

    def __init__(self) -> None:
        self.produced: list[Any] = []


def _time(run: Callable[[], object]) -> float:
    """CPU µs of this process: time on another engineer's job between two reads is not ours."""
    gc.collect()
    start = time.process_time_ns()
    run()
    return (time.process_time_ns() - start) / 1000


def main() -> None:
    count = int(os.environ.get("MICRO_RECORDS", "5000"))
    rounds = int(os.environ.get("MICRO_ROUNDS", "7"))
    close_start = now_ms() - count - 60_000
    pool = trade_pool(close_start, size=min(count, 2000))
    messages: list[Any] = [
        _Msg(k, v, i) for i, (k, v, _) in enumerate(trade_records(pool, count, close_start))
    ]
    raws = [m.value() for m in messages]
    stage = IngestStage(
        load_settings(None, delay={"window": "0s"}, metrics={"port": 0}), Metrics(), Health()
    )
    skew_ms = int(stage.skew_ms)
    python_fast = fastpath.JsonFastPath(max_bytes=stage.decoder.max_bytes, skew_ms=skew_ms)
    paths: dict[str, FastPath | None] = {"pydantic": None, "python": python_fast}
    native = load_native(max_bytes=stage.decoder.max_bytes, skew_ms=skew_ms)
    if native is not None:
        paths["native"] = native
    stage_any: Any = stage  # _one is private: the stage loop calls it

    def handle(path: FastPath | None) -> _Out:
        stage.fast_path = path
        out = _Out()
        now = now_ms()
        append, one = out.produced.append, stage_any._one
        for message in messages:
            append(one(message, now))
        return out

    outputs = {name: handle(path).produced for name, path in paths.items()}
    assert len(outputs["pydantic"]) == count, "every benchmark record must be valid"
    for name, produced in outputs.items():
        assert produced == outputs["pydantic"], f"{name} fast path output differs from pydantic"
    now = now_ms()
    for name, path in paths.items():
        if path is not None:
            assert all(path(raw, now) is not None for raw in raws), f"{name} declined a record"
    print(
        f"{count} records of ~{sum(map(len, raws)) // count} B, outputs of "
        f"{', '.join(paths)} identical"
        + ("" if native is not None else " (native fast path not installed: not timed)")
    )

    results: dict[str, list[float]] = {f"_one, {name}": [] for name in paths}
    for name, path in paths.items():
        if path is not None:
            results[f"{name} fast path alone"] = []
    results["msgspec parse"] = []
    results["python fast path, cold memos"] = []

    def each(path: FastPath) -> list[object]:
        return [path(raw, now) for raw in raws]

    def cold(raw: bytes) -> object:
        # The benchmark's 2,000-trade pool repeats its prices: without the decimal memos, the
        # cost of a stream whose every price is new.
        fastpath._DECIMALS.clear()
        return python_fast(raw, now)

    for _ in range(rounds):
        for name, path in paths.items():
            results[f"_one, {name}"].append(_time(partial(handle, path)))
            if path is not None:
                results[f"{name} fast path alone"].append(_time(partial(each, path)))
        results["msgspec parse"].append(_time(lambda: [_DECODER.decode(r) for r in raws]))
        results["python fast path, cold memos"].append(_time(lambda: [cold(r) for r in raws]))

    # librdkafka's produce() itself, on a producer with no reachable broker (records just queue):
    # the part of a record's cost that stays whatever ingest does in Python. Called as the stages
    # call it: with the delay topic's headers and a callback, positionally when this process's
    # check allows it (consumer.clients.positional_produce), else with keywords.
    producer = Producer({"bootstrap.servers": "127.0.0.1:9", "log_level": 0, "linger.ms": 60_000})
    headers = trace_headers(1_795_687_200_000, 0)
    values = [p[1] for p in outputs["pydantic"]]
    positional = positional_produce()

    def produce() -> None:
        send, run = producer.produce, InFlight(("t", 0), [])
        for value in values:
            if positional:
                send("t", value, b"sig-0001", -1, run, None, 0, headers)
            else:
                send("t", value, b"sig-0001", headers=headers, on_delivery=run)

    label = f"librdkafka produce ({'positional' if positional else 'keywords'})"
    results[label] = []
    for _ in range(rounds):
        results[label].append(_time(produce))
        producer.purge()
    producer.flush(0)

    medians = {name: statistics.median(times) / count for name, times in results.items()}
    for name, per in medians.items():
        print(f"{name:33} {per:7.2f} µs/record  (min {min(results[name]) / count:.2f})")
    base = results["_one, pydantic"]
    for name in paths:
        if name == "pydantic":
            continue
        mine = results[f"_one, {name}"]
        paired = statistics.median(o / n for o, n in zip(base, mine, strict=True))
        print(
            f"pydantic ÷ {name}: {medians['_one, pydantic'] / medians[f'_one, {name}']:.1f}x "
            f"(median of paired rounds {paired:.1f}x)"
        )
    if "native" in paths:
        paired = statistics.median(
            p / n for p, n in zip(results["_one, python"], results["_one, native"], strict=True)
        )
        print(f"python ÷ native: {paired:.1f}x (median of paired rounds)")
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
