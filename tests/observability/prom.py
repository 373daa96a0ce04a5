"""A real Prometheus for the observability tests: find or install Debian's package, run the
binary on a free loopback port with a config and storage of its own, and query its HTTP API.

The Debian service is never started: the package is installed with service starts denied
(``policy-rc.d``), and the tests run ``prometheus`` themselves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_FILES = REPO_ROOT / "helm" / "auto-trace" / "files"
DASHBOARDS = sorted((CHART_FILES / "dashboards").glob("*.json"))
RULES = CHART_FILES / "alerts" / "auto-trace.rules.yaml"
RULE_TESTS = CHART_FILES / "alerts" / "auto-trace.rules.test.yaml"

POLICY_RC = Path("/usr/sbin/policy-rc.d")


@dataclass(frozen=True)
class Binaries:
    prometheus: str
    promtool: str


def find_or_install() -> Binaries:
    """``prometheus`` and ``promtool`` from PATH, else from Debian's package, installed here."""
    found = Binaries(shutil.which("prometheus") or "", shutil.which("promtool") or "")
    if found.prometheus and found.promtool:
        return found
    _apt_install("prometheus")
    found = Binaries(shutil.which("prometheus") or "", shutil.which("promtool") or "")
    if not (found.prometheus and found.promtool):
        raise RuntimeError("Debian's prometheus package is installed but not on PATH")
    return found


def _apt_install(package: str) -> None:
    if shutil.which("apt-get") is None:
        raise RuntimeError(
            f"{package} is not on PATH and there is no apt-get to install it: install "
            "Prometheus (prometheus and promtool) and run the tests again"
        )
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise RuntimeError(f"installing {package} needs root (or sudo)")
        sudo = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Deny service starts for the install (as container images do), so Debian's prometheus
    # service never runs: the tests start their own instance.
    added_policy = False
    if os.geteuid() == 0 and not POLICY_RC.exists():
        POLICY_RC.write_text("#!/bin/sh\n# auto-trace tests: no service starts\nexit 101\n")
        POLICY_RC.chmod(0o755)
        added_policy = True
    try:
        for command in (
            [*sudo, "apt-get", "update", "-qq"],
            [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
        ):
            result = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=600, check=False
            )
            if result.returncode != 0:
                raise RuntimeError(
                    f"`{' '.join(command)}` failed ({result.returncode}):\n"
                    f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
                )
    finally:
        if added_policy:
            POLICY_RC.unlink()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusError(AssertionError):
    """The API answered with an error (a query that does not parse or evaluate)."""


class Prometheus:
    """One Prometheus server scraping ``targets`` every second, with ``rule_files`` loaded."""

    def __init__(
        self, binary: str, workdir: Path, targets: list[str], rule_files: list[Path]
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": "auto-trace", "static_configs": [{"targets": targets}]}
            ],
        }
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        self._log_file = self.log.open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)  # poll interval; the deadline bounds the wait
        raise AssertionError(f"prometheus not ready after {timeout}s: {self.log.read_text()}")

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self.api(
            "query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step}"
        )
        return list(data["result"])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self._log_file.close()


# -- dashboards -----------------------------------------------------------------------------


def load_dashboard(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text(encoding="utf-8")))


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel with queries, rows' nested panels included."""
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            out += [p for p in panel.get("panels", []) if p.get("targets")]
        elif panel.get("targets"):
            out.append(panel)
    return out


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<metric>[^,]+),\s*)?(?P<label>\w+)\)$")


def variable_query(variable: dict[str, Any]) -> tuple[str | None, str]:
    """``label_values(metric, label)`` of a query variable, as (metric, label)."""
    query = variable["query"]
    text = query["query"] if isinstance(query, dict) else query
    match = _LABEL_VALUES.match(text.strip())
    if match is None:
        raise AssertionError(f"variable {variable['name']}: unsupported query {text!r}")
    return match["metric"], match["label"]


#: Grafana's built-in variables, replaced the way Grafana would for a short, recent range.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}


def substitute(expr: str, values: dict[str, str], builtins: dict[str, str] | None = None) -> str:
    """Replace ``$name`` and ``${name}`` (built-ins and dashboard variables) in a query."""
    merged = {**BUILTINS, **(builtins or {}), **values}

    def replace(match: re.Match[str]) -> str:
        name = match["braced"] or match["plain"]
        if name not in merged:
            raise AssertionError(f"no value for ${name} in {expr!r}")
        return merged[name]

    return re.sub(r"\$\{(?P<braced>\w+)\}|\$(?P<plain>\w+)", replace, expr)


def rules(path: Path = RULES) -> list[dict[str, Any]]:
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [rule for group in loaded["groups"] for rule in group["rules"]]
