"""The one extension point: an adapter delivers a record, or raises a classified error.

An adapter never sleeps, never retries by itself and never touches Kafka. It raises
:class:`~consumer.errors.RetriableDeliveryError` (optionally with ``retry_after``) or
:class:`~consumer.errors.FatalDeliveryError`; the sink engine decides what happens next
(:func:`consumer.policy.next_step`). Anything else it raises is treated as a bug in the adapter
and classified as retriable, so a surprise never loses a record.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Delivery:
    """One record to deliver, with what a receiver needs to verify and deduplicate it."""

    #: The decoded TraceRecord (Decimal, datetime and str values): PII-free by schema.
    record: dict[str, Any]
    #: Stable for this trade and adapter across retries and replays (``webhook-id``).
    idempotency_key: str
    #: 1 for the first attempt.
    attempt: int
    #: close_time + window, epoch ms.
    due_ms: int


class Adapter(abc.ABC):
    """Base of every adapter. Subclasses implement :meth:`deliver`, and :meth:`close` if they
    hold resources (connections, sessions)."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections or sessions before the first delivery."""

    @abc.abstractmethod
    async def deliver(self, delivery: Delivery) -> None:
        """Deliver one record, or raise a :class:`~consumer.errors.DeliveryError`."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (log out, close pools); called once on shutdown."""
