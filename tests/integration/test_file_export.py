"""The file adapter against the real broker: the whole pipeline into JSON Lines files, and
exactly-once objects across SIGKILLs of the sink worker, on a local directory and on S3 (moto
in server mode, real HTTP)."""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from moto.server import ThreadedMotoServer

from consumer.adapters.file import close_date, object_name
from consumer.config import load_settings
from consumer.health import Health
from consumer.ingest import IngestStage
from consumer.metrics import Metrics
from consumer.records import decode_trace, to_json_bytes
from consumer.release import ReleaseStage
from consumer.samples import PERSONAL_FIELDS, sample_trade, to_json
from consumer.sink import SinkWorker
from consumer.topics import sink_group, sink_topic
from consumer.trade import project, validate_trade
from tests.support import create_topics, make_settings, produce, reader, running

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000
#: Records per batch in the crash tests: small, so that a run writes many objects.
BATCH = 20


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _trades(n: int, seed: int, days: int = 3) -> list[dict[str, Any]]:
    """Close times spread over the last ``days`` days, so batches span several dates."""
    start = now_ms() - days * DAY_MS
    step = days * DAY_MS // n
    return [sample_trade(i, seed=seed, close_time_ms=start + i * step) for i in range(n)]


def _local_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*.jsonl"))
        if not p.name.startswith(".")
    }


def _personal(trades: list[dict[str, Any]]) -> list[str]:
    return [str(t[f]) for t in trades for f in PERSONAL_FIELDS if t.get(f)]


def test_the_pipeline_exports_every_trade_exactly_once_as_json_lines_without_personal_data(
    bootstrap_servers: str, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    adapter = {
        "name": "files",
        "type": "file",
        "path": str(out),
        "max_records": 40,
        # Tails are written after 300ms without records: this test does not crash the worker.
        "idle_flush": "300ms",
    }
    settings = make_settings(bootstrap_servers, adapters=[adapter])
    create_topics(settings)
    trades = _trades(300, seed=61, days=2)
    produce(bootstrap_servers, settings.input.topic, [(None, to_json(t)) for t in trades])
    metrics, health = Metrics(), Health()
    stages = [
        IngestStage(settings, metrics, health),
        ReleaseStage(settings, metrics, health),
        SinkWorker(settings, settings.adapters[0], metrics, health),
    ]
    wanted = {t["trade_id"] for t in trades}

    def exported() -> list[str]:
        return [
            json.loads(line)["trade_id"]
            for data in _local_files(out).values()
            for line in data.splitlines()
        ]

    with running(*stages):
        deadline = time.monotonic() + 60
        while set(exported()) != wanted:
            assert time.monotonic() < deadline, f"{len(set(exported()))} of {len(wanted)}"
            time.sleep(0.1)  # poll interval; the deadline bounds the wait
    files = _local_files(out)
    ids = exported()
    assert Counter(ids) == Counter(wanted)  # every trade, exactly once
    personal = _personal(trades)
    everything = b"".join(files.values())
    assert personal and not [p for p in personal if p.encode() in everything]
    by_id = {t["trade_id"]: project(validate_trade(t)) for t in trades}
    named = re.compile(
        r"date=(\d{4}-\d{2}-\d{2})/"
        + re.escape(sink_topic(settings, "files"))
        + r"\+\d\+\d+\.jsonl"
    )
    for name, data in files.items():
        match = named.fullmatch(name)
        assert match, name
        for line in data.splitlines():
            record = by_id[json.loads(line)["trade_id"]]
            assert line == to_json_bytes(record)  # exactly the webhook body
            assert close_date(record) == match.group(1)
    assert len({name.split("/")[0] for name in files}) >= 2  # several close dates
    assert not list(out.rglob("*.tmp"))


# -- exactly-once objects across SIGKILLs ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SinkProcess:
    """``auto-trace run --role sink --adapter files`` in a subprocess, read through /metrics."""

    def __init__(self, config: dict[str, Any], workdir: Path, label: str) -> None:
        self.port = _free_port()
        path = workdir / f"{label}.yaml"
        path.write_text(yaml.safe_dump({**config, "metrics": {"port": self.port}}))
        self.log = (workdir / f"{label}.log").open("wb")
        cmd = [sys.executable, "-m", "consumer", "run", "--role", "sink", "--adapter", "files"]
        self.proc = subprocess.Popen([*cmd, "--config", str(path)], stderr=self.log)

    def metrics(self) -> dict[str, float]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except (urllib.error.URLError, ConnectionError):
            return {}
        values = {}
        for name, key in (
            ("delivered", 'auto_trace_deliveries_total{adapter="files",outcome="delivered"}'),
            ("in_flight", 'auto_trace_in_flight_deliveries{adapter="files"}'),
        ):
            for line in text.splitlines():
                if line.startswith(key + " "):
                    values[name] = float(line.split()[-1])
        return values

    def wait(self, done: Callable[[dict[str, float]], bool], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not done(self.metrics()):
            assert self.proc.poll() is None, f"sink exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, f"sink did not get there: {self.metrics()}"
            time.sleep(0.05)  # poll interval; the deadline bounds the wait

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0
        self.log.close()


class Target:
    """Where one run writes (a local directory or an S3 prefix) and how to read it back."""

    def __init__(
        self, path: str, read: Callable[[], dict[str, bytes]], count: Callable[[], int]
    ) -> None:
        self.path = path
        self.read = read
        #: Objects written so far, cheaply (polled while a worker runs).
        self.count = count


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _expected_layout(messages: list[Any]) -> dict[str, list[str]]:
    """The objects a run must write, computed here from the sink topic alone: batches of BATCH
    records from offset 0 of each partition, one object per close date of a batch, named by
    that date's first offset in the batch; trade ids in offset order."""
    layout: dict[str, list[str]] = {}
    batches: dict[tuple[int, int], dict[str, str]] = {}
    for msg in sorted(messages, key=lambda m: (m.partition(), m.offset())):
        record = decode_trace(msg.value())
        day = close_date(record)
        names = batches.setdefault((msg.partition(), msg.offset() - msg.offset() % BATCH), {})
        name = names.setdefault(day, object_name(day, msg.topic(), msg.partition(), msg.offset()))
        layout.setdefault(name, []).append(record["trade_id"])
    return layout


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_sink_killed_mid_batch_and_restarted_writes_the_same_objects_with_no_duplicate_line(
    bootstrap_servers: str,
    tmp_path: Path,
    store: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    adapter: dict[str, Any] = {"name": "files", "type": "file", "path": "set-per-run"}
    settings = make_settings(bootstrap_servers, adapters=[adapter])
    create_topics(settings)
    sink = sink_topic(settings, "files")
    trades = _trades(1500, seed=73)
    began = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = round(time.monotonic() - began - sum(phases.values()), 1)

    produce(bootstrap_servers, settings.input.topic, [(None, to_json(t)) for t in trades])
    # Ingest and release once; both runs below consume the same sink topic.
    metrics, health = Metrics(), Health()
    with (
        running(IngestStage(settings, metrics, health), ReleaseStage(settings, metrics, health)),
        reader(bootstrap_servers, sink) as topic,
    ):
        messages = topic.read(len(trades), timeout=60)
    phase("pipeline")
    counts: Counter[int] = Counter(m.partition() or 0 for m in messages)
    tails = sum(c % BATCH for c in counts.values())
    full_end = {p: c - c % BATCH for p, c in counts.items()}

    if store == "local":

        def target(run: str) -> Target:
            root = tmp_path / run
            return Target(
                str(root), lambda: _local_files(root), lambda: len(list(root.rglob("*.jsonl")))
            )

    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        monkeypatch.setenv("AT_TEST_S3_KEY", "AKIDEXAMPLE")
        monkeypatch.setenv("AT_TEST_S3_SECRET", "not-a-real-secret")
        client = boto3.session.Session(
            aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="x", region_name="us-east-1"
        ).client("s3", endpoint_url=endpoint)
        request.addfinalizer(client.close)
        bucket = f"exports-{settings.topics.prefix.lower()}"
        client.create_bucket(Bucket=bucket)
        adapter.update(
            s3_endpoint_url=endpoint,
            s3_region="us-east-1",
            s3_access_key_id={"env": "AT_TEST_S3_KEY"},
            s3_secret_access_key={"env": "AT_TEST_S3_SECRET"},
        )

        def target(run: str) -> Target:
            def read() -> dict[str, bytes]:
                listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{run}/").get("Contents", [])
                return {
                    o["Key"][len(run) + 1 :]: client.get_object(Bucket=bucket, Key=o["Key"])[
                        "Body"
                    ].read()
                    for o in listed
                }

            def count() -> int:
                return int(client.list_objects_v2(Bucket=bucket, Prefix=f"{run}/")["KeyCount"])

            return Target(f"s3://{bucket}/{run}", read, count)

    def config(where: Target) -> dict[str, Any]:
        return {
            # A SIGKILLed member keeps its partitions until the session times out: keep it short.
            "kafka": {
                "bootstrap_servers": bootstrap_servers,
                "client": {"session.timeout.ms": 6000},
            },
            "topics": {"prefix": settings.topics.prefix},
            "adapters": [{**adapter, "path": where.path, "max_records": BATCH}],
            "logging": {"format": "text"},
            "shutdown": {"grace": "10s"},
        }

    group = sink_group(settings, "files")
    tps = [TopicPartition(sink, p) for p in sorted(counts)]

    def committed() -> dict[int, int]:
        consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": group})
        try:
            offsets = consumer.committed(tps, timeout=10)
        finally:
            consumer.close()
        return {tp.partition: max(tp.offset, 0) for tp in offsets}

    def until_only_tails_are_open(start: dict[int, int]) -> Callable[[dict[str, float]], bool]:
        # Everything from the committed offsets to the last full batch written, and the tails
        # (fewer than BATCH records per partition) waiting in their open batches.
        owed = sum(full_end[p] - start.get(p, 0) for p in counts)
        return lambda m: m.get("delivered") == owed and m.get("in_flight") == tails

    # The reference: one clean worker (in this process) from the start of the topic to the end.
    reference = target("reference")
    clean = load_settings(None, **{**config(reference), "metrics": {"port": 0}})
    clean_metrics = Metrics()
    with running(SinkWorker(clean, clean.adapters[0], clean_metrics, Health())):
        done = until_only_tails_are_open({})
        deadline = time.monotonic() + 60
        while not done(
            {
                "delivered": clean_metrics.deliveries.labels("files", "delivered")._value.get(),
                "in_flight": clean_metrics.in_flight.labels("files")._value.get(),
            }
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)  # poll interval; the deadline bounds the wait
    # Leaving the block stopped the worker, which wrote the tails.
    expected = reference.read()
    phase("reference")

    # Start over with the same group: it must replay the topic from offset 0.
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    for future in admin.delete_consumer_groups([group], request_timeout=10).values():
        future.result(timeout=15)

    killed = target("killed")
    seen_at_kill = []
    temporary = 0  # temporary files a kill left behind (local)
    worker = SinkProcess(config(killed), tmp_path, "killed-1")
    deadline = time.monotonic() + 60
    while killed.count() < 5:  # batches are being written
        assert time.monotonic() < deadline
        time.sleep(0.01)  # poll interval; the deadline bounds the wait
    worker.kill()
    seen_at_kill.append(killed.count())
    temporary += len(list((tmp_path / "killed").rglob("*.tmp")))
    start = committed()
    assert all(offset % BATCH == 0 for offset in start.values()), start  # batch boundaries
    worker = SinkProcess(config(killed), tmp_path, "killed-2")
    half = sum(full_end[p] - start.get(p, 0) for p in counts) // 2
    worker.wait(lambda m: m.get("delivered", 0) >= half)
    deadline = time.monotonic() + 30
    while not any(committed().values()):  # so that the next life replays from mid-topic
        assert time.monotonic() < deadline
        time.sleep(0.1)  # poll interval; the deadline bounds the wait
    worker.kill()
    seen_at_kill.append(killed.count())
    temporary += len(list((tmp_path / "killed").rglob("*.tmp")))
    start = committed()
    assert all(offset % BATCH == 0 for offset in start.values()), start
    worker = SinkProcess(config(killed), tmp_path, "killed-3")
    worker.wait(until_only_tails_are_open(start))
    worker.terminate()
    result = killed.read()
    phase("killed")

    layout = _expected_layout(messages)
    assert sorted(expected) == sorted(layout)
    for name, data in expected.items():
        assert [json.loads(line)["trade_id"] for line in data.splitlines()] == layout[name]
    assert result == expected  # same object names, same bytes
    ids = Counter(json.loads(line)["trade_id"] for d in result.values() for line in d.splitlines())
    assert ids == Counter(t["trade_id"] for t in trades)  # every trade, no duplicate line
    everything = b"".join(result.values())
    assert not [p for p in _personal(trades) if p.encode() in everything]
    if store == "local":
        assert not list((tmp_path / "killed").rglob("*.tmp"))
    print(
        f"\n{store}: {len(trades)} trades, {len(result)} objects; SIGKILLed with "
        f"{seen_at_kill} objects written and {temporary} temporary files left; replayed from "
        f"{start}; identical to the reference; seconds: {phases}"
    )
