"""The chaos run: the pipeline as separate processes under fire, then the verdict.

    LocalBroker (fixed port) ── stopped and restarted, cleanly and by SIGKILL
    python -m consumer run --role ingest            ┐
    python -m consumer run --role release           │ SIGKILLed at random moments and
    python -m consumer run --role sink --adapter flaky   │ restarted; each scraped on /metrics
    python -m consumer run --role sink --adapter steady  ┘ first
    python -m chaos.receiver (flaky: 10 % answered 503; steady: always 200)
    this process: publishes valid trades and poison records, reads the DLQs and receivers

At the end it checks, and prints:

* **lost = 0**: every valid trade delivered (2xx) to every adapter, or in ``<prefix>.dlq`` with
  that adapter and an error class;
* duplicates: how many, and that every attempt of a trade at an adapter carried one and the same
  ``Idempotency-Key`` (= ``webhook-id``);
* every poison record in ``<prefix>.dlq.ingest``, byte for byte, with an error class and reason;
* no personal value of any input in receiver bodies or headers, in any internal topic but the
  ingest DLQ (keys, values, headers), in any stage's log, or in any ``/metrics`` scrape;
* no delivery before ``close_time + window``; every signature verifies;
* no stage exited on its own (an *unexpected exit* is restarted, reported with its log, and
  fails the run), and every stage exits 0 on the final SIGTERM.

The exit status is 0 only when every check passes.

Why ``session.timeout.ms: 6000`` (the broker's minimum) in the configuration: a SIGKILLed
group member keeps its partitions until its session times out, 45 s by default. With 20 kills
in a few minutes the pipeline would spend most of the run waiting for dead members to be
evicted; at 6 s it recovers in seconds and the run still proves what matters, that a kill
costs time and duplicates but never a record. (The producers ignore this consumer setting,
with a one-line warning in each stage log.)
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from confluent_kafka import Message
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported implicitly
    AdminClient,
    NewTopic,
)

from chaos.kafka import (
    MAX_INPUT_BYTES,
    Publisher,
    TopicTail,
    client_logger,
    wait_for_leaders,
)
from chaos.poison import KINDS, POISON_HEADER, Format, plan_kinds
from chaos.procs import REPO_ROOT, Child, Stage, child_env, fixed_port, tail
from chaos.scan import Leak, Needles
from consumer import headers as h
from consumer.broker import BrokerError, LocalBroker
from consumer.records import DECIMAL_FIELDS, idempotency_key
from consumer.tracecodec import trade_id_of
from consumer.trade import TRACE_FIELDS

PREFIX = "chaos"
INPUT_TOPIC = "chaos.trade.closed"
ADAPTERS = ("flaky", "steady")
#: Adapter -> fraction of requests its receiver answers with a retriable 503.
FAIL_FRACTION = {"flaky": 0.1, "steady": 0.0}
TIERS = ("1s", "2s", "4s")
SECRETS = {
    "flaky": "whsec_"
    + "Y2hhb3MtZmxha3ktcmVjZWl2ZXItc2VjcmV0",  # base64("chaos-flaky-receiver-secret")
    "steady": "whsec_" + "Y2hhb3Mtc3RlYWR5LXJlY2VpdmVyLXNlY3JldA==",
}
GRACE_S = 10.0
SCRAPE_EVERY_S = 5.0


@dataclass
class Options:
    trades: int = 3000
    kills: int = 20
    broker_restarts: int = 2
    seed: int = 1
    #: Seconds of chaos (kills, broker restarts, publishing); the drain comes after.
    duration: float = 200.0
    poison: int = 40
    fmt: Format = "json"
    window: str = "3s"
    drain_timeout: float = 180.0
    #: A crashed broker stays down between 1 s and this long before it is started again.
    broker_down: float = 4.0
    #: Let stages write core dumps (into the work folder) when they crash.
    core_dumps: bool = False
    workdir: Path | None = None
    keep: bool = False


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m chaos",
        description=(
            "Run the whole pipeline as separate processes against a local Kafka broker while "
            "killing stages, restarting the broker and injecting poison input; then check that "
            "nothing was lost, duplicates carry one Idempotency-Key, poison is dead-lettered and "
            "no personal value leaked. Exit status 0 only if every check passes."
        ),
    )
    d = Options()
    parser.add_argument("--trades", type=int, default=d.trades, help="valid trades to publish")
    parser.add_argument("--kills", type=int, default=d.kills, help="stage SIGKILLs (restarted)")
    parser.add_argument(
        "--broker-restarts",
        type=int,
        default=d.broker_restarts,
        help="broker stops and starts, alternately clean (SIGTERM) and crash (SIGKILL)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="makes the schedule reproducible")
    parser.add_argument(
        "--duration",
        type=float,
        default=d.duration,
        help="seconds of chaos; trades are published over its first 85%%",
    )
    parser.add_argument("--poison", type=int, default=d.poison, help="poison records to inject")
    parser.add_argument("--format", dest="fmt", choices=["json", "avro"], default=d.fmt)
    parser.add_argument("--window", default=d.window, help="delay.window (T+X)")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout,
        help="seconds to wait after the chaos for every trade to be accounted for",
    )
    parser.add_argument(
        "--broker-down",
        type=float,
        default=d.broker_down,
        metavar="S",
        help="a crashed broker stays down 1..S seconds (over 60 exercises the stages' "
        "produce timeouts)",
    )
    parser.add_argument("--workdir", type=Path, help="folder for logs, scrapes and broker data")
    parser.add_argument(
        "--keep", action="store_true", help="keep the broker's data even when the run passes"
    )
    parser.add_argument(
        "--core-dumps",
        action="store_true",
        help="let a crashing stage write a core dump into the work folder (for gdb)",
    )
    args = parser.parse_args(argv)
    if args.trades < 1 or args.kills < 0 or args.broker_restarts < 0 or args.poison < 0:
        parser.error("--trades must be positive; --kills, --broker-restarts, --poison >= 0")
    return Options(
        trades=args.trades,
        kills=args.kills,
        broker_restarts=args.broker_restarts,
        seed=args.seed,
        duration=args.duration,
        poison=args.poison,
        fmt=args.fmt,
        window=args.window,
        drain_timeout=args.drain_timeout,
        broker_down=max(1.0, args.broker_down),
        core_dumps=args.core_dumps,
        workdir=args.workdir,
        keep=args.keep,
    )


def window_ms(window: str) -> int:
    from consumer.config import parse_duration

    return int(parse_duration(window).total_seconds() * 1000)


def chaos_config(
    bootstrap: str, receiver_ports: dict[str, int], window: str, fmt: Format
) -> dict[str, Any]:
    return {
        "kafka": {
            "bootstrap_servers": bootstrap,
            # See the module docstring: evict SIGKILLed members in seconds, not 45 s.
            "client": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
        },
        "input": {"topic": INPUT_TOPIC, "format": fmt, "group": f"{PREFIX}-ingest"},
        "topics": {"prefix": PREFIX, "partitions": 3, "replication_factor": 1},
        "delay": {"window": window, "max_clock_skew": "5m", "group": f"{PREFIX}-release"},
        "retry": {"tiers": list(TIERS)},
        "adapters": [
            {
                "name": name,
                "type": "webhook",
                "url": f"http://127.0.0.1:{receiver_ports[name]}/webhook",
                "secrets": [{"env": f"CHAOS_{name.upper()}_SECRET"}],
                "timeout": "2s",
                "concurrency": 16,
            }
            for name in ADAPTERS
        ],
        "metrics": {"host": "127.0.0.1", "port": 0},
        "shutdown": {"grace": f"{GRACE_S:.0f}s"},
        "logging": {"level": "INFO", "format": "json"},
    }


# --------------------------------------------------------------------------------------------
# What the receivers got


@dataclass
class Request:
    seq: int
    wall_ms: int
    status: int
    verified: bool | None
    headers: dict[str, str]
    body: bytes
    trade_id: str | None
    payload: dict[str, Any] | None


def parse_request_line(line: bytes) -> Request:
    data = json.loads(line)
    try:
        body = base64.b64decode(data["body_b64"], validate=True)
    except (binascii.Error, ValueError):
        body = b""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        payload = None
    trade_id = payload.get("trade_id") if payload is not None else None
    return Request(
        seq=int(data["seq"]),
        wall_ms=int(data["wall_ms"]),
        status=int(data["status"]),
        verified=data.get("verified"),
        headers={str(k): str(v) for k, v in (data.get("headers") or {}).items()},
        body=body,
        trade_id=trade_id if isinstance(trade_id, str) else None,
        payload=payload,
    )


class ReceiverLog:
    """The requests one receiver printed, read incrementally from its output file."""

    def __init__(self, adapter: str, path: Path) -> None:
        self.adapter = adapter
        self.path = path
        self.requests: list[Request] = []
        self.delivered: set[str] = set()
        self.bad_lines = 0
        self._offset = 0

    def read(self) -> None:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # only complete lines
        self._offset += end
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                request = parse_request_line(line)
            except (ValueError, KeyError, TypeError):
                self.bad_lines += 1
                continue
            self.requests.append(request)
            if 200 <= request.status < 300 and request.trade_id is not None:
                self.delivered.add(request.trade_id)


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class Event:
    at_s: float
    text: str


@dataclass
class UnexpectedExit:
    stage: str
    code: int
    at_s: float
    log_excerpt: str


@dataclass
class Outcome:
    violations: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


class ChaosRun:
    def __init__(self, options: Options) -> None:
        self.o = options
        self.rng = random.Random(options.seed)
        self.window_ms = window_ms(options.window)
        self.workdir = options.workdir or Path(tempfile.mkdtemp(prefix="auto-trace-chaos-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("logs", "metrics", "receivers"):
            (self.workdir / sub).mkdir(exist_ok=True)
        self.logger = client_logger(self.workdir / "logs" / "chaos-clients.log")
        self.t0 = time.monotonic()
        self.events: list[Event] = []
        self.unexpected: list[UnexpectedExit] = []
        self.kills: Counter[str] = Counter()
        self.broker_downtimes: list[tuple[str, float]] = []
        self.scrapes = 0
        self.scrape_failures = 0
        self.shutdown_codes: dict[str, int | None] = {}
        self.broker: LocalBroker | None = None
        self.receivers: dict[str, Child] = {}
        self.receiver_logs: dict[str, ReceiverLog] = {}
        self.stages: list[Stage] = []
        self.publisher: Publisher | None = None
        self.dlq_tail: TopicTail | None = None
        #: (adapter, trade id) -> headers of its record in <prefix>.dlq
        self.dead: dict[tuple[str, str], dict[str, str]] = {}
        self.dead_bad: list[str] = []
        #: poison id -> (value, headers) of its record in <prefix>.dlq.ingest
        self.ingest_dead: dict[str, tuple[bytes | None, dict[str, str]]] = {}
        self.ingest_dead_other = 0
        self._last_scrape = 0.0
        self.timings: dict[str, float] = {}
        self.topic_counts: dict[str, int] = {}
        self._targets: list[Stage] = []
        self._broker_thread: threading.Thread | None = None
        self._broker_error: BaseException | None = None
        self.topic_trade_ids: dict[str, set[str]] = {}

    # -- output ----------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        self.events.append(Event(self.elapsed(), text))
        sys.stdout.write(f"[{self.elapsed():7.1f}s] {text}\n")
        sys.stdout.flush()

    # -- set-up ----------------------------------------------------------------------------

    def setup(self) -> None:
        self.say(f"work folder {self.workdir}")
        self.broker = LocalBroker(data_dir=self.workdir / "broker", port=fixed_port())
        self.broker.start()
        bootstrap = self.broker.bootstrap_servers
        self.say(f"broker ready at {bootstrap} (log {self.broker.log_path})")

        env = child_env({f"CHAOS_{a.upper()}_SECRET": SECRETS[a] for a in ADAPTERS})
        ports = {a: fixed_port() for a in ADAPTERS}
        for adapter in ADAPTERS:
            argv = [
                sys.executable,
                "-m",
                "chaos.receiver",
                "--port",
                str(ports[adapter]),
                "--secret-env",
                f"CHAOS_{adapter.upper()}_SECRET",
                "--seed",
                str(self.o.seed),
            ]
            if FAIL_FRACTION[adapter]:
                argv += ["--fail-fraction", str(FAIL_FRACTION[adapter]), "--fail-status", "503"]
            out = self.workdir / "receivers" / f"{adapter}.jsonl"
            child = Child(
                f"receiver-{adapter}",
                argv,
                self.workdir / "logs" / f"receiver-{adapter}.log",
                env,
                stdout_path=out,
            )
            child.start()
            self.receivers[adapter] = child
            self.receiver_logs[adapter] = ReceiverLog(adapter, out)

        config_path = self.workdir / "chaos.yaml"
        config_path.write_text(
            yaml.safe_dump(
                chaos_config(bootstrap, ports, self.o.window, self.o.fmt), sort_keys=False
            )
        )
        admin = AdminClient({"bootstrap.servers": bootstrap}, logger=self.logger)
        future = admin.create_topics(
            [NewTopic(INPUT_TOPIC, 3, 1, config={"max.message.bytes": str(MAX_INPUT_BYTES)})],
            operation_timeout=30,
        )[INPUT_TOPIC]
        future.result(timeout=60)
        done = subprocess.run(
            [sys.executable, "-m", "consumer", "topics", "create", "--config", str(config_path)],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise SetupError(f"`auto-trace topics create` failed:\n{done.stdout}{done.stderr}")
        topics = [INPUT_TOPIC] + [line.split()[-1] for line in done.stdout.splitlines() if line]
        wait_for_leaders(admin, topics)
        self.say(f"{len(topics)} topics created ({self.o.fmt} input)")

        roles: list[tuple[str, str | None]] = [("ingest", None), ("release", None)]
        roles += [("sink", a) for a in ADAPTERS]
        for role, sink_adapter in roles:
            stage_name = f"sink:{sink_adapter}" if sink_adapter else role
            stage = Stage(
                stage_name,
                role,
                config_path,
                self.workdir / "logs",
                env,
                adapter=sink_adapter,
                core_dumps=self.o.core_dumps,
            )
            stage.start()
            self.stages.append(stage)
        deadline = time.monotonic() + 120
        waiting = list(self.stages)
        while waiting:
            self.watch()
            waiting = [s for s in waiting if not s.ready()]
            if waiting and time.monotonic() > deadline:
                raise SetupError(
                    "stages not ready in 120 s: "
                    + ", ".join(f"{s.name}:\n{tail(s.log_path)}" for s in waiting)
                )
            if waiting:
                time.sleep(0.2)
        self.say("stages ready: " + ", ".join(f"{s.name} (pid {s.pid})" for s in self.stages))
        self.dlq_tail = TopicTail(bootstrap, [f"{PREFIX}.dlq", f"{PREFIX}.dlq.ingest"], self.logger)

    # -- while running ---------------------------------------------------------------------

    def watch(self) -> None:
        """Restart any stage that exited by itself (recording why), scrape metrics when due."""
        for stage in self.stages:
            code = stage.exited()
            if code is not None:
                excerpt = tail(stage.log_path, 25, since=stage.log_start)
                self.unexpected.append(UnexpectedExit(stage.name, code, self.elapsed(), excerpt))
                self.say(f"UNEXPECTED EXIT of {stage.name} (status {code}); restarting it")
                stage.forget()
                stage.start()
        for adapter, child in self.receivers.items():
            code = child.exited()
            if code is not None:
                raise SetupError(
                    f"the {adapter} receiver exited with {code}:\n{tail(child.log_path)}"
                )
        if time.monotonic() - self._last_scrape >= SCRAPE_EVERY_S:
            self._last_scrape = time.monotonic()
            for stage in self.stages:
                if stage.running:
                    self.scrape(stage, "periodic")

    def scrape(self, stage: Stage, why: str) -> None:
        body = stage.scrape()
        if body is None:
            self.scrape_failures += 1
            return
        self.scrapes += 1
        path = self.workdir / "metrics" / f"{stage.name.replace(':', '-')}.prom"
        with path.open("ab") as fh:
            fh.write(f"# ==== chaos: {why} scrape at {self.elapsed():.1f}s\n".encode())
            fh.write(body)

    def pause(self, seconds: float) -> None:
        """Part of the schedule (the time between chaos actions), watching meanwhile."""
        end = time.monotonic() + seconds
        while True:
            self.watch()
            self.read_outcomes()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.2, left))

    def read_outcomes(self) -> None:
        for log in self.receiver_logs.values():
            log.read()
        if self.dlq_tail is not None:
            self.dlq_tail.poll(self.on_dead_letter, 0.05)

    def on_dead_letter(self, msg: Message) -> None:
        headers = {
            k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else (v or ""))
            for k, v in header_items(msg)
        }
        if msg.topic() == f"{PREFIX}.dlq.ingest":
            pid = headers.get(POISON_HEADER)
            if pid is None:
                self.ingest_dead_other += 1
            else:
                self.ingest_dead[pid] = (msg.value(), headers)
            return
        adapter, trade_id = headers.get(h.ADAPTER), headers.get(h.TRADE_ID)
        if adapter is None or trade_id is None or not headers.get(h.ERROR_CLASS):
            self.dead_bad.append(f"offset {msg.offset()} headers {sorted(headers)}")
            return
        self.dead[(adapter, trade_id)] = headers

    def chaos(self) -> None:
        """The schedule: kills and broker restarts at random moments while trades flow."""
        o = self.o
        actions: list[tuple[float, str]] = [
            (self.rng.uniform(2.0, max(3.0, o.duration - 5.0)), "kill") for _ in range(o.kills)
        ]
        for i in range(o.broker_restarts):
            segment = o.duration / o.broker_restarts
            at = self.rng.uniform(segment * (i + 0.15), segment * (i + 0.7))
            actions.append((at, "broker-stop" if i % 2 == 0 else "broker-crash"))
        actions.sort()
        assert self.broker is not None
        kinds = plan_kinds(o.poison, self.rng)
        self.publisher = Publisher(
            self.broker.bootstrap_servers,
            INPUT_TOPIC,
            fmt=o.fmt,
            seed=o.seed,
            trades=o.trades,
            poison_kinds=kinds,
            spread_s=o.duration * 0.85,
            logger=self.logger,
        )
        self.say(
            f"chaos for {o.duration:.0f}s: {o.trades} trades and {len(kinds)} poison records, "
            f"{o.kills} kills, {o.broker_restarts} broker restarts"
        )
        start = time.monotonic()
        self.publisher.start()
        for at, action in actions:
            self.pause(max(0.0, start + at - time.monotonic()))
            if action == "kill":
                self.kill_one()
            else:
                self.restart_broker(crash=action == "broker-crash")
        self.pause(max(0.0, start + o.duration - time.monotonic()))
        self.wait_for_broker()
        self.timings["chaos"] = time.monotonic() - start

    def kill_one(self) -> None:
        if not self._targets:
            # Random order, but every stage once before any stage twice.
            self._targets = list(self.stages)
            self.rng.shuffle(self._targets)
        stage = self._targets.pop()
        down_for = self.rng.uniform(0.1, 2.0)
        if stage.running:
            self.scrape(stage, "pre-kill")
        pid = stage.pid
        stage.kill()
        self.kills[stage.name] += 1
        broker = (
            ""
            if self._broker_thread is None or not self._broker_thread.is_alive()
            else (" while the broker is down")
        )
        self.say(f"SIGKILL {stage.name} (pid {pid}){broker}; restarting in {down_for:.1f}s")
        self.pause(down_for)
        if not stage.running:
            stage.start()

    def restart_broker(self, *, crash: bool) -> None:
        """Stop the broker and start it again in a helper thread, so that stage kills go on
        meanwhile (a JVM start takes 10-30 s on a busy 2-core machine)."""
        self.wait_for_broker()
        down_for = self.rng.uniform(1.0, self.o.broker_down)
        self._broker_thread = threading.Thread(
            target=self._broker_cycle, args=(crash, down_for), name="broker-restart", daemon=True
        )
        self._broker_thread.start()

    def _broker_cycle(self, crash: bool, down_for: float) -> None:
        assert self.broker is not None
        started = time.monotonic()
        try:
            if crash:
                self.say(f"broker: SIGKILL; starting it again in {down_for:.1f}s")
                self.broker.kill()
                time.sleep(down_for)  # the schedule: how long the broker stays dead
                self.broker.start()
            else:
                self.say("broker: clean stop (SIGTERM), then start")
                self.broker.restart()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self._broker_error = exc
            return
        took = time.monotonic() - started
        self.broker_downtimes.append(("crash" if crash else "stop", took))
        self.say(f"broker back after {took:.1f}s")

    def wait_for_broker(self) -> None:
        """Until the broker restart in progress (if any) is over; its error, if it failed."""
        while self._broker_thread is not None and self._broker_thread.is_alive():
            self.pause(0.2)
        if self._broker_error is not None:
            raise SetupError(f"the broker did not come back: {self._broker_error}")

    def drain(self) -> bool:
        """Wait (polling, with a deadline) until every trade and poison record is accounted."""
        assert self.publisher is not None
        started = time.monotonic()
        deadline = started + self.o.drain_timeout
        self.say("chaos over; waiting for every trade to be delivered or dead-lettered")
        while time.monotonic() < deadline:
            self.watch()
            self.read_outcomes()
            if self.publisher.finished.is_set() and not self.missing():
                self.timings["drain"] = time.monotonic() - started
                self.say(f"everything accounted for after {self.timings['drain']:.1f}s")
                return True
            time.sleep(0.2)
        self.timings["drain"] = time.monotonic() - started
        self.say(f"drain deadline ({self.o.drain_timeout:.0f}s) passed")
        return False

    def missing(self) -> dict[str, list[str]]:
        """Per adapter, acknowledged trades neither delivered nor dead-lettered; poison not in
        the ingest DLQ under "poison"."""
        assert self.publisher is not None
        out = self.publisher.out
        missing: dict[str, list[str]] = {}
        for adapter, log in self.receiver_logs.items():
            lost = [
                t
                for t in sorted(out.acked_trades)
                if t not in log.delivered and (adapter, t) not in self.dead
            ]
            if lost:
                missing[adapter] = lost
        poison = [p for p in sorted(out.acked_poison) if p not in self.ingest_dead]
        if poison:
            missing["poison"] = poison
        return missing

    def shutdown(self) -> None:
        for stage in self.stages:
            if stage.running:
                self.scrape(stage, "final")
        # SIGTERM every stage at once, then collect: each has the same grace period.
        for stage in self.stages:
            stage.send_term()
        for stage in self.stages:
            self.shutdown_codes[stage.name] = stage.terminate(GRACE_S + 15)
        self.say(
            "stages stopped: "
            + ", ".join(
                f"{n} exit {c if c is not None else 'KILLED'}"
                for n, c in self.shutdown_codes.items()
            )
        )

    def read_internal_topics(self) -> dict[str, bytes]:
        """Every record of every internal topic except the ingest DLQ, as one byte string per
        topic (keys, values, header names and values), plus the trade ids each topic holds."""
        assert self.broker is not None
        admin = AdminClient(
            {"bootstrap.servers": self.broker.bootstrap_servers}, logger=self.logger
        )
        names = sorted(
            t
            for t in admin.list_topics(timeout=30).topics
            if t.startswith(f"{PREFIX}.") and t not in (f"{PREFIX}.dlq.ingest", INPUT_TOPIC)
        )
        blobs: dict[str, bytearray] = {t: bytearray() for t in names}
        self.topic_counts = dict.fromkeys(names, 0)
        self.topic_trade_ids = {t: set() for t in names}

        def keep(msg: Message) -> None:
            topic = msg.topic() or ""
            blob = blobs[topic]
            self.topic_counts[topic] += 1
            blob += msg.key() or b""
            blob += b"\x00"
            blob += msg.value() or b""
            blob += b"\x00"
            for name, value in header_items(msg):
                blob += (
                    name.encode() + b"=" + (value if isinstance(value, bytes) else b"") + b"\x00"
                )
            trade_id = trade_id_of(msg.value() or b"")
            if trade_id is not None:
                self.topic_trade_ids[topic].add(trade_id)

        reader = TopicTail(self.broker.bootstrap_servers, names, self.logger)
        try:
            reader.read_to_end(keep, timeout=120)
        finally:
            reader.close()
        return {t: bytes(b) for t, b in blobs.items()}

    def stop_everything(self) -> None:
        if self._broker_thread is not None:
            self._broker_thread.join(timeout=150)
        for stage in self.stages:
            stage.terminate(GRACE_S + 15)
        for child in self.receivers.values():
            child.terminate(10)
        if self.publisher is not None:
            self.publisher.stop()
        if self.dlq_tail is not None:
            self.dlq_tail.close()
            self.dlq_tail = None
        if self.broker is not None:
            self.broker.stop()

    # -- verdict ---------------------------------------------------------------------------

    def verdict(self, topics: dict[str, bytes]) -> Outcome:
        assert self.publisher is not None
        out = self.publisher.out
        result = Outcome()
        v, line = result.violations.append, result.lines.append
        valid = set(out.trades)

        line("")
        line("=" * 78)
        line(
            f"auto-trace chaos run: seed {self.o.seed}, {self.o.fmt} input, "
            f"window {self.o.window}, retry tiers {'/'.join(TIERS)}"
        )
        line("=" * 78)
        kills = ", ".join(f"{n} {c}" for n, c in sorted(self.kills.items())) or "none"
        line(f"stage kills (SIGKILL + restart): {sum(self.kills.values())} ({kills})")
        downs = ", ".join(f"{k} {t:.1f}s" for k, t in self.broker_downtimes) or "none"
        line(f"broker restarts: {len(self.broker_downtimes)} ({downs})")
        line(
            "timings: "
            + ", ".join(f"{k} {t:.1f}s" for k, t in self.timings.items())
            + f", total {self.elapsed():.1f}s"
        )
        if sum(self.kills.values()) < self.o.kills:
            v(f"only {sum(self.kills.values())} of {self.o.kills} kills happened")
        if len(self.broker_downtimes) < self.o.broker_restarts:
            v(f"only {len(self.broker_downtimes)} of {self.o.broker_restarts} broker restarts")

        # -- input ------------------------------------------------------------------------
        line("")
        kinds = Counter(p.kind for p in out.poison.values())
        line(
            f"published: {len(out.acked_trades)}/{len(out.trades)} valid trades acknowledged, "
            f"{len(out.acked_poison)}/{len(out.poison)} poison "
            f"({', '.join(f'{k} {kinds[k]}' for k in KINDS if kinds[k])}); "
            f"{out.resent} re-sent after errors"
            + (f" {dict(out.error_codes)}" if out.error_codes else "")
        )
        if out.fatal:
            v(f"the publisher hit a fatal producer error: {out.fatal}")
        if len(out.acked_trades) < self.o.trades:
            v(f"only {len(out.acked_trades)} of {self.o.trades} trades were published")

        # -- delivery ----------------------------------------------------------------------
        line("")
        line("delivery (per adapter):")
        all_keys: dict[str, tuple[str, str]] = {}
        for adapter, log in self.receiver_logs.items():
            log.read()
            statuses = Counter(r.status for r in log.requests)
            ok_per_trade: Counter[str] = Counter()
            keys: dict[str, set[str]] = defaultdict(set)
            bad_key: list[str] = []
            early: list[str] = []
            unverified = 0
            mismatched: list[str] = []
            unknown: set[str] = set()
            for r in log.requests:
                if r.verified is not True:
                    unverified += 1
                if r.trade_id is None:
                    unknown.add(f"<unparsable body seq {r.seq}>")
                    continue
                if r.trade_id not in valid:
                    unknown.add(r.trade_id)
                    continue
                key = r.headers.get("idempotency-key")
                webhook_id = r.headers.get("webhook-id")
                keys[r.trade_id].add(str(key))
                if key is None or key != webhook_id or key != idempotency_key(r.trade_id, adapter):
                    bad_key.append(r.trade_id)
                if key is not None:
                    owner = all_keys.setdefault(key, (adapter, r.trade_id))
                    if owner != (adapter, r.trade_id):
                        bad_key.append(r.trade_id)
                due = out.close_ms[r.trade_id] + self.window_ms
                if r.wall_ms < due:
                    early.append(f"{r.trade_id} {due - r.wall_ms}ms early")
                if 200 <= r.status < 300:
                    ok_per_trade[r.trade_id] += 1
                    problem = payload_problem(r.payload, out.trades[r.trade_id])
                    if problem:
                        mismatched.append(f"{r.trade_id}: {problem}")
            delivered = set(ok_per_trade) & out.acked_trades
            dead = {t for (a, t) in self.dead if a == adapter}
            lost = sorted(out.acked_trades - delivered - dead)
            dead_only = dead - delivered
            duplicates = sum(c - 1 for c in ok_per_trade.values())
            dup_trades = sum(1 for c in ok_per_trade.values() if c > 1)
            inconsistent = sorted({t for t, ks in keys.items() if len(ks) > 1} | set(bad_key))
            line(
                f"  {adapter:<7} requests {len(log.requests)} "
                f"({', '.join(f'{s}: {n}' for s, n in sorted(statuses.items()))}); "
                f"delivered {len(delivered)}, in DLQ only {len(dead_only)}, LOST {len(lost)}"
            )
            line(
                f"          duplicates {duplicates} (over {dup_trades} trades), "
                f"one Idempotency-Key per trade: {'yes' if not inconsistent else 'NO'}"
            )
            if lost:
                v(f"{adapter}: {len(lost)} trades lost, e.g. {lost[:5]}")
            if inconsistent:
                v(
                    f"{adapter}: Idempotency-Key not stable or not unique for "
                    f"{len(inconsistent)} trades, e.g. {inconsistent[:5]}"
                )
            if early:
                v(f"{adapter}: {len(early)} deliveries before close_time + window: {early[:3]}")
            if unverified:
                v(f"{adapter}: {unverified} requests whose signature did not verify")
            if mismatched:
                v(f"{adapter}: {len(mismatched)} payloads differ from the input: {mismatched[:3]}")
            if unknown:
                v(
                    f"{adapter}: requests for records that are not input trades: "
                    f"{sorted(unknown)[:5]}"
                )
            if log.bad_lines:
                v(f"{adapter}: {log.bad_lines} receiver lines could not be read")
        dead_per = Counter(a for a, _ in self.dead)
        classes = Counter(hd.get(h.ERROR_CLASS, "?") for hd in self.dead.values())
        line(
            f"  delivery DLQ ({PREFIX}.dlq): {len(self.dead)} records"
            + (f" {dict(dead_per)} {dict(classes)}" if self.dead else "")
        )
        if self.dead_bad:
            v(
                f"{len(self.dead_bad)} DLQ records without adapter, trade id or error class: "
                f"{self.dead_bad[:3]}"
            )
        stray_dead = sorted(t for (_, t) in self.dead if t not in valid)
        if stray_dead:
            v(f"DLQ records for trades never published: {stray_dead[:5]}")

        # -- poison ------------------------------------------------------------------------
        line("")
        poison_missing, poison_wrong = [], []
        reasons: Counter[str] = Counter()
        for pid in sorted(out.acked_poison):
            got = self.ingest_dead.get(pid)
            if got is None:
                poison_missing.append(f"{pid} ({out.poison[pid].kind})")
                continue
            value, headers = got
            expected = out.poison[pid].value or b""
            reasons[headers.get(h.ERROR_CLASS, "?")] += 1
            if (value or b"") != expected:
                poison_wrong.append(f"{pid}: bytes differ")
            elif not headers.get(h.ERROR_CLASS) or not headers.get(h.REASON):
                poison_wrong.append(f"{pid}: no error class or reason header")
        line(
            f"poison: {len(out.acked_poison) - len(poison_missing)}/{len(out.acked_poison)} in "
            f"{PREFIX}.dlq.ingest ({', '.join(f'{k} {n}' for k, n in sorted(reasons.items()))})"
        )
        if poison_missing:
            v(f"poison records not in the ingest DLQ: {poison_missing[:10]}")
        if poison_wrong:
            v(f"poison records dead-lettered wrongly: {poison_wrong[:10]}")
        if self.ingest_dead_other:
            v(f"{self.ingest_dead_other} ingest DLQ records are not poison (valid input rejected)")
        leaked_poison = sorted(
            {t for ids in self.topic_trade_ids.values() for t in ids if t.startswith("poison-")}
        )
        if leaked_poison:
            v(f"poison trades reached internal topics: {leaked_poison[:5]}")

        # -- personal data ----------------------------------------------------------------
        line("")
        needles = Needles()
        for field_name, personal_value in out.personal:
            needles.add(field_name, personal_value)
        sources: list[tuple[str, bytes]] = [(f"topic {t}", b) for t, b in topics.items()]
        for adapter, log in self.receiver_logs.items():
            blob = b"\x00".join(
                r.body + b"\x00" + json.dumps(r.headers, ensure_ascii=False).encode()
                for r in log.requests
            )
            sources.append((f"receiver {adapter} (bodies + headers)", blob))
        for stage in self.stages:
            sources.append((f"log {stage.name}", read_bytes(stage.log_path)))
            metrics = self.workdir / "metrics" / f"{stage.name.replace(':', '-')}.prom"
            sources.append((f"metrics {stage.name}", read_bytes(metrics)))
        started = time.monotonic()
        leaks: list[Leak] = []
        for source, blob in sources:
            leaks += needles.find(source, blob)
        scanned = sum(len(b) for _, b in sources)
        line(
            f"personal data: {len(needles)} personal values searched in {len(sources)} sources "
            f"({scanned / 1e6:.1f} MB: {sum(1 for s, _ in sources if s.startswith('topic'))} "
            f"topics, receiver bodies and headers, stage logs, {self.scrapes} metrics scrapes) "
            f"in {time.monotonic() - started:.1f}s: {len(leaks)} found"
        )
        may_be_empty = (f"topic {PREFIX}.retry.", f"topic {PREFIX}.dlq")
        empty = [s for s, b in sources if not b and not s.startswith(may_be_empty)]
        if empty:
            v(f"nothing to scan in: {empty} (the check would be vacuous)")
        for leak in leaks[:20]:
            line(f"  LEAK in {leak.source}: {leak.field} ({leak.preview}) x{leak.count}")
        if leaks:
            v(f"{len(leaks)} personal values found where they must not be")

        # -- processes ----------------------------------------------------------------------
        line("")
        line(f"unexpected stage exits: {len(self.unexpected)}")
        for core in sorted(self.workdir.glob("cwd/*/core*")):
            line(f"  core dump: {core} (gdb -batch -ex bt {sys.executable} {core})")
        for ux in self.unexpected:
            line(f"  {ux.stage} exited with status {ux.code} at {ux.at_s:.1f}s; its log ends:")
            line("    " + ux.log_excerpt.replace("\n", "\n    "))
        if self.unexpected:
            v(f"{len(self.unexpected)} unexpected stage exits")
        unclean = {n: c for n, c in self.shutdown_codes.items() if c != 0}
        line(
            "final SIGTERM: " + ("every stage exited 0" if not unclean else f"NOT CLEAN {unclean}")
        )
        if unclean:
            v(f"stages that did not exit 0 on SIGTERM: {unclean}")
        line(f"metrics scrapes: {self.scrapes} ({self.scrape_failures} got no answer)")
        line(f"logs, scrapes and receiver output: {self.workdir}")

        line("")
        if result.violations:
            line(f"RESULT: FAIL ({len(result.violations)} violations)")
            for item in result.violations:
                line(f"  - {item}")
        else:
            line("RESULT: PASS (lost = 0, poison all dead-lettered, no personal data found)")
        return result


class SetupError(RuntimeError):
    """The run could not be set up or kept going (not a verdict on the pipeline)."""


def header_items(msg: Message) -> list[tuple[str, str | bytes | None]]:
    raw = msg.headers()
    if not raw:
        return []
    return list(raw.items()) if isinstance(raw, dict) else list(raw)


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def payload_problem(payload: dict[str, Any] | None, trade: dict[str, Any]) -> str | None:
    """What is wrong with a delivered body, compared with the trade published: exactly the
    TraceRecord fields, equal values (decimals compared as numbers), nothing else."""
    if payload is None:
        return "not a JSON object"
    if set(payload) != set(TRACE_FIELDS):
        return f"fields {sorted(set(payload) ^ set(TRACE_FIELDS))} differ from TraceRecord's"
    for name in TRACE_FIELDS:
        got, want = payload[name], trade.get(name)
        if name in DECIMAL_FIELDS:
            try:
                same = Decimal(str(got)) == Decimal(str(want))
            except InvalidOperation:
                same = False
        else:
            same = got == want
        if not same:
            return f"{name} differs"
    return None


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    # SIGTERM takes the same path as Ctrl-C: every child and the broker are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    run = ChaosRun(options)
    passed = False
    try:
        run.setup()
        run.chaos()
        run.drain()
        run.read_outcomes()
        run.shutdown()
        run.read_outcomes()
        topics = run.read_internal_topics()
        outcome = run.verdict(topics)
        sys.stdout.write("\n".join(outcome.lines) + "\n")
        passed = not outcome.violations
    except (SetupError, BrokerError, TimeoutError) as exc:
        sys.stdout.write(f"\nchaos run could not complete: {exc}\nlogs: {run.workdir}\n")
        return 2
    except KeyboardInterrupt:
        sys.stdout.write(f"\ninterrupted; logs: {run.workdir}\n")
        return 130
    finally:
        run.stop_everything()
        if passed and not options.keep:
            shutil.rmtree(run.workdir / "broker", ignore_errors=True)
    return 0 if passed else 1


__all__ = ["ChaosRun", "Options", "main", "parse_args", "payload_problem"]
