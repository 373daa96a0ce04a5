"""What ingest and release share: consume a batch, produce its outputs, store offsets only when
the broker acknowledged every output of the batch.

Waiting for acknowledgements per *batch* (not per record) keeps throughput close to a plain
copy while an offset is still never stored before its outputs are durable. If any output of a
batch fails, the batch's partitions are rewound to the batch's first offsets and processed
again: duplicates are possible (at-least-once), loss is not.
"""

from __future__ import annotations

import threading
from typing import Any

from confluent_kafka import KafkaError, Message, Producer, TopicPartition

from consumer import headers as h
from consumer.clients import make_consumer, make_producer
from consumer.config import Settings
from consumer.delayed import DelayedConsumer
from consumer.health import Health
from consumer.log import get_logger, set_stage
from consumer.metrics import Metrics

log = get_logger("stage")


class BatchProducer:
    """Counts acknowledgements of one batch's produces."""

    def __init__(self, producer: Producer, metrics: Metrics, stage: str) -> None:
        self.producer = producer
        self._metrics = metrics
        self._stage = stage
        self._pending = 0
        self._failed: list[KafkaError] = []
        self._acked: dict[str, int] = {}

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        self._pending -= 1
        if err is not None:
            self._failed.append(err)
        else:
            topic = msg.topic() or ""
            self._acked[topic] = self._acked.get(topic, 0) + 1

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | str | None = None,
        headers: h.RawHeaders = None,
    ) -> None:
        while True:
            try:
                self.producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=self._on_delivery
                )
                break
            except BufferError:
                # Local queue full: serve delivery reports to make room, then try again.
                self.producer.poll(0.1)
        self._pending += 1

    def finish(self, timeout: float = 60.0) -> bool:
        """Wait for every acknowledgement of this batch; True when all succeeded."""
        remaining = self.producer.flush(timeout)
        ok = remaining == 0 and self._pending == 0 and not self._failed
        for topic, count in self._acked.items():
            self._metrics.records_out.labels(self._stage, topic).inc(count)
        if not ok:
            self._metrics.produce_errors.labels(self._stage).inc()
            codes = sorted({e.name() for e in self._failed})
            log.warning(
                "batch not acknowledged; rewinding",
                extra={"fields": {"stage": self._stage, "unacked": remaining, "errors": codes}},
            )
        self._pending = 0
        self._failed = []
        self._acked = {}
        return ok


def store_batch(consumer: DelayedConsumer, messages: list[Message]) -> None:
    """Store, per partition, the offset after the batch's last record."""
    last: dict[tuple[str, int], int] = {}
    for msg in messages:
        offset = msg.offset()
        assert offset is not None
        last[(msg.topic() or "", msg.partition() or 0)] = offset
    if last:
        consumer.consumer.store_offsets(
            offsets=[TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
        )


def rewind_batch(consumer: DelayedConsumer, messages: list[Message]) -> None:
    """Seek each partition back to the batch's first record so it is processed again."""
    first: dict[tuple[str, int], int] = {}
    for msg in messages:
        offset = msg.offset()
        assert offset is not None
        first.setdefault((msg.topic() or "", msg.partition() or 0), offset)
    for (topic, partition), offset in first.items():
        if (topic, partition) in consumer.assigned:
            consumer.consumer.seek(TopicPartition(topic, partition, offset))


class LoopStage:
    """A batch stage (ingest, release): poll due records, handle them, until ``stop`` is set.

    Subclasses say which group and topic they read (:attr:`group`, :attr:`topic`), how due
    times are read (:meth:`due_of`) and what a batch becomes (:meth:`_handle`).
    """

    name = "stage"
    #: Consumer group and input topic, set by the subclass.
    group: str
    topic: str
    #: A delayed topic's consumer holds partitions until their head is due.
    delayed = False
    batch_size = 1000
    max_poll_s = 1.0

    def __init__(self, settings: Settings, metrics: Metrics, health: Health) -> None:
        self.settings = settings
        self.metrics = metrics
        self.health = health
        health.register(self.name)

    def due_of(self, msg: Message) -> int:
        """Due time in epoch ms; 0: at once."""
        return 0

    def _started(self) -> dict[str, Any]:
        """Fields of the ``started`` log line."""
        return {"topic": self.topic}

    def _turned(self, consumer: DelayedConsumer) -> None:
        """Called after every poll (for gauges)."""

    def _handle(
        self, consumer: DelayedConsumer, out: BatchProducer, messages: list[Message]
    ) -> None:
        raise NotImplementedError

    def _on_rebalance(self, _partitions: Any) -> None:
        self.metrics.rebalances.labels(self.name).inc()
        self.health.set_ready(self.name, True)

    def run(self, stop: threading.Event) -> None:
        set_stage(self.name)
        consumer = DelayedConsumer(
            make_consumer(self.settings, self.group, delayed=self.delayed),
            due_of=self.due_of,
            max_poll_s=self.max_poll_s,
            on_assign=self._on_rebalance,
            on_revoke=self._on_rebalance,
        )
        out = BatchProducer(make_producer(self.settings), self.metrics, self.name)
        consumer.subscribe([self.topic])
        self.metrics.watch_consumer(self.name, self.group, [self.topic], consumer.snapshot)
        log.info(f"{self.name} started", extra={"fields": self._started()})  # noqa: G004
        try:
            while not stop.is_set():
                self.health.beat(self.name)
                messages = consumer.poll_due(self.batch_size)
                self._turned(consumer)
                if messages:
                    self._handle(consumer, out, messages)
        finally:
            self.metrics.unwatch_consumer(self.name)
            out.producer.flush(10)
            consumer.close()
            log.info(f"{self.name} stopped")  # noqa: G004
