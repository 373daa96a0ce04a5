"""Kafka header names auto-trace writes, in one place (the README's "Headers" table mirrors it).

Values are ASCII text (numbers in decimal) so that any tool (kcat, the console consumer) shows
them readably. Every header here is PII-free by construction: ids, times, counts, class names.
"""

from __future__ import annotations

from collections.abc import Iterable

# Set by ingest on every record of the delay topic; copied through release and retries.
# Ingest once also wrote auto-trace-close-ms and auto-trace-trade-id on every record, which
# every produce() paid for; both values are in the record. Records that still carry them pass
# through unchanged.
DUE_MS = "auto-trace-due-ms"  # close_time + window, epoch ms: never published before this

# Set by the sink engine when a record goes to a retry tier or the DLQ.
TRADE_ID = "auto-trace-trade-id"  # read from the record, so `auto-trace dlq` can filter on it
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
REPLAY_OF = "auto-trace-replay-of"  # <dlq topic>:<partition>:<offset> of the replayed dead letter

#: What producers take and consumers return (confluent-kafka accepts a mapping too).
Headers = list[tuple[str, str | bytes | None]]
RawHeaders = list[tuple[str, str | bytes | None]] | dict[str, str | bytes | None] | None


def _items(headers: RawHeaders) -> list[tuple[str, str | bytes | None]]:
    if not headers:
        return []
    if isinstance(headers, dict):
        return list(headers.items())
    return list(headers)


def get(headers: RawHeaders, name: str) -> str | None:
    """The last value of ``name`` (later headers override earlier ones), decoded."""
    if not headers:
        return None
    found: str | bytes | None = None
    # One forward pass, no copy: release and the sink read a header of every record.
    for key, value in headers.items() if isinstance(headers, dict) else headers:
        if key == name:
            found = value
    if found is None:
        return None
    return found if isinstance(found, str) else found.decode("ascii", "replace")


def get_int(headers: RawHeaders, name: str) -> int | None:
    value = get(headers, name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def get_many(headers: RawHeaders, *names: str) -> list[str | None]:
    """Several headers in one pass, each as :func:`get` would read it (a failed delivery
    reads six of them)."""
    found: dict[str, str | bytes | None] = {}
    if headers:
        for key, value in headers.items() if isinstance(headers, dict) else headers:
            if key in names:
                found[key] = value  # the last one wins, as in get()
    out: list[str | None] = []
    for name in names:
        value = found.get(name)
        if value is None or isinstance(value, str):
            out.append(value)
        else:
            out.append(value.decode("ascii", "replace"))
    return out


def get_ints(headers: RawHeaders, *names: str) -> list[int | None]:
    """Several integer headers in one pass, each as :func:`get_int` would read it.

    The sink reads two or three of them for every record; one :func:`get_int` each copied and
    scanned the header list every time.
    """
    found: dict[str, str | bytes | None] = {}
    if headers:
        for key, value in headers.items() if isinstance(headers, dict) else headers:
            if key in names:
                found[key] = value  # the last one wins, as in get()
    out: list[int | None] = []
    for name in names:
        value = found.get(name)
        if value is None:
            out.append(None)
            continue
        try:
            out.append(int(value))
        except ValueError:
            out.append(None)
    return out


def replace(headers: RawHeaders, updates: Iterable[tuple[str, str | int | bytes]]) -> Headers:
    """A copy of ``headers`` with each update set once (old values of that name dropped).

    Text and numbers are written as ASCII; bytes as they are (a trade id, in UTF-8).
    """
    new: Headers = [
        (k, v if isinstance(v, bytes) else str(v).encode("ascii", "replace")) for k, v in updates
    ]
    names = {k for k, _ in new}
    kept = [(k, v) for k, v in _items(headers) if k not in names]
    return kept + new
