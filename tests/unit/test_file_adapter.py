"""The file adapter: batches, names, determinism and durability, on a local directory and on a
real S3-compatible HTTP server (moto in server mode)."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import pytest
from moto.server import ThreadedMotoServer

from consumer.adapters import build_adapter
from consumer.adapters.base import Delivery
from consumer.adapters.file import FileAdapter, LocalStore, S3Store, close_date, object_name
from consumer.config import FileAdapterSettings, load_settings
from consumer.errors import AdapterUnavailable, ConfigError, RetriableDeliveryError
from consumer.records import idempotency_key, to_json_bytes
from consumer.samples import sample_trade
from consumer.trade import project, validate_trade

DAY_MS = 86_400_000
#: 2026-11-26T10:00:00Z
START_MS = 1_795_687_200_000
TOPIC = "at.sink.files"
MiB = 1024 * 1024


def record(i: int, close_ms: int | None = None) -> dict[str, Any]:
    trade = sample_trade(i, seed=3, close_time_ms=START_MS + i if close_ms is None else close_ms)
    return project(validate_trade(trade))


def delivery(rec: dict[str, Any], offset: int, partition: int = 0, **kw: Any) -> Delivery:
    return Delivery(
        record=rec,
        idempotency_key=idempotency_key(rec["trade_id"], "files"),
        attempt=kw.pop("attempt", 1),
        due_ms=0,
        source=(kw.pop("topic", TOPIC), partition, offset),
    )


def settings(path: str | Path, **extra: Any) -> FileAdapterSettings:
    return FileAdapterSettings(name="files", type="file", path=str(path), **extra)


def run(coro: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro())  # type: ignore[arg-type]


def files(root: Path) -> dict[str, bytes]:
    """Every finished object under ``root`` (temporary files excluded) by relative name."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*.jsonl"))
        if not p.name.startswith(".")
    }


def temporary_files(root: Path) -> list[Path]:
    return list(root.rglob("*.tmp"))


def mtimes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*.jsonl")}


def lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines()]


async def append_all(adapter: FileAdapter, deliveries: list[Delivery]) -> list[Awaitable[None]]:
    return [adapter.append(d) for d in deliveries]


# -- local directory ---------------------------------------------------------------------------


def test_batches_rotate_by_record_count_and_are_named_by_their_first_offset(
    tmp_path: Path,
) -> None:
    recs = [record(i) for i in range(7)]

    async def main() -> None:
        adapter = FileAdapter(settings(tmp_path, max_records=3))
        futures = await append_all(adapter, [delivery(r, 100 + i) for i, r in enumerate(recs)])
        await asyncio.gather(*futures[:6])
        assert not asyncio.ensure_future(futures[6]).done()  # the open batch waits for more
        assert sorted(files(tmp_path)) == [
            f"date=2026-11-26/{TOPIC}+0+100.jsonl",
            f"date=2026-11-26/{TOPIC}+0+103.jsonl",
        ]
        await adapter.flush([(TOPIC, 0)])
        await futures[6]
        await adapter.close()

    run(main)
    out = files(tmp_path)
    assert sorted(out) == [f"date=2026-11-26/{TOPIC}+0+{o}.jsonl" for o in (100, 103, 106)]
    every = b"".join(out[name] for name in sorted(out, key=lambda n: int(n.split("+")[-1][:-6])))
    # Each line is exactly the webhook body of its record, in consumption order.
    assert every == b"".join(to_json_bytes(r) + b"\n" for r in recs)
    assert not list(tmp_path.rglob("*.tmp"))


def test_batches_rotate_by_bytes(tmp_path: Path) -> None:
    recs = [record(i) for i in range(10)]
    sizes = [len(to_json_bytes(r)) + 1 for r in recs]
    limit = 1024
    # Expected boundaries: a batch ends with the record that makes it reach the limit.
    expected, size = [0], 0
    for i, s in enumerate(sizes):
        size += s
        if size >= limit and i + 1 < len(recs):
            expected.append(i + 1)
            size = 0

    async def main() -> None:
        adapter = FileAdapter(settings(tmp_path, max_bytes=limit))
        futures = await append_all(adapter, [delivery(r, i) for i, r in enumerate(recs)])
        await adapter.flush([(TOPIC, 0)])
        await asyncio.gather(*futures)
        await adapter.close()

    run(main)
    out = files(tmp_path)
    assert len(expected) >= 3
    assert sorted(out) == sorted(f"date=2026-11-26/{TOPIC}+0+{o}.jsonl" for o in expected)
    assert all(len(data) - len(data.splitlines()[-1]) - 1 < limit for data in out.values())


def test_a_batch_spanning_two_close_dates_writes_one_file_per_date_named_by_its_first_offset(
    tmp_path: Path,
) -> None:
    # Release order is not close-time order across signals: dates interleave within a batch.
    closes = [START_MS, START_MS + DAY_MS, START_MS + 5, START_MS + DAY_MS + 5, START_MS + 9]
    recs = [record(i, c) for i, c in enumerate(closes)]

    async def main() -> None:
        adapter = FileAdapter(settings(tmp_path, max_records=5))
        await asyncio.gather(
            *await append_all(
                adapter, [delivery(r, 40 + i, partition=2) for i, r in enumerate(recs)]
            )
        )
        await adapter.close()

    run(main)
    out = files(tmp_path)
    assert sorted(out) == [
        f"date=2026-11-26/{TOPIC}+2+40.jsonl",
        f"date=2026-11-27/{TOPIC}+2+41.jsonl",
    ]
    first = lines(out[f"date=2026-11-26/{TOPIC}+2+40.jsonl"])
    second = lines(out[f"date=2026-11-27/{TOPIC}+2+41.jsonl"])
    assert [r["trade_id"] for r in first] == [recs[i]["trade_id"] for i in (0, 2, 4)]
    assert [r["trade_id"] for r in second] == [recs[i]["trade_id"] for i in (1, 3)]
    assert all(r["close_time"].startswith("2026-11-27") for r in second)
    assert close_date(recs[1]) == "2026-11-27"


def test_a_replay_from_the_batch_start_after_a_crash_rewrites_byte_identical_files(
    tmp_path: Path,
) -> None:
    closes = [START_MS + (i % 3) * DAY_MS + i for i in range(50)]
    recs = [record(i, c) for i, c in enumerate(closes)]
    deliveries = [delivery(r, i) for i, r in enumerate(recs)]

    async def clean(root: Path) -> None:
        adapter = FileAdapter(settings(root, max_records=8))
        futures = await append_all(adapter, deliveries)
        await adapter.flush([(TOPIC, 0)])
        await asyncio.gather(*futures)
        await adapter.close()

    async def crashed(root: Path) -> None:
        # First life: 21 records appended, batches [0..7] and [8..15] durable (offsets up to 16
        # committed), [16..20] open when the process dies: nothing flushed.
        first = FileAdapter(settings(root, max_records=8))
        futures = await append_all(first, deliveries[:21])
        await asyncio.gather(*futures[:16])
        # Second life: the engine replays from the committed offset.
        second = FileAdapter(settings(root, max_records=8))
        futures = await append_all(second, deliveries[16:])
        await second.flush([(TOPIC, 0)])
        await asyncio.gather(*futures)
        await second.close()

    run(lambda: clean(tmp_path / "reference"))
    run(lambda: crashed(tmp_path / "replayed"))
    reference, replayed = files(tmp_path / "reference"), files(tmp_path / "replayed")
    assert len(reference) > 10
    assert replayed == reference
    ids = [line["trade_id"] for data in replayed.values() for line in lines(data)]
    assert sorted(ids) == sorted(r["trade_id"] for r in recs)  # each exactly once


def test_records_are_reported_done_only_once_their_file_is_complete_on_disk(
    tmp_path: Path,
) -> None:
    recs = [record(i, START_MS + (i % 2) * DAY_MS) for i in range(6)]
    gate = threading.Event()
    seen: list[bool] = []

    class SlowStore(LocalStore):
        def write(self, name: str, data: bytes) -> None:
            gate.wait(10)
            super().write(name, data)

    async def main() -> None:
        adapter = FileAdapter(settings(tmp_path, max_records=6), store=SlowStore(tmp_path))
        futures = [
            asyncio.ensure_future(f)
            for f in await append_all(adapter, [delivery(r, i) for i, r in enumerate(recs)])
        ]
        for future in futures:
            future.add_done_callback(lambda _f: seen.append(_complete(tmp_path)))
        await asyncio.sleep(0.2)
        assert not any(f.done() for f in futures)
        assert files(tmp_path) == {}
        gate.set()
        await asyncio.gather(*futures)
        await adapter.close()

    def _complete(root: Path) -> bool:
        out = files(root)
        return len(out) == 2 and sum(len(d.splitlines()) for d in out.values()) == 6

    run(main)
    assert seen == [True] * 6


def test_a_local_write_failure_fails_every_record_of_the_batch_and_a_retry_rewrites_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recs = [record(i, START_MS + (i % 2) * DAY_MS) for i in range(4)]
    deliveries = [delivery(r, i) for i, r in enumerate(recs)]
    real_write = os.write

    def full(_fd: int, _data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async def main() -> None:
        adapter = FileAdapter(settings(tmp_path, max_records=4))
        monkeypatch.setattr(os, "write", full)
        results = await asyncio.gather(
            *await append_all(adapter, deliveries), return_exceptions=True
        )
        for result in results:
            # Storage failing is never one record's fault: the engine pauses the adapter.
            assert isinstance(result, AdapterUnavailable)
            assert isinstance(result, RetriableDeliveryError)
            assert str(result) == "local write failed: ENOSPC (No space left on device)"
            assert str(tmp_path) not in str(result)
        assert files(tmp_path) == {}
        assert temporary_files(tmp_path) == []
        # The disk has room again: the circuit breaker's probe comes back through deliver().
        monkeypatch.setattr(os, "write", real_write)
        await adapter.deliver(deliveries[2])
        assert len(files(tmp_path)) == 2
        before = mtimes(tmp_path)
        await asyncio.gather(*(adapter.deliver(d) for d in deliveries))  # no rewrite needed
        assert mtimes(tmp_path) == before
        await adapter.close()

    run(main)
    out = files(tmp_path)
    assert sorted(out) == [
        f"date=2026-11-26/{TOPIC}+0+0.jsonl",
        f"date=2026-11-27/{TOPIC}+0+1.jsonl",
    ]
    assert sum(len(d.splitlines()) for d in out.values()) == 4


def test_a_record_from_a_retry_tier_is_written_at_once_as_its_own_object(tmp_path: Path) -> None:
    retry_topic = "at.retry.files.5s"

    async def main() -> None:
        adapter = FileAdapter(settings(tmp_path, max_records=1000))
        await adapter.append(delivery(record(1), 7, topic=retry_topic, attempt=2))
        await adapter.close()

    run(main)
    assert list(files(tmp_path)) == [f"date=2026-11-26/{retry_topic}+0+7.jsonl"]


def test_idle_flush_writes_a_partial_batch_after_the_idle_time(tmp_path: Path) -> None:
    async def main() -> None:
        adapter = FileAdapter(settings(tmp_path, max_records=1000, idle_flush="50ms"))
        await adapter.start()
        futures = await append_all(adapter, [delivery(record(i), i) for i in range(3)])
        await asyncio.wait_for(asyncio.gather(*futures), timeout=5)
        await adapter.close()

    run(main)
    assert list(files(tmp_path)) == [f"date=2026-11-26/{TOPIC}+0+0.jsonl"]


def test_a_stale_temporary_file_from_a_crash_is_removed_when_its_object_is_rewritten(
    tmp_path: Path,
) -> None:
    name = object_name("2026-11-26", TOPIC, 0, 0)
    stale = tmp_path / "date=2026-11-26" / f".{TOPIC}+0+0.jsonl.0123abcd.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"half a line")
    LocalStore(tmp_path).write(name, b"{}\n")
    assert not stale.exists()
    assert (tmp_path / name).read_bytes() == b"{}\n"


def test_the_local_directory_is_created_and_bad_paths_fail_at_start_up_naming_the_field(
    tmp_path: Path,
) -> None:
    FileAdapter(settings(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    for path, message in [
        ("gs://bucket/x", "expected a local directory or s3://bucket"),
        ("s3://Bad_Bucket/x", "valid bucket name"),
        ("s3://", "valid bucket name"),
        (str(tmp_path / "file" / "sub"), "cannot create the directory"),
    ]:
        with pytest.raises(ConfigError, match=message) as info:
            build_adapter(settings(path))
        assert str(info.value).startswith("adapters.files.path: ")


def test_settings_check_credentials_and_the_idle_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = {"name": "files", "type": "file", "path": "s3://bucket/p"}
    with pytest.raises(ConfigError, match="give both s3_access_key_id and s3_secret_access_key"):
        load_settings(None, adapters=[{**base, "s3_access_key_id": {"env": "K"}}])
    with pytest.raises(ConfigError, match=r"adapters\.0\.file\.idle_flush"):
        load_settings(None, adapters=[{**base, "idle_flush": "0s"}])
    with pytest.raises(ConfigError, match=r"adapters\.0\.file\.s3_multipart_part_size"):
        load_settings(None, adapters=[{**base, "s3_multipart_part_size": 1024}])
    monkeypatch.delenv("AT_TEST_S3_SECRET", raising=False)
    monkeypatch.setenv("AT_TEST_S3_KEY", "AKIDEXAMPLE")
    # A missing secret fails at start-up for every role, naming the field, not the value.
    with pytest.raises(
        ConfigError, match=r"^adapters\.0\.s3_secret_access_key: .*AT_TEST_S3_SECRET"
    ):
        load_settings(
            None,
            adapters=[
                {
                    **base,
                    "s3_access_key_id": {"env": "AT_TEST_S3_KEY"},
                    "s3_secret_access_key": {"env": "AT_TEST_S3_SECRET"},
                }
            ],
        )


# -- S3 against a real HTTP server -------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_url() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("AT_TEST_S3_KEY", "AKIDEXAMPLE")
    monkeypatch.setenv("AT_TEST_S3_SECRET", "not-a-real-secret")
    client = boto3.session.Session(
        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="x", region_name="us-east-1"
    ).client("s3", endpoint_url=s3_url, config=botocore.config.Config())
    try:
        yield client
    finally:
        client.close()


def s3_settings(url: str, path: str, **extra: Any) -> FileAdapterSettings:
    return settings(
        path,
        s3_endpoint_url=url,
        s3_region="us-east-1",
        s3_access_key_id={"env": "AT_TEST_S3_KEY"},
        s3_secret_access_key={"env": "AT_TEST_S3_SECRET"},
        **extra,
    )


def s3_objects(client: Any, bucket: str, prefix: str = "") -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {
        o["Key"][len(prefix) :]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for o in listed
    }


def test_s3_objects_are_put_under_the_prefix_with_the_same_layout(
    s3: Any, s3_url: str, tmp_path: Path
) -> None:
    s3.create_bucket(Bucket="exports")
    recs = [record(i, START_MS + (i % 2) * DAY_MS) for i in range(9)]
    deliveries = [delivery(r, i) for i, r in enumerate(recs)]

    async def write(adapter: FileAdapter) -> None:
        futures = await append_all(adapter, deliveries)
        await adapter.flush([(TOPIC, 0)])
        await asyncio.gather(*futures)
        await adapter.close()

    run(lambda: write(FileAdapter(s3_settings(s3_url, "s3://exports/trace/v1/", max_records=4))))
    run(lambda: write(FileAdapter(settings(tmp_path, max_records=4))))
    stored = s3_objects(s3, "exports", "trace/v1/")
    assert stored == files(tmp_path)  # same names, same bytes, as the local directory
    assert len(stored) == 5  # batches [0..3] [4..7] on two dates, [8] on one
    head = s3.head_object(Bucket="exports", Key=f"trace/v1/date=2026-11-26/{TOPIC}+0+0.jsonl")
    assert head["ContentType"] == "application/x-ndjson"


def test_a_large_s3_object_goes_as_a_multipart_upload(s3: Any, s3_url: str) -> None:
    s3.create_bucket(Bucket="big")
    rec = record(1)
    size = len(to_json_bytes(rec)) + 1
    count = (11 * MiB) // size + 1  # three parts of 5 MiB, the last one short

    async def main() -> None:
        adapter = FileAdapter(
            s3_settings(
                s3_url,
                "s3://big",
                max_records=count,
                max_bytes=64 * MiB,
                s3_multipart_threshold=5 * MiB,
                s3_multipart_part_size=5 * MiB,
            )
        )
        await asyncio.gather(*await append_all(adapter, [delivery(rec, i) for i in range(count)]))
        await adapter.close()

    run(main)
    key = f"date=2026-11-26/{TOPIC}+0+0.jsonl"
    head = s3.head_object(Bucket="big", Key=key)
    assert head["ContentLength"] == count * size
    assert head["ETag"].strip('"').endswith("-3")  # the ETag of a 3-part upload
    body = s3.get_object(Bucket="big", Key=key)["Body"].read()
    assert body == (to_json_bytes(rec) + b"\n") * count


def test_a_failed_multipart_upload_is_aborted(s3: Any, s3_url: str) -> None:
    s3.create_bucket(Bucket="aborts")
    client = boto3.session.Session(
        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="x", region_name="us-east-1"
    ).client("s3", endpoint_url=s3_url)
    # Parts smaller than S3's 5 MiB minimum: the server refuses to complete the upload.
    store = S3Store(client, "aborts", "", multipart_threshold=MiB, part_size=MiB)
    try:
        with pytest.raises(
            AdapterUnavailable, match=r"CompleteMultipartUpload failed: EntityTooSmall \(HTTP 400\)"
        ):
            store.write("x.jsonl", b"y" * (3 * MiB))
    finally:
        store.close()
    assert s3.list_multipart_uploads(Bucket="aborts").get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket="aborts").get("KeyCount") == 0


def test_a_missing_bucket_makes_the_adapter_unavailable_for_every_record(
    s3: Any, s3_url: str
) -> None:
    async def main() -> list[Any]:
        adapter = FileAdapter(s3_settings(s3_url, "s3://no-such-bucket/x", max_records=3))
        futures = await append_all(adapter, [delivery(record(i), i) for i in range(3)])
        results = await asyncio.gather(*futures, return_exceptions=True)
        await adapter.close()
        return results

    results = run(main)
    assert [type(r) for r in results] == [AdapterUnavailable] * 3
    assert {str(r) for r in results} == {"S3 PutObject failed: NoSuchBucket (HTTP 404)"}


def test_an_unreachable_s3_endpoint_is_a_scrubbed_adapter_wide_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AT_TEST_S3_KEY", "AKIDEXAMPLE")
    monkeypatch.setenv("AT_TEST_S3_SECRET", "secret-value-never-shown")

    async def main() -> BaseException | None:
        # Port 9 (discard) on loopback: connection refused at once.
        adapter = FileAdapter(
            s3_settings("http://127.0.0.1:9", "s3://bucket", max_records=1, timeout="2s")
        )
        try:
            await adapter.append(delivery(record(0), 0))
        except AdapterUnavailable as exc:
            return exc
        finally:
            await adapter.close()
        return None

    error = run(main)
    assert str(error) == "S3 request failed: EndpointConnectionError"
