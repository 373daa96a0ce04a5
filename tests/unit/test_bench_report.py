"""The benchmark's report: the last line is one JSON object with exactly the documented keys, and
goal checks flag misses (and never count an unmeasured value as met)."""

from __future__ import annotations

import json
import math

import pytest

from bench.report import (
    GOALS,
    JSON_KEYS,
    Row,
    bracketed,
    check_goals,
    json_line,
    median,
    render,
    rounds_text,
    summary,
)

ALL_MET = [
    Row("R1", 0.7, key="r1", inputs="200,000 records, 6 partitions"),
    Row("R1b", 0.35, key="r1b"),
    Row("p50", 12, "ms", key="r3_p50_ms"),
    Row("p99", 80, "ms", key="r3_p99_ms"),
    Row("max", 140, "ms", key="r3_max_ms"),
    Row("early", 0, key="r3_early"),
    Row("R4", 0.8, key="r4", inputs="concurrency 16"),
    Row("httpx", 0.05, key="r4_httpx_vs_aiohttp"),
    Row("R6", 0.55, key="r6"),
    Row("MEM", 1.05, key="mem_ratio"),
    Row("SEED", 2500.0, "/s", key="e2e_trades_per_s"),
]


def _last_json(text: str) -> dict[str, object]:
    last = text.splitlines()[-1]
    value = json.loads(last)
    assert isinstance(value, dict)
    return value


def test_last_line_is_json_with_exactly_the_keys() -> None:
    out = render(ALL_MET)
    value = _last_json(out)
    assert list(value) == list(JSON_KEYS)
    assert set(JSON_KEYS) == {
        "r1",
        "r1b",
        "r3_p50_ms",
        "r3_p99_ms",
        "r3_max_ms",
        "r3_early",
        "r4",
        "r4_httpx_vs_aiohttp",
        "r6",
        "mem_ratio",
        "e2e_trades_per_s",
    }
    assert value["r1"] == 0.7
    assert value["r3_early"] == 0
    assert value["e2e_trades_per_s"] == 2500.0


def test_unmeasured_values_are_null_not_missing() -> None:
    value = _last_json(render([Row("R1", 0.5, key="r1")]))
    assert list(value) == list(JSON_KEYS)
    assert value["r1"] == 0.5
    assert all(value[k] is None for k in JSON_KEYS if k != "r1")


def test_nan_and_infinity_become_null_so_the_line_stays_strict_json() -> None:
    line = json_line([Row("R1", math.nan, key="r1"), Row("R4", math.inf, key="r4")])
    value = json.loads(line)  # the default parser would accept NaN; check the text too
    assert "NaN" not in line and "Infinity" not in line
    assert value["r1"] is None and value["r4"] is None


def test_an_unknown_key_is_a_bug_not_a_silent_extra() -> None:
    with pytest.raises(ValueError, match="unknown report key"):
        summary([Row("x", 1.0, key="r7")])


def test_all_goals_met() -> None:
    checks = check_goals(summary(ALL_MET))
    assert [c.goal.key for c in checks] == [g.key for g in GOALS]
    assert all(c.met for c in checks)
    out = render(ALL_MET)
    assert f"goals met: {len(GOALS)} of {len(GOALS)}" in out
    assert "MISSED" not in out


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("r1", 0.59),
        ("r1b", 0.2),
        ("r3_p99_ms", 101),
        ("r3_early", 1),
        ("r4", 0.1),
        ("r6", 0.49),
        ("mem_ratio", 1.25),
    ],
)
def test_each_goal_flags_a_miss(key: str, value: float) -> None:
    rows = [r if r.key != key else Row(r.label, value, r.unit, key=key) for r in ALL_MET]
    checks = {c.goal.key: c.met for c in check_goals(summary(rows))}
    assert checks[key] is False
    assert all(met for k, met in checks.items() if k != key)
    out = render(rows)
    assert f"MISSED {key}" in out
    assert f"goals met: {len(GOALS) - 1} of {len(GOALS)}" in out


def test_boundaries_count_as_met() -> None:
    values = summary(ALL_MET)
    values.update(r1=0.6, r1b=0.3, r3_p99_ms=100, r3_early=0, r4=0.7, r6=0.5, mem_ratio=1.2)
    assert all(c.met for c in check_goals(values))


def test_an_unmeasured_goal_is_a_miss() -> None:
    rows = [r for r in ALL_MET if r.key != "r6"]
    out = render(rows, errors={"R6": "TimeoutError: timed out"})
    assert "MISSED r6 >= 0.5: not measured" in out
    assert "R6: TimeoutError: timed out" in out
    assert _last_json(out)["r6"] is None


def test_table_shows_values_goals_and_inputs() -> None:
    out = render(ALL_MET, notes=["BENCH_SCALE=1.0"])
    lines = out.splitlines()
    r1 = next(line for line in lines if line.startswith("R1 "))
    assert "0.7" in r1 and ">= 0.6" in r1 and "met" in r1 and "200,000 records" in r1
    p99 = next(line for line in lines if line.startswith("p99"))
    assert "80 ms" in p99 and "<= 100" in p99
    assert "BENCH_SCALE=1.0" in out
    # The notes come before the JSON line, which stays last.
    assert lines.index("BENCH_SCALE=1.0") < len(lines) - 1


def test_bracketed_divides_each_leg_by_the_mean_of_its_neighbouring_baselines() -> None:
    timeline = [
        ("copy", 100.0),
        ("ingest", 66.0),
        ("copy", 120.0),
        ("chain", 33.0),
        ("copy", 80.0),
        ("ingest", 45.0),
        ("copy", 100.0),
    ]
    assert bracketed(timeline, "ingest", "copy") == pytest.approx([66 / 110, 45 / 90])
    assert bracketed(timeline, "chain", "copy") == pytest.approx([33 / 100])


def test_bracketed_skips_other_kinds_and_leaves_out_a_leg_with_one_baseline() -> None:
    timeline = [
        ("aiohttp", 4000.0),
        ("sink", 5000.0),
        ("aiohttp", 4400.0),
        ("retry", 1500.0),
        ("sink", 4000.0),
        ("aiohttp", 3600.0),
        ("retry", 1200.0),
        ("sink", 6000.0),
    ]
    # The last sink leg has no aiohttp leg after it; the retry legs look past the aiohttp ones.
    assert bracketed(timeline, "sink", "aiohttp") == pytest.approx([5000 / 4200, 4000 / 4000])
    assert bracketed(timeline, "retry", "sink") == pytest.approx([1500 / 4500, 1200 / 5000])
    assert bracketed([("sink", 1.0)], "sink", "aiohttp") == []


def test_median_and_rounds_text() -> None:
    assert median([0.7, 0.5, 0.6]) == 0.6
    assert math.isnan(median([]))
    assert rounds_text([0.61, 0.74, 0.66]) == "median of 3 rounds: 0.610, 0.740, 0.660"
    assert rounds_text([0.5]) == "1 round: 0.500"
