"""Small Kafka helpers for the benchmark: topics, a fast pre-loading producer, watermarks, and
reading the broker's append times back."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from confluent_kafka import (
    TIMESTAMP_LOG_APPEND_TIME,
    Consumer,
    KafkaException,
    Message,
    Producer,
)
from confluent_kafka import TopicPartition as TP
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from consumer import headers as h

#: Every topic the benchmark creates stamps records with the broker's append time, so "when a
#: record reached the topic" is read from the record itself, on the broker's one clock.
LOG_APPEND = {"message.timestamp.type": "LogAppendTime"}

#: key, value, headers
Record = tuple[bytes | None, bytes, h.Headers | None]


class Topics:
    """Creates topics and remembers them, so the run can delete everything it made."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        self.created: list[str] = []

    def create(self, specs: Iterable[tuple[str, int, dict[str, str]]]) -> None:
        """``(name, partitions, config)`` each; the broker's default replication factor."""
        new = [NewTopic(n, p, -1, config={**c, **LOG_APPEND}) for n, p, c in specs]
        if not new:
            return
        for name, future in self.admin.create_topics(new, operation_timeout=60).items():
            future.result(timeout=60)
            self.created.append(name)
        names = {t.topic for t in new}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            topics = self.admin.list_topics(timeout=10).topics
            if all(n in topics and not topics[n].error for n in names):
                return
            time.sleep(0.1)
        raise RuntimeError(f"topics did not appear: {sorted(names)}")

    def delete_all(self) -> None:
        if self.created:
            futures = self.admin.delete_topics(self.created, operation_timeout=60)
            for future in futures.values():
                with contextlib.suppress(KafkaException):
                    future.result(timeout=60)
            self.created = []


def fast_producer(bootstrap: str) -> Producer:
    """For pre-loading inputs: big batches, lz4 (as a platform producer would compress)."""
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
            # Delivery reports only for failures: a million Python callbacks cost seconds.
            "delivery.report.only.error": True,
        }
    )


def preload(producer: Producer, topic: str, records: Iterable[Record]) -> int:
    """Produce every record and wait for every acknowledgement; returns the count."""
    count = 0
    failed: list[str] = []

    def on_delivery(err: object, _msg: object) -> None:
        if err is not None:
            failed.append(str(err))

    for key, value, headers in records:
        while True:
            try:
                producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=on_delivery
                )
                break
            except BufferError:
                producer.poll(0.05)
        count += 1
        if count % 10_000 == 0:
            producer.poll(0)
    if producer.flush(120) != 0 or failed:
        raise RuntimeError(f"pre-loading {topic} failed: {failed[:3]}")
    return count


def _probe(bootstrap: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-probe-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "auto.offset.reset": "earliest",
        }
    )


class Watermarks:
    """Counts what a topic holds (high watermark sums), without consuming it."""

    def __init__(self, bootstrap: str) -> None:
        self.consumer = _probe(bootstrap)

    def partitions(self, topic: str) -> int:
        meta = self.consumer.list_topics(topic, timeout=10).topics[topic]
        return len(meta.partitions)

    def bounds(self, topic: str) -> list[tuple[int, int]]:
        return [
            self.consumer.get_watermark_offsets(TP(topic, p), timeout=10, cached=False)
            for p in range(self.partitions(topic))
        ]

    def count(self, topic: str) -> int:
        """0 while the topic's leaders are not known yet (just after it was created)."""
        try:
            return sum(high - low for low, high in self.bounds(topic))
        except KafkaException:
            return 0

    def close(self) -> None:
        self.consumer.close()


@dataclass(frozen=True, slots=True)
class Span:
    """First and last broker append time (epoch ms) of a topic, and how many records it holds."""

    first_ms: int
    last_ms: int
    count: int

    @property
    def seconds(self) -> float:
        return max(0.001, (self.last_ms - self.first_ms) / 1000)

    def rate(self, records: int | None = None) -> float:
        return (self.count if records is None else records) / self.seconds


def _append_time(msg: Message) -> int:
    kind, ts = msg.timestamp()
    if kind != TIMESTAMP_LOG_APPEND_TIME:
        raise RuntimeError("expected a LogAppendTime topic")
    return int(ts)


def _read_at(consumer: Consumer, topic: str, offsets: dict[int, int]) -> dict[int, int]:
    """The append time of the record at ``offsets[p]`` of each partition."""
    consumer.assign([TP(topic, p, o) for p, o in offsets.items()])
    found: dict[int, int] = {}
    deadline = time.monotonic() + 30
    while len(found) < len(offsets):
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not read {topic} at {offsets}")
        for msg in consumer.consume(100, 0.5):
            p = msg.partition() or 0
            if msg.error() is None and p not in found and msg.offset() == offsets[p]:
                found[p] = _append_time(msg)
    consumer.unassign()
    return found


def span(bootstrap: str, topic: str) -> Span:
    """Append times are non-decreasing within a partition, so the first and last record of each
    partition are enough: no need to read the whole topic back."""
    marks = Watermarks(bootstrap)
    try:
        bounds = marks.bounds(topic)
    finally:
        marks.close()
    filled = {p: (low, high) for p, (low, high) in enumerate(bounds) if high > low}
    if not filled:
        raise RuntimeError(f"{topic} is empty")
    consumer = _probe(bootstrap)
    try:
        firsts = _read_at(consumer, topic, {p: low for p, (low, _) in filled.items()})
        lasts = _read_at(consumer, topic, {p: high - 1 for p, (_, high) in filled.items()})
    finally:
        consumer.close()
    count = sum(high - low for low, high in filled.values())
    return Span(min(firsts.values()), max(lasts.values()), count)


def read_all(bootstrap: str, topic: str, count: int, timeout: float = 120) -> Iterator[Message]:
    """Every record of a topic from the start, until ``count`` were read."""
    consumer = _probe(bootstrap)
    try:
        parts = len(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        consumer.assign([TP(topic, p, 0) for p in range(parts)])
        seen = 0
        deadline = time.monotonic() + timeout
        while seen < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"read only {seen} of {count} records from {topic}")
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is None:
                    seen += 1
                    yield msg
    finally:
        consumer.close()


def lateness_ms(msg: Message) -> int:
    """Broker append time on the sink topic minus the record's due time (its header)."""
    due = h.get_int(msg.headers(), h.DUE_MS)
    if due is None:
        raise RuntimeError("a released record has no due header")
    return _append_time(msg) - due
