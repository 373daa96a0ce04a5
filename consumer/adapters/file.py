"""The ``file`` adapter: JSON Lines files in a local directory or an S3 bucket, exactly once.

Layout, under the directory or the ``s3://bucket/prefix``::

    date=2026-11-26/auto-trace.sink.files+0+12000.jsonl
    date=2026-11-26/auto-trace.sink.files+1+11000.jsonl
    date=2026-11-27/auto-trace.sink.files+0+12417.jsonl

One line per trade: exactly the JSON body a webhook receiver gets (the PII-free TraceRecord),
in the order the sink worker consumed it. ``date=`` is the trade's close date (UTC). The name
says where the first line came from: ``<topic>+<partition>+<offset>``.

Why the files are exactly-once:

- records of one source partition fill one *batch* (all close dates together), and a batch is
  written when it holds ``max_records`` records or ``max_bytes`` bytes. Boundaries are a pure
  function of the records, so replaying a partition from a batch's first offset rebuilds the
  same batches;
- a batch's files are made durable (local: temporary file, fsync, rename, fsync of the
  directory; S3: upload complete) before any of its records is reported done, and the engine
  commits offsets only then. A batch therefore always starts at a committed offset;
- so a crash at any point replays from the start of an unfinished batch and rewrites the same
  objects, with the same names and the same bytes. Nothing is lost and no line is repeated.

A write that fails is reported as :class:`~consumer.errors.AdapterUnavailable` on every record
of the batch, whatever the cause (a full disk, an S3 503 or an access denied): storage failing
is never one record's fault, and if part of a batch went through the retry tiers while the rest
waited, the batch would be written twice with some lines in both. The engine's circuit breaker
holds the records and lets one through as a probe; :meth:`FileAdapter.deliver` then rewrites
the whole failed batch, unchanged. Messages carry an error code, never a path's content, a
response body, a bucket policy or a credential.

Two things cut a batch before it is full:

- ``idle_flush`` (off by default) also cuts a batch when the wall clock says so; after a crash
  the replay may cut it elsewhere, so a line can appear in two objects: at-least-once only;
- a rebalance or a shutdown writes the open batch of each partition it gives up, and the engine
  commits after that. Even if the process dies in between, the replay rewrites the same names
  with a superset of the lines: no line is repeated, only the layout differs from an
  uninterrupted run. (Known limit: a write still running when the revoke's grace period ends
  may finish after the new owner wrote the same name, and replace it with fewer lines.)

Records from a retry tier (``attempt > 1``) are each written at once as their own one-line
object named by their retry-topic position: deterministic too, and a retry tier never holds a
record waiting for a batch to fill.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import uuid
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import boto3
import botocore.config
from botocore.exceptions import BotoCoreError, ClientError

from consumer.adapters.base import BatchAdapter, Delivery
from consumer.config import FileAdapterSettings, SecretRef
from consumer.errors import AdapterUnavailable, ConfigError, DeliveryError
from consumer.log import get_logger

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = get_logger("file")

TP = tuple[str, int]

#: Media type of every object (JSON Lines / NDJSON).
CONTENT_TYPE: Final = "application/x-ndjson"

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CODE = re.compile(r"[^A-Za-z0-9.]")

#: Retained descriptors of batches that failed once, per source, beyond which the oldest
#: already rewritten ones are forgotten (their lines are dropped as soon as they are durable).
_RETAINED_PER_SOURCE: Final = 256


def object_name(close_date: str, topic: str, partition: int, offset: int) -> str:
    """``date=YYYY-MM-DD/<topic>+<partition>+<offset>.jsonl`` (Kafka topic names are made of
    ``[A-Za-z0-9._-]``: safe in paths and S3 keys)."""
    return f"date={close_date}/{topic}+{partition}+{offset}.jsonl"


def close_date(record: dict[str, Any]) -> str:
    """The trade's close date, UTC, ``YYYY-MM-DD``."""
    moment = record["close_time"]
    if not isinstance(moment, datetime):
        raise TypeError("close_time is not a datetime")
    return moment.astimezone(UTC).date().isoformat()


# -- stores: where bytes become durable (blocking calls, run off the event loop) -------------


class Store(Protocol):
    """Writes whole objects; when :meth:`write` returns, the object is durable."""

    def write(self, name: str, data: bytes) -> None:
        """Replace ``name`` with ``data`` atomically, or raise AdapterUnavailable."""

    def close(self) -> None:
        """Release clients."""


def _unavailable(message: str) -> AdapterUnavailable:
    """Every storage failure, transient or not: see the module docstring for why."""
    return AdapterUnavailable(message)


class LocalStore:
    """A local (or mounted) directory: temporary file, fsync, rename, fsync of the directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, name: str, data: bytes) -> None:
        path = self.root / name
        directory = path.parent
        tmp = directory / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                _fsync_dir(directory.parent)
            # A crash leaves its temporary file behind; the replay rewrites the same name, so
            # this is when to remove it. (Kafka topic names hold no glob characters.)
            for stale in directory.glob(f".{path.name}.*.tmp"):
                stale.unlink(missing_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(tmp, flags, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            code = errno.errorcode.get(exc.errno or 0, "OSError")
            # strerror is the system's text for the errno; the path is left out.
            raise _unavailable(f"local write failed: {code} ({exc.strerror})") from exc

    def close(self) -> None:
        pass


def _fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Store:
    """An S3 bucket (or any S3-compatible store): ``put_object`` below the multipart threshold,
    a multipart upload (aborted on failure) from it on. An object appears whole or not at all."""

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        prefix: str,
        *,
        multipart_threshold: int,
        part_size: int,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size

    def write(self, name: str, data: bytes) -> None:
        key = self.prefix + name
        try:
            if len(data) < self.multipart_threshold:
                self.client.put_object(
                    Bucket=self.bucket, Key=key, Body=data, ContentType=CONTENT_TYPE
                )
            else:
                self._multipart(key, data)
        except ClientError as exc:
            raise _unavailable(_client_error_text(exc)) from exc
        except BotoCoreError as exc:
            # Their text may quote the endpoint or a credential source: the class says enough.
            raise _unavailable(f"S3 request failed: {type(exc).__name__}") from exc

    def _multipart(self, key: str, data: bytes) -> None:
        upload = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType=CONTENT_TYPE
        )
        upload_id = upload["UploadId"]
        try:
            parts: list[CompletedPartTypeDef] = []
            for number, start in enumerate(range(0, len(data), self.part_size), start=1):
                part = self.client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data[start : start + self.part_size],
                )
                parts.append({"ETag": part["ETag"], "PartNumber": number})
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            # Parts of an unfinished upload are stored (and billed) until aborted.
            with contextlib.suppress(ClientError, BotoCoreError):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    def close(self) -> None:
        self.client.close()


def _client_error_text(exc: ClientError) -> str:
    """Operation, error code and status: never the message (it may quote a bucket policy, an
    ARN or an account) and never a header."""
    error = exc.response.get("Error", {})
    code = _CODE.sub("", str(error.get("Code", "")))[:64] or "unknown"
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
    operation = _CODE.sub("", exc.operation_name or "")[:64] or "request"
    return f"S3 {operation} failed: {code} (HTTP {status})"


# -- configuration -----------------------------------------------------------------------------


def parse_path(path: str, where: str) -> tuple[Literal["local"], Path] | tuple[str, str]:
    """``("local", Path)`` or ``(bucket, prefix)`` where prefix is empty or ends with ``/``."""
    if path.startswith("s3://"):
        bucket, _, prefix = path[len("s3://") :].partition("/")
        if not _BUCKET.match(bucket):
            raise ConfigError(f"{where}: expected s3://bucket[/prefix] with a valid bucket name")
        prefix = prefix.strip("/")
        if "//" in prefix:
            raise ConfigError(f"{where}: the S3 prefix must not contain '//'")
        return bucket, (prefix + "/" if prefix else "")
    if "://" in path:
        raise ConfigError(f"{where}: expected a local directory or s3://bucket[/prefix]")
    if not path.strip():
        raise ConfigError(f"{where}: must not be empty")
    return "local", Path(path)


def open_store(settings: FileAdapterSettings) -> Store:
    """The store for ``settings.path``; a bad setting raises ConfigError naming the field."""
    where = f"adapters.{settings.name}"
    target = parse_path(settings.path, f"{where}.path")
    if target[0] == "local":
        assert isinstance(target[1], Path)
        root = target[1]
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"{where}.path: cannot create the directory: {exc.strerror}"
            ) from None
        if not os.access(root, os.W_OK | os.X_OK):
            raise ConfigError(f"{where}.path: the directory is not writable")
        return LocalStore(root)
    bucket, prefix = target
    assert isinstance(prefix, str)

    def secret(field_name: str, ref: SecretRef | None) -> str | None:
        if ref is None:
            return None
        try:
            return ref.resolve().get_secret_value()
        except ConfigError as exc:
            raise ConfigError(f"{where}.{field_name}: {exc}") from None

    session = boto3.session.Session(
        aws_access_key_id=secret("s3_access_key_id", settings.s3_access_key_id),
        aws_secret_access_key=secret("s3_secret_access_key", settings.s3_secret_access_key),
        aws_session_token=secret("s3_session_token", settings.s3_session_token),
        region_name=settings.s3_region,
    )
    timeout = settings.timeout.total_seconds()
    config = botocore.config.Config(
        connect_timeout=timeout,
        read_timeout=timeout,
        # Adapters never retry by themselves: the circuit breaker probes instead.
        retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=32,
    )
    try:
        client = session.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)
    except (BotoCoreError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot build the S3 client: {type(exc).__name__}") from None
    return S3Store(
        client,
        bucket,
        prefix,
        multipart_threshold=settings.s3_multipart_threshold,
        part_size=settings.s3_multipart_part_size,
    )


# -- batches -------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Batch:
    topic: str
    partition: int
    first: int
    last: int
    #: Loop time of the last append (idle flush).
    touched: float
    #: close date -> (first offset of that date in the batch, its lines in offset order).
    dates: dict[str, tuple[int, list[bytes]]] = field(default_factory=dict)
    records: int = 0
    size: int = 0
    futures: list[asyncio.Future[None]] = field(default_factory=list)
    state: Literal["open", "writing", "durable", "failed"] = "open"
    error: str = ""
    #: The current write attempt.
    task: asyncio.Task[None] | None = None

    @property
    def tp(self) -> TP:
        return (self.topic, self.partition)

    def add(self, day: str, offset: int, line: bytes, future: asyncio.Future[None]) -> None:
        self.dates.setdefault(day, (offset, []))[1].append(line)
        self.last = offset
        self.records += 1
        self.size += len(line)
        self.futures.append(future)

    def objects(self) -> list[tuple[str, bytes]]:
        return [
            (object_name(day, self.topic, self.partition, first), b"".join(lines))
            for day, (first, lines) in sorted(self.dates.items())
        ]


class FileAdapter(BatchAdapter):
    """Writes records as JSON Lines files, exactly once (see the module docstring).

    ``idle_flush`` (off by default) also writes a batch that got no record for that long:
    partial batches then appear without waiting for a rebalance or a shutdown, but the
    guarantee drops to at-least-once (a replay may cut batches elsewhere and repeat lines).
    """

    def __init__(self, settings: FileAdapterSettings, *, store: Store | None = None) -> None:
        super().__init__(settings.name)
        self.store = store if store is not None else open_store(settings)
        self._max_records = settings.max_records
        self._max_bytes = settings.max_bytes
        self._idle = settings.idle_flush.total_seconds() if settings.idle_flush else None
        self._open: dict[TP, _Batch] = {}
        #: Batches whose write failed, kept (with their lines) for the records that come back
        #: through :meth:`deliver`; after a successful rewrite only the offsets stay.
        self._retained: dict[TP, list[_Batch]] = {}
        self._locks: dict[TP, asyncio.Lock] = {}
        #: Write tasks in progress, with their source partition (flush waits for exactly those).
        self._writes: dict[asyncio.Task[None], TP] = {}
        self._idle_task: asyncio.Task[None] | None = None

    # -- engine contract ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._idle is not None and self._idle_task is None:
            self._idle_task = asyncio.get_running_loop().create_task(self._idle_loop(self._idle))

    def append(self, delivery: Delivery) -> Awaitable[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        topic, partition, offset = delivery.source
        line = delivery.json_body() + b"\n"
        day = close_date(delivery.record)
        if delivery.attempt > 1:
            # From a retry tier: its own object at once (deterministic: named by its position).
            single = _Batch(topic, partition, offset, offset, loop.time())
            single.add(day, offset, line, future)
            self._seal(single)
            return future
        tp = (topic, partition)
        batch = self._open.get(tp)
        if batch is None:
            batch = self._open[tp] = _Batch(topic, partition, offset, offset, loop.time())
        batch.add(day, offset, line, future)
        batch.touched = loop.time()
        if batch.records >= self._max_records or batch.size >= self._max_bytes:
            del self._open[tp]
            self._seal(batch)
        return future

    async def deliver(self, delivery: Delivery) -> None:
        """A record coming back after its batch failed: rewrite that batch, unchanged."""
        topic, partition, offset = delivery.source
        batch = self._find_retained((topic, partition), offset)
        if batch is None:
            # Not from a batch we know (it was forgotten, or never appended): its own object,
            # named by its position, so that a replay would write it the same way.
            await self.append(delivery.with_attempt(max(2, delivery.attempt)))
            return
        if batch.state == "failed":
            self._seal(batch)
        if batch.state == "writing":
            assert batch.task is not None
            # Shielded: one record's caller giving up must not cancel the batch's write.
            await asyncio.shield(batch.task)
        if batch.state != "durable":
            raise _unavailable(batch.error)

    async def flush(self, partitions: list[tuple[str, int]]) -> None:
        """Write the open batches of these partitions now, try their failed batches once more,
        and return when every write of theirs has finished (successfully or not)."""
        wanted = set(partitions)
        for tp in wanted:
            batch = self._open.pop(tp, None)
            if batch is not None:
                self._seal(batch)
            for old in self._retained.get(tp, ()):
                if old.state == "failed":
                    self._seal(old)
        tasks = [task for task, tp in self._writes.items() if tp in wanted]
        if tasks:
            await asyncio.wait(tasks)

    async def close(self) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_task
            self._idle_task = None
        if self._writes:
            await asyncio.wait(list(self._writes))
        for batch in self._open.values():
            for future in batch.futures:
                future.cancel()
        self._open.clear()
        self._retained.clear()
        await asyncio.to_thread(self.store.close)

    # -- writing ------------------------------------------------------------------------------

    def _seal(self, batch: _Batch) -> None:
        """Start writing a batch (a new one, or a failed one again)."""
        batch.state = "writing"
        task = asyncio.get_running_loop().create_task(self._write(batch))
        task.set_name(f"file-write:{batch.topic}:{batch.partition}:{batch.first}")
        batch.task = task
        self._writes[task] = batch.tp
        task.add_done_callback(lambda t: self._writes.pop(t, None))

    async def _write(self, batch: _Batch) -> None:
        tp = batch.tp
        lock = self._locks.setdefault(tp, asyncio.Lock())
        error: DeliveryError | None = None
        # One write at a time per source partition, in the order batches were sealed.
        async with lock:
            try:
                objects = batch.objects()
                await asyncio.to_thread(self._write_all, objects)
            except DeliveryError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - a bug must fail the batch, not hang it
                log.error(  # noqa: TRY400 - the traceback could quote record values
                    "unexpected error writing a batch",
                    extra={"fields": {"adapter": self.name, "exc_class": type(exc).__name__}},
                )
                error = _unavailable(f"unexpected {type(exc).__name__} while writing")
        futures, batch.futures = batch.futures, []
        if error is None:
            batch.state = "durable"
            batch.dates = {}  # the lines are no longer needed
            for future in futures:
                if not future.done():
                    future.set_result(None)
            return
        batch.state = "failed"
        batch.error = str(error)
        retained = self._retained.setdefault(tp, [])
        if batch not in retained:
            retained.append(batch)
            self._prune(retained)
        log.warning(
            "file batch not written",
            extra={
                "fields": {
                    "adapter": self.name,
                    "topic": batch.topic,
                    "partition": batch.partition,
                    "first_offset": batch.first,
                    "records": batch.records,
                    "error_class": type(error).__name__,
                    "error": str(error),
                }
            },
        )
        for future in futures:
            if not future.done():
                future.set_exception(type(error)(str(error)))

    def _write_all(self, objects: Iterable[tuple[str, bytes]]) -> None:
        for name, data in objects:
            self.store.write(name, data)

    def _find_retained(self, tp: TP, offset: int) -> _Batch | None:
        for batch in self._retained.get(tp, ()):
            if batch.first <= offset <= batch.last:
                return batch
        return None

    @staticmethod
    def _prune(retained: list[_Batch]) -> None:
        while len(retained) > _RETAINED_PER_SOURCE:
            durable = next((b for b in retained if b.state == "durable"), None)
            if durable is None:
                return
            retained.remove(durable)

    async def _idle_loop(self, idle: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            for tp in [tp for tp, b in self._open.items() if now - b.touched >= idle]:
                self._seal(self._open.pop(tp))
            wake = min((b.touched + idle for b in self._open.values()), default=now + idle)
            await asyncio.sleep(max(0.01, wake - loop.time()))


__all__ = [
    "CONTENT_TYPE",
    "FileAdapter",
    "LocalStore",
    "S3Store",
    "Store",
    "close_date",
    "object_name",
    "open_store",
    "parse_path",
]
