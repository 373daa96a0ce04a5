"""The benchmark's report: a readable table, the goal checks, and the closing JSON line.

Pure functions of the measured values, so that what ``make bench`` prints (and what a CI job
or a person parses from its last line) is unit-tested without a broker.
"""

from __future__ import annotations

import json
import math
import operator
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

#: The keys of the last output line, in this order, every one always present (null when a
#: scenario could not be measured).
JSON_KEYS: tuple[str, ...] = (
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
)

#: The original design's ceiling: at most 10 trades per 5 minutes.
SEED_CEILING_TRADES_PER_S = 10 / 300

Value = float | int | None

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
}


@dataclass(frozen=True, slots=True)
class Goal:
    key: str
    op: str
    target: float

    def text(self) -> str:
        return f"{self.op} {_number(self.target)}"

    def met(self, value: Value) -> bool:
        """A value that was not measured (None, NaN) does not meet any goal."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        return _OPS[self.op](float(value), self.target)


#: The issue's goals. R3 has two: p99 lateness and no record released early.
GOALS: tuple[Goal, ...] = (
    Goal("r1", ">=", 0.6),
    Goal("r1b", ">=", 0.3),
    Goal("r3_p99_ms", "<=", 100),
    Goal("r3_early", "==", 0),
    Goal("r4", ">=", 0.7),
    Goal("r6", ">=", 0.5),
    Goal("mem_ratio", "<=", 1.2),
)


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: a number, and what it was measured from."""

    label: str
    value: Value
    #: Printed after the value ("ms", "/s", ...).
    unit: str = ""
    #: The JSON key this row's value is reported under, if any.
    key: str | None = None
    #: Record counts, partitions, sizes, concurrency, the raw rates behind a ratio.
    inputs: str = ""


@dataclass(frozen=True, slots=True)
class GoalCheck:
    goal: Goal
    value: Value
    met: bool


def summary(rows: Sequence[Row]) -> dict[str, Value]:
    """The JSON object: every key of :data:`JSON_KEYS`, None for what was not measured."""
    values: dict[str, Value] = dict.fromkeys(JSON_KEYS)
    for row in rows:
        if row.key is not None:
            if row.key not in values:
                raise ValueError(f"unknown report key {row.key!r}")
            values[row.key] = _clean(row.value)
    return values


def bracketed(timeline: Sequence[tuple[str, float]], measured: str, baseline: str) -> list[float]:
    """Each ``measured`` leg ÷ the mean of the nearest ``baseline`` legs before and after it.

    A shared machine drifts while a run goes on; a leg compared with baselines taken on both
    sides of it sees the same drift in its numerator and its denominator. A leg without a
    baseline on one side is left out rather than compared with one side only. Legs of other
    kinds in between are skipped over (they are not baselines).
    """
    ratios: list[float] = []
    for i, (kind, value) in enumerate(timeline):
        if kind != measured:
            continue
        before = next((v for k, v in reversed(timeline[:i]) if k == baseline), None)
        after = next((v for k, v in timeline[i + 1 :] if k == baseline), None)
        if before is None or after is None or before + after <= 0:
            continue
        ratios.append(value / ((before + after) / 2))
    return ratios


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values: a scenario that measured nothing reports null."""
    return statistics.median(values) if values else math.nan


def rounds_text(ratios: Sequence[float]) -> str:
    """``median of 3 rounds: 0.61, 0.66, 0.74`` (rounds in the order they ran)."""
    shown = ", ".join(f"{r:.3f}" for r in ratios)
    if len(ratios) == 1:
        return f"1 round: {shown}"
    return f"median of {len(ratios)} rounds: {shown}"


def check_goals(values: Mapping[str, Value]) -> list[GoalCheck]:
    return [GoalCheck(g, values.get(g.key), g.met(values.get(g.key))) for g in GOALS]


def json_line(rows: Sequence[Row]) -> str:
    """One line of strict JSON (no NaN): the last line of the benchmark's output."""
    return json.dumps(summary(rows), separators=(", ", ": "), allow_nan=False)


def render(
    rows: Sequence[Row],
    *,
    title: str = "auto-trace benchmark",
    notes: Sequence[str] = (),
    errors: Mapping[str, str] | None = None,
) -> str:
    """The whole report: table, goal checks, notes, errors, then the JSON line last."""
    values = summary(rows)
    goals_by_key: dict[str, list[Goal]] = {}
    for goal in GOALS:
        goals_by_key.setdefault(goal.key, []).append(goal)
    table: list[tuple[str, str, str, str, str]] = []
    for row in rows:
        goals = goals_by_key.get(row.key or "", [])
        goal_text = " and ".join(g.text() for g in goals)
        status = ""
        if goals:
            status = "met" if all(g.met(row.value) for g in goals) else "MISSED"
        table.append((row.label, _value_text(row.value, row.unit), goal_text, status, row.inputs))
    header = ("measure", "value", "goal", "", "inputs")
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(4)]
    lines = [title, "=" * len(title)]

    def fmt(cells: tuple[str, str, str, str, str]) -> str:
        head = "  ".join(
            cells[i].rjust(widths[i]) if i == 1 else cells[i].ljust(widths[i]) for i in range(4)
        )
        return f"{head}  {cells[4]}".rstrip()

    lines.append(fmt(header))
    rule = ["-" * w for w in widths]
    lines.append(fmt((rule[0], rule[1], rule[2], rule[3], "-" * 6)))
    lines += [fmt(cells) for cells in table]
    checks = check_goals(values)
    missed = [c for c in checks if not c.met]
    lines.append("")
    lines.append(f"goals met: {len(checks) - len(missed)} of {len(checks)}")
    for check in missed:
        shown = "not measured" if check.value is None else _value_text(check.value, "")
        lines.append(f"  MISSED {check.goal.key} {check.goal.text()}: {shown}")
    if errors:
        lines.append("")
        lines.append("scenarios that failed:")
        lines += [f"  {name}: {message}" for name, message in errors.items()]
    if notes:
        lines.append("")
        lines += list(notes)
    lines.append(json_line(rows))
    return "\n".join(lines)


def _clean(value: Value) -> Value:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        return round(value, 4)
    return value


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _value_text(value: Value, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = _number(value)
    return f"{text} {unit}".rstrip() if unit else text
