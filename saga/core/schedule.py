"""Advancing a saga to a fixpoint, and what its DAG allows next.

Deciding has two parts (see `saga.core.decide`): the planner (`saga.core.plan`) reacts to the
input, then `advance` moves the saga as far as it can go: it aborts when a step has failed for
good, starts every step whose dependencies allow it, compensates in reverse dependency order, and
ends the saga when nothing is left to do. It changes the saga only through the plan's
``emit``, ``start_step`` and ``start_compensation``, so the plan's state stays the fold of its
events.

The queries below it (`is_ready`, `is_finished`, `dependents_settled`, ...) only read a state:
they are the scheduling rules of DESIGN section 5 in one place.

- finish-to-start A->B: B starts once A is *finished*; start-to-start: once A has started.
  finish-to-finish: B is not *finished* until A is; start-to-finish: not until A has started.
- The pivot starts only when every compensatable step has finished, and retriable steps only
  once the pivot has.
- A step is compensated only after every step that depends on it has been compensated or
  never ran.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from saga.core.definition import DependencyType, SagaDefinition, Step, StepKind
from saga.core.messages import (
    Alert,
    ErrorInfo,
    SagaAborted,
    SagaCompensated,
    SagaCompleted,
    SagaStuck,
    StepFailedEvent,
    StepTimedOut,
)
from saga.core.state import (
    IN_FLIGHT,
    SETTLED_FOR_UNDO,
    UNDO_OWED,
    SagaState,
    SagaStatus,
    StepState,
    StepStatus,
)

if TYPE_CHECKING:
    # For annotations only: saga.core.plan imports this module to ask its queries.
    from saga.core.plan import Plan

__all__ = [
    "advance",
    "dependents_settled",
    "has_started",
    "is_finished",
    "is_ready",
    "quiescent_and_stuck",
    "step_state",
    "stuck_reason",
    "stuck_steps",
]

# -- advancing to a fixpoint -----------------------------------------------------------------


def advance(plan: Plan) -> None:
    """Moves the saga forward or backward until nothing more can happen now.

    Args:
        plan: The decision in the making, after it reacted to the input.
    """
    while True:
        status = plan.s.status
        if status is SagaStatus.RUNNING:
            if not _advance_forward(plan):
                return
        elif status is SagaStatus.COMPENSATING:
            if not _advance_backward(plan):
                return
        else:
            return


def _advance_forward(plan: Plan) -> bool:
    """One round of forward progress; False when the saga cannot move further now."""
    d = plan.d
    for sd in d.steps:
        ss = plan.step_state(sd.name)
        if ss.status in (StepStatus.FAILED, StepStatus.UNKNOWN):
            reason = f"step {sd.name!r} failed: {ss.error.message if ss.error else 'unknown'}"
            plan.emit(SagaAborted, reason=reason, step=sd.name)
            return True
    ready = [sd for sd in d.steps if is_ready(d, plan.s, sd)]
    for sd in ready:
        plan.start_step(sd, 1)
    if ready:
        return True
    if all(is_finished(d, plan.s, sd.name) for sd in d.steps):
        plan.emit(SagaCompleted)
    elif quiescent_and_stuck(d, plan.s):
        plan.emit(SagaStuck, reason=stuck_reason(d, plan.s))
        raise_alert(plan)
    return False


def _advance_backward(plan: Plan) -> bool:
    """One round of compensation; False when the saga cannot move further now."""
    d = plan.d
    progressed = False
    for sd in d.steps:
        ss = plan.step_state(sd.name)
        if ss.status is StepStatus.RETRYING:
            progressed = True
            if ss.uncertain:
                plan.emit(StepTimedOut, step=sd.name, attempt=ss.attempt)
            else:
                error = ErrorInfo(
                    type="Abandoned",
                    message="retries abandoned: the saga is compensating",
                )
                plan.emit(StepFailedEvent, step=sd.name, attempt=ss.attempt, error=error)
    for sd in d.steps:
        if plan.step_state(sd.name).status in UNDO_OWED and dependents_settled(d, plan.s, sd.name):
            progressed = True
            plan.start_compensation(sd, 1)
    if progressed:
        return True
    statuses = [plan.step_state(sd.name).status for sd in d.steps]
    if any(st in IN_FLIGHT for st in statuses):
        return False
    if StepStatus.STUCK in statuses:
        plan.emit(SagaStuck, reason=stuck_reason(d, plan.s))
        raise_alert(plan)
    elif not any(st in UNDO_OWED for st in statuses):
        plan.emit(SagaCompensated)
    return False


def raise_alert(plan: Plan) -> None:
    """Tells an operator: the saga has just gone stuck (an alert with its stuck steps)."""
    s = plan.s
    plan.alerts.append(
        Alert(
            saga_id=s.saga_id,
            saga_name=s.name,
            reason=s.reason or "stuck",
            steps=[name for name, _ in stuck_steps(plan.d, s)],
            at=plan.now,
        )
    )


# -- what the DAG allows ---------------------------------------------------------------------


# A step the state has no entry for has not started (shared: a `StepState` is never mutated).
_PENDING = StepState()


def step_state(state: SagaState, name: str) -> StepState:
    """The state of step ``name``, pending when the saga's state has no entry for it.

    Args:
        state: The saga's state.
        name: The step's name.
    """
    return state.steps.get(name, _PENDING)


def has_started(state: SagaState, name: str) -> bool:
    """Whether step ``name`` has left ``pending`` (whatever became of it since).

    Args:
        state: The saga's state.
        name: The step's name.
    """
    return step_state(state, name).status is not StepStatus.PENDING


def is_finished(d: SagaDefinition, state: SagaState, name: str) -> bool:
    """Whether step ``name`` is *finished*: it succeeded, and its finish-to-finish predecessors
    are finished and its start-to-finish predecessors have started.

    Args:
        d: The saga's definition.
        state: The saga's state.
        name: The step's name.
    """
    if step_state(state, name).status is not StepStatus.SUCCEEDED:
        return False
    for dep in d.step(name).depends_on:
        if dep.type is DependencyType.FINISH_TO_FINISH and not is_finished(d, state, dep.step):
            return False
        if dep.type is DependencyType.START_TO_FINISH and not has_started(state, dep.step):
            return False
    return True


def is_ready(d: SagaDefinition, state: SagaState, sd: Step) -> bool:
    """Whether pending step ``sd`` may start now: its start constraints hold, and the pivot
    comes after every compensatable step and before every retriable one.

    Args:
        d: The saga's definition.
        state: The saga's state.
        sd: The step's definition.
    """
    if step_state(state, sd.name).status is not StepStatus.PENDING:
        return False
    for dep in sd.depends_on:
        if dep.type is DependencyType.FINISH_TO_START and not is_finished(d, state, dep.step):
            return False
        if dep.type is DependencyType.START_TO_START and not has_started(state, dep.step):
            return False
    if sd.kind is StepKind.PIVOT:
        return all(
            is_finished(d, state, o.name) for o in d.steps if o.kind is StepKind.COMPENSATABLE
        )
    if sd.kind is StepKind.RETRIABLE:
        pivot = d.pivot
        return pivot is not None and is_finished(d, state, pivot)
    return True


def dependents_settled(d: SagaDefinition, state: SagaState, name: str) -> bool:
    """Whether every step that depends on ``name`` was compensated or never ran, so that
    ``name`` may be compensated now (compensation runs in reverse dependency order).

    Args:
        d: The saga's definition.
        state: The saga's state.
        name: The step's name.
    """
    return all(
        step_state(state, dependent).status in SETTLED_FOR_UNDO
        for dependent, _ in d.dependents(name)
    )


def quiescent_and_stuck(d: SagaDefinition, state: SagaState) -> bool:
    """Whether some step is stuck and none is in flight: nothing can happen without an operator.

    Args:
        d: The saga's definition.
        state: The saga's state.
    """
    statuses = [step_state(state, sd.name).status for sd in d.steps]
    return StepStatus.STUCK in statuses and not any(st in IN_FLIGHT for st in statuses)


def stuck_steps(d: SagaDefinition, state: SagaState) -> Iterator[tuple[str, StepState]]:
    """The stuck steps, with their states, in the definition's order.

    Args:
        d: The saga's definition.
        state: The saga's state.
    """
    for sd in d.steps:
        ss = step_state(state, sd.name)
        if ss.status is StepStatus.STUCK:
            yield sd.name, ss


def stuck_reason(d: SagaDefinition, state: SagaState) -> str:
    """Why the saga is stuck, step by step, and what the operator can do about it.

    Args:
        d: The saga's definition.
        state: The saga's state.
    """
    parts = [
        f"step {name!r} ({ss.stuck_phase}): {ss.error.message if ss.error else 'unknown'}"
        for name, ss in stuck_steps(d, state)
    ]
    return "; ".join(parts) + " — run `saga retry` once the cause is fixed"
