"""Ingest against the real broker: formats, personal data, exact decimals, poison, crashes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from consumer import headers as h
from consumer import ingest
from consumer.decode import ConfluentAvroDecoder, JsonDecoder, RegistryUnavailable
from consumer.health import Health
from consumer.ingest import IngestStage
from consumer.metrics import Metrics
from consumer.records import decode_trace, render_decimal, to_json_bytes
from consumer.samples import PERSONAL_FIELDS, sample_trade, to_avro, to_confluent, to_json
from consumer.topics import delay_topic, ingest_dlq_topic
from tests.support import (
    create_topics,
    header,
    make_settings,
    produce,
    reader,
    running,
    trade_id,
)

pytestmark = pytest.mark.integration

NOW_MS = int(time.time() * 1000)


def _ingest(settings: Any, **kwargs: Any) -> IngestStage:
    return IngestStage(settings, Metrics(), Health(), **kwargs)


def _recent(i: int) -> dict[str, Any]:
    return sample_trade(i, seed=7, close_time_ms=NOW_MS - 60_000 + i)


def test_json_avro_and_confluent_inputs_give_byte_identical_trace_records(
    bootstrap_servers: str,
) -> None:
    trades = [_recent(i) for i in range(20)]
    registry = SchemaRegistryClient.new_client({"url": f"mock://{uuid.uuid4().hex}"})
    encoders = {
        "json": to_json,
        "avro": to_avro,
        "avro-confluent": lambda t: to_confluent(t, registry, "trade.closed-value"),
    }
    outputs: dict[str, dict[str, bytes]] = {}
    for fmt, encode in encoders.items():
        extra: dict[str, Any] = (
            {"schema_registry_url": "mock://unused"} if fmt == "avro-confluent" else {}
        )
        settings = make_settings(bootstrap_servers, input={"format": fmt, **extra})
        create_topics(settings)
        decoder = ConfluentAvroDecoder(registry) if fmt == "avro-confluent" else None
        produce(bootstrap_servers, settings.input.topic, [(None, encode(t)) for t in trades])
        with (
            running(_ingest(settings, decoder=decoder)),
            reader(bootstrap_servers, delay_topic(settings)) as r,
        ):
            messages = r.read(len(trades))
        outputs[fmt] = {trade_id(m): m.value() or b"" for m in messages}
    assert len(outputs["json"]) == len(trades)
    assert outputs["json"] == outputs["avro"] == outputs["avro-confluent"]


def test_delay_records_are_keyed_by_signal_and_carry_the_due_time(bootstrap_servers: str) -> None:
    settings = make_settings(bootstrap_servers, delay={"window": "90s"})
    create_topics(settings)
    trades = [_recent(i) for i in range(30)]
    produce(bootstrap_servers, settings.input.topic, [(None, to_json(t)) for t in trades])
    with running(_ingest(settings)), reader(bootstrap_servers, delay_topic(settings)) as r:
        messages = r.read(len(trades))
    by_id = {t["trade_id"]: t for t in trades}
    for msg in messages:
        trade = by_id[trade_id(msg)]
        expected_key = trade["signal_id"] or trade["trade_id"]
        assert msg.key() == expected_key.encode()
        close_ms = int(decode_trace(msg.value() or b"")["close_time"].timestamp() * 1000)
        stated = datetime.fromisoformat(trade["close_time"].replace("Z", "+00:00"))
        assert close_ms == int(stated.timestamp() * 1000)
        assert int(header(msg, h.DUE_MS) or 0) == close_ms + 90_000
        # The due time, nothing else: the close time and the trade id are in the record.
        assert [name for name, _ in msg.headers() or []] == [h.DUE_MS]


def test_decimals_survive_exactly(bootstrap_servers: str) -> None:
    settings = make_settings(bootstrap_servers)
    create_topics(settings)
    trade = _recent(1)
    trade.update(
        entry_price="1950.50",
        exit_price="1950.57",
        volume="0.10",
        profit_loss="12345678901234567890.12345678",
        commission="-0.07",
        swap="0",
    )
    body = json.loads(to_json(trade))
    body["exit_price"] = 1950.57  # a JSON number, not a string
    produce(bootstrap_servers, settings.input.topic, [(None, json.dumps(body).encode())])
    with running(_ingest(settings)), reader(bootstrap_servers, delay_topic(settings)) as r:
        record = decode_trace(r.read(1)[0].value() or b"")
    assert record["entry_price"] == Decimal("1950.50")
    assert record["exit_price"] == Decimal("1950.57")
    assert record["profit_loss"] == Decimal("12345678901234567890.12345678")
    rendered = json.loads(to_json_bytes(record))
    assert rendered["entry_price"] == "1950.50"
    assert rendered["volume"] == "0.10"
    assert rendered["commission"] == "-0.07"
    assert render_decimal(record["profit_loss"]) == "12345678901234567890.12345678"


def test_poison_records_land_in_the_ingest_dlq_and_the_records_around_them_pass(
    bootstrap_servers: str,
) -> None:
    settings = make_settings(bootstrap_servers)
    create_topics(settings, input_partitions=1)
    rng = random.Random(3)
    invalid = _recent(100)
    invalid["close_time"] = "2020-01-01T00:00:00Z"  # before open_time
    poison = {
        "random-bytes": bytes(rng.getrandbits(8) for _ in range(300)),
        "truncated": to_json(_recent(101))[:120],
        "schema-invalid": json.dumps({**_recent(102), "side": "SIDEWAYS"}).encode(),
        "rule-invalid": to_json(invalid),
        "oversized": b'{"pad": "' + b"x" * (5 * 1024 * 1024) + b'"}',
    }
    records: list[tuple[bytes | None, bytes | None]] = []
    valid = []
    for i, (name, value) in enumerate(poison.items()):
        trade = _recent(i)
        valid.append(trade["trade_id"])
        records += [(None, to_json(trade)), (name.encode(), value)]
    produce(bootstrap_servers, settings.input.topic, records, **{"message.max.bytes": 8_000_000})
    with (
        running(_ingest(settings)),
        reader(bootstrap_servers, delay_topic(settings)) as out,
        reader(bootstrap_servers, ingest_dlq_topic(settings)) as dlq,
    ):
        dead = dlq.read(len(poison), timeout=60)
        passed = out.read(len(valid))
    assert sorted(trade_id(m) for m in passed) == sorted(valid)
    by_name = {(m.key() or b"").decode(): m for m in dead}
    assert set(by_name) == set(poison)
    for name, msg in by_name.items():
        assert msg.value() == poison[name], name  # raw bytes kept for the investigation
        assert header(msg, h.ERROR_CLASS) in ("DecodeError", "InvalidRecord")
        assert header(msg, h.REASON)
        assert header(msg, h.SOURCE_TOPIC) == settings.input.topic
        assert header(msg, h.SOURCE_OFFSET) is not None
    assert "close_time" in (header(by_name["rule-invalid"], h.REASON) or "")
    assert "side" in (header(by_name["schema-invalid"], h.REASON) or "")
    assert "SIDEWAYS" not in (header(by_name["schema-invalid"], h.REASON) or "")


def test_a_close_time_beyond_the_clock_skew_is_dead_lettered(bootstrap_servers: str) -> None:
    settings = make_settings(bootstrap_servers, delay={"window": "0s", "max_clock_skew": "1m"})
    create_topics(settings, input_partitions=1)
    future = sample_trade(1, close_time_ms=NOW_MS + 3_600_000)
    ok = _recent(2)
    produce(bootstrap_servers, settings.input.topic, [(None, to_json(future)), (None, to_json(ok))])
    with (
        running(_ingest(settings)),
        reader(bootstrap_servers, delay_topic(settings)) as out,
        reader(bootstrap_servers, ingest_dlq_topic(settings)) as dlq,
    ):
        assert trade_id(out.read(1)[0]) == ok["trade_id"]
        assert "close_time" in (header(dlq.read(1)[0], h.REASON) or "")


# Arbitrary text behind a marker that nothing public contains, so any match is a real leak
# (a bare 8-character value could coincide with a header name or an Avro byte run).
PII_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40
).map(lambda s: f"\u00a7pii\u00a7{s}")


@pytest.fixture(scope="module")
def pii_pipeline(bootstrap_servers: str) -> Any:
    settings = make_settings(bootstrap_servers)
    create_topics(settings, input_partitions=1)
    with running(_ingest(settings)), reader(bootstrap_servers, delay_topic(settings)) as out:
        yield settings, out


@hsettings(
    max_examples=30,
    deadline=None,
    phases=(Phase.explicit, Phase.generate),  # each example is a broker round trip: no shrinking
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(personal=st.fixed_dictionaries({f: PII_TEXT for f in PERSONAL_FIELDS}), extra=PII_TEXT)
def test_no_personal_value_reaches_the_delay_topic(
    bootstrap_servers: str, pii_pipeline: Any, personal: dict[str, str], extra: str
) -> None:
    settings, out = pii_pipeline
    trade = _recent(random.randrange(1000))
    trade["trade_id"] = f"T-{uuid.uuid4().hex}"
    trade.update(personal)
    trade["client_ip"] = personal["client_ip"]
    trade["notes_from_crm"] = extra  # an unknown field the contract does not have
    trade["nested"] = {"email": extra}
    produce(bootstrap_servers, settings.input.topic, [(None, json.dumps(trade).encode())])
    msgs = out.read_until(lambda ms: any(trade_id(m) == trade["trade_id"] for m in ms))
    msg = next(m for m in msgs if trade_id(m) == trade["trade_id"])
    written = (
        (msg.value() or b"")
        + (msg.key() or b"")
        + b"".join(k.encode() + (v or b"") for k, v in msg.headers() or [])
    )
    for value in [*personal.values(), extra]:
        assert value.encode() not in written
    assert "\u00a7pii".encode() not in written


def test_a_stage_killed_before_committing_reproduces_on_restart(
    bootstrap_servers: str, tmp_path: Path
) -> None:
    settings = make_settings(bootstrap_servers)
    create_topics(settings, input_partitions=2)
    config = {
        "kafka": {
            "bootstrap_servers": bootstrap_servers,
            # Offsets are stored after acknowledgement but not committed before the kill.
            "client": {"auto.commit.interval.ms": 3_600_000},
        },
        "input": {"topic": settings.input.topic, "group": settings.input.group},
        "topics": {"prefix": settings.topics.prefix},
        "delay": {"window": "0s"},
        "metrics": {"port": 0},
        "logging": {"format": "text"},
    }
    path = tmp_path / "ingest.yaml"
    path.write_text(yaml.safe_dump(config))
    trades = [_recent(i) for i in range(200)]
    produce(bootstrap_servers, settings.input.topic, [(None, to_json(t)) for t in trades])
    cmd = [sys.executable, "-m", "consumer", "run", "--role", "ingest", "--config", str(path)]
    env = {**os.environ}
    with reader(bootstrap_servers, delay_topic(settings)) as out:
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
        try:
            out.read(len(trades), timeout=60)  # produced and acknowledged ...
        finally:
            proc.send_signal(signal.SIGKILL)  # ... but never committed
            proc.wait(10)
        first_run = len(out.messages)
        config["kafka"]["client"] = {}
        path.write_text(yaml.safe_dump(config))
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
        try:
            out.read(first_run + len(trades), timeout=60)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    ids = [trade_id(m) for m in out.messages]
    assert {t["trade_id"] for t in trades} == set(ids[first_run:])  # all of them again: none lost


class _RegistryDownOnce(JsonDecoder):
    """Fails one record once as a Schema Registry outage would (not a JsonDecoder exactly, so
    ingest takes the pydantic path for every record)."""

    def __init__(self, trade_id: str) -> None:
        super().__init__()
        self.trade_id = trade_id.encode()
        self.failed = False

    def decode(self, value: bytes | None) -> Any:
        if not self.failed and value is not None and self.trade_id in value:
            self.failed = True
            raise RegistryUnavailable("schema registry unreachable (test)")
        return super().decode(value)


def test_a_registry_outage_holds_the_partition_at_its_record_and_loses_or_repeats_nothing(
    bootstrap_servers: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One partition, all in one batch: records 0-3 are produced, the outage holds the partition
    # at 4 in the middle of its run, and 4-9 come again after the back-off.
    monkeypatch.setattr(ingest, "REGISTRY_BACKOFF_MS", 200)
    settings = make_settings(bootstrap_servers)
    create_topics(settings, input_partitions=1)
    trades = [_recent(i) for i in range(10)]
    produce(bootstrap_servers, settings.input.topic, [(None, to_json(t)) for t in trades])
    decoder = _RegistryDownOnce(trades[4]["trade_id"])
    stage = _ingest(settings, decoder=decoder)
    with running(stage), reader(bootstrap_servers, delay_topic(settings)) as out:
        out.read(len(trades))
        group = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": settings.input.group})
        try:
            tp = TopicPartition(settings.input.topic, 0)
            deadline = time.monotonic() + 30
            while group.committed([tp], timeout=10)[0].offset != len(trades):
                assert time.monotonic() < deadline, "the offsets were not committed"
                time.sleep(0.1)  # poll interval; the deadline bounds the wait
            meta = group.list_topics(delay_topic(settings), timeout=10).topics[
                delay_topic(settings)
            ]
            produced = sum(
                group.get_watermark_offsets(TopicPartition(delay_topic(settings), p), timeout=10)[1]
                for p in meta.partitions
            )
        finally:
            group.close()
    assert decoder.failed
    ids = sorted(trade_id(m) for m in out.messages)
    assert ids == sorted(t["trade_id"] for t in trades)
    assert produced == len(trades)  # nothing produced twice
