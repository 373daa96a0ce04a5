"""Fixtures for the chart tests: a pinned `helm`, and `helm template` as Python objects.

`helm` comes from tools/ensure_helm.py: ``$HELM``, else the cached build under
``~/.cache/auto-trace/helm-<version>/``, else built once with ``go install`` (minutes; later runs
reuse it). Without Go the chart tests are skipped, except under CI, where they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "auto-trace"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
RULES_FILE = CHART / "files" / "alerts" / "auto-trace.rules.yaml"
RELEASE = "at"
NAMESPACE = "trading"

Manifest = dict[str, Any]


class RenderError(Exception):
    """`helm template` refused the values; the message is helm's stderr."""


@pytest.fixture(scope="session")
def helm() -> str:
    if os.environ.get("HELM") is None and shutil.which("go") is None:
        if os.environ.get("CI"):
            pytest.fail("no helm and no Go toolchain to build it (tools/ensure_helm.py)")
        pytest.skip("no helm and no Go toolchain to build it (tools/ensure_helm.py)")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "ensure_helm.py")],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        pytest.fail(f"tools/ensure_helm.py failed:\n{out.stderr}")
    return out.stdout.strip()


def scenario_args(values_file: Path) -> list[str]:
    """Arguments for one ci/ scenario. Until files/alerts/ holds the rules file, a scenario that
    switches the PrometheusRule on renders without it (the chart itself refuses to)."""
    args = ["-f", str(values_file)]
    if not RULES_FILE.exists():
        args += ["--set", "prometheusRule.enabled=false"]
    return args


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, check=False)


@pytest.fixture(scope="session")
def render(helm: str) -> Callable[..., list[Manifest]]:
    """``render("-f", file, "--set", "a.b=c", chart=...)``: every rendered document."""
    cache: dict[tuple[str, ...], list[Manifest]] = {}

    def _render(*args: str, chart: Path = CHART) -> list[Manifest]:
        key = (str(chart), *args)
        if key not in cache:
            out = run_helm(helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE, *args)
            if out.returncode != 0:
                raise RenderError(out.stderr.strip())
            cache[key] = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
        return cache[key]

    return _render


def of_kind(manifests: Sequence[Manifest], kind: str) -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def containers(manifest: Manifest) -> list[dict[str, Any]]:
    spec = manifest["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def config_of(manifests: Sequence[Manifest], name: str = f"{RELEASE}-auto-trace") -> Any:
    return yaml.safe_load(of_kind(manifests, "ConfigMap")[name]["data"]["config.yaml"])


@pytest.fixture
def chart_with_sample_files(tmp_path: Path) -> Path:
    """A copy of the chart whose files/ holds one known dashboard and rules file."""
    chart = tmp_path / "auto-trace"
    shutil.copytree(CHART, chart, ignore=shutil.ignore_patterns("dashboards", "alerts"))
    (chart / "files" / "dashboards").mkdir(parents=True)
    (chart / "files" / "alerts").mkdir(parents=True)
    (chart / "files" / "dashboards" / "sample-overview.json").write_text(
        '{"title": "auto-trace sample", "panels": [{"expr": "sum(rate(x[5m])) by (adapter)"}]}\n'
    )
    (chart / "files" / "alerts" / "auto-trace.rules.yaml").write_text(
        "groups:\n"
        "  - name: auto-trace-sample\n"
        "    rules:\n"
        "      - alert: AutoTraceSample\n"
        "        expr: sum by (adapter) (rate(auto_trace_dead_letters_total[5m])) > 0\n"
        "        for: 10m\n"
        "        labels: {severity: warning}\n"
        "        annotations:\n"
        '          summary: "{{ $labels.adapter }} dead-letters records"\n'
    )
    return chart
