from __future__ import annotations

from datetime import timedelta

from consumer.errors import FatalDeliveryError, RetriableDeliveryError
from consumer.policy import DeadLetter, Retry, next_step

TIERS = [timedelta(seconds=s) for s in (5, 30, 300, 1800, 3600)]
NOW = 1_000_000


def test_a_retriable_failure_walks_the_tiers_in_order_then_dead_letters() -> None:
    error = RetriableDeliveryError("HTTP 503")
    steps = [next_step(error, tier, TIERS, NOW) for tier in (None, 0, 1, 2, 3, 4)]
    assert steps[:5] == [Retry(i, NOW + int(t.total_seconds() * 1000)) for i, t in enumerate(TIERS)]
    assert steps[5] == DeadLetter("retries exhausted")


def test_a_fatal_failure_goes_straight_to_the_dlq() -> None:
    assert next_step(FatalDeliveryError("HTTP 400"), None, TIERS, NOW) == DeadLetter("fatal")


def test_retry_after_longer_than_the_tier_picks_the_first_tier_at_least_that_long() -> None:
    step = next_step(RetriableDeliveryError("429", retry_after=60), None, TIERS, NOW)
    assert step == Retry(2, NOW + 300_000)  # 5m is the first tier >= 60s, and due keeps its order


def test_retry_after_shorter_than_the_tier_keeps_the_tier() -> None:
    assert next_step(RetriableDeliveryError("429", retry_after=2), 0, TIERS, NOW) == Retry(
        1, NOW + 30_000
    )


def test_retry_after_beyond_every_tier_uses_the_last_tier_and_is_never_sooner() -> None:
    step = next_step(RetriableDeliveryError("429", retry_after=7200), None, TIERS, NOW)
    assert step == Retry(4, NOW + 7_200_000)
