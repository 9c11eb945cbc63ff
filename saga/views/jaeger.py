"""A saga's trace, fetched from Jaeger's query API and drawn as a waterfall in the terminal.

The local Jaeger has no web UI (see README), but its API (``/api/traces/<id>``) is complete;
this view is what a person needs from it: which service did what, when, for how long, and
which compensation undid which step.

`trace_link` is the one page every command and the demo print for a saga's trace: the Jaeger
UI's page where one is configured (``SAGA_JAEGER_UI``), else the console's trace page
(``saga serve``; ``SAGA_CONSOLE_URL``), which draws the same waterfall from the query API.
`trace_url` stays the Jaeger UI's page, for where that UI is meant.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from saga.runtime.traceids import trace_id_for

__all__ = [
    "CONSOLE_URL_ENV",
    "DEFAULT_CONSOLE_URL",
    "DEFAULT_JAEGER_URL",
    "JAEGER_UI_ENV",
    "TraceSpan",
    "WaterfallRow",
    "console_trace_url",
    "console_url",
    "fetch_trace",
    "jaeger_ui",
    "orphans",
    "trace_link",
    "trace_millis",
    "trace_url",
    "waterfall",
    "waterfall_rows",
]

DEFAULT_JAEGER_URL = os.environ.get("SAGA_JAEGER_URL", "http://127.0.0.1:16686")
"""Jaeger's query address: ``SAGA_JAEGER_URL`` or the local stack's."""

JAEGER_UI_ENV = "SAGA_JAEGER_UI"
"""The variable naming a Jaeger UI to link traces to (the local Jaeger has none)."""
CONSOLE_URL_ENV = "SAGA_CONSOLE_URL"
"""The variable naming the console (``saga serve``) whose trace pages links point at."""
DEFAULT_CONSOLE_URL = "http://127.0.0.1:8080"
"""Where ``saga serve`` (and the demo's console) listens by default."""


@dataclass(frozen=True, slots=True)
class TraceSpan:
    """One span of a saga's trace, as Jaeger returned it."""

    span_id: str
    parent_id: str | None
    links: tuple[str, ...]
    service: str
    name: str
    start_us: int
    duration_us: int
    error: bool


def trace_url(saga_id: str, base: str = DEFAULT_JAEGER_URL) -> str:
    """The Jaeger UI's page of the saga's trace (``base`` is the UI; for the page to print
    whatever is configured, see `trace_link`)."""
    return f"{base.rstrip('/')}/trace/{trace_id_for(saga_id):032x}"


def jaeger_ui() -> str | None:
    """The Jaeger UI configured in ``SAGA_JAEGER_UI``, or None (read at each call, so that a
    process's environment decides, not the one it was imported in)."""
    return os.environ.get(JAEGER_UI_ENV, "").strip() or None


def console_url() -> str:
    """The console's address: ``SAGA_CONSOLE_URL``, else `DEFAULT_CONSOLE_URL`."""
    return os.environ.get(CONSOLE_URL_ENV, "").strip() or DEFAULT_CONSOLE_URL


def console_trace_url(saga_id: str, console: str | None = None) -> str:
    """The console's trace page of the saga (``/sagas/<id>/trace``).

    Args:
        saga_id: The saga.
        console: The console's address (default: `console_url`).
    """
    base = (console or console_url()).rstrip("/")
    return f"{base}/sagas/{urllib.parse.quote(saga_id, safe='')}/trace"


def trace_link(saga_id: str, *, ui: str | None = None, console: str | None = None) -> str:
    """The page to open for the saga's trace: the Jaeger UI's when one is configured, else
    the console's trace page (the locally built Jaeger has only the query API, whose root is a
    placeholder page).

    Args:
        saga_id: The saga.
        ui: A Jaeger UI (default: `jaeger_ui`, from ``SAGA_JAEGER_UI``).
        console: The console's address, used when there is no UI (default: `console_url`).
    """
    ui = ui or jaeger_ui()
    if ui:
        return trace_url(saga_id, ui)
    return console_trace_url(saga_id, console)


def fetch_trace(
    saga_id: str, base: str = DEFAULT_JAEGER_URL, timeout: float = 10
) -> list[TraceSpan]:
    """The saga's spans from Jaeger, by start time.

    Raises:
        LookupError: Jaeger has no trace for the saga (yet: spans are exported in batches).
        OSError: Jaeger could not be reached.
    """
    url = f"{base.rstrip('/')}/api/traces/{trace_id_for(saga_id):032x}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body: dict[str, Any] = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise LookupError(f"Jaeger at {base} has no trace for saga {saga_id!r}") from None
        raise
    traces = body.get("data") or []
    if not traces:
        raise LookupError(f"Jaeger at {base} has no trace for saga {saga_id!r}")
    trace = traces[0]
    services = {k: v["serviceName"] for k, v in trace["processes"].items()}
    spans = []
    for s in trace["spans"]:
        refs = s.get("references") or []
        parent = next((r["spanID"] for r in refs if r["refType"] == "CHILD_OF"), None)
        links = tuple(r["spanID"] for r in refs if r["refType"] == "FOLLOWS_FROM")
        error = any(t.get("key") == "error" and t.get("value") for t in s.get("tags", []))
        spans.append(
            TraceSpan(
                s["spanID"],
                parent,
                links,
                services.get(s["processID"], "?"),
                s["operationName"],
                int(s["startTime"]),
                int(s["duration"]),
                error,
            )
        )
    # The root first, then by start time: the root is recorded at the same instant as the
    # first decision, and a waterfall reads best from the top of the tree.
    return sorted(spans, key=lambda x: (x.parent_id is not None, x.start_us, x.name))


@dataclass(frozen=True, slots=True)
class WaterfallRow:
    """One span placed on the waterfall's time axis."""

    span: TraceSpan
    depth: int
    """How deep it sits under the root (its label is indented by this)."""
    left: int
    """Columns of the axis before its bar starts."""
    size: int
    """Columns its bar takes (at least one)."""
    undoes: str | None
    """For a compensation linked to the step it undoes: that step's span name (``""`` if the
    linked span is not in the trace); ``None`` for every other span."""


def waterfall_rows(spans: list[TraceSpan], width: int = 48) -> list[WaterfallRow]:
    """Places the spans, in their order, on a time axis ``width`` columns wide."""
    if not spans:
        return []
    t0 = min(s.start_us for s in spans)
    t1 = max(s.start_us + s.duration_us for s in spans)
    scale = width / max(1, t1 - t0)
    by_id = {s.span_id: s for s in spans}

    def depth(s: TraceSpan) -> int:
        d, seen = 0, set()
        while s.parent_id in by_id and s.parent_id not in seen:
            seen.add(s.parent_id)
            s = by_id[s.parent_id]
            d += 1
        return d

    rows = []
    for s in spans:
        undoes = None
        if s.links and s.name.startswith("compensate"):
            target = by_id.get(s.links[0])
            undoes = target.name if target else ""
        left = int((s.start_us - t0) * scale)
        rows.append(WaterfallRow(s, depth(s), left, max(1, int(s.duration_us * scale)), undoes))
    return rows


def trace_millis(spans: list[TraceSpan]) -> float:
    """Milliseconds from the first span's start to the last span's end."""
    if not spans:
        return 0.0
    return (max(s.start_us + s.duration_us for s in spans) - min(s.start_us for s in spans)) / 1000


def orphans(spans: list[TraceSpan]) -> list[TraceSpan]:
    """Spans whose parent is not in the trace (yet: spans are exported in batches)."""
    ids = {s.span_id for s in spans}
    return [s for s in spans if s.parent_id and s.parent_id not in ids]


def waterfall(spans: list[TraceSpan], width: int = 48) -> str:
    """Spans as indented rows with bars on a shared time axis."""
    if not spans:
        return "(no spans)"
    rows = [f"trace of {trace_millis(spans):.1f} ms, {len(spans)} spans"]
    for r in waterfall_rows(spans, width):
        s = r.span
        bar = " " * r.left + ("!" if s.error else "=") * r.size
        label = "  " * r.depth + s.name
        undo = "" if r.undoes is None else f"  (undoes {r.undoes or 'a step'})"
        rows.append(
            f"{s.service[:16]:<16} {label[:40]:<40} |{bar:<{width}}| "
            f"{s.duration_us / 1000:8.1f} ms{undo}"
        )
    if missing := orphans(spans):
        rows.append(f"({len(missing)} spans whose parent is not in the trace yet)")
    return "\n".join(rows)
