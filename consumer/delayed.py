"""The delayed-topic consumer: release (the T+X window) and every retry tier read through it.

A record is handed to the application only once it is due. A partition whose head record is
not due yet is *paused and seeked back* to that record, and resumed when it is due: nothing
waits in memory, no thread sleeps on a record, and the backlog only costs disk on the broker.
Polling never stops (heartbeats and group membership stay alive); the poll timeout is cut to
the time until the next partition is due, so lateness is bounded by the poll loop.

Rebalance: the pause/seek state of a revoked partition is dropped; a newly assigned partition
starts from its committed offset and is paused again by its own head record if needed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from consumer.headers import RawHeaders
from consumer.log import get_logger

log = get_logger("delayed")

TP = tuple[str, int]
DueOf = Callable[[Message], int]
#: A due time read from a record's headers alone (see ``due_of_headers``).
HeadersDueOf = Callable[[RawHeaders], int]


class Run(NamedTuple):
    """Consecutive records of one partition, as :meth:`DelayedConsumer.poll_runs` hands them out.

    A stage's per-record work then looks a record's partition up once per run, not per record
    (two C calls and a tuple each), and keeps one acknowledgement counter per run
    (:class:`consumer.stage.Pipeline`).
    """

    tp: TP
    messages: list[Message]
    #: Each record's due time (epoch ms), for a delayed topic; None for a topic read at once.
    dues: list[int] | None
    #: Each record's headers, when the due times were read from them (``due_of_headers``).
    headers: list[RawHeaders] | None = None


#: How long a resumed partition still counts as held for metrics if none of its records is
#: handed out (a fetcher that does not wake up must not hide overdue records for long).
RESUME_GRACE_MS = 2000

#: How long a partition whose seek back failed waits before it is tried again.
SEEK_RETRY_MS = 100

#: Records taken from librdkafka's queue at a time (see :meth:`DelayedConsumer.poll_due`).
CONSUME_CHUNK = 32


class PartitionView(NamedTuple):
    """One assigned partition, as the lag monitor sees it."""

    #: The offset a held partition waits at (its head record is not due); None: not held.
    held_at: int | None
    #: The offset after the last record handed to the application; None: none yet.
    taken: int | None
    #: Resumed because its head became due, not re-examined yet (``held_at`` is that head).
    resuming: bool = False


@dataclass(slots=True)
class _Held:
    offset: int
    until_ms: int


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class DelayedConsumer:
    """Wraps a subscribed ``Consumer`` so that ``poll_due`` returns only due records.

    ``due_of(msg)`` gives a record's due time in epoch ms (0: due at once). ``clock`` returns
    epoch ms and is injectable so unit tests need no waiting.

    ``due_of=None``: a topic whose records are all due at once (ingest's input). Such a consumer
    looks at no record's due time; it can still hold a partition (:meth:`hold`, :meth:`rewind`)
    and be throttled. ``due_of_headers`` instead of ``due_of``: the due time is read from the
    headers alone, and each run keeps the headers it read (release copies them: converting a
    record's headers to Python objects twice cost ~4% of release).

    Holds and assignments change only on the polling thread (in :meth:`hold` and in the
    rebalance callbacks, which librdkafka calls from inside a poll): that thread reads them
    without the lock, which is there for the threads that only read them (the lag monitor).
    """

    def __init__(
        self,
        consumer: Consumer,
        due_of: DueOf | None,
        *,
        due_of_headers: HeadersDueOf | None = None,
        max_poll_s: float = 1.0,
        clock: Callable[[], int] = now_ms,
        on_assign: Callable[[list[TopicPartition]], None] | None = None,
        on_revoke: Callable[[list[TopicPartition]], None] | None = None,
    ) -> None:
        self.consumer = consumer
        self._due_of = due_of
        self._due_of_headers = due_of_headers
        self._max_poll_s = max_poll_s
        self._clock = clock
        self._held: dict[TP, _Held] = {}
        #: Per partition, the offset after the last record handed to the application (metrics).
        self._taken: dict[TP, int] = {}
        #: Partitions resumed and not re-examined yet: held offset and resume time (metrics).
        self._resumed: dict[TP, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._assigned: set[TP] = set()
        self._user_assign = on_assign
        self._user_revoke = on_revoke
        #: Partitions paused by the application (back-pressure), not by due times.
        self._throttled = False
        #: Records of one partition of several topics can follow each other in a batch: runs
        #: must then tell topics apart too.
        self._topics = 0
        self.rebalances = 0

    # -- subscription and rebalance ---------------------------------------------------------

    def subscribe(self, topics: list[str]) -> None:
        self._topics = len(topics)
        self.consumer.subscribe(
            topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._lock:
            self.rebalances += 1
            self._assigned.update((p.topic, p.partition) for p in partitions)
        if self._user_assign is not None:
            self._user_assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._user_revoke is not None:
            self._user_revoke(partitions)
        with self._lock:
            self.rebalances += 1
            for p in partitions:
                tp = (p.topic, p.partition)
                self._held.pop(tp, None)
                self._taken.pop(tp, None)
                self._resumed.pop(tp, None)
                self._assigned.discard(tp)

    @property
    def assigned(self) -> set[TP]:
        with self._lock:
            return set(self._assigned)

    # -- holding partitions -----------------------------------------------------------------

    def hold(self, topic: str, partition: int, offset: int, until_ms: int) -> None:
        """Pause a partition until ``until_ms``; it is rewound to ``offset`` when resumed.

        Pausing drops the partition's fetched records from librdkafka's queue (verified), so
        nothing behind ``offset`` is handed out meanwhile. The seek back to ``offset`` is made
        when the partition is resumed (:meth:`_resume_at`), where it also wakes the fetcher:
        seeking here as well cost a second synchronous seek and a second broker request per
        hold, and a release holds every partition tens of times a second (make bench R3).

        Also used by ingest to back off a partition while the Schema Registry is unreachable.
        """
        with self._lock:
            if (topic, partition) not in self._assigned:
                return
            self._held[(topic, partition)] = _Held(offset, until_ms)
            self._resumed.pop((topic, partition), None)
        self.consumer.pause([TopicPartition(topic, partition)])

    def held(self) -> dict[TP, int]:
        """Held partitions and when each is due (for metrics and tests)."""
        with self._lock:
            return {tp: h.until_ms for tp, h in self._held.items()}

    def snapshot(self) -> dict[TP, PartitionView]:
        """Assigned partitions: where a held one waits, and how far records were handed out.

        A partition resumed because its head became due still counts as held at that head
        until a record of it is handed out (at most :data:`RESUME_GRACE_MS`): until its records
        are fetched again nobody knows which of those behind the head are due, and calling
        them all overdue for that instant would be wrong far more often than right.

        Safe from any thread: the lag monitor reads it (:mod:`consumer.lag`).
        """
        now = self._clock()
        with self._lock:
            views = {tp: PartitionView(None, self._taken.get(tp)) for tp in self._assigned}
            for tp, (offset, at) in self._resumed.items():
                if tp in views and now - at < RESUME_GRACE_MS:
                    views[tp] = PartitionView(offset, views[tp].taken, resuming=True)
            for tp, h in self._held.items():
                if tp in views:
                    views[tp] = PartitionView(h.offset, views[tp].taken)
            return views

    def next_due_ms(self) -> int | None:
        with self._lock:
            return min((h.until_ms for h in self._held.values()), default=None)

    def _resume_due(self, now: int) -> None:
        if not self._held:
            return
        if self._throttled:
            # Held partitions stay held (and paused) until back-pressure lifts: resuming one
            # must seek it back to its head, and only this path does.
            return
        with self._lock:
            due = [(tp, h.offset) for tp, h in self._held.items() if h.until_ms <= now]
            for tp, offset in due:
                del self._held[tp]
                self._resumed[tp] = (offset, now)
        if due:
            self._resume_at([TopicPartition(t, p, offset) for (t, p), offset in due])

    def _resume_at(self, partitions: list[TopicPartition]) -> None:
        """Resume held partitions and seek each back to the offset it was held at.

        The seek comes after the resume because it is also the wake-up. librdkafka handles
        ``resume`` on its main thread; a broker thread with nothing left to fetch only notices
        up to ~1 s later (measured: 700 ms). A seek to an offset above 0 makes librdkafka
        validate the position with the partition's leader (an OffsetForLeaderEpoch request),
        and that request wakes the leader's broker thread at once: the first record arrives
        1-3 ms after the resume, as fast as with the ListOffsets round trip of :meth:`_resume`,
        without blocking the polling thread on the broker (under make bench R3 that round trip
        cost the release loop ~9 ms per resume, queued behind fetches on the broker
        connection). Records fetched between the resume and the seek are dropped by the seek.
        A seek to offset 0 sends no request (librdkafka validates only positive offsets) and
        wakes nothing: there the ListOffsets wake-up is used as well.
        """
        self.consumer.resume([TopicPartition(tp.topic, tp.partition) for tp in partitions])
        unwoken: TopicPartition | None = None
        for tp in partitions:
            try:
                self.consumer.seek(tp)
            except KafkaException as exc:
                self._seek_failed(tp, exc)
                continue
            if tp.offset <= 0:
                unwoken = tp
        if unwoken is not None:
            self._wake(TopicPartition(unwoken.topic, unwoken.partition))

    def _seek_failed(self, tp: TopicPartition, exc: KafkaException) -> None:
        """A resumed partition must not fetch on from beyond its held record: hold it again
        and retry shortly (a revoked one is simply dropped by :meth:`hold`)."""
        log.warning(
            "seek back to a held record failed; holding again",
            extra={
                "fields": {
                    "topic": tp.topic,
                    "partition": tp.partition,
                    "offset": tp.offset,
                    "error": str(exc)[:200],
                }
            },
        )
        self.hold(tp.topic, tp.partition, tp.offset, self._clock() + SEEK_RETRY_MS)

    def _resume(self, partitions: list[TopicPartition]) -> None:
        """Resume partitions that were paused only by back-pressure, and wake their fetchers.

        Each continues from its position (after the last record taken from librdkafka's
        queue), as a plain resume would; seeking it there is what wakes its leader's fetcher
        without blocking (see :meth:`_resume_at`). The position is known locally; for a
        partition that has none yet (nothing fetched since it was assigned), a ListOffsets
        request to the leader is the wake-up, one per call, because each is a synchronous round
        trip on the polling thread (per partition they took 37-40% of the sink loop under load;
        in make bench R1 the one wake of ingest's back-pressure at start-up blocked ~0.7 s,
        queued behind a fetch the broker held for ``fetch.wait.max.ms``).
        """
        self.consumer.resume(partitions)
        if not partitions:
            return
        try:
            positions = self.consumer.position(partitions)
        except KafkaException:
            positions = []
        unwoken = [tp for tp in positions if tp.offset <= 0] if positions else partitions
        for tp in positions:
            if tp.offset > 0:
                try:
                    self.consumer.seek(tp)
                except KafkaException:
                    # Only a wake-up: it still resumes from there by itself.
                    unwoken.append(tp)
        if unwoken:
            self._wake(TopicPartition(unwoken[0].topic, unwoken[0].partition))

    def _wake(self, partition: TopicPartition) -> None:
        # Only a wake-up: if it fails, the fetcher still resumes on its own.
        with contextlib.suppress(KafkaException):
            self.consumer.get_watermark_offsets(partition, timeout=1.0, cached=False)

    def rewind(self, topic: str, partition: int, offset: int) -> None:
        """Fetch a partition again from ``offset`` (its outputs failed), held or not.

        It is held at ``offset`` until now: the next poll resumes it and seeks it back there,
        through the same path as any due partition (so a held partition's later head is
        forgotten, and back-pressure still applies).
        """
        self.hold(topic, partition, offset, self._clock())

    @property
    def throttled(self) -> bool:
        return self._throttled

    def throttle(self, on: bool) -> None:
        """Back-pressure: pause every assigned partition while the application is saturated.

        Polling goes on (the group stays alive); held partitions stay held.
        """
        if on == self._throttled:
            return
        self._throttled = on
        with self._lock:
            assigned = [TopicPartition(t, p) for t, p in self._assigned]
            held = set(self._held)
        if on:
            self.consumer.pause(assigned)
        else:
            self._resume([tp for tp in assigned if (tp.topic, tp.partition) not in held])

    # -- polling ----------------------------------------------------------------------------

    def poll_timeout(self, now: int) -> float:
        """Never longer than the time until the next held partition is due (while
        back-pressure pauses everything, no held partition can be resumed anyway)."""
        next_due = None if self._throttled else self.next_due_ms()
        if next_due is None:
            return self._max_poll_s
        return max(0.0, min(self._max_poll_s, (next_due - now) / 1000.0))

    def poll_due(self, max_records: int = 500, timeout: float | None = None) -> list[Message]:
        """Due records in partition order; errors other than partition EOF are raised."""
        runs = self.poll_runs(max_records, timeout)
        if len(runs) == 1:
            return runs[0].messages
        return [msg for run in runs for msg in run.messages]

    def poll_runs(self, max_records: int = 500, timeout: float | None = None) -> list[Run]:
        """Due records as runs of one partition each; errors other than partition EOF are raised.

        For a delayed topic, records are taken from librdkafka's queue :data:`CONSUME_CHUNK` at
        a time: once a partition is held, pausing it drops the rest of it from the queue inside
        librdkafka (verified), so the records fetched behind a head that is not due never become
        Python objects. In make bench R3 each resume refetches a partition's whole waiting
        window, and taking 1,000 at a time built ~28 messages for every one released.
        """
        now = self._clock()
        self._resume_due(now)
        if self._throttled:
            # Partitions assigned since throttling began must respect back-pressure too.
            self.consumer.pause([TopicPartition(t, p) for t, p in self.assigned])
        wait = self.poll_timeout(now) if timeout is None else min(timeout, self.poll_timeout(now))
        if self._due_of is None and self._due_of_headers is None:
            return self._take(self._split(self._fetch(max_records, wait)))
        chunk = self._fetch(min(max_records, CONSUME_CHUNK), wait)
        runs: list[Run] = []
        stopped: set[TP] = set()
        count = 0
        # Bounded even if every record of every chunk is skipped.
        budget = 2 * max_records
        while chunk:
            budget -= len(chunk)
            count += self._examine(chunk, runs, stopped)
            room = max_records - count
            if room <= 0 or budget <= 0:
                break
            chunk = self.consumer.consume(min(room, CONSUME_CHUNK), 0)
        return self._take(runs)

    def _take(self, runs: list[Run]) -> list[Run]:
        """Note how far each partition was handed out (:meth:`snapshot`)."""
        if runs:
            with self._lock:
                for run in runs:
                    if run.tp in self._assigned:
                        self._taken[run.tp] = (run.messages[-1].offset() or 0) + 1
                    self._resumed.pop(run.tp, None)
        return runs

    def _error(self, msg: Message) -> None:
        err = msg.error()
        assert err is not None
        if err.fatal():
            raise KafkaException(err)
        if err.code() != KafkaError._PARTITION_EOF:
            # Transient or informational (a topic not created yet, a broker restarting):
            # librdkafka recovers by itself, and the stage must keep turning.
            log.warning(
                "consumer error",
                extra={"fields": {"code": err.name(), "retriable": err.retriable()}},
            )

    def _split(self, messages: list[Message]) -> list[Run]:
        """A topic read at once: every record is handed out, in runs of one partition.

        Per record only what cannot be skipped: its error and its partition (and its topic if
        several are read). Holds and assignments are checked once per run: a partition held
        (ingest backs one off while the Schema Registry is unreachable) or revoked has its
        fetched records dropped inside librdkafka, so a run of it can only come from the same
        batch as the hold.
        """
        runs: list[Run] = []
        start = 0
        part = -1
        topic = ""
        by_topic = self._topics > 1
        for i, msg in enumerate(messages):
            if msg.error() is not None:
                if i > start:
                    runs.append(Run((topic, part), messages[start:i], None))
                self._error(msg)
                start = i + 1
                part = -1
                continue
            p = msg.partition()
            if p != part or (by_topic and msg.topic() != topic):
                if i > start:
                    runs.append(Run((topic, part), messages[start:i], None))
                start = i
                part = p if p is not None else 0
                topic = msg.topic() or ""
        if start < len(messages):
            runs.append(Run((topic, part), messages[start:] if start else messages, None))
        if runs:
            with self._lock:
                if self._held or any(run.tp not in self._assigned for run in runs):
                    # Raced with a rebalance or a hold: skip, the seek rewinds it.
                    runs = [r for r in runs if r.tp in self._assigned and r.tp not in self._held]
        return runs

    def _examine(self, messages: list[Message], runs: list[Run], stopped: set[TP]) -> int:
        """Hand out the due records of ``messages``; hold each partition at its first one not due.

        Appends them to ``runs`` (extending the last run if it is of the same partition) and
        returns how many. The clock is read again before holding: a record that became due
        while the records before it were examined (or while the loop was busy) is handed out,
        not sent round a pause, seek and refetch.
        """
        now = self._clock()
        due_of, due_of_headers = self._due_of, self._due_of_headers
        count = 0
        # The partition whose hold and assignment were last checked: a partition changes
        # state only in a hold made here (and then it is in ``stopped``), or in a rebalance
        # (only inside ``consume``, between two calls of this method).
        checked: TP | None = None
        headers: RawHeaders = None
        for msg in messages:
            if msg.error() is not None:
                self._error(msg)
                continue
            tp = (msg.topic() or "", msg.partition() or 0)
            if tp in stopped:
                # Fetched behind a record that is not due: it will be fetched again.
                continue
            if tp != checked:
                if tp in self._held or tp not in self._assigned:
                    # Raced with a rebalance or a hold: skip, the seek rewinds it.
                    stopped.add(tp)
                    continue
                checked = tp
            if due_of_headers is not None:
                headers = msg.headers()
                due = due_of_headers(headers)
            else:
                assert due_of is not None
                due = due_of(msg)
            if due > now:
                now = self._clock()
            if due > now:
                stopped.add(tp)
                offset = msg.offset()
                assert offset is not None
                self.hold(tp[0], tp[1], offset, due)
                continue
            if runs and runs[-1].tp == tp:
                run = runs[-1]
            else:
                run = Run(tp, [], [], [] if due_of_headers is not None else None)
                runs.append(run)
            run.messages.append(msg)
            assert run.dues is not None
            run.dues.append(due)
            if run.headers is not None:
                run.headers.append(headers)
            count += 1
        return count

    def _fetch(self, max_records: int, wait: float) -> list[Message]:
        """Up to ``max_records``, returning as soon as one is there.

        ``consume(n, timeout)`` alone blocks until it has ``n`` records or the timeout passes
        (verified: 1 record and a 2 s timeout return after 2 s), which would add the whole poll
        timeout to every release. So: take what is already fetched; if nothing, wait for the
        first record with ``poll`` and then take what arrived with it.
        """
        messages = self.consumer.consume(max_records, 0)
        if messages:
            return messages
        first = self.consumer.poll(wait)
        if first is None:
            return []
        return [first, *self.consumer.consume(max_records - 1, 0)] if max_records > 1 else [first]

    def close(self) -> None:
        self.consumer.close()
