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
from typing import Any

from consumer.records import to_json_bytes
from consumer.tracecodec import decode_trace
from consumer.trade import epoch_ms


class Delivery:
    """One record to deliver, with what a receiver needs to verify and deduplicate it.

    Built from a record (``Delivery(record, ...)``) or, by the sink worker, from the record's
    TraceRecord bytes and its JSON (:meth:`from_trace`): then the record itself is decoded only
    if an adapter asks for it, since the webhook and file adapters need just the JSON, and
    decoding to Decimal and datetime objects was a large part of a delivery's CPU.
    """

    __slots__ = (
        "_body",
        "_close_ms",
        "_record",
        "_trace",
        "attempt",
        "due_ms",
        "idempotency_key",
        "source",
    )

    def __init__(
        self,
        record: dict[str, Any],
        idempotency_key: str,
        attempt: int,
        due_ms: int,
        source: tuple[str, int, int] = ("", 0, 0),
    ) -> None:
        self._record: dict[str, Any] | None = record
        self._trace: bytes | None = None
        self._body: bytes | None = None
        self._close_ms: int | None = None
        #: Stable for this trade and adapter across retries and replays (``webhook-id``).
        self.idempotency_key = idempotency_key
        #: 1 for the first attempt.
        self.attempt = attempt
        #: close_time + window, epoch ms.
        self.due_ms = due_ms
        #: Where the sink worker consumed it: (topic, partition, offset). Files are named by it.
        self.source = source

    @classmethod
    def from_trace(
        cls,
        trace: bytes,
        body: bytes,
        close_ms: int,
        idempotency_key: str,
        attempt: int,
        due_ms: int,
        source: tuple[str, int, int] = ("", 0, 0),
    ) -> Delivery:
        """``trace``: valid TraceRecord bytes; ``body`` and ``close_ms``: their JSON and close
        time, as :func:`consumer.tracecodec.transcode_trace` gives them."""
        delivery = cls({}, idempotency_key, attempt, due_ms, source)
        delivery._record, delivery._trace, delivery._body = None, trace, body
        delivery._close_ms = close_ms
        return delivery

    @property
    def record(self) -> dict[str, Any]:
        """The TraceRecord (Decimal, datetime and str values): PII-free by schema."""
        if self._record is None:
            assert self._trace is not None
            self._record = decode_trace(self._trace)
        return self._record

    @property
    def close_ms(self) -> int:
        """The trade's close time, epoch ms."""
        if self._close_ms is None:
            self._close_ms = epoch_ms(self.record["close_time"])
        return self._close_ms

    def json_body(self) -> bytes:
        """The record as receivers get it (``to_json_bytes``): the webhook body, a file line."""
        if self._body is None:
            self._body = to_json_bytes(self.record)
        return self._body

    def with_attempt(self, attempt: int) -> Delivery:
        """The same delivery counted as attempt ``attempt``."""
        copy = Delivery.__new__(Delivery)
        for name in Delivery.__slots__:
            setattr(copy, name, getattr(self, name))
        copy.attempt = attempt
        return copy

    def __repr__(self) -> str:
        return (
            f"Delivery(idempotency_key={self.idempotency_key!r}, attempt={self.attempt}, "
            f"due_ms={self.due_ms}, source={self.source!r})"
        )


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

    def connections_opened(self) -> int | None:
        """Connections its HTTP client has opened so far, if it counts them (a metric)."""
        return None


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
