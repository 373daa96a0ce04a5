"""The broker jars are resolved once: a complete cache never calls Maven, and a missing or
failing Maven says what went wrong."""

from __future__ import annotations

import base64
import hashlib
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from consumer import broker
from consumer.broker import BrokerError, LocalBroker, ensure_broker_jars

POM = """\
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <properties><kafka.version>9.9.9</kafka.version></properties>
</project>
"""


@pytest.fixture
def pom(tmp_path: Path) -> Path:
    path = tmp_path / "broker-pom.xml"
    path.write_text(POM)
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv(broker.CACHE_DIR_ENV, str(path))
    return path


@pytest.fixture
def no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"unexpected subprocess call: {args}")

    monkeypatch.setattr(subprocess, "run", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)


def fake_mvn(
    monkeypatch: pytest.MonkeyPatch, *, returncode: int = 0, output: str = ""
) -> list[list[str]]:
    """Stand in for Maven: record the command, write a broker jar when it 'succeeds'."""
    calls: list[list[str]] = []
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        if returncode == 0:
            out_dir = Path(
                next(a for a in command if a.startswith("-DoutputDirectory=")).split("=", 1)[1]
            )
            out_dir.mkdir(parents=True)
            (out_dir / "kafka_2.13-9.9.9.jar").write_bytes(b"jar")
        return subprocess.CompletedProcess(command, returncode, stdout=output)

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_a_complete_cache_is_used_without_calling_maven(
    pom: Path, cache: Path, no_subprocess: None
) -> None:
    version_dir = cache / "kafka-9.9.9"
    (version_dir / "libs").mkdir(parents=True)
    (version_dir / "COMPLETE").write_text(hashlib.sha256(pom.read_bytes()).hexdigest())

    assert ensure_broker_jars(pom) == version_dir / "libs"


def test_jars_are_resolved_once_then_served_from_the_cache(
    pom: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_mvn(monkeypatch)

    libs = ensure_broker_jars(pom)
    again = ensure_broker_jars(pom)

    assert libs == again == cache / "kafka-9.9.9" / "libs"
    assert len(calls) == 1
    assert (libs / "kafka_2.13-9.9.9.jar").exists()
    # Maven ran on a copy of the pom in the cache, so its target/ never lands in the repository.
    assert calls[0][calls[0].index("-f") + 1] == str(cache / "kafka-9.9.9" / "pom.xml")


def test_a_changed_pom_is_resolved_again(
    pom: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_mvn(monkeypatch)
    ensure_broker_jars(pom)
    pom.write_text(POM.replace("</project>", "<!-- another dependency --></project>"))

    ensure_broker_jars(pom)

    assert len(calls) == 2


def test_missing_maven_is_a_clear_error(
    pom: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, no_subprocess: None
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)

    with pytest.raises(BrokerError, match=r"`mvn` \(Apache Maven\) is not on PATH"):
        ensure_broker_jars(pom)
    assert not (cache / "kafka-9.9.9" / "COMPLETE").exists()


def test_a_failing_maven_reports_command_exit_code_and_output(
    pom: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    noise = "\n".join(f"[INFO] line {i}" for i in range(100))
    fake_mvn(monkeypatch, returncode=1, output=f"{noise}\n[ERROR] Could not resolve kafka_2.13")

    with pytest.raises(BrokerError) as raised:
        ensure_broker_jars(pom)

    message = str(raised.value)
    assert "dependency:copy-dependencies" in message
    assert "exit code 1" in message
    assert "[ERROR] Could not resolve kafka_2.13" in message
    assert "line 10\n" not in message  # only the tail
    assert not (cache / "kafka-9.9.9" / "COMPLETE").exists()


def test_no_docker_engine_is_an_answer_not_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-such.sock'}")

    assert broker.docker_engine_answers(timeout=0.5) is False


def test_the_packaged_pom_names_the_kafka_version() -> None:
    assert broker.kafka_version(broker.packaged_pom()).startswith("4.")


def test_a_busy_port_is_reported_before_any_jvm_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_subprocess: None
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        local = LocalBroker(port=port, jars=tmp_path, data_dir=tmp_path / "data")

        with pytest.raises(BrokerError, match=f"port {port}: Address already in use"):
            local.start()
    assert not (tmp_path / "data").exists()


def test_cluster_ids_are_16_bytes_that_no_command_line_takes_for_an_option() -> None:
    ids = {broker._new_cluster_id() for _ in range(2000)}

    assert len(ids) == 2000
    assert not any(cluster_id.startswith("-") for cluster_id in ids)
    assert all(len(base64.urlsafe_b64decode(cluster_id + "==")) == 16 for cluster_id in ids)
