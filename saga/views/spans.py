"""One saga's history as spans: what each step did, when, and how it ended.

`saga replay` draws these as text rows and `saga timeline` as an SVG page; both read the same
`SagaSpans`, built here from the events alone (no clock, no broker), so the pictures agree.

An *attempt* runs from its ``step_started`` (or ``compensation_started``) to the event that
closes it: succeeded, failed, timed out, stuck, or a retry being scheduled (then it failed, or
timed out if the error is ``Timeout``). A *wait* runs from a scheduled retry to the next attempt
(or to the event that abandoned the retries). What is still open when the events end is
``running`` up to the last event.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from saga.core.messages import (
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
    SagaCompleted,
    SagaRejected,
    SagaResumed,
    SagaStarted,
    SagaStuck,
    StartIgnored,
    StartRefused,
    StepEvent,
    StepFailedEvent,
    StepResolved,
    StepRetryScheduled,
    StepStarted,
    StepStuck,
    StepSucceeded,
    StepTimedOut,
)
from saga.core.state import SagaState, evolve
from saga.errors import IllegalTransition

__all__ = ["Attempt", "Marker", "Outcome", "SagaSpans", "StepRow", "Wait", "spans", "step_of"]

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


@dataclass(frozen=True, slots=True)
class Wait:
    """A backoff between a failed attempt and the next one."""

    phase: Phase
    start: float
    end: float


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
    """Points on this row: a failure before any attempt, a resolve."""

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
}


_WITH_REASON = (
    SagaAborted
    | SagaStuck
    | CancelRejected
    | SagaRejected
    | StartIgnored
    | StartRefused
    | RequestDenied
)
"""The saga-level events that carry a ``reason``, shown with their mark."""


class _Open:
    """The attempt and wait in flight for one step and phase, while the events are read."""

    def __init__(self) -> None:
        self.attempt: tuple[int, float] | None = None
        self.wait_from: float | None = None


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
        return rows.setdefault(name, StepRow(name))

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
        if isinstance(e, StepStarted):
            begin(e.step, "action", e.attempt, at)
        elif isinstance(e, CompensationStarted):
            begin(e.step, "compensation", e.attempt, at)
        elif isinstance(e, StepSucceeded):
            close(e.step, "action", at, "succeeded", None)
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
            markers.append(Marker(at, e.type, text))
    end = events[-1].at
    for (name, phase), slot in open_.items():
        if slot.attempt is not None:
            close(name, phase, end, "running", None)
        elif slot.wait_from is not None:
            row(name).waits.append(Wait(phase, slot.wait_from, end))
    return SagaSpans(
        saga_id=first.saga_id,
        name=started.name if started else (state.name if state else "?"),
        version=started.version if started else (state.version if state else 0),
        start=first.at,
        end=max(end, first.at),
        rows=list(rows.values()),
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
