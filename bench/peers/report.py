"""The report's pure parts: the machine, merging the engine's figures, the markdown table.

Shape of `bench/results/peers.json` (`document`):

    {"date": ISO, "machine": {"cores", "memory_gib", "python", "os"},
     "plan": {...}, "systems": {name: entry}}

where an entry is {"version", "guarantees", "latency_1": {"p50_ms", "p99_ms", "n"},
"throughput": {"50": level, ...}} or {"unavailable": reason}, and a level is {"sagas_per_s",
"completed", "errors", "p50_ms", "p99_ms"} or holds "collapsed": reason (with whatever partial
figures were measured).
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DISPLAY_NAMES",
    "document",
    "engine_systems",
    "machine",
    "merge_systems",
    "render_markdown",
]

DISPLAY_NAMES = {
    "saga-engine": "this engine",
    "raw-aiokafka": "raw aiokafka",
    "temporal": "Temporal",
    "restate": "Restate",
    "dbos": "DBOS (SQLite)",
}
"""How the peers' keys read in the table and the chart; other keys are shown as they are."""


def display(name: str) -> str:
    """Returns the label of a system key."""
    return DISPLAY_NAMES.get(name, name)


def machine() -> dict[str, Any]:
    """Describes this machine: cores, memory, Python and OS."""
    memory_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:
        memory_gib = 0.0
    return {
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def engine_systems(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Extracts the systems from the engine benchmark's output file.

    Accepts either a whole report ({"systems": {...}, ...}) or the mapping of systems itself.

    Args:
        data: The parsed JSON of `python -m bench.perf peers-workload --out FILE`.

    Returns:
        {name: entry}, in the file's order.

    Raises:
        ValueError: The file holds no system entries.
    """
    systems = data.get("systems", data)
    if not isinstance(systems, Mapping):
        raise ValueError("the engine's file has no systems mapping")
    found = {
        str(name): dict(entry)
        for name, entry in systems.items()
        if isinstance(entry, Mapping)
        and any(key in entry for key in ("latency_1", "throughput", "unavailable"))
    }
    if not found:
        raise ValueError(f"no system entry in the engine's file (keys: {sorted(systems)})")
    return found


def merge_systems(
    engine: Mapping[str, Mapping[str, Any]] | None,
    peers: Mapping[str, Mapping[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Puts the engine's systems first, then the peers'; a peer never overwrites the engine.

    Args:
        engine: The engine's systems (see `engine_systems`), or None when it did not run.
        peers: The peers' entries by key.

    Raises:
        ValueError: A peer's key collides with one of the engine's.
    """
    merged: dict[str, dict[str, Any]] = {name: dict(e) for name, e in (engine or {}).items()}
    for name, entry in peers.items():
        if name in merged:
            raise ValueError(f"system {name!r} appears in both the engine's and the peers' figures")
        merged[name] = dict(entry)
    return merged


def document(
    systems: Mapping[str, Mapping[str, Any]],
    plan: Mapping[str, Any],
    *,
    when: datetime.datetime | None = None,
    host: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Builds the whole `peers.json` document.

    Args:
        systems: Every system's entry, in table order.
        plan: The sizes the run used (levels, seconds, latency_n...).
        when: The run's time; now (UTC) when None.
        host: The machine; `machine()` when None.
    """
    moment = when or datetime.datetime.now(datetime.UTC)
    return {
        "date": moment.isoformat(timespec="seconds"),
        "machine": dict(host) if host is not None else machine(),
        "plan": dict(plan),
        "systems": {name: dict(entry) for name, entry in systems.items()},
    }


def _ms(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _level_cell(level: Mapping[str, Any] | None) -> str:
    if level is None:
        return "not run"
    if "collapsed" in level:
        return "collapsed²"
    rate = level.get("sagas_per_s", 0.0)
    cell = f"{rate:,.0f}" if rate >= 100 else f"{rate:,.1f}"
    if "p50_ms" in level:
        cell += f" ({_ms(level['p50_ms'])} / {_ms(level.get('p99_ms'))} ms)"
    if level.get("errors"):
        cell += f", {level['errors']} errors"
    return cell


def render_markdown(doc: Mapping[str, Any]) -> str:
    """Renders the document as markdown: the table, then guarantees and collapse reasons.

    Args:
        doc: A `document`.

    Returns:
        The markdown text, ending with a newline.
    """
    systems: Mapping[str, Mapping[str, Any]] = doc["systems"]
    plan = doc.get("plan", {})
    levels: Sequence[str] = [str(x) for x in plan.get("levels", [])] or sorted(
        {lv for e in systems.values() for lv in e.get("throughput", {})}, key=int
    )
    host = doc.get("machine", {})
    lines = [
        "# Peers side by side",
        "",
        f"{doc.get('date', '')}; {host.get('cores', '?')} cores, "
        f"{host.get('memory_gib', '?')} GiB, Python {host.get('python', '?')}, "
        f"{host.get('os', '?')}. A 3-step sequential workflow with no-op steps; every system "
        "on this machine in the same run.",
        "",
    ]
    if plan:
        lines += [
            f"Latency: {plan.get('latency_n', '?')} sequential workflows after "
            f"{plan.get('warmup', '?')} unmeasured. Throughput: closed loops at each in-flight "
            f"level for {plan.get('seconds', '?')} s (after 5 unmeasured sequential ones), "
            f"{plan.get('timeout', '?')} s allowed per workflow.",
            "",
        ]
    header = ["system", "p50 ms, 1 in flight", "p99 ms"]
    header += [f"sagas/s at {lv} in flight (p50 / p99)" for lv in levels]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    notes: list[str] = []
    for name, entry in systems.items():
        label = display(name)
        if "unavailable" in entry:
            row = [label, "unavailable¹", ""] + [""] * len(levels)
            notes.append(f"- ¹ {label}: {entry['unavailable']}")
        else:
            latency = entry.get("latency_1", {})
            if "collapsed" in latency:
                row = [label, "collapsed²", ""]
                notes.append(f"- ² {label}, 1 in flight: {latency['collapsed']}")
            else:
                row = [label, _ms(latency.get("p50_ms")), _ms(latency.get("p99_ms"))]
            throughput = entry.get("throughput", {})
            for lv in levels:
                level = throughput.get(lv)
                row.append(_level_cell(level))
                if level is not None and "collapsed" in level:
                    notes.append(f"- ² {label}, {lv} in flight: {level['collapsed']}")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if notes:
        lines += [*notes, ""]
    guarantees = [
        f"- **{display(name)}** ({entry.get('version', '?')}): {entry['guarantees']}"
        for name, entry in systems.items()
        if "guarantees" in entry
    ]
    if guarantees:
        lines += ["What is durable when a step is acknowledged:", "", *guarantees, ""]
    return "\n".join(lines)
