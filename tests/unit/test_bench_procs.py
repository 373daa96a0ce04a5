"""The benchmark's CPU shares: what ``make bench`` prints next to every rate (and the broker's
share, sampled by pid) must be the process's own CPU time over the measured interval."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.procs import Sampled, parse_buckets, quantile_bound


def test_cpu_share_of_a_process_by_pid_matches_its_cpu_time() -> None:
    me = Sampled("self", os.getpid(), threads=False)
    me.sample()
    start_wall, start_cpu = time.time(), time.process_time()
    # Busy until the process has used 0.3 s of CPU: the share is then high but not fixed.
    while time.process_time() - start_cpu < 0.3:
        sum(range(1000))
    me.sample()
    end_wall, end_cpu = time.time(), time.process_time()
    expected = (end_cpu - start_cpu) / (end_wall - start_wall)
    share = me.cpu_share(int(me.samples[0][0] * 1000), int(me.samples[-1][0] * 1000))
    assert share is not None
    # /proc counts in clock ticks (10 ms): 0.3 s of CPU is known to within a few ticks.
    assert abs(share - expected) < 0.15
    assert me.thread_samples == []  # threads=False: the per-task scan is skipped


def test_time_spent_waiting_for_a_core_is_counted_per_thread() -> None:
    # This process and a busy child share one core, so each waits for it about half the time.
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    busy = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"]
    )
    try:
        os.sched_setaffinity(0, {cpu})
        me = Sampled("self", os.getpid())
        name = Path("/proc/self/comm").read_text().strip()
        me.sample()
        start_cpu = time.process_time()
        while time.process_time() - start_cpu < 0.3:
            sum(range(1000))
        me.sample()
    finally:
        os.sched_setaffinity(0, before)
        busy.kill()
        busy.wait()
    start, end = int(me.samples[0][0] * 1000), int(me.samples[-1][0] * 1000)
    waited = me.thread_waits(start, end).get(name, 0.0)
    ran = me.thread_shares(start, end).get(name, 0.0)
    assert 0.2 < waited < 1.0, (waited, ran)
    assert 0.2 < ran < 0.9, (waited, ran)


def test_an_unknown_pid_gives_no_share_rather_than_an_error() -> None:
    gone = Sampled("gone", 2**22 + 12345)
    gone.sample()
    gone.sample()
    assert gone.samples == []
    assert gone.cpu_share(0, 1000) is None


_METRICS = """\
# HELP auto_trace_lateness_seconds The T+X promise
# TYPE auto_trace_lateness_seconds histogram
auto_trace_lateness_seconds_bucket{adapter="",le="0.01",stage="release"} 40.0
auto_trace_lateness_seconds_bucket{adapter="",le="0.1",stage="release"} 98.0
auto_trace_lateness_seconds_bucket{adapter="",le="+Inf",stage="release"} 100.0
auto_trace_lateness_seconds_bucket{adapter="hook",le="0.01",stage="sink"} 1.0
auto_trace_lateness_seconds_bucket{adapter="hook",le="0.1",stage="sink"} 1.0
auto_trace_lateness_seconds_bucket{adapter="hook",le="+Inf",stage="sink"} 1.0
auto_trace_lateness_seconds_count{adapter="",stage="release"} 100.0
"""


def test_parse_buckets_reads_one_stage_of_a_histogram() -> None:
    assert parse_buckets(_METRICS, "auto_trace_lateness_seconds", 'stage="release"') == {
        0.01: 40.0,
        0.1: 98.0,
        float("inf"): 100.0,
    }
    everything = parse_buckets(_METRICS, "auto_trace_lateness_seconds")
    assert everything[float("inf")] == 101.0
    assert parse_buckets(_METRICS, "auto_trace_other") == {}


def test_quantile_bound_counts_only_what_was_observed_between_two_readings() -> None:
    before = {0.01: 40.0, 0.1: 98.0, float("inf"): 100.0}
    # Since then: 10 more within 10 ms, 80 more within 100 ms, 10 beyond.
    after = {0.01: 50.0, 0.1: 188.0, float("inf"): 200.0}
    assert quantile_bound(before, after, 0.1) == 0.01
    assert quantile_bound(before, after, 0.5) == 0.1
    assert quantile_bound(before, after, 0.94) == float("inf")
    # Read over the whole histogram instead, p94 would wrongly fall within 100 ms (188 of 200).
    assert quantile_bound({}, after, 0.94) == 0.1
    assert quantile_bound(after, after, 0.5) is None


def test_a_profile_asked_for_without_py_spy_stops_the_run_before_it_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import bench.run

    monkeypatch.setenv("BENCH_PROFILE", "/tmp/profiles")
    monkeypatch.setattr(bench.run, "py_spy", lambda: None)

    def no_broker() -> None:
        raise AssertionError("the broker was started")

    monkeypatch.setattr(bench.run, "kafka_cluster", no_broker)
    assert bench.run.main([]) == 2
    assert "pip install py-spy" in capsys.readouterr().err
