"""Sink worker: one consumer group per adapter, reading its sink topic and its retry tiers.

Where does a delivery get retried? Here: :meth:`SinkWorker._settle` asks
:func:`consumer.policy.next_step` and produces the record to the next tier or the DLQ.

Concurrency: deliveries of different keys run at once (up to the adapter's ``concurrency``);
records of one key go one at a time, in the order consumed. Offsets are stored per partition
only up to the lowest record whose outcome is not final yet, so a crash redelivers, never loses.

Threads: the asyncio loop runs deliveries; ``consume`` runs in one executor thread so the loop
stays free while it blocks (rebalance callbacks fire there and hand work to the loop); a small
thread serves producer acknowledgements so they never wait for a poll.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import deque
from collections.abc import Awaitable
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
from consumer.delayed import TP, DelayedConsumer, now_ms
from consumer.errors import DeliveryError, RetriableDeliveryError
from consumer.health import Health
from consumer.log import get_logger, set_stage
from consumer.metrics import Metrics
from consumer.policy import DeadLetter, Retry, next_step
from consumer.records import idempotency_key
from consumer.topics import dlq_topic, retry_topics, sink_group, sink_topic
from consumer.tracecodec import decode_trace
from consumer.trade import epoch_ms

log = get_logger("sink")

_QUERY = re.compile(r"\?\S*")


def scrub(message: str, limit: int = 300) -> str:
    """Belt and braces on top of the adapters' own care: no query strings, bounded length."""
    return _QUERY.sub("?…", message)[:limit]


class UndecodableRecord(DeliveryError):
    """A sink or retry record whose bytes are not a TraceRecord (never retried)."""


@dataclass(slots=True)
class _Partition:
    #: Offsets dispatched and not yet final, with a done flag, in consumption order.
    pending: deque[list[Any]] = field(default_factory=deque)


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
        self._tasks: dict[TP, set[asyncio.Task[None]]] = {}
        #: Per key, a future done when its latest dispatched record is final (whatever the
        #: outcome): the next record of the key starts after it. A bare future, not the task:
        #: asyncio.wait on a task cost an eighth of the engine's time per record.
        self._key_tail: dict[bytes, asyncio.Future[None]] = {}
        self._in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sem: asyncio.Semaphore | None = None
        self._consumer: DelayedConsumer | None = None
        self._producer: Producer | None = None
        self._stop_acks = threading.Event()
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
        self._sem = asyncio.Semaphore(self.cfg.concurrency)
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
            await self._shutdown(poller)
        finally:
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
            await self.adapter.flush(list(self._tasks))
        tasks = [t for ts in self._tasks.values() for t in ts]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=max(0.0, grace - 2.0))
            for task in pending:
                # Its offset is never stored: the record is delivered again after restart.
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
                log.warning(
                    "abandoned in-flight deliveries at shutdown",
                    extra={"fields": {"adapter": self.cfg.name, "count": len(pending)}},
                )
        assert self._producer is not None
        self._producer.flush(5)
        # close() runs the revoke callback, which must not block the loop thread.
        await self._loop.run_in_executor(poller, self._store_offsets)
        await self._loop.run_in_executor(poller, consumer.close)

    def _serve_acks(self) -> None:
        assert self._producer is not None
        while not self._stop_acks.is_set():
            self._producer.poll(0.05)

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

    async def _drain(self, revoked: list[TP]) -> None:
        if isinstance(self.adapter, BatchAdapter):
            await self.adapter.flush(revoked)
        tasks = [t for tp in revoked for t in self._tasks.get(tp, ())]
        if tasks:
            await asyncio.wait(tasks)
        for tp in revoked:
            self._partitions.pop(tp, None)
            self._tasks.pop(tp, None)

    # -- dispatch ---------------------------------------------------------------------------

    def _dispatch(self, msg: Message) -> None:
        assert self._loop is not None
        tp = (msg.topic() or "", msg.partition() or 0)
        offset = msg.offset()
        assert offset is not None
        entry = [offset, False]
        self._partitions.setdefault(tp, _Partition()).pending.append(entry)
        self._in_flight += 1
        delivery = self._delivery(msg)
        appended: Awaitable[None] | None = None
        if self._batching and isinstance(delivery, Delivery):
            # Handed over now, in consumption order: batch boundaries must not depend on
            # how tasks happen to be scheduled.
            assert isinstance(self.adapter, BatchAdapter)
            appended = self.adapter.append(delivery)
            key = b""
            previous = None
            gate = None
        else:
            key = msg.key() or b""
            previous = self._key_tail.get(key)
            gate = self._loop.create_future()
            self._key_tail[key] = gate
        task = self._loop.create_task(self._process(msg, delivery, previous, appended))
        self._tasks.setdefault(tp, set()).add(task)

        def finished(t: asyncio.Task[None]) -> None:
            self._tasks.get(tp, set()).discard(t)
            if gate is not None:
                if not gate.done():  # cancelled with the task that awaited it
                    gate.set_result(None)
                if self._key_tail.get(key) is gate:
                    del self._key_tail[key]
            self._in_flight -= 1
            if not t.cancelled() and t.exception() is None:
                entry[1] = True
                self._advance(tp)

        task.add_done_callback(finished)

    def _advance(self, tp: TP) -> None:
        """Mark the offset after the longest finished prefix of the partition for storing.

        Stored by the poll thread (:meth:`_store_offsets`): librdkafka's ``store_offsets``
        blocks while another thread is inside ``poll`` (measured: each call waited for the poll
        timeout, 24 deliveries/s), so only the poll thread touches the consumer.
        """
        part = self._partitions.get(tp)
        if part is None:
            return
        last = None
        while part.pending and part.pending[0][1]:
            last = part.pending.popleft()[0]
        if last is not None:
            with self._offsets_lock:
                self._to_store[tp] = last + 1

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

    async def _process(
        self,
        msg: Message,
        delivery: Delivery | UndecodableRecord,
        previous: asyncio.Future[None] | None,
        appended: Awaitable[None] | None = None,
    ) -> None:
        """Deliver one record until its outcome is final (delivered, or on its next topic).

        ``appended``: a batch adapter's first attempt, already handed over at dispatch.
        """
        if isinstance(delivery, UndecodableRecord):
            await self._settle(msg, delivery)
            return
        if previous is not None:
            # Same key: strictly after the earlier record, whatever its outcome. Only this
            # task awaits the future, so cancelling it along with this task harms no one.
            await previous
        assert self._sem is not None
        while True:
            # While the circuit is open, wait here, outside the concurrency limit, so the one
            # probe can always get a slot.
            # A record already appended to a batch must not become the probe: its batch may
            # wait for records that cannot come while the circuit pauses the partitions.
            probe = (
                await self.breaker.admit()
                if appended is None and not self.breaker.closed
                else False
            )
            if appended is not None:
                error = await self._attempt(delivery, appended, limit=None)
                appended = None
            elif self._batching:
                error = await self._attempt(delivery, self.adapter.deliver(delivery), limit=None)
            else:
                async with self._sem:
                    error = await self._attempt(delivery, self.adapter.deliver(delivery))
            if error is None:
                await self.breaker.success(probe)
                return
            if await self.breaker.failure(error, probe, delivery.idempotency_key):
                # Adapter-wide: the record is not to blame; it waits for the circuit to close.
                self.metrics.deliveries.labels(self.cfg.name, "adapter_down").inc()
                continue
            await self._settle(msg, error)
            return

    def _delivery(self, msg: Message) -> Delivery | UndecodableRecord:
        try:
            record = decode_trace(msg.value() or b"")
        except (ValueError, EOFError, IndexError, TypeError, KeyError) as exc:
            return UndecodableRecord(f"not a TraceRecord: {type(exc).__name__}")
        attempts, due = h.get_ints(msg.headers(), h.ATTEMPTS, h.DUE_MS)
        return Delivery(
            record=record,
            idempotency_key=idempotency_key(record["trade_id"], self.cfg.name),
            attempt=(attempts or 0) + 1,
            due_ms=due or 0,
            source=(msg.topic() or "", msg.partition() or 0, msg.offset() or 0),
        )

    async def _attempt(
        self, delivery: Delivery, call: Awaitable[None], *, limit: float | None = -1.0
    ) -> DeliveryError | None:
        """Await one delivery call, classify its outcome, and count it.

        ``limit`` bounds a hung adapter (default: twice its timeout); None for batch adapters,
        whose records wait for their batch to fill.
        """
        adapter = self.cfg.name
        if limit is not None and limit < 0:
            limit = self.cfg.timeout.total_seconds() * 2 + 1
        started = time.perf_counter()
        try:
            # asyncio.timeout, not wait_for: wait_for wraps the call in one more task.
            async with asyncio.timeout(limit):
                await call
        except DeliveryError as exc:
            return exc
        except TimeoutError:
            return RetriableDeliveryError(f"adapter call exceeded {limit or 0:.0f}s")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - an adapter bug must not lose the record
            log.error(  # noqa: TRY400 - the traceback could quote record values
                "adapter raised an unclassified error; retrying it",
                extra={"fields": {"adapter": adapter, "exc_class": type(exc).__name__}},
            )
            return RetriableDeliveryError(f"unclassified {type(exc).__name__}")
        finally:
            self._m_adapter_call.observe(time.perf_counter() - started)
        now = now_ms()
        self._m_delivered.inc()
        self._m_lateness.observe(max(0, now - delivery.due_ms) / 1000)
        close_ms = epoch_ms(delivery.record["close_time"])
        self._m_close_to_delivered.observe(max(0, now - close_ms) / 1000)
        return None

    async def _settle(self, msg: Message, error: DeliveryError) -> None:
        """Send a failed record to its next topic; return only once the broker has it."""
        headers = msg.headers()
        now = now_ms()
        attempts = (h.get_int(headers, h.ATTEMPTS) or 0) + 1
        step = next_step(error, self.tier_of.get(msg.topic() or ""), self.tiers, now)
        if h.get(headers, h.ORIGIN_TOPIC) is not None:
            # Already failed before: keep where the record was first consumed.
            origin: tuple[str | int, ...] = tuple(
                h.get(headers, name) or ""
                for name in (h.ORIGIN_TOPIC, h.ORIGIN_PARTITION, h.ORIGIN_OFFSET)
            )
        else:
            origin = (msg.topic() or "", msg.partition() or 0, msg.offset() or 0)
        updates: list[tuple[str, str | int]] = [
            (h.ATTEMPTS, attempts),
            (h.ADAPTER, self.cfg.name),
            (h.ERROR_CLASS, type(error).__name__),
            (h.ERROR_MESSAGE, scrub(str(error))),
            (h.FIRST_FAILURE_MS, h.get_int(headers, h.FIRST_FAILURE_MS) or now),
            (h.LAST_FAILURE_MS, now),
            (h.ORIGIN_TOPIC, origin[0]),
            (h.ORIGIN_PARTITION, origin[1]),
            (h.ORIGIN_OFFSET, origin[2]),
            (h.SOURCE_GROUP, self.group),
        ]
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
            self.metrics.dead_letters.labels(adapter, type(error).__name__).inc()
        log.info(
            "delivery failed",
            extra={
                "fields": {
                    "adapter": adapter,
                    "topic": msg.topic(),
                    "partition": msg.partition(),
                    "offset": msg.offset(),
                    "trade_id": h.get(headers, h.TRADE_ID),
                    "error_class": type(error).__name__,
                    "attempts": attempts,
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
                loop.call_soon_threadsafe(lambda: f.done() or f.set_result(err))

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
