"""The sink engine's own cost per record, in one process: ``python -m bench.sink_micro``.

R4 says how far the sink worker is from a raw HTTP client, not where the difference goes. This
runs the real :class:`~consumer.sink.SinkWorker` on the local broker twice over the same
pre-loaded records: once with an adapter that does nothing (what is left is the engine and the
Kafka client: consume, decode, schedule, store offsets) and once with the webhook adapter
against :mod:`bench.server` (the whole path); ``retry`` is the webhook again with every first
attempt answered 503 and retried through a 200 ms tier (R6's path). Each line is CPU time of
this process per record and the wall-clock rate; the ratio of the null and webhook figures is
how much of a delivery the engine is. Knobs: ``--records``, ``--rounds``, ``--only``.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from bench import data
from bench.kafka import fast_producer, preload
from consumer.adapters.base import Adapter, Delivery
from consumer.broker import kafka_cluster
from consumer.config import Settings, load_settings
from consumer.delayed import now_ms
from consumer.health import Health
from consumer.metrics import Metrics
from consumer.sink import SinkWorker
from consumer.topics import create_topics, sink_topic

_SECRET_ENV = "BENCH_SINK_MICRO_SECRET"
#: Per-thread CPU per record after each run (``--threads``).
VERBOSE = False


class NullAdapter(Adapter):
    """Delivers instantly: isolates the engine's cost."""

    async def deliver(self, delivery: Delivery) -> None:
        return None


def _settings(bootstrap: str, url: str, max_in_flight: int, *, retry: bool = False) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return load_settings(
        None,
        kafka={"bootstrap_servers": bootstrap},
        input={"topic": f"micro-{tag}.in", "group": f"micro-{tag}-ingest"},
        topics={"prefix": f"micro-{tag}", "partitions": 6, "replication_factor": 1},
        delay={"window": "0s", "group": f"micro-{tag}-release"},
        metrics={"port": 0},
        sink={"max_in_flight": max_in_flight},
        retry={"tiers": ["200ms"]},
        adapters=[
            {
                "name": "a",
                "type": "webhook",
                "url": url,
                "secrets": [{"env": _SECRET_ENV}],
                "concurrency": 16,
                # Every record fails once by design: not an outage (as in make bench R6).
                **({"circuit": {"failure_threshold": 1_000_000}} if retry else {}),
            }
        ],
    )


def _thread_ticks() -> dict[str, tuple[int, int]]:
    """User and system clock ticks per thread name (librdkafka names its threads rdk:*)."""
    out: dict[str, tuple[int, int]] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user, system = out.get(name, (0, 0))
        out[name] = (user + int(fields[11]), system + int(fields[12]))
    return out


def _run_once(settings: Settings, adapter: Adapter | None, count: int) -> tuple[float, float]:
    metrics = Metrics(CollectorRegistry())
    worker = SinkWorker(settings, settings.adapters[0], metrics, Health(), adapter=adapter)
    delivered = metrics.deliveries.labels("a", "delivered")
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    cpu, wall = time.process_time(), time.perf_counter()
    thread.start()
    deadline = time.monotonic() + 300
    first: tuple[float, float] | None = None
    ticks: dict[str, tuple[int, int]] = {}
    while delivered._value.get() < count:
        if first is None and delivered._value.get() > 0:
            # Start the clock at the first delivery: group join is not the engine's cost.
            first = (time.process_time(), time.perf_counter())
            ticks = _thread_ticks()
        if time.monotonic() > deadline:
            raise SystemExit("sink_micro: deliveries did not complete in 300 s")
        time.sleep(0.01)
    end = (time.process_time(), time.perf_counter())
    if first is not None and VERBOSE:
        after = _thread_ticks()
        hz = os.sysconf("SC_CLK_TCK")
        for name, (user, system) in sorted(after.items()):
            u0, s0 = ticks.get(name, (0, 0))
            per = 1e6 / hz / count
            user_us, system_us = (user - u0) * per, (system - s0) * per
            print(f"    {name:16s} user {user_us:6.0f} µs sys {system_us:6.0f} µs")
    stop.set()
    thread.join(30)
    start = first or (cpu, wall)
    return (end[0] - start[0]) / count * 1e6, count / (end[1] - start[1])


def _reset(port: int, *, fail_first: bool) -> None:
    flag = int(fail_first)
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(
            f"POST /reset?fail_first={flag} HTTP/1.1\r\nContent-Length: 0\r\n\r\n".encode()
        )
        conn.recv(1024)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sink_micro")
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-in-flight", type=int, default=2000)
    parser.add_argument("--threads", action="store_true", help="CPU per record per thread")
    parser.add_argument("--only", choices=["null", "webhook", "retry"], help="run one of them")
    args = parser.parse_args(argv)
    global VERBOSE
    VERBOSE = args.threads
    os.environ[_SECRET_ENV] = "whsec_" + base64.b64encode(b"bench-sink-micro-key!").decode()
    server = subprocess.Popen([sys.executable, "-m", "bench.server"], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().decode().strip().split("=")[1])
        url = f"http://127.0.0.1:{port}/hook"
        close = now_ms() - 3_600_000
        pool = data.trade_pool(close)
        rng = random.Random(5)
        records = [
            data.trace_record(data.to_json(data.trade(pool, i, close + i, rng)))
            for i in range(args.records)
        ]
        with kafka_cluster() as cluster:
            results: dict[str, list[tuple[float, float]]] = {
                "null": [],
                "webhook": [],
                "retry": [],
            }
            for _ in range(args.rounds):
                for name in [args.only] if args.only else ["null", "webhook"]:
                    _reset(port, fail_first=name == "retry")
                    settings = _settings(
                        cluster.bootstrap_servers, url, args.max_in_flight, retry=name == "retry"
                    )
                    create_topics(settings)
                    preload(
                        fast_producer(cluster.bootstrap_servers),
                        sink_topic(settings, "a"),
                        records,
                    )
                    adapter: Any = NullAdapter("a") if name == "null" else None
                    results[name].append(_run_once(settings, adapter, len(records)))
            for name, runs in results.items():
                if not runs:
                    continue
                text = ", ".join(f"{cpu:.0f} µs cpu/record at {rate:,.0f}/s" for cpu, rate in runs)
                print(f"{name:8s} {text}")
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
