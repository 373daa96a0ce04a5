"""``auto-trace demo`` end to end against the session's broker: it must settle every trade,
show a retry and exactly one dead letter, never deliver early, and print no personal value
after the section that shows the input."""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from consumer import cli, demo
from consumer.broker import BOOTSTRAP_ENV
from consumer.log import LOGGER_NAME
from consumer.samples import PERSONAL_FIELDS, sample_trade

pytestmark = pytest.mark.integration

TRADES = 4
SEED = 7


def test_the_demo_settles_every_trade_and_shows_no_personal_data_after_the_input(
    bootstrap_servers: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv(BOOTSTRAP_ENV, bootstrap_servers)
    config_out = tmp_path / "auto-trace.yaml"
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    log_handlers = list(logging.getLogger(LOGGER_NAME).handlers)

    started = time.monotonic()
    code = demo.main(
        [
            "--window",
            "2s",
            "--trades",
            str(TRADES),
            "--seed",
            str(SEED),
            "--timeout",
            "30s",
            "--config-out",
            str(config_out),
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    elapsed = time.monotonic() - started
    out = capsys.readouterr().out
    print(out)

    assert code == 0, out
    assert elapsed < 40

    # Personal data is shown once, on purpose, and nowhere after that section.
    before, marker, after = out.partition(demo.END_OF_INPUT)
    assert marker, "the input section has no end marker"
    assert "input (contains personal data)" in before
    trades = [sample_trade(i, seed=SEED) for i in range(TRADES)]
    personal = {str(t[f]) for t in trades for f in PERSONAL_FIELDS if t.get(f)}
    assert any(p in before for p in personal)  # so the check below can fail
    assert [p for p in personal if p in after] == []
    assert "personal fields found at the receivers: 0 " in after
    # The file adapter exported every trade once, as JSON Lines, with nothing personal.
    assert re.search(
        r"file export \(archive\) +(\d+)/\1 trades in \d+ files .*each exactly once", after
    )
    assert "personal fields found in the exported files: 0" in after
    assert "personal fields found in the internal topics: 0 " in after

    # Every trade reached the healthy tracker; the flaky one dead-lettered exactly the 422.
    assert re.search(
        rf"delivered\s+tracker-a {TRADES}/{TRADES}, flaky-b {TRADES - 1}/{TRADES}", after
    )
    retries = re.search(r"retried\s+(\d+) retries", after)
    assert retries and int(retries.group(1)) >= 1
    dead = re.search(r"dead-lettered\s+(\d+) \(([^)]*)\)", after)
    assert dead and dead.group(1) == "1"
    assert "flaky-b: T007-0000000001 HTTP 422" in dead.group(2)
    assert re.search(r"early deliveries\s+0 ", after)
    assert re.search(r"lateness after due\s+p50 \S+ \w+, max", after)
    assert "auto-trace run --role all --config" in after
    assert "demo finished" in after

    # The configuration it ran with, written as a starting example; secrets only by reference.
    config = yaml.safe_load(config_out.read_text())
    assert [a["name"] for a in config["adapters"]] == [demo.HEALTHY, demo.FLAKY, demo.ARCHIVE]
    hooks = [a for a in config["adapters"] if a["type"] == "webhook"]
    assert all(a["secrets"] == [{"env": demo.SECRET_ENV}] for a in hooks)
    assert config["kafka"]["bootstrap_servers"] == bootstrap_servers
    assert (tmp_path / "work" / "pipeline.log").exists()

    # It leaves the process as it found it: a test runner's signals, logging and environment.
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert logging.getLogger(LOGGER_NAME).handlers == log_handlers
    assert demo.SECRET_ENV not in os.environ


def test_the_cli_hands_its_demo_options_to_the_demo() -> None:
    args = cli._parser().parse_args(["demo", "--window", "2s", "--trades", "3", "--plain"])
    assert args.command == "demo"
    assert args.window == timedelta(seconds=2)
    assert args.trades == 3
    assert args.retry_tiers == [timedelta(seconds=s) for s in (2, 4, 8)]
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["demo", "--retry-tiers", "4s,2s"])
