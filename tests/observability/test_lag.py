"""Waiting vs overdue against the real broker: records held on purpose are waiting, never
overdue; records stuck behind an open circuit are overdue (or in flight), never waiting."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from consumer.health import Health
from consumer.ingest import IngestStage
from consumer.lag import LagMonitor
from consumer.metrics import Metrics
from consumer.receiver import WebhookReceiver, always
from consumer.release import ReleaseStage
from consumer.samples import sample_trade, to_json
from consumer.sink import SinkWorker
from consumer.topics import delay_topic, retry_topics, sink_topic
from tests.support import WEBHOOK_SECRET, create_topics, make_settings, produce, running, webhook

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTO_TRACE_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET)


def _value(gauge: Any, *labels: str) -> float:
    return float(gauge.labels(*labels)._value.get())


def _refresh_until(
    monitor: LagMonitor, condition: Callable[[], bool], what: str, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        monitor.refresh()
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)  # poll interval; the deadline bounds the wait


def _trades(n: int) -> list[tuple[bytes | None, bytes | None]]:
    now = int(time.time() * 1000)
    return [(None, to_json(sample_trade(i, seed=83, close_time_ms=now))) for i in range(n)]


def test_records_not_yet_due_are_waiting_and_never_overdue(bootstrap_servers: str) -> None:
    settings = make_settings(
        bootstrap_servers,
        delay={"window": "60s"},
        adapters=[webhook("hook", "http://127.0.0.1:9/")],
    )
    create_topics(settings)
    metrics, health = Metrics(), Health()
    monitor = LagMonitor(settings, metrics)
    topic = delay_topic(settings)
    produce(bootstrap_servers, settings.input.topic, _trades(12))
    with running(IngestStage(settings, metrics, health), ReleaseStage(settings, metrics, health)):
        _refresh_until(
            monitor,
            lambda: _value(metrics.waiting, "release", topic) == 12,
            "12 records waiting on the delay topic",
        )
        assert _value(metrics.overdue, "release", topic) == 0
        assert _value(metrics.consumer_lag, "release", settings.delay.group, topic) == 12
        assert _value(metrics.held_partitions, topic) >= 1
        # Ingest is done with its input: nothing waiting, overdue or behind there.
        _refresh_until(
            monitor,
            lambda: (
                _value(metrics.consumer_lag, "ingest", settings.input.group, settings.input.topic)
                == 0
            ),
            "ingest to commit its input",
        )
        assert _value(metrics.overdue, "ingest", settings.input.topic) == 0
        assert _value(metrics.waiting, "ingest", settings.input.topic) == 0
    # Stopped stages are no longer reported.
    monitor.refresh()
    assert metrics.watched_consumers() == []
    lag_lines = [
        line
        for line in _exposition(metrics).splitlines()
        if line.startswith(("auto_trace_records_waiting{", "auto_trace_records_overdue{"))
        or line.startswith(("auto_trace_consumer_lag_records{", "auto_trace_held_partitions{"))
    ]
    assert lag_lines == []


def test_records_behind_an_open_circuit_are_overdue_or_in_flight_never_waiting(
    bootstrap_servers: str,
) -> None:
    with WebhookReceiver(WEBHOOK_SECRET, fail=always(503)) as down:
        settings = make_settings(
            bootstrap_servers,
            adapters=[
                webhook(
                    "hook",
                    down.url,
                    circuit={"failure_threshold": 1, "probe_interval": "60s"},
                )
            ],
            sink={"max_in_flight": 3},
        )
        create_topics(settings)
        metrics, health = Metrics(), Health()
        monitor = LagMonitor(settings, metrics)
        stage = "sink:hook"
        topic = sink_topic(settings, "hook")
        produce(bootstrap_servers, settings.input.topic, _trades(10))
        with running(
            IngestStage(settings, metrics, health),
            ReleaseStage(settings, metrics, health),
            SinkWorker(settings, settings.adapter("hook"), metrics, health),
        ):

            def stuck() -> bool:
                in_flight = _value(metrics.in_flight, "hook")
                return (
                    _value(metrics.circuit_state, "hook") == 2
                    and in_flight > 0
                    and _value(metrics.overdue, stage, topic) + in_flight == 10
                )

            _refresh_until(monitor, stuck, "the circuit to open with 10 records stuck")
            assert _value(metrics.overdue, stage, topic) >= 7  # at most 3 in flight
            assert _value(metrics.waiting, stage, topic) == 0
            assert (
                _value(metrics.consumer_lag, stage, settings.topics.prefix + "-sink-hook", topic)
                == 10
            )
            for tier in retry_topics(settings, "hook"):
                assert _value(metrics.waiting, stage, tier) == 0
                assert _value(metrics.overdue, stage, tier) == 0


def _exposition(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()
