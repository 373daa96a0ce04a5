"""librdkafka client settings shared by every stage, so the delivery guarantees are set once.

Producers are idempotent with ``acks=all`` (librdkafka's default leaves idempotence off: see
FACTS.md). Consumers never store an offset by themselves: a stage stores a record's offset only
once its outcome is durable, and librdkafka commits stored offsets in the background, on
rebalance and on close.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from consumer.config import Settings
from consumer.log import get_logger

#: Largest record a stage produces. The ingest DLQ must be able to keep oversized input.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


#: librdkafka's own log lines (broker down, reconnects) go through Python logging, so they come
#: out as structured log lines like everything else instead of raw text on stderr.
_LIBRDKAFKA_LOG = get_logger("librdkafka")
log = get_logger("clients")


#: librdkafka's pause before fetching again once the prefetch queue is full (consumer_config).
FETCH_QUEUE_BACKOFF_MS = 20


def producer_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """Tunable defaults, then ``kafka.client``, then what the guarantees require."""
    return {
        "logger": _LIBRDKAFKA_LOG,
        # Batching for throughput; ingest waits for acknowledgements per consumed batch anyway.
        "linger.ms": 5,
        "compression.type": "lz4",
        **settings.kafka.librdkafka(),
        "enable.idempotence": True,
        "acks": "all",
        "message.max.bytes": MAX_MESSAGE_BYTES + 64 * 1024,
        **extra,
    }


def consumer_config(settings: Settings, group: str, **extra: Any) -> dict[str, Any]:
    """Tunable defaults, then ``kafka.client``, then what the guarantees require."""
    return {
        "logger": _LIBRDKAFKA_LOG,
        "auto.commit.interval.ms": 1000,
        "auto.offset.reset": "earliest",
        # Once its prefetch queue is full, librdkafka fetches again only after this pause (1 s
        # by default). A consumer that drains the queue faster than that then idles for the
        # rest of the second: a plain copy ran at ~100k records/s with it and 210-280k/s
        # without it, alternating between the two from one run to the next (make bench R1,
        # 2026-11-27), and a backlog's catch-up stalled the same way.
        "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
        **settings.kafka.librdkafka(),
        "group.id": group,
        "enable.auto.commit": True,
        "enable.auto.offset.store": False,
        "enable.partition.eof": False,
        # `auto-trace dlq replay` writes in transactions: never read an aborted replay batch.
        "isolation.level": "read_committed",
        **extra,
    }


def make_producer(settings: Settings, **extra: Any) -> Producer:
    return Producer(producer_config(settings, **extra))


#: Defaults for release's producer (a user's kafka.client value wins). Every record it produces
#: is already due, so time spent lingering is lateness, but a produce request per record or two
#: costs the broker more than the few ms: make bench, five paired runs each (with the fetch size
#: below), 5 ms and 64 KiB against 1 ms and 8 KiB: R3 p99 38-75 vs 28-102 ms, p50 14-20 vs
#: 7-12 ms, the broker's CPU in R3 78-86% vs 93-98% of a core, R1b's rate 32-52k vs 26-35k/s.
RELEASE_PRODUCER_DEFAULTS: dict[str, Any] = {"linger.ms": 5}


def _stage_defaults(
    conf: dict[str, Any], defaults: dict[str, Any], settings: Settings, extra: dict[str, Any]
) -> dict[str, Any]:
    """A stage's own defaults, under whatever the user (``kafka.client``) or caller set."""
    for key, value in defaults.items():
        if key not in settings.kafka.client and key not in extra:
            conf[key] = value
    return conf


def release_producer_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    conf = producer_config(settings, **extra)
    return _stage_defaults(conf, RELEASE_PRODUCER_DEFAULTS, settings, extra)


def make_release_producer(settings: Settings, **extra: Any) -> Producer:
    return Producer(release_producer_config(settings, **extra))


#: For delayed topics: after a held partition is resumed, its next fetch waits for the fetch
#: already in flight, which the broker holds up to fetch.wait.max.ms when there is no new data.
#: librdkafka's 500 ms default would add up to 500 ms to every release.
DELAYED_FETCH_WAIT_MS = 20

#: Defaults for delayed-topic consumers (a user's kafka.client value wins). A small prefetch:
#: librdkafka fills its queue (100k records / 64 MB by default) before the first hold pauses a
#: partition, so memory would grow with the backlog (make bench MEM: 1.17-1.25 -> 1.02).
DELAYED_DEFAULTS: dict[str, int] = {
    "fetch.wait.max.ms": DELAYED_FETCH_WAIT_MS,
    "queued.max.messages.kbytes": 1024,
    "queued.min.messages": 1000,
    # With a small queue the threshold is reached often, so the short fetch.queue.backoff.ms
    # that every consumer gets (consumer_config) matters most here: with librdkafka's 1 s,
    # release lateness p99 rose to 1.6 s.
    # Every resume of a held partition fetches again from its head, and all but the few records
    # due by then are dropped at the next hold: with librdkafka's 1 MB per partition, each
    # resume re-read the partition's whole waiting window (make bench R3: the release's
    # librdkafka thread 2.9 -> 1.6 CPU s, the broker 9.0 -> 8.4, for 20k records). But a
    # backlog of due records is read at one fetch per partition per round trip: 64 KiB held
    # release (make bench R1b, window 0) to 62-93k records/s, 256 KiB gave 100-124k/s in
    # alternating runs with the same R3 lateness and MEM; 512 KiB no more than 256.
    "max.partition.fetch.bytes": 262144,
}


def stage_consumer_config(settings: Settings, group: str, *, delayed: bool) -> dict[str, Any]:
    conf = consumer_config(settings, group)
    return _stage_defaults(conf, DELAYED_DEFAULTS, settings, {}) if delayed else conf


def make_consumer(settings: Settings, group: str, *, delayed: bool = False) -> Consumer:
    return Consumer(stage_consumer_config(settings, group, delayed=delayed))


#: What :func:`positional_produce` sends through the mock cluster and expects back.
_CHECK_TOPIC = "auto-trace-produce-check"
_CHECK_VALUE = b"auto-trace positional produce() check"
_CHECK_KEY = b"auto-trace-check-key"
_CHECK_HEADERS = [("auto-trace-check-a", b"1"), ("auto-trace-check-b", b"")]

#: A delivery callback, as ``produce()`` takes it.
DeliveryCallback = Callable[[KafkaError | None, Message], None]


def _positional(callback: DeliveryCallback) -> tuple[Any, ...]:
    """The hot loops' call: topic, value, key, partition (any), callback, on_delivery (its
    newer name, unset), timestamp (now), headers."""
    return (_CHECK_TOPIC, _CHECK_VALUE, _CHECK_KEY, -1, callback, None, 0, _CHECK_HEADERS)


@functools.cache
def positional_produce() -> bool:
    """Whether hot loops may call ``produce(topic, value, key, -1, callback, None, 0, headers)``.

    Keywords cost confluent-kafka ~0.3 µs a call more than positions (1.07-1.21 against
    1.34-1.63 µs for a record with three headers and a callback, alternating runs): ingest's
    rate rose ~7% with positions (make bench R1, three paired runs). But the order is not the
    documented one: the C code's parameter list has ``callback``, an old name of
    ``on_delivery``, before it, so the sixth position is the new name and the headers are
    eighth. A confluent-kafka that changed that list could put the headers or the callback
    somewhere else without an error.

    So the order is checked once per process, not trusted (:func:`produce_round_trip`). If it
    fails, the stages use keywords and say so in the log.
    """
    why = produce_round_trip(_positional)
    if why:
        log.warning(
            "produce() with positional arguments failed its check; stages use keywords",
            extra={"fields": {"reason": why[:300]}},
        )
    return not why


def produce_round_trip(arguments: Callable[[DeliveryCallback], tuple[Any, ...]]) -> str:
    """Why ``produce(*arguments(callback))`` does not deliver :data:`_CHECK_VALUE`, its key
    and headers with one report to ``callback``; empty if it does.

    One record goes through librdkafka's in-process mock cluster (loopback, no broker, ~10
    ms) and is read back. Anything going wrong is a reason too.
    """
    reports: list[tuple[KafkaError | None, Message]] = []
    producer = Producer({"test.mock.num.brokers": 1, "log_level": 0})
    reader: Consumer | None = None
    try:
        producer.produce(*arguments(lambda err, msg: reports.append((err, msg))))
        producer.flush(5)
        if len(reports) != 1 or reports[0][0] is not None:
            return f"delivery reports: {[str(err) for err, _ in reports]}"
        sent = reports[0][1]
        brokers = producer.list_topics(timeout=5).brokers.values()
        reader = Consumer(
            {
                "bootstrap.servers": ",".join(f"{b.host}:{b.port}" for b in brokers),
                "group.id": f"auto-trace-check-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "log_level": 0,
            }
        )
        reader.assign([TopicPartition(_CHECK_TOPIC, sent.partition() or 0, sent.offset() or 0)])
        got = reader.poll(5)
        if got is None or got.error() is not None:
            return f"read back: {got.error() if got is not None else 'nothing'}"
        back = (got.value(), got.key(), got.headers())
    except Exception as exc:  # noqa: BLE001 - any failure is a reason not to use the call.
        return f"{type(exc).__name__}: {exc}"
    else:
        if back != (_CHECK_VALUE, _CHECK_KEY, _CHECK_HEADERS):
            return "the record read back differs from the one sent"
        return ""
    finally:
        if reader is not None:
            reader.close()
        producer.close()
