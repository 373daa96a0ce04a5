"""Every topic name auto-trace uses, derived from the configuration in one place, and
``auto-trace topics create``.

    <prefix>.delay                   ingest → release: records waiting for close_time + window
    <prefix>.sink.<adapter>          release → one adapter's sink worker
    <prefix>.retry.<adapter>.<tier>  sink worker → itself, after a retriable failure
    <prefix>.dlq                     deliveries that failed for good (PII-free)
    <prefix>.dlq.ingest              input that could not be decoded or validated (RAW: personal)
    <prefix>.dlq.audit               who replayed which dead letters, when (`auto-trace dlq`)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from consumer.clients import MAX_MESSAGE_BYTES
from consumer.config import Settings, TopicKind, format_duration

Kind = Literal["delay", "sink", "retry", "dlq", "dlq_ingest", "dlq_audit"]


def delay_topic(settings: Settings) -> str:
    return f"{settings.topics.prefix}.delay"


def sink_topic(settings: Settings, adapter: str) -> str:
    return f"{settings.topics.prefix}.sink.{adapter}"


def retry_topics(settings: Settings, adapter: str) -> list[str]:
    """One topic per tier, in tier order; the tier's delay is in the name (``.retry.hook.5s``)."""
    return [
        f"{settings.topics.prefix}.retry.{adapter}.{format_duration(t)}"
        for t in settings.retry.tiers
    ]


def dlq_topic(settings: Settings) -> str:
    return f"{settings.topics.prefix}.dlq"


def ingest_dlq_topic(settings: Settings) -> str:
    return f"{settings.topics.prefix}.dlq.ingest"


def dlq_audit_topic(settings: Settings) -> str:
    return f"{settings.topics.prefix}.dlq.audit"


def sink_group(settings: Settings, adapter: str) -> str:
    return f"{settings.topics.prefix}-sink-{adapter}"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    kind: Kind
    #: -1: the broker's default.
    partitions: int
    replication_factor: int
    config: dict[str, str]


def _spec(settings: Settings, name: str, kind: Kind) -> TopicSpec:
    section: TopicKind = getattr(settings.topics, kind)
    partitions = section.partitions or settings.topics.partitions
    replication = section.replication_factor or settings.topics.replication_factor or -1
    config: dict[str, str] = {}
    if section.retention is not None:
        config["retention.ms"] = str(int(section.retention / timedelta(milliseconds=1)))
    if kind == "dlq_ingest":
        # Oversized input must still fit here, or one bad record would stall its partition.
        config["max.message.bytes"] = str(MAX_MESSAGE_BYTES + 64 * 1024)
    return TopicSpec(name, kind, partitions, replication, config)


def planned_topics(settings: Settings) -> list[TopicSpec]:
    """Every topic the configuration implies, in topology order.

    Disabled adapters keep their topics: disabling is meant to be reversible without losing
    what waits in them.
    """
    specs = [_spec(settings, delay_topic(settings), "delay")]
    for adapter in settings.adapters:
        specs.append(_spec(settings, sink_topic(settings, adapter.name), "sink"))
        specs += [_spec(settings, t, "retry") for t in retry_topics(settings, adapter.name)]
    specs.append(_spec(settings, dlq_topic(settings), "dlq"))
    specs.append(_spec(settings, ingest_dlq_topic(settings), "dlq_ingest"))
    # Who replayed what: one partition, never expires (a finished replay must stay finished).
    audit = _spec(settings, dlq_audit_topic(settings), "dlq")
    specs.append(
        TopicSpec(audit.name, "dlq_audit", 1, audit.replication_factor, {"retention.ms": "-1"})
    )
    return specs


def create_topics(settings: Settings, *, timeout: float = 30.0) -> list[tuple[TopicSpec, str]]:
    """Create what is missing; report ``created`` or ``exists`` per topic. Idempotent."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient(settings.kafka.librdkafka())
    specs = planned_topics(settings)
    futures = admin.create_topics(
        [NewTopic(s.name, s.partitions, s.replication_factor, config=s.config) for s in specs],
        request_timeout=timeout,
        operation_timeout=timeout,
    )
    results: list[tuple[TopicSpec, str]] = []
    for spec in specs:
        try:
            futures[spec.name].result(timeout=timeout)
            results.append((spec, "created"))
        except KafkaException as exc:
            error = exc.args[0]
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                results.append((spec, "exists"))
            else:
                raise
    return results
