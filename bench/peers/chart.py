"""The PNG chart: throughput by in-flight level per system, and latency with one in flight."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # No display on a server; the chart only goes to a file.

# The backend is chosen before pyplot is imported.
import matplotlib.pyplot as plt

from bench.peers.report import display

__all__ = ["draw"]


def _rate(value: float) -> str:
    if not value:
        return ""
    return f"{value:,.1f}" if value < 10 else f"{value:,.0f}"


def draw(doc: Mapping[str, Any], path: Path) -> None:
    """Writes the chart of a `peers.json` document to `path`.

    Left: grouped bars, sagas/s per in-flight level and system (a collapsed level is an empty
    slot marked "x"). Right: p50 and p99 latency with one in flight per system.

    Args:
        doc: The report document.
        path: The PNG file.
    """
    systems = {n: e for n, e in doc["systems"].items() if "unavailable" not in e}
    levels = [str(x) for x in doc.get("plan", {}).get("levels", [])] or sorted(
        {lv for e in systems.values() for lv in e.get("throughput", {})}, key=int
    )
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(len(systems), 1)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, entry) in enumerate(systems.items()):
        colour = colours[k % len(colours)]
        xs = [i + (k - (len(systems) - 1) / 2) * width for i in range(len(levels))]
        heights = []
        for x, lv in zip(xs, levels, strict=True):
            level = entry.get("throughput", {}).get(lv)
            if level is None or "collapsed" in level:
                heights.append(0.0)
                left.text(x, 1, "x", ha="center", va="bottom", color=colour, fontweight="bold")
            else:
                heights.append(float(level.get("sagas_per_s", 0.0)))
        bars = left.bar(xs, heights, width, label=display(name), color=colour)
        left.bar_label(bars, labels=[_rate(h) for h in heights], fontsize=7)
    rates = [
        float(level["sagas_per_s"])
        for entry in systems.values()
        for level in entry.get("throughput", {}).values()
        if "collapsed" not in level and level.get("sagas_per_s")
    ]
    # The systems differ by orders of magnitude; a linear axis would flatten the slow ones.
    if rates and max(rates) / min(rates) > 30:
        left.set_yscale("log")
    left.set_xticks(range(len(levels)), [f"{lv} in flight" for lv in levels])
    left.set_ylabel("sagas (workflows) per second")
    left.set_title("Throughput (x: collapsed or not run)")
    left.legend(fontsize=8)

    names = [n for n, e in systems.items() if "p50_ms" in e.get("latency_1", {})]
    p50 = [float(systems[n]["latency_1"]["p50_ms"]) for n in names]
    p99 = [float(systems[n]["latency_1"]["p99_ms"]) for n in names]
    ys = list(range(len(names)))
    right.barh([y + 0.2 for y in ys], p50, 0.4, label="p50")
    right.barh([y - 0.2 for y in ys], p99, 0.4, label="p99")
    for y, a, b in zip(ys, p50, p99, strict=True):
        right.text(a, y + 0.2, f" {a:.1f}", va="center", fontsize=7)
        right.text(b, y - 0.2, f" {b:.1f}", va="center", fontsize=7)
    right.set_yticks(ys, [display(n) for n in names])
    right.invert_yaxis()
    right.set_xlabel("ms")
    right.set_title("Latency, 1 in flight")
    right.legend(fontsize=8)
    host = doc.get("machine", {})
    fig.suptitle(
        f"3-step workflow, no-op steps; {host.get('cores', '?')} cores, one machine, one run "
        f"({str(doc.get('date', ''))[:10]})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
