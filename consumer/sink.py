"""Sink worker: one consumer group per adapter, reading its sink topic and its retry tiers.

Where does a delivery get retried? Here: :meth:`SinkWorker._settle` asks
:func:`consumer.policy.next_step` and produces the record to the next tier or the DLQ.

Concurrency: deliveries of different keys run at once, on a fixed pool of the adapter's
``concurrency`` workers; records of one key go one at a time, in the order consumed (a key's
next record becomes ready only when the one before it has ended). Offsets are stored per
partition only up to the lowest record whose outcome is not final yet, so a crash redelivers,
never loses. A batch adapter's records each wait in a task of their own instead: they are
finished by their batch, not by a worker.

Threads: the asyncio loop runs deliveries; ``consume`` runs in one executor thread so the loop
stays free while it blocks (rebalance callbacks fire there and hand work to the loop); a small
thread serves producer acknowledgements so they never wait for a poll, and hands the loop all
it collected in one call per poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Awaitable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from consumer import headers as h
from consumer.adapters import Adapter, Delivery, build_adapter
from consumer.adapters.base import BatchAdapter
from consumer.circuit import STATE_VALUE, CircuitBreaker
from consumer.clients import make_consumer, make_producer
from consumer.config import AdapterSettings, Settings
from consumer.deadline import Deadlines
from consumer.delayed import TP, DelayedConsumer, now_ms
from consumer.errors import DeliveryError, RetriableDeliveryError
from consumer.health import Health
from consumer.log import get_logger, set_stage
from consumer.metrics import Metrics
from consumer.policy import DeadLetter, Retry, next_step
from consumer.records import idempotency_key
from consumer.topics import dlq_topic, retry_topics, sink_group, sink_topic
from consumer.tracecodec import trade_id_of, transcode_trace

log = get_logger("sink")

_QUERY = re.compile(r"\?\S*")


def scrub(message: str, limit: int = 300) -> str:
    """Belt and braces on top of the adapters' own care: no query strings, bounded length."""
    return _QUERY.sub("?…", message)[:limit]


class UndecodableRecord(DeliveryError):
    """A sink or retry record whose bytes are not a TraceRecord (never retried)."""


class FailureLog:
    """Failed deliveries in the log, without one INFO line per failure.

    Operators must see failures, but in an outage or a retry storm a line per failure is a
    flood, and formatting it was a tenth of the retry path's CPU. So: every failure is logged
    at DEBUG; at INFO the first failure after a quiet ``interval`` is logged in full at once,
    and the ones after it within the interval are counted by error class and next topic and
    logged as one summary when the interval ends.
    """

    def __init__(self, adapter: str, interval: float = 10.0) -> None:
        self.adapter = adapter
        self.interval = interval
        self._until: float | None = None
        self._counts: dict[tuple[str, str], int] = {}

    def record(self, error_class: str, next_topic: str, now: float) -> bool:
        """Count a failure; True when it is to be logged in full at INFO."""
        if self._until is None or now >= self._until:
            self.flush(None)
            self._until = now + self.interval
            return True
        key = (error_class, next_topic)
        self._counts[key] = self._counts.get(key, 0) + 1
        return False

    def flush(self, now: float | None) -> None:
        """Log the summary if the interval is over (``now`` None: whatever is counted)."""
        if not self._counts or (now is not None and self._until is not None and now < self._until):
            return
        counts, self._counts = self._counts, {}
        log.info(
            "delivery failures",
            extra={
                "fields": {
                    "adapter": self.adapter,
                    "count": sum(counts.values()),
                    "within_s": self.interval,
                    "by_error_and_next": {f"{e} -> {t}": n for (e, t), n in counts.items()},
                }
            },
        )


@dataclass(slots=True, eq=False)
class _Partition:
    tp: TP
    #: Records dispatched and not yet final, in consumption order.
    pending: deque[_Job] = field(default_factory=deque)
    #: Dispatched records whose work has not ended (final, failed or abandoned).
    unfinished: int = 0
    #: Set when ``unfinished`` drops to zero, for whoever drains the partition.
    drained: asyncio.Future[None] | None = None
    #: Lost in a rebalance: its queued records are abandoned, its offsets never stored.
    revoked: bool = False


@dataclass(slots=True, eq=False)
class _Job:
    msg: Message
    offset: int
    delivery: Delivery | UndecodableRecord
    part: _Partition
    key: bytes
    #: A batch adapter's first attempt, handed over at dispatch.
    appended: Awaitable[None] | None = None
    done: bool = False
    #: The key's next record may start: set when this one failed and is on its way to its
    #: next topic, before the broker has it (retried records are overtaken anyway, DESIGN.md).
    key_released: bool = False


def _int(value: str | None) -> int:
    if value is None:
        return 0
    try:
        return int(value)
    except ValueError:
        return 0


def _due(msg: Message) -> int:
    due, retry_due = h.get_ints(msg.headers(), h.DUE_MS, h.RETRY_DUE_MS)
    return max(due or 0, retry_due or 0)


class SinkWorker:
    def __init__(
        self,
        settings: Settings,
        adapter_settings: AdapterSettings,
        metrics: Metrics,
        health: Health,
        *,
        adapter: Adapter | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = adapter_settings
        self.name = f"sink:{adapter_settings.name}"
        self.adapter = adapter if adapter is not None else build_adapter(adapter_settings)
        self.metrics = metrics
        self.health = health
        health.register(self.name)
        self.sink_topic = sink_topic(settings, adapter_settings.name)
        self.retry_topics = retry_topics(settings, adapter_settings.name)
        self.tier_of = {t: i for i, t in enumerate(self.retry_topics)}
        self.dlq = dlq_topic(settings)
        self.group = sink_group(settings, adapter_settings.name)
        metrics.init_stage(self.name, [*self.retry_topics, dlq_topic(settings)])
        metrics.init_adapter(adapter_settings.name, len(self.retry_topics))
        self.tiers = settings.retry.tiers
        self.max_in_flight = settings.sink.max_in_flight
        self._batching = isinstance(self.adapter, BatchAdapter)
        self._saturated = False
        self._partitions: dict[TP, _Partition] = {}
        #: Keys with a record being worked on, and that key's records waiting behind it (in
        #: consumption order): a key's next record becomes ready only when the one before it
        #: has ended, whatever the outcome.
        self._keys: dict[bytes, deque[_Job] | None] = {}
        #: Records whose key is free, waiting for a worker; workers with nothing to do.
        self._ready: deque[_Job] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()
        #: ``concurrency`` long-lived workers (or, for a batch adapter, one task per record).
        self._workers: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        #: Bounds a hung adapter (twice its timeout); not batch adapters, whose records wait
        #: for their batch to fill.
        self._deadlines = Deadlines(adapter_settings.timeout.total_seconds() * 2 + 1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._consumer: DelayedConsumer | None = None
        self._producer: Producer | None = None
        self._stop_acks = threading.Event()
        #: Producer acknowledgements collected on the acks thread, handed to the loop in one
        #: call per poll (one call_soon_threadsafe per ack woke the loop for each of them).
        self._acks: list[tuple[asyncio.Future[KafkaError | None], KafkaError | None]] = []
        self._failures = FailureLog(adapter_settings.name)
        circuit_gauge = metrics.circuit_state.labels(adapter_settings.name)
        self.breaker = CircuitBreaker(
            adapter_settings.name,
            adapter_settings.circuit,
            on_change=lambda state: circuit_gauge.set(STATE_VALUE[state]),
        )
        self._offsets_lock = threading.Lock()
        self._to_store: dict[TP, int] = {}
        # Children looked up once: labels() takes a lock and hashes per call, several times
        # per delivery on the hot path.
        name = adapter_settings.name
        self._m_delivered = metrics.deliveries.labels(name, "delivered")
        self._m_lateness = metrics.lateness.labels("sink", name)
        self._m_close_to_delivered = metrics.close_to_delivered.labels(name)
        self._m_adapter_call = metrics.adapter_call.labels(name)
        self._m_failed = metrics.records_failed.labels(self.name)
        self._m_retry = metrics.deliveries.labels(name, "retry")
        self._m_retries = [metrics.retries.labels(name, str(i)) for i in range(len(self.tiers))]

    # -- lifecycle --------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        set_stage(self.name)  # asyncio.run copies the context into every delivery task
        asyncio.run(self._main(stop))

    async def _main(self, stop: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._producer = make_producer(self.settings)
        consumer = DelayedConsumer(
            make_consumer(self.settings, self.group, delayed=True),
            due_of=_due,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
        )
        self._consumer = consumer
        acks = threading.Thread(target=self._serve_acks, name=f"{self.name}-acks", daemon=True)
        acks.start()
        poller = ThreadPoolExecutor(
            1, thread_name_prefix=f"{self.name}-poll", initializer=set_stage, initargs=(self.name,)
        )
        await self.adapter.start()
        if not self._batching:
            for _ in range(self.cfg.concurrency):
                self._spawn(self._work())
        consumer.subscribe([self.sink_topic, *self.retry_topics])
        topics = [self.sink_topic, *self.retry_topics]
        self.metrics.watch_consumer(self.name, self.group, topics, consumer.snapshot)
        log.info(
            "sink started",
            extra={
                "fields": {
                    "adapter": self.cfg.name,
                    "topics": [self.sink_topic, *self.retry_topics],
                }
            },
        )
        in_flight = self.metrics.in_flight.labels(self.cfg.name)
        records_in = self.metrics.records_in.labels(self.name)
        connections = self.metrics.connections_opened.labels(self.cfg.name)
        counted = 0
        try:
            while not stop.is_set():
                self.health.beat(self.name)
                # A batch adapter's records wait in its open batches: capping them would stop
                # the batches from ever filling. Its memory is bounded by its rotation size.
                pause = self._should_pause()
                room = (
                    500
                    if self._batching
                    else max(1, min(500, self.max_in_flight - self._in_flight))
                )
                messages = await self._loop.run_in_executor(poller, self._poll, room, pause)
                records_in.inc(len(messages))
                for msg in messages:
                    self._dispatch(msg)
                in_flight.set(self._in_flight)
                opened = self.adapter.connections_opened()
                if opened is not None and opened > counted:
                    connections.inc(opened - counted)
                    counted = opened
                self._failures.flush(time.monotonic())
            await self._shutdown(poller)
        finally:
            for task in self._workers:
                task.cancel()
            self._failures.flush(None)
            self.metrics.unwatch_consumer(self.name)
            self._stop_acks.set()
            acks.join(timeout=5)
            poller.shutdown(wait=False)
            await self.adapter.close()
            # The consumer's callbacks point back at this worker: drop the clients now so their
            # librdkafka threads end with the stage, not at some later garbage collection.
            self._producer = None
            self._consumer = None
            log.info("sink stopped", extra={"fields": {"adapter": self.cfg.name}})

    async def _shutdown(self, poller: ThreadPoolExecutor) -> None:
        """Stop fetching, give in-flight work the grace period, abandon the rest safely."""
        assert self._consumer is not None and self._loop is not None
        consumer = self._consumer
        consumer.throttle(True)
        grace = self.settings.shutdown.grace.total_seconds()
        if isinstance(self.adapter, BatchAdapter):
            await self.adapter.flush(list(self._partitions))
        parts = list(self._partitions.values())
        await self._until_finished(parts, max(0.0, grace - 2.0))
        abandoned = sum(p.unfinished for p in parts)
        workers = list(self._workers)
        for task in workers:
            # A record in hand is abandoned: its offset is never stored and it is delivered
            # again after restart.
            task.cancel()
        if workers:
            await asyncio.wait(workers, timeout=1.0)
        if abandoned:
            log.warning(
                "abandoned in-flight deliveries at shutdown",
                extra={"fields": {"adapter": self.cfg.name, "count": abandoned}},
            )
        assert self._producer is not None
        self._producer.flush(5)
        self._resolve_acks()
        # close() runs the revoke callback, which must not block the loop thread.
        await self._loop.run_in_executor(poller, self._store_offsets)
        await self._loop.run_in_executor(poller, consumer.close)

    async def _until_finished(self, parts: list[_Partition], within: float | None) -> None:
        assert self._loop is not None
        waits = []
        for part in parts:
            if part.unfinished:
                if part.drained is None or part.drained.done():
                    part.drained = self._loop.create_future()
                waits.append(part.drained)
        if waits:
            await asyncio.wait(waits, timeout=within)

    def _serve_acks(self) -> None:
        assert self._producer is not None and self._loop is not None
        producer, loop = self._producer, self._loop
        while not self._stop_acks.is_set():
            producer.poll(0.05)
            if self._acks:
                with contextlib.suppress(RuntimeError):  # the loop closed at shutdown
                    loop.call_soon_threadsafe(self._resolve_acks)

    def _resolve_acks(self) -> None:
        acks, self._acks = self._acks, []
        for future, err in acks:
            if not future.done():  # cancelled: abandoned at shutdown
                future.set_result(err)

    # -- rebalance (called on the poll thread) ---------------------------------------------

    def _on_assign(self, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels(self.name).inc()
        self.health.set_ready(self.name, True)

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Finish what is in flight for these partitions so their offsets can be committed."""
        self.metrics.rebalances.labels(self.name).inc()
        assert self._loop is not None
        revoked = [(p.topic, p.partition) for p in partitions]
        future = asyncio.run_coroutine_threadsafe(self._drain(revoked), self._loop)
        try:
            future.result(timeout=self.settings.shutdown.grace.total_seconds())
        except TimeoutError:
            future.cancel()
            log.warning(
                "revoked partitions not drained in time",
                extra={"fields": {"adapter": self.cfg.name}},
            )
        # Store what the drain finished while the partitions are still ours: librdkafka commits
        # the stored offsets of revoked partitions as it lets them go, and the next poll would
        # drop these as no longer assigned, so whoever gets the partitions would deliver the
        # drained records again.
        self._store_offsets()

    async def _drain(self, revoked: list[TP]) -> None:
        try:
            if isinstance(self.adapter, BatchAdapter):
                await self.adapter.flush(revoked)
            parts = [self._partitions[tp] for tp in revoked if tp in self._partitions]
            await self._until_finished(parts, None)
        finally:
            # Not drained in time (cancelled): what is still queued is abandoned, unstored.
            for tp in revoked:
                part = self._partitions.pop(tp, None)
                if part is not None:
                    part.revoked = True

    # -- dispatch ---------------------------------------------------------------------------

    def _dispatch(self, msg: Message) -> None:
        tp = (msg.topic() or "", msg.partition() or 0)
        offset = msg.offset()
        assert offset is not None
        part = self._partitions.get(tp)
        if part is None:
            part = self._partitions[tp] = _Partition(tp)
        delivery = self._delivery(msg)
        if self._batching:
            # Handed over now, in consumption order: batch boundaries must not depend on
            # how tasks happen to be scheduled. Batches keep a key's records in order
            # themselves, and hold many records each, so each record waits in its own task.
            assert isinstance(self.adapter, BatchAdapter)
            appended = self.adapter.append(delivery) if isinstance(delivery, Delivery) else None
            job = _Job(msg, offset, delivery, part, b"", appended)
            self._admit(job)
            self._spawn(self._run_guarded(job))
            return
        job = _Job(msg, offset, delivery, part, msg.key() or b"")
        self._admit(job)
        if job.key in self._keys:
            waiting = self._keys[job.key]
            if waiting is None:
                waiting = self._keys[job.key] = deque()
            waiting.append(job)
        else:
            self._keys[job.key] = None
            self._make_ready(job)

    def _admit(self, job: _Job) -> None:
        job.part.pending.append(job)
        job.part.unfinished += 1
        self._in_flight += 1

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._workers.add(task)
        task.add_done_callback(self._workers.discard)

    def _make_ready(self, job: _Job) -> None:
        self._ready.append(job)
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _work(self) -> None:
        """One of ``concurrency`` workers: takes ready records one at a time until cancelled.

        A fixed pool instead of a task, a done-callback, a key-order future and a semaphore
        slot per record: under load a worker goes from one record to the next without any.
        """
        assert self._loop is not None
        loop, ready, idle = self._loop, self._ready, self._idle
        while True:
            if not ready:
                waiter = loop.create_future()
                idle.append(waiter)
                await waiter
                continue
            job = ready.popleft()
            if job.part.revoked:
                # Its partition was revoked before it started: abandoned, offset unstored.
                self._ended(job, final=False)
                continue
            await self._run_guarded(job)

    async def _run_guarded(self, job: _Job) -> None:
        try:
            settling = await self._run(job)
        except asyncio.CancelledError:
            raise  # shutdown: the record is abandoned, its offset never stored
        except Exception as exc:  # noqa: BLE001 - the worker must outlive a bug
            self._engine_failed(job, exc)
            return
        if settling is None:
            self._ended(job, final=True)
        elif self._batching:
            await self._settled(job, settling)
        else:
            # The produce to the next topic waits for the broker's acknowledgement (a linger and
            # a round trip, milliseconds). Neither the worker nor the key waits with it: a
            # failed record is overtaken by the later ones of its key in any case, and making
            # them wait put every ack of a key's records in a row (make bench R6: ~1,000
            # retried deliveries/s with the loop idle half the time). The record stays
            # unfinished, so its offset is not stored before the broker has it.
            self._release_key(job)
            self._spawn(self._settled(job, settling))

    async def _settled(self, job: _Job, settling: Awaitable[None]) -> None:
        try:
            await settling
        except asyncio.CancelledError:
            raise  # shutdown: as above
        except Exception as exc:  # noqa: BLE001 - the record must not be lost to a bug
            self._engine_failed(job, exc)
        else:
            self._ended(job, final=True)

    def _engine_failed(self, job: _Job, exc: Exception) -> None:
        log.error(
            "sink engine failed on a record; it is delivered again after a restart",
            extra={"fields": {"adapter": self.cfg.name, "exc_class": type(exc).__name__}},
        )
        self._ended(job, final=False)

    def _ended(self, job: _Job, *, final: bool) -> None:
        """A record's work is over: store its offset if it was final, free its key."""
        self._in_flight -= 1
        part = job.part
        part.unfinished -= 1
        if final:
            job.done = True
            if not part.revoked:
                self._advance(part)
        if part.unfinished == 0 and part.drained is not None and not part.drained.done():
            part.drained.set_result(None)
        if not self._batching:
            self._release_key(job)

    def _release_key(self, job: _Job) -> None:
        """Make the key's next record ready (once per record)."""
        if job.key_released:
            return
        job.key_released = True
        waiting = self._keys.get(job.key)
        if waiting:
            self._make_ready(waiting.popleft())
        else:
            del self._keys[job.key]

    def _advance(self, part: _Partition) -> None:
        """Mark the offset after the longest finished prefix of the partition for storing.

        Stored by the poll thread (:meth:`_store_offsets`): librdkafka's ``store_offsets``
        blocks while another thread is inside ``poll`` (measured: each call waited for the poll
        timeout, 24 deliveries/s), so only the poll thread touches the consumer.
        """
        pending = part.pending
        last = None
        while pending and pending[0].done:
            last = pending.popleft().offset
        if last is not None:
            with self._offsets_lock:
                self._to_store[part.tp] = last + 1

    def _store_offsets(self) -> None:
        with self._offsets_lock:
            offsets, self._to_store = self._to_store, {}
        if not offsets or self._consumer is None:
            return
        assigned = self._consumer.assigned
        keep = [TopicPartition(t, p, o) for (t, p), o in offsets.items() if (t, p) in assigned]
        if not keep:
            return
        try:
            self._consumer.consumer.store_offsets(offsets=keep)
        except KafkaException as exc:
            # A partition revoked meanwhile: its records will be consumed again elsewhere.
            log.debug("offsets not stored", extra={"fields": {"error": str(exc)[:100]}})

    def _should_pause(self) -> bool:
        """Back-pressure with hysteresis: pause at max_in_flight, resume at half of it, so the
        partitions do not flap on every finished delivery. A batch adapter's records wait in its
        open batches: capping them would stop the batches from ever filling (its memory is
        bounded by its rotation size). An open circuit always pauses."""
        if not self.breaker.closed:
            return True
        if self._batching:
            return False
        if self._in_flight >= self.max_in_flight:
            self._saturated = True
        elif self._in_flight <= self.max_in_flight // 2:
            self._saturated = False
        return self._saturated

    def _poll(self, room: int, pause: bool) -> list[Message]:
        """Runs on the poll thread (every consumer call stays there): apply back-pressure,
        store what finished, then fetch what is due."""
        assert self._consumer is not None
        self._consumer.throttle(pause)
        self._store_offsets()
        return self._consumer.poll_due(room, 0.2)

    async def _run(self, job: _Job) -> Awaitable[None] | None:
        """Deliver one record until its outcome is final: delivered (None), or failed, when
        what is returned sends it to its next topic (see :meth:`_run_guarded`)."""
        delivery = job.delivery
        if isinstance(delivery, UndecodableRecord):
            return self._settle(job.msg, delivery)
        appended, job.appended = job.appended, None
        breaker = self.breaker
        while True:
            # While the circuit is open, workers wait here; one of them becomes the probe.
            # A record already appended to a batch must not become the probe: its batch may
            # wait for records that cannot come while the circuit pauses the partitions.
            probe = await breaker.admit() if appended is None and not breaker.closed else False
            if appended is not None:
                error = await self._attempt(delivery, appended, bounded=False)
                appended = None
            else:
                call = self.adapter.deliver(delivery)
                error = await self._attempt(delivery, call, bounded=not self._batching)
            if error is None:
                if probe or not breaker.quiet:
                    await breaker.success(probe)
                return None
            if await breaker.failure(error, probe, delivery.idempotency_key):
                # Adapter-wide: the record is not to blame; it waits for the circuit to close.
                self.metrics.deliveries.labels(self.cfg.name, "adapter_down").inc()
                continue
            return self._settle(job.msg, error)

    def _delivery(self, msg: Message) -> Delivery | UndecodableRecord:
        value = msg.value() or b""
        try:
            body, trade_id, close_ms = transcode_trace(value)
        except (ValueError, EOFError, IndexError, TypeError, KeyError) as exc:
            return UndecodableRecord(f"not a TraceRecord: {type(exc).__name__}")
        attempts, due = h.get_ints(msg.headers(), h.ATTEMPTS, h.DUE_MS)
        return Delivery.from_trace(
            value,
            body,
            close_ms,
            idempotency_key=idempotency_key(trade_id, self.cfg.name),
            attempt=(attempts or 0) + 1,
            due_ms=due or 0,
            source=(msg.topic() or "", msg.partition() or 0, msg.offset() or 0),
        )

    async def _attempt(
        self, delivery: Delivery, call: Awaitable[None], *, bounded: bool
    ) -> DeliveryError | None:
        """Await one delivery call, classify its outcome, and count it."""
        adapter = self.cfg.name
        task = self._deadlines.start() if bounded else None
        started = time.perf_counter()
        try:
            await call
        except DeliveryError as exc:
            return exc
        except asyncio.CancelledError:
            if task is not None and self._deadlines.expired(task):
                return RetriableDeliveryError(f"adapter call exceeded {self._deadlines.limit:.0f}s")
            raise
        except Exception as exc:  # noqa: BLE001 - an adapter bug must not lose the record
            log.error(  # noqa: TRY400 - the traceback could quote record values
                "adapter raised an unclassified error; retrying it",
                extra={"fields": {"adapter": adapter, "exc_class": type(exc).__name__}},
            )
            return RetriableDeliveryError(f"unclassified {type(exc).__name__}")
        finally:
            if task is not None:
                self._deadlines.end(task)
            self._m_adapter_call.observe(time.perf_counter() - started)
        now = now_ms()
        self._m_delivered.inc()
        self._m_lateness.observe(max(0, now - delivery.due_ms) / 1000)
        self._m_close_to_delivered.observe(max(0, now - delivery.close_ms) / 1000)
        return None

    async def _settle(self, msg: Message, error: DeliveryError) -> None:
        """Send a failed record to its next topic; return only once the broker has it."""
        headers = msg.headers()
        now = now_ms()
        attempts, first_failure, o_topic, o_partition, o_offset = h.get_many(
            headers,
            h.ATTEMPTS,
            h.FIRST_FAILURE_MS,
            h.ORIGIN_TOPIC,
            h.ORIGIN_PARTITION,
            h.ORIGIN_OFFSET,
        )
        # From the record: records in flight carry no trade id header. None for a record that
        # is not a TraceRecord, whose bytes are not read for one.
        trade_id = None if isinstance(error, UndecodableRecord) else trade_id_of(msg.value() or b"")
        attempt = _int(attempts) + 1
        topic_in = msg.topic() or ""
        step = next_step(error, self.tier_of.get(topic_in), self.tiers, now)
        origin: tuple[str | int, ...]
        if o_topic is not None:
            # Already failed before: keep where the record was first consumed.
            origin = (o_topic, o_partition or "", o_offset or "")
        else:
            origin = (topic_in, msg.partition() or 0, msg.offset() or 0)
        error_class = type(error).__name__
        updates: list[tuple[str, str | int | bytes]] = [
            (h.ATTEMPTS, attempt),
            (h.ADAPTER, self.cfg.name),
            (h.ERROR_CLASS, error_class),
            (h.ERROR_MESSAGE, scrub(str(error))),
            (h.FIRST_FAILURE_MS, _int(first_failure) or now),
            (h.LAST_FAILURE_MS, now),
            (h.ORIGIN_TOPIC, origin[0]),
            (h.ORIGIN_PARTITION, origin[1]),
            (h.ORIGIN_OFFSET, origin[2]),
            (h.SOURCE_GROUP, self.group),
        ]
        if trade_id is not None:
            updates.append((h.TRADE_ID, trade_id.encode()))
        adapter = self.cfg.name
        self._m_failed.inc()
        if isinstance(step, Retry):
            topic = self.retry_topics[step.tier]
            updates.append((h.RETRY_DUE_MS, step.due_ms))
            self._m_retry.inc()
            self._m_retries[step.tier].inc()
        else:
            assert isinstance(step, DeadLetter)
            topic = self.dlq
            self.metrics.deliveries.labels(adapter, "dead_letter").inc()
            self.metrics.dead_letters.labels(adapter, error_class).inc()
        full = self._failures.record(error_class, topic, time.monotonic())
        if full or log.isEnabledFor(logging.DEBUG):
            (log.info if full else log.debug)(
                "delivery failed",
                extra={
                    "fields": {
                        "adapter": adapter,
                        "topic": topic_in,
                        "partition": msg.partition(),
                        "offset": msg.offset(),
                        "trade_id": trade_id,
                        "error_class": error_class,
                        "attempts": attempt,
                        "next": topic,
                    }
                },
            )
        await self._produce_durably(topic, msg.key(), msg.value(), h.replace(headers, updates))

    async def _produce_durably(
        self, topic: str, key: bytes | None, value: bytes | None, headers: h.Headers
    ) -> None:
        """Produce and wait for the acknowledgement, trying again until the broker has it.

        Cancelled at shutdown: then the source offset stays unstored and the record returns.
        """
        assert self._producer is not None and self._loop is not None
        loop = self._loop
        backoff = 0.1
        while True:
            future: asyncio.Future[KafkaError | None] = loop.create_future()

            def on_delivery(err: KafkaError | None, _msg: Message, f: Any = future) -> None:
                # Runs on the acks thread (or the loop thread in flush): the acks thread hands
                # what it collected to the loop once per poll.
                self._acks.append((f, err))

            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=on_delivery
                )
            except BufferError:
                await asyncio.sleep(0.05)
                continue
            err = await future
            if err is None:
                self.metrics.records_out.labels(self.name, topic).inc()
                return
            self.metrics.produce_errors.labels(self.name).inc()
            log.warning(
                "produce failed; trying again",
                extra={"fields": {"topic": topic, "error": err.name()}},
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
