"""The tracker adapter through the real pipeline: sessions that expire, rate limits, and
credentials refused for a while — which must pause the adapter, not fill the DLQ."""

from __future__ import annotations

import pytest

from consumer.metrics import Metrics
from consumer.samples import PERSONAL_FIELDS, to_json
from consumer.topics import dlq_topic
from consumer.tracker_server import TrackerServer
from tests.integration.test_delivery import _stages, _trades
from tests.support import create_topics, make_settings, produce, reader, running

pytestmark = pytest.mark.integration

EMAIL, PASSWORD = "ops@platform.example", "correct horse battery staple"


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_TRACKER_EMAIL", EMAIL)
    monkeypatch.setenv("TEST_TRACKER_PASSWORD", PASSWORD)


def _tracker(base_url: str, **extra: object) -> dict[str, object]:
    return {
        "name": "fxbook",
        "type": "tracker",
        "base_url": base_url,
        "email": {"env": "TEST_TRACKER_EMAIL"},
        "password": {"env": "TEST_TRACKER_PASSWORD"},
        "timeout": "3s",
        **extra,
    }


def test_trades_reach_the_tracker_through_expiring_sessions_and_rate_limits(
    bootstrap_servers: str,
) -> None:
    with TrackerServer(EMAIL, PASSWORD, session_ttl=0.5) as tracker:
        settings = make_settings(
            bootstrap_servers,
            adapters=[_tracker(tracker.base_url)],
            retry={"tiers": ["300ms", "1s"]},
        )
        create_topics(settings)
        tracker.limit_next(3, retry_after=1)
        trades = _trades(80, seed=81)
        with running(*_stages(settings)):
            produce(bootstrap_servers, settings.input.topic, [(None, to_json(t)) for t in trades])
            assert tracker.wait_for(len(trades), timeout=60)
    stored = tracker.trades
    assert {t.payload["ticket"] for t in stored} == {t["trade_id"] for t in trades}
    assert tracker.counts.logins >= 1 and tracker.counts.rate_limited >= 3
    personal = [str(t[f]) for t in trades for f in PERSONAL_FIELDS if t.get(f)]
    bodies = repr([t.payload for t in stored])
    assert not [p for p in personal if p in bodies]


def test_refused_credentials_pause_the_adapter_and_cause_no_dead_letter(
    bootstrap_servers: str,
) -> None:
    circuit = {"failure_threshold": 3, "probe_interval": "300ms", "max_probe_interval": "1s"}
    with TrackerServer(EMAIL, PASSWORD) as tracker:
        settings = make_settings(
            bootstrap_servers,
            adapters=[_tracker(tracker.base_url, circuit=circuit)],
            retry={"tiers": ["200ms", "400ms"]},
        )
        create_topics(settings)
        tracker.fail_next(6, 401, endpoint="login")  # the tracker refuses us for a while
        metrics = Metrics()
        state = metrics.circuit_state.labels("fxbook")
        trades = _trades(30, seed=83)
        with running(*_stages(settings, metrics)):
            produce(bootstrap_servers, settings.input.topic, [(None, to_json(t)) for t in trades])
            assert tracker.wait_for(len(trades), timeout=60)
            with reader(bootstrap_servers, dlq_topic(settings)) as dlq:
                dead = dlq.drain(quiet=1.5)
        assert state._value.get() == 0  # closed again
    assert dead == []
    assert metrics.deliveries.labels("fxbook", "adapter_down")._value.get() >= 1
