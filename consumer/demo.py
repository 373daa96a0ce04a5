"""``auto-trace demo``: the whole pipeline on one machine, watched trade by trade.

It exists so that someone who has just cloned the repository can see the service keep its
promises on a real broker in under a minute, with nothing set up: no trade reaches a tracker
before ``close_time + window``, no personal field leaves ingest, and a tracker that fails only
retries or dead-letters its own records while the healthy one carries on.

What it shows is observed from the outside only, the way an operator could check it: a reader
of the internal topics (its own group id, assigned partitions, never committing) and the
requests the two local webhook receivers got. It never looks inside a stage, so a display that
says "held" or "retrying" is evidence, not a story the code tells about itself.

Personal data is printed once, in the "input" section, because the point is to show that it
went in; everything printed after that section is checked to hold none of it.

Heavy modules (Kafka clients, aiohttp, the stages) are imported inside the functions that use
them: the CLI builds this sub-command's parser on every invocation and ``auto-trace --help``
must not pay for a demo it does not run.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from consumer.config import format_duration, parse_duration

if TYPE_CHECKING:
    from consumer.broker import Cluster
    from consumer.config import Settings
    from consumer.receiver import Received, Reply, WebhookReceiver
    from consumer.runner import Runner

#: The demo puts its own Standard Webhooks secret here, and the adapters read it from here,
#: exactly as a deployment reads a mounted secret: the configuration never holds the value.
SECRET_ENV = "AUTO_TRACE_DEMO_WEBHOOK_SECRET"
HEALTHY = "tracker-a"
FLAKY = "flaky-b"
ADAPTERS = (HEALTHY, FLAKY)
#: The file export: not tracked live (it writes in batches), checked once the pipeline stopped.
ARCHIVE = "archive"
#: Short tiers so that a retry is visible within seconds (production defaults start at 5s).
DEFAULT_TIERS = "2s,4s,8s"
#: Longer than the first tier on purpose: the policy must skip to the first tier that is at
#: least this long instead of retrying sooner than the receiver asked.
RETRY_AFTER_S = 3
#: How often the live display is redrawn and the topics are read.
TICK_S = 0.5
#: In line mode, say what is still pending after this long without any other output, so a CI
#: log never looks stuck.
QUIET_PROGRESS_S = 5.0
READY_TIMEOUT_S = 60.0
TOPICS_TIMEOUT_S = 30.0
RECENT_EVENTS = 6
#: Marks the end of the only section allowed to show personal data (tests split on it).
END_OF_INPUT = "end of input: nothing below this line contains personal data"
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
#: On the input records only: matches acknowledgements and ingest dead letters to trades.
DEMO_TRADE_HEADER = "demo-trade-id"

Tone = Literal["plain", "dim", "good", "warn", "bad", "bold"]


# --------------------------------------------------------------------------------------------
# Command line


def _duration(text: str) -> timedelta:
    try:
        value = parse_duration(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(value, timedelta) or value < timedelta(0):
        raise argparse.ArgumentTypeError("expected a duration such as 500ms, 5s, 30m or 1h")
    return value


def _tiers(text: str) -> list[timedelta]:
    tiers = [_duration(part) for part in text.split(",") if part.strip()]
    if not tiers or any(t <= timedelta(0) for t in tiers):
        raise argparse.ArgumentTypeError("expected increasing durations such as 2s,4s,8s")
    if any(b <= a for a, b in itertools.pairwise(tiers)):
        raise argparse.ArgumentTypeError("tiers must be strictly increasing")
    return tiers


def _trade_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a whole number") from None
    if not 1 <= value <= 200:
        raise argparse.ArgumentTypeError("between 1 and 200")
    return value


DESCRIPTION = f"""\
Run the whole pipeline on this machine and watch each trade's journey:
published -> held until close_time + window -> released -> delivered to {HEALTHY} (a healthy
webhook receiver), and to {FLAKY} (one that answers 503 once for some trades, 429 with
Retry-After: {RETRY_AFTER_S} once for one, and 422 for one, which is dead-lettered).

Kafka: $KAFKA_BOOTSTRAP_SERVERS when set, else a throwaway local broker (Docker if available,
else the JVM; the first run resolves the broker jars with Maven). Every run uses topics with a
fresh prefix, so reruns never see old data. Exits 0 once every trade is delivered to
{HEALTHY} and delivered or dead-lettered on {FLAKY}; 1 on --timeout; Ctrl-C stops cleanly.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Shared by ``auto-trace demo`` and :func:`main`, so both accept exactly the same options."""
    parser.add_argument(
        "--window",
        type=_duration,
        default=timedelta(seconds=10),
        metavar="DURATION",
        help="the delay X in T+X: trades are held this long after close_time (default: 10s)",
    )
    parser.add_argument(
        "--trades",
        type=_trade_count,
        default=8,
        metavar="N",
        help="sample trades to publish, all closing now (default: 8)",
    )
    parser.add_argument(
        "--timeout",
        type=_duration,
        default=timedelta(seconds=120),
        metavar="DURATION",
        help="give up (exit 1) if the trades are not all settled this long after they are "
        "published (default: 120s)",
    )
    parser.add_argument(
        "--retry-tiers",
        type=_tiers,
        default=_tiers(DEFAULT_TIERS),
        metavar="LIST",
        help=f"retry tier delays, comma-separated (default: {DEFAULT_TIERS})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=7,
        help="sample data seed: the same seed gives the same trades (default: 7)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        metavar="PORT",
        help="serve /metrics, /healthz and /readyz here (default: 0, a free port)",
    )
    parser.add_argument(
        "--config-out",
        type=Path,
        metavar="PATH",
        help="also write the YAML configuration the demo ran with here (a starting example)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="where to keep the pipeline log, the configuration and a copy of the broker log "
        "(default: a new folder under the system temporary directory)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="append one line per event instead of redrawing a table (the default when "
        "stdout is not a terminal)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="auto-trace demo",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    """Entry point for both ``auto-trace demo`` (parsed options) and direct calls (a list)."""
    if isinstance(argv, argparse.Namespace):
        args = argv
    else:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from consumer.broker import BrokerError

    out = Output(sys.stdout, live=not args.plain and sys.stdout.isatty())
    try:
        return _run(args, out)
    except KeyboardInterrupt:
        # Before the pipeline's own handlers are installed (broker start-up), or after they
        # are restored: every context manager has already cleaned up on the way here.
        out.line()
        out.line("interrupted; everything the demo started has been stopped.", "warn")
        return EXIT_INTERRUPTED
    except (DemoError, BrokerError) as exc:
        out.line()
        out.line(f"demo failed: {exc}", "bad")
        return EXIT_FAILED


class DemoError(RuntimeError):
    """Something the demo needs did not happen; the message says what and where to look."""


# --------------------------------------------------------------------------------------------
# Terminal output


_ANSI = {
    "plain": "",
    "dim": "\x1b[2m",
    "good": "\x1b[32m",
    "warn": "\x1b[33m",
    "bad": "\x1b[31m",
    "bold": "\x1b[1m",
}
_RESET = "\x1b[0m"
Segment = tuple[str, Tone]


class Output:
    """Writes to stdout explicitly (the package bans print), with colour only on a terminal.

    Colour is for a person watching; a log file or a CI page gets the same words without
    escape codes. ``NO_COLOR`` (no-color.org) is honoured.
    """

    def __init__(self, stream: TextIO, *, live: bool) -> None:
        self.stream = stream
        self.live = live
        self.color = live and not os.environ.get("NO_COLOR")

    def paint(self, text: str, tone: Tone) -> str:
        if not self.color or tone == "plain" or not text:
            return text
        return f"{_ANSI[tone]}{text}{_RESET}"

    def line(self, text: str = "", tone: Tone = "plain") -> None:
        self.stream.write(self.paint(text, tone) + "\n")
        self.stream.flush()

    def segments(self, parts: Sequence[Segment]) -> None:
        self.stream.write("".join(self.paint(t, tone) for t, tone in parts) + "\n")
        self.stream.flush()

    def write_raw(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _fit(parts: Sequence[Segment], width: int) -> list[Segment]:
    """Cut a line to the terminal width: a wrapped line would break the redraw's line count."""
    fitted: list[Segment] = []
    room = width
    for text, tone in parts:
        if room <= 0:
            break
        if len(text) > room:
            text = text[: max(0, room - 1)] + "…"
        fitted.append((text, tone))
        room -= len(text)
    return fitted


def clock(ms: int, *, precise: bool = False) -> str:
    """Local wall-clock time: what the person watching compares with their own clock."""
    text = datetime.fromtimestamp(ms / 1000).strftime("%H:%M:%S")
    return f"{text}.{ms % 1000:03d}" if precise else text


def span(ms: float) -> str:
    """A duration in the unit a person reads at a glance: ``35 ms``, ``2.05 s``."""
    if abs(ms) < 1000:
        return f"{ms:.0f} ms"
    return f"{ms / 1000:.2f} s"


def countdown(ms: float) -> str:
    return f"{max(0.0, ms) / 1000:.1f}s"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------------------------
# What the flaky receiver does


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the flaky receiver answers one trade: ``status`` for the first ``times`` attempts
    (every attempt when ``times`` is None), then 200."""

    label: str
    status: int
    times: int | None = 1
    retry_after: int | None = None


ACCEPT = Behaviour("accept", 200, times=0)
UNAVAILABLE = Behaviour("503 once, then accept", 503)
SLOW_DOWN = Behaviour(
    f"429 + Retry-After: {RETRY_AFTER_S} once, then accept", 429, 1, RETRY_AFTER_S
)
REJECT = Behaviour("422 every time: dead-lettered", 422, times=None)


def behaviour_for(index: int) -> Behaviour:
    """One dead letter, one Retry-After, and a plain retry every third trade: each path of the
    retry policy shows at least once with the default 8 trades, and with as few as 4."""
    if index == 1:
        return REJECT
    if index == 2:
        return SLOW_DOWN
    if index % 3 == 0:
        return UNAVAILABLE
    return ACCEPT


class ScriptedPolicy:
    """A receiver policy: refuse unsigned requests, then answer each trade by its behaviour.

    Attempts are counted per trade id, not globally, so the outcome does not depend on how
    concurrent deliveries interleave.
    """

    def __init__(self, plan: Mapping[str, Behaviour]) -> None:
        self._plan = dict(plan)
        self._attempts: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, received: Received) -> Reply | None:
        from consumer.receiver import Reply

        if received.verified is False:
            # What a real receiver does with a request it cannot authenticate.
            return Reply(401)
        payload = received.payload
        trade_id = payload.get("trade_id") if isinstance(payload, dict) else None
        if not isinstance(trade_id, str) or trade_id not in self._plan:
            return None
        behaviour = self._plan[trade_id]
        with self._lock:
            seen = self._attempts[trade_id] = self._attempts.get(trade_id, 0) + 1
        if behaviour.times is not None and seen > behaviour.times:
            return None
        headers = (
            {} if behaviour.retry_after is None else {"Retry-After": str(behaviour.retry_after)}
        )
        return Reply(behaviour.status, headers)


# --------------------------------------------------------------------------------------------
# What is known about each trade (from the topics and the receivers only)


@dataclass(slots=True)
class Attempt:
    at_ms: int
    status: int
    verified: bool | None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass(slots=True)
class RetryFact:
    attempts: int
    tier: str
    skipped: bool
    next_ms: int
    error: str


@dataclass(slots=True)
class DeadFact:
    attempts: int
    error: str
    error_class: str


@dataclass(slots=True)
class Track:
    """One trade at one adapter."""

    released_ms: int | None = None
    attempts: list[Attempt] = field(default_factory=list)
    retries: list[RetryFact] = field(default_factory=list)
    dead: DeadFact | None = None

    def delivered(self) -> tuple[int, Attempt] | None:
        """The first successful attempt and its number (1-based)."""
        for number, attempt in enumerate(self.attempts, 1):
            if attempt.ok:
                return number, attempt
        return None

    @property
    def settled(self) -> bool:
        return self.dead is not None or self.delivered() is not None


@dataclass(slots=True)
class TradeState:
    trade_id: str
    instrument: str
    #: close_time + window, computed from what was published, not read back from the
    #: pipeline: the promise is checked against the input, never against the system's word.
    due_ms: int
    behaviour: Behaviour
    published_ms: int | None = None
    held_ms: int | None = None
    rejected: str | None = None
    tracks: dict[str, Track] = field(default_factory=lambda: {a: Track() for a in ADAPTERS})

    @property
    def released_ms(self) -> int | None:
        times = [t.released_ms for t in self.tracks.values() if t.released_ms is not None]
        return min(times) if times else None

    @property
    def settled(self) -> bool:
        return self.rejected is not None or all(t.settled for t in self.tracks.values())


@dataclass(frozen=True, slots=True)
class Event:
    at_ms: int
    trade_id: str
    text: str
    tone: Tone = "plain"


_HTTP_STATUS = re.compile(r"HTTP (\d{3})")


def short_error(message: str) -> str:
    """A table cell's worth of an error: the status when there is one."""
    match = _HTTP_STATUS.search(message)
    return match.group(1) if match else message[:24]


def _brief(message: str) -> str:
    """An event line's worth: ``HTTP 503`` says all that "HTTP 503 from webhook" does here."""
    match = _HTTP_STATUS.search(message)
    return f"HTTP {match.group(1)}" if match else message


class Observer:
    """Reads the internal topics and the receivers, and turns what it finds into states and
    events.

    The reader is assigned every partition from the beginning, with its own group id and no
    commits: it joins no group, so it cannot take partitions from a stage, and it never moves
    an offset a stage relies on. The ingest dead-letter topic holds raw input (personal data):
    only headers are read from it, the trade id the demo set and the rejection reason.
    """

    def __init__(
        self,
        settings: Settings,
        trades: Sequence[TradeState],
        receivers: Mapping[str, WebhookReceiver],
        personal: set[str],
    ) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        from consumer import topics

        self._trades = {t.trade_id: t for t in trades}
        self._receivers = receivers
        self._seen_requests = dict.fromkeys(receivers, 0)
        self._personal = [p.encode() for p in personal]
        self.delay_topic = topics.delay_topic(settings)
        self.dlq_topic = topics.dlq_topic(settings)
        self.ingest_dlq_topic = topics.ingest_dlq_topic(settings)
        self.sink_topics = {topics.sink_topic(settings, a): a for a in ADAPTERS}
        self.retry_topics: dict[str, tuple[str, int, str]] = {}
        for adapter in ADAPTERS:
            for i, name in enumerate(topics.retry_topics(settings, adapter)):
                self.retry_topics[name] = (adapter, i, format_duration(settings.retry.tiers[i]))
        watched = [
            self.delay_topic,
            *self.sink_topics,
            *self.retry_topics,
            self.dlq_topic,
            self.ingest_dlq_topic,
        ]
        self._consumer = Consumer(
            {
                **settings.kafka.librdkafka(),
                "group.id": f"{settings.topics.prefix}-demo-observer",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": False,
                "fetch.wait.max.ms": 100,
            }
        )
        metadata = self._consumer.list_topics(timeout=TOPICS_TIMEOUT_S).topics
        self._partitions = [
            TopicPartition(name, p, OFFSET_BEGINNING)
            for name in watched
            for p in sorted(metadata[name].partitions)
        ]
        self._consumer.assign(self._partitions)
        #: Internal records and receiver requests checked for personal values, and hits.
        self.records_checked = 0
        self.records_with_personal = 0
        self.requests_checked = 0
        self.requests_with_personal = 0
        self.retry_records = 0
        self.early: list[tuple[str, str, int]] = []
        #: The first body each trade was delivered with, per adapter: the report shows one.
        self.payloads: dict[tuple[str, str], dict[str, Any]] = {}

    def close(self) -> None:
        self._consumer.close()

    # -- reading -----------------------------------------------------------------------------

    def poll(self) -> list[Event]:
        """Everything that arrived since the last call, oldest first; never blocks."""
        events: list[Event] = []
        for _ in range(20):  # bounded, so a flood cannot starve the display
            batch = self._consumer.consume(500, 0)
            if not batch:
                break
            for msg in batch:
                if msg.error() is None:
                    events += self._record(msg)
        events += self._requests()
        events.sort(key=lambda e: e.at_ms)
        return events

    def catch_up(self, timeout: float = 10.0) -> list[Event]:
        """Read up to the end of every watched partition, so the summary counts every record
        written before the pipeline stopped (the reader otherwise trails by up to a tick)."""
        from confluent_kafka import KafkaException

        deadline = time.monotonic() + timeout
        ends: dict[tuple[str, int], int] = {}
        for tp in self._partitions:
            try:
                _low, high = self._consumer.get_watermark_offsets(tp, timeout=5, cached=False)
            except KafkaException:
                continue
            ends[(tp.topic, tp.partition)] = high
        events: list[Event] = []
        while time.monotonic() < deadline:
            positions = self._consumer.position(self._partitions)
            behind = [
                p
                for p in positions
                if ends.get((p.topic, p.partition), 0) > 0
                and p.offset < ends[(p.topic, p.partition)]
            ]
            if not behind:
                break
            for msg in self._consumer.consume(500, 0.2):
                if msg.error() is None:
                    events += self._record(msg)
        events += self._requests()
        events.sort(key=lambda e: e.at_ms)
        return events

    def _record(self, msg: Any) -> list[Event]:
        from consumer.tracecodec import trade_id_of

        topic = msg.topic() or ""
        headers = msg.headers()
        if topic == self.ingest_dlq_topic:
            return self._rejected(msg)
        self.records_checked += 1
        if self._contains_personal(msg.value() or b"", headers):
            self.records_with_personal += 1
        trade = self._trades.get(trade_id_of(msg.value() or b"") or "")
        if trade is None:
            return []
        at = int(msg.timestamp()[1])
        if topic == self.delay_topic:
            if trade.held_ms is not None:
                return []  # a redelivered copy (at-least-once): nothing new to show
            trade.held_ms = at
            return [
                Event(
                    at,
                    trade.trade_id,
                    f"held until {clock(trade.due_ms, precise=True)} "
                    f"(in {countdown(trade.due_ms - at)}) in {topic}",
                    "dim",
                )
            ]
        if topic in self.sink_topics:
            return self._released(trade, self.sink_topics[topic], at)
        if topic in self.retry_topics:
            return self._retry(trade, topic, headers, at)
        if topic == self.dlq_topic:
            return self._dead(trade, topic, headers, at)
        return []

    def _released(self, trade: TradeState, adapter: str, at: int) -> list[Event]:
        first = trade.released_ms is None
        track = trade.tracks[adapter]
        if track.released_ms is not None:
            return []
        track.released_ms = at
        if not first:
            return []
        lateness = at - trade.due_ms
        tone: Tone = "bad" if lateness < 0 else "plain"
        when = f"{span(lateness)} after due" if lateness >= 0 else f"{span(-lateness)} EARLY"
        return [Event(at, trade.trade_id, f"released {when} to the sink topics", tone)]

    def _retry(self, trade: TradeState, topic: str, headers: Any, at: int) -> list[Event]:
        from consumer import headers as h

        adapter, tier_index, tier = self.retry_topics[topic]
        attempts = h.get_int(headers, h.ATTEMPTS) or 1
        track = trade.tracks[adapter]
        if any(r.attempts == attempts for r in track.retries):
            return []
        self.retry_records += 1
        fact = RetryFact(
            attempts=attempts,
            tier=tier,
            # Failure n normally goes to tier n-1; further means a Retry-After was honoured.
            skipped=tier_index > attempts - 1,
            next_ms=h.get_int(headers, h.RETRY_DUE_MS) or at,
            error=h.get(headers, h.ERROR_MESSAGE) or "failed",
        )
        track.retries.append(fact)
        why = ", skipping ahead for Retry-After" if fact.skipped else ""
        text = (
            f"{adapter}: {_brief(fact.error)} on attempt {attempts} -> retry tier {tier}, "
            f"next attempt at {clock(fact.next_ms, precise=True)}{why}"
        )
        return [Event(at, trade.trade_id, text, "warn")]

    def _dead(self, trade: TradeState, topic: str, headers: Any, at: int) -> list[Event]:
        from consumer import headers as h

        adapter = h.get(headers, h.ADAPTER) or ""
        track = trade.tracks.get(adapter)
        if track is None or track.dead is not None:
            return []
        track.dead = DeadFact(
            attempts=h.get_int(headers, h.ATTEMPTS) or 1,
            error=h.get(headers, h.ERROR_MESSAGE) or "failed",
            error_class=h.get(headers, h.ERROR_CLASS) or "?",
        )
        dead = track.dead
        text = (
            f"{adapter}: {_brief(dead.error)} on attempt {dead.attempts} -> dead letter "
            f"({dead.error_class}) in {topic}"
        )
        return [Event(at, trade.trade_id, text, "bad")]

    def _rejected(self, msg: Any) -> list[Event]:
        from consumer import headers as h

        # Ingest keeps the input's headers on a dead letter, so the demo's own header names the
        # trade and the raw value (personal data) is never even parsed.
        trade = self._trades.get(h.get(msg.headers(), DEMO_TRADE_HEADER) or "")
        if trade is None or trade.rejected is not None:
            return []
        # The reason names fields and rules, never a value (consumer.trade guarantees it).
        trade.rejected = h.get(msg.headers(), h.REASON) or "rejected"
        at = int(msg.timestamp()[1])
        return [Event(at, trade.trade_id, f"rejected by ingest: {trade.rejected}", "bad")]

    def _requests(self) -> list[Event]:
        events: list[Event] = []
        for adapter, receiver in self._receivers.items():
            received = receiver.received
            new, self._seen_requests[adapter] = (
                received[self._seen_requests[adapter] :],
                len(received),
            )
            for request in new:
                events += self._request(adapter, request)
        return events

    def _request(self, adapter: str, request: Received) -> list[Event]:
        self.requests_checked += 1
        if self._contains_personal(request.body, request.headers):
            self.requests_with_personal += 1
        payload = request.payload
        trade_id = payload.get("trade_id") if isinstance(payload, dict) else None
        trade = self._trades.get(trade_id) if isinstance(trade_id, str) else None
        if trade is None:
            return []
        track = trade.tracks[adapter]
        already = track.delivered() is not None
        track.attempts.append(Attempt(request.wall_ms, request.status, request.verified))
        events: list[Event] = []
        if request.wall_ms < trade.due_ms:
            self.early.append((trade.trade_id, adapter, trade.due_ms - request.wall_ms))
            events.append(
                Event(
                    request.wall_ms,
                    trade.trade_id,
                    f"{adapter}: EARLY by {span(trade.due_ms - request.wall_ms)}",
                    "bad",
                )
            )
        if 200 <= request.status < 300 and not already:
            if isinstance(payload, dict):
                self.payloads[(adapter, trade.trade_id)] = payload
            number = len(track.attempts)
            lateness = span(request.wall_ms - trade.due_ms)
            attempt = f" on attempt {number}" if number > 1 else ""
            signed = ", signature verified" if request.verified else ""
            events.append(
                Event(
                    request.wall_ms,
                    trade.trade_id,
                    f"{adapter}: delivered{attempt}, {lateness} after due{signed}",
                    "good",
                )
            )
        return events

    def _contains_personal(self, value: bytes, headers: Any) -> bool:
        parts = [value]
        if headers:
            for _name, header_value in headers.items() if isinstance(headers, dict) else headers:
                if header_value is not None:
                    raw = header_value if isinstance(header_value, bytes) else str(header_value)
                    parts.append(raw if isinstance(raw, bytes) else raw.encode())
        haystack = b"\n".join(parts)
        return any(p in haystack for p in self._personal)


# --------------------------------------------------------------------------------------------
# Rendering states


def release_cell(trade: TradeState, now: int) -> Segment:
    if trade.rejected is not None:
        return "rejected", "bad"
    released = trade.released_ms
    if released is not None:
        return f"+{span(released - trade.due_ms)}", "plain"
    if trade.held_ms is not None:
        return f"held, {countdown(trade.due_ms - now)}", "dim"
    if trade.published_ms is not None:
        return "published", "dim"
    return "", "dim"


def track_cell(trade: TradeState, adapter: str, now: int) -> Segment:
    track = trade.tracks[adapter]
    done = track.delivered()
    if done is not None:
        number, attempt = done
        text = f"delivered +{span(attempt.at_ms - trade.due_ms)}"
        return (text + (f" (try {number})" if number > 1 else "")), "good"
    if track.dead is not None:
        return f"dead letter ({short_error(track.dead.error)})", "bad"
    last = track.retries[-1] if track.retries else None
    tried = len(track.attempts)
    if last is not None and tried <= last.attempts:
        left = last.next_ms - now
        when = f"retry in {countdown(left)}" if left > 0 else "retrying"
        return f"{short_error(last.error)}, {when}", "warn"
    if tried and not track.attempts[-1].ok:
        return f"{track.attempts[-1].status}, rescheduling", "warn"
    if track.released_ms is not None:
        return "sending", "plain"
    return "waiting", "dim"


def progress_text(trades: Sequence[TradeState], now: int) -> str:
    """One line of counts: the live header, and the line mode's "still waiting" note."""
    n = len(trades)
    held = [t for t in trades if t.released_ms is None and t.rejected is None]
    parts = []
    for adapter in ADAPTERS:
        tracks = [t.tracks[adapter] for t in trades]
        delivered = sum(1 for t in tracks if t.delivered() is not None)
        dead = sum(1 for t in tracks if t.dead is not None)
        retrying = sum(1 for t in tracks if t.retries and not t.settled)
        text = f"{adapter} {delivered}/{n} delivered"
        if retrying:
            text += f", {retrying} retrying"
        if dead:
            text += f", {dead} dead-lettered"
        parts.append(text)
    if held:
        next_due = min(t.due_ms for t in held)
        parts.append(
            f"{len(held)} held, next due at {clock(next_due)} (in {countdown(next_due - now)})"
        )
    return " | ".join(parts)


@dataclass(frozen=True, slots=True)
class Column:
    title: str
    width: int
    #: Columns are dropped lowest first when the terminal is too narrow.
    priority: int
    cell: Callable[[TradeState, int], Segment]


COLUMNS = (
    Column("trade", 15, 9, lambda t, _now: (t.trade_id, "plain")),
    Column("instr", 6, 1, lambda t, _now: (t.instrument, "dim")),
    # Dropped first after the instrument: the progress line above says when the next is due.
    Column("due at", 8, 2, lambda t, _now: (clock(t.due_ms), "plain")),
    Column("released", 12, 3, release_cell),
    Column(HEALTHY, 22, 5, lambda t, now: track_cell(t, HEALTHY, now)),
    Column(FLAKY, 24, 4, lambda t, now: track_cell(t, FLAKY, now)),
)


def table(trades: Sequence[TradeState], now: int, width: int) -> list[list[Segment]]:
    columns = list(COLUMNS)
    while len(columns) > 3 and sum(c.width + 2 for c in columns) - 2 > width:
        columns.remove(min(columns, key=lambda c: c.priority))

    def row(cells: Sequence[Segment]) -> list[Segment]:
        parts: list[Segment] = []
        for i, ((text, tone), column) in enumerate(zip(cells, columns, strict=True)):
            last = i == len(columns) - 1
            parts.append((text if last else text.ljust(column.width), tone))
            if not last:
                parts.append(("  ", "plain"))
        return _fit(parts, width)

    lines = [row([(c.title, "bold") for c in columns])]
    lines += [row([c.cell(t, now) for c in columns]) for t in trades]
    return lines


class LiveDisplay:
    """Redraws a compact table in place with ANSI escapes, for a person at a terminal."""

    def __init__(self, out: Output, title: str) -> None:
        self._out = out
        self._title = title
        self._drawn = 0
        self._recent: list[Event] = []
        out.write_raw("\x1b[?25l")  # hide the cursor: it would flicker over the table

    def update(self, trades: Sequence[TradeState], events: Sequence[Event], now: int) -> None:
        self._recent = [*self._recent, *events][-RECENT_EVENTS:]
        size = shutil.get_terminal_size((100, 30))
        width = max(40, size.columns - 1)
        lines: list[list[Segment]] = [
            _fit([(self._title, "bold"), (f"  {clock(now)}", "dim")], width),
            _fit([(progress_text(trades, now), "plain")], width),
            [],
        ]
        rows = table(trades, now, width)
        fixed = len(lines) + 3 + RECENT_EVENTS
        room = max(2, size.lines - 1 - fixed)
        if len(rows) > room:
            hidden = len(rows) - room + 1
            rows = [*rows[: room - 1], [(f"… {hidden} more trades", "dim")]]
        lines += rows
        lines += [[], [("recent events", "bold")]]
        for event in self._recent:
            lines.append(
                _fit(
                    [
                        (f"{clock(event.at_ms, precise=True)}  {event.trade_id}  ", "dim"),
                        (event.text, event.tone),
                    ],
                    width,
                )
            )
        lines.append([("Ctrl-C stops the demo cleanly", "dim")])
        self._draw(lines)

    def _draw(self, lines: Sequence[Sequence[Segment]]) -> None:
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        body = "".join(
            "".join(self._out.paint(t, tone) for t, tone in line) + "\x1b[K\n" for line in lines
        )
        self._out.write_raw(up + body + "\x1b[J")
        self._drawn = len(lines)

    def close(self) -> None:
        self._out.write_raw("\x1b[?25h")


class LineDisplay:
    """Appends one line per event, for logs and CI, where redrawing would be noise."""

    def __init__(self, out: Output) -> None:
        self._out = out
        self._last_output = time.monotonic()

    def update(self, trades: Sequence[TradeState], events: Sequence[Event], now: int) -> None:
        for event in events:
            self._out.segments(
                [
                    (f"{clock(event.at_ms, precise=True)}  {event.trade_id}  ", "plain"),
                    (event.text, event.tone),
                ]
            )
        if events:
            self._last_output = time.monotonic()
        elif time.monotonic() - self._last_output >= QUIET_PROGRESS_S:
            self._out.line(f"{clock(now, precise=True)}  waiting: {progress_text(trades, now)}")
            self._last_output = time.monotonic()

    def close(self) -> None:
        """Nothing to restore: line mode never touches the terminal state."""


# --------------------------------------------------------------------------------------------
# Setting things up


def _free_port() -> int:
    """A port for the metrics server: the runner takes a number, and 0 there means "off"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[str]:
    """Set a variable for the demo's lifetime only: a test calling main() must not inherit it."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield value
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Point file descriptor 2 at the pipeline log while the demo runs.

    librdkafka writes its own messages (a coordinator still loading, a reconnect) straight to
    fd 2, bypassing Python logging; on the terminal they would land in the middle of the live
    table. They stay available in the log, next to the stages' lines.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("ab") as target:
        os.dup2(target.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _pipeline_log(path: Path) -> Iterator[None]:
    """Send the stages' structured log to a file: on the terminal it would tear the table
    apart, and it is still there to read afterwards. The previous setup is restored."""
    from consumer import log

    root = logging.getLogger(log.LOGGER_NAME)
    saved = (list(root.handlers), root.level, root.propagate)
    log.configure("INFO", "text")
    formatter = root.handlers[0].formatter
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(formatter)
    root.handlers[:] = [handler]
    try:
        yield
    finally:
        handler.close()
        root.handlers[:], root.level, root.propagate = saved


def demo_config(
    *,
    bootstrap_servers: str,
    prefix: str,
    window: timedelta,
    tiers: Sequence[timedelta],
    urls: Mapping[str, str],
    metrics_port: int,
    export_dir: Path | None = None,
) -> dict[str, Any]:
    """The configuration as plain data: what runs is exactly what ``--config-out`` writes."""
    exports: list[dict[str, Any]] = []
    if export_dir is not None:
        # JSON Lines files for auditors. Small batches so a handful of trades makes several
        # files; what is still open at the end is written by the stop (no idle flush: the
        # files stay exactly-once).
        exports.append({"name": ARCHIVE, "type": "file", "path": str(export_dir), "max_records": 4})
    return {
        "kafka": {"bootstrap_servers": bootstrap_servers},
        "input": {"topic": f"{prefix}.trade.closed", "format": "json", "group": f"{prefix}-ingest"},
        "topics": {"prefix": prefix, "partitions": 3},
        "delay": {"window": format_duration(window), "group": f"{prefix}-release"},
        "retry": {"tiers": [format_duration(t) for t in tiers]},
        "adapters": [
            {
                "name": name,
                "type": "webhook",
                "url": urls[name],
                "secrets": [{"env": SECRET_ENV}],
                "timeout": "5s",
            }
            for name in ADAPTERS
        ]
        + exports,
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "shutdown": {"grace": "10s"},
        "logging": {"level": "INFO", "format": "text"},
    }


def _write_config(path: Path, config: Mapping[str, Any]) -> None:
    import yaml

    header = (
        "# auto-trace configuration written by `auto-trace demo`: the settings it ran with.\n"
        "# A starting example: point kafka.bootstrap_servers at your cluster and the adapters at\n"
        "# your trackers, put the Standard Webhooks secret (whsec_...) in the environment\n"
        f"# variable {SECRET_ENV}, then:\n"
        "#   auto-trace topics create --config THIS_FILE\n"
        "#   auto-trace run --role all --config THIS_FILE\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")


def _create_topics(settings: Settings) -> list[str]:
    """The pipeline's topics plus the input topic, which in production belongs to the platform."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    from consumer.topics import create_topics, planned_topics

    create_topics(settings)
    admin = AdminClient(settings.kafka.librdkafka())
    partitions = settings.topics.partitions
    futures = admin.create_topics(
        [NewTopic(settings.input.topic, partitions, -1)], operation_timeout=TOPICS_TIMEOUT_S
    )
    try:
        futures[settings.input.topic].result(timeout=TOPICS_TIMEOUT_S)
    except KafkaException as exc:
        error = exc.args[0]
        if not (isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS):
            raise
    names = [settings.input.topic, *(s.name for s in planned_topics(settings))]
    _wait_for_leaders(admin, names)
    return names


def _wait_for_leaders(admin: Any, names: Sequence[str]) -> None:
    """Creation is acknowledged before every partition has a leader; consumers assigned a
    leaderless partition would start late and make the first trades look slow."""
    from confluent_kafka import KafkaException

    deadline = time.monotonic() + TOPICS_TIMEOUT_S
    pause = threading.Event()
    missing = list(names)
    while time.monotonic() < deadline:
        try:
            listed = admin.list_topics(timeout=5).topics
        except KafkaException:
            listed = {}
        missing = [
            n
            for n in names
            if n not in listed
            or listed[n].error is not None
            or any(p.leader < 0 for p in listed[n].partitions.values())
        ]
        if not missing:
            return
        pause.wait(0.1)  # poll interval, bounded by the deadline above
    raise DemoError(f"topics not ready after {TOPICS_TIMEOUT_S:.0f} s: {', '.join(missing)}")


class Pipeline:
    """The runner in a thread, so the main thread is free to watch and draw.

    Stopping goes through ``runner.stop``, the event the runner's SIGTERM/SIGINT handler sets:
    the demo's own end, Ctrl-C and a ``kill`` all take the one shutdown path production uses.
    """

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.code: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pipeline", daemon=True)
        self._handlers: dict[int, Any] = {}

    def _run(self) -> None:
        try:
            self.code = self.runner.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
            self.runner.stop.set()

    def start(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
            self.runner.install_signal_handlers()
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def wait_ready(self, timeout: float) -> float:
        """Seconds until every stage had its partitions; the trades are published only then,
        so the first "held" is seen at once rather than after a group join."""
        started = time.monotonic()
        deadline = started + timeout
        health = self.runner.health
        while not health.ready()[0]:
            if self.runner.stop.is_set():
                raise _Stopped
            if time.monotonic() > deadline:
                _ok, state = health.ready()
                waiting = ", ".join(sorted(s for s, ready in state.items() if not ready))
                raise DemoError(f"the pipeline was not ready after {timeout:.0f} s ({waiting})")
            health.wait_changed(0.2)
        return time.monotonic() - started

    def stop(self) -> float:
        """Stop as SIGTERM would and wait for the runner's grace period; seconds it took."""
        started = time.monotonic()
        self.runner.stop.set()
        self._thread.join(self.runner.settings.shutdown.grace.total_seconds() + 5)
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        self._handlers = {}
        return time.monotonic() - started

    @property
    def failed_stages(self) -> list[str]:
        return list(self.runner.failed)


class _Stopped(Exception):
    """The runner's stop event was set from outside (a signal, or a stage that crashed)."""


# --------------------------------------------------------------------------------------------
# The run


@dataclass(slots=True)
class Context:
    """Everything the final report needs to say where things are."""

    cluster: Cluster
    settings: Settings
    work_dir: Path
    config_path: Path
    config_out: Path | None
    metrics_url: str


def _run(args: argparse.Namespace, out: Output) -> int:
    from consumer import broker
    from consumer.receiver import WebhookReceiver

    tag = uuid.uuid4().hex[:6]
    prefix = f"demo-{tag}"
    work_dir: Path = args.work_dir or Path(tempfile.mkdtemp(prefix=f"auto-trace-{prefix}-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    tiers: list[timedelta] = args.retry_tiers
    out.line(f"auto-trace demo  ({prefix})", "bold")
    out.line(
        f"  {args.trades} sample trades closing now -> ingest (strip personal data) -> hold "
        f"{format_duration(args.window)} -> release -> {HEALTHY} and {FLAKY} (webhooks)"
    )
    out.line()
    if os.environ.get(broker.BOOTSTRAP_ENV, "").strip():
        out.line(f"kafka     using ${broker.BOOTSTRAP_ENV}")
    else:
        out.line(f"kafka     ${broker.BOOTSTRAP_ENV} is not set: starting a throwaway local broker")
        out.line(
            "          (Docker if available, else the JVM; a first run resolves jars with Maven)…"
        )
    log_path = work_dir / "pipeline.log"
    ids = [_trade_id(args.seed, i) for i in range(args.trades)]
    plan = {trade_id: behaviour_for(i) for i, trade_id in enumerate(ids)}
    with broker.kafka_cluster() as cluster:
        out.line(f"          {cluster.bootstrap_servers} ({_cluster_kind(cluster)})")
        try:
            with (
                _env(SECRET_ENV, _new_secret()) as secret,
                _stderr_to(log_path),
                _pipeline_log(log_path),
            ):
                try:
                    with (
                        WebhookReceiver(secret, fail=ScriptedPolicy({})) as healthy,
                        WebhookReceiver(secret, fail=ScriptedPolicy(plan)) as flaky,
                    ):
                        receivers = {HEALTHY: healthy, FLAKY: flaky}
                        return _with_receivers(
                            args, out, cluster, prefix, work_dir, tiers, receivers
                        )
                finally:
                    # A sink worker and its consumer's rebalance callbacks form a reference
                    # cycle: collect it now, or its producer outlives the broker and fills
                    # stderr with reconnect failures after the demo has finished.
                    gc.collect()
        finally:
            if cluster.local is not None:
                # The broker's folder goes with it; its log is worth keeping.
                with contextlib.suppress(OSError):
                    shutil.copyfile(cluster.local.log_path, work_dir / "broker.log")


def _cluster_kind(cluster: Cluster) -> str:
    if cluster.kind == "external":
        return "an existing cluster: left running, its demo topics are kept"
    if cluster.kind == "local":
        return "a local JVM broker started for this run, stopped and removed at the end"
    return "a Docker container started for this run, removed at the end"


def _trade_id(seed: int, index: int) -> str:
    from consumer.samples import sample_trade

    return str(sample_trade(index, seed=seed)["trade_id"])


def _with_receivers(
    args: argparse.Namespace,
    out: Output,
    cluster: Cluster,
    prefix: str,
    work_dir: Path,
    tiers: list[timedelta],
    receivers: Mapping[str, WebhookReceiver],
) -> int:
    from consumer.config import load_settings
    from consumer.runner import Runner

    port = args.metrics_port or _free_port()
    config = demo_config(
        bootstrap_servers=cluster.bootstrap_servers,
        prefix=prefix,
        window=args.window,
        tiers=tiers,
        urls={name: r.url for name, r in receivers.items()},
        metrics_port=port,
        export_dir=work_dir / "export",
    )
    config_path = work_dir / "config.yaml"
    _write_config(config_path, config)
    if args.config_out is not None:
        _write_config(args.config_out, config)
    settings = load_settings(None, **config)
    topic_names = _create_topics(settings)
    out.line(f"topics    {len(topic_names)} created with prefix {prefix}")
    out.line(f"receivers {HEALTHY:<10} {receivers[HEALTHY].url}  accepts every signed request")
    out.line(f"          {FLAKY:<10} {receivers[FLAKY].url}  answers per trade, see below")
    out.line(f"          both verify the Standard Webhooks signature (secret from ${SECRET_ENV})")
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    ctx = Context(
        cluster=cluster,
        settings=settings,
        work_dir=work_dir,
        config_path=config_path,
        config_out=args.config_out,
        metrics_url=metrics_url,
    )
    pipeline = Pipeline(Runner(settings, "all"))
    pipeline.start()
    try:
        out.line(f"metrics   {metrics_url}  (also /healthz and /readyz)")
        try:
            took = pipeline.wait_ready(READY_TIMEOUT_S)
        except _Stopped:
            return _finish_early(out, ctx, pipeline, "interrupted before the trades were sent")
        stages = ", ".join(s.name for s in pipeline.runner.stages)
        out.line(f"pipeline  {stages}: ready in {took:.1f} s")
        out.line(f"          stage logs: {work_dir / 'pipeline.log'}")
        return _publish_and_watch(args, out, ctx, pipeline, receivers)
    finally:
        if pipeline.alive:
            pipeline.stop()


def _personal_values(trades: Sequence[Mapping[str, Any]]) -> set[str]:
    from consumer.samples import PERSONAL_FIELDS

    return {str(t[f]) for t in trades for f in PERSONAL_FIELDS if t.get(f)}


def _show_input(out: Output, trades: Sequence[Mapping[str, Any]], topic: str) -> None:
    """The only place personal data is printed: to show that it went in."""
    from consumer.samples import PERSONAL_FIELDS

    out.line()
    out.line(f"input (contains personal data): {len(trades)} trades for {topic}", "bold")
    first = trades[0]
    out.line("  the first one in full, as the platform publishes it (JSON):", "dim")
    width = max(len(k) for k in first)
    for key, value in first.items():
        mark = "   <- personal" if key in PERSONAL_FIELDS else ""
        out.line(f"    {key:<{width}}  {json.dumps(value, ensure_ascii=False)}{mark}")
    out.line("  all of them, with some of their personal fields:", "dim")
    for trade in trades:
        out.line(
            f"    {trade['trade_id']}  {trade['instrument']:<6}  {trade['user_name']:<16} "
            f"{trade['user_email']:<30} {trade['client_ip'] or '-'}"
        )
    out.line(f"-- {END_OF_INPUT} --", "dim")


def _show_plan(out: Output, states: Sequence[TradeState]) -> None:
    out.line()
    out.line(f"{FLAKY} will answer:", "bold")
    groups: dict[str, list[str]] = {}
    for state in states:
        groups.setdefault(state.behaviour.label, []).append(state.trade_id)
    for label, ids in groups.items():
        out.line(f"  {label:<40} {', '.join(ids)}")
    out.line()


def _publish_and_watch(
    args: argparse.Namespace,
    out: Output,
    ctx: Context,
    pipeline: Pipeline,
    receivers: Mapping[str, WebhookReceiver],
) -> int:
    from consumer.samples import sample_trade

    settings = ctx.settings
    window_ms = int(args.window / timedelta(milliseconds=1))
    close = now_ms()
    # A millisecond apart so that close times, and so due times, are in publication order.
    trades = [sample_trade(i, seed=args.seed, close_time_ms=close + i) for i in range(args.trades)]
    states = [
        TradeState(
            trade_id=str(t["trade_id"]),
            instrument=str(t["instrument"]),
            due_ms=close + i + window_ms,
            behaviour=behaviour_for(i),
        )
        for i, t in enumerate(trades)
    ]
    _show_input(out, trades, settings.input.topic)
    _show_plan(out, states)
    personal = _personal_values(trades)
    observer = Observer(settings, states, receivers, personal)
    try:
        published = _publish(settings, trades, states)
        out.line(
            f"published {published} trades at {clock(close, precise=True)}; due from "
            f"{clock(states[0].due_ms, precise=True)} (close_time + {format_duration(args.window)})"
        )
        out.line()
        outcome = _watch(args, out, ctx, pipeline, observer, states)
        report = Report(ctx, pipeline, observer, states, trades, args.timeout)
        return report.finish(out, outcome)
    finally:
        observer.close()


def _publish(
    settings: Settings, trades: Sequence[dict[str, Any]], states: Sequence[TradeState]
) -> int:
    from consumer import headers as h
    from consumer.clients import make_producer
    from consumer.samples import to_json

    producer = make_producer(settings)
    by_id = {s.trade_id: s for s in states}
    failures: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        key = h.get(msg.headers(), DEMO_TRADE_HEADER) or ""
        if err is not None:
            failures.append(str(err))
        elif key in by_id:
            by_id[key].published_ms = int(msg.timestamp()[1])

    for trade in trades:
        key = str(trade["signal_id"] or trade["trade_id"]).encode()
        producer.produce(
            settings.input.topic,
            value=to_json(trade),
            key=key,
            # Only to match acknowledgements to trades; ingest does not read it.
            headers=[(DEMO_TRADE_HEADER, str(trade["trade_id"]).encode())],
            on_delivery=on_delivery,
        )
    left = producer.flush(30)
    if left or failures:
        raise DemoError(f"publishing failed: {left} unacknowledged, errors: {failures[:3]}")
    return len(trades)


Outcome = Literal["done", "timeout", "stopped"]


def _watch(
    args: argparse.Namespace,
    out: Output,
    ctx: Context,
    pipeline: Pipeline,
    observer: Observer,
    states: Sequence[TradeState],
) -> Outcome:
    title = (
        f"auto-trace demo · {ctx.settings.topics.prefix} · window {format_duration(args.window)}"
        f" · retry tiers {', '.join(format_duration(t) for t in args.retry_tiers)}"
    )
    display: LiveDisplay | LineDisplay = LiveDisplay(out, title) if out.live else LineDisplay(out)
    deadline = time.monotonic() + args.timeout.total_seconds()
    stop = pipeline.runner.stop
    outcome: Outcome = "stopped"
    try:
        while True:
            tick_end = time.monotonic() + TICK_S
            events = observer.poll()
            if all(s.settled for s in states):
                display.update(states, [*events, *observer.catch_up()], now_ms())
                outcome = "done"
                break
            display.update(states, events, now_ms())
            if stop.is_set():
                break
            if time.monotonic() > deadline:
                outcome = "timeout"
                break
            # The refresh tick; a signal sets `stop` and ends the wait at once.
            stop.wait(max(0.0, tick_end - time.monotonic()))
    finally:
        display.close()
    return outcome


# --------------------------------------------------------------------------------------------
# The report


def _scrape_deliveries(url: str) -> dict[tuple[str, str], float]:
    """The pipeline's own counters, read from its metrics endpoint like Prometheus would."""
    import urllib.error
    import urllib.request

    pattern = re.compile(
        r'^auto_trace_deliveries_total\{adapter="([^"]+)",outcome="([^"]+)"\} (\S+)$'
    )
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except (OSError, urllib.error.URLError):
        return {}
    found: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            found[(match.group(1), match.group(2))] = float(match.group(3))
    return found


def _finish_early(out: Output, ctx: Context, pipeline: Pipeline, why: str) -> int:
    out.line()
    out.line(f"{why}: stopping the pipeline the way SIGTERM does…", "warn")
    took = pipeline.stop()
    out.line(f"pipeline stopped in {took:.1f} s")
    _where(out, ctx)
    return EXIT_INTERRUPTED


class Report:
    """Stops the pipeline and tells what happened, judged against the service's promises."""

    def __init__(
        self,
        ctx: Context,
        pipeline: Pipeline,
        observer: Observer,
        states: Sequence[TradeState],
        trades: Sequence[Mapping[str, Any]],
        timeout: timedelta,
    ) -> None:
        self.ctx = ctx
        self.pipeline = pipeline
        self.observer = observer
        self.states = states
        self.trades = trades
        self.timeout = timeout

    def finish(self, out: Output, outcome: Outcome) -> int:
        pipeline = self.pipeline
        crashed = pipeline.failed_stages or pipeline.error is not None
        if outcome == "stopped" and not crashed:
            return _finish_early(out, self.ctx, pipeline, "interrupted")
        # Read while the pipeline still serves it: the endpoint goes away with the runner.
        counters = _scrape_deliveries(self.ctx.metrics_url)
        out.line()
        out.line("stopping the pipeline the way SIGTERM does (stop fetching, finish, commit)…")
        took = pipeline.stop()
        clean = pipeline.code == 0 and not pipeline.alive
        out.line(
            f"pipeline stopped {'cleanly' if clean else 'with errors'} in {took:.1f} s",
            "plain" if clean else "bad",
        )
        self.summary(out, counters)
        if outcome == "done":
            self.sample(out)
        _where(out, self.ctx)
        problems = self.problems(outcome, clean)
        if problems:
            self.log_tail(out)
        out.line()
        for problem in problems:
            out.line(f"demo failed: {problem}", "bad")
        if problems:
            return EXIT_FAILED
        out.line("demo finished: every trade settled and every promise held.", "good")
        return EXIT_OK

    def log_tail(self, out: Output, lines: int = 20) -> None:
        """The end of the pipeline log, so a failed run in CI explains itself in place.

        Safe to print: stage logs carry ids, positions and classes, never a record's values.
        """
        path = self.ctx.work_dir / "pipeline.log"
        try:
            tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        except OSError:
            return
        out.line()
        out.line(f"last lines of {path}:", "bold")
        for line in tail:
            out.line(f"  {line}", "dim")

    def problems(self, outcome: Outcome, clean: bool) -> list[str]:
        log_path = self.ctx.work_dir / "pipeline.log"
        problems = []
        if outcome == "timeout":
            now = now_ms()
            pending = [
                f"{s.trade_id} ({release_cell(s, now)[0]}; "
                + "; ".join(f"{a}: {track_cell(s, a, now)[0]}" for a in ADAPTERS)
                + ")"
                for s in self.states
                if not s.settled
            ]
            problems.append(
                f"timed out: {len(pending)} of {len(self.states)} trades not settled "
                f"{format_duration(self.timeout)} after publishing: {', '.join(pending)}"
            )
        failed = self.pipeline.failed_stages
        if failed or self.pipeline.error is not None:
            what = ", ".join(failed) or repr(self.pipeline.error)
            problems.append(f"the pipeline failed ({what}); see {log_path}")
        elif not clean:
            problems.append(f"the pipeline did not stop cleanly; see {log_path}")
        rejected = [s.trade_id for s in self.states if s.rejected]
        if rejected:
            problems.append(f"rejected by ingest: {', '.join(rejected)}")
        observer = self.observer
        if observer.early or observer.requests_with_personal or observer.records_with_personal:
            problems.append("a promise was broken: see the summary above")
        return problems

    def summary(self, out: Output, counters: Mapping[tuple[str, str], float]) -> None:
        states, observer, settings = self.states, self.observer, self.ctx.settings
        n = len(states)
        tracks = [(a, s, s.tracks[a]) for s in states for a in ADAPTERS]
        out.line()
        out.line("summary", "bold")
        out.line(f"  published                {n} trades to {settings.input.topic}")
        delivered = {a: sum(1 for b, _s, t in tracks if b == a and t.delivered()) for a in ADAPTERS}
        out.line(
            "  delivered                " + ", ".join(f"{a} {delivered[a]}/{n}" for a in ADAPTERS),
            "good" if delivered[HEALTHY] == n else "bad",
        )
        reasons: dict[str, int] = {}
        for _a, _s, track in tracks:
            for retry in track.retries:
                label = _brief(retry.error) + (" + Retry-After" if retry.skipped else "")
                reasons[label] = reasons.get(label, 0) + 1
        retried = sum(1 for _a, _s, t in tracks if t.retries)
        why = ", ".join(f"{k} x{v}" for k, v in sorted(reasons.items()))
        out.line(
            f"  retried                  {observer.retry_records} retries of {retried} trades"
            + (f" ({why})" if why else "")
        )
        dead = [f"{a}: {s.trade_id} {t.dead.error}" for a, s, t in tracks if t.dead is not None]
        out.line(
            f"  dead-lettered            {len(dead)}" + (f" ({'; '.join(dead)})" if dead else "")
        )
        early = len(observer.early)
        out.line(
            f"  early deliveries         {early} (requests that reached a receiver before "
            f"close_time + {format_duration(settings.delay.window)})",
            "good" if early == 0 else "bad",
        )
        firsts = [t.attempts[0].at_ms - s.due_ms for _a, s, t in tracks if t.attempts]
        releases = [t.released_ms - s.due_ms for _a, s, t in tracks if t.released_ms is not None]
        if firsts:
            out.line(
                f"  lateness after due       p50 {span(statistics.median(firsts))}, "
                f"max {span(max(firsts))} (first delivery attempts, {len(firsts)} requests)"
            )
        if releases:
            out.line(
                f"                           p50 {span(statistics.median(releases))}, "
                f"max {span(max(releases))} (release to the sink topics)"
            )
        requests = [a for _a, _s, t in tracks for a in t.attempts]
        verified = sum(1 for a in requests if a.verified)
        out.line(f"  signatures               {verified}/{len(requests)} requests verified")
        if counters:
            per_adapter = " | ".join(
                f"{a} "
                + ", ".join(f"{o} {v:.0f}" for (b, o), v in sorted(counters.items()) if b == a)
                for a in ADAPTERS
            )
            out.line(f"  metrics endpoint         {per_adapter} (auto_trace_deliveries_total)")
        out.line(
            f"  personal fields found at the receivers: {observer.requests_with_personal} "
            f"(checked {observer.requests_checked} requests, bodies and headers)",
            "good" if observer.requests_with_personal == 0 else "bad",
        )
        out.line(
            f"  personal fields found in the internal topics: {observer.records_with_personal} "
            f"(checked {observer.records_checked} records: delay, sink, retry and DLQ topics)",
            "good" if observer.records_with_personal == 0 else "bad",
        )
        self.export_summary(out)

    def export_summary(self, out: Output) -> None:
        """What the file adapter wrote: read back from disk once the stop flushed its batches."""
        root = self.ctx.work_dir / "export"
        files = sorted(root.rglob("*.jsonl")) if root.exists() else []
        ids: list[str] = []
        raw = b""
        for path in files:
            data = path.read_bytes()
            raw += data
            ids += [json.loads(line)["trade_id"] for line in data.splitlines() if line]
        expected = {t["trade_id"] for t in self.trades}
        exactly_once = sorted(ids) == sorted(expected)
        out.line(
            f"  file export ({ARCHIVE})     {len(set(ids) & expected)}/{len(expected)} trades in "
            f"{len(files)} files under {root}"
            + (", each exactly once" if exactly_once else f" ({len(ids)} lines)"),
            "good" if exactly_once else "bad",
        )
        if files:
            out.line(f"                           e.g. {files[0].relative_to(root)}", "dim")
        leaked = [v for v in _personal_values(self.trades) if v.encode() in raw]
        out.line(
            f"  personal fields found in the exported files: {len(leaked)}",
            "good" if not leaked else "bad",
        )

    def sample(self, out: Output) -> None:
        """One record as the tracker got it, to compare with the input shown at the start."""
        from consumer.samples import PERSONAL_FIELDS

        first = self.states[0]
        payload = self.observer.payloads.get((HEALTHY, first.trade_id))
        if payload is None:
            return
        out.line()
        out.line(
            f"what {HEALTHY} received for {first.trade_id} (signed, no personal data):", "bold"
        )
        width = max(len(k) for k in payload)
        for key, value in payload.items():
            out.line(f"    {key:<{width}}  {json.dumps(value, ensure_ascii=False)}")
        absent = [f for f in PERSONAL_FIELDS if f in self.trades[0] and f not in payload]
        out.line(f"    not sent: {', '.join(absent)}", "dim")


def _where(out: Output, ctx: Context) -> None:
    settings = ctx.settings
    prefix = settings.topics.prefix
    cluster = ctx.cluster
    out.line()
    out.line("where everything is", "bold")
    out.line(f"  bootstrap servers  {cluster.bootstrap_servers} ({_cluster_kind(cluster)})")
    if cluster.local is not None:
        out.line(
            f"  broker log         {ctx.work_dir / 'broker.log'} (copied from "
            f"{cluster.local.log_path}, which goes with the broker)"
        )
    else:
        out.line("  broker log         not managed by the demo (it did not start the broker)")
    tiers = ",".join(format_duration(t) for t in settings.retry.tiers)
    groups = [
        ("input", [settings.input.topic]),
        ("delay", [f"{prefix}.delay"]),
        ("sink", [f"{prefix}.sink.{a}" for a in ADAPTERS]),
        (
            "retry",
            [f"{prefix}.retry.{a}.{{{tiers}}}" for a in ADAPTERS],
        ),
        ("dlq", [f"{prefix}.dlq"]),
        ("ingest dlq", [f"{prefix}.dlq.ingest (raw input: personal data)"]),
    ]
    label = "topics"
    for kind, names in groups:
        for name in names:
            out.line(f"  {label:<18} {kind:<11} {name}")
            label = kind = ""
    out.line(f"  metrics            {ctx.metrics_url} (served while the pipeline ran)")
    out.line(f"  pipeline log       {ctx.work_dir / 'pipeline.log'}")
    out.line(f"  configuration      {ctx.config_path}")
    if ctx.config_out is not None:
        out.line(f"                     {ctx.config_out}")
    example = ctx.config_out or Path("auto-trace.yaml")
    out.line()
    out.line("run it against a real cluster", "bold")
    if ctx.config_out is None:
        out.line("  auto-trace demo --config-out auto-trace.yaml   # a starting configuration")
    out.line(f"  # edit {example}: kafka.bootstrap_servers and the adapters, and put")
    out.line(f"  # the trackers' Standard Webhooks secret (whsec_...) in ${SECRET_ENV}")
    out.line(f"  auto-trace topics create --config {example}")
    out.line(f"  auto-trace run --role all --config {example}")
