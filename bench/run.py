"""The scenarios of ``python -m bench`` (see the package docstring for the method)."""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Message

import bench
from bench import data
from bench.kafka import Topics, Watermarks, fast_producer, lateness_ms, preload, read_all, span
from bench.procs import Proc, Receiver, Sampled, Stage, py_spy, quantile_bound, wait_until
from bench.report import SEED_CEILING_TRADES_PER_S, Row, bracketed, median, render, rounds_text
from consumer import headers as h
from consumer.broker import kafka_cluster
from consumer.config import Settings, WebhookAdapterSettings, load_settings
from consumer.delayed import now_ms
from consumer.topics import delay_topic, planned_topics, retry_topics, sink_topic
from consumer.tracecodec import trade_id_of

PARTITIONS = 6
CONCURRENCY = 16
ADAPTER = "hook"
SECRET_ENV = "BENCH_WEBHOOK_SECRET"
#: Not a secret: signs benchmark deliveries to a local receiver that does not check it.
SECRET = "whsec_YmVuY2gtc2lnbmluZy1rZXktbm90LWEtc2VjcmV0ISE="
R3_RATE = 1000
R3_WINDOW_S = 2
#: R6's retry tier: the first of the default tiers.
RETRY_TIER = "5s"
MEM_WAIT_S = 3.0
OUTPUT = Path(__file__).resolve().parent.parent / "bench-output"


def _fmt(n: float) -> str:
    return f"{n:,.0f}"


def _pct(share: float | None) -> str:
    return "?" if share is None else f"{share * 100:.0f}%"


def _threads(proc: Proc, start_ms: int, end_ms: int) -> str:
    """Where a process's CPU went, by thread name (Python threads all show as 'python'), and
    how long its Python threads were runnable but waiting for a core (other work had both)."""
    shares = proc.thread_shares(start_ms, end_ms)
    waits = proc.thread_waits(start_ms, end_ms)

    def one(name: str, share: float) -> str:
        waited = waits.get(name) if name == "python" else None
        wait = f" (+{_pct(waited)} waiting for a core)" if waited else ""
        return f"{name} {_pct(share)}{wait}"

    return ", ".join(one(name, share) for name, share in list(shares.items())[:5])


@dataclass
class Ctx:
    bootstrap: str
    scale: float
    logs: Path
    topics: Topics
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    rows: list[Row] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    #: No scenario starts after this many seconds (``make bench`` must end within 15 min).
    budget_s: float = 600.0
    pool: list[dict[str, Any]] = field(default_factory=list)
    #: ``BENCH_ROUNDS``: how many times each measured leg runs between its baselines.
    rounds: int = 5
    #: ``BENCH_KAFKA_CLIENT`` (a JSON object): extra librdkafka settings for every stage, to
    #: try a tuning without editing code.
    client: dict[str, Any] = field(default_factory=dict)
    #: The local broker's process, sampled with the stages: on two cores the broker's share is
    #: what the stage under test could not have (None for an external broker).
    broker: Sampled | None = None

    def n(self, full: int, floor: int) -> int:
        return max(floor, int(full * self.scale))

    def say(self, text: str) -> None:
        sys.stderr.write(f"[{time.monotonic() - self.started:6.1f}s] {text}\n")
        sys.stderr.flush()

    # -- configuration and topics ----------------------------------------------------------

    def config(
        self,
        name: str,
        *,
        input_topic: str | None = None,
        window: str = "0s",
        tiers: list[str] | None = None,
        url: str = "http://127.0.0.1:9/unused",
        circuit_threshold: int | None = None,
    ) -> dict[str, Any]:
        prefix = f"bench-{self.tag}-{name}"
        adapter: dict[str, Any] = {
            "name": ADAPTER,
            "type": "webhook",
            "url": url,
            "secrets": [{"env": SECRET_ENV}],
            "concurrency": CONCURRENCY,
            "timeout": "10s",
        }
        if circuit_threshold is not None and "circuit" in WebhookAdapterSettings.model_fields:
            adapter["circuit"] = {"failure_threshold": circuit_threshold}
        return {
            "kafka": {"bootstrap_servers": self.bootstrap, "client": self.client},
            "input": {"topic": input_topic or f"{prefix}.in", "group": f"{prefix}-ingest"},
            "topics": {"prefix": prefix, "partitions": PARTITIONS},
            "delay": {"window": window, "group": f"{prefix}-release"},
            "retry": {"tiers": tiers or ["5s", "30s"]},
            "adapters": [adapter],
            "shutdown": {"grace": "10s"},
            "logging": {"level": "INFO", "format": "json"},
        }

    def create(self, config: dict[str, Any], *, with_input: bool = False) -> Settings:
        settings = load_settings(None, **config)
        specs = [(s.name, s.partitions, s.config) for s in planned_topics(settings)]
        if with_input:
            specs.append((settings.input.topic, PARTITIONS, {}))
        self.topics.create(specs)
        return settings

    def stage(self, name: str, role: str, config: dict[str, Any]) -> Stage:
        proc = Stage(
            name,
            role,
            config,
            self.logs,
            {SECRET_ENV: SECRET},
            adapter=ADAPTER if role == "sink" else None,
        )
        self.procs.append(proc)
        return proc

    def proc(self, name: str, command: list[str], *, profile: bool = True) -> Proc:
        p = Proc(name, command, self.logs, profile=profile)
        self.procs.append(p)
        return p

    def stop(self, *procs: Proc) -> None:
        for p in procs:
            p.stop()
            if p in self.procs:
                self.procs.remove(p)

    def cap(self, timeout: float) -> float:
        """A wait never runs past the budget by more than two minutes, whatever it expects."""
        hard = self.started + self.budget_s + 120 - time.monotonic()
        return max(10.0, min(timeout, hard))

    def watched(self, procs: Sequence[Sampled]) -> list[Sampled]:
        return [*procs, *([self.broker] if self.broker is not None else [])]

    def broker_cpu(self, start_ms: int, end_ms: int) -> str:
        """ ", broker N%": the broker's share of a core over a measured interval."""
        if self.broker is None:
            return ""
        return f", broker {_pct(self.broker.cpu_share(start_ms, end_ms))}"

    def wait_count(self, topic: str, count: int, procs: list[Proc], timeout: float) -> None:
        marks = Watermarks(self.bootstrap)
        try:
            wait_until(
                lambda: marks.count(topic) >= count,
                self.watched(procs),
                self.cap(timeout),
                f"{count:,} records in {topic}",
                interval=0.2,
            )
        finally:
            marks.close()

    def wait_ready(self, stages: list[Stage], timeout: float = 60) -> None:
        wait_until(
            lambda: all(s.ready() for s in stages), stages, self.cap(timeout), "stages ready"
        )


def scenario(ctx: Ctx, name: str, body: Callable[[], None]) -> None:
    """Run one scenario. A failed one is reported and the run goes on (the others still mean
    something); once the time budget is spent, the rest are skipped rather than overrun."""
    if time.monotonic() > ctx.started + ctx.budget_s:
        ctx.errors[name] = f"skipped: the run's time budget of {ctx.budget_s:.0f} s was spent"
        ctx.say(f"{name} skipped (time budget)")
        return
    ctx.say(f"{name} ...")
    before = list(ctx.procs)
    try:
        body()
    except Exception as exc:
        ctx.errors[name] = f"{type(exc).__name__}: {str(exc)[:600]}"
        ctx.say(f"{name} FAILED: {exc}")
    finally:
        for p in list(ctx.procs):
            if p not in before:
                ctx.stop(p)


# -- R1 and R1b: ingest (and release) against a plain copy -----------------------------------


def _passthrough(ctx: Ctx, cfg_path: Path, source: str, count: int, run: int) -> float:
    """One plain copy of the whole input into a fresh topic; its records/s."""
    target = f"bench-{ctx.tag}-r1.copy{run}"
    ctx.topics.create([(target, PARTITIONS, {})])
    copy = ctx.proc(
        f"passthrough-{run}",
        [
            sys.executable,
            "-m",
            "bench.passthrough",
            "--config",
            str(cfg_path),
            "--source",
            source,
            "--target",
            target,
            "--group",
            f"bench-{ctx.tag}-copy{run}",
        ],
    )
    return _leg(ctx, f"passthrough {run}", target, count, [copy], 60 + count / 2000)


def _leg(ctx: Ctx, label: str, topic: str, count: int, procs: list[Proc], timeout: float) -> float:
    """Wait until ``topic`` holds ``count`` records, stop ``procs``, and say the rate at which
    the records were appended, with the CPU of each process over exactly that interval (by
    thread for a lone process) and the broker's."""
    ctx.wait_count(topic, count, procs, timeout)
    ctx.stop(*procs)
    out = span(ctx.bootstrap, topic)
    rate = out.rate(count)
    first, last = out.first_ms, out.last_ms
    cpu = " + ".join(_pct(p.cpu_share(first, last)) for p in procs)
    if len(procs) == 1:
        cpu += f": {_threads(procs[0], first, last)}"
    ctx.say(f"{label}: {_fmt(rate)} records/s (cpu {cpu}{ctx.broker_cpu(first, last)})")
    return rate


def _fast_path(proc: Proc) -> str:
    """Which fast path an ingest process ran, from its ``ingest started`` log line."""
    for line in proc.log_path.read_text(errors="replace").splitlines():
        if '"ingest started"' in line:
            try:
                return str(json.loads(line).get("fast_path", "?"))
            except ValueError:
                break
    return "?"


def _ingest_leg(ctx: Ctx, source: str, count: int, i: int) -> float:
    cfg = ctx.config(f"r1-{i}", input_topic=source)
    settings = ctx.create(cfg)
    ingest = ctx.stage(f"r1-ingest-{i}", "ingest", cfg)
    # The fast path is read from the log once the process has stopped (_leg stops it).
    rate = _leg(ctx, f"ingest {i + 1}", delay_topic(settings), count, [ingest], 60 + count / 1000)
    ctx.say(f"ingest {i + 1} ran fast path {_fast_path(ingest)}")
    return rate


def _chain_leg(ctx: Ctx, source: str, count: int, i: int) -> float:
    cfg = ctx.config(f"r1b-{i}", input_topic=source)
    settings = ctx.create(cfg)
    ingest = ctx.stage(f"r1b-ingest-{i}", "ingest", cfg)
    release = ctx.stage(f"r1b-release-{i}", "release", cfg)
    sink = sink_topic(settings, ADAPTER)
    return _leg(ctx, f"ingest+release {i + 1}", sink, count, [ingest, release], 60 + count / 1000)


def _rates_text(timeline: list[tuple[str, float]], kind: str) -> str:
    return ", ".join(_fmt(v) for k, v in timeline if k == kind)


def r1(ctx: Ctx, *, chain: bool) -> None:
    """Rounds of ingest (and, with ``chain``, ingest + release for R1b), each between two plain
    copies of the same input: each leg is divided by the mean of the copies on either side of
    it, so that the machine's drift during the run shows up on both sides; the ratio reported
    is the median of the rounds."""
    count = ctx.n(200_000, 2_000)
    cfg = ctx.config("r1")
    settings = ctx.create(cfg, with_input=True)
    source = settings.input.topic
    close_start = now_ms() - 86_400_000
    t0 = time.monotonic()
    preload(
        fast_producer(ctx.bootstrap),
        source,
        data.trade_records(ctx.pool, count, close_start),
    )
    ctx.say(f"pre-loaded {count:,} trades in {time.monotonic() - t0:.1f} s")
    sizes = [len(v) for _, v, _ in data.trade_records(ctx.pool, min(count, 5000), close_start)]
    size = statistics.fmean(sizes)
    cfg_path = ctx.logs / "passthrough.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    timeline: list[tuple[str, float]] = []

    def copy() -> None:
        timeline.append(("copy", _passthrough(ctx, cfg_path, source, count, len(timeline) + 1)))

    copy()
    for i in range(ctx.rounds):
        timeline.append(("ingest", _ingest_leg(ctx, source, count, i)))
        copy()
        if chain:
            timeline.append(("chain", _chain_leg(ctx, source, count, i)))
            copy()
    copies = _rates_text(timeline, "copy")
    ratios = bracketed(timeline, "ingest", "copy")
    ctx.rows.append(
        Row(
            "R1  ingest ÷ passthrough",
            median(ratios),
            key="r1",
            inputs=(
                f"{rounds_text(ratios)}; ingest {_rates_text(timeline, 'ingest')}/s, "
                f"passthrough {copies}/s (in the order run, each leg ÷ the mean of the copies "
                f"either side of it); {count:,} trade.closed JSON records, mean {size:.0f} B, "
                f"{PARTITIONS} partitions, one process each"
            ),
        )
    )
    if chain:
        ratios = bracketed(timeline, "chain", "copy")
        ctx.rows.append(
            Row(
                "R1b ingest+release ÷ passthrough",
                median(ratios),
                key="r1b",
                inputs=(
                    f"{rounds_text(ratios)}; {_rates_text(timeline, 'chain')}/s into the sink "
                    f"topic (window 0, 1 adapter, one process per stage), same input and "
                    f"copies as R1"
                ),
            )
        )


# -- R3: release lateness ---------------------------------------------------------------------


#: Trade numbers of R3's warm-up stream (``B-1000000000`` on): apart from the measured ones.
_WARM_UP_IDS = 1_000_000_000


def _warm_up(msg: Message) -> bool:
    trade_id = trade_id_of(msg.value() or b"") or ""
    return trade_id.startswith("B-") and int(trade_id[2:]) >= _WARM_UP_IDS


def _steady(
    ctx: Ctx, producer: Any, topic: str, ids: range, stages: list[Sampled], rng: random.Random
) -> float:
    """Trades numbered ``ids`` at R3_RATE per second, close_time = when each is sent; the
    seconds it took."""
    start = time.monotonic()
    sent = 0
    sampled = 0.0
    while sent < len(ids):
        target = min(len(ids), int((time.monotonic() - start) * R3_RATE) + 1)
        while sent < target:
            t = data.trade(ctx.pool, ids[sent], now_ms(), rng)
            producer.produce(topic, value=data.to_json(t), key=t["trade_id"])
            sent += 1
        producer.poll(0)
        # A sample reads every thread of a stage from /proc: ten times a second is plenty,
        # and at every 2 ms tick it would be a load of its own on the cores being measured.
        if time.monotonic() - sampled >= 0.1:
            sampled = time.monotonic()
            for stage in stages:
                stage.sample()
        time.sleep(0.002)
    producer.flush(30)
    return time.monotonic() - start


def _bound_ms(bound: float | None) -> str:
    if bound is None:
        return "?"
    return "inf" if bound == float("inf") else f"{bound * 1000:g} ms"


def r3(ctx: Ctx) -> None:
    """A warm-up stream first, not measured: a broker just started (``BENCH_ONLY=R3``) spends
    its first seconds compiling its own hot paths, and an idempotent producer sends nothing for
    its first ~0.5-1 s (FACTS.md), which would reach ingest as one burst."""
    count = ctx.n(20_000, 1_000)
    warm = ctx.n(3_000, 1_000)
    cfg = ctx.config("r3", window=f"{R3_WINDOW_S}s")
    settings = ctx.create(cfg, with_input=True)
    ingest = ctx.stage("r3-ingest", "ingest", cfg)
    release = ctx.stage("r3-release", "release", cfg)
    ctx.wait_ready([ingest, release])
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": ctx.bootstrap, "enable.idempotence": True})
    rng = random.Random(3)
    sink = sink_topic(settings, ADAPTER)
    # Warm-up trades are numbered from _WARM_UP_IDS on, the measured ones from 0.
    _steady(ctx, producer, settings.input.topic, range(_WARM_UP_IDS, _WARM_UP_IDS + warm), [], rng)
    ctx.wait_count(sink, warm, [ingest, release], 60)
    # Release's own lateness histogram (due -> handed to its producer): apart from the
    # append-time lateness, it tells a late hand-out from a slow produce.
    histogram, labels = "auto_trace_lateness_seconds", 'stage="release"'
    handed_before = release.buckets(histogram, labels)
    steady_start = now_ms()
    sent_s = _steady(
        ctx, producer, settings.input.topic, range(count), ctx.watched([ingest, release]), rng
    )
    ctx.wait_count(sink, warm + count, [ingest, release], 60)
    steady_end = now_ms()
    handed = release.buckets(histogram, labels)
    cpu = (
        f"cpu ingest {_pct(ingest.cpu_share(steady_start, steady_end))}, release "
        f"{_pct(release.cpu_share(steady_start, steady_end))}"
        f"{ctx.broker_cpu(steady_start, steady_end)}"
    )
    ctx.stop(ingest, release)
    measured = [m for m in read_all(ctx.bootstrap, sink, warm + count) if not _warm_up(m)]
    # Every record's lateness, to see whether the tail is spread out or one stall.
    with (ctx.logs / "r3-lateness.csv").open("w") as out:
        out.write("partition,offset,due_ms,lateness_ms\n")
        for m in measured:
            due = h.get_int(m.headers(), h.DUE_MS)
            out.write(f"{m.partition()},{m.offset()},{due},{lateness_ms(m)}\n")
    late = sorted(lateness_ms(m) for m in measured)
    if len(late) != count:
        raise RuntimeError(f"R3: {len(late)} measured records on the sink topic, expected {count}")
    early = sum(1 for x in late if x < 0)
    p50 = late[len(late) // 2]
    p99 = late[min(len(late) - 1, int(len(late) * 0.99))]
    worst = late[-1]
    ctx.say(f"lateness p50 {p50} ms, p99 {p99} ms, max {worst} ms, early {early} ({cpu})")
    handed_out = ", ".join(
        f"p{round(q * 100)} ≤ {_bound_ms(quantile_bound(handed_before, handed, q))}"
        for q in (0.5, 0.99)
    )
    ctx.say(f"release's own histogram (due -> handed to its producer): {handed_out}")
    inputs = (
        f"{count:,} records at {count / sent_s:,.0f}/s through ingest → release, window "
        f"{R3_WINDOW_S} s, {PARTITIONS} partitions, after {warm:,} unmeasured warm-up records "
        f"({cpu}); "
        "sink-topic append time - due header; release's own histogram (due -> handed to "
        f"its producer, bucket bounds): {handed_out}"
    )
    ctx.rows += [
        Row("R3  release lateness p50", p50, "ms", key="r3_p50_ms", inputs=inputs),
        Row("R3  release lateness p99", p99, "ms", key="r3_p99_ms"),
        Row("R3  release lateness max", worst, "ms", key="r3_max_ms"),
        Row("R3  released early", early, "records", key="r3_early"),
    ]


# -- R4 and R6: deliveries against raw HTTP clients ------------------------------------------


def _sink_records(ctx: Ctx, count: int, seed: int) -> list[data.Record]:
    rng = random.Random(seed)
    close = now_ms() - 3_600_000
    return [
        data.trace_record(data.to_json(data.trade(ctx.pool, i, close + i, rng)))
        for i in range(count)
    ]


def _deliveries(
    ctx: Ctx,
    receiver: Receiver,
    procs: list[Proc],
    count: int,
    timeout: float,
    *,
    exits: bool = False,
) -> tuple[float, dict[str, Any]]:
    """Wait for ``count`` successful deliveries; their rate from the first request to the last
    success, timed by the receiver. ``exits``: the processes may end when done (clients)."""
    watched = [] if exits else procs

    def done() -> bool:
        for p in procs:
            p.sample()
            if exits and not p.alive() and p.popen.returncode != 0:
                p.check()
        return int(receiver.stats()["ok"]) >= count

    wait_until(
        done,
        ctx.watched([*watched, receiver]),
        ctx.cap(timeout),
        f"{count:,} deliveries",
        interval=0.2,
    )
    stats = receiver.stats()
    seconds = max(0.001, (stats["last_ok_ms"] - stats["first_ms"]) / 1000)
    return count / seconds, stats


@dataclass(frozen=True)
class _Raw:
    rate: float
    cpu: float | None
    receiver_cpu: float | None


def _raw(ctx: Ctx, receiver: Receiver, client: str, count: int, bodies: Path, run: int) -> _Raw:
    receiver.reset()
    p = ctx.proc(
        f"raw-{client}-{run}",
        [
            sys.executable,
            "-m",
            "bench.rawhttp",
            "--client",
            client,
            "--url",
            receiver.url,
            "--concurrency",
            str(CONCURRENCY),
            "--limit",
            str(count),
            str(bodies),
        ],
    )
    rate, stats = _deliveries(ctx, receiver, [p], count, 60 + count / 100, exits=True)
    result = _Raw(
        rate,
        p.cpu_share(stats["first_ms"], stats["last_ok_ms"]),
        receiver.cpu_share(stats["first_ms"], stats["last_ok_ms"]),
    )
    p.popen.wait(30)
    ctx.stop(p)
    ctx.say(f"raw {client} {run}: {_fmt(rate)} POSTs/s (cpu {_pct(result.cpu)})")
    return result


def _preloaded_sink(
    ctx: Ctx,
    receiver: Receiver,
    cfg: dict[str, Any],
    name: str,
    records: list[data.Record],
    *,
    fail_first: bool = False,
) -> tuple[Settings, Stage]:
    """A sink worker started on ``records`` pre-loaded into its sink topic, the receiver reset."""
    settings = ctx.create(cfg)
    preload(fast_producer(ctx.bootstrap), sink_topic(settings, ADAPTER), records)
    receiver.reset(fail_first=fail_first)
    return settings, ctx.stage(name, "sink", cfg)


def _cpu(ctx: Ctx, proc: Proc, first: int, last: int) -> str:
    """ "cpu N%: threads, broker M%": a process's CPU over a measured interval."""
    return (
        f"cpu {_pct(proc.cpu_share(first, last))}: {_threads(proc, first, last)}"
        f"{ctx.broker_cpu(first, last)}"
    )


def _delivered(
    ctx: Ctx, receiver: Receiver, sink: Stage, count: int
) -> tuple[float, dict[str, Any]]:
    """Run a sink worker until ``count`` records are delivered, then stop it: the rate from the
    first request to the last success, and the receiver's stats."""
    rate, stats = _deliveries(ctx, receiver, [sink], count, 60 + count / 50)
    ctx.stop(sink)
    return rate, stats


def _main_leg(ctx: Ctx, receiver: Receiver, records: list[data.Record], i: int) -> float:
    """The sink worker delivering pre-loaded records to a receiver that answers 200."""
    cfg = ctx.config(f"r4-{i}", url=receiver.url)
    _, sink = _preloaded_sink(ctx, receiver, cfg, f"r4-sink-{i}", records)
    count = len(records)
    rate, stats = _delivered(ctx, receiver, sink, count)
    first, last = stats["first_ms"], stats["last_ok_ms"]
    ctx.say(
        f"sink {i + 1}: {_fmt(rate)} deliveries/s ({_cpu(ctx, sink, first, last)}; receiver "
        f"{_pct(receiver.cpu_share(first, last))})"
    )
    if stats["distinct_ok"] != count:
        ctx.notes.append(f"R4: {stats['ok']} deliveries for {count} records (duplicates)")
    return rate


def _retry_config(ctx: Ctx, receiver: Receiver, name: str, tier: str) -> dict[str, Any]:
    # Every first attempt fails by design, which the circuit breaker (when there is one) would
    # take for an outage: keep it closed so that this measures the retry path, not the breaker.
    return ctx.config(name, url=receiver.url, tiers=[tier], circuit_threshold=1_000_000)


def _retry_alone(ctx: Ctx, receiver: Receiver, records: list[data.Record], i: int) -> float:
    """R6: the retry path draining a backlog of retries, as the main path drains its backlog.

    The backlog is made by the real failure path: a sink worker whose every first attempt is
    answered 503 moves each record to the first retry tier (5 s, the default) and is stopped
    once the tier holds them all. When all of them are due, a new worker (same group) starts:
    the retry path (the tier's delayed consumer, the second attempt, the offsets) delivers them,
    timed from the first to the last success, as the main path's legs are. Were the worker
    left running, the retries would come due only as fast as the first attempts failed, and
    the rate would be that of the failures, not of the retry path.
    """
    count = len(records)
    cfg = _retry_config(ctx, receiver, f"r6-{i}", RETRY_TIER)
    settings, failing = _preloaded_sink(
        ctx, receiver, cfg, f"r6-fail-{i}", records, fail_first=True
    )
    wait_until(
        lambda: int(receiver.stats()["failed"]) >= count,
        ctx.watched([failing, receiver]),
        ctx.cap(60 + count / 100),
        f"{count:,} failed first attempts",
        interval=0.2,
    )
    ctx.wait_count(retry_topics(settings, ADAPTER)[0], count, [failing], 60)
    ctx.stop(failing)
    failed = receiver.stats()
    due_ms = int(failed["last_failed_ms"]) + int(settings.retry.tiers[0].total_seconds() * 1000)
    wait_until(lambda: now_ms() > due_ms, [], ctx.cap(60), "the retries due", interval=0.1)
    retrying = ctx.stage(f"r6-retry-{i}", "sink", cfg)
    _, stats = _delivered(ctx, receiver, retrying, count)
    first, last = stats["first_ok_ms"], stats["last_ok_ms"]
    rate: float = count / max(0.001, (last - first) / 1000)
    ctx.say(
        f"retry path {i + 1}: {_fmt(rate)} deliveries/s ({_cpu(ctx, retrying, first, last)}); the "
        f"{int(failed['failed']):,} first attempts failed in "
        f"{(int(failed['last_failed_ms']) - int(failed['first_ms'])) / 1000:.1f} s before"
    )
    if stats["failed"] != count:
        ctx.notes.append(f"R6 round {i + 1}: {stats['failed']} failed attempts for {count} records")
    return rate


def _retry_both(ctx: Ctx, receiver: Receiver, records: list[data.Record], i: int) -> float:
    """Not a goal: every record's failed first attempt and its retry through a 200 ms tier
    in the same worker at once: records delivered per second, from the first request."""
    cfg = _retry_config(ctx, receiver, f"r6b-{i}", "200ms")
    _, sink = _preloaded_sink(ctx, receiver, cfg, f"r6b-sink-{i}", records, fail_first=True)
    rate, stats = _delivered(ctx, receiver, sink, len(records))
    first, last = stats["first_ms"], stats["last_ok_ms"]
    ctx.say(
        f"both attempts {i + 1}: {_fmt(rate)} records delivered/s "
        f"({_cpu(ctx, sink, first, last)}), failed {stats['failed']:,}"
    )
    return rate


def r4(ctx: Ctx, receiver: Receiver, *, retry: bool) -> None:
    """Rounds of the sink worker between raw aiohttp runs (R4) and, with ``retry``, of the
    retry path between sink runs (R6): each leg ÷ the mean of the baseline legs either side of
    it, the median of the rounds reported. Then, once, the webhook adapter's own client alone
    (how much of R4 is the client) and raw httpx on fewer bodies (an order of magnitude
    slower)."""
    count = ctx.n(10_000, 1_000)
    retry_count = ctx.n(5_000, 1_000)
    httpx_count = ctx.n(2_000, 500)
    records = _sink_records(ctx, count, 4)
    retry_records = _sink_records(ctx, retry_count, 6)
    bodies = [data.webhook_body(v, ADAPTER) for _, v, _ in records]
    body_size = statistics.fmean(len(b) for _, b in bodies)
    bodies_path = ctx.logs / "bodies.txt"
    bodies_path.write_bytes(b"".join(i.encode() + b" " + b + b"\n" for i, b in bodies))

    timeline: list[tuple[str, float]] = []
    raws: list[_Raw] = []

    def raw() -> None:
        raws.append(_raw(ctx, receiver, "aiohttp", count, bodies_path, len(raws) + 1))
        timeline.append(("aiohttp", raws[-1].rate))

    raw()
    for i in range(ctx.rounds):
        timeline.append(("sink", _main_leg(ctx, receiver, records, i)))
        raw()
        if retry:
            timeline.append(("retry", _retry_alone(ctx, receiver, records, i)))
            timeline.append(("both", _retry_both(ctx, receiver, retry_records, i)))
    if retry:
        # The main-path leg after the last retry legs.
        timeline.append(("sink", _main_leg(ctx, receiver, records, ctx.rounds)))
    own = _raw(ctx, receiver, "builtin", count, bodies_path, 1)
    hx = _raw(ctx, receiver, "httpx", httpx_count, bodies_path, 1)
    ratios = bracketed(timeline, "sink", "aiohttp")
    aio = statistics.median(r.rate for r in raws)
    sink_rate = statistics.median(v for k, v in timeline if k == "sink")
    ctx.rows += [
        Row(
            "R4  webhook deliveries ÷ raw aiohttp",
            median(ratios),
            key="r4",
            inputs=(
                f"{rounds_text(ratios)}; sink {_rates_text(timeline, 'sink')}/s, raw aiohttp "
                f"{_rates_text(timeline, 'aiohttp')}/s (in the order run; raw aiohttp cpu "
                f"{_pct(raws[0].cpu)}, receiver {_pct(raws[0].receiver_cpu)}); {count:,} POSTs "
                f"of {body_size:.0f} B, concurrency {CONCURRENCY}"
            ),
        ),
        Row(
            "R4  raw builtin client ÷ raw aiohttp",
            own.rate / aio,
            inputs=(
                f"the webhook adapter's own HTTP/1.1 client alone {_fmt(own.rate)}/s "
                f"(cpu {_pct(own.cpu)}, receiver {_pct(own.receiver_cpu)}) ÷ the median raw "
                f"aiohttp run; sink ÷ it {sink_rate / own.rate:.2f}"
            ),
        ),
        Row(
            "R4  raw httpx ÷ raw aiohttp",
            hx.rate / aio,
            key="r4_httpx_vs_aiohttp",
            inputs=(
                f"httpx {_fmt(hx.rate)}/s (cpu {_pct(hx.cpu)}) over {httpx_count:,} POSTs, "
                f"concurrency {CONCURRENCY}, ÷ the median raw aiohttp run"
            ),
        ),
    ]
    if not retry:
        return
    ratios = bracketed(timeline, "retry", "sink")
    both = bracketed(timeline, "both", "sink")
    ctx.rows += [
        Row(
            "R6  retry-path ÷ main-path deliveries",
            median(ratios),
            key="r6",
            inputs=(
                f"{rounds_text(ratios)}; retry path {_rates_text(timeline, 'retry')}/s, main "
                f"path {_rates_text(timeline, 'sink')}/s (in the order run); the same "
                f"{count:,} records as R4, every first attempt answered 503 on the main path; "
                f"once all were due in the {RETRY_TIER} tier, a new worker delivered them, timed "
                f"from the first to the last success, as the main path is"
            ),
        ),
        Row(
            "R6  both attempts in one run ÷ main path",
            median(both),
            inputs=(
                f"not a goal: {rounds_text(both)}; {_rates_text(timeline, 'both')} records/s "
                f"when each record's failed first attempt and its retry (tier 200ms) share the "
                f"worker, from the first request to the last success; {retry_count:,} records. "
                f"At most 0.5 by construction: two attempts a record"
            ),
        ),
    ]


# -- MEM: the release stage's peak RSS with a backlog not yet due ----------------------------


def _release_peak(ctx: Ctx, name: str, waiting: int) -> tuple[int, float | None]:
    cfg = ctx.config(name)
    settings = ctx.create(cfg)
    due = now_ms() + 3_600_000
    rng = random.Random(9)
    close = now_ms() - 60_000
    distinct = [
        data.trace_record(data.to_json(data.trade(ctx.pool, i, close + i, rng)), due_ms=due)
        for i in range(min(waiting, 2000))
    ]
    t0 = time.monotonic()
    preload(
        fast_producer(ctx.bootstrap),
        delay_topic(settings),
        (distinct[i % len(distinct)] for i in range(waiting)),
    )
    ctx.say(f"pre-loaded {waiting:,} waiting records in {time.monotonic() - t0:.1f} s")
    release = ctx.stage(f"{name}-release", "release", cfg)
    wait_until(
        lambda: release.metric("auto_trace_held_partitions") == PARTITIONS,
        [release],
        ctx.cap(120),
        "every partition held",
        interval=0.2,
    )
    settle = time.monotonic() + MEM_WAIT_S
    wait_until(lambda: time.monotonic() > settle, [release], MEM_WAIT_S + 5, "settling")
    peak = release.peak_rss_kib()
    cpu = release.cpu_seconds()
    ctx.stop(release)
    marks = Watermarks(ctx.bootstrap)
    try:
        early = marks.count(sink_topic(settings, ADAPTER))
    finally:
        marks.close()
    if early:
        raise RuntimeError(f"release published {early} records that were not due")
    if peak is None:
        raise RuntimeError("could not read the release stage's peak RSS")
    return peak, cpu


def mem(ctx: Ctx) -> None:
    big, small = ctx.n(1_000_000, 10_000), ctx.n(10_000, 1_000)
    peak_small, _ = _release_peak(ctx, "mem-small", small)
    ctx.say(f"release peak RSS with {small:,} waiting: {peak_small / 1024:.1f} MiB")
    peak_big, _ = _release_peak(ctx, "mem-big", big)
    ctx.say(f"release peak RSS with {big:,} waiting: {peak_big / 1024:.1f} MiB")
    ctx.rows.append(
        Row(
            "MEM release peak RSS big ÷ small",
            peak_big / peak_small,
            key="mem_ratio",
            inputs=(
                f"{peak_big / 1024:.1f} MiB with {big:,} waiting, {peak_small / 1024:.1f} MiB "
                f"with {small:,} (due in 1 h, {PARTITIONS} partitions; VmHWM after every "
                f"partition was held + {MEM_WAIT_S:.0f} s)"
            ),
        )
    )


# -- SEED: end to end -------------------------------------------------------------------------


def seed(ctx: Ctx, receiver: Receiver) -> None:
    count = ctx.n(10_000, 1_000)
    cfg = ctx.config("e2e", url=receiver.url)
    settings = ctx.create(cfg, with_input=True)
    preload(
        fast_producer(ctx.bootstrap),
        settings.input.topic,
        data.trade_records(ctx.pool, count, now_ms() - 3_600_000, seed=5),
    )
    receiver.reset()
    stages = [ctx.stage(f"e2e-{role}", role, cfg) for role in ("ingest", "release", "sink")]
    rate, stats = _deliveries(ctx, receiver, list(stages), count, 60 + count / 50)
    shares = [s.cpu_share(stats["first_ms"], stats["last_ok_ms"]) for s in stages]
    ctx.say(f"end to end: {_fmt(rate)} trades/s")
    ctx.rows.append(
        Row(
            "SEED sustained trades/s end to end",
            rate,
            "/s",
            key="e2e_trades_per_s",
            inputs=(
                f"{rate / SEED_CEILING_TRADES_PER_S:,.0f} x the original design's ceiling of "
                f"10 trades / 5 min ({SEED_CEILING_TRADES_PER_S:.3f}/s); {count:,} pre-loaded "
                f"trades, trade.closed → webhook 200, ingest/release/sink one process each "
                f"(cpu {', '.join(_pct(s) for s in shares)}), window 0"
            ),
        )
    )


SCENARIOS = ("R1", "R1b", "R3", "MEM", "R4", "R6", "SEED")


def run(ctx: Ctx, only: set[str]) -> None:
    """Every scenario in :data:`SCENARIOS` order (R1b needs R1, R6 needs R4)."""
    t0 = time.monotonic()
    ctx.pool = data.trade_pool(now_ms() - 2 * 86_400_000)
    ctx.say(f"built {len(ctx.pool)} sample trades in {time.monotonic() - t0:.1f} s")
    if only & {"R1", "R1b"}:
        chain = "R1b" in only
        scenario(ctx, "R1/R1b" if chain else "R1", lambda: r1(ctx, chain=chain))
    if "R3" in only:
        scenario(ctx, "R3", lambda: r3(ctx))
    if "MEM" in only:
        scenario(ctx, "MEM", lambda: mem(ctx))
    if only & {"R4", "R6", "SEED"}:
        receiver = Receiver(ctx.logs)
        try:
            if only & {"R4", "R6"}:
                retry = "R6" in only
                scenario(ctx, "R4/R6" if retry else "R4", lambda: r4(ctx, receiver, retry=retry))
            if "SEED" in only:
                scenario(ctx, "SEED", lambda: seed(ctx, receiver))
        finally:
            receiver.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Settings come from the environment (``make bench`` passes them through); the only
    argument is ``-h``/``--help``, which prints the method and the settings."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args:
        if args[0] in ("-h", "--help"):
            print(f"usage: python -m bench   (or: make bench)\n\n{bench.__doc__}")
            return 0
        sys.stderr.write(
            f"python -m bench takes no arguments (settings are BENCH_* variables; "
            f"see --help), got {args[0]!r}\n"
        )
        return 2
    try:
        scale = float(os.environ.get("BENCH_SCALE", "1.0"))
    except ValueError:
        sys.stderr.write("BENCH_SCALE must be a number (e.g. 0.1)\n")
        return 2
    if not scale > 0:
        sys.stderr.write("BENCH_SCALE must be greater than 0\n")
        return 2
    try:
        rounds = int(os.environ.get("BENCH_ROUNDS", "5"))
    except ValueError:
        rounds = 0
    if rounds < 1:
        sys.stderr.write("BENCH_ROUNDS must be a whole number of at least 1 (e.g. 5)\n")
        return 2
    try:
        client = json.loads(os.environ.get("BENCH_KAFKA_CLIENT") or "{}")
    except ValueError:
        client = None
    if not isinstance(client, dict):
        sys.stderr.write('BENCH_KAFKA_CLIENT must be a JSON object, e.g. {"linger.ms": 10}\n')
        return 2
    if os.environ.get("BENCH_PROFILE") and py_spy() is None:
        # A profile asked for and silently not taken would cost a whole run.
        sys.stderr.write(
            "BENCH_PROFILE needs py-spy, which is not a dependency of the project: "
            ".venv/bin/pip install py-spy\n"
        )
        return 2
    only = {s.strip() for s in os.environ.get("BENCH_ONLY", "").split(",") if s.strip()}
    unknown = only - set(SCENARIOS)
    if unknown:
        sys.stderr.write(f"BENCH_ONLY: unknown scenarios {sorted(unknown)}; know {SCENARIOS}\n")
        return 2
    os.environ[SECRET_ENV] = SECRET
    if OUTPUT.exists():
        shutil.rmtree(OUTPUT)
    OUTPUT.mkdir(parents=True)
    started = time.monotonic()
    load_before = os.getloadavg()
    with kafka_cluster() as cluster:
        ctx = Ctx(cluster.bootstrap_servers, scale, OUTPUT, Topics(cluster.bootstrap_servers))
        ctx.client = client
        ctx.rounds = rounds
        if cluster.local is not None and cluster.local.pid is not None:
            ctx.broker = Sampled("broker", cluster.local.pid, threads=False)
        ctx.say(f"Kafka at {cluster.bootstrap_servers} ({cluster.kind}), BENCH_SCALE={scale}")
        try:
            run(ctx, only or set(SCENARIOS))
        finally:
            for p in list(ctx.procs):
                ctx.stop(p)
            ctx.topics.delete_all()
            # No client of this process may outlive the broker (it would log reconnects).
            del ctx.topics
            gc.collect()
    elapsed = time.monotonic() - started
    notes = [
        f"BENCH_SCALE={scale}; BENCH_ROUNDS={rounds}; {os.cpu_count()} CPUs; Kafka "
        f"{cluster.kind} at {cluster.bootstrap_servers}; total {elapsed:.0f} s; logs in {OUTPUT}",
        "cpu = share of one core used by that process over the measured interval; load "
        f"average {load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        "(above the CPU count, other work competed for the cores and rates are noisy)",
        *([f"BENCH_KAFKA_CLIENT={json.dumps(client)}"] if client else []),
        *([f"BENCH_ONLY={','.join(sorted(only))}"] if only else []),
        *ctx.notes,
    ]
    print(render(ctx.rows, notes=notes, errors=ctx.errors))
    return 1 if ctx.errors else 0
