"""The session's broker is a real Kafka: records written with acks=all come back, and survive
a clean restart and a crash of the broker together with the group's committed offsets."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from consumer.broker import Cluster, LocalBroker

pytestmark = pytest.mark.integration

READ_TIMEOUT = 60.0


def produce(bootstrap_servers: str, topic: str, values: list[str]) -> None:
    """Write values keyed by their index modulo 5, failing unless every one is acknowledged."""
    producer = Producer(
        {"bootstrap.servers": bootstrap_servers, "enable.idempotence": True, "acks": "all"}
    )
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err)

    for index, value in enumerate(values):
        producer.produce(topic, key=str(index % 5), value=value, on_delivery=on_delivery)
        producer.poll(0)
    assert producer.flush(30) == 0, "records still unacknowledged after 30 s"
    assert errors == []


def new_consumer(bootstrap_servers: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )


def read(consumer: Consumer, count: int) -> list[Message]:
    """Poll until ``count`` records arrived; a deadline, not a fixed sleep, bounds the wait."""
    messages: list[Message] = []
    deadline = time.monotonic() + READ_TIMEOUT
    while len(messages) < count and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        assert msg.error() is None, msg.error()
        messages.append(msg)
    assert len(messages) == count, f"read {len(messages)} of {count} records"
    return messages


def read_all(bootstrap_servers: str, topic: str, count: int, group: str | None = None) -> list[str]:
    consumer = new_consumer(bootstrap_servers, group or f"test-{uuid.uuid4().hex[:8]}")
    try:
        consumer.subscribe([topic])
        messages = read(consumer, count)
        # Nothing beyond the expected records: a redelivery would show up here.
        assert consumer.poll(1.0) is None
        return [msg.value().decode() for msg in messages]  # type: ignore[union-attr]
    finally:
        consumer.close()


def test_idempotent_producer_records_come_back_through_a_consumer_group(
    bootstrap_servers: str, make_topic: Callable[..., str]
) -> None:
    topic = make_topic(partitions=3)
    values = [f"record-{i}" for i in range(500)]

    produce(bootstrap_servers, topic, values)
    consumer = new_consumer(bootstrap_servers, f"test-{uuid.uuid4().hex[:8]}")
    try:
        consumer.subscribe([topic])
        messages = read(consumer, len(values))
        consumer.commit(asynchronous=False)
        partitions = [TopicPartition(topic, partition) for partition in range(3)]
        committed = {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=10)}
        ends = {
            tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions
        }
    finally:
        consumer.close()

    assert sorted(msg.value().decode() for msg in messages) == sorted(values)  # type: ignore[union-attr]
    # Records of one key stay in production order.
    for key in {msg.key() for msg in messages}:
        of_key = [int(msg.value().decode().split("-")[1]) for msg in messages if msg.key() == key]  # type: ignore[union-attr]
        assert of_key == sorted(of_key)
    # The group's committed position is the end of every partition that received records.
    assert sum(ends.values()) == len(values)
    assert {p: committed[p] for p, end in ends.items() if end > 0} == {
        p: end for p, end in ends.items() if end > 0
    }


def local_broker(cluster: Cluster) -> LocalBroker:
    if cluster.local is None:
        pytest.skip(f"needs the broker this session started, not a {cluster.kind} cluster")
    return cluster.local


@pytest.mark.parametrize("how", ["restart", "crash"])
def test_committed_records_and_offsets_survive_the_broker_going_down(
    kafka_cluster: Cluster, make_topic: Callable[..., str], how: str
) -> None:
    broker = local_broker(kafka_cluster)
    servers = kafka_cluster.bootstrap_servers
    topic = make_topic(partitions=2)
    group = f"test-{uuid.uuid4().hex[:8]}"
    values = [f"record-{i}" for i in range(100)]
    produce(servers, topic, values)

    consumer = new_consumer(servers, group)
    try:
        consumer.subscribe([topic])
        first = read(consumer, 40)
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()

    if how == "restart":
        broker.restart()
    else:
        broker.kill()
        broker.start()
    assert broker.bootstrap_servers == servers  # same address: clients reconnect by themselves

    rest = read_all(servers, topic, len(values) - len(first), group=group)
    assert sorted([msg.value().decode() for msg in first] + rest) == sorted(values)  # type: ignore[union-attr]
    assert sorted(read_all(servers, topic, len(values))) == sorted(values)
