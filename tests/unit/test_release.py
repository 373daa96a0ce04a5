"""Release's per-batch bookkeeping: the due header read, and the lateness histogram observed a
batch at a time exactly as an ``observe()`` per record would."""

from __future__ import annotations

import random
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest

from consumer import headers as h
from consumer.metrics import LATENESS_BUCKETS
from consumer.release import Lateness, due_ms


@pytest.mark.parametrize(
    ("headers", "due"),
    [
        ([(h.DUE_MS, b"1795687200000")], 1795687200000),
        # Among others, a header that earlier versions wrote and nothing reads.
        ([("auto-trace-close-ms", b"5"), (h.DUE_MS, b"7"), (h.TRADE_ID, b"T-1")], 7),
        ([(h.DUE_MS, b"7"), (h.DUE_MS, b"9")], 9),  # the last one wins
        ({h.DUE_MS: "11"}, 11),
        ([(h.DUE_MS, b"not a number")], 0),
        ([(h.DUE_MS, b"")], 0),
        ([(h.DUE_MS, None)], 0),
        ([(h.DUE_MS, "\u0661".encode())], 0),  # a digit to int(str), not ASCII
        ([], 0),
        (None, 0),
    ],
)
def test_the_due_header_reads_as_get_int_reads_it(headers: Any, due: int) -> None:
    assert due_ms(headers) == due
    assert due == (h.get_int(headers, h.DUE_MS) or 0)


def _histogram() -> tuple[CollectorRegistry, Any]:
    registry = CollectorRegistry()
    metric = Histogram("late_seconds", "x", ["stage"], buckets=LATENESS_BUCKETS, registry=registry)
    return registry, metric.labels("release")


def test_a_batch_observed_at_once_gives_the_buckets_count_and_sum_of_one_observe_each() -> None:
    rng = random.Random(5)
    now = 1_795_687_200_000
    # Every bucket boundary exactly, either side of it, early records, and the long tail.
    edges = [int(b * 1000) + d for b in LATENESS_BUCKETS for d in (-1, 0, 1)]
    lates = edges + [-5, 0, 3_600_000] + [rng.randrange(0, 120_000) for _ in range(2000)]
    dues = [now - late for late in lates]
    one_by_one, each = _histogram()
    for due in dues:
        each.observe(max(0, now - due) / 1000.0)
    batched, child = _histogram()
    lateness = Lateness(child)
    assert lateness.bulk
    lateness.observe(now, dues[:1000])
    lateness.observe(now, dues[1000:])
    lines = generate_latest(one_by_one).decode().splitlines()
    got = generate_latest(batched).decode().splitlines()
    buckets = [line for line in lines if "_bucket" in line or "_count" in line]
    assert buckets == [line for line in got if "_bucket" in line or "_count" in line]
    assert child._sum.get() == pytest.approx(each._sum.get(), rel=1e-12)
    assert child._sum.get() == sum(max(0, late) for late in lates) / 1000.0


def test_without_the_histogram_internals_it_observes_each_record() -> None:
    class Plain:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, amount: float) -> None:
            self.seen.append(amount)

    plain = Plain()
    lateness = Lateness(plain)  # type: ignore[arg-type]
    assert not lateness.bulk
    lateness.observe(10_000, [9_000, 12_000])
    assert plain.seen == [1.0, 0.0]
