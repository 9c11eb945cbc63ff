"""Text views of sagas for people: status, history and timeline, lists, rebuild reports.

Each view is plain text, which is what the commands print when standard output is not a
terminal (scripts and tests read it, so it stays as it is). The ones that are tables also come
as `rich` renderables (``*_view``), which the commands print on a terminal instead: the same
columns, sized to the terminal and coloured by status.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from saga.core.messages import (
    ApprovalReminded,
    CompensationRetryScheduled,
    EventBase,
    SagaDeadlinePassed,
    SignalReceived,
    SignalRejected,
    StepEvent,
    StepFailedEvent,
    StepRetryScheduled,
    StepSkipped,
    StepStarted,
    StepStuck,
    StepSucceeded,
)
from saga.core.state import SagaState
from saga.views.jaeger import TraceSpan, orphans, trace_millis, waterfall_rows
from saga.views.rebuild import BadRecord, RebuildReport
from saga.views.spans import SagaSpans, spans, step_of
from saga.views.styles import add_row, status_style

__all__ = [
    "rebuild",
    "replay",
    "replay_view",
    "status",
    "status_view",
    "summary_row",
    "table",
    "table_view",
    "timeline",
    "trace_view",
    "tree_line",
]

_WITH_ERROR = (StepRetryScheduled, StepFailedEvent, StepStuck, CompensationRetryScheduled)
"""The events that carry an `ErrorInfo`."""


def _time(at: float | None) -> str:
    if at is None:
        return "-"
    return datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S.%f")[:-3]


def status(state: SagaState) -> str:
    """A saga's state: its status, progress and each step's status, attempts and result."""
    lines = [
        f"saga      {state.saga_id}",
        f"name      {state.name} v{state.version}",
        f"status    {state.status.value}  ({state.percent_complete()}% complete)",
        f"started   {_time(state.started_at)} UTC   updated {_time(state.updated_at)} UTC",
    ]
    if state.digest:
        lines.insert(2, f"digest    {state.digest}")
    if state.reason:
        lines.append(f"reason    {state.reason}")
    lines.append("")
    lines.append(f"{'step':<16} {'status':<22} {'attempts':>8}  result")
    for name, step, attempts, result in _steps(state):
        lines.append(f"{name:<16} {step:<22} {attempts:>8}  {result}")
    return "\n".join(lines)


def tree_line(depth: int, state: SagaState) -> str:
    """One sub-saga in `saga status`'s tree, indented by its depth."""
    return f"{'  ' * depth}└ {state.saga_id}  {state.name}  {state.status.value}"


def status_view(state: SagaState) -> RenderableType:
    """`status` for a terminal: the same fields, the steps as a table."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    value = state.status.value
    add_row(head, "saga", state.saga_id)
    add_row(head, "name", f"{state.name} v{state.version}")
    if state.digest:
        add_row(head, "digest", state.digest)
    add_row(
        head,
        "status",
        Text.assemble((value, status_style(value)), f"  ({state.percent_complete()}% complete)"),
    )
    add_row(
        head, "started", f"{_time(state.started_at)} UTC   updated {_time(state.updated_at)} UTC"
    )
    if state.reason:
        add_row(head, "reason", state.reason)
    steps = Table(header_style="bold")
    steps.add_column("step")
    steps.add_column("status")
    steps.add_column("attempts", justify="right")
    steps.add_column("result", overflow="fold")
    for name, step, attempts, result in _steps(state):
        add_row(steps, name, Text(step, style=status_style(step)), attempts, result)
    return Group(head, Text(""), steps)


def _steps(state: SagaState) -> list[tuple[str, str, str, str]]:
    """Each step's name, status, attempts (``2+1c``: 2 of the action, 1 of the compensation)
    and result: its error while it has not ended well, else its output."""
    rows = []
    for name, step in state.steps.items():
        attempts = str(step.attempt)
        if step.compensation_attempt:
            attempts += f"+{step.compensation_attempt}c"
        if step.error is not None and step.status.value not in ("succeeded", "compensated"):
            result = f"{step.error.type}: {step.error.message}"
        elif step.output:
            result = _short(step.output)
        else:
            result = ""
        rows.append((name, step.status.value, attempts, result))
    return rows


def replay(events: Sequence[EventBase], width: int = 60) -> str:
    """A saga's whole history: every event in order with its wall time, then a timeline.

    Args:
        events: The saga's events, in log order.
        width: Columns of the timeline's drawing area.
    """
    if not events:
        return "(no events)"
    sp = spans(events)
    multi_day = _day(sp.start) != _day(sp.end)
    lines = [
        f"saga      {sp.saga_id}",
        f"name      {sp.name} v{sp.version}",
        *([f"digest    {sp.state.digest}"] if sp.state and sp.state.digest else []),
        f"status    {sp.status}",
        f"span      {_day(sp.start)} {_time(sp.start)} -> {_time(sp.end)} UTC "
        f"({sp.duration:.3f}s, {len(events)} events)",
        "",
        f"{'seq':>4}  {'time (UTC)':<{23 if multi_day else 12}}  {'+s':>9}  {'event':<28} "
        f"{'step':<14} {'att':>3}  detail",
    ]
    for e in events:
        wall = f"{_day(e.at)} {_time(e.at)}" if multi_day else _time(e.at)
        step = step_of(e) or ""
        lines.append(
            f"{e.seq:>4}  {wall}  {e.at - sp.start:>+9.3f}  {e.type:<28} {step:<14} "
            f"{_attempt(e):>3}  {_detail(e)}".rstrip()
        )
    lines += ["", *timeline(sp, width)]
    return "\n".join(lines)


def replay_view(events: Sequence[EventBase], width: int = 60) -> RenderableType:
    """`replay` for a terminal: the events as a table, then the same timeline."""
    if not events:
        return Text("(no events)")
    sp = spans(events)
    multi_day = _day(sp.start) != _day(sp.end)
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    add_row(head, "saga", sp.saga_id)
    add_row(head, "name", f"{sp.name} v{sp.version}")
    if sp.state and sp.state.digest:
        add_row(head, "digest", sp.state.digest)
    add_row(head, "status", Text(sp.status, style=status_style(sp.status)))
    add_row(
        head,
        "span",
        f"{_day(sp.start)} {_time(sp.start)} -> {_time(sp.end)} UTC "
        f"({sp.duration:.3f}s, {len(events)} events)",
    )
    table = Table(header_style="bold")
    table.add_column("seq", justify="right")
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("+s", justify="right", no_wrap=True)
    table.add_column("event", no_wrap=True)
    table.add_column("step")
    table.add_column("att", justify="right")
    table.add_column("detail", overflow="fold")
    for e in events:
        add_row(
            table,
            str(e.seq),
            f"{_day(e.at)} {_time(e.at)}" if multi_day else _time(e.at),
            f"{e.at - sp.start:+.3f}",
            e.type,
            step_of(e) or "",
            _attempt(e),
            _detail(e),
        )
    drawing = Text("\n".join(timeline(sp, width)), no_wrap=True, overflow="crop")
    return Group(head, Text(""), table, Text(""), drawing)


def _lead(e: EventBase, data: dict[str, Any]) -> list[str]:
    """What an event of the primitives says in words, first in its detail; the fields that it
    words are taken out of ``data``, so they are not shown twice."""
    if isinstance(e, StepSkipped):
        return []  # its reason is the whole story, and is shown as reason=...
    if isinstance(e, ApprovalReminded):
        del data["escalated"], data["recipients"]
        who = ", ".join(e.recipients) or "the approvers"
        return [f"escalated to {who}" if e.escalated else f"reminded {who}"]
    if isinstance(e, SignalReceived | SignalRejected):
        del data["name"]
        return [f"signal {e.name}"]
    if isinstance(e, StepSucceeded) and e.signal is not None:
        del data["signal"]
        return [f"took signal {e.signal}"]
    if isinstance(e, StepSucceeded) and e.output.get("approved") is True:
        return [f"approved by {e.output.get('by') or 'someone'}"]
    if isinstance(e, StepStarted) and e.child is not None:
        del data["child"]
        return [f"started sub-saga {e.child}"]
    if isinstance(e, SagaDeadlinePassed):
        del data["compensating"]
        return ["before the pivot: compensating" if e.compensating else "after the pivot: goes on"]
    return []


def _attempt(e: EventBase) -> str:
    return str(e.attempt) if isinstance(e, StepEvent) else ""


def _day(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d")


_SHOWN_ELSEWHERE = {"v", "saga_id", "seq", "at", "type", "step", "error"}
_REASON_LIMIT = 200
"""Characters of a reason shown (a condition's explanation, a refusal's cause): these are
what a reader looks for, so they are cut far later than other values."""


def _detail(e: EventBase) -> str:
    exclude = _SHOWN_ELSEWHERE | ({"attempt"} if isinstance(e, StepEvent) else set())
    data = e.model_dump(mode="json", exclude=exclude)
    parts = _lead(e, data)
    for k, v in data.items():
        if v in (None, [], {}):
            continue
        if k.endswith("_at") and isinstance(v, float):
            # Deadlines and retry times are read against the time column, so show them alike.
            parts.append(f"{k}={_time(v)}")
        elif k == "reason":
            parts.append(f"reason={_short(v, _REASON_LIMIT)}")
        else:
            parts.append(f"{k}={_short(v)}")
    if isinstance(e, _WITH_ERROR):
        error = e.error
        kind = "business" if error.business else "technical"
        parts.append(f"error=[{kind}] {error.type}: {_short(error.message)}")
    return " ".join(parts)


# Glyphs of the text timeline; `_LEGEND` explains them and must stay in step with them.
_ACTION_END = {"succeeded": ">", "failed": "x", "timed_out": "?", "stuck": "!", "running": "="}
_UNDO_END = {"succeeded": "]", "failed": "x", "timed_out": "?", "stuck": "!", "running": "<"}
_SAGA_GLYPH = {
    "saga_started": "*",
    "saga_aborted": "A",
    "saga_completed": "C",
    "saga_compensated": "K",
    "saga_stuck": "S",
    "saga_resumed": "R",
    "cancel_rejected": "c",
    "saga_rejected": "X",
    "start_ignored": "d",
    "start_refused": "D",
    "request_denied": "N",
    "signal_received": "s",
    "signal_rejected": "r",
    "saga_deadline_passed": "T",
    "saga_compensation_asked": "P",
}
_ROW_GLYPH = {
    "step_skipped": "-",
    "step_expanded": "+",
    "approval_reminded": "@",
    "approved": "a",
    "signal_taken": "s",
    "sub_saga": "&",
}
_LEGEND = [
    "legend: = action attempt   . retry wait   > succeeded   x failed   ? timed out",
    "        ! stuck   < compensating   ] compensated   o failed/resolved without an attempt",
    "        ~ timer   - skipped   + fanned out   s took its signal   @ reminded/escalated",
    "        a approved   & sub-saga started   [i] a fan-out's item, under its step",
    "        saga: * started  A aborted  C completed  K compensated  S stuck  R resumed",
    "              c cancel rejected  X start rejected  d duplicate start  D duplicate refused",
    "              N request denied by the policy   s signal   r signal rejected",
    "              T deadline passed   P compensation asked by the parent",
]


def timeline(sp: SagaSpans, width: int = 60) -> list[str]:
    """Gantt-like rows, one per step, across ``width`` columns from the first event to the last.

    A step's action is drawn from its first attempt to its outcome, its compensation likewise;
    the last row marks the saga's own events. Returns the lines, legend included.
    """
    total = sp.end - sp.start

    def col(at: float) -> int:
        if total <= 0:
            return 0
        return min(width - 1, max(0, int((at - sp.start) / total * width)))

    label = max([4, *(len(r.name) for r in sp.rows)])
    label = min(label, 20)
    left, right = "+0s", f"+{total:.3f}s"
    lines = [
        f"timeline  (1 column = {total / width:.3f}s)",
        f"{'':<{label}} {left}{' ' * max(1, width + 2 - len(left) - len(right))}{right}",
    ]
    for r in sp.rows:
        cells = [" "] * width
        for w in r.waits:
            for c in range(col(w.start), col(w.end) + 1):
                cells[c] = "~" if w.kind == "timer" else "."
        for attempts, body in ((r.attempts, "="), (r.compensations, "<")):
            for a in attempts:
                for c in range(col(a.start), col(a.end) + 1):
                    cells[c] = body
        # Outcomes last, so that neither a zero-length attempt nor the compensation that
        # starts in the same column hides how an attempt ended.
        for attempts, ends in ((r.attempts, _ACTION_END), (r.compensations, _UNDO_END)):
            for a in attempts:
                cells[col(a.end)] = ends[a.outcome]
        for m in r.markers:
            cells[col(m.at)] = _ROW_GLYPH.get(m.kind, "o")
        # A fan-out's items are drawn under their step, indented by their index alone.
        name = f"  [{r.name.rpartition('[')[2]}" if r.item_of is not None else r.name
        lines.append(f"{name[:label]:<{label}} |{''.join(cells)}|")
    cells = [" "] * width
    for m in sp.markers:
        cells[col(m.at)] = _SAGA_GLYPH.get(m.kind, "+")
    lines.append(f"{'saga':<{label}} |{''.join(cells)}|")
    lines += _LEGEND
    return lines


def summary_row(state: SagaState) -> dict[str, Any]:
    """The fields `saga list --json` prints for one saga."""
    return {
        "saga_id": state.saga_id,
        "name": state.name,
        "status": state.status.value,
        "percent": state.percent_complete(),
        "started_at": state.started_at,
        "updated_at": state.updated_at,
        "reason": state.reason,
    }


def table(states: Sequence[SagaState]) -> str:
    """Sagas as a table, one per line."""
    lines = [f"{'saga':<34} {'name':<14} {'status':<13} {'done':>5}  started"]
    for s in states:
        lines.append(
            f"{s.saga_id:<34} {s.name:<14} {s.status.value:<13} {s.percent_complete():>4}%  "
            f"{_time(s.started_at)}"
        )
    lines.append(f"({len(states)} sagas)")
    return "\n".join(lines)


def table_view(states: Sequence[SagaState]) -> RenderableType:
    """`table` for a terminal."""
    found = Table(header_style="bold", caption=f"{len(states)} sagas")
    found.add_column("saga", overflow="fold")
    found.add_column("name")
    found.add_column("status")
    found.add_column("done", justify="right")
    found.add_column("started", no_wrap=True)
    for s in states:
        value = s.status.value
        add_row(
            found,
            s.saga_id,
            s.name,
            Text(value, style=status_style(value)),
            f"{s.percent_complete()}%",
            _time(s.started_at),
        )
    return found


def trace_view(trace: list[TraceSpan], width: int = 48) -> RenderableType:
    """`saga.views.jaeger.waterfall` for a terminal: the spans as rows of a table, the bars on
    a shared time axis (errors in red, compensations in yellow)."""
    if not trace:
        return Text("(no spans)")
    missing = orphans(trace)
    table = Table(
        title=f"trace of {trace_millis(trace):.1f} ms, {len(trace)} spans",
        header_style="bold",
        caption=f"{len(missing)} spans whose parent is not in the trace yet" if missing else None,
    )
    table.add_column("service", max_width=16, no_wrap=True)
    table.add_column("span", max_width=40, no_wrap=True)
    table.add_column("time", width=width, no_wrap=True)
    table.add_column("ms", justify="right", no_wrap=True)
    table.add_column("undoes")
    for r in waterfall_rows(trace, width):
        s = r.span
        style = "red" if s.error else "yellow" if r.undoes is not None else "blue"
        # Errors get a glyph of their own too, so that they show without colours (NO_COLOR).
        bar = Text(" " * r.left) + Text(("▓" if s.error else "█") * r.size, style=style)
        undoes = "" if r.undoes is None else r.undoes or "a step"
        add_row(
            table, s.service, "  " * r.depth + s.name, bar, f"{s.duration_us / 1000:.1f}", undoes
        )
    return table


def _short(value: Any, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def rebuild(report: RebuildReport, limit: int = 50) -> str:
    """`saga rebuild`'s report: counts, speed, sagas by status, then every problem found."""
    starts = ", ".join(f"{p}:{'-' if o is None else o}" for p, o in report.start_offsets.items())
    lines = [
        f"log        {report.log_topic} ({report.partitions} partitions), from offsets {starts}",
        f"read       {report.events_read} events ({report.records_read} records) in "
        f"{report.seconds:.3f}s, {report.events_per_second:,.0f} events/s",
        f"rebuilt    {len(report.states)} sagas ({report.from_snapshot} from a snapshot)",
        "by status  " + ("  ".join(f"{k} {v}" for k, v in report.by_status.items()) or "-"),
        f"verdict    {'consistent' if report.consistent else 'INCONSISTENT'}: "
        f"{len(report.mismatches)} mismatches, {len(report.illegal)} events that do not fold",
    ]
    sections: list[tuple[str, list[str]]] = [
        (
            "mismatches (saga: differing fields)",
            [
                f"{m.saga_id}: {', '.join(m.fields)} "
                f"(rebuilt seq {m.rebuilt_seq}, snapshot seq {m.snapshot_seq})"
                for m in report.mismatches
            ],
        ),
        ("undecodable records", [_bad(b) for b in report.undecodable]),
        ("events that do not fold", [_bad(b) for b in report.illegal]),
        ("not rebuilt", [f"{n.saga_id}: {n.reason}" for n in report.not_rebuilt]),
        ("unverified (moved on while the log was read; run again)", report.unverified),
    ]
    for title, items in sections:
        if items:
            lines += ["", f"{title}: {len(items)}"]
            lines += [f"  {item}" for item in items[:limit]]
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more (see --json)")
    return "\n".join(lines)


def _bad(b: BadRecord) -> str:
    return f"{b.topic}/{b.partition}@{b.offset} key={b.key}: {b.reason}"
