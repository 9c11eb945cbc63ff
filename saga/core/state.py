"""A saga's state, and `evolve`: the only way it changes.

Theory of operation
-------------------
A saga's state is a left fold of its events: ``state = evolve(evolve(None, e1), e2) ...``.
The log is the source of truth; snapshots, status views and metrics are all such folds.

Each step has a status, and each event that concerns a step moves it along one edge of
`STEP_TRANSITIONS`, a table keyed by (event type, current status). The saga's own status moves
along `SAGA_TRANSITIONS` likewise. The tables are the whole state machine: an event that has no
edge from the current status raises `IllegalTransition` and changes nothing (state is immutable;
`evolve` returns a new value). Events are numbered per saga (``seq``) without gaps, so a
duplicate or a missing event is caught too.

Step statuses, forward::

    pending -> running -> succeeded
                  |  ^
                  v  |                 (technical failure or timeout, attempts left)
               retrying
    running -> failed      (did not take effect: business failure, retries exhausted)
    running -> unknown     (last attempt timed out: may or may not have taken effect)
    running -> stuck       (a pivot's outcome unknown, or a retriable step exhausted)

and backward, once the saga is compensating::

    succeeded | unknown -> compensating -> compensated
                              |  ^
                              v  |
                     compensation_retrying
    compensating -> stuck  (the compensation exhausted its policy)

Saga statuses: ``running -> completed``; ``running -> compensating -> compensated``; either of
``running`` and ``compensating`` -> ``stuck``; ``stuck`` -> ``running`` or ``compensating``
again when an operator retries it, or resolves its stuck steps by hand (``stuck`` ->
``succeeded`` going forward, ``stuck`` -> ``compensated`` going backward).

A start the coordinator cannot run (no definition of its name, an invalid input) makes a saga
whose first event is `SagaRejected`: ``rejected``, final, with no steps. Nothing ran, so a later
valid start of the id moves it on (``rejected -> running``, its `SagaStarted` not event 1).

Some events only record something about the saga (`RECORD_ONLY`: a duplicate start, a cancel
that came too late): they are legal in every status, as self-loops of `SAGA_TRANSITIONS`, and
change nothing but ``seq`` and ``updated_at``, a finished saga's finish time included.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from saga.core.definition import item_name
from saga.core.messages import (
    ApprovalReminded,
    CancelRejected,
    CompensationResolved,
    CompensationRetryScheduled,
    CompensationStarted,
    CompensationSucceeded,
    ErrorInfo,
    EventBase,
    ParentRef,
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
from saga.errors import IllegalTransition

__all__ = [
    "FINAL_STATUSES",
    "IN_FLIGHT",
    "RECORD_ONLY",
    "REMEMBERED_REQUESTS",
    "SAGA_TRANSITIONS",
    "SETTLED_FOR_UNDO",
    "STEP_TRANSITIONS",
    "TERMINAL_STATUSES",
    "UNDO_OWED",
    "SagaState",
    "SagaStatus",
    "StepState",
    "StepStatus",
    "evolve",
]


class StepStatus(StrEnum):
    """Where one step is; see the module docstring for the edges."""

    PENDING = "pending"
    SCHEDULED = "scheduled"
    """It could start, and waits for its timer (``delay`` or ``start_at``)."""
    SKIPPED = "skipped"
    """It will not run (its condition was false): finished for its dependants, not undone."""
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"
    COMPENSATING = "compensating"
    COMPENSATION_RETRYING = "compensation_retrying"
    COMPENSATED = "compensated"
    STUCK = "stuck"


class SagaStatus(StrEnum):
    """Where the saga is. ``completed``, ``compensated``, ``stuck`` and ``rejected`` are
    final."""

    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    STUCK = "stuck"
    REJECTED = "rejected"
    """Its start was refused before anything ran (see `SagaRejected`)."""


TERMINAL_STATUSES = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED})
"""Statuses a saga does not leave: no event but a `RECORD_ONLY` one is legal after them, with
one exception: the parent of a completed sub-saga may have it compensated (`SagaAborted`)."""
FINAL_STATUSES = TERMINAL_STATUSES | {SagaStatus.STUCK, SagaStatus.REJECTED}
"""Statuses in which nothing happens until an operator acts (``stuck``), a valid start comes
(``rejected``), or ever (the others)."""

IN_FLIGHT = frozenset(
    {
        StepStatus.SCHEDULED,
        StepStatus.RUNNING,
        StepStatus.RETRYING,
        StepStatus.COMPENSATING,
        StepStatus.COMPENSATION_RETRYING,
    }
)
"""Step statuses with an attempt out or a retry due: the saga cannot end while one has them."""
UNDO_OWED = frozenset({StepStatus.SUCCEEDED, StepStatus.UNKNOWN})
"""Step statuses whose action took (or may have taken) effect: compensating must undo them."""
SETTLED_FOR_UNDO = frozenset(
    {StepStatus.PENDING, StepStatus.SKIPPED, StepStatus.FAILED, StepStatus.COMPENSATED}
)
"""Step statuses that leave nothing to undo: once a step's dependents all have them, it may be
compensated."""

S = StepStatus
STEP_TRANSITIONS: dict[tuple[type[EventBase], StepStatus], StepStatus] = {
    (StepStarted, S.PENDING): S.RUNNING,
    (StepStarted, S.SCHEDULED): S.RUNNING,  # its timer fired
    (StepScheduled, S.PENDING): S.SCHEDULED,
    (StepExpanded, S.PENDING): S.RUNNING,  # a for_each step: its items run
    (StepExpanded, S.SCHEDULED): S.RUNNING,
    (StepSkipped, S.PENDING): S.SKIPPED,  # its condition is false
    (StepSkipped, S.SCHEDULED): S.SKIPPED,  # the saga compensates before its timer fired
    (StepFailedEvent, S.SCHEDULED): S.FAILED,  # its start time could not be read
    (ApprovalReminded, S.RUNNING): S.RUNNING,
    (StepStarted, S.RETRYING): S.RUNNING,
    (StepStarted, S.STUCK): S.RUNNING,  # an operator's retry
    (StepSucceeded, S.RUNNING): S.SUCCEEDED,
    (StepRetryScheduled, S.RUNNING): S.RETRYING,
    (StepFailedEvent, S.PENDING): S.FAILED,  # its input could not be built
    (StepFailedEvent, S.RUNNING): S.FAILED,
    (StepFailedEvent, S.RETRYING): S.FAILED,  # retries abandoned: the saga is compensating
    (StepTimedOut, S.RUNNING): S.UNKNOWN,
    (StepTimedOut, S.RETRYING): S.UNKNOWN,  # abandoned after an attempt that timed out
    (StepStuck, S.PENDING): S.STUCK,  # a step past the pivot whose input cannot be built
    (StepStuck, S.STUCK): S.STUCK,  # an operator's retry that could not start either
    (StepFailedEvent, S.STUCK): S.FAILED,  # likewise, for a pivot: it did not take effect
    (StepStuck, S.RUNNING): S.STUCK,
    (StepStuck, S.COMPENSATING): S.STUCK,
    (CompensationStarted, S.SUCCEEDED): S.COMPENSATING,
    (CompensationStarted, S.UNKNOWN): S.COMPENSATING,
    (CompensationStarted, S.COMPENSATION_RETRYING): S.COMPENSATING,
    (CompensationStarted, S.STUCK): S.COMPENSATING,  # an operator's retry
    (CompensationSucceeded, S.COMPENSATING): S.COMPENSATED,
    (CompensationRetryScheduled, S.COMPENSATING): S.COMPENSATION_RETRYING,
    (StepResolved, S.STUCK): S.SUCCEEDED,  # an operator's resolve, going forward
    (CompensationResolved, S.STUCK): S.COMPENSATED,  # an operator's resolve, compensating
}
"""(event type, step status before) -> step status after. Anything else is illegal."""

G = SagaStatus
RECORD_ONLY: frozenset[type[EventBase]] = frozenset(
    {CancelRejected, StartIgnored, StartRefused, RequestDenied, SignalRejected}
)
"""Events that record a request the saga answered without moving: legal in every status, they
change neither the status nor anything else but ``seq``, ``updated_at`` and the requests
handled (`SagaState.requests`)."""
SAGA_TRANSITIONS: dict[tuple[type[EventBase], SagaStatus | None], SagaStatus] = {
    (SagaStarted, None): G.RUNNING,
    (SagaStarted, G.REJECTED): G.RUNNING,  # a valid start after a rejected one: nothing ran
    (SagaRejected, None): G.REJECTED,
    (SagaRejected, G.REJECTED): G.REJECTED,  # another start it cannot run either
    (SagaAborted, G.RUNNING): G.COMPENSATING,
    # A completed sub-saga whose parent compensates the step that started it (no pivot).
    (SagaAborted, G.COMPLETED): G.COMPENSATING,
    (SagaCompleted, G.RUNNING): G.COMPLETED,
    (SagaCompensated, G.COMPENSATING): G.COMPENSATED,
    (SagaStuck, G.RUNNING): G.STUCK,
    (SagaStuck, G.COMPENSATING): G.STUCK,
    (SagaResumed, G.STUCK): G.RUNNING,  # or COMPENSATING: see SagaResumed.compensating
    (SagaDeadlinePassed, G.RUNNING): G.RUNNING,  # a SagaAborted follows before the pivot
    # A signal is kept while the saga can still use it (a wait step may start later).
    (SignalReceived, G.RUNNING): G.RUNNING,
    (SignalReceived, G.STUCK): G.STUCK,
    (SignalReceived, G.COMPENSATING): G.COMPENSATING,
    **{(SagaCompensationAsked, status): status for status in G},
    **{(kind, status): status for kind in RECORD_ONLY for status in G},
}
"""(event type, saga status before) -> saga status after, for the saga-level events (step events
are `STEP_TRANSITIONS`'). A `RECORD_ONLY` event is a self-loop in every status."""

STEP_EVENTS_NEED = {
    StepStarted: G.RUNNING,
    StepExpanded: G.RUNNING,
    StepScheduled: G.RUNNING,
    CompensationStarted: G.COMPENSATING,
}
"""Step events that are legal only while the saga has one particular status."""


class StepState(BaseModel):
    """One step's progress, as folded from the log."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    """The action's latest attempt (0: never started)."""
    compensation_attempt: int = 0
    """The compensation's latest attempt."""
    budget_from: int = 0
    """Attempts before this count do not use up the policy (an operator retry resets it)."""
    deadline_at: float | None = None
    """When the attempt in flight times out."""
    retry_at: float | None = None
    """When the next attempt is due."""
    output: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    """The latest failure of the action or compensation."""
    stuck_phase: Phase | None = None
    uncertain: bool = False
    """An attempt of the action timed out: it may still take effect, whatever follows."""
    started_at: float | None = None
    """When the first attempt was sent."""
    finished_at: float | None = None
    """When the action succeeded or failed for good."""
    compensated_at: float | None = None
    wake_at: float | None = None
    """When the step's timer fires: a scheduled step's start, an approval's next reminder."""
    child: str | None = None
    """A sub-saga step's child saga."""
    reminders: int = 0
    """Reminders and escalations an approval step has sent."""


class SagaState(BaseModel):
    """One saga's whole state: a fold of its events, serialised into snapshots."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    saga_id: str
    name: str
    version: int
    status: SagaStatus
    input: dict[str, Any]
    steps: dict[str, StepState]
    seq: int
    """The number of events folded in (the ``seq`` of the last one)."""
    started_at: float
    updated_at: float
    finished_at: float | None = None
    reason: str | None = None
    """Why the saga is compensating, compensated, stuck or rejected."""
    digest: str | None = Field(default=None, exclude_if=lambda v: v is None)
    """The digest of the definition it started on (`SagaStarted.digest`; ``None`` for sagas
    started before digests, or rejected without a definition)."""
    deadline_at: float | None = Field(default=None, exclude_if=lambda v: v is None)
    """When the saga should have ended (its definition's ``deadline``); ``None`` once that
    has been acted on, or without one."""
    signals: dict[str, dict[str, Any]] = Field(default_factory=dict, exclude_if=lambda v: not v)
    """Signals received that no ``wait`` step has taken yet, by name (the latest of each)."""
    parent: ParentRef | None = Field(default=None, exclude_if=lambda v: v is None)
    """The step of another saga that started this one (a sub-saga)."""
    undo_for: int | None = Field(default=None, exclude_if=lambda v: v is None)
    """The parent's compensation attempt this saga answers when it is compensated."""
    requests: tuple[str, ...] = Field(default=(), exclude_if=lambda v: not v)
    """The message ids of the latest operator requests the saga answered (cancel, retry,
    resolve; at most `REMEMBERED_REQUESTS`), so that the same request delivered or replayed
    again changes nothing."""

    @property
    def is_final(self) -> bool:
        """Whether the saga has ended (``stuck`` waits for an operator)."""
        return self.status in FINAL_STATUSES

    def outputs(self) -> dict[str, Any]:
        """Every succeeded step's output, by step name."""
        return {n: s.output for n, s in self.steps.items() if s.output is not None}

    def percent_complete(self) -> int:
        """Progress in percent: forward work while running, undo work while compensating."""
        if self.status in TERMINAL_STATUSES:
            return 100
        total = len(self.steps) or 1
        if self.status is SagaStatus.RUNNING:
            finished = (StepStatus.SUCCEEDED, StepStatus.SKIPPED)  # skipped: will not run
            done = sum(s.status in finished for s in self.steps.values())
            return done * 100 // total
        owed = [s for s in self.steps.values() if s.compensation_attempt or s.status in UNDO_OWED]
        if not owed:
            return 0
        return sum(s.status is StepStatus.COMPENSATED for s in owed) * 100 // len(owed)


_PENDING = StepState()


def evolve(state: SagaState | None, event: EventBase) -> SagaState:
    """Applies one event to a saga's state and returns the new state.

    Raises:
        IllegalTransition: The event does not follow the state (wrong saga, a gap or duplicate
            in ``seq``, or no edge in the transition tables). The given state is unchanged.
    """
    if isinstance(event, SagaStarted | SagaRejected):
        return _begin(state, event)
    if state is None:
        raise IllegalTransition(f"{event.type} for saga {event.saga_id!r}, which has not started")
    if event.saga_id != state.saga_id:
        raise IllegalTransition(f"event of saga {event.saga_id!r} applied to {state.saga_id!r}")
    if event.seq != state.seq + 1:
        raise IllegalTransition(
            f"saga {state.saga_id!r}: event seq {event.seq} does not follow {state.seq}"
        )
    changes: dict[str, Any] = {"seq": event.seq, "updated_at": event.at}
    if isinstance(event, _REQUEST_EVENTS) and event.message_id is not None:
        changes["requests"] = (*state.requests, event.message_id)[-REMEMBERED_REQUESTS:]
    if isinstance(event, SignalReceived):
        changes["signals"] = {**state.signals, event.name: event.data}
    elif isinstance(event, StepSucceeded) and event.signal is not None:
        changes["signals"] = {k: v for k, v in state.signals.items() if k != event.signal}
    elif isinstance(event, SagaDeadlinePassed):
        changes["deadline_at"] = None
    elif isinstance(event, SagaCompensationAsked):
        changes["undo_for"] = event.attempt
    if isinstance(event, StepEvent) and type(event) in _STEP_EVENT_TYPES:
        changes["steps"] = {**state.steps, event.step: _evolve_step(state, event)}
        if isinstance(event, StepExpanded):
            items = {item_name(event.step, i): _PENDING for i in range(event.count)}
            changes["steps"] |= items
    changes.update(_evolve_saga(state, event))
    return state.model_copy(update=changes)


_STEP_EVENT_TYPES = frozenset(t for (t, _) in STEP_TRANSITIONS)
_REQUEST_EVENTS = (
    SagaCompensationAsked,
    SagaAborted,
    CancelRejected,
    SagaResumed,
    RequestDenied,
    SignalReceived,
    SignalRejected,
)
"""The events that answer an operator request, with its message id."""

REMEMBERED_REQUESTS = 32
"""How many operator requests a saga remembers (`SagaState.requests`): far more than a saga
sees in practice, and a bound on what a snapshot carries."""


def _begin(state: SagaState | None, event: SagaStarted | SagaRejected) -> SagaState:
    """A saga's first event, or a start after a rejected one (nothing ran: it begins anew)."""
    kind = type(event)
    if state is None:
        if event.seq != 1:
            raise IllegalTransition(
                f"saga {event.saga_id!r}: {kind.__name__} must be event 1, not {event.seq}"
            )
    else:
        if event.saga_id != state.saga_id:
            raise IllegalTransition(f"event of saga {event.saga_id!r} applied to {state.saga_id!r}")
        if (kind, state.status) not in SAGA_TRANSITIONS:
            raise IllegalTransition(
                f"saga {state.saga_id!r} has already started"
                if isinstance(event, SagaStarted)
                else f"saga {state.saga_id!r}: {kind.__name__} is not legal when the saga is "
                f"{state.status.value}"
            )
        if event.seq != state.seq + 1:
            raise IllegalTransition(
                f"saga {state.saga_id!r}: event seq {event.seq} does not follow {state.seq}"
            )
    status = SAGA_TRANSITIONS[(kind, state.status if state is not None else None)]
    if isinstance(event, SagaStarted):
        return SagaState(
            saga_id=event.saga_id,
            name=event.name,
            version=event.version,
            status=status,
            input=event.input,
            steps=dict.fromkeys(event.steps, _PENDING),
            seq=event.seq,
            started_at=event.at,
            updated_at=event.at,
            digest=event.digest,
            deadline_at=event.deadline_at,
            parent=event.parent,
            # A signal sent between a rejected start and a valid one is kept.
            signals=state.signals if state is not None else {},
        )
    return SagaState(
        saga_id=event.saga_id,
        name=event.name,
        version=event.version or 0,
        status=status,
        input=event.input,
        steps={},
        seq=event.seq,
        started_at=event.at,
        updated_at=event.at,
        finished_at=event.at,
        reason=event.reason,
        digest=event.digest,
        parent=event.parent,
    )


def _evolve_step(state: SagaState, event: StepEvent) -> StepState:
    kind, name = type(event), event.step
    needed = STEP_EVENTS_NEED.get(kind)
    if needed is not None and state.status is not needed:
        raise IllegalTransition(
            f"saga {state.saga_id!r}, step {name!r}: {kind.__name__} while the saga is "
            f"{state.status.value}"
        )
    if state.status in TERMINAL_STATUSES:
        raise IllegalTransition(f"saga {state.saga_id!r} has ended; {kind.__name__} is not legal")
    step = state.steps.get(name)
    if step is None:
        raise IllegalTransition(f"saga {state.saga_id!r} has no step {name!r}")
    target = STEP_TRANSITIONS.get((kind, step.status))
    if target is None:
        raise IllegalTransition(
            f"saga {state.saga_id!r}, step {name!r}: {kind.__name__} is not legal when the step "
            f"is {step.status.value}"
        )
    at = event.at
    u: dict[str, Any] = {"status": target}
    if isinstance(event, StepStarted):
        u |= {"attempt": event.attempt, "deadline_at": event.deadline_at, "retry_at": None}
        u["wake_at"] = event.wake_at
        if event.child is not None:
            u["child"] = event.child
        if step.started_at is None:
            u["started_at"] = at
        if step.status is StepStatus.STUCK:
            u |= {"budget_from": event.attempt - 1, "stuck_phase": None}
    elif isinstance(event, StepSucceeded):
        u |= {"output": event.output, "deadline_at": None, "finished_at": at, "error": None}
        u["wake_at"] = None
    elif isinstance(event, StepScheduled):
        u |= {"wake_at": event.due_at}
    elif isinstance(event, StepExpanded):
        u |= {"wake_at": None, "started_at": at}
    elif isinstance(event, StepSkipped):
        u |= {"wake_at": None, "finished_at": at}
    elif isinstance(event, ApprovalReminded):
        u |= {"wake_at": event.next_at, "reminders": step.reminders + 1}
    elif isinstance(event, StepRetryScheduled | CompensationRetryScheduled):
        u |= {"error": event.error, "deadline_at": None, "retry_at": event.retry_at}
        if isinstance(event, StepRetryScheduled) and event.error.type == "Timeout":
            u["uncertain"] = True
    elif isinstance(event, StepFailedEvent):
        u |= {"error": event.error, "deadline_at": None, "retry_at": None, "finished_at": at}
        u["wake_at"] = None
    elif isinstance(event, StepTimedOut):
        u |= {
            "error": ErrorInfo(type="Timeout", message="outcome unknown: no reply by the deadline"),
            "deadline_at": None,
            "retry_at": None,
            "finished_at": at,
        }
    elif isinstance(event, StepStuck):
        u |= {"error": event.error, "deadline_at": None, "retry_at": None}
        u["stuck_phase"] = event.phase
    elif isinstance(event, CompensationStarted):
        u |= {"compensation_attempt": event.attempt, "deadline_at": event.deadline_at}
        u["retry_at"] = None
        if step.status is StepStatus.STUCK:
            u |= {"budget_from": event.attempt - 1, "stuck_phase": None}
        elif step.status is not StepStatus.COMPENSATION_RETRYING:
            u["budget_from"] = 0  # the compensation's own budget starts now
    elif isinstance(event, CompensationSucceeded | CompensationResolved):
        u |= {"deadline_at": None, "compensated_at": at, "stuck_phase": None}
    elif isinstance(event, StepResolved):
        u |= {"output": step.output or {}, "finished_at": at, "stuck_phase": None}
    return step.model_copy(update=u)


def _evolve_saga(state: SagaState, event: EventBase) -> dict[str, Any]:
    kind = type(event)
    if kind not in _SAGA_EVENT_TYPES:
        return {}  # step events leave the saga's status as it is
    target = SAGA_TRANSITIONS.get((kind, state.status))
    if target is None:
        raise IllegalTransition(
            f"saga {state.saga_id!r}: {kind.__name__} is not legal when the saga is "
            f"{state.status.value}"
        )
    if kind in RECORD_ONLY:
        return {}  # a self-loop: the status, and the finish time, stay as they are
    if isinstance(event, SagaResumed):
        target = SagaStatus.COMPENSATING if event.compensating else SagaStatus.RUNNING
        return {"status": target, "finished_at": None}
    changes: dict[str, Any] = {"status": target}
    if isinstance(event, SagaAborted | SagaStuck):
        changes["reason"] = event.reason
    if isinstance(event, SagaAborted):
        changes["finished_at"] = None  # a completed sub-saga compensated by its parent
    if target in FINAL_STATUSES:
        changes["finished_at"] = event.at
    return changes


_SAGA_EVENT_TYPES = frozenset(t for (t, _) in SAGA_TRANSITIONS)
