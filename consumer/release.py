"""Release: holds records in the delay topic until ``close_time + window``, then fans each out,
same key and same bytes, to the sink topic of every enabled adapter.

The record's offset is stored only after every sink topic acknowledged it (and every record
before it in its partition): the next poll does not wait for those acknowledgements
(:class:`~consumer.stage.Pipeline`). The body is never decoded here: the due time is a header
written by ingest.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import Message, Producer

from consumer import headers as h
from consumer.clients import make_release_producer
from consumer.config import Settings
from consumer.delayed import DelayedConsumer, now_ms
from consumer.errors import ConfigError
from consumer.health import Health
from consumer.log import get_logger
from consumer.metrics import Metrics
from consumer.stage import PIPELINE_PRODUCER_SETTINGS, LoopStage, Pipeline
from consumer.topics import delay_topic, sink_topic

log = get_logger("release")


def due_ms(msg: Message) -> int:
    """A record without a readable due header is released at once: it cannot be held forever,
    and everything ingest writes has one."""
    return h.get_int(msg.headers(), h.DUE_MS) or 0


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
        metrics.init_stage(self.name, self.sinks)
        metrics.delay_window.set(settings.delay.window.total_seconds())

    def due_of(self, msg: Message) -> int:
        return due_ms(msg)

    def _started(self) -> dict[str, Any]:
        return {"topic": self.topic, "sinks": self.sinks}

    def _turned(self, consumer: DelayedConsumer) -> None:
        self._held_gauge.set(len(consumer.held()))

    def _make_producer(self) -> Producer:
        return make_release_producer(self.settings, **PIPELINE_PRODUCER_SETTINGS)

    def _handle(self, consumer: DelayedConsumer, out: Pipeline, messages: list[Message]) -> None:
        self.metrics.records_in.labels(self.name).inc(len(messages))
        now = now_ms()
        lateness = self.metrics.lateness.labels(self.name, "")
        send = out.send
        for msg in messages:
            key, value, headers = msg.key(), msg.value(), msg.headers()
            send(msg, [(topic, value, key, headers) for topic in self.sinks])
            lateness.observe(max(0, now - due_ms(msg)) / 1000.0)
        # Served at once: acknowledgements that already arrived store their offsets now.
        out.settle()
