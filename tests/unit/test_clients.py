"""The client settings each stage chooses for itself, and that a user's ``kafka.client`` value
wins over them while the guarantee-critical ones win over the user (README "Configuration");
and the check that lets hot loops call ``produce()`` with positional arguments."""

from __future__ import annotations

from typing import Any

import pytest

from consumer import clients
from consumer.clients import (
    DELAYED_DEFAULTS,
    FETCH_QUEUE_BACKOFF_MS,
    RELEASE_PRODUCER_DEFAULTS,
    consumer_config,
    release_producer_config,
    stage_consumer_config,
)
from consumer.config import Settings, load_settings


def _settings(client: dict[str, str | int | float | bool]) -> Settings:
    settings = load_settings()
    return settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"client": client})}
    )


def test_delayed_consumers_get_the_small_prefetch_and_others_librdkafkas_defaults() -> None:
    settings = _settings({})
    delayed = stage_consumer_config(settings, "g", delayed=True)
    for key, value in DELAYED_DEFAULTS.items():
        assert delayed[key] == value, key
    plain = stage_consumer_config(settings, "g", delayed=False)
    assert not set(DELAYED_DEFAULTS) & set(plain)


def test_a_users_client_value_wins_over_a_stage_default_but_not_over_a_guarantee() -> None:
    settings = _settings(
        {"max.partition.fetch.bytes": 1_048_576, "linger.ms": 50, "enable.auto.offset.store": True}
    )
    consumer = stage_consumer_config(settings, "g", delayed=True)
    assert consumer["max.partition.fetch.bytes"] == 1_048_576
    assert consumer["fetch.wait.max.ms"] == DELAYED_DEFAULTS["fetch.wait.max.ms"]
    assert consumer["enable.auto.offset.store"] is False
    assert release_producer_config(settings)["linger.ms"] == 50


def test_release_lingers_by_its_own_default_unless_told_otherwise() -> None:
    settings = _settings({})
    assert release_producer_config(settings)["linger.ms"] == RELEASE_PRODUCER_DEFAULTS["linger.ms"]
    assert release_producer_config(settings, **{"linger.ms": 0})["linger.ms"] == 0


def test_every_consumer_fetches_again_soon_after_its_queue_was_full_unless_told_otherwise() -> None:
    # librdkafka's 1 s pause left a fast consumer idle for most of each second (make bench R1).
    settings = _settings({})
    for conf in (
        consumer_config(settings, "g"),
        stage_consumer_config(settings, "g", delayed=False),
        stage_consumer_config(settings, "g", delayed=True),
    ):
        assert conf["fetch.queue.backoff.ms"] == FETCH_QUEUE_BACKOFF_MS
    assert FETCH_QUEUE_BACKOFF_MS < 1000
    mine = consumer_config(_settings({"fetch.queue.backoff.ms": 500}), "g")
    assert mine["fetch.queue.backoff.ms"] == 500


def test_the_hot_loops_positional_produce_passes_its_check() -> None:
    # If a confluent-kafka release moved produce()'s parameters, the stages would quietly fall
    # back to keywords: this makes the upgrade visible here instead.
    assert clients.positional_produce() is True


@pytest.mark.parametrize(
    ("name", "arguments", "wrong"),
    [
        ("the hot loops' order", clients._positional, False),
        (
            "keywords",
            lambda cb: (clients._CHECK_TOPIC, clients._CHECK_VALUE, clients._CHECK_KEY),
            True,  # no callback, no headers
        ),
        (
            "the documented order (headers where the timestamp goes)",
            lambda cb: (
                clients._CHECK_TOPIC,
                clients._CHECK_VALUE,
                clients._CHECK_KEY,
                -1,
                cb,
                0,
                clients._CHECK_HEADERS,
            ),
            True,
        ),
        (
            "key and value swapped",
            lambda cb: (
                clients._CHECK_TOPIC,
                clients._CHECK_KEY,
                clients._CHECK_VALUE,
                -1,
                cb,
                None,
                0,
                clients._CHECK_HEADERS,
            ),
            True,
        ),
        (
            "no headers",
            lambda cb: (clients._CHECK_TOPIC, clients._CHECK_VALUE, clients._CHECK_KEY, -1, cb),
            True,
        ),
    ],
)
def test_the_produce_round_trip_tells_a_wrong_call_from_a_right_one(
    name: str, arguments: Any, wrong: bool
) -> None:
    why = clients.produce_round_trip(arguments)
    assert bool(why) == wrong, (name, why)


def test_a_failed_check_means_keywords_and_a_warning_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(clients, "produce_round_trip", lambda arguments: "read back: nothing")
    with caplog.at_level("WARNING"):
        assert clients.positional_produce.__wrapped__() is False
    (record,) = [r for r in caplog.records if "positional" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert "read back: nothing" in str(getattr(record, "fields", {}))
