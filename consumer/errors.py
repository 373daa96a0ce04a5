"""Every error auto-trace raises on purpose, classified once, where it enters.

    AutoTraceError
    ├── ConfigError                 a setting is missing or wrong; the program exits 2 at start-up
    ├── InputError                  an input record cannot become a TraceRecord (→ ingest DLQ)
    │   ├── DecodeError             the bytes are not a record in the configured format
    │   └── InvalidRecord           the record decodes but breaks the trade.closed contract
    └── DeliveryError               an adapter could not deliver a record (→ retry tier or DLQ)
        ├── RetriableDeliveryError  may work later (timeouts, 5xx, 429, ...); carries retry_after
        │   └── AdapterUnavailable  the whole adapter is down (credentials rejected, ...): the
        │                           engine pauses the adapter instead of retrying the record
        └── FatalDeliveryError      will never work for this record (4xx about the record, ...)

Adapters raise a ``DeliveryError`` subclass and nothing else: foreign exceptions (httpx, boto3,
OS errors) are translated inside the adapter with ``raise ... from exc``. The engine reads only
``retriable`` and ``retry_after``; the retry policy lives in :mod:`consumer.policy`.

Messages of these errors end up in dead-letter headers and logs, so they must never quote a
field value, a response body, or a secret: say which field and what kind of problem.
"""

from __future__ import annotations

from typing import ClassVar


class AutoTraceError(Exception):
    """Base of every error auto-trace raises on purpose."""


class ConfigError(AutoTraceError):
    """A setting is missing or wrong; raised before any stage starts."""


class InputError(AutoTraceError):
    """An input record cannot be turned into a TraceRecord."""

    #: Short, bounded name used as the DLQ ``reason class`` header and the metric label.
    reason_class: ClassVar[str] = "input"


class DecodeError(InputError):
    """The bytes are not a record in the configured input format."""

    reason_class = "decode"


class InvalidRecord(InputError):
    """The record decodes but breaks the trade.closed contract."""

    reason_class = "invalid"


class DeliveryError(AutoTraceError):
    """An adapter could not deliver one record."""

    retriable: ClassVar[bool] = False

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        #: Seconds the receiver asked us to wait (``Retry-After``); never retry sooner.
        self.retry_after = retry_after


class RetriableDeliveryError(DeliveryError):
    """The delivery may succeed later: walk the retry tiers."""

    retriable = True


class AdapterUnavailable(RetriableDeliveryError):
    """Every delivery through this adapter would fail now; no record is to blame."""


class FatalDeliveryError(DeliveryError):
    """The delivery will never succeed for this record: dead-letter it at once."""

    retriable = False
