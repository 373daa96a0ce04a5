"""The retry policy, in one function: where a failed delivery goes next.

    retriable, tiers left   → the next tier; due = failure time + that tier's delay
    retriable + retry_after → the first tier (from the next one on) at least that long, or the
                              last tier; due = failure time + max(tier delay, retry_after)
    retriable, no tier left → the DLQ
    fatal                   → the DLQ

Jumping to a tier at least as long as ``retry_after`` keeps due times within each tier in
order, so no record holds back a partition for longer than its tier (head-of-line blocking,
DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from consumer.errors import DeliveryError


@dataclass(frozen=True, slots=True)
class Retry:
    tier: int
    due_ms: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str


Step = Retry | DeadLetter


def next_step(
    error: DeliveryError, current_tier: int | None, tiers: list[timedelta], failed_at_ms: int
) -> Step:
    """``current_tier`` is None for the sink topic, else the index of the tier just consumed."""
    if not error.retriable:
        return DeadLetter("fatal")
    first = 0 if current_tier is None else current_tier + 1
    if first >= len(tiers):
        return DeadLetter("retries exhausted")
    tier = first
    wait_s = tiers[tier].total_seconds()
    if error.retry_after is not None and error.retry_after > wait_s:
        tier = next(
            (i for i in range(first, len(tiers)) if tiers[i].total_seconds() >= error.retry_after),
            len(tiers) - 1,
        )
        wait_s = max(tiers[tier].total_seconds(), error.retry_after)
    return Retry(tier, failed_at_ms + int(wait_s * 1000))
