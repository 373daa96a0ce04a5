"""Every Prometheus metric auto-trace exports, built against an injectable registry.

Labels are bounded: stage, adapter, topic, consumer group, outcome, retry tier, error class,
reason class. Never a trade id, a key, a message or any value from a record.

``stage`` is the name of one stage of the process, as in ``/readyz`` and the logs: ``ingest``,
``release`` or ``sink:<adapter>``. The lateness histogram is the exception: its ``stage`` says
where lateness was measured (``release`` or ``sink``) and ``adapter`` says for which adapter.

Series are created at zero when a stage starts (:meth:`Metrics.init_stage`,
:meth:`Metrics.init_adapter`), so dashboards and alerts see a healthy zero instead of "no
data", and ``rate()`` sees the first event.

The README's "Metrics and health" section lists every metric with its labels; keep both in step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from consumer.delayed import TP, PartitionView

#: Lateness after due is the T+X promise: fine buckets near zero, where it should live.
#: 60 s is the lateness SLO threshold of the alert rules: keep it a bucket boundary.
LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
CLOSE_TO_DELIVERED_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)

#: Outcomes of ``auto_trace_deliveries_total``.
OUTCOMES = ("delivered", "retry", "dead_letter", "adapter_down")
#: Error classes a record is dead-lettered with (``type(error).__name__``), created at zero.
DEAD_LETTER_CLASSES = ("RetriableDeliveryError", "FatalDeliveryError", "UndecodableRecord")


@dataclass(frozen=True, slots=True)
class WatchedConsumer:
    """A stage's consumer, as the lag monitor (:mod:`consumer.lag`) sees it."""

    stage: str
    group: str
    topics: tuple[str, ...]
    #: Assigned partitions (:meth:`consumer.delayed.DelayedConsumer.snapshot`). Called from
    #: the lag monitor's thread: it must only read state under a lock.
    partitions: Callable[[], Mapping[TP, PartitionView]]


class HealthView(Protocol):
    """What the stage collector reads from :class:`consumer.health.Health`."""

    def alive(self) -> tuple[bool, dict[str, float]]: ...

    def ready(self) -> tuple[bool, dict[str, bool]]: ...


class _StageCollector(Collector):
    """Readiness and loop age of every stage, read from the health state at scrape time."""

    def __init__(self, health: HealthView) -> None:
        self._health = health

    def collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily(
            "auto_trace_stage_ready",
            "1 once a stage has joined its consumer group and got its assignment (/readyz)",
            labels=["stage"],
        )
        age = GaugeMetricFamily(
            "auto_trace_stage_loop_age_seconds",
            "Seconds since a stage's poll loop last turned (/healthz fails above 120)",
            labels=["stage"],
        )
        for stage, ok in sorted(self._health.ready()[1].items()):
            ready.add_metric([stage], 1.0 if ok else 0.0)
        for stage, seconds in sorted(self._health.alive()[1].items()):
            age.add_metric([stage], seconds)
        yield ready
        yield age


class Metrics:
    """One instance per process; stages receive it rather than importing globals."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._watched: dict[str, WatchedConsumer] = {}
        self._watched_lock = threading.Lock()

        # -- what the process is ----------------------------------------------------------
        self.build_info = Info(
            "auto_trace_build", "Version and role of the running auto-trace", registry=r
        )
        self.delay_window = Gauge(
            "auto_trace_delay_window_seconds",
            "The configured delay X: no record is released before close_time + X",
            registry=r,
        )

        # -- records through the stages -------------------------------------------------------
        self.records_in = Counter(
            "auto_trace_records_in_total",
            "Records a stage consumed (a record consumed again after a rewind counts again)",
            ["stage"],
            registry=r,
        )
        self.records_out = Counter(
            "auto_trace_records_out_total",
            "Records a stage produced and the broker acknowledged, by destination topic "
            "(a sink worker's are its retry and DLQ records; deliveries are counted apart)",
            ["stage", "topic"],
            registry=r,
        )
        self.records_failed = Counter(
            "auto_trace_records_failed_total",
            "Records a stage could not process: ingest sent them to the ingest DLQ, a sink "
            "worker to a retry tier or the DLQ",
            ["stage"],
            registry=r,
        )
        self.ingest_dead_letters = Counter(
            "auto_trace_ingest_dead_letters_total",
            "Input records sent to the ingest DLQ, by reason class (decode, invalid)",
            ["reason"],
            registry=r,
        )

        # -- deliveries -------------------------------------------------------------------
        self.deliveries = Counter(
            "auto_trace_deliveries_total",
            "Delivery attempts by adapter and outcome (delivered, retry, dead_letter, "
            "adapter_down: an adapter-wide failure held while the circuit is open)",
            ["adapter", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "auto_trace_retries_total",
            "Records sent to a retry tier (tier: 0 for the first, shortest tier)",
            ["adapter", "tier"],
            registry=r,
        )
        self.dead_letters = Counter(
            "auto_trace_dead_letters_total",
            "Records sent to the delivery DLQ, by the class of the last error",
            ["adapter", "error_class"],
            registry=r,
        )
        self.connections_opened = Counter(
            "auto_trace_adapter_connections_opened_total",
            "Connections an adapter's own HTTP client opened (the webhook's builtin client). "
            "Near the delivery rate, the receiver closes every connection and each delivery "
            "pays a new TCP (and TLS) handshake",
            ["adapter"],
            registry=r,
        )
        self.adapter_call = Histogram(
            "auto_trace_adapter_call_duration_seconds",
            "Duration of one adapter delivery call, whatever its outcome",
            ["adapter"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.lateness = Histogram(
            "auto_trace_lateness_seconds",
            "The T+X promise: time from a record's due time (close_time + window) to the "
            "moment it was released (stage=release, adapter empty) or delivered (stage=sink)",
            ["stage", "adapter"],
            buckets=LATENESS_BUCKETS,
            registry=r,
        )
        self.close_to_delivered = Histogram(
            "auto_trace_close_to_delivered_seconds",
            "Time from close_time to successful delivery (window + lateness)",
            ["adapter"],
            buckets=CLOSE_TO_DELIVERED_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "auto_trace_in_flight_deliveries",
            "Records taken by a sink worker whose outcome is not yet final",
            ["adapter"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "auto_trace_circuit_state",
            "Circuit breaker of an adapter: 0 closed, 1 half-open (probing), 2 open (paused)",
            ["adapter"],
            registry=r,
        )

        # -- delayed topics and consumer lag (refreshed by consumer.lag.LagMonitor) ---------
        self.held_partitions = Gauge(
            "auto_trace_held_partitions",
            "Partitions paused because their head record is not yet due",
            ["topic"],
            registry=r,
        )
        self.waiting = Gauge(
            "auto_trace_records_waiting",
            "Records not yet due: from the head of each held partition (paused because that "
            "record is not due; due times in a delayed topic are in order) to the end offset. "
            "Only partitions assigned to this process",
            ["stage", "topic"],
            registry=r,
        )
        self.overdue = Gauge(
            "auto_trace_records_overdue",
            "Records due but not taken yet: from the last record handed to the stage (or the "
            "committed offset) to the end offset of each partition that is not held, paused "
            "or not by back-pressure or an open circuit. Records a sink worker has taken are "
            "auto_trace_in_flight_deliveries. Only partitions assigned to this process",
            ["stage", "topic"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "auto_trace_consumer_lag_records",
            "End offset minus the group's committed offset, summed over every partition of "
            "the topic (the group's log start when nothing is committed). Every process of "
            "the group reports the same value: aggregate with max",
            ["stage", "group", "topic"],
            registry=r,
        )
        self.lag_errors = Counter(
            "auto_trace_lag_monitor_errors_total",
            "Lag refreshes that failed (the lag gauges keep their last values meanwhile)",
            registry=r,
        )

        # -- Kafka clients ----------------------------------------------------------------
        self.rebalances = Counter(
            "auto_trace_rebalances_total",
            "Partition assignments and revocations seen by a stage",
            ["stage"],
            registry=r,
        )
        self.produce_errors = Counter(
            "auto_trace_produce_errors_total",
            "Produce requests the broker did not acknowledge (the batch is re-processed, or "
            "the sink worker's record produced again)",
            ["stage"],
            registry=r,
        )

    # -- series created at zero -------------------------------------------------------------

    def init_stage(
        self, stage: str, out_topics: Iterable[str] = (), reasons: Iterable[str] = ()
    ) -> None:
        """Create a stage's series at zero (``reasons``: ingest dead-letter reason classes)."""
        self.records_in.labels(stage)
        self.records_failed.labels(stage)
        self.rebalances.labels(stage)
        self.produce_errors.labels(stage)
        for topic in out_topics:
            self.records_out.labels(stage, topic)
        for reason in reasons:
            self.ingest_dead_letters.labels(reason)

    def init_adapter(self, adapter: str, tiers: int) -> None:
        """Create an adapter's series at zero: closed circuit, nothing in flight."""
        for outcome in OUTCOMES:
            self.deliveries.labels(adapter, outcome)
        for tier in range(tiers):
            self.retries.labels(adapter, str(tier))
        for error_class in DEAD_LETTER_CLASSES:
            self.dead_letters.labels(adapter, error_class)
        self.adapter_call.labels(adapter)
        self.connections_opened.labels(adapter)
        self.lateness.labels("sink", adapter)
        self.close_to_delivered.labels(adapter)
        self.in_flight.labels(adapter)
        self.circuit_state.labels(adapter)

    # -- what the lag monitor and the stage collector read ----------------------------------

    def watch_consumer(
        self,
        stage: str,
        group: str,
        topics: Iterable[str],
        partitions: Callable[[], Mapping[TP, PartitionView]],
    ) -> None:
        """Called by a stage once subscribed; the lag monitor reports it until unwatched."""
        with self._watched_lock:
            self._watched[stage] = WatchedConsumer(stage, group, tuple(topics), partitions)

    def unwatch_consumer(self, stage: str) -> None:
        with self._watched_lock:
            self._watched.pop(stage, None)

    def watched_consumers(self) -> list[WatchedConsumer]:
        with self._watched_lock:
            return list(self._watched.values())

    def watch_health(self, health: HealthView) -> None:
        """Export ``auto_trace_stage_ready`` and ``auto_trace_stage_loop_age_seconds``."""
        self.registry.register(_StageCollector(health))
