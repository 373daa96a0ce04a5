"""The chaos run's own Kafka clients: the publisher of ``trade.closed`` and topic readers.

They live through broker restarts like the stages do (librdkafka reconnects); their librdkafka
log goes to a file in the run's folder rather than the terminal, since refused connections are
the expected state while the broker is down.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from chaos.poison import POISON_HEADER, Format, Poison, make_poison
from consumer.samples import PERSONAL_FIELDS, sample_trade, to_avro, to_json

#: Input records can be this large (the oversized poison); the input topic allows it too.
MAX_INPUT_BYTES = 8 * 1024 * 1024


def client_logger(path: Path) -> logging.Logger:
    """A logger writing librdkafka's messages of the chaos run's own clients to ``path``."""
    logger = logging.getLogger("chaos.kafka")
    logger.handlers[:] = [logging.FileHandler(path)]
    logger.handlers[0].setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------------------------
# Publishing trade.closed

_STREETS = ("Example Street", "Sample Road", "Test Lane", "Placeholder Avenue", "Demo Close")
_TOWNS = ("Springfield", "Exampleton", "Fakesbury", "Mocktown")


@dataclass
class Published:
    """What the publisher sent, for the checks: trades by id, poison by id, personal values."""

    trades: dict[str, dict[str, Any]] = field(default_factory=dict)
    close_ms: dict[str, int] = field(default_factory=dict)
    poison: dict[str, Poison] = field(default_factory=dict)
    acked_trades: set[str] = field(default_factory=set)
    acked_poison: set[str] = field(default_factory=set)
    #: (field, value) of every personal value in any input, valid or poison.
    personal: list[tuple[str, str]] = field(default_factory=list)
    #: Produce attempts the broker did not acknowledge, sent again.
    resent: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    fatal: str | None = None


class Publisher:
    """Publishes ``trades`` valid trades and the given poison records, spread evenly over
    ``spread_s`` seconds, in a thread; every unacknowledged record is sent again."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        fmt: Format,
        seed: int,
        trades: int,
        poison_kinds: list[str],
        spread_s: float,
        logger: logging.Logger,
    ) -> None:
        self.topic = topic
        self.fmt: Format = fmt
        self.seed = seed
        self.spread_s = spread_s
        self.rng = random.Random(seed * 7919 + 17)
        plan: list[tuple[str, int]] = [("trade", i) for i in range(trades)]
        for n in range(len(poison_kinds)):
            plan.insert(self.rng.randrange(len(plan) + 1), ("poison", n))
        self.plan = plan
        self.poison_kinds = poison_kinds
        self.out = Published()
        self.sent = 0
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._again: list[
            tuple[bytes | None, bytes | None, list[tuple[str, str | bytes | None]], str]
        ] = []
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "message.max.bytes": MAX_INPUT_BYTES,
                "logger": logger,
            }
        )
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            started = time.monotonic()
            for index, (kind, number) in enumerate(self.plan):
                slot = started + self.spread_s * index / max(1, len(self.plan))
                while not self._stop.is_set() and time.monotonic() < slot:
                    self._producer.poll(min(0.05, max(0.0, slot - time.monotonic())))
                    self._send_again()
                if self._stop.is_set() or self.out.fatal:
                    return
                if kind == "trade":
                    self._trade(number)
                else:
                    self._poison(number)
                self.sent += 1
                self._producer.poll(0)
            # Everything is handed over: wait for every acknowledgement, sending again what
            # failed (a broker restart can outlast a request's retries).
            while not self._stop.is_set() and not self.out.fatal:
                self._send_again()
                if len(self._producer) == 0 and not self._again:
                    break
                self._producer.flush(0.5)
        finally:
            self.finished.set()

    def _trade(self, i: int) -> None:
        trade = sample_trade(i, seed=self.seed, close_time_ms=now_ms() - self.rng.randint(0, 2000))
        for name in PERSONAL_FIELDS:
            if trade.get(name):
                self.out.personal.append((name, str(trade[name])))
        if self.fmt == "json" and self.rng.random() < 0.25:
            # Fields the contract does not know: ignored by ingest, so they must vanish too.
            trade["phone"] = f"+44 20 7946 0{self.rng.randint(0, 999):03d}"
            trade["home_address"] = (
                f"{self.rng.randint(1, 299)} {self.rng.choice(_STREETS)}, {self.rng.choice(_TOWNS)}"
            )
            self.out.personal += [
                ("phone", trade["phone"]),
                ("home_address", trade["home_address"]),
            ]
        trade_id = str(trade["trade_id"])
        self.out.trades[trade_id] = trade
        self.out.close_ms[trade_id] = now_ms_of(trade["close_time"])
        value = to_json(trade) if self.fmt == "json" else to_avro(trade)
        key = str(trade["signal_id"] or trade_id).encode()
        self._produce(key, value, [], f"trade:{trade_id}")

    def _poison(self, n: int) -> None:
        poison = make_poison(n, self.poison_kinds[n], self.rng, self.fmt, now_ms())
        self.out.poison[poison.pid] = poison
        self.out.personal += list(poison.personal.items())
        headers: list[tuple[str, str | bytes | None]] = [(POISON_HEADER, poison.pid.encode())]
        self._produce(poison.key, poison.value, headers, f"poison:{poison.pid}")

    def _produce(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, str | bytes | None]],
        ident: str,
    ) -> None:
        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                kind, _, name = ident.partition(":")
                (self.out.acked_trades if kind == "trade" else self.out.acked_poison).add(name)
                return
            code = err.name()
            self.out.error_codes[code] = self.out.error_codes.get(code, 0) + 1
            if err.fatal():
                self.out.fatal = code
            else:
                self._again.append((key, value, headers, ident))

        while True:
            try:
                self._producer.produce(
                    self.topic, value=value, key=key, headers=headers, on_delivery=on_delivery
                )
            except BufferError:
                self._producer.poll(0.1)
            else:
                return

    def _send_again(self) -> None:
        again, self._again = self._again, []
        for key, value, headers, ident in again:
            self.out.resent += 1
            self._produce(key, value, headers, ident)


def now_ms_of(rfc3339: str) -> int:
    """Epoch ms of an RFC 3339 UTC time as the samples write it."""
    from datetime import datetime

    moment = datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    return int(moment.timestamp() * 1000 + 0.5)


# --------------------------------------------------------------------------------------------
# Reading topics


class TopicTail:
    """Reads topics from the beginning without a consumer group, keeping up as they grow."""

    def __init__(self, bootstrap: str, topics: list[str], logger: logging.Logger) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "chaos-reader-unused",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                "logger": logger,
            }
        )
        self.partitions: list[TopicPartition] = []
        for topic in topics:
            meta = self.consumer.list_topics(topic, timeout=30).topics[topic]
            self.partitions += [
                TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(meta.partitions)
            ]
        self.consumer.assign(self.partitions)
        self._next: dict[tuple[str, int], int] = {}

    def poll(self, on_message: Callable[[Message], None], budget_s: float = 0.2) -> int:
        """Hand every record that arrives within ``budget_s`` to ``on_message``."""
        count = 0
        deadline = time.monotonic() + budget_s
        while True:
            remaining = deadline - time.monotonic()
            batch = self.consumer.consume(1000, max(0.0, min(0.1, remaining)))
            for msg in batch:
                if msg.error() is not None:
                    continue
                self._next[(msg.topic() or "", msg.partition() or 0)] = (msg.offset() or 0) + 1
                on_message(msg)
                count += 1
            # A full batch means more is waiting: keep reading past the budget to catch up.
            if len(batch) < 1000 and time.monotonic() >= deadline:
                return count

    def read_to_end(self, on_message: Callable[[Message], None], timeout: float = 60.0) -> None:
        """Everything up to the high watermarks of now; TimeoutError if it cannot be read."""
        high: dict[tuple[str, int], int] = {}
        deadline = time.monotonic() + timeout
        for tp in self.partitions:
            _low, hi = self.consumer.get_watermark_offsets(
                TopicPartition(tp.topic, tp.partition),
                timeout=max(1.0, deadline - time.monotonic()),
            )
            high[(tp.topic, tp.partition)] = hi
        while any(self._next.get(tp, 0) < hi for tp, hi in high.items()):
            if time.monotonic() > deadline:
                behind = {
                    f"{t}[{p}]": hi for (t, p), hi in high.items() if self._next.get((t, p), 0) < hi
                }
                raise TimeoutError(f"topics not read to their end in {timeout:.0f}s: {behind}")
            self.poll(on_message, 0.2)

    def close(self) -> None:
        self.consumer.close()


def wait_for_leaders(admin: AdminClient, topics: list[str], timeout: float = 60.0) -> None:
    """Creation is acknowledged before every partition has a leader: wait for the leaders."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            meta = admin.list_topics(timeout=5).topics
            ok = all(
                t in meta
                and meta[t].error is None
                and meta[t].partitions
                and all(p.leader >= 0 for p in meta[t].partitions.values())
                for t in topics
            )
        except Exception:  # noqa: BLE001 - any failure: not ready yet
            ok = False
        if ok:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics without leaders after {timeout:.0f}s: {topics}")
        time.sleep(0.2)


__all__ = [
    "MAX_INPUT_BYTES",
    "Published",
    "Publisher",
    "TopicTail",
    "client_logger",
    "now_ms",
    "now_ms_of",
    "wait_for_leaders",
]
