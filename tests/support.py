"""Helpers for the integration tests: isolated settings per test, stages run in threads, and
reading topics with a deadline (never a sleep)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from consumer import headers as h
from consumer.config import Settings, load_settings
from consumer.topics import planned_topics
from consumer.tracecodec import trade_id_of

WEBHOOK_SECRET = (
    "whsec_" + "dGVzdC1zZWNyZXQtZm9yLWF1dG8tdHJhY2U="
)  # base64("test-secret-for-auto-trace")
OTHER_SECRET = "whsec_" + "YW5vdGhlci1zZWNyZXQtbm90LW91cnM="


def webhook(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "webhook",
        "url": url,
        "secrets": [{"env": "AUTO_TRACE_TEST_WEBHOOK_SECRET"}],
        "timeout": "2s",
        **extra,
    }


def make_settings(bootstrap: str, **overrides: Any) -> Settings:
    """Settings with a unique prefix and input topic, so tests never see each other's data."""
    tag = uuid.uuid4().hex[:10]
    base: dict[str, Any] = {
        "kafka": {"bootstrap_servers": bootstrap},
        "input": {"topic": f"trade.closed.{tag}", "group": f"ingest-{tag}"},
        "topics": {"prefix": f"t{tag}", "partitions": 3, "replication_factor": 1},
        "delay": {"window": "0s", "group": f"release-{tag}"},
        "metrics": {"port": 0},
        "shutdown": {"grace": "10s"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return load_settings(None, **base)


def create_topics(settings: Settings, input_partitions: int = 3) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka.bootstrap_servers})
    topics = [
        NewTopic(settings.input.topic, input_partitions, 1, config={"max.message.bytes": "8388608"})
    ]
    topics += [NewTopic(s.name, s.partitions, 1, config=s.config) for s in planned_topics(settings)]
    for future in admin.create_topics(topics, operation_timeout=30).values():
        future.result(timeout=30)
    names = {t.topic for t in topics}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if names <= set(admin.list_topics(timeout=10).topics):
            return
    raise AssertionError("topics did not appear")


class StageThread:
    def __init__(self, stage: Any) -> None:
        self.stage = stage
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.stage.run(self.stop)
        except BaseException as exc:
            self.error = exc

    def start(self) -> None:
        self.thread.start()

    def close(self, timeout: float = 30) -> None:
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.stage.name} did not stop"
        if self.error is not None:
            raise self.error


@contextmanager
def running(*stages: Any, ready_timeout: float = 60) -> Iterator[list[StageThread]]:
    """Run stages in threads; yield once every stage has its partitions assigned."""
    threads = [StageThread(s) for s in stages]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + ready_timeout
        for t in threads:
            health = t.stage.health
            while not health.ready()[1].get(t.stage.name):
                if t.error is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{t.stage.name} did not get an assignment: {t.error!r}")
                health.wait_changed(0.1)
        yield threads
    finally:
        for t in threads:
            t.close()


def produce(
    bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]], **conf: Any
) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, **conf})
    for key, value in records:
        producer.produce(topic, value=value, key=key)
        producer.poll(0)
    assert producer.flush(30) == 0


class TopicReader:
    """Reads a topic from the beginning (no group commits) and keeps what it saw."""

    def __init__(self, bootstrap: str, topic: str, partitions: int | None = None) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"reader-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        meta = self.consumer.list_topics(topic, timeout=10).topics[topic]
        count = partitions or len(meta.partitions)
        self.consumer.assign([TopicPartition(topic, p, 0) for p in range(count)])
        self.messages: list[Message] = []
        self.seen_at_ms: list[int] = []

    def read_until(
        self, done: Callable[[list[Message]], bool], timeout: float = 30
    ) -> list[Message]:
        deadline = time.monotonic() + timeout
        while not done(self.messages):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out with {len(self.messages)} records read")
            for msg in self.consumer.consume(500, 0.2):
                if msg.error() is None:
                    self.messages.append(msg)
                    self.seen_at_ms.append(time.time_ns() // 1_000_000)
        return self.messages

    def read(self, count: int, timeout: float = 30) -> list[Message]:
        return self.read_until(lambda m: len(m) >= count, timeout)

    def drain(self, quiet: float = 1.0) -> list[Message]:
        """Everything that arrives until ``quiet`` seconds pass with nothing new."""
        last = time.monotonic()
        while time.monotonic() - last < quiet:
            for msg in self.consumer.consume(500, 0.2):
                if msg.error() is None:
                    self.messages.append(msg)
                    self.seen_at_ms.append(time.time_ns() // 1_000_000)
                    last = time.monotonic()
        return self.messages

    def close(self) -> None:
        self.consumer.close()


@contextmanager
def reader(bootstrap: str, topic: str) -> Iterator[TopicReader]:
    r = TopicReader(bootstrap, topic)
    try:
        yield r
    finally:
        r.close()


def header(msg: Message, name: str) -> str | None:
    return h.get(msg.headers(), name)


def trade_id(msg: Message) -> str:
    """The trade id inside a delay, sink or retry record ("" if its value is not a TraceRecord)."""
    return trade_id_of(msg.value() or b"") or ""
