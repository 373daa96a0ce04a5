"""The program as operators run it: `auto-trace run --role all` in its own process, health
endpoints, SIGTERM, and `topics create` against the broker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.cli import main
from consumer.receiver import WebhookReceiver
from consumer.samples import sample_trade, to_json
from consumer.topics import planned_topics
from tests.support import WEBHOOK_SECRET, create_topics, make_settings, produce, webhook

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


def _wait_http(url: str, status: int, timeout: float = 60, contains: str = "") -> str:
    deadline = time.monotonic() + timeout
    code, body = 0, ""
    while time.monotonic() < deadline:
        code, body = _get(url)
        if code == status and contains in body:
            return body
        time.sleep(0.2)  # poll interval; the deadline above bounds the wait
    raise AssertionError(f"{url} did not answer {status}: {code} {body}")


def _config(settings: Any, receiver_url: str, port: int) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": settings.kafka.bootstrap_servers},
        "input": {"topic": settings.input.topic, "group": settings.input.group},
        "topics": {"prefix": settings.topics.prefix},
        "delay": {"window": "1s", "group": settings.delay.group},
        "adapters": [webhook("hook", receiver_url)],
        "metrics": {"host": "127.0.0.1", "port": port},
        "shutdown": {"grace": "15s"},
    }


def test_run_all_serves_health_and_metrics_delivers_and_exits_0_on_sigterm(
    bootstrap_servers: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTO_TRACE_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET)
    env = {**os.environ}
    with WebhookReceiver(WEBHOOK_SECRET) as receiver:
        settings = make_settings(bootstrap_servers, adapters=[webhook("hook", receiver.url)])
        create_topics(settings)
        port = _free_port()
        path = tmp_path / "auto-trace.yaml"
        path.write_text(yaml.safe_dump(_config(settings, receiver.url, port)))
        proc = subprocess.Popen(
            [sys.executable, "-m", "consumer", "run", "--role", "all", "--config", str(path)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_http(f"{base}/healthz", 200)
            ready = _wait_http(f"{base}/readyz", 200)
            assert '"ready": true' in ready
            now = int(time.time() * 1000)
            trades = [sample_trade(i, seed=61, close_time_ms=now) for i in range(20)]
            produce(bootstrap_servers, settings.input.topic, [(None, to_json(t)) for t in trades])
            assert receiver.wait_for(len(trades), timeout=60)
            delivered = 'auto_trace_deliveries_total{adapter="hook",outcome="delivered"} 20.0'
            metrics = _wait_http(f"{base}/metrics", 200, timeout=10, contains=delivered)
            assert "auto_trace_build_info" in metrics
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            assert time.monotonic() - started < 15
        finally:
            if proc.poll() is None:
                proc.kill()
            _, stderr = proc.communicate(timeout=10)
    events = [line for line in stderr.splitlines() if line.startswith("{")]
    assert any('"event": "signal received; shutting down"' in e for e in events)
    # Lines from a stage's threads name the stage (several run in one process here).
    for stage in ("ingest", "release", "sink:hook"):
        assert any(f'"stage": "{stage}"' in e for e in events), stage
    for trade in trades:  # the structured log carries no personal value
        for field in ("user_email", "user_name", "account_id", "client_ip"):
            if trade[field]:
                assert trade[field] not in stderr


def test_topics_create_is_idempotent(
    bootstrap_servers: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("AUTO_TRACE_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET)
    adapter = webhook("a", "http://127.0.0.1:9/")
    settings = make_settings(bootstrap_servers, adapters=[adapter])
    topics = {"prefix": settings.topics.prefix, "partitions": 2, "replication_factor": 1}
    config = tmp_path / "auto-trace.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kafka": {"bootstrap_servers": bootstrap_servers},
                "topics": topics,
                "adapters": [adapter],
            }
        )
    )
    assert main(["topics", "create", "--config", str(config)]) == 0
    first = capsys.readouterr().out.split()
    assert main(["topics", "create", "--config", str(config)]) == 0
    second = capsys.readouterr().out.split()
    names = [s.name for s in planned_topics(settings)]
    assert first == [w for n in names for w in ("created", n)]
    assert second == [w for n in names for w in ("exists", n)]


def test_help_describes_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["run", "--help"], ["topics", "create", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--role {ingest,release,sink,all}" in out
    assert "AUTO_TRACE_<SECTION>__<KEY>" in out
    assert "--dry-run" in out
    result = subprocess.run(
        [sys.executable, "-m", "consumer", "--help"], capture_output=True, text=True, check=True
    )
    assert "auto-trace" in result.stdout
