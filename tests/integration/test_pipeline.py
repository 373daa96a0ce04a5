"""Release's overlapped acknowledgements (:class:`consumer.stage.Pipeline`) against the real
broker: offsets are stored in order as outputs are acknowledged, never past a record whose
output is not acknowledged yet; a failed output rewinds its partition, even a held one.

Outputs are held back or made to fail with real broker behaviour, not mocks: a topic that does
not exist yet (the producer waits for it), and a topic whose ``max.message.bytes`` rejects the
record.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from consumer.clients import make_consumer, make_producer
from consumer.delayed import DelayedConsumer
from consumer.metrics import Metrics
from consumer.stage import PIPELINE_PRODUCER_SETTINGS, Output, Pipeline
from tests.support import make_settings, produce

pytestmark = pytest.mark.integration

DEADLINE_S = 30.0


def _until(condition: Callable[[], bool], what: str, step: Callable[[], None]) -> None:
    """Run ``step`` until ``condition`` holds, failing after :data:`DEADLINE_S`."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        step()


class Setup:
    """One input partition read through a DelayedConsumer, and a Pipeline writing outputs."""

    def __init__(
        self,
        bootstrap: str,
        source: str,
        due: dict[int, int] | None = None,
        *,
        at_once: bool = False,
    ) -> None:
        self.settings = make_settings(bootstrap)
        self.source = source
        self.group = f"pipeline-{uuid.uuid4().hex[:10]}"
        due = due or {}
        self.consumer = DelayedConsumer(
            make_consumer(self.settings, self.group, delayed=not at_once),
            # at_once: a topic read without due times, as ingest reads its input.
            due_of=None if at_once else lambda m: due.get(m.offset() or 0, 0),
            max_poll_s=0.2,
            on_revoke=self._revoked,
        )
        # A producer that waits for a missing topic instead of creating it.
        producer = make_producer(
            self.settings, **PIPELINE_PRODUCER_SETTINGS, **{"allow.auto.create.topics": False}
        )
        self.metrics = Metrics()
        self.pipe = Pipeline(producer, self.metrics, "test", self.consumer)
        self.consumer.subscribe([source])

    def _revoked(self, partitions: list[TopicPartition]) -> None:
        self.pipe.revoked(partitions)

    def poll(self, count: int) -> list[Message]:
        got: list[Message] = []
        _until(
            lambda: len(got) >= count,
            f"{count} records",
            lambda: got.extend(self.consumer.poll_due(100, timeout=0.2)),
        )
        return got

    def committed(self) -> int:
        """Commit what is stored, then read the group's committed offset back."""
        try:
            self.consumer.consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                raise
        tp = self.consumer.consumer.committed([TopicPartition(self.source, 0)], timeout=10)[0]
        return int(tp.offset)

    def send_run(self, records: list[Message], outputs: Callable[[Message], list[Output]]) -> None:
        """Produce ``records`` as one run, the way ingest and release do."""
        run = self.pipe.open((self.source, 0))
        counts: dict[str, int] = {}
        for msg in records:
            for topic, value, key, headers in outputs(msg):
                self.pipe.produce(topic, value, key, headers, run)
                counts[topic] = counts.get(topic, 0) + 1
        first, last = records[0].offset(), records[-1].offset()
        assert first is not None and last is not None
        self.pipe.close(run, first, last, len(records), counts)

    def settle_until(self, condition: Callable[[], bool], what: str) -> None:
        def step() -> None:
            self.pipe.producer.poll(0.05)
            self.pipe.settle()

        _until(condition, what, step)


def _records(bootstrap: str, topic: str, count: int) -> None:
    produce(bootstrap, topic, [(None, b"%d" % i) for i in range(count)])


def _create_late_topic_and_see_all_stored(
    s: Setup, bootstrap_servers: str, missing: str, out: str
) -> None:
    """Create the topic one output was waiting for: its acknowledgement then stores all 10."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    admin.create_topics([NewTopic(missing, 1, -1)])[missing].result(timeout=30)
    try:
        s.settle_until(lambda: s.pipe.pending == 0, "the late acknowledgement")
        assert s.committed() == 10
        assert s.metrics.records_out.labels("test", out)._value.get() == 9
        assert s.metrics.records_out.labels("test", missing)._value.get() == 1
    finally:
        admin.delete_topics([missing])


def test_offsets_are_stored_in_order_and_never_past_an_unacknowledged_record(
    bootstrap_servers: str, make_topic: Callable[..., str]
) -> None:
    source, out = make_topic(1), make_topic(1)
    missing = f"test.late.{uuid.uuid4().hex[:12]}"  # created only later in the test
    _records(bootstrap_servers, source, 10)
    s = Setup(bootstrap_servers, source)
    try:
        records = s.poll(10)
        assert [m.offset() for m in records] == list(range(10))
        for msg in records:
            topic = missing if msg.offset() == 3 else out
            s.pipe.send(msg, [(topic, msg.value(), None, None)])
        # Every output but record 3's is acknowledged: 0-2 are stored, nothing after 3.
        s.settle_until(lambda: len(s.pipe.producer) == 1, "all but one acknowledgement")
        s.pipe.settle()
        assert s.pipe.pending == 7
        assert s.committed() == 3

        _create_late_topic_and_see_all_stored(s, bootstrap_servers, missing, out)
    finally:
        s.consumer.close()


def test_a_failed_output_rewinds_its_partition_even_a_held_one_and_nothing_after_it_is_stored(
    bootstrap_servers: str, make_topic: Callable[..., str]
) -> None:
    source, out = make_topic(1), make_topic(1)
    small = make_topic(1, config={"max.message.bytes": "1024"})
    _records(bootstrap_servers, source, 10)
    # Record 8 is not due for an hour: the partition is held there once 0-7 are handed out.
    s = Setup(bootstrap_servers, source, due={8: int(time.time() * 1000) + 3_600_000})
    try:
        records = s.poll(8)
        assert [m.offset() for m in records] == list(range(8))
        assert s.consumer.held() != {}
        for msg in records:
            if msg.offset() == 4:
                # Random bytes do not compress: the broker rejects the record for ``small``.
                s.pipe.send(
                    msg, [(out, msg.value(), None, None), (small, os.urandom(4096), None, None)]
                )
            else:
                s.pipe.send(msg, [(out, msg.value(), None, None)])
        s.settle_until(lambda: s.pipe.pending == 0, "every acknowledgement or failure")
        assert s.metrics.produce_errors.labels("test")._value.get() == 1
        assert s.committed() == 4  # 0-3 stored; 4 failed, so 5-7 are not either
        # The hold at 8 was dropped: 4-7 come again, then the partition is held at 8 again.
        again = s.poll(4)
        assert [m.offset() for m in again] == [4, 5, 6, 7]
        assert list(s.consumer.held()) == [(source, 0)]
    finally:
        s.consumer.close()


def test_a_revoked_partition_keeps_what_was_acknowledged_before_it_went(
    bootstrap_servers: str, make_topic: Callable[..., str]
) -> None:
    source, out = make_topic(1), make_topic(1)
    _records(bootstrap_servers, source, 10)
    s = Setup(bootstrap_servers, source)
    records = s.poll(10)
    for msg in records:
        s.pipe.send(msg, [(out, msg.value(), None, None)])
    # No settle: closing revokes the partition, which waits for the acknowledgements, stores
    # the offsets, and the close commits them.
    s.consumer.close()
    assert s.pipe.pending == 0
    reader = make_consumer(s.settings, s.group)
    try:
        tp = reader.committed([TopicPartition(source, 0)], timeout=10)[0]
        assert tp.offset == 10
    finally:
        reader.close()


def test_a_run_is_stored_only_once_every_output_of_it_is_acknowledged(
    bootstrap_servers: str, make_topic: Callable[..., str]
) -> None:
    source, out = make_topic(1), make_topic(1)
    missing = f"test.late.{uuid.uuid4().hex[:12]}"  # created only later in the test
    _records(bootstrap_servers, source, 10)
    s = Setup(bootstrap_servers, source)
    try:
        records = s.poll(10)
        s.send_run(records[:4], lambda m: [(out, m.value(), None, None)])
        s.send_run(
            records[4:],
            lambda m: [(missing if m.offset() == 6 else out, m.value(), None, None)],
        )
        # The first run is stored; the second waits for record 6's output, as do 4 and 5.
        s.settle_until(lambda: s.pipe.pending == 6, "the first run")
        s.settle_until(lambda: len(s.pipe.producer) == 1, "all but one acknowledgement")
        s.pipe.settle()
        assert s.pipe.pending == 6
        assert s.committed() == 4

        _create_late_topic_and_see_all_stored(s, bootstrap_servers, missing, out)
    finally:
        s.consumer.close()


def test_a_failed_output_rewinds_its_partition_to_the_first_record_of_its_run(
    bootstrap_servers: str, make_topic: Callable[..., str]
) -> None:
    source, out = make_topic(1), make_topic(1)
    small = make_topic(1, config={"max.message.bytes": "1024"})
    _records(bootstrap_servers, source, 8)
    s = Setup(bootstrap_servers, source)
    try:
        records = s.poll(8)

        def outputs(msg: Message) -> list[Output]:
            if msg.offset() == 5:
                # Random bytes do not compress: the broker rejects the record for ``small``.
                return [(out, msg.value(), None, None), (small, os.urandom(4096), None, None)]
            return [(out, msg.value(), None, None)]

        s.send_run(records[:4], outputs)
        s.send_run(records[4:], outputs)
        s.settle_until(lambda: s.pipe.pending == 0, "every acknowledgement or failure")
        assert s.metrics.produce_errors.labels("test")._value.get() == 1
        assert s.committed() == 4  # the first run stored; none of the failed one
        # 4 (acknowledged, but in the failed run) comes again with the rest of it.
        assert [m.offset() for m in s.poll(4)] == [4, 5, 6, 7]
        assert s.metrics.records_out.labels("test", out)._value.get() == 4
    finally:
        s.consumer.close()


def test_back_pressure_pauses_the_input_and_lifting_it_resumes_every_partition_where_it_stopped(
    bootstrap_servers: str, make_topic: Callable[..., str]
) -> None:
    source = make_topic(2)
    missing = f"test.late.{uuid.uuid4().hex[:12]}"  # created only later in the test
    produce(bootstrap_servers, source, [(b"%d" % (i % 2), b"%d" % i) for i in range(40)])
    s = Setup(bootstrap_servers, source, at_once=True)
    s.pipe.max_pending = 4
    seen: list[tuple[int, int]] = []
    try:
        # Outputs to a topic that does not exist yet: nothing is acknowledged, so after four
        # records in flight the input is paused.
        def step() -> None:
            s.pipe.settle()
            for run in s.consumer.poll_runs(2, timeout=0.1):
                for msg in run.messages:
                    seen.append((msg.partition() or 0, msg.offset() or 0))
                    s.pipe.send(msg, [(missing, msg.value(), None, None)])

        _until(lambda: s.consumer.throttled, "back-pressure", step)
        paused_at = len(seen)
        assert s.pipe.pending >= 4
        for _ in range(5):
            step()
        assert len(seen) == paused_at  # paused: nothing more is handed out

        admin = AdminClient({"bootstrap.servers": bootstrap_servers})
        admin.create_topics([NewTopic(missing, 1, -1)])[missing].result(timeout=30)
        try:
            _until(lambda: len(seen) >= 40 and s.pipe.pending == 0, "every record", step)
        finally:
            admin.delete_topics([missing])
        # Each partition resumed where it stopped: every record once, in order.
        for partition in (0, 1):
            offsets = [o for p, o in seen if p == partition]
            assert offsets == list(range(len(offsets)))
        assert len(seen) == 40
    finally:
        s.consumer.close()
