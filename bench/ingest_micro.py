"""``python -m bench.ingest_micro``: ingest's per-record Python cost, old path vs fast path.

In one process, on the same benchmark-shaped records (:mod:`bench.data`), without Kafka: the
stage's own per-record ``_one`` with the fast path switched off (the pydantic path: decode,
validate, project, fastavro) and on, in interleaved rounds so that the load of a shared machine
hits both alike; the ratio of the medians is the figure to trust, the µs are for orientation.
Both paths' outputs are compared first, so a speed-up that changed a byte would not print.

Also timed: the fast path alone and its msgspec parse, and librdkafka's ``produce()`` of the
same outputs (queued, no broker): the part of a record's cost that is not ingest's Python.

Environment: ``MICRO_RECORDS`` (default 5000), ``MICRO_ROUNDS`` (default 7).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Producer

from bench.data import trade_pool, trade_records
from consumer import fastpath
from consumer.config import load_settings
from consumer.delayed import now_ms
from consumer.fastpath import _DECODER
from consumer.health import Health
from consumer.ingest import IngestStage, trace_headers
from consumer.metrics import Metrics


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
    fast = stage.fast_path
    assert fast is not None, "the default JSON decoder must get the fast path"
    stage_any: Any = stage  # _one is private: the stage loop calls it

    def handle(with_fast: bool) -> _Out:
        stage.fast_path = fast if with_fast else None
        out = _Out()
        now = now_ms()
        append, one = out.produced.append, stage_any._one
        for message in messages:
            append(one(message, now))
        return out

    old_out, new_out = handle(False), handle(True)
    assert len(old_out.produced) == count, "every benchmark record must be valid"
    assert old_out.produced == new_out.produced, "fast path output differs from the pydantic path"
    now = now_ms()
    assert all(fast(raw, now) is not None for raw in raws), "fast path declined a bench record"
    print(f"{count} records of ~{sum(map(len, raws)) // count} B, outputs identical")

    results: dict[str, list[float]] = {
        "old _one": [],
        "new _one": [],
        "fast path alone": [],
        "msgspec parse": [],
        "fast path, cold memos": [],
    }

    def cold(raw: bytes) -> object:
        # The benchmark's 2,000-trade pool repeats its prices: without the decimal memos, the
        # cost of a stream whose every price is new.
        fastpath._DECIMALS.clear()
        return fast(raw, now)

    for _ in range(rounds):
        results["old _one"].append(_time(lambda: handle(False)))
        results["new _one"].append(_time(lambda: handle(True)))
        results["fast path alone"].append(_time(lambda: [fast(r, now) for r in raws]))
        results["msgspec parse"].append(_time(lambda: [_DECODER.decode(r) for r in raws]))
        results["fast path, cold memos"].append(_time(lambda: [cold(r) for r in raws]))

    # librdkafka's produce() itself, on a producer with no reachable broker (records just queue):
    # the part of a record's cost that stays whatever ingest does in Python.
    producer = Producer({"bootstrap.servers": "127.0.0.1:9", "log_level": 0, "linger.ms": 60_000})
    headers = trace_headers(1_795_687_200_000, 0, b"B-0000000001")
    values = [p[1] for p in new_out.produced]

    def produce() -> None:
        for value in values:
            producer.produce("t", value=value, key=b"sig-0001", headers=headers)

    results["librdkafka produce"] = []
    for _ in range(rounds):
        results["librdkafka produce"].append(_time(produce))
        producer.purge()
    producer.flush(0)

    medians = {name: statistics.median(times) / count for name, times in results.items()}
    for name, per in medians.items():
        print(f"{name:22} {per:7.2f} µs/record  (min {min(results[name]) / count:.2f})")
    ratio = medians["old _one"] / medians["new _one"]
    paired = statistics.median(
        o / n for o, n in zip(results["old _one"], results["new _one"], strict=True)
    )
    print(
        f"old ÷ new: {ratio:.1f}x (median of paired rounds {paired:.1f}x); load {os.getloadavg()}"
    )


if __name__ == "__main__":
    main()
