"""R1's baseline: a plain confluent-kafka consume → produce copy, run as its own process.

    python -m bench.passthrough --config FILE --source TOPIC --target TOPIC --group GROUP

Same librdkafka settings as the stages (:func:`consumer.clients.consumer_config` and
:func:`consumer.clients.producer_config` of the same configuration file: idempotent producer,
acks=all, lz4, linger 5 ms, manual offset store), same batch size as ingest (1000), same
key and value bytes copied, no decoding. What it does *not* do is what ingest adds on purpose:
decode, validate, project, encode, and wait for every acknowledgement of a batch before
storing its offsets (the copy stores offsets as it goes and flushes only at the end).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from confluent_kafka import Consumer, Producer, TopicPartition

from consumer.clients import consumer_config, producer_config
from consumer.config import load_settings

BATCH = 1000


def copy(consumer: Consumer, producer: Producer, target: str, stop: threading.Event) -> None:
    while not stop.is_set():
        messages = consumer.consume(BATCH, 0.5)
        last: dict[tuple[str, int], int] = {}
        for msg in messages:
            if msg.error() is not None:
                continue
            while True:
                try:
                    producer.produce(target, value=msg.value(), key=msg.key())
                    break
                except BufferError:
                    producer.poll(0.1)
            last[(msg.topic() or "", msg.partition() or 0)] = msg.offset() or 0
        producer.poll(0)
        if last:
            consumer.store_offsets(
                offsets=[TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.passthrough")
    parser.add_argument("--config", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--group", required=True)
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    consumer = Consumer(consumer_config(settings, args.group))
    producer = Producer(producer_config(settings))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    consumer.subscribe([args.source])
    try:
        copy(consumer, producer, args.target, stop)
    finally:
        producer.flush(10)
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
