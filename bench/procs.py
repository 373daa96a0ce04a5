"""Processes of the benchmark: stages (``python -m consumer run``), the passthrough copy, the
receiver and the raw HTTP clients, each in its own process so none shares another's GIL.

Each process's CPU time is sampled from ``/proc/<pid>/stat`` while the benchmark waits, so a
rate can be shown next to how busy each process was during exactly the measured interval
(a process at ~100 % of a core is CPU-bound: its profile says where the time goes).

``BENCH_PROFILE=DIR`` attaches ``py-spy record`` to every stage process and writes collapsed
stacks (``DIR/<name>.txt``, py-spy's raw format) for a flame graph or a ``sort | head``.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(stat: Path) -> float | None:
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime: fields 14 and 15 of stat(5), here 11 and 12 after "pid (comm)".
    return (int(fields[11]) + int(fields[12])) / _TICK


def _waited(schedstat: Path) -> float | None:
    """Seconds the task was runnable but waiting for a core (schedstat's second field, in ns):
    on two shared cores, how much of a stage's slowness was other work holding the CPU."""
    try:
        return int(schedstat.read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def py_spy() -> str | None:
    """The py-spy executable (``BENCH_PROFILE``): on the PATH or next to this Python."""
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Sampled:
    """CPU samples of one process by pid: a child of the benchmark, or the local broker."""

    def __init__(self, name: str, pid: int, *, threads: bool = True) -> None:
        self.name = name
        self._pid = pid
        #: Per-thread samples read every task of the process: off for the broker's JVM, whose
        #: hundred-odd threads would make the benchmark's own sampling a load of its own.
        self._threads = threads
        self.samples: list[tuple[float, float]] = []
        #: Time, then per thread name (librdkafka names its threads rdk:main, rdk:broker1, ...)
        #: CPU seconds, and seconds spent runnable but waiting for a core.
        self.thread_samples: list[tuple[float, dict[str, float], dict[str, float]]] = []

    @property
    def pid(self) -> int:
        return self._pid

    def check(self) -> None:
        """Raise if the process died (only the benchmark's own children are checked)."""

    def cpu_seconds(self) -> float | None:
        return _cpu(Path(f"/proc/{self.pid}/stat"))

    def thread_cpu(self) -> tuple[dict[str, float], dict[str, float]]:
        """CPU seconds and seconds waiting for a core, per thread name (threads of one name
        summed)."""
        out: dict[str, float] = {}
        waits: dict[str, float] = {}
        try:
            tasks = list(Path(f"/proc/{self.pid}/task").iterdir())
        except OSError:
            return out, waits
        for task in tasks:
            try:
                name = (task / "comm").read_text().strip()
            except OSError:
                continue
            cpu = _cpu(task / "stat")
            if cpu is not None:
                out[name] = out.get(name, 0.0) + cpu
            waited = _waited(task / "schedstat")
            if waited is not None:
                waits[name] = waits.get(name, 0.0) + waited
        return out, waits

    def peak_rss_kib(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def sample(self) -> None:
        cpu = self.cpu_seconds()
        if cpu is not None:
            now = time.time()
            self.samples.append((now, cpu))
            if self._threads:
                self.thread_samples.append((now, *self.thread_cpu()))

    def thread_shares(self, start_ms: int, end_ms: int) -> dict[str, float]:
        """Share of a core per thread name between the samples nearest the two times."""
        return self._shares(start_ms, end_ms, waits=False)

    def thread_waits(self, start_ms: int, end_ms: int) -> dict[str, float]:
        """Per thread name, the share of the same interval spent runnable, waiting for a core."""
        return self._shares(start_ms, end_ms, waits=True)

    def _shares(self, start_ms: int, end_ms: int, *, waits: bool) -> dict[str, float]:
        if len(self.thread_samples) < 2 or end_ms <= start_ms:
            return {}
        times = [sample[0] for sample in self.thread_samples]
        i = min(bisect.bisect_left(times, start_ms / 1000), len(times) - 2)
        j = max(bisect.bisect_left(times, end_ms / 1000), i + 1)
        j = min(j, len(times) - 1)
        first, last = self.thread_samples[i], self.thread_samples[j]
        a, b = (first[2], last[2]) if waits else (first[1], last[1])
        span = max(0.001, times[j] - times[i])
        shares = {name: (cpu - a.get(name, 0.0)) / span for name, cpu in b.items()}
        return {n: s for n, s in sorted(shares.items(), key=lambda x: -x[1]) if s >= 0.005}

    def cpu_share(self, start_ms: int, end_ms: int) -> float | None:
        """Share of one core this process used between two epoch-ms times (interpolated)."""
        if len(self.samples) < 2 or end_ms <= start_ms:
            return None
        times = [t for t, _ in self.samples]

        def at(t: float) -> float:
            i = bisect.bisect_left(times, t)
            if i <= 0:
                return self.samples[0][1]
            if i >= len(times):
                return self.samples[-1][1]
            (t0, c0), (t1, c1) = self.samples[i - 1], self.samples[i]
            return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.0)

        start, end = start_ms / 1000, end_ms / 1000
        return (at(end) - at(start)) / (end - start)


class Proc(Sampled):
    """A child process with its output in a log file, CPU samples, and a clean stop."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        logs: Path,
        env: dict[str, str] | None = None,
        *,
        profile: bool = False,
        stdout: bool = False,
    ) -> None:
        self.log_path = logs / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout else log,
                stderr=log,
                env={**os.environ, **(env or {})},
            )
        super().__init__(name, self.popen.pid)
        self.spy: subprocess.Popen[bytes] | None = None
        out_dir = os.environ.get("BENCH_PROFILE")
        spy = py_spy()
        if profile and out_dir and spy is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            # --idle: also the time threads spend waiting, so a blocking call shows up.
            idle = ["--idle"] if os.environ.get("BENCH_PROFILE_IDLE") else []
            # --gil: only the thread holding the GIL, i.e. Python CPU (by default a thread
            # waiting for the GIL counts as busy where it waits: FACTS.md).
            idle += ["--gil"] if os.environ.get("BENCH_PROFILE_GIL") else []
            self.spy = subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(self.pid),
                    "--format",
                    "raw",
                    "--rate",
                    "200",
                    "--nonblocking",
                    *idle,
                    "-o",
                    str(Path(out_dir) / f"{name}.txt"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        self.sample()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> None:
        if not self.alive():
            raise RuntimeError(
                f"{self.name} exited with {self.popen.returncode}:\n{_tail(self.log_path)}"
            )

    def stop(self, timeout: float = 30) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        if self.spy is not None:
            try:
                self.spy.wait(10)
            except subprocess.TimeoutExpired:
                self.spy.send_signal(signal.SIGINT)
                self.spy.wait(10)


class Stage(Proc):
    """``python -m consumer run --role ROLE`` with its own configuration file and metrics port."""

    def __init__(
        self,
        name: str,
        role: str,
        config: dict[str, Any],
        logs: Path,
        env: dict[str, str],
        adapter: str | None = None,
    ) -> None:
        self.port = free_port()
        config = {**config, "metrics": {"host": "127.0.0.1", "port": self.port}}
        path = logs / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        command = [sys.executable, "-m", "consumer", "run", "--role", role, "--config", str(path)]
        if adapter is not None:
            command += ["--adapter", adapter]
        super().__init__(name, command, logs, env, profile=True)

    def _get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), ""
        except OSError:
            return 0, ""

    def ready(self) -> bool:
        return self._get("/readyz")[0] == 200

    def metric(self, name: str) -> float | None:
        """The sum of every sample of one metric family on ``/metrics``."""
        status, text = self._get("/metrics")
        if status != 200:
            return None
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith(name) and line[len(name)] in " {":
                total += float(line.rsplit(" ", 1)[1])
                found = True
        return total if found else None

    def buckets(self, name: str, match: str = "") -> dict[float, float]:
        """A histogram of ``/metrics`` (see :func:`parse_buckets`); empty if it cannot be read."""
        status, text = self._get("/metrics")
        return parse_buckets(text, name, match) if status == 200 else {}


def parse_buckets(text: str, name: str, match: str = "") -> dict[float, float]:
    """A histogram's cumulative bucket counts by upper bound (``+Inf`` as infinity), summed over
    the samples whose labels contain ``match``, from Prometheus text."""
    out: dict[float, float] = {}
    prefix = f"{name}_bucket{{"
    for line in text.splitlines():
        if line.startswith(prefix) and match in line:
            labels, value = line.rsplit(" ", 1)
            bound = labels.split('le="', 1)[1].split('"', 1)[0]
            key = float("inf") if bound == "+Inf" else float(bound)
            out[key] = out.get(key, 0.0) + float(value)
    return out


def quantile_bound(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` of what was observed between two
    readings of a histogram (None if nothing was)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    for bound, count in zip(bounds, counts, strict=True):
        if count >= q * counts[-1]:
            return bound
    return None


def wait_until(
    condition: Callable[[], bool],
    procs: Sequence[Sampled],
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> None:
    """Poll ``condition``, sampling every process's CPU and failing fast if one died."""
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            proc.sample()
            proc.check()
        if condition():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Receiver(Proc):
    """``python -m bench.server``; reads its port from the first line it prints."""

    def __init__(self, logs: Path) -> None:
        super().__init__(
            "receiver", [sys.executable, "-m", "bench.server"], logs, stdout=True, profile=True
        )
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline().decode().strip()
        if not line.startswith("port="):
            self.stop()
            raise RuntimeError(f"the receiver did not start: {_tail(self.log_path)}")
        self.port = int(line.split("=", 1)[1])
        self.url = f"http://127.0.0.1:{self.port}/webhook"

    def _call(self, method: str, path: str) -> dict[str, Any]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        with urllib.request.urlopen(request, timeout=10) as r:
            result: dict[str, Any] = json.loads(r.read())
            return result

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/stats")

    def reset(self, fail_first: bool = False) -> None:
        self._call("POST", f"/reset?fail_first={int(fail_first)}")
