"""The dashboards as files: what Grafana's sidecar loads must be well formed, take its data
source from a variable, and lay its panels out without overlaps. (Whether every query returns
data is proven against a running pipeline in test_dashboards.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from tests.observability.prom import (
    DASHBOARDS,
    load_dashboard,
    panels,
    substitute,
    variable_query,
    variables,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_there_is_an_overview_an_adapter_and_a_kafka_dashboard() -> None:
    uids = [load_dashboard(p)["uid"] for p in DASHBOARDS]
    assert sorted(uids) == ["auto-trace-adapter", "auto-trace-kafka", "auto-trace-overview"]
    for path in DASHBOARDS:
        assert path.stem == load_dashboard(path)["uid"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_every_query_takes_its_data_source_from_the_variable(path: Any) -> None:
    dashboard = load_dashboard(path)
    declared = variables(dashboard)
    assert declared["datasource"]["type"] == "datasource"
    assert declared["datasource"]["query"] == "prometheus"
    for name, variable in declared.items():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, name
            variable_query(variable)  # a label_values() query
    if dashboard["uid"] != "auto-trace-kafka":
        assert "adapter" in declared
    for panel in panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel.get("title") and panel.get("description"), panel
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            # Every variable in a query is one the dashboard declares (or a Grafana built-in).
            substitute(target["expr"], {name: "x" for name in declared})


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_panels_fit_the_grid_without_overlapping(path: Any) -> None:
    dashboard = load_dashboard(path)
    taken: dict[tuple[int, int], str] = {}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


def test_the_overview_answers_whether_the_promise_is_kept() -> None:
    overview = load_dashboard(next(p for p in DASHBOARDS if p.stem == "auto-trace-overview"))
    exprs = " ".join(t["expr"] for p in panels(overview) for t in p["targets"])
    for metric in (
        "auto_trace_lateness_seconds_bucket",
        "auto_trace_delay_window_seconds",
        "auto_trace_deliveries_total",
        "auto_trace_dead_letters_total",
        "auto_trace_ingest_dead_letters_total",
        "auto_trace_records_waiting",
        "auto_trace_records_overdue",
    ):
        assert metric in exprs, metric
