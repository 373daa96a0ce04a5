"""The child processes of a chaos run: pipeline stages and webhook receivers.

Each child writes its stderr (and, for a stage, its whole output) to a log file that survives
its restarts, each start marked by a ``==== chaos:`` line. A child killed on purpose is
expected to be dead; one that exits on its own is an *unexpected exit*, which the run records,
reports and answers with a restart.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from random import SystemRandom

#: Where the repository (and so the ``consumer`` and ``chaos`` packages) lives.
REPO_ROOT = Path(__file__).resolve().parent.parent

#: Fixed ports are picked below Linux's ephemeral range (32768-60999 by default): a port the
#: kernel hands out for outgoing connections could be taken while its owner is down for a
#: restart, even by a client connecting to that very port (a TCP self-connect).
_PORT_RANGE = (20000, 32000)
_taken: set[int] = set()


def fixed_port() -> int:
    """A free loopback port outside the ephemeral range, never the same one twice."""
    pick = SystemRandom()
    for _ in range(1000):
        port = pick.randrange(*_PORT_RANGE)
        if port in _taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise RuntimeError("no free port found in 20000-32000")


def _preexec(core_dumps: bool) -> Callable[[], None] | None:
    """In the child before exec: SIGTERM it when this process dies, even by SIGKILL (Linux;
    main thread only, since the kernel signals when the *thread* that forked the child ends),
    and allow core dumps if asked."""
    prctl: Callable[[int, int], int] | None = None
    if sys.platform == "linux" and threading.current_thread() is threading.main_thread():
        with contextlib.suppress(OSError, AttributeError):
            prctl = ctypes.CDLL(None, use_errno=True).prctl
    if prctl is None and not core_dumps:
        return None

    def setup() -> None:
        if prctl is not None:
            prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if core_dumps:
            resource.setrlimit(
                resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
            )

    return setup


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without any ``AUTO_TRACE_*`` override (they would win over the chaos
    configuration file), with the repository importable whatever the child's working folder,
    Python's fault handler on (a crash in C code called from Python leaves the Python stacks
    in the log; one in a librdkafka thread needs ``--core-dumps`` and gdb), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AUTO_TRACE_")}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    env["PYTHONFAULTHANDLER"] = "1"
    env.update(extra)
    return env


#: librdkafka's reconnect attempts while the broker is down: hundreds of lines that would bury
#: the few that explain a crash.
_ROUTINE = re.compile(r"^%[0-9]\|[0-9.]+\|FAIL\|.*(Connection refused|Disconnected)")


def tail(path: Path, lines: int = 20, *, since: int = 0) -> str:
    """The last lines of a log from byte ``since`` on (the current incarnation's part),
    leaving out librdkafka's routine reconnect failures (counted instead)."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(since, path.stat().st_size - 256 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    kept = [line for line in text.rstrip().splitlines() if not _ROUTINE.match(line)]
    skipped = len(text.rstrip().splitlines()) - len(kept)
    note = [f"({skipped} librdkafka reconnect-failure lines left out)"] if skipped else []
    return "\n".join(note + kept[-lines:])


class Child:
    """A child process that can be started again, killed, and asked whether it died by itself."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str],
        *,
        stdout_path: Path | None = None,
        cwd: Path = REPO_ROOT,
        core_dumps: bool = False,
    ) -> None:
        self.name = name
        self.cwd = cwd
        self.core_dumps = core_dumps
        self.argv = list(argv)
        self.log_path = log_path
        self.stdout_path = stdout_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        #: Byte offset of the log where the current incarnation's output begins.
        self.log_start = 0
        self._termed = False

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.starts += 1
        self._termed = False
        with self.log_path.open("ab") as log:
            log.write(
                f"==== chaos: start #{self.starts} of {self.name} at "
                f"{time.strftime('%H:%M:%S')}\n".encode()
            )
            log.flush()
            self.log_start = log.tell()
            out = self.stdout_path.open("ab") if self.stdout_path is not None else None
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out if out is not None else log,
                    stderr=log,
                    env=self.env,
                    # Where a core dump lands, when they are enabled.
                    cwd=self.cwd,
                    # Its own session: a Ctrl-C in the terminal reaches only the chaos run,
                    # which then stops every child in order.
                    start_new_session=True,
                    preexec_fn=_preexec(self.core_dumps),
                )
            finally:
                if out is not None:
                    out.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def kill(self) -> None:
        """SIGKILL, as a crash or an evicted pod: no shutdown path runs."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def exited(self) -> int | None:
        """The exit status if the process ended although nobody stopped it, else None."""
        if self.proc is None:
            return None
        return self.proc.poll()

    def forget(self) -> None:
        """Drop a process that has ended (after :meth:`exited` reported it)."""
        self.proc = None

    def send_term(self) -> None:
        """SIGTERM without waiting (to stop several children at once); see :meth:`terminate`."""
        if self.proc is not None and self.proc.poll() is None and not self._termed:
            self.proc.send_signal(signal.SIGTERM)
            self._termed = True

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM and wait; the exit status, or None if it had to be killed after ``timeout``."""
        self.send_term()
        proc, self.proc = self.proc, None
        self._termed = False
        if proc is None:
            return None
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None


class Stage(Child):
    """``python -m consumer run --role ROLE`` with its own metrics port (fixed across restarts)."""

    def __init__(
        self,
        name: str,
        role: str,
        config: Path,
        logs: Path,
        env: dict[str, str],
        *,
        adapter: str | None = None,
        core_dumps: bool = False,
    ) -> None:
        self.metrics_port = fixed_port()
        argv = [sys.executable, "-m", "consumer", "run", "--role", role, "--config", str(config)]
        if adapter is not None:
            argv += ["--adapter", adapter]
        super().__init__(
            name,
            argv,
            logs / f"{name.replace(':', '-')}.log",
            {**env, "AUTO_TRACE_METRICS__PORT": str(self.metrics_port)},
            # A folder of its own: a core dump (``core`` in the working folder) of one stage
            # does not overwrite another's.
            cwd=logs.parent / "cwd" / name.replace(":", "-"),
            core_dumps=core_dumps,
        )
        self.cwd.mkdir(parents=True, exist_ok=True)

    def get(self, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
        """Status and body of ``GET path`` on the metrics port; (0, b"") when nothing answers."""
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as exc:
            with contextlib.closing(exc):
                return int(exc.code), b""
        except (OSError, ValueError):
            return 0, b""

    def ready(self) -> bool:
        return self.get("/readyz")[0] == 200

    def scrape(self) -> bytes | None:
        status, body = self.get("/metrics", timeout=2.0)
        return body if status == 200 else None


__all__ = ["REPO_ROOT", "Child", "Stage", "child_env", "fixed_port", "tail"]
