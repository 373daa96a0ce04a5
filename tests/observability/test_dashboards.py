"""The proof that the dashboards and alert rules work: a real Prometheus scrapes a running
pipeline (`Runner`, every role in one process) that delivers, retries, dead-letters, rejects
bad input and rides out an adapter outage; then every dashboard panel's query and every rule's
expression is evaluated through Prometheus' HTTP API.

Set ``AUTO_TRACE_DASHBOARD_DUMP=DIR`` to keep every panel's query results over the run
(``tools/render_dashboards.py DIR docs/dashboards`` draws the README's pictures from them), and
``AUTO_TRACE_DASHBOARD_RUN_S`` to make the traffic last longer than the default 12 s.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from consumer.receiver import Received, Reply, WebhookReceiver, always
from consumer.runner import Runner
from consumer.samples import sample_trade, to_json
from tests.observability.prom import (
    DASHBOARDS,
    RULES,
    Binaries,
    Prometheus,
    free_port,
    load_dashboard,
    panels,
    rules,
    substitute,
    variable_query,
    variables,
)
from tests.support import WEBHOOK_SECRET, create_topics, make_settings, produce, webhook

pytestmark = pytest.mark.integration

WINDOW_S = 3
RUN_S = float(os.environ.get("AUTO_TRACE_DASHBOARD_RUN_S", "12"))
SCENARIO = (
    f"window X = {WINDOW_S} s; adapter 'hook' refuses some trades (422: dead letters) and fails "
    "others once (503: retried); bad input (ingest DLQ); a 4 s outage of adapter 'mirror' "
    "(its circuit opens, then closes)"
)


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTO_TRACE_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET)


def _number(trade_id: str) -> int:
    return int(trade_id.rsplit("-", 1)[1])


def _hook_policy(received: Received) -> Reply | int | None:
    """Some trades refused for good (422: dead letter), others failed once (503: retried)."""
    n = _number(received.payload["trade_id"])
    if n % 10 == 3:
        return 422
    if n % 4 == 1 and received.headers.get("webhook-id") not in _retried:
        _retried.add(received.headers.get("webhook-id"))
        return Reply(503, delay=0.02)
    return Reply(200, delay=0.005)


_retried: set[str | None] = set()


class Traffic:
    """Produces trades in waves (and some bad input), with an outage of ``mirror`` midway."""

    def __init__(self, bootstrap: str, topic: str, mirror: WebhookReceiver, run_s: float) -> None:
        self.bootstrap, self.topic, self.mirror, self.run_s = bootstrap, topic, mirror, run_s
        self.trades: list[dict[str, Any]] = []
        self.bad = 0
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            start = time.monotonic()
            wave = 0
            outage = (self.run_s * 0.35, self.run_s * 0.35 + 4)
            while time.monotonic() - start < self.run_s:
                elapsed = time.monotonic() - start
                self.mirror.set_policy(always(503) if outage[0] <= elapsed < outage[1] else None)
                now = int(time.time() * 1000)
                batch = [
                    sample_trade(len(self.trades) + i, seed=71, close_time_ms=now)
                    for i in range(4 + wave % 5)
                ]
                records: list[tuple[bytes | None, bytes | None]] = [
                    (None, to_json(t)) for t in batch
                ]
                if wave % 6 == 2:
                    records.append((None, b"not json at all"))  # undecodable
                    records.append((None, b'{"trade_id": "T-1"}'))  # decodes, invalid
                    self.bad += 2
                produce(self.bootstrap, self.topic, records)
                self.trades += batch
                wave += 1
                time.sleep(0.5)  # pacing the traffic, not waiting for anything
            self.mirror.set_policy(None)
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)  # poll interval; the deadline bounds the wait


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def test_every_dashboard_panel_returns_data_and_every_rule_evaluates_on_a_running_pipeline(
    bootstrap_servers: str, prometheus_binaries: Binaries, tmp_path: Path
) -> None:
    _retried.clear()
    port = free_port()
    with (
        WebhookReceiver(WEBHOOK_SECRET, fail=_hook_policy) as hook,
        WebhookReceiver(WEBHOOK_SECRET) as mirror,
    ):
        settings = make_settings(
            bootstrap_servers,
            delay={"window": f"{WINDOW_S}s"},
            retry={"tiers": ["1s", "3s"]},
            adapters=[
                webhook("hook", hook.url),
                webhook(
                    "mirror",
                    mirror.url,
                    circuit={
                        "failure_threshold": 3,
                        "probe_interval": "1s",
                        "max_probe_interval": "2s",
                    },
                ),
            ],
            metrics={"host": "127.0.0.1", "port": port},
        )
        create_topics(settings)
        prom = Prometheus(
            prometheus_binaries.prometheus, tmp_path / "prometheus", [f"127.0.0.1:{port}"], [RULES]
        )
        runner = Runner(settings, "all")
        thread = threading.Thread(target=runner.run, daemon=True)
        began = time.time()
        try:
            thread.start()
            prom.wait_ready()
            _wait(lambda: runner.health.ready()[0], 60, "every stage to be ready")
            started = time.time()
            traffic = Traffic(bootstrap_servers, settings.input.topic, mirror, RUN_S)
            traffic.thread.start()
            _wait(traffic.done.is_set, RUN_S + 60, "the traffic to be produced")
            assert traffic.error is None, traffic.error
            trades = len(traffic.trades)
            refused = sum(1 for t in traffic.trades if _number(t["trade_id"]) % 10 == 3)

            def settled() -> bool:
                got = {
                    s["metric"]["outcome"]: float(s["value"][1])
                    for s in prom.query(
                        'sum by (outcome) (auto_trace_deliveries_total{adapter="hook"})'
                    )
                }
                mirrored = prom.query(
                    'sum(auto_trace_deliveries_total{adapter="mirror",outcome="delivered"})'
                )
                return (
                    got.get("delivered", 0) >= trades - refused
                    and got.get("dead_letter", 0) >= refused
                    and bool(mirrored)
                    and float(mirrored[0]["value"][1]) >= trades
                )

            _wait(settled, 90, "every delivery and dead letter to be scraped")
            # The lag monitor refreshes every 5 s: let it and the rules see the settled state.
            _wait(lambda: time.time() - started > RUN_S + 8, 30, "a few more scrapes")
            now = time.time()
            _check_dashboards(prom, now, began)
            _check_rules(prom)
            _check_the_run_exercised_what_matters(prom, now - started + 5)
        finally:
            runner.stop.set()
            thread.join(30)
            prom.stop()
    assert not thread.is_alive(), "the runner did not stop"
    assert runner.failed == []


def _check_dashboards(prom: Prometheus, now: float, started: float) -> None:
    dump: dict[str, Any] = {"start": started, "end": now, "scenario": SCENARIO, "dashboards": {}}
    keep = os.environ.get("AUTO_TRACE_DASHBOARD_DUMP")
    short_range = {"__rate_interval": "10s", "__range": f"{math.ceil(now - started)}s"}
    checked = 0
    for path in DASHBOARDS:
        dashboard = load_dashboard(path)
        values_per_variable: dict[str, list[str]] = {}
        for name, variable in variables(dashboard).items():
            if variable["type"] == "datasource":
                continue
            metric, label = variable_query(variable)
            match = {"match[]": metric} if metric else {}
            found = prom.api(f"label/{label}/values", **match)
            assert set(found) >= {"hook", "mirror"}, (path.name, name, found)
            values_per_variable[name] = sorted(found)
        # Each dashboard is evaluated for every value of its variables (each adapter, and All).
        choices = {a: a for a in values_per_variable.get("adapter", ["(none)"])}
        adapter_variable = variables(dashboard).get("adapter", {})
        if adapter_variable.get("includeAll"):
            choices["All"] = adapter_variable.get("allValue", ".*")
        # The kept series use a rate window Grafana would pick for a range this short.
        for choice, adapter in choices.items():
            values = {"adapter": adapter, "datasource": "prometheus"}
            kept: dict[str, Any] = {}
            for panel in panels(dashboard):
                for target in panel["targets"]:
                    expr = substitute(target["expr"], values)
                    result = prom.query(expr, at=now)
                    where = f"{path.name} / {panel['title']!r} / {target['refId']}: {expr}"
                    assert result, f"no data: {where}"
                    assert _finite(result), f"only NaN: {where}: {result}"
                    checked += 1
                    if keep:
                        shown = substitute(target["expr"], values, short_range)
                        series = prom.query_range(shown, started, now, 1.0)
                        kept.setdefault(str(panel["id"]), []).append(
                            {"refId": target["refId"], "expr": shown, "result": series}
                        )
            dump["dashboards"].setdefault(dashboard["uid"], {})[choice] = kept
    assert checked >= 50
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / "query-results.json").write_text(json.dumps(dump))


def _check_rules(prom: Prometheus) -> None:
    for rule in rules():
        # Parses and evaluates now, against the pipeline's real series.
        prom.query(rule["expr"])
    _wait(lambda: _all_rules_evaluated(prom), 30, "every rule to be evaluated")
    loaded = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in loaded} == {r.get("alert") or r["record"] for r in rules()}
    for rule in loaded:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    # The SLO recording rules have data; no alert fires on a healthy run.
    assert prom.query("adapter:auto_trace_lateness_over_slo:ratio_rate5m")
    # The run dead-letters on purpose: those two alerts may fire, nothing else may.
    alerts = prom.api("alerts")["alerts"]
    firing = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
    assert firing <= {"AutoTraceDeadLetters", "AutoTraceIngestDeadLetters"}, firing


def _all_rules_evaluated(prom: Prometheus) -> bool:
    loaded = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    return all(not r["lastEvaluation"].startswith("0001") for r in loaded)


def _check_the_run_exercised_what_matters(prom: Prometheus, seconds: float) -> None:
    """Not only zeros: records waited, an outage opened a circuit, retries and DLQs happened."""
    window = f"{math.ceil(seconds)}s"

    def peak(expr: str) -> float:
        result = prom.query(f"max_over_time(({expr})[{window}:1s])")
        return max((float(s["value"][1]) for s in result), default=0.0)

    assert peak('sum(auto_trace_records_waiting{stage="release"})') > 0
    assert peak('max(auto_trace_circuit_state{adapter="mirror"})') == 2
    assert peak('sum(auto_trace_in_flight_deliveries{adapter="mirror"})') > 0
    for expr in (
        'sum(auto_trace_retries_total{adapter="hook"})',
        'sum(auto_trace_dead_letters_total{adapter="hook",error_class="FatalDeliveryError"})',
        'sum(auto_trace_ingest_dead_letters_total{reason="decode"})',
        'sum(auto_trace_ingest_dead_letters_total{reason="invalid"})',
        'sum(auto_trace_deliveries_total{adapter="mirror",outcome="adapter_down"})',
    ):
        assert peak(expr) > 0, expr
