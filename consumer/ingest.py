"""Ingest: ``trade.closed`` → validated, PII-free TraceRecord → the delay topic.

Anything that cannot be decoded or validated goes to the ingest DLQ with the raw bytes and a
reason, and the stage moves on: a bad record never stops or stalls a partition. The due time
(``close_time + window``) travels in a header so release never has to decode the body.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from confluent_kafka import Message

from consumer import headers as h
from consumer.clients import MAX_MESSAGE_BYTES
from consumer.config import Settings
from consumer.decode import Decoder, JsonDecoder, RegistryUnavailable, make_decoder
from consumer.delayed import DelayedConsumer, Run, now_ms
from consumer.errors import DecodeError, InputError, InvalidRecord
from consumer.health import Health
from consumer.log import get_logger
from consumer.metrics import Metrics
from consumer.native import FastPath, choose_fast_path
from consumer.records import encode_trace
from consumer.stage import LoopStage, Output, Pipeline
from consumer.topics import delay_topic, ingest_dlq_topic
from consumer.trade import epoch_ms, project, record_key, validate_not_future

log = get_logger("ingest")

#: How long a partition waits before trying the Schema Registry again.
REGISTRY_BACKOFF_MS = 2000


def _ms(value: timedelta) -> int:
    return int(value / timedelta(milliseconds=1))


def trace_headers(close_ms: int, window_ms: int) -> h.Headers:
    """The delay topic's headers, one builder for both paths so that they cannot drift apart.

    Only the due time, which release must read without decoding the record. The trade id is in
    the record; the sink adds it as a header only to what it sends to a retry tier or the DLQ,
    where ``auto-trace dlq`` filters on it. A header on every record cost ingest's produce()
    ~0.19 µs a record (0.84 against 1.03 µs with two), release one more copy.
    """
    return [(h.DUE_MS, b"%d" % (close_ms + window_ms))]


#: Raw JSON and now (epoch ms) → what ingest produces to the delay topic: value, key, headers;
#: or None, "let pydantic decide".
Traced = Callable[[bytes, int], "tuple[bytes, bytes, h.Headers] | None"]


def traced_path(fast: FastPath | None, window_ms: int) -> Traced | None:
    """The fast path with the delay topic's headers: the native module's own ``traced`` when it
    was built for this window (headers built in Python cost ~0.4 µs a record more, measured
    when there were three), else the fast path's record and :func:`trace_headers`."""
    if fast is None:
        return None
    native: Traced | None = getattr(fast, "traced", None)
    if native is not None and getattr(fast, "window_ms", None) == window_ms:
        return native

    def traced(raw: bytes, now: int) -> tuple[bytes, bytes, h.Headers] | None:
        result = fast(raw, now)
        if result is None:
            return None
        value, key, close_ms, _ = result
        return value, key, trace_headers(close_ms, window_ms)

    return traced


class IngestStage(LoopStage):
    name = "ingest"

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        health: Health,
        *,
        decoder: Decoder | None = None,
        batch_size: int = 1000,
    ) -> None:
        super().__init__(settings, metrics, health)
        self.group = settings.input.group
        self.topic = settings.input.topic
        self.max_poll_s = 0.5
        self.decoder = decoder if decoder is not None else make_decoder(settings.input)
        self.window_ms = _ms(settings.delay.window)
        # Exactly JsonDecoder: a subclass may parse differently, and the fast path must agree
        # with the decoder it stands in for.
        self.fast_path = None
        self.fast_path_name = "off"
        if type(self.decoder) is JsonDecoder:
            self.fast_path_name, self.fast_path = choose_fast_path(
                settings.input.fast_path,
                max_bytes=self.decoder.max_bytes,
                skew_ms=_ms(settings.delay.max_clock_skew),
                window_ms=self.window_ms,
            )
        self.batch_size = batch_size
        self.skew_ms = _ms(settings.delay.max_clock_skew)
        self.delay_topic = delay_topic(settings)
        self.dlq_topic = ingest_dlq_topic(settings)
        reasons = [DecodeError.reason_class, InvalidRecord.reason_class]
        metrics.init_stage(self.name, [self.delay_topic, self.dlq_topic], reasons)

    @property
    def fast_path(self) -> FastPath | None:
        """Public so that benchmarks and tests can switch it off (None) or swap it."""
        return self._fast_path

    @fast_path.setter
    def fast_path(self, fast: FastPath | None) -> None:
        self._fast_path = fast
        self._traced = traced_path(fast, self.window_ms)

    def _started(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "format": self.settings.input.format,
            "fast_path": self.fast_path_name,
        }

    def _handle(self, consumer: DelayedConsumer, out: Pipeline, runs: list[Run]) -> None:
        """The hot loop: per record only the fast path and ``produce()``.

        Everything else is per run (a partition's consecutive records of the batch): its
        partition, its acknowledgement counter (:class:`~consumer.stage.InFlight`), its
        offsets. ``produce()`` is called here with the run as the callback, with positional
        arguments when the process checked that they mean what they say
        (:attr:`Pipeline.positional`); a full local queue (``BufferError``) goes the slow way
        round, through :meth:`Pipeline.produce`.
        """
        now = now_ms()
        traced = self._traced
        produce, positional = out.producer.produce, out.positional
        topic, dlq = self.delay_topic, self.dlq_topic
        count = 0
        for tp, messages, _, _ in runs:
            run = out.open(tp)
            taken = dead = 0
            for msg in messages:
                raw = msg.value()
                result = traced(raw, now) if traced is not None and raw is not None else None
                if result is not None:
                    value, key, headers = result
                    try:
                        if positional:
                            produce(topic, value, key, -1, run, None, 0, headers)
                        else:
                            produce(topic, value, key, headers=headers, on_delivery=run)
                    except BufferError:
                        out.produce(topic, value, key, headers, run)
                else:
                    try:
                        output = self._slow(msg, now)
                    except RegistryUnavailable:
                        # Not the record's fault: hold the partition and try it again later;
                        # the rest of its run is fetched again after the hold.
                        self._back_off(consumer, msg)
                        break
                    out.produce(*output, run)
                    if output[0] == dlq:
                        dead += 1
                taken += 1
            if taken:
                first, last = messages[0].offset(), messages[taken - 1].offset()
                assert first is not None and last is not None
                outputs = {topic: taken - dead, dlq: dead} if dead else {topic: taken}
                out.close(run, first, last, taken, outputs)
            count += len(messages)
        self.metrics.records_in.labels(self.name).inc(count)
        # Acknowledgements that already arrived store their offsets now.
        out.settle()

    def _back_off(self, consumer: DelayedConsumer, msg: Message) -> None:
        tp = (msg.topic() or "", msg.partition() or 0)
        offset = msg.offset()
        assert offset is not None
        log.warning(
            "schema registry unavailable; holding partition",
            extra={"fields": {"topic": tp[0], "partition": tp[1], "offset": offset}},
        )
        consumer.hold(tp[0], tp[1], offset, now_ms() + REGISTRY_BACKOFF_MS)

    def _one(self, msg: Message, now: int) -> Output:
        """The record's one output: to the delay topic, or to the ingest DLQ with a reason.

        What :meth:`_handle` does for one record, in one call (the benchmarks and tests).
        """
        raw = msg.value()
        if self._traced is not None and raw is not None:
            fast = self._traced(raw, now)
            if fast is not None:
                return (self.delay_topic, *fast)
        return self._slow(msg, now)

    def _slow(self, msg: Message, now: int) -> Output:
        """Anything the fast path declined: the pydantic path decides, and words any rejection."""
        raw = msg.value()
        try:
            trade = self.decoder.decode(raw)
            validate_not_future(trade, now, self.skew_ms)
            record = project(trade)
        except InputError as exc:
            return self._dead_letter(msg, exc)
        close_ms = epoch_ms(record["close_time"])
        return (
            self.delay_topic,
            encode_trace(record),
            record_key(trade),
            trace_headers(close_ms, self.window_ms),
        )

    def _dead_letter(self, msg: Message, exc: InputError) -> Output:
        raw = msg.value() or b""
        extra: list[tuple[str, str | int]] = [
            (h.ERROR_CLASS, type(exc).__name__),
            (h.REASON, str(exc)[:500]),
            (h.SOURCE_TOPIC, msg.topic() or ""),
            (h.SOURCE_PARTITION, msg.partition() or 0),
            (h.SOURCE_OFFSET, msg.offset() or 0),
            (h.FAILED_AT_MS, int(time.time() * 1000)),
        ]
        if len(raw) > MAX_MESSAGE_BYTES:
            # Larger than any topic here accepts: keep the head, say how much there was.
            extra.append(("auto-trace-original-size", len(raw)))
            raw = raw[:MAX_MESSAGE_BYTES]
        self.metrics.ingest_dead_letters.labels(exc.reason_class).inc()
        self.metrics.records_failed.labels(self.name).inc()
        log.info(
            "input record dead-lettered",
            extra={
                "fields": {
                    "topic": msg.topic(),
                    "partition": msg.partition(),
                    "offset": msg.offset(),
                    "error_class": type(exc).__name__,
                    "reason": str(exc)[:200],
                }
            },
        )
        return (self.dlq_topic, raw, msg.key(), h.replace(msg.headers(), extra))
