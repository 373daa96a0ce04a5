"""What ingest and release share: consume a batch, produce its outputs, store an input record's
offset only once the broker acknowledged every output of it (and of every record before it).

Both stages produce through :class:`Pipeline`: it polls again at once and stores offsets as
acknowledgements arrive, in order per partition. Waiting for a whole batch's acknowledgements
before polling again put ``linger.ms`` plus a produce round trip between every batch and the
next poll: on the lateness of every record that became due meanwhile (make bench R3), and
~46% of ingest's loop (R1).

Records are tracked per run (a partition's consecutive records in one batch), not per record:
a batch's records arrive in runs (:meth:`DelayedConsumer.poll_runs`), and one counter per run
is the delivery callback of all its outputs. If an output fails, the input partition is
rewound to the first record of that run and processed again from there: duplicates are
possible (at-least-once), loss is not.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from consumer import headers as h
from consumer.clients import make_consumer, make_producer, positional_produce
from consumer.config import Settings
from consumer.delayed import TP, DelayedConsumer, Run
from consumer.health import Health
from consumer.log import get_logger, set_stage
from consumer.metrics import Metrics

log = get_logger("stage")

#: A :class:`Pipeline` counts every acknowledgement.
PIPELINE_PRODUCER_SETTINGS: dict[str, Any] = {"delivery.report.only.error": False}

#: One output: topic, value, key, headers.
Output = tuple[str, bytes | None, bytes | str | None, h.RawHeaders]


#: :attr:`InFlight.sent` of a run not closed yet: more than it can ever have acknowledged.
_OPEN = 1 << 62


class InFlight:
    """Consecutive records of one input partition, produced together: their outputs in flight.

    It is the delivery callback of every one of those outputs, so a batch costs one object and
    one counter per partition rather than per record. Complete once every output is
    acknowledged; if one fails, the partition is rewound to the first record of the run (the
    records before the failed one are processed again too: duplicates, never loss).
    """

    __slots__ = (
        "acked",
        "error",
        "failures",
        "first",
        "last",
        "live",
        "outputs",
        "records",
        "sent",
        "tp",
    )

    def __init__(self, tp: TP, failures: list[InFlight]) -> None:
        self.tp = tp
        self.failures = failures
        self.acked = 0
        #: Outputs produced; unknown (never complete) until :meth:`Pipeline.close`.
        self.sent = _OPEN
        self.records = 0
        self.first = self.last = -1
        #: Outputs per topic, for the records_out metric once acknowledged.
        self.outputs: dict[str, int] = {}
        #: False once forgotten (rewound past or revoked): its late reports count for nothing.
        self.live = True
        self.error: KafkaError | None = None

    def __call__(self, err: KafkaError | None, _msg: Message) -> None:
        self.acked += 1
        if err is not None and self.error is None:
            self.error = err
            self.failures.append(self)


class Pipeline:
    """Produces each record's outputs without waiting; :meth:`settle` stores offsets as they
    are acknowledged.

    Records are produced in runs (:meth:`open` an :class:`InFlight`, give it as every output's
    ``on_delivery``, :meth:`close` it), or one at a time with :meth:`send`. Per input partition,
    runs wait in a queue in offset order. An offset is stored only when that record and every
    record before it in its partition have every output acknowledged, so a stored offset never
    passes an unacknowledged record. If an output fails, the partition is rewound to the first
    record of its run (through :meth:`DelayedConsumer.rewind`, which also drops a hold beyond
    it) and every later run of it in flight is forgotten: those are produced again after the
    rewind, and their late acknowledgements count for nothing.

    Acknowledgements are only looked at in :meth:`settle` (before each poll) and
    :meth:`drain`, never in the middle of a batch: a rewind in the middle of a batch would let
    the batch's later records of that partition be queued behind it, and stored, before the
    rewound ones came back.

    """

    #: Records in flight before the loop waits for acknowledgements instead of polling. It
    #: bounds the producer's queue (~20 MB at this size) and the work a failure redoes, and it
    #: must ride out a pause in acknowledgements at full speed: pausing the input drops every
    #: record librdkafka prefetched for it (up to ``queued.max.messages.kbytes``, 64 MB for
    #: ingest by default), all fetched again on resume. At ~200k records/s, 10,000 was 50 ms of
    #: acknowledgements; a new producer's first requests took longer, and in two of three
    #: make bench runs the first ingest leg paused and refetched its input (R1 0.46 and 0.49 in
    #: those rounds); no leg paused at 50,000 (six legs).
    max_pending = 50_000
    #: While records are in flight, a poll blocks at most this long, so acknowledgements are
    #: served and offsets stored promptly even when nothing is due.
    ack_poll_s = 0.02

    def __init__(
        self,
        producer: Producer,
        metrics: Metrics,
        stage: str,
        consumer: DelayedConsumer,
        *,
        ack_timeout: float = 60.0,
    ) -> None:
        self.producer = producer
        self._metrics = metrics
        self._stage = stage
        self._consumer = consumer
        self._ack_timeout = ack_timeout
        #: Whether a hot loop may call ``producer.produce`` with positional arguments (checked
        #: once per process: :func:`~consumer.clients.positional_produce`).
        self.positional = positional_produce()
        self._queues: dict[TP, deque[InFlight]] = {}
        self._failures: list[InFlight] = []
        self._pending = 0
        #: Outputs acknowledged per topic, not yet added to the metric (reused).
        self._acked: dict[str, int] = {}

    @property
    def pending(self) -> int:
        """Input records with an output not acknowledged yet."""
        return self._pending

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | str | None,
        headers: h.RawHeaders,
        run: InFlight,
    ) -> None:
        """Produce one output of ``run``, waiting for room in a full local queue.

        A hot loop may call ``producer.produce(..., on_delivery=run)`` itself (positionally if
        :attr:`positional`) and come here only on ``BufferError``.
        """
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=headers, on_delivery=run)
            except BufferError:
                # Local queue full: serve delivery reports to make room, then try again.
                self.producer.poll(0.1)
            else:
                return

    def open(self, tp: TP) -> InFlight:
        """A run of records of ``tp``. Runs of a partition are closed in offset order."""
        return InFlight(tp, self._failures)

    def close(
        self, run: InFlight, first: int, last: int, records: int, outputs: dict[str, int]
    ) -> None:
        """Records ``first``..``last`` (``records`` of them) were produced, ``outputs`` per
        topic: their offsets are stored once every output is acknowledged."""
        if not records:
            return
        run.first, run.last, run.records, run.outputs = first, last, records, outputs
        run.sent = sum(outputs.values())
        queue = self._queues.get(run.tp)
        if queue is None:
            queue = self._queues[run.tp] = deque()
        queue.append(run)
        self._pending += records

    def send(self, record: Message, outputs: Sequence[Output]) -> None:
        """Produce every output of ``record``; its offset is stored once all are acknowledged."""
        offset = record.offset()
        assert offset is not None
        run = self.open((record.topic() or "", record.partition() or 0))
        counts: dict[str, int] = {}
        for topic, value, key, headers in outputs:
            self.produce(topic, value, key, headers, run)
            counts[topic] = counts.get(topic, 0) + 1
        self.close(run, offset, offset, 1, counts)

    def settle(self) -> None:
        """Serve acknowledgements, store the offsets they complete, rewind what failed.

        With :attr:`max_pending` records in flight (a slow or unreachable broker), the input is
        paused until half of them are acknowledged; polling goes on meanwhile, so the group
        membership stays alive and a stop is noticed.
        """
        self.producer.poll(0)
        self._settle()
        if self._pending >= self.max_pending:
            self._consumer.throttle(True)
        elif self._consumer.throttled and self._pending <= self.max_pending // 2:
            self._consumer.throttle(False)

    def poll_cap(self) -> float | None:
        return self.ack_poll_s if self._pending else None

    def _settle(self) -> None:
        if self._failures:
            self._rewind_failed()
        store: list[TopicPartition] = []
        acked = self._acked
        for tp, queue in self._queues.items():
            last = -1
            while queue and queue[0].acked >= queue[0].sent and queue[0].error is None:
                run = queue.popleft()
                last = run.last
                self._pending -= run.records
                for topic, count in run.outputs.items():
                    acked[topic] = acked.get(topic, 0) + count
            if last >= 0:
                store.append(TopicPartition(tp[0], tp[1], last + 1))
        if store:
            self._store(store)
        if acked:
            for topic, count in acked.items():
                self._metrics.records_out.labels(self._stage, topic).inc(count)
            acked.clear()

    def _rewind_failed(self) -> None:
        """Per partition, forget the first failed run and everything after it, and rewind."""
        first: dict[TP, InFlight] = {}
        for run in self._failures:
            if run.live and (run.tp not in first or run.first < first[run.tp].first):
                first[run.tp] = run
        codes = sorted({r.error.name() for r in self._failures if r.error is not None})
        self._failures.clear()
        for tp, entry in first.items():
            queue = self._queues[tp]
            while queue and queue[-1].first >= entry.first:
                gone = queue.pop()
                gone.live = False
                self._pending -= gone.records
            self._metrics.produce_errors.labels(self._stage).inc()
            log.warning(
                "outputs not acknowledged; rewinding",
                extra={
                    "fields": {
                        "stage": self._stage,
                        "topic": tp[0],
                        "partition": tp[1],
                        "offset": entry.first,
                        "errors": codes,
                    }
                },
            )
            self._consumer.rewind(tp[0], tp[1], entry.first)

    def _store(self, offsets: list[TopicPartition]) -> None:
        assigned = self._consumer.assigned
        offsets = [o for o in offsets if (o.topic, o.partition) in assigned]
        if not offsets:
            return
        try:
            self._consumer.consumer.store_offsets(offsets=offsets)
        except KafkaException as exc:
            # Lost meanwhile (a rebalance not seen yet): the new owner processes them again.
            log.warning("could not store offsets", extra={"fields": {"error": str(exc)[:200]}})

    def revoked(self, partitions: list[TopicPartition]) -> None:
        """Before partitions go, wait for their acknowledgements and store what completed, so
        the next owner does not process them again; whatever is still unacknowledged is
        forgotten (the next owner processes it again)."""
        gone = {(p.topic, p.partition) for p in partitions}
        if any(self._queues.get(tp) for tp in gone):
            self.producer.flush(self._ack_timeout)
            self.producer.poll(0)
            self._settle()
        for tp in gone:
            for run in self._queues.pop(tp, ()):
                run.live = False
                self._pending -= run.records

    def drain(self, timeout: float) -> None:
        self.producer.flush(timeout)
        self.producer.poll(0)
        self._settle()
        # The loop is stopping: the revocation that closing the consumer brings must not wait
        # for the same acknowledgements all over again (what is left is processed again by the
        # next owner).
        self._ack_timeout = 0.0


class LoopStage:
    """A batch stage (ingest, release): poll due records, handle them, until ``stop`` is set.

    Subclasses say which group and topic they read (:attr:`group`, :attr:`topic`), how due
    times are read (:meth:`due_of`, only if :attr:`delayed`), how outputs are acknowledged
    (:meth:`_output`) and what a batch becomes (:meth:`_handle`, given runs of records of one
    partition each).
    """

    name = "stage"
    #: Consumer group and input topic, set by the subclass.
    group: str
    topic: str
    #: A delayed topic's consumer holds partitions until their head is due.
    delayed = False
    batch_size = 1000
    max_poll_s = 1.0

    def __init__(self, settings: Settings, metrics: Metrics, health: Health) -> None:
        self.settings = settings
        self.metrics = metrics
        self.health = health
        self._out: Pipeline | None = None
        health.register(self.name)

    def due_of(self, headers: h.RawHeaders) -> int:
        """Due time in epoch ms of a record with these headers, for a :attr:`delayed` stage."""
        return 0

    def _started(self) -> dict[str, Any]:
        """Fields of the ``started`` log line."""
        return {"topic": self.topic}

    def _turned(self, consumer: DelayedConsumer) -> None:
        """Called after every poll (for gauges)."""

    def _make_producer(self) -> Producer:
        return make_producer(self.settings, **PIPELINE_PRODUCER_SETTINGS)

    def _output(self, producer: Producer, consumer: DelayedConsumer) -> Pipeline:
        """What ``_handle`` produces through; it also decides when offsets are stored."""
        return Pipeline(producer, self.metrics, self.name, consumer)

    def _handle(self, consumer: DelayedConsumer, out: Pipeline, runs: list[Run]) -> None:
        raise NotImplementedError

    def _on_rebalance(self, _partitions: Any) -> None:
        self.metrics.rebalances.labels(self.name).inc()
        self.health.set_ready(self.name, True)

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        if self._out is not None:
            self._out.revoked(partitions)
        self._on_rebalance(partitions)

    def run(self, stop: threading.Event) -> None:
        set_stage(self.name)
        consumer = DelayedConsumer(
            make_consumer(self.settings, self.group, delayed=self.delayed),
            # Records of a topic that is not delayed are all due: none is looked at for it.
            due_of=None,
            due_of_headers=self.due_of if self.delayed else None,
            max_poll_s=self.max_poll_s,
            on_assign=self._on_rebalance,
            on_revoke=self._on_revoke,
        )
        out = self._out = self._output(self._make_producer(), consumer)
        consumer.subscribe([self.topic])
        self.metrics.watch_consumer(self.name, self.group, [self.topic], consumer.snapshot)
        log.info(f"{self.name} started", extra={"fields": self._started()})  # noqa: G004
        try:
            while not stop.is_set():
                self.health.beat(self.name)
                out.settle()
                runs = consumer.poll_runs(self.batch_size, timeout=out.poll_cap())
                self._turned(consumer)
                if runs:
                    self._handle(consumer, out, runs)
        finally:
            self.metrics.unwatch_consumer(self.name)
            out.drain(10)
            consumer.close()
            self._out = None
            log.info(f"{self.name} stopped")  # noqa: G004
