"""What the delayed consumer shows the lag monitor, with the fake librdkafka consumer of the
unit tests: where held partitions wait, how far records were handed out, and a resumed
partition counted as held only until its head is handed out (or a short grace passes)."""

from __future__ import annotations

from consumer.delayed import RESUME_GRACE_MS, PartitionView
from tests.unit.test_delayed import _setup


def test_a_snapshot_shows_where_held_partitions_wait_and_how_far_records_were_taken() -> None:
    now = [1000]
    delayed, fake = _setup({0: [900, 1500, 1600], 1: [950]}, now)
    assert delayed.snapshot() == {
        ("t", 0): PartitionView(None, None),
        ("t", 1): PartitionView(None, None),
    }
    delayed.poll_due(10)
    assert delayed.snapshot() == {
        ("t", 0): PartitionView(1, 1),  # held at offset 1 (due 1500); offset 0 handed out
        ("t", 1): PartitionView(None, 1),
    }
    fake.revoke([("t", 1)])
    assert set(delayed.snapshot()) == {("t", 0)}


def test_a_resumed_partition_counts_as_held_until_its_head_is_handed_out() -> None:
    now = [1000]
    delayed, fake = _setup({0: [900, 1500, 1600]}, now)
    delayed.poll_due(10)
    # Due now, but the fetcher has not brought the records back yet.
    fake.consume = lambda num, timeout: []  # type: ignore[method-assign]
    fake.poll = lambda timeout: None  # type: ignore[method-assign]
    now[0] = 1500
    assert delayed.poll_due(10) == []
    assert delayed.held() == {}
    assert delayed.snapshot() == {("t", 0): PartitionView(1, 1, resuming=True)}
    # A fetcher that never wakes up must not hide overdue records for long.
    now[0] = 1500 + RESUME_GRACE_MS
    assert delayed.snapshot() == {("t", 0): PartitionView(None, 1)}


def test_handing_out_the_head_ends_the_resume() -> None:
    now = [1000]
    delayed, _ = _setup({0: [900, 1500, 1600]}, now)
    delayed.poll_due(10)
    now[0] = 1500
    assert [m.offset() for m in delayed.poll_due(10)] == [1]
    assert delayed.snapshot() == {("t", 0): PartitionView(2, 2)}  # held again at 1600
