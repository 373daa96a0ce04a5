"""The one extension point: an adapter delivers a record, or raises a classified error.

An adapter never sleeps, never retries by itself and never touches Kafka. It raises
:class:`~consumer.errors.RetriableDeliveryError` (optionally with ``retry_after``) or
:class:`~consumer.errors.FatalDeliveryError`; the sink engine decides what happens next
(:func:`consumer.policy.next_step`). Anything else it raises is treated as a bug in the adapter
and classified as retriable, so a surprise never loses a record.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable
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
    #: Where the sink worker consumed it: (topic, partition, offset). Files are named by it.
    source: tuple[str, int, int] = ("", 0, 0)


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


class BatchAdapter(Adapter):
    """An adapter that makes records durable in batches (the file adapter).

    The engine calls :meth:`append` synchronously, in the order each partition was consumed,
    and stores a record's offset only once the awaitable it got back has completed (the batch
    holding it is durable). Batch boundaries must depend only on the records (counts, bytes),
    so that a replay after a crash rebuilds the same batches: that is what makes the output
    exactly-once. The engine applies no concurrency limit, per-call timeout or in-flight cap to
    a batch adapter: its memory is bounded by its own rotation size per partition.
    """

    @abc.abstractmethod
    def append(self, delivery: Delivery) -> Awaitable[None]:
        """Add a record to its batch; the awaitable completes when the batch is durable, or
        raises a :class:`~consumer.errors.DeliveryError` when writing it failed."""

    async def deliver(self, delivery: Delivery) -> None:
        await self.append(delivery)

    @abc.abstractmethod
    async def flush(self, partitions: list[tuple[str, int]]) -> None:
        """Make the open batches of these (topic, partition)s durable now: the engine is about
        to lose them (rebalance) or stop. Safe for exactly-once: a batch always starts at a
        committed offset and is named by it, so a replay rewrites the same objects."""
