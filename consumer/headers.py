"""Kafka header names auto-trace writes, in one place (the README's "Headers" table mirrors it).

Values are ASCII text (numbers in decimal) so that any tool (kcat, the console consumer) shows
them readably. Every header here is PII-free by construction: ids, times, counts, class names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# Set by ingest on every record of the delay topic; copied through release and retries.
DUE_MS = "auto-trace-due-ms"  # close_time + window, epoch ms: never published before this
CLOSE_MS = "auto-trace-close-ms"  # close_time, epoch ms
TRADE_ID = "auto-trace-trade-id"

# Set by the sink engine when a record goes to a retry tier or the DLQ.
ATTEMPTS = "auto-trace-attempts"  # failed delivery attempts so far
RETRY_DUE_MS = "auto-trace-retry-due-ms"  # not retried before this, epoch ms
FIRST_FAILURE_MS = "auto-trace-first-failure-ms"
LAST_FAILURE_MS = "auto-trace-last-failure-ms"
ADAPTER = "auto-trace-adapter"
ERROR_CLASS = "auto-trace-error-class"
ERROR_MESSAGE = "auto-trace-error-message"  # scrubbed: no secrets, no bodies, no values
ORIGIN_TOPIC = "auto-trace-origin-topic"  # where the record was first consumed by the sink
ORIGIN_PARTITION = "auto-trace-origin-partition"
ORIGIN_OFFSET = "auto-trace-origin-offset"
SOURCE_GROUP = "auto-trace-source-group"

# Set by ingest on dead letters of the ingest DLQ (which keeps the raw input and its headers).
SOURCE_TOPIC = "auto-trace-source-topic"
SOURCE_PARTITION = "auto-trace-source-partition"
SOURCE_OFFSET = "auto-trace-source-offset"
FAILED_AT_MS = "auto-trace-failed-at-ms"
REASON = "auto-trace-reason"  # which field / rule failed; never a value

# Set by `auto-trace dlq replay`.
REPLAY_ID = "auto-trace-replay-id"
REPLAY_MS = "auto-trace-replay-ms"

Headers = list[tuple[str, bytes]]


def get(headers: Sequence[tuple[str, bytes | None]] | None, name: str) -> str | None:
    """The last value of ``name`` (later headers override earlier ones), decoded."""
    if not headers:
        return None
    for key, value in reversed(headers):
        if key == name:
            return None if value is None else value.decode("ascii", "replace")
    return None


def get_int(headers: Sequence[tuple[str, bytes | None]] | None, name: str) -> int | None:
    value = get(headers, name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def replace(
    headers: Sequence[tuple[str, bytes | None]] | None, updates: Iterable[tuple[str, str | int]]
) -> Headers:
    """A copy of ``headers`` with each update set once (old values of that name dropped)."""
    new = [(k, str(v).encode("ascii")) for k, v in updates]
    names = {k for k, _ in new}
    kept = [(k, v if v is not None else b"") for k, v in headers or () if k not in names]
    return kept + new
