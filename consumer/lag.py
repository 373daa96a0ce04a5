"""Consumer lag, and records *waiting* (not yet due) apart from records *overdue*, per topic.

A delayed topic's consumer pauses partitions on purpose, so plain consumer lag mixes records
that are early by design with records that are late. Every ``interval`` this monitor splits it,
for each stage of the process (:meth:`consumer.metrics.Metrics.watch_consumer`):

- ``waiting``: from the offset a *held* partition waits at (its head record, not yet due) to
  the partition's end offset. Due times within a delayed topic are nearly in order (ingest
  bounds clock skew, retries go to a tier at least as long as they wait), so the records
  behind a head that is not due are not due either;
- ``overdue``: from the last record handed to the stage (or the group's committed offset, if
  later or nothing was handed out yet) to the end offset of every assigned partition that is
  *not* held: due records not taken yet (a partition is held as soon as its head is seen not
  due), including those paused by back-pressure or an open circuit. What a sink worker has
  taken and not finished is ``auto_trace_in_flight_deliveries``;
- ``consumer lag``: end offset minus committed offset over every partition of the topic,
  whoever holds it (the usual definition, e.g. ``kafka-consumer-groups --describe``).

Why a thread of its own with an ``AdminClient`` rather than the stage's consumer: a paused
partition is not fetched, so the consumer's cached end offset (``get_watermark_offsets(
cached=True)``) stays frozen for exactly the partitions that matter here (verified: it kept
its value for 6 s while 5 records arrived); asking the stage's consumer instead
(``cached=False``) would block its poll thread for a round trip per partition; and a stage
whose poll thread hangs must not freeze its own lag. The admin client never touches the
stages' consumers: it reads their held/assigned state under the delayed consumer's lock.
Cost per refresh: one metadata request, two ListOffsets requests per partition leader and one
OffsetFetch per consumer group.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaException,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported implicitly
    AdminClient,
    OffsetSpec,
)

from consumer.config import Settings
from consumer.delayed import TP
from consumer.log import get_logger
from consumer.metrics import Metrics

log = get_logger("lag")

#: Every process refreshes this often; a Prometheus scrape in between sees the last values.
DEFAULT_INTERVAL_S = 5.0


class LagMonitor:
    """Refreshes the lag gauges of the stages watched in ``metrics`` from a daemon thread."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = 5.0,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._admin: AdminClient | None = None
        self._readers: dict[str, Consumer] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Label sets set by the last refresh, so series of revoked partitions disappear.
        self._reported: dict[str, set[tuple[str, ...]]] = {}
        self._failing = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lag-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._timeout_s * 3)
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - metrics must never take the process down
                self._metrics.lag_errors.inc()
                if not self._failing:
                    log.warning(
                        "lag refresh failed; keeping the last values",
                        extra={"fields": {"exc_class": type(exc).__name__}},
                    )
                self._failing = True
            else:
                if self._failing:
                    log.info("lag refresh works again")
                self._failing = False
            self._stop.wait(self._interval_s)

    def _client(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient(
                {
                    **self._settings.kafka.librdkafka(),
                    # The admin client is a producer-type handle: never auto-create a topic.
                    "allow.auto.create.topics": False,
                }
            )
        return self._admin

    # -- one refresh --------------------------------------------------------------------

    def refresh(self) -> None:
        """Read end and committed offsets once and set every gauge (public for tests)."""
        watched = self._metrics.watched_consumers()
        topics = sorted({t for w in watched for t in w.topics})
        partitions = self._partitions(topics) if topics else {}
        tps = [TopicPartition(t, p) for t, ps in partitions.items() for p in ps]
        ends = self._offsets(tps, OffsetSpec.latest())  # type: ignore[no-untyped-call]
        starts = self._offsets(tps, OffsetSpec.earliest())  # type: ignore[no-untyped-call]
        reported: dict[str, set[tuple[str, ...]]] = {
            "lag": set(),
            "waiting": set(),
            "overdue": set(),
            "held": set(),
        }
        m = self._metrics
        for w in watched:
            committed = self._committed(w.group, [tp for tp in tps if tp.topic in w.topics])
            assigned = w.partitions()
            for topic in w.topics:
                if topic not in partitions:
                    continue
                lag = waiting = overdue = held = 0
                for p in partitions[topic]:
                    end = ends.get((topic, p))
                    if end is None:
                        continue
                    done = committed.get((topic, p), -1)
                    if done < 0:
                        done = starts.get((topic, p), 0)
                    behind = max(0, end - done)
                    lag += behind
                    if (topic, p) not in assigned:
                        continue
                    view = assigned[(topic, p)]
                    if view.held_at is None:
                        overdue += max(0, end - max(done, view.taken or 0))
                    else:
                        waiting += max(0, end - view.held_at)
                        held += 0 if view.resuming else 1
                m.consumer_lag.labels(w.stage, w.group, topic).set(lag)
                m.waiting.labels(w.stage, topic).set(waiting)
                m.overdue.labels(w.stage, topic).set(overdue)
                m.held_partitions.labels(topic).set(held)
                reported["lag"].add((w.stage, w.group, topic))
                reported["waiting"].add((w.stage, topic))
                reported["overdue"].add((w.stage, topic))
                reported["held"].add((topic,))
        gauges = {
            "lag": m.consumer_lag,
            "waiting": m.waiting,
            "overdue": m.overdue,
            "held": m.held_partitions,
        }
        for name, gauge in gauges.items():
            for labels in self._reported.get(name, set()) - reported[name]:
                gauge.remove(*labels)
        self._reported = reported

    def _partitions(self, topics: list[str]) -> dict[str, list[int]]:
        futures = self._client().describe_topics(
            TopicCollection(topics), request_timeout=self._timeout_s
        )
        out: dict[str, list[int]] = {}
        for topic, future in futures.items():
            try:
                description = future.result(timeout=self._timeout_s)
            except KafkaException:
                continue  # not created yet: nothing to report for it
            out[topic] = sorted(p.id for p in description.partitions)
        return out

    def _offsets(self, tps: list[TopicPartition], spec: Any) -> dict[TP, int]:
        if not tps:
            return {}
        futures = self._client().list_offsets(
            {tp: spec for tp in tps}, request_timeout=self._timeout_s
        )
        return _results(futures.items(), self._timeout_s)

    def _committed(self, group: str, tps: list[TopicPartition]) -> dict[TP, int]:
        """Committed offsets through a consumer handle of that group that never subscribes.

        Not ``AdminClient.list_consumer_group_offsets``: in librdkafka 2.16 an OffsetFetch
        answer carrying a coordinator error (right after a broker restart) is handed to the
        handle's consumer group, which an admin client does not have — the process died with
        SIGSEGV in every chaos run with broker restarts. A never-subscribed consumer reads the
        same offsets and survived repeated broker crashes.
        """
        if not tps:
            return {}
        reader = self._readers.get(group)
        if reader is None:
            reader = Consumer(
                {
                    **self._settings.kafka.librdkafka(),
                    "group.id": group,
                    "enable.auto.commit": False,
                    "allow.auto.create.topics": False,
                }
            )
            self._readers[group] = reader
        out: dict[TP, int] = {}
        for tp in reader.committed(tps, timeout=self._timeout_s):
            if tp.error is None:
                out[(tp.topic, tp.partition)] = tp.offset
        return out


def _results(items: Iterable[tuple[TopicPartition, Future[Any]]], timeout: float) -> dict[TP, int]:
    out: dict[TP, int] = {}
    for tp, future in items:
        try:
            out[(tp.topic, tp.partition)] = int(future.result(timeout=timeout).offset)
        except KafkaException:
            continue  # leader unavailable for a moment: skipped this round
    return out
