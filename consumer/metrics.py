"""Every Prometheus metric auto-trace exports, built against an injectable registry.

Labels are bounded: stage, adapter, topic, outcome, error class, reason class. Never a trade
id, a key, a message or any value from a record.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

#: Lateness after due is the T+X promise: fine buckets near zero, where it should live.
LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
CLOSE_TO_DELIVERED_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


class Metrics:
    """One instance per process; stages receive it rather than importing globals."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.build_info = Info("auto_trace_build", "Version of auto-trace", registry=r)
        self.records_in = Counter(
            "auto_trace_records_in_total", "Records consumed by a stage", ["stage"], registry=r
        )
        self.records_out = Counter(
            "auto_trace_records_out_total",
            "Records a stage produced and the broker acknowledged",
            ["stage", "topic"],
            registry=r,
        )
        self.records_failed = Counter(
            "auto_trace_records_failed_total",
            "Records a stage could not process (sent to a DLQ, a retry tier, or retried)",
            ["stage"],
            registry=r,
        )
        self.ingest_dead_letters = Counter(
            "auto_trace_ingest_dead_letters_total",
            "Input records sent to the ingest DLQ, by reason class",
            ["reason"],
            registry=r,
        )
        self.deliveries = Counter(
            "auto_trace_deliveries_total",
            "Delivery attempts by adapter and outcome (delivered, retry, dead_letter, "
            "adapter_down: an adapter-wide failure held while the circuit is open)",
            ["adapter", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "auto_trace_retries_total",
            "Records sent to a retry tier",
            ["adapter", "tier"],
            registry=r,
        )
        self.dead_letters = Counter(
            "auto_trace_dead_letters_total",
            "Records sent to the delivery DLQ",
            ["adapter", "error_class"],
            registry=r,
        )
        self.adapter_call = Histogram(
            "auto_trace_adapter_call_duration_seconds",
            "Duration of one adapter delivery call",
            ["adapter"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.lateness = Histogram(
            "auto_trace_lateness_seconds",
            "Time from a record's due time (close_time + window) to the moment it was "
            "released (stage=release) or delivered (stage=sink)",
            ["stage", "adapter"],
            buckets=LATENESS_BUCKETS,
            registry=r,
        )
        self.close_to_delivered = Histogram(
            "auto_trace_close_to_delivered_seconds",
            "Time from close_time to successful delivery",
            ["adapter"],
            buckets=CLOSE_TO_DELIVERED_BUCKETS,
            registry=r,
        )
        self.waiting = Gauge(
            "auto_trace_held_partitions",
            "Partitions of a delayed topic paused because their head record is not yet due",
            ["topic"],
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
        self.rebalances = Counter(
            "auto_trace_rebalances_total",
            "Partition assignments and revocations seen by a stage",
            ["stage"],
            registry=r,
        )
        self.produce_errors = Counter(
            "auto_trace_produce_errors_total",
            "Produce requests the broker did not acknowledge (the batch is re-processed)",
            ["stage"],
            registry=r,
        )
