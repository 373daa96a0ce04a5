"""A small chaos run inside the test suite: `make chaos` (``python -m chaos``) at a size that
takes about a minute and a half.

Every stage runs as its own process against a broker of the run's own (never the session's: the
run stops and restarts it), stages are SIGKILLed and restarted, the broker is stopped and
started once, poison records are mixed into the input; the run then checks that nothing was
lost, every duplicate carried one Idempotency-Key, every poison record is in the ingest DLQ,
and no personal value reached a receiver, an internal topic, a log or a metrics scrape. It
exits 0 only if all of that holds. The input is Avro here (`make chaos` uses JSON), so the two
decoders both get a chaos run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_kills_and_a_broker_restart_lose_nothing_and_leak_nothing(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "chaos",
        "--trades",
        "200",
        "--poison",
        "10",
        "--kills",
        "4",
        "--broker-restarts",
        "1",
        "--duration",
        "30",
        "--drain-timeout",
        "60",
        "--format",
        "avro",
        "--seed",
        "7",
        "--workdir",
        str(tmp_path / "chaos"),
    ]
    started = time.monotonic()
    done = subprocess.run(
        command,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    took = time.monotonic() - started
    print(done.stdout[-6000:])
    print(f"chaos run took {took:.0f}s")
    assert done.returncode == 0, (
        f"chaos run failed with exit status {done.returncode}:\n"
        f"{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    )
    assert "lost = 0" in done.stdout
