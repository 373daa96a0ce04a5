"""``auto-trace dlq``: see what failed for good, why, and send exactly those records again.

    auto-trace dlq list     dead letters, one line each (never a record body)
    auto-trace dlq stats    counts by adapter and error class
    auto-trace dlq show     one dead letter in full: headers and the decoded PII-free record
    auto-trace dlq replay   send the matching records back to their adapter's sink topic
    auto-trace dlq history  the audit trail of replays: who, when, which filter, how many

Why it is built this way:

- **Snapshots, streamed.** Every command reads the DLQ by assigning its partitions and reading
  up to the high watermarks taken when it started, a batch at a time: a DLQ of any size costs
  one batch of memory, and records dead-lettered while a command runs (perhaps by the replay
  itself) are not part of what it reads. Reading commands use a consumer group that never
  commits, so they change nothing.
- **A replay is a Kafka transaction loop.** Records go to the sink topics and the replay's DLQ
  position is committed to its own consumer group (``<prefix>-dlq-replay-<id>``) in one
  transaction (``transactional.id`` = that group). The sink workers read with
  ``isolation.level=read_committed`` (librdkafka's default), so a record of a batch that did
  not commit is never delivered: a replay killed at any instant and re-run with the same
  ``--replay-id`` sends the rest and nothing twice. Starting the same id again also fences a
  process still running it (its next commit fails), so two copies can never both send.
- **The id is the replay.** The first run of an id records its filter and the DLQ high
  watermarks in the audit topic (``<prefix>.dlq.audit``); later runs replay only up to those
  watermarks and must repeat the same filter (exit 2 otherwise), and a finished replay does
  nothing. The "finished" audit record is written in the same transaction as the last offsets.
  Per-partition counts ride in the committed offsets' metadata, so totals survive restarts.
- **Pacing, not flooding.** ``--rate`` is a token bucket on the monotonic clock; a transaction
  is committed at least every :data:`COMMIT_INTERVAL_S`, so what the sink workers see is spread
  out as well.

Replayed records keep their key, value and headers, minus the failure headers (attempt count,
retry due time, error, failure times), plus ``auto-trace-replay-id``, ``-replay-ms`` and
``-replay-of``. Their ``Idempotency-Key`` is the one the original deliveries carried: the sink
worker derives it from trade id and adapter.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any, TextIO

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from consumer import headers as h
from consumer.clients import producer_config
from consumer.config import Settings, check_secrets, parse_duration, read_settings
from consumer.errors import AutoTraceError, ConfigError
from consumer.records import decode_trace, render_time, to_json_dict
from consumer.topics import dlq_topic, sink_topic

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
#: A replay stopped by Ctrl-C or SIGTERM after committing its current batch (128 + SIGINT).
EXIT_INTERRUPTED = 130

#: Longest a replay transaction stays open while records keep flowing. Short, because the sink
#: workers see a batch only once it commits: this bounds the bursts they see under ``--rate``.
COMMIT_INTERVAL_S = 0.25
#: Most records in one replay transaction.
MAX_BATCH = 500
#: The broker aborts a replay transaction left open this long (a SIGKILLed replay that is not
#: resumed). Until then the sink topics it wrote to are blocked for read_committed readers, so
#: keep it short; a transaction here lives for COMMIT_INTERVAL_S plus one commit.
TRANSACTION_TIMEOUT_MS = 15_000
#: A read that makes no progress for this long fails instead of hanging.
STALL_TIMEOUT_S = 30.0
#: Per-call timeout for broker requests (metadata, watermarks, commits).
REQUEST_TIMEOUT_S = 15.0

_REPLAY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|m|h))?\s*$")
_RELATIVE = re.compile(r"^\s*\d+(?:\.\d+)?\s*(ms|s|m|h|d)\s*$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}
#: Errors of a partition whose leader is moving or not elected yet (a topic just created):
#: librdkafka refreshes its metadata by itself, so asking again shortly works.
_LEADER_MOVING = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
    }
)


class DlqUsageError(AutoTraceError):
    """An argument that cannot work (unknown adapter, changed filter, no such position): exit 2."""


class DlqError(AutoTraceError):
    """A replay or read that could not complete (broker, fencing, aborted batch): exit 1."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _iso(ms: int | None, *, millis: bool = True) -> str:
    if ms is None:
        return "-"
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return render_time(moment) if millis else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- arguments --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimeArg:
    """A ``--since``/``--until`` value: as spelled (what a resumed replay compares) and resolved."""

    spelled: str
    ms: int


def parse_time(text: str, now: int | None = None) -> TimeArg:
    """``2h`` (that long ago), ``2026-11-26`` (UTC midnight), RFC 3339 with an offset, or epoch ms.

    A timestamp without an offset is refused rather than guessed: on an operator's laptop and a
    server "10:00" are different moments.
    """
    value = text.strip()
    now = now_ms() if now is None else now
    if _RELATIVE.match(value):
        ago = parse_duration(value)
        return TimeArg(text, now - int(ago / timedelta(milliseconds=1)))
    if value.isdigit():
        ms = int(value)
        if ms < 946_684_800_000:  # 2000-01-01: seconds, not milliseconds
            raise ValueError(f"{text!r}: epoch times are in milliseconds")
        return TimeArg(text, ms)
    if _DATE.match(value):
        value += "T00:00:00+00:00"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r}: expected a duration ago (30m, 2h, 1d), a date (2026-11-26), "
            "an RFC 3339 time with offset (2026-11-26T10:00:00Z) or epoch milliseconds"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r}: add a UTC offset (Z or +hh:mm) to the time")
    return TimeArg(text, int(moment.timestamp() * 1000))


def parse_rate(text: str) -> float:
    """Records per second from ``20``, ``20/s``, ``600/m`` or ``3600/h``."""
    match = _RATE.match(text)
    if not match:
        raise ValueError(f"{text!r}: expected records per second such as 20, 20/s or 600/m")
    rate = float(match.group(1)) / _PER[match.group(2) or "s"]
    if rate <= 0 or not math.isfinite(rate):
        raise ValueError(f"{text!r}: the rate must be greater than 0")
    return rate


def parse_position(text: str) -> tuple[int, int]:
    """``PARTITION:OFFSET`` of a record in the DLQ topic, as ``dlq list`` prints it."""
    parts = text.strip().split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"{text!r}: expected PARTITION:OFFSET, e.g. 3:1042")
    return int(parts[0]), int(parts[1])


def parse_replay_id(text: str) -> str:
    if not _REPLAY_ID.match(text):
        raise ValueError(
            f"{text!r}: a replay id is 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return text


def new_replay_id(now: int | None = None) -> str:
    """Sortable by start time, unique enough to never collide by accident."""
    stamp = _iso(now_ms() if now is None else now, millis=False)
    return stamp.replace("-", "").replace(":", "").replace("Z", "z") + "-" + uuid.uuid4().hex[:6]


def _arg_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Turn a parser's ValueError into argparse's clear message and exit status 2."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__.removeprefix("parse_").replace("_", " ")
    return convert


# -- the view of one dead letter ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What a dead letter's headers say about it: ids, positions, times, counts, classes."""

    partition: int
    offset: int
    timestamp_ms: int
    adapter: str | None
    error_class: str | None
    error_message: str | None
    attempts: int | None
    first_failure_ms: int | None
    last_failure_ms: int | None
    trade_id: str | None
    origin_topic: str | None
    origin_partition: int | None
    origin_offset: int | None
    source_group: str | None
    replay_id: str | None

    @classmethod
    def of(cls, msg: Message) -> DeadLetter:
        # One dict per record (later headers win, as in consumer.headers.get): a DLQ scan reads
        # every record, so per-header list scans would dominate its cost.
        headers = dict(_header_items(msg.headers()))

        def text(name: str) -> str | None:
            value = headers.get(name)
            if value is None or isinstance(value, str):
                return value
            return value.decode("ascii", "replace")

        def number(name: str) -> int | None:
            value = text(name)
            return int(value) if value is not None and value.isdigit() else None

        kind, stamp = msg.timestamp()
        return cls(
            partition=msg.partition() or 0,
            offset=msg.offset() or 0,
            timestamp_ms=stamp if kind else 0,
            adapter=text(h.ADAPTER),
            error_class=text(h.ERROR_CLASS),
            error_message=text(h.ERROR_MESSAGE),
            attempts=number(h.ATTEMPTS),
            first_failure_ms=number(h.FIRST_FAILURE_MS),
            last_failure_ms=number(h.LAST_FAILURE_MS),
            trade_id=text(h.TRADE_ID),
            origin_topic=text(h.ORIGIN_TOPIC),
            origin_partition=number(h.ORIGIN_PARTITION),
            origin_offset=number(h.ORIGIN_OFFSET),
            source_group=text(h.SOURCE_GROUP),
            replay_id=text(h.REPLAY_ID),
        )

    @property
    def position(self) -> str:
        return f"{self.partition}:{self.offset}"

    @property
    def failed_ms(self) -> int:
        """When it was dead-lettered: what ``--since``/``--until`` compare."""
        return self.last_failure_ms or self.timestamp_ms

    @property
    def origin(self) -> str:
        if self.origin_topic is None:
            return "-"
        return f"{self.origin_topic}:{self.origin_partition}:{self.origin_offset}"

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "partition": self.partition,
            "offset": self.offset,
            "adapter": self.adapter,
            "error_class": self.error_class,
            "error_message": self.error_message,
            "attempts": self.attempts,
            "first_failure_ms": self.first_failure_ms,
            "first_failure": _iso(self.first_failure_ms) if self.first_failure_ms else None,
            "last_failure_ms": self.last_failure_ms,
            "last_failure": _iso(self.last_failure_ms) if self.last_failure_ms else None,
            "trade_id": self.trade_id,
            "origin": {
                "topic": self.origin_topic,
                "partition": self.origin_partition,
                "offset": self.origin_offset,
            },
            "source_group": self.source_group,
            "replay_id": self.replay_id,
        }


_TABLE = (
    ("position", 10),
    ("adapter", 16),
    ("error_class", 23),
    ("attempts", 8),
    ("first_failure", 20),
    ("last_failure", 20),
    ("trade_id", 20),
    ("origin", 0),
)


def _table_row(values: Sequence[str]) -> str:
    cells = []
    for (name, width), value in zip(_TABLE, values, strict=True):
        cells.append(value.rjust(width) if name == "attempts" else value.ljust(width))
    return "  ".join(cells).rstrip() + "\n"


def table_header() -> str:
    return _table_row([name for name, _ in _TABLE])


def table_line(dl: DeadLetter) -> str:
    return _table_row(
        [
            dl.position,
            dl.adapter or "-",
            dl.error_class or "-",
            "-" if dl.attempts is None else str(dl.attempts),
            _iso(dl.first_failure_ms, millis=False),
            _iso(dl.last_failure_ms, millis=False),
            dl.trade_id or "-",
            dl.origin,
        ]
    )


# -- filters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    """Which dead letters a command is about. Empty sets match everything."""

    adapters: frozenset[str] = frozenset()
    error_classes: frozenset[str] = frozenset()
    trade_ids: frozenset[str] = frozenset()
    since_ms: int | None = None
    until_ms: int | None = None
    since: str | None = None
    until: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Filter:
        since: TimeArg | None = args.since
        until: TimeArg | None = args.until
        if since is not None and until is not None and since.ms >= until.ms:
            raise DlqUsageError(f"--since {since.spelled} is not before --until {until.spelled}")
        return cls(
            adapters=frozenset(args.adapter or ()),
            error_classes=frozenset(args.error_class or ()),
            trade_ids=frozenset(args.trade_id or ()),
            since_ms=since.ms if since else None,
            until_ms=until.ms if until else None,
            since=since.spelled if since else None,
            until=until.spelled if until else None,
        )

    def matches(self, dl: DeadLetter) -> bool:
        """``--since`` inclusive, ``--until`` exclusive, on the time it was dead-lettered."""
        if self.adapters and dl.adapter not in self.adapters:
            return False
        if self.error_classes and dl.error_class not in self.error_classes:
            return False
        if self.trade_ids and dl.trade_id not in self.trade_ids:
            return False
        if self.since_ms is not None and dl.failed_ms < self.since_ms:
            return False
        return self.until_ms is None or dl.failed_ms < self.until_ms

    def spelled(self) -> dict[str, Any]:
        """The filter as the operator wrote it: what a resumed replay must repeat."""
        return {
            "adapter": sorted(self.adapters),
            "error_class": sorted(self.error_classes),
            "trade_id": sorted(self.trade_ids),
            "since": self.since,
            "until": self.until,
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.spelled(), "since_ms": self.since_ms, "until_ms": self.until_ms}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Filter:
        """The filter a replay id was started with: relative times stay as first resolved."""
        return cls(
            adapters=frozenset(data.get("adapter") or ()),
            error_classes=frozenset(data.get("error_class") or ()),
            trade_ids=frozenset(data.get("trade_id") or ()),
            since_ms=data.get("since_ms"),
            until_ms=data.get("until_ms"),
            since=data.get("since"),
            until=data.get("until"),
        )

    def as_flags(self) -> str:
        """The command-line spelling, to show an operator what to repeat."""
        parts = [f"--adapter {a}" for a in sorted(self.adapters)]
        parts += [f"--error-class {c}" for c in sorted(self.error_classes)]
        parts += [f"--trade-id {t}" for t in sorted(self.trade_ids)]
        parts += [f"--since {self.since}"] if self.since else []
        parts += [f"--until {self.until}"] if self.until else []
        return " ".join(parts) or "(no filter)"


# -- reading a topic as a snapshot -------------------------------------------------------------


def _reader_config(settings: Settings, group: str) -> dict[str, Any]:
    return {
        **settings.kafka.librdkafka(),
        "group.id": group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": True,
        # Only committed replay/audit transactions count (the DLQ itself is not transactional).
        "isolation.level": "read_committed",
        # Bound what librdkafka prefetches: a read of a large DLQ then holds a few MB, whatever
        # the DLQ's size (measured over 100k dead letters: +20 MB RSS, instead of +64 MB with
        # the 1 MB default, which lz4 batches of similar records inflate many times over).
        # A larger record is still fetched whole.
        "fetch.message.max.bytes": 256 * 1024,
        "queued.min.messages": 2000,
        "queued.max.messages.kbytes": 4096,
    }


class TopicSnapshot:
    """Reads one topic's partitions from given offsets up to given ends, streaming.

    Its consumer is assigned, never subscribed, and never commits: reading changes nothing.
    (The replay commits its offsets through its producer's transactions, not here.)
    """

    def __init__(self, settings: Settings, topic: str, group: str) -> None:
        self.topic = topic
        self.consumer = Consumer(_reader_config(settings, group))

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> TopicSnapshot:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def partitions(self) -> list[int] | None:
        """The topic's partitions, or None when it does not exist."""
        try:
            meta = self.consumer.list_topics(self.topic, timeout=REQUEST_TIMEOUT_S)
        except KafkaException as exc:
            raise DlqError(f"cannot read metadata of {self.topic}: {exc.args[0]}") from exc
        topic = meta.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            return None
        return sorted(topic.partitions)

    def watermarks(self, partitions: Sequence[int]) -> dict[int, tuple[int, int]]:
        """(low, high) per partition, from the leaders now: the snapshot's bounds."""
        marks: dict[int, tuple[int, int]] = {}
        for p in partitions:
            deadline = time.monotonic() + REQUEST_TIMEOUT_S
            while True:
                try:
                    marks[p] = self.consumer.get_watermark_offsets(
                        TopicPartition(self.topic, p), timeout=REQUEST_TIMEOUT_S, cached=False
                    )
                    break
                except KafkaException as exc:
                    # A leader moving (or a topic just created) is worth a few retries.
                    error = exc.args[0]
                    retriable = isinstance(error, KafkaError) and (
                        error.retriable() or error.code() in _LEADER_MOVING
                    )
                    if not retriable or time.monotonic() > deadline:
                        raise DlqError(
                            f"cannot read offsets of {self.topic}[{p}]: {error}"
                        ) from exc
                    time.sleep(0.2)
        return marks

    def committed(self, partitions: Sequence[int]) -> dict[int, TopicPartition]:
        """The group's committed offset (and metadata) per partition; offset < 0 if none."""
        try:
            result = self.consumer.committed(
                [TopicPartition(self.topic, p) for p in partitions], timeout=REQUEST_TIMEOUT_S
            )
        except KafkaException as exc:
            raise DlqError(f"cannot read committed offsets: {exc.args[0]}") from exc
        return {tp.partition: tp for tp in result}

    def scan(self, start: dict[int, int], end: dict[int, int]) -> Generator[Message, None, None]:
        """Records with ``start[p] <= offset < end[p]``, a batch at a time, partitions interleaved.

        A partition is done at its end offset or at end-of-partition (for read_committed that is
        the last stable offset, so trailing transaction markers end it too).
        """
        todo = {p for p, e in end.items() if start.get(p, 0) < e}
        if not todo:
            return
        self.consumer.assign([TopicPartition(self.topic, p, start.get(p, 0)) for p in todo])
        idle_since: float | None = None
        try:
            while todo:
                messages = self.consumer.consume(500, 0.5)
                if not messages:
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > STALL_TIMEOUT_S:
                        raise DlqError(
                            f"no progress reading {self.topic} for {STALL_TIMEOUT_S:.0f}s "
                            f"(partitions left: {sorted(todo)}): is the broker reachable?"
                        )
                    continue
                idle_since = None
                for msg in messages:
                    p = msg.partition() or 0
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            todo.discard(p)
                        elif err.fatal():
                            raise DlqError(f"consumer error: {err.str()}")
                        continue
                    offset = msg.offset() or 0
                    if p not in todo or offset >= end[p]:
                        todo.discard(p)
                        continue
                    yield msg
                    if offset + 1 >= end[p]:
                        todo.discard(p)
        finally:
            self.consumer.unassign()

    def fetch(self, partition: int, offset: int) -> Message | None:
        """The record at exactly this position, or None (compacted away, a marker)."""
        start, end = {partition: offset}, {partition: offset + 1}
        for msg in self.scan(start, end):
            return msg if msg.offset() == offset else None
        return None


def _snapshot_of(reader: TopicSnapshot) -> dict[int, tuple[int, int]]:
    partitions = reader.partitions()
    if partitions is None:
        raise DlqUsageError(
            f"topic {reader.topic} does not exist: check topics.prefix in the configuration "
            "(auto-trace topics create makes it)"
        )
    return reader.watermarks(partitions)


def _inspect_group(settings: Settings) -> str:
    # Assigned, never subscribed, never committing: one shared name is harmless.
    return f"{settings.topics.prefix}-dlq-inspect"


def scan_dlq(settings: Settings, filt: Filter) -> Iterator[tuple[Message, DeadLetter]]:
    """Every matching dead letter of the DLQ as it is now, streamed."""
    with TopicSnapshot(settings, dlq_topic(settings), _inspect_group(settings)) as reader:
        marks = _snapshot_of(reader)
        start = {p: low for p, (low, _) in marks.items()}
        end = {p: high for p, (_, high) in marks.items()}
        for msg in reader.scan(start, end):
            dl = DeadLetter.of(msg)
            if filt.matches(dl):
                yield msg, dl


# -- list, stats, show --------------------------------------------------------------------------


def cmd_list(settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    filt = Filter.from_args(args)
    shown = 0
    for _msg, dl in scan_dlq(settings, filt):
        if args.output == "json":
            out.write(json.dumps(dl.to_json(), separators=(",", ":")) + "\n")
        else:
            if shown == 0:
                out.write(table_header())
            out.write(table_line(dl))
        shown += 1
        if args.limit is not None and shown >= args.limit:
            err.write(f"stopped after --limit {args.limit}\n")
            break
    if shown == 0:
        err.write(f"no dead letters in {dlq_topic(settings)} match {filt.as_flags()}\n")
    else:
        err.write(f"{shown} dead letter(s) listed\n")
    return EXIT_OK


@dataclass(slots=True)
class _Group:
    count: int = 0
    oldest_ms: int | None = None
    newest_ms: int | None = None

    def add(self, ms: int) -> None:
        self.count += 1
        self.oldest_ms = ms if self.oldest_ms is None else min(self.oldest_ms, ms)
        self.newest_ms = ms if self.newest_ms is None else max(self.newest_ms, ms)


def cmd_stats(settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Counts only: memory grows with the number of (adapter, error class) pairs, not records."""
    filt = Filter.from_args(args)
    groups: dict[tuple[str, str], _Group] = {}
    for _msg, dl in scan_dlq(settings, filt):
        key = (dl.adapter or "-", dl.error_class or "-")
        groups.setdefault(key, _Group()).add(dl.failed_ms)
    total = sum(g.count for g in groups.values())
    by_adapter: Counter[str] = Counter()
    by_class: Counter[str] = Counter()
    for (adapter, error_class), g in groups.items():
        by_adapter[adapter] += g.count
        by_class[error_class] += g.count
    if args.output == "json":
        doc = {
            "total": total,
            "by_adapter": dict(sorted(by_adapter.items())),
            "by_error_class": dict(sorted(by_class.items())),
            "groups": [
                {
                    "adapter": a,
                    "error_class": c,
                    "count": g.count,
                    "oldest_ms": g.oldest_ms,
                    "newest_ms": g.newest_ms,
                }
                for (a, c), g in sorted(groups.items())
            ],
        }
        out.write(json.dumps(doc, indent=2) + "\n")
        return EXIT_OK
    if total == 0:
        err.write(f"no dead letters in {dlq_topic(settings)} match {filt.as_flags()}\n")
        return EXIT_OK
    row = "{:<16}  {:<23}  {:>8}  {:<20}  {}"
    out.write(row.format("adapter", "error_class", "count", "oldest", "newest") + "\n")
    for (adapter, error_class), g in sorted(groups.items()):
        oldest, newest = _iso(g.oldest_ms, millis=False), _iso(g.newest_ms, millis=False)
        out.write(row.format(adapter, error_class, g.count, oldest, newest) + "\n")
    out.write("\n")
    for name, counts in (("adapter", by_adapter), ("error_class", by_class)):
        for value, count in sorted(counts.items()):
            out.write(f"{'by ' + name:<16}  {value:<23}  {count:>8}\n")
    out.write(f"{'total':<16}  {'':<23}  {total:>8}\n")
    return EXIT_OK


def _header_items(headers: h.RawHeaders) -> list[tuple[str, str | bytes | None]]:
    if not headers:
        return []
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


def _header_text(value: str | bytes | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.decode("ascii", "backslashreplace")


def cmd_show(settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    partition, offset = args.position
    topic = dlq_topic(settings)
    with TopicSnapshot(settings, topic, _inspect_group(settings)) as reader:
        marks = _snapshot_of(reader)
        if partition not in marks:
            raise DlqUsageError(f"{topic} has no partition {partition} (it has 0-{len(marks) - 1})")
        low, high = marks[partition]
        if not low <= offset < high:
            held = f"offsets {low}-{high - 1}" if high > low else "nothing"
            raise DlqUsageError(f"no dead letter at {partition}:{offset}: partition holds {held}")
        msg = reader.fetch(partition, offset)
        if msg is None:
            raise DlqUsageError(f"no record at {partition}:{offset} (removed by retention?)")
        _show(topic, msg, args.output, out)
    return EXIT_OK


def _show(topic: str, msg: Message, output: str, out: TextIO) -> None:
    headers = [(k, _header_text(v)) for k, v in _header_items(msg.headers())]
    record: dict[str, Any] | None
    decode_error = None
    try:
        record = to_json_dict(decode_trace(msg.value() or b""))
    except (ValueError, EOFError, IndexError, TypeError, KeyError) as exc:
        record, decode_error = None, type(exc).__name__
    key = msg.key()
    key_text = key.decode("utf-8", "backslashreplace") if key is not None else None
    dl = DeadLetter.of(msg)
    if output == "json":
        doc = {
            "topic": topic,
            **dl.to_json(),
            "key": key_text,
            "timestamp_ms": dl.timestamp_ms,
            "headers": [{"name": k, "value": v} for k, v in headers],
            "record": record,
            "decode_error": decode_error,
        }
        out.write(json.dumps(doc, indent=2) + "\n")
        return
    out.write(f"dead letter {topic} {dl.position}\n")
    out.write(f"  key        {key_text}\n  timestamp  {_iso(dl.timestamp_ms)}\n\nheaders\n")
    width = max((len(k) for k, _ in headers), default=0)
    for name, value in headers:
        note = ""
        if name.endswith("-ms") and value is not None and value.isdigit():
            note = f"  ({_iso(int(value))})"
        out.write(f"  {name:<{width}}  {value}{note}\n")
    if record is None:
        out.write(f"\nrecord: not a TraceRecord ({decode_error})\n")
    else:
        out.write("\nrecord (TraceRecord, no personal fields by schema)\n")
        out.write(json.dumps(record, indent=2, ensure_ascii=False) + "\n")


# -- audit --------------------------------------------------------------------------------------


def audit_topic(settings: Settings) -> str:
    return f"{settings.topics.prefix}.dlq.audit"


def replay_group(settings: Settings, replay_id: str) -> str:
    return f"{settings.topics.prefix}-dlq-replay-{replay_id}"


def read_audit(settings: Settings, replay_id: str | None = None) -> list[dict[str, Any]]:
    """Audit records (of one replay id, or all), oldest first; [] if the topic does not exist.

    The audit topic is small (a few records per replay run), so this one is read whole.
    """
    topic = audit_topic(settings)
    with TopicSnapshot(settings, topic, _inspect_group(settings)) as reader:
        partitions = reader.partitions()
        if partitions is None:
            return []
        marks = reader.watermarks(partitions)
        found: list[dict[str, Any]] = []
        wanted = replay_id.encode() if replay_id is not None else None
        start = {p: low for p, (low, _) in marks.items()}
        end = {p: high for p, (_, high) in marks.items()}
        for msg in reader.scan(start, end):
            if wanted is not None and msg.key() != wanted:
                continue
            try:
                doc = json.loads(msg.value() or b"")
            except ValueError:
                continue
            if isinstance(doc, dict):
                found.append(doc)
    found.sort(key=lambda d: int(d.get("at_ms") or 0))
    return found


def ensure_audit_topic(settings: Settings) -> None:
    """Create the audit topic when missing: one partition (one ordered trail), kept forever.

    Kept forever because it is what makes a finished replay id do nothing: an audit record that
    expired would let the same id replay again. It holds a few hundred bytes per run.
    """
    topic = audit_topic(settings)
    admin = AdminClient(settings.kafka.librdkafka())
    replication = settings.topics.dlq.replication_factor or settings.topics.replication_factor or -1
    new = NewTopic(topic, 1, replication, config={"retention.ms": "-1"})
    try:
        admin.create_topics([new], operation_timeout=REQUEST_TIMEOUT_S)[topic].result(
            timeout=REQUEST_TIMEOUT_S
        )
    except KafkaException as exc:
        error = exc.args[0]
        if not (isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS):
            raise DlqError(f"cannot create the audit topic {topic}: {error}") from exc
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while time.monotonic() < deadline:
        meta = admin.list_topics(topic, timeout=REQUEST_TIMEOUT_S).topics.get(topic)
        leaders = [p.leader for p in meta.partitions.values()] if meta is not None else []
        if meta is not None and meta.error is None and leaders and min(leaders) >= 0:
            return
        time.sleep(0.1)
    raise DlqError(f"the audit topic {topic} has no leader yet; try again")


def _operator() -> str:
    """Who ran it, for the audit trail (the operator's login name, not a trade's data)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or os.environ.get("USERNAME") or "unknown"


# -- replay -------------------------------------------------------------------------------------


class TokenBucket:
    """``rate`` tokens a second, at most ``capacity`` saved up; the caller sleeps ``delay()``.

    On the monotonic clock, so a wall-clock step cannot make a replay burst or stall.
    """

    def __init__(
        self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.capacity = max(1.0, capacity)
        self._clock = clock
        self._tokens = 1.0
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def delay(self) -> float:
        """Seconds until a token is there (0: now)."""
        self._refill()
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate

    def take(self) -> None:
        self._refill()
        self._tokens -= 1.0


class Progress:
    """A bar on a terminal, a plain line every few seconds otherwise (logs, CI)."""

    def __init__(
        self,
        stream: TextIO,
        total: int,
        *,
        label: str,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.total = max(0, total)
        self.label = label
        self.tty = stream.isatty() if tty is None else tty
        self._clock = clock
        self._started = clock()
        self._last = -math.inf
        self._every = 0.1 if self.tty else 5.0
        self._drawn = False

    def update(self, scanned: int, sent: int, *, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._last < self._every:
            return
        self._last = now
        elapsed = max(now - self._started, 1e-9)
        share = scanned / self.total if self.total else 1.0
        text = f"{scanned}/{self.total} scanned, {sent} sent, {sent / elapsed:.1f}/s"
        if self.tty:
            filled = int(share * 30)
            bar = "#" * filled + "-" * (30 - filled)
            self.stream.write(f"\r{self.label} [{bar}] {share:4.0%} {text}\x1b[K")
            self._drawn = True
        else:
            self.stream.write(f"{self.label}: {share:.0%} {text}\n")
        self.stream.flush()

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


@dataclass(slots=True)
class PartitionProgress:
    """Where a replay stands in one DLQ partition; committed as the offset and its metadata."""

    offset: int
    matched: int = 0
    sent: int = 0
    skipped: int = 0

    def metadata(self) -> str:
        return json.dumps({"m": self.matched, "s": self.sent, "k": self.skipped})

    @classmethod
    def from_committed(cls, tp: TopicPartition) -> PartitionProgress:
        counts: dict[str, Any] = {}
        with contextlib.suppress(ValueError, TypeError):
            loaded = json.loads(tp.metadata or "{}")
            counts = loaded if isinstance(loaded, dict) else {}
        return cls(
            tp.offset,
            int(counts.get("m", 0)),
            int(counts.get("s", 0)),
            int(counts.get("k", 0)),
        )


#: Failure headers a replayed record leaves behind: its attempts start again from 1.
FAILURE_HEADERS = frozenset(
    {
        h.ATTEMPTS,
        h.RETRY_DUE_MS,
        h.ERROR_CLASS,
        h.ERROR_MESSAGE,
        h.FIRST_FAILURE_MS,
        h.LAST_FAILURE_MS,
    }
)


def replay_headers(
    headers: h.RawHeaders, replay_id: str, at_ms: int, source: tuple[str, int, int]
) -> h.Headers:
    """The dead letter's headers without the failure ones, plus where and when it was replayed.

    Kept: the due time (the sink still never delivers early), the trade id, and the
    original position (``-origin-*``), so a record that fails again still says where it came
    from, and ``-replay-of`` links the new dead letter to this one.
    """
    kept: h.Headers = [(k, v) for k, v in _header_items(headers) if k not in FAILURE_HEADERS]
    topic, partition, offset = source
    return h.replace(
        kept,
        [
            (h.REPLAY_ID, replay_id),
            (h.REPLAY_MS, at_ms),
            (h.REPLAY_OF, f"{topic}:{partition}:{offset}"),
        ],
    )


@dataclass
class _Plan:
    """What a replay id stands for: from its first audit record, or new."""

    history: list[dict[str, Any]]
    snapshot: dict[int, int]
    filt: Filter
    first_run: bool
    finished: dict[str, Any] | None = None


@dataclass
class _Totals:
    scanned: int = 0
    sent: int = 0
    skipped_by_adapter: Counter[str] = field(default_factory=Counter)


class Replay:
    """One run of ``dlq replay``: plan, fence, then the transactional copy loop."""

    def __init__(
        self,
        settings: Settings,
        filt: Filter,
        replay_id: str,
        *,
        rate: float | None,
        dry_run: bool,
        output: str,
        out: TextIO,
        err: TextIO,
        stop: threading.Event,
        generated_id: bool = False,
    ) -> None:
        self.settings = settings
        self.filt = filt
        self.replay_id = replay_id
        self.rate = rate
        self.dry_run = dry_run
        self.output = output
        self.out = out
        self.err = err
        self.stop = stop
        self.generated_id = generated_id
        self.dlq = dlq_topic(settings)
        self.group = replay_group(settings, replay_id)
        self.configured = {a.name: a for a in settings.adapters}
        self._producer: Producer | None = None
        self._reader: TopicSnapshot | None = None
        self._in_txn = False
        self._touched: set[int] = set()
        self.progress: dict[int, PartitionProgress] = {}
        self.totals = _Totals()
        self.started_ms = now_ms()
        self.expired = 0

    # -- planning ---------------------------------------------------------------------------

    def _check_arguments(self) -> None:
        level = str(self.settings.kafka.client.get("isolation.level", "read_committed"))
        if level != "read_committed":
            raise DlqUsageError(
                "kafka.client sets isolation.level=read_uncommitted: the sink workers would "
                "deliver records of replay batches that never committed; remove it to replay"
            )
        unknown = sorted(a for a in self.filt.adapters if a not in self.configured)
        if unknown:
            known = ", ".join(sorted(self.configured)) or "none"
            raise DlqUsageError(
                f"--adapter {', '.join(unknown)}: not in the configuration (known: {known}); "
                "a replay sends records to a configured adapter's sink topic"
            )

    def _plan(self, reader: TopicSnapshot) -> _Plan | None:
        """The replay id's history and snapshot, or a new snapshot; None: the DLQ is empty."""
        history = read_audit(self.settings, self.replay_id)
        first = next((d for d in history if d.get("status") == "started"), None)
        if first is None:
            marks = _snapshot_of(reader)
            if all(high <= low for low, high in marks.values()):
                return None
            return _Plan(history, {p: high for p, (_, high) in marks.items()}, self.filt, True)
        stored = Filter.from_json(first.get("filter") or {})
        if stored.spelled() != self.filt.spelled():
            raise DlqUsageError(
                f"replay {self.replay_id} was started with {stored.as_flags()}; re-run it with "
                f"exactly that filter, or use a new --replay-id for this one "
                f"({self.filt.as_flags()})"
            )
        snapshot = {int(p): int(o) for p, o in (first.get("snapshot") or {}).items()}
        finished = next((d for d in history if d.get("status") == "finished"), None)
        return _Plan(history, snapshot, stored, False, finished)

    def _load_progress(self, reader: TopicSnapshot, plan: _Plan) -> None:
        """Start from the committed offsets; the first run starts at the low watermarks."""
        marks = reader.watermarks(sorted(plan.snapshot))
        committed = reader.committed(sorted(plan.snapshot))
        resuming = not plan.first_run and plan.finished is None and not self.dry_run
        if resuming and all(tp.offset < 0 for tp in committed.values()):
            raise DlqError(
                f"replay {self.replay_id} was started but its committed progress is gone "
                f"(group {self.group}: offsets expire after the broker's "
                "offsets.retention.minutes); resuming could send records twice, so this "
                "stops. Start a new replay id; receivers drop repeats by Idempotency-Key."
            )
        for p in plan.snapshot:
            low = marks.get(p, (0, 0))[0]
            tp = committed.get(p)
            if tp is None or tp.offset < 0:
                self.progress[p] = PartitionProgress(low)
                continue
            prog = PartitionProgress.from_committed(tp)
            if prog.offset < low:
                # Retention removed records this replay had not reached yet.
                self.expired += low - prog.offset
                prog.offset = low
            self.progress[p] = prog

    # -- run ----------------------------------------------------------------------------------

    def run(self) -> int:
        self._check_arguments()
        with TopicSnapshot(self.settings, self.dlq, self.group) as reader:
            self._reader = reader
            plan = self._plan(reader)
            if plan is None:
                self.out.write(f"nothing to replay: {self.dlq} is empty\n")
                return EXIT_OK
            if plan.finished is not None:
                self._report_finished(plan.finished)
                return EXIT_OK
            if self.dry_run:
                self._load_progress(reader, plan)
                return self._dry_run(reader, plan)
            self._check_sink_topics(reader)
            ensure_audit_topic(self.settings)
            self._producer = Producer(
                producer_config(
                    self.settings,
                    **{
                        "transactional.id": self.group,
                        "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
                        "linger.ms": 5,
                    },
                )
            )
            # Fences any other process running this id and aborts its open batch; from here on
            # nothing else can commit progress for this id, so plan again for certain.
            self._kafka(lambda: self._producer_().init_transactions(REQUEST_TIMEOUT_S * 2))
            plan = self._plan(reader)
            assert plan is not None
            if plan.finished is not None:
                self._report_finished(plan.finished)
                return EXIT_OK
            self.filt = plan.filt
            self._load_progress(reader, plan)
            if plan.first_run:
                self._start_offsets()
            self.out.write(
                f"replay {self.replay_id}: {'started' if plan.first_run else 'resumed'}; "
                f"re-run with --replay-id {self.replay_id} to resume it if it stops\n"
            )
            self.out.flush()
            self._audit("started" if plan.first_run else "resumed", plan, commit=True)
            completed = self._copy(reader, plan)
            self._audit("finished" if completed else "interrupted", plan, commit=True)
            self._summary(plan, completed)
            return EXIT_OK if completed else EXIT_INTERRUPTED

    def _producer_(self) -> Producer:
        assert self._producer is not None
        return self._producer

    def _check_sink_topics(self, reader: TopicSnapshot) -> None:
        names = self.filt.adapters or frozenset(self.configured)
        try:
            listed = set(reader.consumer.list_topics(timeout=REQUEST_TIMEOUT_S).topics)
        except KafkaException as exc:
            raise DlqError(f"cannot list topics: {exc.args[0]}") from exc
        missing = sorted(
            t for t in (sink_topic(self.settings, n) for n in names) if t not in listed
        )
        if missing:
            raise DlqUsageError(
                f"sink topic(s) {', '.join(missing)} do not exist: run auto-trace topics create"
            )
        for name in sorted(names):
            if not self.configured[name].enabled:
                self.err.write(
                    f"note: adapter {name} is disabled; its replayed records wait in its sink "
                    "topic until it is enabled\n"
                )

    def _start_offsets(self) -> None:
        """Commit the starting offsets with the first audit record.

        From then on the group always has offsets, so a later run can tell "resumable" from
        "progress lost" (expired offsets) and never silently starts over.
        """
        self._touched.update(self.progress)

    def _report_finished(self, finished: dict[str, Any]) -> None:
        counts = finished.get("counts") or {}
        self.out.write(
            f"replay {self.replay_id} already finished at {finished.get('at')} "
            f"(by {finished.get('user')}@{finished.get('host')}, "
            f"{counts.get('sent', 0)} sent): nothing to do\n"
        )

    def _dry_run(self, reader: TopicSnapshot, plan: _Plan) -> int:
        """What a replay would send now, from where this id stands; sends and records nothing."""
        filt = plan.filt
        start = {p: prog.offset for p, prog in self.progress.items()}
        matched: Counter[str] = Counter()
        scanned = 0
        for msg in reader.scan(start, plan.snapshot):
            scanned += 1
            dl = DeadLetter.of(msg)
            if not filt.matches(dl):
                continue
            target = dl.adapter if dl.adapter in self.configured else None
            matched[dl.adapter or "-"] += 1
            if self.output == "json":
                doc = {**dl.to_json(), "replay_to": target and sink_topic(self.settings, target)}
                self.out.write(json.dumps(doc, separators=(",", ":")) + "\n")
            else:
                if sum(matched.values()) == 1:
                    self.out.write(table_header())
                self.out.write(table_line(dl))
        total = sum(matched.values())
        if total == 0:
            self.err.write(
                f"nothing to replay: none of {scanned} dead letter(s) match {filt.as_flags()}\n"
            )
            return EXIT_OK
        per = ", ".join(
            f"{a} {n}" + ("" if a in self.configured else " (not configured: would be skipped)")
            for a, n in sorted(matched.items())
        )
        self.err.write(
            f"dry run: would replay {total} of {scanned} scanned ({per}); sent nothing\n"
        )
        if self.generated_id:
            self.err.write(
                "dry run: no replay id was reserved; a real run takes its own snapshot of the DLQ\n"
            )
        return EXIT_OK

    # -- the transactional loop ---------------------------------------------------------------

    def _copy(self, reader: TopicSnapshot, plan: _Plan) -> bool:
        """Copy matching records until the snapshot's end (True) or a stop request (False)."""
        start = {p: prog.offset for p, prog in self.progress.items()}
        to_scan = sum(max(0, plan.snapshot[p] - start[p]) for p in plan.snapshot)
        bar = Progress(self.err, to_scan, label=f"replay {self.replay_id}")
        bucket = (
            TokenBucket(self.rate, self.rate * COMMIT_INTERVAL_S) if self.rate is not None else None
        )
        batch = 0
        batch_started = time.monotonic()
        scan = reader.scan(start, plan.snapshot)
        completed = True
        try:
            for msg in scan:
                if self.stop.is_set():
                    completed = False
                    break
                p, offset = msg.partition() or 0, msg.offset() or 0
                prog = self.progress[p]
                dl = DeadLetter.of(msg)
                if self.filt.matches(dl):
                    if dl.adapter not in self.configured:
                        prog.matched += 1
                        prog.skipped += 1
                        self.totals.skipped_by_adapter[dl.adapter or "-"] += 1
                    else:
                        if bucket is not None:
                            wait = bucket.delay()
                            if (
                                wait > 0
                                and batch
                                and (time.monotonic() - batch_started + wait > COMMIT_INTERVAL_S)
                            ):
                                self._commit()
                                batch = 0
                            if wait > 0 and self.stop.wait(wait):
                                completed = False
                                break
                            bucket.take()
                        if not batch:
                            batch_started = time.monotonic()
                        self._send(msg, dl)
                        prog.matched += 1
                        prog.sent += 1
                        self.totals.sent += 1
                        batch += 1
                prog.offset = offset + 1
                self._touched.add(p)
                self.totals.scanned += 1
                if batch >= MAX_BATCH or time.monotonic() - batch_started >= COMMIT_INTERVAL_S:
                    self._commit()
                    batch = 0
                    batch_started = time.monotonic()
                bar.update(self.totals.scanned, self.totals.sent)
        finally:
            scan.close()
            bar.update(self.totals.scanned, self.totals.sent, force=True)
            bar.close()
        return completed

    def _send(self, msg: Message, dl: DeadLetter) -> None:
        assert dl.adapter is not None
        self._begin()
        topic = sink_topic(self.settings, dl.adapter)
        headers = replay_headers(
            msg.headers(), self.replay_id, now_ms(), (self.dlq, dl.partition, dl.offset)
        )
        producer = self._producer_()
        while True:
            try:
                producer.produce(topic, value=msg.value(), key=msg.key(), headers=headers)
                break
            except BufferError:
                producer.poll(0.1)
            except KafkaException as exc:
                raise self._failure(exc) from exc
        producer.poll(0)

    def _begin(self) -> None:
        if not self._in_txn:
            self._kafka(self._producer_().begin_transaction)
            self._in_txn = True

    def _commit(self) -> None:
        """Commit the open batch: its records, and the DLQ offsets (with counts) it covers."""
        self._begin()
        assert self._reader is not None
        producer = self._producer_()
        offsets = [
            TopicPartition(
                self.dlq, p, self.progress[p].offset, metadata=self.progress[p].metadata()
            )
            for p in sorted(self._touched)
        ]
        if offsets:
            metadata = self._reader.consumer.consumer_group_metadata()
            self._kafka(
                lambda: producer.send_offsets_to_transaction(offsets, metadata, REQUEST_TIMEOUT_S)
            )
        for attempt in range(5):
            try:
                producer.commit_transaction(REQUEST_TIMEOUT_S * 2)
                break
            except KafkaException as exc:
                error = exc.args[0]
                if isinstance(error, KafkaError) and error.retriable() and attempt < 4:
                    continue
                raise self._failure(exc) from exc
        self._in_txn = False
        self._touched.clear()

    def _kafka(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except KafkaException as exc:
            raise self._failure(exc) from exc

    def _failure(self, exc: KafkaException) -> DlqError:
        error = exc.args[0]
        code = error.code() if isinstance(error, KafkaError) else None
        resume = f"nothing of the open batch was sent; resume with --replay-id {self.replay_id}"
        if code in (
            KafkaError._FENCED,
            KafkaError.PRODUCER_FENCED,
            KafkaError.INVALID_PRODUCER_EPOCH,
        ):
            return DlqError(
                f"another process took over replay {self.replay_id} (same --replay-id); "
                "this one stops without sending more"
            )
        if isinstance(error, KafkaError) and error.txn_requires_abort() and self._producer:
            with contextlib.suppress(KafkaException):
                self._producer.abort_transaction(REQUEST_TIMEOUT_S)
        return DlqError(f"replay batch failed ({error}); {resume}")

    def _counts(self) -> dict[str, int]:
        return {
            "matched": sum(p.matched for p in self.progress.values()),
            "sent": sum(p.sent for p in self.progress.values()),
            "skipped": sum(p.skipped for p in self.progress.values()),
            "sent_this_run": self.totals.sent,
            "scanned_this_run": self.totals.scanned,
        }

    def _audit(self, status: str, plan: _Plan, *, commit: bool) -> None:
        """One audit record, in the transaction that commits the offsets it reports."""
        at = now_ms()
        doc = {
            "replay_id": self.replay_id,
            "status": status,
            "at_ms": at,
            "at": _iso(at),
            "user": _operator(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "run_started_ms": self.started_ms,
            "run_ended_ms": at if status in ("finished", "interrupted") else None,
            "dlq_topic": self.dlq,
            "consumer_group": self.group,
            "filter": plan.filt.to_json(),
            "snapshot": {str(p): o for p, o in sorted(plan.snapshot.items())},
            "rate_per_s": self.rate,
            "counts": self._counts(),
            "expired_before_replay": self.expired,
        }
        self._begin()
        self._producer_().produce(
            audit_topic(self.settings),
            key=self.replay_id.encode(),
            value=json.dumps(doc, separators=(",", ":")).encode(),
        )
        if commit:
            self._commit()

    def _summary(self, plan: _Plan, completed: bool) -> None:
        counts = self._counts()
        took = (now_ms() - self.started_ms) / 1000
        state = "finished" if completed else "interrupted"
        self.out.write(
            f"replay {self.replay_id} {state}: {counts['sent']} sent in total "
            f"({self.totals.sent} by this run, {took:.1f}s), {counts['matched']} matched "
            f"{plan.filt.as_flags()}\n"
        )
        if self.totals.skipped_by_adapter:
            skipped = ", ".join(
                f"{a} {n}" for a, n in sorted(self.totals.skipped_by_adapter.items())
            )
            self.out.write(f"skipped (adapter not in the configuration): {skipped}\n")
        if self.expired:
            self.out.write(
                f"warning: {self.expired} dead letter(s) expired (retention) before this replay "
                "reached them\n"
            )
        if counts["matched"] == 0 and completed:
            self.out.write("nothing to replay: no dead letter matched the filter\n")
        if not completed:
            flags = "" if plan.filt.as_flags() == "(no filter)" else " " + plan.filt.as_flags()
            self.out.write(
                f"resume with: auto-trace dlq replay --replay-id {self.replay_id}{flags}\n"
            )


# -- history ------------------------------------------------------------------------------------


def cmd_history(settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    records = read_audit(settings, args.replay_id)
    if not records:
        err.write(f"no replay recorded in {audit_topic(settings)}\n")
        return EXIT_OK
    for doc in records:
        if args.output == "json":
            out.write(json.dumps(doc, separators=(",", ":")) + "\n")
            continue
        counts = doc.get("counts") or {}
        filt = Filter.from_json(doc.get("filter") or {})
        out.write(
            f"{_iso(doc.get('at_ms'), millis=False)}  {doc.get('replay_id')}  "
            f"{doc.get('status')!s:<11}  {doc.get('user')}@{doc.get('host')}  "
            f"sent={counts.get('sent', 0)} matched={counts.get('matched', 0)}  {filt.as_flags()}\n"
        )
    return EXIT_OK


def cmd_replay(settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    filt = Filter.from_args(args)
    generated = args.replay_id is None
    replay_id = args.replay_id or new_replay_id()
    stop = threading.Event()
    replay = Replay(
        settings,
        filt,
        replay_id,
        rate=args.rate,
        dry_run=args.dry_run,
        output=args.output,
        out=out,
        err=err,
        stop=stop,
        generated_id=generated,
    )
    if args.dry_run:
        return replay.run()
    with _stop_on_signals(stop, err):
        try:
            return replay.run()
        except KeyboardInterrupt:
            err.write(
                f"replay {replay_id} abandoned; its open batch is rolled back (nothing of it is "
                f"delivered). Resume with --replay-id {replay_id}\n"
            )
            return EXIT_INTERRUPTED


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event, err: TextIO) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish and commit the current batch, then stop. A second one
    abandons the batch (it is rolled back; a resumed run sends it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        err.write("\nstopping after the current batch (again to abandon it)\n")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# -- command line -------------------------------------------------------------------------------

DESCRIPTION = """\
Inspect and replay the delivery dead-letter topic <prefix>.dlq (PII-free records that failed
for good: a fatal answer, or every retry tier used up). Every command reads a snapshot (up to the
end offsets when it starts), streaming, so it works on a DLQ of any size.
"""

EPILOG = """\
examples:
  auto-trace dlq stats --config auto-trace.yaml
  auto-trace dlq list --adapter myfxbook-mirror --error-class FatalDeliveryError --since 2h
  auto-trace dlq show 3:1042
  auto-trace dlq replay --adapter myfxbook-mirror --since 2026-11-26T09:00:00Z --dry-run
  auto-trace dlq replay --adapter myfxbook-mirror --since 2026-11-26T09:00:00Z --rate 20/s
  auto-trace dlq history

Run `auto-trace dlq ACTION --help` for each action's options.
"""

FILTER_HELP = """\
filters (all optional, combined with AND; repeat a flag to allow several values):
  --since/--until compare the time of the last failure (when the record was dead-lettered):
  --since is inclusive, --until exclusive. They take a duration ago (30m, 2h, 1d), a date
  (2026-11-26, UTC), an RFC 3339 time with offset (2026-11-26T10:00:00Z) or epoch milliseconds.
"""

REPLAY_DESCRIPTION = """\
Send the dead letters matching the filter back to their adapter's sink topic (same key and
value, attempt count reset, replay headers added); the sink workers (auto-trace run --role sink)
deliver them with the same Idempotency-Key as the original attempts.

Safe to repeat: the replay id names this replay. Its first run records the filter and the DLQ's
end offsets in the audit topic <prefix>.dlq.audit; only records up to those offsets are
replayed. Progress is committed in Kafka transactions with the records sent, so re-running the
same --replay-id after a crash, Ctrl-C or kill continues where it stopped and sends nothing
twice, and re-running a finished replay does nothing. A resumed replay must be given the same
filter (exit 2 otherwise). Ctrl-C stops after the current batch (exit 130).
"""

REPLAY_EPILOG = f"""\
{FILTER_HELP}
examples:
  # what would go again, sending nothing:
  auto-trace dlq replay --adapter hook --error-class FatalDeliveryError --since 2h --dry-run
  # replay it at 20 records a second; note the printed replay id:
  auto-trace dlq replay --adapter hook --error-class FatalDeliveryError --since 2h --rate 20/s
  # it was interrupted: the same command with that id continues it
  auto-trace dlq replay --replay-id 20261126T101500z-3fa2c1 \\
      --adapter hook --error-class FatalDeliveryError --since 2h --rate 20/s
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="auto-trace dlq",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get("AUTO_TRACE_CONFIG"),
        help="YAML configuration file (default: $AUTO_TRACE_CONFIG)",
    )
    filters = argparse.ArgumentParser(add_help=False)
    group = filters.add_argument_group("filters")
    group.add_argument("--adapter", action="append", metavar="NAME", help="adapter name")
    group.add_argument(
        "--error-class",
        action="append",
        metavar="CLASS",
        help="e.g. FatalDeliveryError, RetriableDeliveryError, UndecodableRecord",
    )
    group.add_argument("--trade-id", action="append", metavar="ID", help="trade id")
    group.add_argument(
        "--since", type=_arg_type(parse_time), metavar="WHEN", help="failed at or after WHEN"
    )
    group.add_argument(
        "--until", type=_arg_type(parse_time), metavar="WHEN", help="failed before WHEN"
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    raw = argparse.RawDescriptionHelpFormatter

    lister = sub.add_parser(
        "list",
        parents=[common, filters],
        help="dead letters, one line each",
        description="List dead letters: position (PARTITION:OFFSET in the DLQ, for `show`), "
        "adapter, error class, attempts, first and last failure, trade id and the position the "
        "sink worker first consumed it at. Never prints a record body.",
        epilog=FILTER_HELP + "\nexamples:\n  auto-trace dlq list --since 1d\n"
        "  auto-trace dlq list --adapter hook --output json | jq -r .trade_id\n",
        formatter_class=raw,
    )
    lister.add_argument(
        "--output",
        choices=["table", "json"],
        default="table",
        help="table, or json: one object per line (streams; pipe it to jq)",
    )
    lister.add_argument("--limit", type=_arg_type(_positive_int), metavar="N", help="at most N")

    stats = sub.add_parser(
        "stats",
        parents=[common, filters],
        help="counts by adapter and error class",
        description="Count dead letters by adapter and error class, with the oldest and newest "
        "failure of each group.",
        epilog=FILTER_HELP + "\nexamples:\n  auto-trace dlq stats\n"
        "  auto-trace dlq stats --since 1d --output json\n",
        formatter_class=raw,
    )
    stats.add_argument("--output", choices=["table", "json"], default="table")

    show = sub.add_parser(
        "show",
        parents=[common],
        help="one dead letter in full",
        description="Show one dead letter: key, every header (times also as RFC 3339) and the "
        "decoded TraceRecord, which holds no personal field by schema.",
        epilog="examples:\n  auto-trace dlq show 0:17\n"
        "  auto-trace dlq show 3:1042 --output json\n",
        formatter_class=raw,
    )
    show.add_argument(
        "position",
        type=_arg_type(parse_position),
        metavar="PARTITION:OFFSET",
        help="its position in the DLQ topic, as `dlq list` prints it",
    )
    show.add_argument("--output", choices=["text", "json"], default="text")

    replay = sub.add_parser(
        "replay",
        parents=[common, filters],
        help="send matching dead letters again (resumable, never twice)",
        description=REPLAY_DESCRIPTION,
        epilog=REPLAY_EPILOG,
        formatter_class=raw,
    )
    replay.add_argument(
        "--replay-id",
        type=_arg_type(parse_replay_id),
        metavar="ID",
        help="names the replay; give the id of an earlier run to resume it (default: a new id, "
        "printed: keep it)",
    )
    replay.add_argument(
        "--dry-run",
        action="store_true",
        help="list what would be replayed; send, commit and record nothing",
    )
    replay.add_argument(
        "--rate",
        type=_arg_type(parse_rate),
        metavar="N/s",
        help="at most N records a second (20, 20/s, 600/m); default: unlimited",
    )
    replay.add_argument(
        "--output", choices=["table", "json"], default="table", help="of the --dry-run listing"
    )

    history = sub.add_parser(
        "history",
        parents=[common],
        help="who replayed what, and when (the audit topic)",
        description="Print the audit trail of replays from <prefix>.dlq.audit: one record per "
        "run start, resume, interruption and finish, with user, host, filter and counts.",
        epilog="examples:\n  auto-trace dlq history\n"
        "  auto-trace dlq history --replay-id 20261126T101500z-3fa2c1 --output json\n",
        formatter_class=raw,
    )
    history.add_argument("--replay-id", type=_arg_type(parse_replay_id), metavar="ID")
    history.add_argument("--output", choices=["table", "json"], default="table")
    return parser


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{text!r}: expected a whole number of at least 1")
    return int(text)


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace, TextIO, TextIO], int]] = {
    "list": cmd_list,
    "stats": cmd_stats,
    "show": cmd_show,
    "replay": cmd_replay,
    "history": cmd_history,
}


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """``auto-trace dlq ...``; exit 0 done (or nothing to do), 1 failed, 2 bad arguments."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        settings = read_settings(args.config)
        # Dead letters are listed and replayed through Kafka alone: no adapter's secrets.
        check_secrets(settings, "kafka")
        return COMMANDS[args.action](settings, args, out, err)
    except ConfigError as exc:
        err.write(f"auto-trace: configuration error: {exc}\n")
        return EXIT_USAGE
    except DlqUsageError as exc:
        err.write(f"auto-trace dlq {args.action}: error: {exc}\n")
        return EXIT_USAGE
    except DlqError as exc:
        err.write(f"auto-trace dlq {args.action}: failed: {exc}\n")
        return EXIT_FAILED
    except BrokenPipeError:
        # `dlq list | head`: the reader has what it wanted. Point stdout at /dev/null so the
        # interpreter's final flush does not complain about the closed pipe.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
