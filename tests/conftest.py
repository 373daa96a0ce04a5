"""Fixtures shared by every test: one real Kafka cluster per session, and fresh topics on it.

The cluster is ``KAFKA_BOOTSTRAP_SERVERS`` when set, else a Docker container, else the local
JVM broker (see :mod:`consumer.broker`); it is started only by the first test that asks for
it, so unit-test runs never start one.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported implicitly
    AdminClient,
    NewTopic,
)

from consumer import broker
from consumer.broker import Cluster

TOPIC_READY_TIMEOUT = 30.0


@pytest.fixture(scope="session")
def kafka_cluster() -> Iterator[Cluster]:
    with broker.kafka_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def bootstrap_servers(kafka_cluster: Cluster) -> str:
    return kafka_cluster.bootstrap_servers


@pytest.fixture
def make_topic(bootstrap_servers: str) -> Iterator[Callable[..., str]]:
    """Create uniquely named topics, ready to use, and delete them after the test.

    Unique names keep tests independent on a shared (external) cluster and across reruns;
    ``replication_factor=-1`` takes the cluster's default, so the same test runs against a
    single local broker and a three-broker cluster.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    created: list[str] = []

    def make(
        partitions: int = 1, *, prefix: str = "test", config: dict[str, str] | None = None
    ) -> str:
        name = f"{prefix}.{uuid.uuid4().hex[:12]}"
        new = NewTopic(name, num_partitions=partitions, replication_factor=-1, config=config or {})
        admin.create_topics([new], operation_timeout=TOPIC_READY_TIMEOUT)[name].result(
            timeout=TOPIC_READY_TIMEOUT
        )
        created.append(name)
        _wait_for_topic(admin, name, partitions)
        return name

    yield make

    if created:
        # Best effort: a chaos test may have left the broker down, and the topics are unique.
        futures = admin.delete_topics(created, operation_timeout=5, request_timeout=5)
        for future in futures.values():
            with contextlib.suppress(Exception):
                future.result(timeout=10)


def _wait_for_topic(admin: AdminClient, name: str, partitions: int) -> None:
    """Creation is acknowledged by the controller before every partition has a leader."""
    deadline = time.monotonic() + TOPIC_READY_TIMEOUT
    state = "not listed"
    while time.monotonic() < deadline:
        try:
            topic = admin.list_topics(topic=name, timeout=5).topics.get(name)
        except KafkaException as exc:
            state = str(exc)
            continue
        if topic is not None and topic.error is None:
            leaders = [p.leader for p in topic.partitions.values()]
            if len(leaders) == partitions and all(leader >= 0 for leader in leaders):
                return
            state = f"leaders {leaders}"
        elif topic is not None:
            state = str(topic.error)
        time.sleep(0.1)
    raise TimeoutError(f"topic {name} not ready after {TOPIC_READY_TIMEOUT:.0f} s: {state}")
