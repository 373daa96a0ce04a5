"""Draw each Grafana dashboard of the Helm chart as a PNG, from real Prometheus query results.

The results come from the observability proof test, which runs the pipeline, scrapes it with a
real Prometheus and keeps every panel's query results when asked to:

    AUTO_TRACE_DASHBOARD_DUMP=/tmp/dash AUTO_TRACE_DASHBOARD_RUN_S=60 \\
        .venv/bin/pytest tests/observability/test_dashboards.py
    .venv/bin/pip install matplotlib            # only this script needs it
    .venv/bin/python tools/render_dashboards.py /tmp/dash docs/dashboards

The layout follows each panel's gridPos (24 columns); time series, stats and state timelines
are drawn the way Grafana shows them (dark theme, legends from legendFormat, units and value
mappings from fieldConfig). It is a faithful sketch for the README, not a Grafana screenshot.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch
from matplotlib.ticker import FuncFormatter

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "helm" / "auto-trace" / "files" / "dashboards"

BG, PANEL, BORDER, TEXT, DIM, GRID = (
    "#111217",
    "#181b1f",
    "#2c3235",
    "#ccccdc",
    "#8e8e9a",
    "#2a2d33",
)
PALETTE = [
    "#73bf69",
    "#f2cc0c",
    "#8ab8ff",
    "#ff780a",
    "#f2495c",
    "#5794f2",
    "#b877d9",
    "#fade2a",
    "#37872d",
    "#ff9830",
    "#96d98d",
    "#ca95e5",
]
NAMED = {
    "green": "#73bf69",
    "red": "#f2495c",
    "yellow": "#fade2a",
    "orange": "#ff9830",
    "blue": "#5794f2",
}
UNIT_PX = 30  # Grafana's grid row height
WIDTH_PX = 1800


def color(name: str) -> str:
    return NAMED.get(name, name)


def legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), fmt)


def fmt_value(value: float, unit: str, decimals: int | None = None) -> str:
    if math.isnan(value):
        return "No data"
    if unit == "s":
        if value == 0:
            return "0 s"
        if abs(value) < 1:
            return f"{value * 1000:.{0 if decimals is None else decimals}f} ms"
        if abs(value) < 120:
            return f"{value:.{2 if decimals is None else decimals}f} s"
        return f"{value / 60:.1f} min"
    if unit == "percentunit":
        return f"{value * 100:.{1 if decimals is None else decimals}f}%"
    if unit == "ops":
        return f"{value:.{2 if decimals is None else decimals}f} /s"
    if decimals is not None:
        return f"{value:.{decimals}f}"
    if value == int(value):
        return f"{int(value)}"
    return f"{value:.2f}"


def axis_formatter(unit: str) -> FuncFormatter:
    def f(value: float, _pos: int) -> str:
        if unit == "s":
            return f"{value * 1000:.0f} ms" if abs(value) < 1 and value else f"{value:g} s"
        if unit == "percentunit":
            return f"{value * 100:.0f}%"
        if unit == "ops":
            return f"{value:g}/s"
        return f"{value:g}"

    return FuncFormatter(f)


def mapped(value: float, mappings: list[dict[str, Any]]) -> tuple[str, str] | None:
    for mapping in mappings:
        if mapping.get("type") != "value":
            continue
        key = str(int(value)) if not math.isnan(value) and value == int(value) else str(value)
        hit = mapping["options"].get(key)
        if hit:
            return hit["text"], color(hit.get("color", "green"))
    return None


def threshold_color(value: float, defaults: dict[str, Any], fallback: str) -> str:
    steps = defaults.get("thresholds", {}).get("steps") or []
    chosen = fallback
    for step in steps:
        if step["value"] is None or (not math.isnan(value) and value >= step["value"]):
            chosen = color(step["color"])
    return chosen


def series_of(
    result: list[dict[str, Any]],
) -> list[tuple[dict[str, str], list[float], list[float]]]:
    out = []
    for s in result:
        xs = [float(t) for t, _ in s["values"]]
        ys = [float(v) for _, v in s["values"]]
        out.append((s["metric"], xs, ys))
    return out


def last(ys: list[float]) -> float:
    for y in reversed(ys):
        if not math.isnan(y):
            return y
    return math.nan


def frame(fig: Figure, rect: tuple[float, float, float, float], title: str) -> Axes:
    x, y, w, h = rect
    fig.patches.append(
        FancyBboxPatch(
            (x, y),
            w,
            h,
            boxstyle="round,pad=0,rounding_size=0.003",
            transform=fig.transFigure,
            facecolor=PANEL,
            edgecolor=BORDER,
            linewidth=0.8,
            zorder=-10,
        )
    )
    fig.text(x + 0.006, y + h - 0.006, title, color=TEXT, fontsize=9.5, va="top", weight="bold")
    ax = fig.add_axes((x, y, w, h), facecolor="none", frame_on=False)
    ax.set_axis_off()
    return ax


def draw_timeseries(
    fig: Figure, rect: tuple[float, float, float, float], panel: dict[str, Any], targets: list[Any]
) -> None:
    x, y, w, h = rect
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    overrides = panel.get("fieldConfig", {}).get("overrides", [])
    unit = defaults.get("unit", "short")
    frame(fig, rect, panel["title"])
    lines = []
    for target, fmt in targets:
        for labels, xs, ys in series_of(target["result"]):
            lines.append((legend(fmt, labels), xs, ys))
    # Like Grafana's legend, but a picture cannot scroll: series that are not all zero first.
    lines.sort(key=lambda line: (all(v == 0 or math.isnan(v) for v in line[2]), line[0]))
    columns = 2 if w < 0.6 else 3
    n_leg = min(len(lines), 4 * columns)
    leg_rows = math.ceil(n_leg / columns)
    leg_h = min(0.45 * h, (leg_rows * 14 + 8) / fig.get_figheight() / fig.dpi)
    ax = fig.add_axes((x + 0.035, y + leg_h + 0.022, w - 0.045, h - leg_h - 0.05))
    ax.set_facecolor(PANEL)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(colors=DIM, labelsize=7, length=0)
    ax.grid(True, color=GRID, linewidth=0.6)
    ax.yaxis.set_major_formatter(axis_formatter(unit))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=UTC))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(maxticks=6))
    handles = []
    for i, (name, xs, ys) in enumerate(lines):
        c = PALETTE[i % len(PALETTE)]
        style = "-"
        for override in overrides:
            if override["matcher"]["options"] == name:
                for prop in override["properties"]:
                    if prop["id"] == "color":
                        c = color(prop["value"]["fixedColor"])
                    if prop["id"] == "custom.lineStyle":
                        style = "--"
        times = [datetime.fromtimestamp(t, UTC) for t in xs]
        (handle,) = ax.plot(times, ys, style, color=c, linewidth=1.3, label=name)
        if style == "-":
            ax.fill_between(times, ys, color=c, alpha=0.08, linewidth=0)
        handles.append(handle)
    if "min" in defaults:
        ax.set_ylim(bottom=defaults["min"])
    if "max" in defaults:
        ax.set_ylim(top=defaults["max"])
    ymin, ymax = ax.get_ylim()
    if ymax - ymin < 1e-9:
        ax.set_ylim(ymin - 1, ymax + 1)
    ax.set_ylim(bottom=min(0, ax.get_ylim()[0]))
    if handles:
        legend_ax = fig.add_axes((x + 0.006, y + 0.004, w - 0.012, leg_h), frame_on=False)
        legend_ax.set_axis_off()
        more = len(handles) - n_leg
        shown = handles[:n_leg]
        labels = [hd.get_label() for hd in shown]
        if more > 0:
            zero = all(all(v == 0 or math.isnan(v) for v in line[2]) for line in lines[n_leg:])
            labels[-1] += f"  (+{more} more{', all zero' if zero else ''})"
        legend_ax.legend(
            shown,
            labels,
            loc="upper left",
            ncol=columns,
            fontsize=6.8,
            frameon=False,
            labelcolor=TEXT,
            handlelength=1.4,
            borderaxespad=0,
            columnspacing=1.2,
        )


def draw_stat(
    fig: Figure, rect: tuple[float, float, float, float], panel: dict[str, Any], targets: list[Any]
) -> None:
    ax = frame(fig, rect, panel["title"])
    ax.set_axis_off()
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    unit = defaults.get("unit", "short")
    values = []
    for target, fmt in targets:
        for labels, _xs, ys in series_of(target["result"]):
            values.append((legend(fmt, labels), last(ys)))
    values.sort()
    n = max(len(values), 1)
    for i, (name, value) in enumerate(values):
        hit = mapped(value, defaults.get("mappings", []))
        text, c = (
            hit
            if hit
            else (
                fmt_value(value, unit, defaults.get("decimals")),
                threshold_color(value, defaults, "#73bf69"),
            )
        )
        cx = (i + 0.5) / n
        size = 22 if n == 1 else max(10, 18 - 2 * n)
        ax.text(cx, 0.42, text, color=c, fontsize=size, ha="center", va="center", weight="bold")
        if n > 1 or name not in ("", panel["title"]):
            ax.text(cx, 0.12, name, color=DIM, fontsize=7, ha="center", va="center")


def draw_state_timeline(
    fig: Figure, rect: tuple[float, float, float, float], panel: dict[str, Any], targets: list[Any]
) -> None:
    x, y, w, h = rect
    frame(fig, rect, panel["title"])
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    mappings = defaults.get("mappings", [])
    rows = []
    for target, fmt in targets:
        for labels, xs, ys in series_of(target["result"]):
            rows.append((legend(fmt, labels), xs, ys))
    rows.sort()
    ax = fig.add_axes((x + 0.05, y + 0.035, w - 0.06, h - 0.075))
    ax.set_facecolor(PANEL)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(colors=DIM, labelsize=7, length=0)
    for i, (_name, xs, ys) in enumerate(rows):
        for j in range(len(xs)):
            end = xs[j + 1] if j + 1 < len(xs) else xs[j] + 1
            hit = mapped(ys[j], mappings)
            c = hit[1] if hit else DIM
            ax.barh(
                i,
                (end - xs[j]) / 86400,
                left=mdates.date2num(datetime.fromtimestamp(xs[j], UTC)),
                height=0.8,
                color=c,
                linewidth=0,
            )
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.xaxis_date(tz=UTC)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=UTC))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(maxticks=4))
    ax.invert_yaxis()
    seen = {}
    for mapping in mappings:
        for option in mapping.get("options", {}).values():
            seen[option["text"]] = color(option.get("color", "green"))
    for k, (text, c) in enumerate(seen.items()):
        ax.text(0.02 + 0.3 * k, -0.16, f"■ {text}", color=c, fontsize=7, transform=ax.transAxes)


def render(
    scenario: str,
    dashboard: dict[str, Any],
    results: dict[str, Any],
    choice: str,
    out: Path,
    window: tuple[float, float],
) -> None:
    height_units = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    header_px = 84
    height_px = height_units * UNIT_PX + header_px + 10
    fig = plt.figure(figsize=(WIDTH_PX / 100, height_px / 100), dpi=100, facecolor=BG)
    title = dashboard["title"]
    if choice not in ("(none)",):
        title += f"    adapter: {choice}"
    fig.text(0.01, 1 - 18 / height_px, title, color=TEXT, fontsize=14, weight="bold", va="top")
    start = datetime.fromtimestamp(window[0], UTC).strftime("%Y-%m-%d %H:%M:%S")
    end = datetime.fromtimestamp(window[1], UTC).strftime("%H:%M:%S UTC")
    fig.text(
        0.01,
        1 - 46 / height_px,
        textwrap.fill(
            f"Rendered from Prometheus query results of a real pipeline run, {start} to {end}: "
            f"{scenario}.",
            width=200,
        ),
        color=DIM,
        fontsize=8.5,
        va="top",
    )
    gap = 4 / WIDTH_PX
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        px = pos["x"] / 24 + gap
        pw = pos["w"] / 24 - 2 * gap
        top = header_px + pos["y"] * UNIT_PX
        ph_px = pos["h"] * UNIT_PX - 6
        py = 1 - (top + pos["h"] * UNIT_PX - 3) / height_px
        ph = ph_px / height_px
        rect = (px, py, pw, ph)
        if panel["type"] == "row":
            fig.text(
                px,
                1 - (top + 8) / height_px,
                panel["title"].replace("$adapter", choice),
                color=TEXT,
                fontsize=11,
                weight="bold",
                va="top",
            )
            continue
        kept = results.get(str(panel["id"]), [])
        by_ref = {k["refId"]: k for k in kept}
        targets = [
            (by_ref[t["refId"]], t.get("legendFormat", ""))
            for t in panel["targets"]
            if t["refId"] in by_ref
        ]
        if panel["type"] == "stat":
            draw_stat(fig, rect, panel, targets)
        elif panel["type"] == "state-timeline":
            draw_state_timeline(fig, rect, panel, targets)
        else:
            draw_timeseries(fig, rect, panel, targets)
    fig.savefig(out, facecolor=BG)
    plt.close(fig)
    # A 256-colour palette keeps the README's pictures small (matplotlib brings Pillow).
    from PIL import Image

    with Image.open(out) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            out, optimize=True
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="directory with query-results.json")
    parser.add_argument("out", type=Path, help="where the PNGs go")
    parser.add_argument("--adapter", default="hook", help="adapter shown by the adapter dashboard")
    args = parser.parse_args()
    dump = json.loads((args.results / "query-results.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        per_choice = dump["dashboards"][dashboard["uid"]]
        if "All" in per_choice:
            choice = "All"
        elif args.adapter in per_choice:
            choice = args.adapter
        else:
            choice = next(iter(per_choice))
        target = args.out / f"{path.stem}.png"
        window = (dump["start"], dump["end"])
        render(dump.get("scenario", ""), dashboard, per_choice[choice], choice, target, window)
        sys.stdout.write(f"{target}\n")


if __name__ == "__main__":
    main()
