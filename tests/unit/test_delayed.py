"""The delayed-topic consumer's bookkeeping, with a fake librdkafka consumer at the edge.

The real broker behaviour (pause, seek, resume, rebalances) is proven in the integration tests;
these pin down the rules: what is handed out, when a partition is held and for how long the
loop may block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from consumer.delayed import SEEK_RETRY_MS, DelayedConsumer


@dataclass
class FakeMessage:
    _topic: str
    _partition: int
    _offset: int
    due: int

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def error(self) -> None:
        return None

    def headers(self) -> list[tuple[str, bytes]]:
        return [("due", b"%d" % self.due)]


@dataclass
class FakeConsumer:
    """Serves a fixed log per partition from a position, honouring pause and seek."""

    log: dict[tuple[str, int], list[FakeMessage]]
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    paused: set[tuple[str, int]] = field(default_factory=set)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    callbacks: dict[str, Any] = field(default_factory=dict)

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.callbacks = callbacks

    def assign_all(self) -> None:
        parts = [TopicPartition(t, p) for t, p in self.log]
        self.callbacks["on_assign"](self, parts)

    def revoke(self, tps: list[tuple[str, int]]) -> None:
        self.callbacks["on_revoke"](self, [TopicPartition(t, p) for t, p in tps])

    def _available(self, limit: int) -> list[FakeMessage]:
        """Like librdkafka's queue: what is not returned stays queued; a paused partition's
        queued records are dropped (it is fetched again from its position when resumed)."""
        out: list[FakeMessage] = []
        for tp, msgs in self.log.items():
            if tp in self.paused:
                continue
            pos = self.offsets.get(tp, 0)
            taken = msgs[pos : pos + limit - len(out)]
            out += taken
            self.offsets[tp] = pos + len(taken)
        return out

    def consume(self, num: int, timeout: float) -> list[FakeMessage]:
        self.calls.append(("consume", timeout))
        return self._available(num)

    def poll(self, timeout: float) -> FakeMessage | None:
        self.calls.append(("poll", timeout))
        got = self._available(1)
        return got[0] if got else None

    def pause(self, parts: list[TopicPartition]) -> None:
        self.paused.update((p.topic, p.partition) for p in parts)

    def resume(self, parts: list[TopicPartition]) -> None:
        self.paused.difference_update((p.topic, p.partition) for p in parts)
        self.calls.append(("resume", [(p.topic, p.partition) for p in parts]))

    def position(self, parts: list[TopicPartition]) -> list[TopicPartition]:
        """librdkafka's position: after the last record taken; -1001 (invalid) before any."""
        return [
            TopicPartition(p.topic, p.partition, self.offsets.get((p.topic, p.partition), -1001))
            for p in parts
        ]

    def seek(self, tp: TopicPartition) -> None:
        self.offsets[(tp.topic, tp.partition)] = tp.offset
        self.calls.append(("seek", ((tp.topic, tp.partition), tp.offset)))

    def get_watermark_offsets(
        self, tp: TopicPartition, timeout: float, cached: bool
    ) -> tuple[int, int]:
        self.calls.append(("wake", (tp.topic, tp.partition)))
        return 0, 0


@dataclass
class FakeErrorMessage:
    """What librdkafka hands out for a consumer error: no partition of its own."""

    err: KafkaError

    def topic(self) -> None:
        return None

    def partition(self) -> None:
        return None

    def offset(self) -> None:
        return None

    def error(self) -> KafkaError:
        return self.err


def _setup(
    dues: dict[int, list[int]], now: list[int], *, delayed_topic: bool = True
) -> tuple[DelayedConsumer, FakeConsumer]:
    log = {
        ("t", p): [FakeMessage("t", p, i, d) for i, d in enumerate(ds)] for p, ds in dues.items()
    }
    fake = FakeConsumer(log)
    due_of = (lambda m: m.due) if delayed_topic else None
    delayed = DelayedConsumer(fake, due_of=due_of, clock=lambda: now[0], max_poll_s=1.0)  # type: ignore[arg-type]
    delayed.subscribe(["t"])
    fake.assign_all()
    return delayed, fake


def test_records_are_handed_out_only_when_due_and_the_partition_is_held_at_its_head() -> None:
    now = [1000]
    delayed, fake = _setup({0: [900, 1500, 1600], 1: [950]}, now)
    out = delayed.poll_due(10)
    assert [(m.partition(), m.offset()) for m in out] == [(0, 0), (1, 0)]
    assert delayed.held() == {("t", 0): 1500}
    assert ("t", 0) in fake.paused  # paused; rewound to its head when resumed (below)
    assert delayed.poll_due(10) == []  # nothing due: nothing handed out, nothing buffered
    now[0] = 1500
    assert [m.offset() for m in delayed.poll_due(10)] == [1]
    # Resumed, then woken by a seek to the offset it was held at (no broker round trip).
    resumed = fake.calls.index(("resume", [("t", 0)]))
    assert ("seek", (("t", 0), 1)) in fake.calls[resumed:]
    assert not any(c[0] == "wake" for c in fake.calls)
    assert delayed.held() == {("t", 0): 1600}


def test_the_poll_timeout_never_exceeds_the_time_to_the_next_due_partition() -> None:
    now = [1000]
    delayed, _ = _setup({0: [1250], 1: [1800]}, now)
    delayed.poll_due(10)
    assert delayed.poll_timeout(1000) == 0.25
    assert delayed.poll_timeout(1300) == 0.0
    assert delayed.poll_timeout(1000 - 5000) == 1.0  # capped by max_poll_s


def test_a_revoked_partition_forgets_its_hold() -> None:
    now = [1000]
    delayed, fake = _setup({0: [5000], 1: [6000]}, now)
    delayed.poll_due(10)
    assert set(delayed.held()) == {("t", 0), ("t", 1)}
    fake.revoke([("t", 0)])
    assert set(delayed.held()) == {("t", 1)}
    assert delayed.assigned == {("t", 1)}


def test_memory_does_not_grow_with_the_backlog() -> None:
    """A held partition keeps one entry whatever waits behind its head."""
    now = [0]
    delayed, _ = _setup({0: list(range(10_000, 20_000)), 1: list(range(10_000, 20_000))}, now)
    assert delayed.poll_due(50_000) == []
    assert len(delayed.held()) == 2


def test_records_behind_a_held_head_in_the_same_batch_are_not_handed_out() -> None:
    now = [1000]
    delayed, _ = _setup({0: [900, 2000, 950]}, now)  # the third is due but behind the second
    assert [m.offset() for m in delayed.poll_due(10)] == [0]


def test_throttling_pauses_everything_and_keeps_holds() -> None:
    now = [1000]
    delayed, fake = _setup({0: [5000], 1: [900]}, now)
    delayed.poll_due(10)
    delayed.throttle(True)
    assert fake.paused == {("t", 0), ("t", 1)}
    delayed.throttle(False)
    assert fake.paused == {("t", 0)}  # still held: not due


def test_a_held_partition_is_resumed_only_with_a_seek_back_to_its_head_even_after_throttling() -> (
    None
):
    """Pausing leaves librdkafka's position after the last record taken, beyond the head: a
    resume without the seek back would skip the head and everything up to that position."""
    now = [1000]
    delayed, fake = _setup({0: [900, 1500, 1600, 1700]}, now)
    assert [m.offset() for m in delayed.poll_due(10)] == [0]
    assert fake.offsets[("t", 0)] == 4  # the whole chunk was taken from the queue
    delayed.throttle(True)
    now[0] = 2000
    assert delayed.poll_due(10) == []  # due, but back-pressure: still held, still paused
    assert delayed.held() == {("t", 0): 1500} and ("t", 0) in fake.paused
    assert delayed.poll_timeout(now[0]) == 1.0  # an overdue hold does not make the loop spin
    delayed.throttle(False)
    assert ("t", 0) in fake.paused  # lifting back-pressure leaves held partitions to the poll
    assert [m.offset() for m in delayed.poll_due(10)] == [1, 2, 3]


def test_a_rewound_partition_is_fetched_again_from_the_offset_held_or_not() -> None:
    now = [1000]
    delayed, _ = _setup({0: [900, 950, 5000], 1: [900, 950, 980]}, now)
    assert [(m.partition(), m.offset()) for m in delayed.poll_due(10)] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (1, 2),
    ]
    assert delayed.held() == {("t", 0): 5000}
    delayed.rewind("t", 0, 1)  # held at 2: the hold is forgotten
    delayed.rewind("t", 1, 0)  # active
    again = delayed.poll_due(10)
    assert [(m.partition(), m.offset()) for m in again] == [(0, 1), (1, 0), (1, 1), (1, 2)]
    assert delayed.held() == {("t", 0): 5000}


def test_a_failed_seek_back_holds_the_partition_again_instead_of_resuming_it_unseeked() -> None:
    now = [1000]
    delayed, fake = _setup({0: [900, 1500, 5000]}, now)
    delayed.poll_due(10)
    seek = fake.seek
    failing = [True]

    def flaky_seek(tp: TopicPartition) -> None:
        if failing[0]:
            raise KafkaException(KafkaError(KafkaError._STATE))
        seek(tp)

    fake.seek = flaky_seek  # type: ignore[method-assign]
    now[0] = 1500
    assert delayed.poll_due(10) == []
    assert ("t", 0) in delayed.held()  # held again (it was resumed, then paused back)
    assert ("t", 0) in fake.paused
    failing[0] = False
    now[0] = 1500 + SEEK_RETRY_MS
    assert [m.offset() for m in delayed.poll_due(10)] == [1]


def test_a_topic_read_at_once_hands_out_every_record_in_runs_of_one_partition() -> None:
    now = [1000]
    # Due times far ahead: a consumer without due_of never looks at them.
    delayed, fake = _setup({0: [9000, 9000, 9000], 1: [9000, 9000]}, now, delayed_topic=False)
    runs = delayed.poll_runs(10)
    assert [(r.tp, [m.offset() for m in r.messages], r.dues) for r in runs] == [
        (("t", 0), [0, 1, 2], None),
        (("t", 1), [0, 1], None),
    ]
    assert delayed.held() == {} and fake.paused == set()
    assert delayed.snapshot()[("t", 0)].taken == 3
    assert delayed.snapshot()[("t", 1)].taken == 2


def test_a_delayed_topic_gives_runs_with_each_records_due_time() -> None:
    now = [1000]
    delayed, _ = _setup({0: [900, 950, 1500], 1: [800]}, now)
    runs = delayed.poll_runs(10)
    assert [(r.tp, [m.offset() for m in r.messages], r.dues) for r in runs] == [
        (("t", 0), [0, 1], [900, 950]),
        (("t", 1), [0], [800]),
    ]


def test_a_consumer_error_splits_a_run_and_a_fatal_one_is_raised() -> None:
    now = [1000]
    delayed, fake = _setup({0: [0, 0, 0, 0]}, now, delayed_topic=False)
    log = fake.log[("t", 0)]
    transient = FakeErrorMessage(KafkaError(KafkaError._TRANSPORT))
    fake.log[("t", 0)] = [log[0], log[1], transient, log[2], log[3]]  # type: ignore[list-item]
    runs = delayed.poll_runs(10)
    assert [[m.offset() for m in r.messages] for r in runs] == [[0, 1], [2, 3]]
    fatal = FakeErrorMessage(KafkaError(KafkaError._FATAL, fatal=True))
    fake.log[("t", 1)] = [fatal]  # type: ignore[list-item]
    with pytest.raises(KafkaException):
        delayed.poll_runs(10)


def test_a_topic_read_at_once_can_still_hold_and_rewind_a_partition() -> None:
    now = [1000]
    delayed, fake = _setup({0: [0, 0, 0], 1: [0, 0]}, now, delayed_topic=False)
    assert len(delayed.poll_runs(10)) == 2
    delayed.hold("t", 0, 1, 3000)  # e.g. ingest backing off while the registry is down
    delayed.rewind("t", 1, 0)
    assert [(r.tp, [m.offset() for m in r.messages]) for r in delayed.poll_runs(10)] == [
        (("t", 1), [0, 1]),
    ]
    assert ("t", 0) in fake.paused
    now[0] = 3000
    assert [(r.tp, [m.offset() for m in r.messages]) for r in delayed.poll_runs(10)] == [
        (("t", 0), [1, 2]),
    ]


def test_due_times_read_from_headers_come_with_the_headers_they_were_read_from() -> None:
    now = [1000]
    log = {("t", 0): [FakeMessage("t", 0, i, d) for i, d in enumerate([900, 950, 1500])]}
    fake = FakeConsumer(log)
    delayed = DelayedConsumer(
        fake,  # type: ignore[arg-type]
        due_of=None,
        due_of_headers=lambda headers: int(dict(headers or [])["due"]),
        clock=lambda: now[0],
    )
    delayed.subscribe(["t"])
    fake.assign_all()
    (run,) = delayed.poll_runs(10)
    assert [m.offset() for m in run.messages] == [0, 1]
    assert run.dues == [900, 950]
    assert run.headers == [[("due", b"900")], [("due", b"950")]]
    assert delayed.held() == {("t", 0): 1500}


def test_lifting_back_pressure_wakes_each_partition_with_a_seek_to_its_position() -> None:
    """No blocking ListOffsets round trip when positions are known: each partition is seeked
    where it would resume anyway (records are neither skipped nor repeated)."""
    now = [1000]
    delayed, fake = _setup({0: [0, 0, 0], 1: [0, 0], 2: []}, now, delayed_topic=False)
    assert sum(len(r.messages) for r in delayed.poll_runs(3)) == 3
    delayed.throttle(True)
    fake.calls.clear()
    delayed.throttle(False)
    assert fake.paused == set()
    seeks = sorted(c[1] for c in fake.calls if c[0] == "seek")
    assert seeks == [(("t", 0), 3)]  # partition 1: nothing taken yet; 2: nothing at all
    # One ListOffsets wake-up for the partitions without a position (either of them).
    (wake,) = [c for c in fake.calls if c[0] == "wake"]
    assert wake[1] in {("t", 1), ("t", 2)}
    runs = delayed.poll_runs(10)
    assert [(r.tp, [m.offset() for m in r.messages]) for r in runs] == [(("t", 1), [0, 1])]
