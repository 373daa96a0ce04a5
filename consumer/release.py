"""Release: holds records in the delay topic until ``close_time + window``, then fans each out,
same key and same bytes, to the sink topic of every enabled adapter.

The record's offset is stored only after every sink topic acknowledged it (and every record
before it in its partition): the next poll does not wait for those acknowledgements
(:class:`~consumer.stage.Pipeline`). The body is never decoded here: the due time is a header
written by ingest.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from confluent_kafka import Producer
from prometheus_client import Histogram

from consumer import headers as h
from consumer.clients import make_release_producer
from consumer.config import Settings
from consumer.delayed import DelayedConsumer, Run, now_ms
from consumer.errors import ConfigError
from consumer.health import Health
from consumer.log import get_logger
from consumer.metrics import Metrics
from consumer.stage import PIPELINE_PRODUCER_SETTINGS, LoopStage, Pipeline
from consumer.topics import delay_topic, sink_topic

log = get_logger("release")


def due_ms(headers: h.RawHeaders) -> int:
    """A record without a readable due header is released at once: it cannot be held forever,
    and everything ingest writes has one.

    Reads as :func:`consumer.headers.get_int` does (the last value wins; ``int()`` takes the
    ASCII bytes as they are), in one frame: it runs for every record release examines.
    """
    if not headers:
        return 0
    found: str | bytes | None = None
    for key, value in headers.items() if isinstance(headers, dict) else headers:
        if key == _DUE_MS:
            found = value
    if not found:
        return 0
    try:
        return int(found)
    except ValueError:
        return 0


_DUE_MS = h.DUE_MS


class Lateness:
    """Observes a batch's lateness into one child of the lateness histogram at once.

    The same buckets, count and sum as an ``observe()`` per record (the sum to float rounding:
    it adds whole milliseconds, then divides once), for a fraction of the cost: ``observe()``
    takes a lock twice and walks the bucket list in Python, 12% of release's CPU per record. It
    reads prometheus_client's histogram internals; a version without them gets ``observe()``
    per record (:attr:`bulk` is then False).
    """

    def __init__(self, child: Histogram) -> None:
        self._child = child
        bounds = getattr(child, "_upper_bounds", None)
        buckets = getattr(child, "_buckets", None)
        total = getattr(child, "_sum", None)
        self.bulk = (
            isinstance(bounds, list)
            and isinstance(buckets, list)
            and len(bounds) == len(buckets)
            and all(hasattr(b, "inc") for b in [*buckets, total])
        )
        self._bounds: list[float] = list(bounds) if self.bulk else []  # type: ignore[arg-type]
        self._buckets: list[Any] = buckets if self.bulk else []  # type: ignore[assignment]
        self._sum: Any = total

    def observe(self, now: int, dues: list[int]) -> None:
        """Lateness ``now - due`` (ms, at least 0) of each record, in seconds."""
        if not self.bulk:
            for due in dues:
                self._child.observe(max(0, now - due) / 1000.0)
            return
        bounds = self._bounds
        counts = [0] * len(bounds)
        total = 0
        for due in dues:
            late = now - due
            if late < 0:
                late = 0
            # observe() counts a value in the first bucket whose bound is >= it.
            counts[bisect_left(bounds, late / 1000.0)] += 1
            total += late
        self._sum.inc(total / 1000.0)
        for bucket, count in zip(self._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


class ReleaseStage(LoopStage):
    name = "release"

    def __init__(
        self, settings: Settings, metrics: Metrics, health: Health, *, batch_size: int = 1000
    ) -> None:
        super().__init__(settings, metrics, health)
        self.group = settings.delay.group
        self.delayed = True
        self.batch_size = batch_size
        self.sinks = [sink_topic(settings, a.name) for a in settings.enabled_adapters()]
        if not self.sinks:
            raise ConfigError("adapters: release needs at least one enabled adapter")
        self.topic = delay_topic(settings)
        self._held_gauge = metrics.held_partitions.labels(self.topic)
        self._lateness = Lateness(metrics.lateness.labels(self.name, ""))
        metrics.init_stage(self.name, self.sinks)
        metrics.delay_window.set(settings.delay.window.total_seconds())

    def due_of(self, headers: h.RawHeaders) -> int:
        return due_ms(headers)

    def _started(self) -> dict[str, Any]:
        return {"topic": self.topic, "sinks": self.sinks}

    def _turned(self, consumer: DelayedConsumer) -> None:
        self._held_gauge.set(len(consumer.held()))

    def _make_producer(self) -> Producer:
        return make_release_producer(self.settings, **PIPELINE_PRODUCER_SETTINGS)

    def _handle(self, consumer: DelayedConsumer, out: Pipeline, runs: list[Run]) -> None:
        """Per record only the copy: one ``produce()`` per sink topic, with the run of records
        of its partition as the callback (:class:`~consumer.stage.InFlight`). Due times come
        with the runs: the consumer read them to decide what is due."""
        now = now_ms()
        sinks = self.sinks
        produce, positional = out.producer.produce, out.positional
        count = 0
        for tp, messages, dues, read in runs:
            run = out.open(tp)
            # The headers the consumer read the due times from (always, for release).
            assert read is not None and dues is not None
            for msg, headers in zip(messages, read, strict=True):
                key, value = msg.key(), msg.value()
                for topic in sinks:
                    try:
                        if positional:
                            produce(topic, value, key, -1, run, None, 0, headers)
                        else:
                            produce(topic, value, key, headers=headers, on_delivery=run)
                    except BufferError:
                        out.produce(topic, value, key, headers, run)
            n = len(messages)
            first, last = messages[0].offset(), messages[-1].offset()
            assert first is not None and last is not None
            out.close(run, first, last, n, dict.fromkeys(sinks, n))
            self._lateness.observe(now, dues)
            count += n
        self.metrics.records_in.labels(self.name).inc(count)
        # Served at once: acknowledgements that already arrived store their offsets now.
        out.settle()
