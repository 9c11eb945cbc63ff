"""One saga's timeline as a self-contained HTML page: inline SVG and CSS, nothing fetched.

The page is for a person looking at one saga after the fact (attach it to an incident, open it
from a laptop with no access to the cluster), so it carries everything inline and runs no
script. It is also well-formed XML, which keeps it easy to check and to post-process.

Layout: a header (id, name, status, duration); one SVG row per step, the action's attempts in
the row's upper lane and the compensation's in its lower lane, coloured by outcome, with retry
waits hatched and durable timers shaded; a fan-out's items as indented rows under their step;
points on a row for what happened to its step without an attempt (a skip, with its reason; an
expansion; a signal taken; a reminder; an approval); the saga's own events (signals among them)
as labelled vertical marks; a legend; then every event in a table.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path

import orjson

from saga.core.messages import EventBase, StepEvent
from saga.views.spans import Attempt, SagaSpans, StepRow, Wait, spans, step_of

__all__ = ["page", "write_page"]

_WIDTH = 1000
_LABEL = 150
_RIGHT = 30
_CHART = _WIDTH - _LABEL - _RIGHT
_TOP = 46
_ROW = 40
_LANE = 14
_MIN_BAR = 3.0
"""Pixels: an attempt shorter than this is widened to it, so that it can be seen and hovered."""

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 8px; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; margin: 0 0 16px; }
dt { color: #666; } dd { margin: 0; }
.status-completed { color: #2e7d32; } .status-compensated { color: #00897b; }
.status-stuck { color: #6a1b9a; } .status-running, .status-compensating { color: #1565c0; }
.status-rejected { color: #c62828; }
svg text { font: 12px system-ui, sans-serif; fill: #222; }
svg .axis { stroke: #bbb; } svg .grid { stroke: #eee; }
rect.succeeded { fill: #2e7d32; } rect.compensation.succeeded { fill: #00897b; }
rect.failed { fill: #c62828; } rect.timed_out { fill: #ef6c00; }
rect.stuck { fill: #6a1b9a; } rect.running { fill: #1565c0; }
.wait { fill: url(#hatch); stroke: #999; stroke-width: 0.5; }
.wait.timer, rect.swatch.timer { fill: #bbdefb; stroke: #1565c0; stroke-dasharray: 2 2; }
g.row.skipped text { fill: #999; text-decoration: line-through; }
.mark line { stroke-width: 1.5; stroke-dasharray: 4 3; }
.mark.saga_completed line { stroke: #2e7d32; } .mark.saga_compensated line { stroke: #00897b; }
.mark.saga_aborted line { stroke: #c62828; } .mark.saga_stuck line { stroke: #6a1b9a; }
.mark.saga_started line, .mark.saga_resumed line, .mark.cancel_rejected line { stroke: #1565c0; }
.mark.saga_rejected line { stroke: #c62828; }
.mark.start_ignored line, .mark.start_refused line { stroke: #999; }
.mark.signal_received line { stroke: #1565c0; } .mark.signal_rejected line { stroke: #999; }
.mark.saga_deadline_passed line { stroke: #ef6c00; }
.point { fill: #fff; stroke: #222; stroke-width: 1.5; }
table { border-collapse: collapse; margin-top: 16px; font-size: 13px; }
th, td { text-align: left; padding: 3px 10px; border-bottom: 1px solid #eee; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.detail { font-family: ui-monospace, monospace; font-size: 12px; word-break: break-all; }
"""


def page(events: Sequence[EventBase]) -> str:
    """The HTML page of one saga's timeline, from its events in log order.

    Raises:
        ValueError: ``events`` is empty.
    """
    sp = spans(events)
    title = f"saga {sp.saga_id}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8"/>',
            f"<title>{_esc(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            _header(sp),
            _svg(sp),
            _table(sp),
            "</body>",
            "</html>",
            "",
        ]
    )


def write_page(events: Sequence[EventBase], path: str | Path) -> Path:
    """Writes `page` to ``path`` (UTF-8) and returns the path."""
    target = Path(path)
    target.write_text(page(events), encoding="utf-8")
    return target


_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _esc(text: str) -> str:
    # Escaped for HTML, and without the control characters that XML does not allow, so that
    # the page stays well-formed whatever a participant put in an error message.
    return escape(_CONTROL.sub("?", text))


def _wall(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _header(sp: SagaSpans) -> str:
    status = escape(sp.status)
    reason = sp.state.reason if sp.state is not None and sp.state.reason else None
    rows = [
        ("name", f"{_esc(sp.name)} v{sp.version}"),
        ("status", f'<strong class="status-{status}">{status}</strong>'),
        ("started", f"{_wall(sp.start)} UTC"),
        ("duration", f"{sp.duration:.3f}s ({len(sp.events)} events)"),
    ]
    if reason:
        rows.append(("reason", _esc(reason)))
    if sp.state is not None and sp.state.digest:
        rows.insert(1, ("digest", _esc(sp.state.digest)))
    items = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    return f"<header><h1>saga {_esc(sp.saga_id)}</h1><dl>{items}</dl></header>"


class _Scale:
    def __init__(self, sp: SagaSpans) -> None:
        self.start = sp.start
        self.total = sp.duration

    def x(self, at: float) -> float:
        if self.total <= 0:
            return float(_LABEL)
        return _LABEL + (at - self.start) / self.total * _CHART

    def width(self, start: float, end: float) -> float:
        return max(_MIN_BAR, self.x(end) - self.x(start))


def _svg(sp: SagaSpans) -> str:
    scale = _Scale(sp)
    bottom = _TOP + _ROW * len(sp.rows)
    height = bottom + 90
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_WIDTH} {height}" role="img" aria-label="timeline of saga '
        f'{_esc(sp.saga_id)}">',
        '<defs><pattern id="hatch" patternUnits="userSpaceOnUse" width="6" height="6" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="#f4f4f4"/>'
        '<line x1="0" y1="0" x2="0" y2="6" stroke="#999" stroke-width="2"/></pattern></defs>',
    ]
    for i in range(5):  # a grid line and label at each quarter of the saga's span
        at = sp.start + sp.duration * i / 4
        x = scale.x(at) if sp.duration > 0 else _LABEL + _CHART * i / 4
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        out.append(
            f'<line class="grid" x1="{x:.1f}" y1="{_TOP - 6}" x2="{x:.1f}" y2="{bottom}"/>'
            f'<text x="{x:.1f}" y="{_TOP - 10}" text-anchor="{anchor}">'
            f"+{sp.duration * i / 4:.3f}s</text>"
        )
    for i, row in enumerate(sp.rows):
        out.append(_row(row, _TOP + i * _ROW, scale))
    out.append(
        f'<line class="axis" x1="{_LABEL}" y1="{bottom}" x2="{_LABEL + _CHART}" y2="{bottom}"/>'
    )
    for n, m in enumerate(sp.markers):
        x = scale.x(m.at)
        label_y = bottom + 16 + 14 * (n % 3)  # staggered, as marks often fall close together
        # Labels near the right edge grow leftwards, so that they stay inside the picture.
        near_end = x > _LABEL + _CHART * 0.8
        text_x, anchor = (x - 3, "end") if near_end else (x + 3, "start")
        out.append(
            f'<g class="mark {escape(m.kind)}"><title>{_esc(m.label)} at {_wall(m.at)} UTC'
            f"</title>"
            f'<line x1="{x:.1f}" y1="{_TOP - 6}" x2="{x:.1f}" y2="{label_y - 10}"/>'
            f'<text x="{text_x:.1f}" y="{label_y}" text-anchor="{anchor}">'
            f"{escape(m.kind.removeprefix('saga_'))}</text></g>"
        )
    out.append(_legend(height - 20))
    out.append("</svg>")
    return "\n".join(out)


def _row(row: StepRow, top: int, scale: _Scale) -> str:
    name = escape(row.name)
    css = "row" + (" item" if row.item_of is not None else "") + (" skipped" if row.skipped else "")
    # An item is indented under its step, so a fan-out reads as one group of rows.
    x = 20 if row.item_of is not None else 8
    skipped = f"<title>{name} skipped: {_esc(row.skipped)}</title>" if row.skipped else ""
    out = [
        f'<g class="{css}" data-step="{name}">',
        f'<text x="{x}" y="{top + 17}">{name}{skipped}</text>',
        f'<text x="8" y="{top + 31}" fill="#888">undo</text>' if row.compensations else "",
    ]
    for w in row.waits:
        out.append(_wait(w, top, scale))
    for a in [*row.attempts, *row.compensations]:
        out.append(_bar(row.name, a, top, scale))
    for m in row.markers:
        y = top + 6 + _LANE // 2
        out.append(
            f'<circle class="point {escape(m.kind)}" cx="{scale.x(m.at):.1f}" cy="{y}" r="4">'
            f"<title>{escape(row.name)}: {_esc(m.label)} at {_wall(m.at)} UTC</title></circle>"
        )
    out.append("</g>")
    return "".join(out)


def _lane_y(phase: str, top: int) -> int:
    return top + 6 if phase == "action" else top + 6 + _LANE + 2


def _bar(step: str, a: Attempt, top: int, scale: _Scale) -> str:
    what = "attempt" if a.phase == "action" else "compensation attempt"
    tip = f"{step}: {what} {a.attempt} {a.outcome.replace('_', ' ')} after {a.end - a.start:.3f}s"
    if a.error is not None:
        tip += f" ({a.error.type}: {a.error.message})"
    return (
        f'<rect class="bar {a.phase} {a.outcome}" data-attempt="{a.attempt}" '
        f'x="{scale.x(a.start):.1f}" y="{_lane_y(a.phase, top)}" '
        f'width="{scale.width(a.start, a.end):.1f}" height="{_LANE}" rx="2">'
        f"<title>{_esc(tip)}</title></rect>"
    )


def _wait(w: Wait, top: int, scale: _Scale) -> str:
    css = "wait timer" if w.kind == "timer" else "wait"
    what = "timer" if w.kind == "timer" else "retry wait"
    return (
        f'<rect class="{css} {w.phase}" x="{scale.x(w.start):.1f}" y="{_lane_y(w.phase, top)}" '
        f'width="{scale.width(w.start, w.end):.1f}" height="{_LANE}">'
        f"<title>{what} {w.end - w.start:.3f}s</title></rect>"
    )


_LEGEND = [
    ("succeeded", "succeeded"),
    ("failed", "failed"),
    ("timed_out", "timed out"),
    ("stuck", "stuck"),
    ("running", "in flight"),
    ("compensation succeeded", "compensated"),
    ("wait", "retry wait"),
    ("timer", "timer"),
]


def _legend(y: int) -> str:
    out = ['<g class="legend">']
    x = _LABEL
    for css, label in _LEGEND:
        out.append(
            f'<rect class="swatch {css}" x="{x}" y="{y - 10}" width="14" height="12"/>'
            f'<text x="{x + 18}" y="{y}">{label}</text>'
        )
        x += 30 + 7 * len(label)
    out.append("</g>")
    return "".join(out)


_IN_COLUMNS = {"v", "saga_id", "seq", "at", "type", "step", "attempt"}


def _table(sp: SagaSpans) -> str:
    out = [
        "<table><thead><tr><th>seq</th><th>time (UTC)</th><th>+s</th><th>event</th>"
        "<th>step</th><th>attempt</th><th>detail</th></tr></thead><tbody>"
    ]
    for e in sp.events:
        data = e.model_dump(mode="json", exclude=_IN_COLUMNS, exclude_none=True)
        detail = orjson.dumps(data).decode() if data else ""
        if len(detail) > 400:
            detail = detail[:397] + "..."
        attempt = e.attempt if isinstance(e, StepEvent) else None
        out.append(
            f'<tr><td class="num">{e.seq}</td><td>{_wall(e.at)}</td>'
            f'<td class="num">{e.at - sp.start:.3f}</td><td>{escape(e.type)}'
            f"</td><td>{escape(step_of(e) or '')}</td>"
            f'<td class="num">{"" if attempt is None else attempt}</td>'
            f'<td class="detail">{_esc(detail)}</td></tr>'
        )
    out.append("</tbody></table>")
    return "\n".join(out)
