"""The benchmark's CPU shares: what ``make bench`` prints next to every rate (and the broker's
share, sampled by pid) must be the process's own CPU time over the measured interval."""

from __future__ import annotations

import os
import time

from bench.procs import Sampled


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


def test_an_unknown_pid_gives_no_share_rather_than_an_error() -> None:
    gone = Sampled("gone", 2**22 + 12345)
    gone.sample()
    gone.sample()
    assert gone.samples == []
    assert gone.cpu_share(0, 1000) is None
