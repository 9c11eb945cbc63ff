"""One saga's history as spans: what each step did, when, and how it ended.

`saga replay` draws these as text rows and `saga timeline` as an SVG page; both read the same
`SagaSpans`, built here from the events alone (no clock, no broker), so the pictures agree.

An *attempt* runs from its ``step_started`` (or ``compensation_started``) to the event that
closes it: succeeded, failed, timed out, stuck, or a retry being scheduled (then it failed, or
timed out if the error is ``Timeout``). A *wait* runs from a scheduled retry to the next attempt
(or to the event that abandoned the retries), or, for a durable timer (``kind="timer"``), from
``step_scheduled`` to the step's start (or its skip). What is still open when the events end is
``running`` up to the last event.

The steps of the primitives: a fan-out's items (``dishes[0]``, ...) are rows of their own,
placed right after their step's row and marked with it (`StepRow.item_of`); a skipped step
keeps its reason (`StepRow.skipped`) and a mark; an expansion, a signal taken, an approval's
reminders and decision, and a sub-saga's start are marks on their step's row; signals (taken
or refused), a passed deadline and a parent's compensation are marks of the saga.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from saga.core.definition import split_item
from saga.core.messages import (
    ApprovalReminded,
    CancelRejected,
    CompensationResolved,
    CompensationRetryScheduled,
    CompensationStarted,
    CompensationSucceeded,
    ErrorInfo,
    EventBase,
    Phase,
    RequestDenied,
    SagaAborted,
    SagaCompensated,
    SagaCompensationAsked,
    SagaCompleted,
    SagaDeadlinePassed,
    SagaRejected,
    SagaResumed,
    SagaStarted,
    SagaStuck,
    SignalReceived,
    SignalRejected,
    StartIgnored,
    StartRefused,
    StepEvent,
    StepExpanded,
    StepFailedEvent,
    StepResolved,
    StepRetryScheduled,
    StepScheduled,
    StepSkipped,
    StepStarted,
    StepStuck,
    StepSucceeded,
    StepTimedOut,
)
from saga.core.state import SagaState, evolve
from saga.errors import IllegalTransition

__all__ = [
    "Attempt",
    "Marker",
    "Outcome",
    "SagaSpans",
    "StepRow",
    "Wait",
    "WaitKind",
    "spans",
    "step_of",
]

Outcome = Literal["succeeded", "failed", "timed_out", "stuck", "running"]
"""How an attempt ended (``running``: it had not ended when the events stop)."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of a step's action or compensation."""

    phase: Phase
    attempt: int
    start: float
    end: float
    outcome: Outcome
    error: ErrorInfo | None = None


WaitKind = Literal["retry", "timer"]
"""A backoff before a retry, or a durable timer before a step's start."""


@dataclass(frozen=True, slots=True)
class Wait:
    """A backoff between a failed attempt and the next one, or a step's timer."""

    phase: Phase
    start: float
    end: float
    kind: WaitKind = "retry"


@dataclass(frozen=True, slots=True)
class Marker:
    """A point in time worth a mark: a saga event, or an operator's resolve of one step."""

    at: float
    kind: str
    """The event's ``type``, e.g. ``saga_aborted``."""
    label: str


@dataclass
class StepRow:
    """Everything one step did, in order."""

    name: str
    attempts: list[Attempt] = field(default_factory=list)
    """Action attempts."""
    compensations: list[Attempt] = field(default_factory=list)
    """Compensation attempts."""
    waits: list[Wait] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    """Points on this row: a failure before any attempt, a resolve, a skip, an expansion, a
    signal taken, an approval's reminders and decision, a sub-saga started."""
    item_of: str | None = None
    """For a fan-out's item (``dishes[1]``): its step (``dishes``)."""
    skipped: str | None = None
    """Why the step did not run, if it was skipped."""

    def span(self, phase: Phase) -> tuple[float, float, Outcome] | None:
        """From the first attempt of ``phase`` to the end of the last, and the last's outcome."""
        found = self.attempts if phase == "action" else self.compensations
        if not found:
            return None
        ends = [a.end for a in found] + [w.end for w in self.waits if w.phase == phase]
        return found[0].start, max(ends), found[-1].outcome


@dataclass
class SagaSpans:
    """One saga's rows and marks, and its state folded from the same events."""

    saga_id: str
    name: str
    version: int
    start: float
    end: float
    rows: list[StepRow]
    markers: list[Marker]
    state: SagaState | None
    """The fold of the events (``None`` if they do not fold: a gap or an illegal event)."""
    events: Sequence[EventBase]

    @property
    def status(self) -> str:
        """The saga's status after the last event (``unknown`` if the events do not fold)."""
        return self.state.status.value if self.state is not None else "unknown"

    @property
    def duration(self) -> float:
        """Seconds from the first event to the last."""
        return self.end - self.start


_SAGA_MARKS = {
    SagaStarted: "started",
    SagaAborted: "aborted",
    SagaCompleted: "completed",
    SagaCompensated: "compensated",
    SagaStuck: "stuck",
    SagaResumed: "resumed",
    CancelRejected: "cancel rejected",
    SagaRejected: "rejected",
    StartIgnored: "start ignored",
    StartRefused: "start refused",
    RequestDenied: "request denied",
    SignalReceived: "signal",
    SignalRejected: "signal rejected",
    SagaDeadlinePassed: "deadline passed",
    SagaCompensationAsked: "compensation asked by the parent",
}


_WITH_REASON = (
    SagaAborted
    | SagaStuck
    | CancelRejected
    | SagaRejected
    | StartIgnored
    | StartRefused
    | RequestDenied
    | SignalRejected
)
"""The saga-level events that carry a ``reason``, shown with their mark."""


class _Open:
    """The attempt and wait in flight for one step and phase, while the events are read."""

    def __init__(self) -> None:
        self.attempt: tuple[int, float] | None = None
        self.wait_from: float | None = None
        self.timer_from: float | None = None


def spans(events: Sequence[EventBase]) -> SagaSpans:
    """Builds one saga's spans from its events, in log order.

    Raises:
        ValueError: ``events`` is empty.
    """
    if not events:
        raise ValueError("a saga's spans need at least one event")
    first = events[0]
    # A saga's first event is its start, or a rejected start that a valid one followed.
    started = next((e for e in events if isinstance(e, SagaStarted)), None)
    rows: dict[str, StepRow] = {n: StepRow(n) for n in (started.steps if started else [])}
    markers: list[Marker] = []
    open_: dict[tuple[str, Phase], _Open] = {}
    state = _fold(events)

    def row(name: str) -> StepRow:
        found = rows.get(name)
        if found is None:
            base, index = split_item(name)
            found = rows[name] = StepRow(name, item_of=base if index is not None else None)
        return found

    def timer_ends(name: str, at: float) -> None:
        slot = open_.setdefault((name, "action"), _Open())
        if slot.timer_from is not None:
            row(name).waits.append(Wait("action", slot.timer_from, at, "timer"))
            slot.timer_from = None

    def close(name: str, phase: Phase, at: float, outcome: Outcome, err: ErrorInfo | None) -> None:
        slot = open_.setdefault((name, phase), _Open())
        r = row(name)
        if slot.wait_from is not None:
            # The retries were abandoned (or resumed) before another attempt started.
            r.waits.append(Wait(phase, slot.wait_from, at))
            slot.wait_from = None
        if slot.attempt is None:
            if outcome != "succeeded":
                r.markers.append(Marker(at, f"{phase}_{outcome}", _error_text(outcome, err)))
            return
        number, start = slot.attempt
        found = r.attempts if phase == "action" else r.compensations
        found.append(Attempt(phase, number, start, at, outcome, err))
        slot.attempt = None

    def begin(name: str, phase: Phase, number: int, at: float) -> None:
        slot = open_.setdefault((name, phase), _Open())
        if slot.attempt is not None:  # not in a legal log; drawn as cut short rather than lost
            close(name, phase, at, "running", None)
        if slot.wait_from is not None:
            row(name).waits.append(Wait(phase, slot.wait_from, at))
            slot.wait_from = None
        slot.attempt = (number, at)

    def retry(name: str, phase: Phase, at: float, err: ErrorInfo) -> None:
        close(name, phase, at, "timed_out" if err.type == "Timeout" else "failed", err)
        open_[(name, phase)].wait_from = at

    for e in events:
        at = e.at
        if isinstance(e, StepStarted | StepExpanded | StepSkipped):
            timer_ends(e.step, at)
        if isinstance(e, StepStarted):
            begin(e.step, "action", e.attempt, at)
            if e.child is not None:
                row(e.step).markers.append(Marker(at, "sub_saga", f"started sub-saga {e.child}"))
        elif isinstance(e, StepScheduled):
            open_.setdefault((e.step, "action"), _Open()).timer_from = at
        elif isinstance(e, StepSkipped):
            row(e.step).skipped = e.reason
            row(e.step).markers.append(Marker(at, e.type, f"skipped: {e.reason}"))
        elif isinstance(e, StepExpanded):
            row(e.step).markers.append(Marker(at, e.type, f"expanded into {e.count} items"))
            for i in range(e.count):
                row(f"{e.step}[{i}]")
        elif isinstance(e, ApprovalReminded):
            who = ", ".join(e.recipients) or "the approvers"
            what = "escalated to" if e.escalated else "reminded"
            row(e.step).markers.append(Marker(at, e.type, f"{what} {who}"))
        elif isinstance(e, CompensationStarted):
            begin(e.step, "compensation", e.attempt, at)
        elif isinstance(e, StepSucceeded):
            close(e.step, "action", at, "succeeded", None)
            decided = _decision(e)
            if decided is not None:
                row(e.step).markers.append(Marker(at, decided[0], decided[1]))
        elif isinstance(e, CompensationSucceeded):
            close(e.step, "compensation", at, "succeeded", None)
        elif isinstance(e, StepRetryScheduled):
            retry(e.step, "action", at, e.error)
        elif isinstance(e, CompensationRetryScheduled):
            retry(e.step, "compensation", at, e.error)
        elif isinstance(e, StepFailedEvent):
            close(e.step, "action", at, "failed", e.error)
        elif isinstance(e, StepTimedOut):
            close(e.step, "action", at, "timed_out", None)
        elif isinstance(e, StepStuck):
            close(e.step, e.phase, at, "stuck", e.error)
        elif isinstance(e, StepResolved | CompensationResolved):
            row(e.step).markers.append(Marker(at, e.type, f"resolved: {e.note}"))
        kind = type(e)
        if kind in _SAGA_MARKS:
            label = _SAGA_MARKS[kind]
            reason = e.reason if isinstance(e, _WITH_REASON) else None
            text = f"{label}: {reason}" if reason else label
            if isinstance(e, SignalReceived | SignalRejected):
                text = f"{label} {e.name}" + (f": {reason}" if reason else "")
                text += f" (by {e.by})" if e.by else ""
            markers.append(Marker(at, e.type, text))
    end = events[-1].at
    for (name, phase), slot in open_.items():
        if slot.attempt is not None:
            close(name, phase, end, "running", None)
        elif slot.wait_from is not None:
            row(name).waits.append(Wait(phase, slot.wait_from, end))
        if slot.timer_from is not None:
            row(name).waits.append(Wait(phase, slot.timer_from, end, "timer"))
    return SagaSpans(
        saga_id=first.saga_id,
        name=started.name if started else (state.name if state else "?"),
        version=started.version if started else (state.version if state else 0),
        start=first.at,
        end=max(end, first.at),
        rows=_ordered(list(rows.values())),
        markers=markers,
        state=state,
        events=events,
    )


def step_of(event: EventBase) -> str | None:
    """The step an event is about: a step event's, or the step whose failure caused an abort.

    Views show it in a column of its own, so an abort's step is shown there too.
    """
    if isinstance(event, StepEvent | SagaAborted):
        return event.step
    return None


def _ordered(rows: list[StepRow]) -> list[StepRow]:
    """The rows with each fan-out's items right after their step, in index order."""
    items: dict[str, list[StepRow]] = {}
    for r in rows:
        if r.item_of is not None:
            items.setdefault(r.item_of, []).append(r)
    out: list[StepRow] = []
    for r in rows:
        if r.item_of is None:
            out.append(r)
            found = items.pop(r.name, [])
            out += sorted(found, key=lambda i: split_item(i.name)[1] or 0)
    for orphans in items.values():  # items of a step the start did not list: kept, at the end
        out += orphans
    return out


def _decision(e: StepSucceeded) -> tuple[str, str] | None:
    """The mark of how a waiting step was answered: the signal it took, or who approved."""
    if e.signal is not None:
        return "signal_taken", f"took signal {e.signal}"
    if e.output.get("approved") is True:
        return "approved", f"approved by {e.output.get('by') or 'someone'}"
    return None


def _fold(events: Sequence[EventBase]) -> SagaState | None:
    state: SagaState | None = None
    try:
        for e in events:
            state = evolve(state, e)
    except IllegalTransition:
        return None
    return state


def _error_text(outcome: str, error: ErrorInfo | None) -> str:
    what = outcome.replace("_", " ")
    return f"{what}: {error.type}: {error.message}" if error else what
