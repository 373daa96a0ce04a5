"""The alert rules: promtool checks and unit-tests them, every alert has a test that fires it and
one that does not, a summary, a description and a runbook in the README; and every metric the
rules and dashboards use is one auto-trace exports (and the README lists)."""

from __future__ import annotations

import re
import subprocess

import yaml
from prometheus_client import generate_latest

from consumer.metrics import Metrics
from tests.observability.prom import (
    DASHBOARDS,
    REPO_ROOT,
    RULE_TESTS,
    RULES,
    Binaries,
    load_dashboard,
    panels,
    rules,
)

README = REPO_ROOT / "README.md"


def test_promtool_accepts_the_rules_file(prometheus_binaries: Binaries) -> None:
    result = subprocess.run(
        [prometheus_binaries.promtool, "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_and_stays_silent_as_its_unit_tests_expect(
    prometheus_binaries: Binaries,
) -> None:
    result = subprocess.run(
        [prometheus_binaries.promtool, "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    fired: set[str] = set()
    silent: set[str] = set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert alerts - fired == set(), "alerts no test fires"
    assert alerts - silent == set(), "alerts no test keeps silent"


def test_every_alert_has_a_summary_a_description_and_a_runbook_in_the_readme() -> None:
    readme = README.read_text(encoding="utf-8")
    headings = set(re.findall(r"^#+ (\S+)\s*$", readme, flags=re.MULTILINE))
    for rule in rules():
        if "alert" not in rule:
            continue
        name = rule["alert"]
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), name
        assert rule.get("labels", {}).get("severity") in {"critical", "warning"}, name
        # GitHub's anchor of a "### AutoTraceName" heading is "#autotracename".
        assert annotations.get("runbook_url") == f"README.md#{name.lower()}", name
        assert name in headings, f"README has no runbook section titled {name}"


def _exported_names() -> set[str]:
    metrics = Metrics()
    metrics.init_stage("ingest", ["t.delay"], ["decode"])
    metrics.init_adapter("hook", 2)
    metrics.delay_window.set(1)
    metrics.consumer_lag.labels("ingest", "g", "t").set(0)
    metrics.waiting.labels("ingest", "t").set(0)
    metrics.overdue.labels("ingest", "t").set(0)
    metrics.held_partitions.labels("t").set(0)
    metrics.records_out.labels("ingest", "t.delay").inc()
    metrics.build_info.info({"version": "0", "role": "all"})

    class Healthy:
        def alive(self) -> tuple[bool, dict[str, float]]:
            return True, {"ingest": 0.1}

        def ready(self) -> tuple[bool, dict[str, bool]]:
            return True, {"ingest": True}

    metrics.watch_health(Healthy())
    text = generate_latest(metrics.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


#: A metric name that is not part of a recording rule's name (``level:metric:operations``).
_USED = re.compile(r"(?<![:\w])auto_trace_\w+")


def _used_names() -> dict[str, str]:
    used: dict[str, str] = {}
    for rule in rules():
        for name in _USED.findall(rule["expr"]):
            used[name] = f"rule {rule.get('alert') or rule.get('record')}"
    for path in DASHBOARDS:
        dashboard = load_dashboard(path)
        for panel in panels(dashboard):
            for target in panel["targets"]:
                for name in _USED.findall(target["expr"]):
                    used[name] = f"{path.name} panel {panel['title']!r}"
        for variable in dashboard["templating"]["list"]:
            query = variable.get("definition", "")
            for name in _USED.findall(query):
                used[name] = f"{path.name} variable {variable['name']}"
    return used


def test_every_metric_the_rules_and_dashboards_use_is_exported() -> None:
    exported = _exported_names()
    unknown = {name: where for name, where in _used_names().items() if name not in exported}
    assert unknown == {}


def test_the_readme_lists_every_metric() -> None:
    readme = README.read_text(encoding="utf-8")
    families = {
        re.sub(r"(_bucket|_count|_sum)$", "", name)
        for name in _exported_names()
        if not name.endswith(("_created",))
    }
    missing = sorted(f for f in families if f"`{f}" not in readme)
    assert missing == []
