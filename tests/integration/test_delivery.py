"""The delivery path against the real broker and real HTTP receivers on loopback:
T+X release, per-adapter sink workers, tiered retries and the DLQ."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition
from standardwebhooks import Webhook

from consumer import headers as h
from consumer.adapters.base import Adapter, Delivery
from consumer.config import Settings
from consumer.health import Health
from consumer.ingest import IngestStage
from consumer.metrics import Metrics
from consumer.receiver import Received, Reply, WebhookReceiver, always, fail_first
from consumer.records import decode_trace, encode_trace
from consumer.release import ReleaseStage
from consumer.samples import PERSONAL_FIELDS, sample_trade, to_json
from consumer.sink import SinkWorker
from consumer.topics import delay_topic, dlq_topic, ingest_dlq_topic, retry_topics, sink_topic
from consumer.trade import project, validate_trade
from tests.support import (
    OTHER_SECRET,
    WEBHOOK_SECRET,
    create_topics,
    header,
    make_settings,
    produce,
    reader,
    running,
    trade_id,
    webhook,
)

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTO_TRACE_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _stages(settings: Any, metrics: Metrics | None = None) -> list[Any]:
    metrics = metrics or Metrics()
    health = Health()
    stages: list[Any] = [
        IngestStage(settings, metrics, health),
        ReleaseStage(settings, metrics, health),
    ]
    stages += [SinkWorker(settings, a, metrics, health) for a in settings.enabled_adapters()]
    return stages


def _trades(n: int, close_ms: int | None = None, seed: int = 11) -> list[dict[str, Any]]:
    base = now_ms() if close_ms is None else close_ms
    return [sample_trade(i, seed=seed, close_time_ms=base + i) for i in range(n)]


def _ids(received: list[Received]) -> set[str]:
    return {r.payload["trade_id"] for r in received if r.status == 200}


def test_no_record_is_ever_delivered_before_close_time_plus_window(bootstrap_servers: str) -> None:
    with WebhookReceiver(WEBHOOK_SECRET) as receiver:
        settings = make_settings(
            bootstrap_servers, delay={"window": "2s"}, adapters=[webhook("hook", receiver.url)]
        )
        create_topics(settings)
        with running(*_stages(settings)):
            # Close times spread over the next ~3s, so due times keep arriving while it runs.
            start = now_ms()
            trades = [sample_trade(i, seed=5, close_time_ms=start + i * 8) for i in range(360)]
            produce(bootstrap_servers, settings.input.topic, [(None, to_json(t)) for t in trades])
            assert receiver.wait_for(lambda rs: len(_ids(list(rs))) >= len(trades), timeout=60)
    close = {t["trade_id"]: int(_ms(t["close_time"])) for t in trades}
    lateness = []
    for r in receiver.received:
        due = close[r.payload["trade_id"]] + 2000
        assert r.wall_ms >= due, "delivered before close_time + window"
        lateness.append(r.wall_ms - due)
    lateness.sort()
    p50 = statistics.median(lateness)
    p99 = lateness[int(len(lateness) * 0.99) - 1]
    print(
        f"\nlateness after due over {len(lateness)} deliveries: "
        f"p50={p50}ms p99={p99}ms max={lateness[-1]}ms"
    )
    # Bounded by the poll loop, not by a schedule: generous for a shared, noisy machine.
    assert lateness[-1] < 5000


def _ms(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000


def test_release_holds_each_partition_and_releases_in_order_when_due(
    bootstrap_servers: str,
) -> None:
    with WebhookReceiver(WEBHOOK_SECRET) as receiver:
        settings = make_settings(
            bootstrap_servers, delay={"window": "1500ms"}, adapters=[webhook("hook", receiver.url)]
        )
        create_topics(settings)
        metrics = Metrics()
        health = Health()
        trades = _trades(50)
        # The platform keys trade.closed by signal, so one signal's trades share a partition.
        produce(bootstrap_servers, settings.input.topic, [(_key(t), to_json(t)) for t in trades])
        with (
            running(
                IngestStage(settings, metrics, health), ReleaseStage(settings, metrics, health)
            ),
            reader(bootstrap_servers, sink_topic(settings, "hook")) as out,
        ):
            out.read(len(trades), timeout=30)
    late = []
    for msg, seen in zip(out.messages, out.seen_at_ms, strict=True):
        assert seen >= int(header(msg, h.DUE_MS) or 0)
        late.append(msg.timestamp()[1] - int(header(msg, h.DUE_MS) or 0))
    late.sort()
    print(
        "\nrelease lateness (sink-topic timestamp - due): "
        f"p50={late[len(late) // 2]}ms max={late[-1]}ms"
    )
    # Records of one key keep their order (they were published in close-time order).
    by_key: dict[bytes, list[float]] = {}
    for msg in out.messages:
        close = decode_trace(msg.value() or b"")["close_time"].timestamp()
        by_key.setdefault(msg.key() or b"", []).append(close)
    assert all(v == sorted(v) for v in by_key.values())
    assert metrics.lateness.labels("release", "")._sum.get() >= 0


def _key(trade: dict[str, Any]) -> bytes:
    return str(trade["signal_id"] or trade["trade_id"]).encode()


def test_a_failing_adapter_does_not_slow_a_healthy_one(bootstrap_servers: str) -> None:
    with (
        WebhookReceiver(WEBHOOK_SECRET) as healthy,
        WebhookReceiver(WEBHOOK_SECRET, fail=always(503)) as down,
    ):
        settings = make_settings(
            bootstrap_servers,
            adapters=[
                webhook("healthy", healthy.url),
                # No circuit breaker here: every record of the down adapter walks the tiers.
                webhook("down", down.url, circuit={"failure_threshold": 100_000}),
            ],
            retry={"tiers": ["1s", "2s"]},
        )
        create_topics(settings)
        trades = _trades(200)
        start = time.monotonic()
        produce(bootstrap_servers, settings.input.topic, [(None, to_json(t)) for t in trades])
        with running(*_stages(settings)):
            assert healthy.wait_for(len(trades), timeout=30)
            healthy_done = time.monotonic() - start
            assert down.wait_for(len(trades), timeout=30)  # it was tried too, and failed
    assert _ids(healthy.received) == {t["trade_id"] for t in trades}
    # The down adapter's retries (tiers of 1s and 2s) must not hold the healthy one back.
    assert healthy_done < 15


def test_a_retriable_failure_walks_the_tiers_in_order_then_reaches_the_dlq_with_every_header(
    bootstrap_servers: str,
) -> None:
    with WebhookReceiver(WEBHOOK_SECRET, fail=always(503)) as receiver:
        settings = make_settings(
            bootstrap_servers,
            adapters=[webhook("hook", receiver.url)],
            retry={"tiers": ["300ms", "600ms", "900ms"]},
        )
        create_topics(settings)
        trade = _trades(1)[0]
        produce(bootstrap_servers, settings.input.topic, [(None, to_json(trade))])
        with running(*_stages(settings)), reader(bootstrap_servers, dlq_topic(settings)) as dlq:
            dead = dlq.read(1, timeout=30)[0]
    attempts = receiver.received
    assert len(attempts) == 4
    assert len({a.webhook_id for a in attempts}) == 1  # same Idempotency-Key on every attempt
    gaps = [b.wall_ms - a.wall_ms for a, b in itertools.pairwise(attempts)]
    for gap, tier in zip(gaps, (300, 600, 900), strict=True):
        assert gap >= tier, (gaps, "a retry came sooner than its tier")
    assert header(dead, h.ATTEMPTS) == "4"
    assert header(dead, h.ADAPTER) == "hook"
    assert header(dead, h.ERROR_CLASS) == "RetriableDeliveryError"
    assert "503" in (header(dead, h.ERROR_MESSAGE) or "")
    assert header(dead, h.ORIGIN_TOPIC) == sink_topic(settings, "hook")
    assert header(dead, h.ORIGIN_PARTITION) is not None and header(dead, h.ORIGIN_OFFSET) == "0"
    first, last = (
        int(header(dead, h.FIRST_FAILURE_MS) or 0),
        int(header(dead, h.LAST_FAILURE_MS) or 0),
    )
    assert first == pytest.approx(attempts[0].wall_ms, abs=1000)
    assert last - first >= 1800
    assert header(dead, h.TRADE_ID) == trade["trade_id"]
    assert header(dead, h.SOURCE_GROUP) == f"{settings.topics.prefix}-sink-hook"
    assert dead.key() == (trade["signal_id"] or trade["trade_id"]).encode()


def test_a_fatal_failure_goes_straight_to_the_dlq(bootstrap_servers: str) -> None:
    with WebhookReceiver(WEBHOOK_SECRET, fail=always(422)) as receiver:
        settings = make_settings(bootstrap_servers, adapters=[webhook("hook", receiver.url)])
        create_topics(settings)
        produce(bootstrap_servers, settings.input.topic, [(None, to_json(_trades(1)[0]))])
        with running(*_stages(settings)), reader(bootstrap_servers, dlq_topic(settings)) as dlq:
            dead = dlq.read(1, timeout=30)[0]
            retried = [reader_count(bootstrap_servers, t) for t in retry_topics(settings, "hook")]
    assert receiver.count == 1
    assert header(dead, h.ATTEMPTS) == "1"
    assert header(dead, h.ERROR_CLASS) == "FatalDeliveryError"
    assert retried == [0] * len(retried)


def test_a_sink_record_that_is_no_trace_record_is_dead_lettered_and_the_next_is_delivered(
    bootstrap_servers: str,
) -> None:
    # Only auto-trace writes the sink topic, but a hand-made record there must neither stall
    # its partition nor be lost; it carries no trade id to give the dead letter.
    trade = _trades(1, seed=47)[0]
    good = encode_trace(project(validate_trade(trade)))
    # Two strings first ("x", "abc"), then a union branch that cannot be: no TraceRecord.
    garbage = b"\x02x\x06abc\xff\xfe not a TraceRecord"
    with WebhookReceiver(WEBHOOK_SECRET) as receiver:
        settings = make_settings(bootstrap_servers, adapters=[webhook("hook", receiver.url)])
        create_topics(settings)
        # One key, so one partition: the good record waits behind the bad one.
        produce(bootstrap_servers, sink_topic(settings, "hook"), [(b"k", garbage), (b"k", good)])
        worker = SinkWorker(settings, settings.adapters[0], Metrics(), Health())
        with running(worker), reader(bootstrap_servers, dlq_topic(settings)) as dlq:
            dead = dlq.read(1, timeout=30)[0]
            assert receiver.wait_for(lambda rs: len(_ids(list(rs))) == 1, timeout=30)
    assert _ids(receiver.received) == {trade["trade_id"]}
    assert dead.value() == garbage and dead.key() == b"k"
    assert header(dead, h.ERROR_CLASS) == "UndecodableRecord"
    assert header(dead, h.ATTEMPTS) == "1"
    assert header(dead, h.TRADE_ID) is None


class _HangsOnFirstAttempt(Adapter):
    """An adapter bug: the first attempt of each record never returns."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.delivered: list[str] = []

    async def deliver(self, delivery: Delivery) -> None:
        if delivery.attempt == 1:
            await asyncio.get_running_loop().create_future()
        self.delivered.append(delivery.record["trade_id"])


def test_a_hung_adapter_call_is_bounded_and_the_record_is_retried(bootstrap_servers: str) -> None:
    settings = make_settings(
        bootstrap_servers,
        adapters=[webhook("hook", "http://127.0.0.1:9/", timeout="100ms", concurrency=4)],
        retry={"tiers": ["200ms"]},
    )
    create_topics(settings)
    trades = _trades(6, seed=43)
    produce(bootstrap_servers, settings.input.topic, [(None, to_json(t)) for t in trades])
    adapter = _HangsOnFirstAttempt("hook")
    metrics, health = Metrics(), Health()
    stages = [
        IngestStage(settings, metrics, health),
        ReleaseStage(settings, metrics, health),
        SinkWorker(settings, settings.adapters[0], metrics, health, adapter=adapter),
    ]
    retry = retry_topics(settings, "hook")[0]
    with running(*stages), reader(bootstrap_servers, retry) as retried:
        # Twice the adapter's timeout plus a second, then the next periodic check.
        moved = retried.read(len(trades), timeout=30)
        deadline = time.monotonic() + 30
        while len(set(adapter.delivered)) < len(trades) and time.monotonic() < deadline:
            health.wait_changed(0.05)
    assert sorted(adapter.delivered) == sorted(t["trade_id"] for t in trades)
    assert {header(m, h.ERROR_MESSAGE) for m in moved} == {"adapter call exceeded 1s"}
    assert metrics.deliveries.labels("hook", "delivered")._value.get() == len(trades)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_failures_are_logged_once_in_full_then_summarised_and_each_at_debug(
    bootstrap_servers: str,
) -> None:
    sink_log = logging.getLogger("auto_trace.sink")
    capture = _Capture()
    level = sink_log.level
    sink_log.addHandler(capture)
    sink_log.setLevel(logging.DEBUG)
    try:
        with WebhookReceiver(WEBHOOK_SECRET, fail=always(422)) as receiver:
            settings = make_settings(bootstrap_servers, adapters=[webhook("hook", receiver.url)])
            create_topics(settings)
            trades = _trades(30, seed=37)
            produce(bootstrap_servers, settings.input.topic, [(None, to_json(t)) for t in trades])
            with running(*_stages(settings)), reader(bootstrap_servers, dlq_topic(settings)) as dlq:
                dlq.read(len(trades), timeout=30)
    finally:
        sink_log.removeHandler(capture)
        sink_log.setLevel(level)
    failed = [r for r in capture.records if r.getMessage() == "delivery failed"]
    full = [r for r in failed if r.levelno == logging.INFO]
    summaries = [r for r in capture.records if r.getMessage() == "delivery failures"]
    assert len(failed) == len(trades)  # every failure at DEBUG or above
    assert len(full) == 1  # all within one interval: one in full at INFO...
    assert len(summaries) == 1 and summaries[0].levelno == logging.INFO  # ...then one summary
    fields = summaries[0].fields  # type: ignore[attr-defined]
    assert fields["adapter"] == "hook"
    assert fields["count"] == len(trades) - 1
    assert fields["by_error_and_next"] == {
        f"FatalDeliveryError -> {dlq_topic(settings)}": len(trades) - 1
    }
    logged_ids = {r.fields["trade_id"] for r in failed}  # type: ignore[attr-defined]
    assert logged_ids == {t["trade_id"] for t in trades}


def reader_count(bootstrap: str, topic: str) -> int:
    with reader(bootstrap, topic) as r:
        return len(r.drain(quiet=0.5))


def test_retry_after_is_honoured_and_never_retried_sooner(bootstrap_servers: str) -> None:
    with WebhookReceiver(WEBHOOK_SECRET, fail=fail_first(1, status=429, retry_after=3)) as receiver:
        settings = make_settings(
            bootstrap_servers,
            adapters=[webhook("hook", receiver.url)],
            retry={"tiers": ["200ms", "1s", "4s", "10s"]},
        )
        create_topics(settings)
        produce(bootstrap_servers, settings.input.topic, [(None, to_json(_trades(1)[0]))])
        with running(*_stages(settings)):
            assert receiver.wait_for(2, timeout=30)
    first, second = receiver.received[:2]
    assert first.status == 429 and second.status == 200
    assert second.wall_ms - first.wall_ms >= 3000


def test_signatures_verify_with_the_standard_webhooks_library_and_no_personal_value_arrives(
    bootstrap_servers: str,
) -> None:
    with WebhookReceiver() as receiver:
        settings = make_settings(bootstrap_servers, adapters=[webhook("hook", receiver.url)])
        create_topics(settings)
        trades = _trades(40, seed=23)
        produce(bootstrap_servers, settings.input.topic, [(None, to_json(t)) for t in trades])
        with running(*_stages(settings)):
            assert receiver.wait_for(len(trades), timeout=30)
    ours, theirs = Webhook(WEBHOOK_SECRET), Webhook(OTHER_SECRET)
    personal = [str(t[f]) for t in trades for f in PERSONAL_FIELDS if t.get(f)]
    for r in receiver.received:
        assert ours.verify(r.body, r.headers)["trade_id"] in {t["trade_id"] for t in trades}
        with pytest.raises(Exception, match="signature"):
            theirs.verify(r.body, r.headers)
        assert r.headers["idempotency-key"] == r.headers["webhook-id"]
        wire = r.body + repr(sorted(r.headers.items())).encode()
        assert not [p for p in personal if p.encode() in wire]


def test_a_sink_worker_killed_mid_delivery_loses_nothing(
    bootstrap_servers: str, tmp_path: Path
) -> None:
    slow = Reply(status=200, delay=0.05)
    with WebhookReceiver(WEBHOOK_SECRET, fail=lambda _r: slow) as receiver:
        settings = make_settings(
            bootstrap_servers, adapters=[webhook("hook", receiver.url, concurrency=4)]
        )
        create_topics(settings)
        trades = _trades(300, seed=31)
        produce(bootstrap_servers, settings.input.topic, [(None, to_json(t)) for t in trades])
        config = {
            # A SIGKILLed member is evicted after the session timeout; keep it short here.
            "kafka": {
                "bootstrap_servers": bootstrap_servers,
                "client": {"session.timeout.ms": 6000},
            },
            "topics": {"prefix": settings.topics.prefix},
            "adapters": [webhook("hook", receiver.url, concurrency=4)],
            "metrics": {"port": 0},
            "logging": {"format": "text"},
        }
        path = tmp_path / "sink.yaml"
        path.write_text(yaml.safe_dump(config))
        cmd = [
            sys.executable,
            "-m",
            "consumer",
            "run",
            "--role",
            "sink",
            "--adapter",
            "hook",
            "--config",
            str(path),
        ]
        env = {**os.environ}
        metrics = Metrics()
        with running(
            IngestStage(settings, metrics, Health()), ReleaseStage(settings, metrics, Health())
        ):
            kills = 0
            for target in (40, 120, 200):
                proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
                try:
                    assert receiver.wait_for(target, timeout=60)
                finally:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(10)
                    kills += 1
            proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
            try:
                assert receiver.wait_for(lambda rs: len(_ids(list(rs))) >= len(trades), timeout=90)
            finally:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(30) == 0
    received = receiver.received
    assert _ids(received) == {t["trade_id"] for t in trades}  # nothing lost
    keys: dict[str, set[str]] = {}
    for r in received:
        keys.setdefault(r.payload["trade_id"], set()).add(r.headers["idempotency-key"])
    assert all(len(k) == 1 for k in keys.values())  # duplicates carry the same key
    dupes = sum(c - 1 for c in Counter(r.payload["trade_id"] for r in received).values())
    print(f"\nsink SIGKILLed {kills} times: {len(trades)} trades, {dupes} duplicate deliveries")


def _four_partitions(
    bootstrap_servers: str, receiver: WebhookReceiver, count: int, seed: int
) -> tuple[Settings, list[dict[str, Any]]]:
    """One webhook adapter (concurrency 4) on topics of 4 partitions, so that two workers
    share them; ``count`` trades published."""
    settings = make_settings(
        bootstrap_servers,
        adapters=[webhook("hook", receiver.url, concurrency=4)],
        topics={"partitions": 4},
    )
    create_topics(settings)
    trades = _trades(count, seed=seed)
    produce(bootstrap_servers, settings.input.topic, [(None, to_json(t)) for t in trades])
    return settings, trades


def test_two_workers_in_one_group_survive_a_rebalance_without_loss(bootstrap_servers: str) -> None:
    with WebhookReceiver(WEBHOOK_SECRET, fail=lambda _r: Reply(status=200, delay=0.01)) as receiver:
        settings, trades = _four_partitions(bootstrap_servers, receiver, 400, seed=41)
        metrics = Metrics()
        cfg = settings.adapters[0]
        with (
            running(
                IngestStage(settings, metrics, Health()), ReleaseStage(settings, metrics, Health())
            ),
            running(SinkWorker(settings, cfg, metrics, Health())) as first,
        ):
            assert receiver.wait_for(50, timeout=60)
            with running(SinkWorker(settings, cfg, metrics, Health())):
                assert receiver.wait_for(200, timeout=60)
                first[0].close()  # leaves the group: a second rebalance
                assert receiver.wait_for(lambda rs: len(_ids(list(rs))) >= len(trades), timeout=60)
    assert _ids(receiver.received) == {t["trade_id"] for t in trades}
    assert metrics.rebalances.labels(f"sink:{cfg.name}")._value.get() >= 3


def test_metrics_count_deliveries_retries_and_dead_letters(bootstrap_servers: str) -> None:
    with WebhookReceiver(WEBHOOK_SECRET, fail=fail_first(1, status=503)) as receiver:
        settings = make_settings(
            bootstrap_servers,
            adapters=[webhook("hook", receiver.url, circuit={"failure_threshold": 100})],
            retry={"tiers": ["200ms"]},
        )
        create_topics(settings)
        metrics = Metrics()
        produce(
            bootstrap_servers,
            settings.input.topic,
            [(None, to_json(t)) for t in _trades(5, seed=uuid.uuid4().int % 1000)],
        )
        with running(*_stages(settings, metrics)):
            assert receiver.wait_for(lambda rs: len(_ids(list(rs))) >= 5, timeout=30)
    assert metrics.deliveries.labels("hook", "delivered")._value.get() == 5
    assert metrics.deliveries.labels("hook", "retry")._value.get() == 5
    assert metrics.retries.labels("hook", "0")._value.get() == 5


@pytest.mark.parametrize("closing", [False, True])
def test_metrics_count_the_connections_the_webhook_client_opens(
    bootstrap_servers: str, closing: bool
) -> None:
    # A receiver that closes every connection makes each delivery open one; one that keeps
    # them alive is reached over at most `concurrency` connections.
    reply = Reply(status=200, headers={"Connection": "close"} if closing else {})
    with WebhookReceiver(WEBHOOK_SECRET, fail=lambda _r: reply) as receiver:
        settings = make_settings(
            bootstrap_servers, adapters=[webhook("hook", receiver.url, concurrency=2)]
        )
        create_topics(settings)
        metrics = Metrics()
        trades = _trades(12, seed=uuid.uuid4().int % 1000)
        produce(bootstrap_servers, settings.input.topic, [(None, to_json(t)) for t in trades])
        with running(*_stages(settings, metrics)):
            assert receiver.wait_for(len(trades), timeout=30)
            # Each client connection arrives from its own port: the receiver counts them too.
            peers = len({r.peer for r in receiver.received})
            opened = metrics.connections_opened.labels("hook")
            deadline = time.monotonic() + 10
            while opened._value.get() != peers:
                assert time.monotonic() < deadline, (opened._value.get(), peers)
                time.sleep(0.05)
    if closing:
        assert peers == len(trades)
    else:
        assert 1 <= peers <= 2


def test_records_of_one_key_arrive_in_order_while_different_keys_run_concurrently(
    bootstrap_servers: str,
) -> None:
    with WebhookReceiver(WEBHOOK_SECRET, fail=lambda _r: Reply(status=200, delay=0.02)) as receiver:
        settings = make_settings(
            bootstrap_servers, adapters=[webhook("hook", receiver.url, concurrency=8)]
        )
        create_topics(settings)
        base = now_ms() - 60_000
        trades = [sample_trade(i, seed=51, close_time_ms=base + i) for i in range(240)]
        for i, trade in enumerate(trades):
            trade["signal_id"] = f"sig-{i % 6}"
        produce(bootstrap_servers, settings.input.topic, [(_key(t), to_json(t)) for t in trades])
        with running(*_stages(settings)):
            assert receiver.wait_for(len(trades), timeout=60)
    by_signal: dict[str, list[Received]] = {}
    for r in receiver.received:
        by_signal.setdefault(r.payload["signal_id"], []).append(r)
    assert len(by_signal) == 6
    for got in by_signal.values():
        times = [r.payload["close_time"] for r in got]
        assert times == sorted(times)
        # One at a time: each came after the answer to the one before (held back 20 ms).
        gaps = [b.monotonic_ms - a.monotonic_ms for a, b in itertools.pairwise(got)]
        assert min(gaps) >= 19, "records of one key overlapped"
    assert len({r.peer for r in receiver.received}) > 1  # several connections: concurrent keys


def test_a_record_that_fails_is_overtaken_by_the_later_records_of_its_key_and_retried_after(
    bootstrap_servers: str,
) -> None:
    failed: set[str] = set()

    def fail_one(received: Received) -> Reply:
        trade_id = received.payload["trade_id"]
        if trade_id.endswith("03") and trade_id not in failed:
            failed.add(trade_id)
            return Reply(status=503)
        # Slow answers: were the key's records not one at a time, they would overlap.
        return Reply(status=200, delay=0.02)

    with WebhookReceiver(WEBHOOK_SECRET, fail=fail_one) as receiver:
        settings = make_settings(
            bootstrap_servers,
            adapters=[webhook("hook", receiver.url, concurrency=4)],
            retry={"tiers": ["1s"]},
        )
        create_topics(settings)
        trades = _trades(12, close_ms=now_ms() - 60_000, seed=53)
        for trade in trades:
            trade["signal_id"] = "sig-one-key"
        produce(bootstrap_servers, settings.input.topic, [(_key(t), to_json(t)) for t in trades])
        with running(*_stages(settings)):
            assert receiver.wait_for(len(trades) + 1, timeout=60)
    ids = [t["trade_id"] for t in trades]
    (late,) = [i for i in ids if i.endswith("03")]
    arrivals = [(r.payload["trade_id"], r.status) for r in receiver.received]
    # First attempts in the key's order, the failed one among them; its retry comes last, at
    # least a tier later, with the same Idempotency-Key.
    assert [i for i, _ in arrivals[: len(ids)]] == ids
    assert arrivals[ids.index(late)] == (late, 503)
    # One at a time: each came after the answer to the one before (held back 20 ms) was sent.
    firsts = receiver.received[: len(ids)]
    for before, after in itertools.pairwise(firsts):
        if before.status == 200:
            assert after.monotonic_ms - before.monotonic_ms >= 19, "a key's records overlapped"
    assert arrivals[-1] == (late, 200)
    tries = [r for r in receiver.received if r.payload["trade_id"] == late]
    assert tries[1].wall_ms - tries[0].wall_ms >= 1000
    assert tries[0].webhook_id == tries[1].webhook_id


def test_an_outage_opens_the_circuit_and_ends_with_every_record_delivered_and_no_dead_letter(
    bootstrap_servers: str,
) -> None:
    circuit = {"failure_threshold": 3, "probe_interval": "300ms", "max_probe_interval": "1s"}
    with WebhookReceiver(WEBHOOK_SECRET, fail=always(503)) as receiver:
        settings = make_settings(
            bootstrap_servers,
            adapters=[webhook("hook", receiver.url, concurrency=4, circuit=circuit)],
            retry={"tiers": ["200ms", "400ms"]},
        )
        create_topics(settings)
        metrics = Metrics()
        trades = _trades(60, seed=71)
        produce(bootstrap_servers, settings.input.topic, [(None, to_json(t)) for t in trades])
        state = metrics.circuit_state.labels("hook")
        with running(*_stages(settings, metrics)):
            # The outage lasts long enough for several failed probes (0.3s, 0.6s, 1s, 1s ...).
            assert receiver.wait_for(lambda rs: state._value.get() == 2 and len(rs) >= 12, 30)
            during = receiver.count
            receiver.set_policy(None)  # the tracker is back
            assert receiver.wait_for(lambda rs: len(_ids(list(rs))) >= len(trades), timeout=60)
            with reader(bootstrap_servers, dlq_topic(settings)) as dlq:
                dead = dlq.drain(quiet=1.5)
        assert state._value.get() == 0
    assert _ids(receiver.received) == {t["trade_id"] for t in trades}
    assert dead == []  # the outage itself caused no dead letter
    # Records were held, not pushed through the tiers: few requests during the outage.
    assert during < 40, during


def test_a_rebalance_delivers_nothing_twice(bootstrap_servers: str) -> None:
    """When a second worker joins, the first finishes what it had taken of the partitions it
    gives up (up to max_in_flight records) and their offsets are committed as they go, so the
    new owner starts after them. Before the fix those offsets were dropped, and 250-520 of
    these 600 trades were delivered twice."""
    with WebhookReceiver(WEBHOOK_SECRET, fail=lambda _r: Reply(status=200, delay=0.05)) as receiver:
        settings, trades = _four_partitions(bootstrap_servers, receiver, 600, seed=43)
        cfg = settings.adapters[0]
        first, second = Metrics(), Metrics()
        with (
            running(
                IngestStage(settings, first, Health()), ReleaseStage(settings, first, Health())
            ),
            running(SinkWorker(settings, cfg, first, Health())),
        ):
            assert receiver.wait_for(40, timeout=60)
            with running(SinkWorker(settings, cfg, second, Health())):
                assert receiver.wait_for(lambda rs: len(_ids(list(rs))) >= len(trades), timeout=90)
    # The first gave partitions up (assigned, revoked, assigned again); the second got some.
    assert first.rebalances.labels(f"sink:{cfg.name}")._value.get() >= 3
    assert second.rebalances.labels(f"sink:{cfg.name}")._value.get() >= 1
    counts = Counter(r.payload["trade_id"] for r in receiver.received if r.status == 200)
    assert set(counts) == {t["trade_id"] for t in trades}
    assert [t for t, n in counts.items() if n > 1] == []


@pytest.mark.parametrize(
    ("positional", "queue"),
    [(True, None), (False, None), (True, 7), (False, 7)],
    ids=["positional", "keywords", "positional-full-queue", "keywords-full-queue"],
)
def test_ingest_and_release_write_the_same_records_whichever_way_they_call_produce(
    bootstrap_servers: str, monkeypatch: pytest.MonkeyPatch, positional: bool, queue: int | None
) -> None:
    # The hot loops call produce() positionally once the start-up check passed, with keywords
    # when it failed: both must give every header, and acknowledge through the run's callback
    # (which is what lets the input offsets be committed). A producer queue of a few records
    # makes produce() refuse records (BufferError) all the time, so the way round a full queue
    # is taken too.
    monkeypatch.setattr("consumer.stage.positional_produce", lambda: positional)
    client = {} if queue is None else {"client": {"queue.buffering.max.messages": queue}}
    settings = make_settings(
        bootstrap_servers,
        delay={"window": "0s"},
        adapters=[webhook("hook", "http://127.0.0.1:9/")],
        kafka=client,
    )
    create_topics(settings)
    trades = _trades(120, close_ms=now_ms() - 60_000)
    poison = [(b"poison", b"{not json")] * 3
    produce(
        bootstrap_servers,
        settings.input.topic,
        [(_key(t), to_json(t)) for t in trades[:60]]
        + poison
        + [(_key(t), to_json(t)) for t in trades[60:]],
    )
    stages = [
        IngestStage(settings, Metrics(), Health()),
        ReleaseStage(settings, Metrics(), Health()),
    ]
    with (
        running(*stages),
        reader(bootstrap_servers, sink_topic(settings, "hook")) as out,
        reader(bootstrap_servers, ingest_dlq_topic(settings)) as dead,
    ):
        out.read(len(trades), timeout=60)
        dead.read(len(poison), timeout=30)
    by_id = {t["trade_id"]: t for t in trades}
    for msg in out.messages:
        trade = by_id[trade_id(msg)]
        close_ms = int(_ms(trade["close_time"]))
        assert msg.key() == _key(trade)
        assert [name for name, _ in msg.headers() or []] == [h.DUE_MS]
        assert decode_trace(msg.value() or b"")["close_time"].timestamp() * 1000 == close_ms
        assert int(header(msg, h.DUE_MS) or 0) == close_ms
    assert len({trade_id(m) for m in out.messages}) == len(trades)
    # Every input record's offset was committed: every output was acknowledged to its run.
    for topic, group, count in (
        (settings.input.topic, settings.input.group, len(trades) + len(poison)),
        (delay_topic(settings), settings.delay.group, len(trades)),
    ):
        assert _committed(bootstrap_servers, topic, group) == count, topic


def _committed(bootstrap: str, topic: str, group: str) -> int:
    """Records before the committed offsets of ``group`` on ``topic``, all partitions."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return sum(max(tp.offset, 0) for tp in committed)
    finally:
        consumer.close()
