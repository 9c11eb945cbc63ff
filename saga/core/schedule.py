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

from saga.core import primitives
from saga.core.definition import (
    DependencyType,
    SagaDefinition,
    Step,
    StepKind,
    item_name,
    split_item,
)
from saga.core.messages import (
    Alert,
    ErrorInfo,
    SagaAborted,
    SagaCompensated,
    SagaCompleted,
    SagaStuck,
    StepFailedEvent,
    StepSucceeded,
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
    "is_item",
    "is_ready",
    "items_of",
    "owes_undo",
    "quiescent_and_stuck",
    "step_state",
    "stuck_reason",
    "stuck_steps",
    "units",
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
    for sd in units(d, plan.s):
        ss = plan.step_state(sd.name)
        if ss.status in (StepStatus.FAILED, StepStatus.UNKNOWN):
            reason = f"step {sd.name!r} failed: {ss.error.message if ss.error else 'unknown'}"
            plan.emit(SagaAborted, reason=reason, step=sd.name)
            return True
    progressed = _gather_items(plan)
    ready = [sd for sd in d.steps if is_ready(d, plan.s, sd)]
    for sd in ready:
        primitives.begin(plan, sd)  # skipped, scheduled for its timer, expanded, or started
    for item in _items_to_start(d, plan.s):
        plan.start_step(item, 1)
        progressed = True
    if ready or progressed:
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
    progressed = _close_fan_outs(plan)
    for sd in units(d, plan.s):
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
        elif primitives.abandon(plan, sd):
            progressed = True
    for sd in units(d, plan.s):
        if owes_undo(d, plan.s, sd.name) and dependents_settled(d, plan.s, sd.name):
            progressed = True
            plan.start_compensation(sd, 1)
    if progressed:
        return True
    statuses = [plan.step_state(sd.name).status for sd in (*d.steps, *units(d, plan.s))]
    if any(st in IN_FLIGHT for st in statuses):
        return False
    if StepStatus.STUCK in statuses:
        plan.emit(SagaStuck, reason=stuck_reason(d, plan.s))
        raise_alert(plan)
    elif not any(owes_undo(d, plan.s, sd.name) for sd in units(d, plan.s)):
        plan.emit(SagaCompensated)
    return False


# -- fan-out ---------------------------------------------------------------------------------


def units(d: SagaDefinition, state: SagaState) -> list[Step]:
    """What runs: every step, with the items of a ``for_each`` step that has expanded in its
    place (each under its item name, `SagaDefinition.unit`).

    Args:
        d: The saga's definition.
        state: The saga's state.
    """
    found: list[Step] = []
    for sd in d.steps:
        names = items_of(state, sd.name) if sd.for_each is not None else []
        found += [d.unit(n) for n in names] if names else [sd]
    return found


def is_item(name: str) -> bool:
    """Whether ``name`` names an item of a fan-out (``dishes[2]``)."""
    return split_item(name)[1] is not None


def items_of(state: SagaState, name: str) -> list[str]:
    """The item names of ``for_each`` step ``name``, in order (none before it expands).

    Args:
        state: The saga's state.
        name: The step's name.
    """
    found: list[str] = []
    while (item := item_name(name, len(found))) in state.steps:
        found.append(item)
    return found


def _gather_items(plan: Plan) -> bool:
    """A running fan-out whose items all succeeded succeeds, its output their outputs."""
    progressed = False
    for sd in plan.d.steps:
        names = items_of(plan.s, sd.name) if sd.for_each is not None else []
        if not names or plan.step_state(sd.name).status is not StepStatus.RUNNING:
            continue
        items = [plan.step_state(n) for n in names]
        if all(i.status is StepStatus.SUCCEEDED for i in items):
            output = {"items": [i.output or {} for i in items]}
            plan.emit(StepSucceeded, step=sd.name, attempt=0, output=output)
            progressed = True
    return progressed


def _items_to_start(d: SagaDefinition, state: SagaState) -> list[Step]:
    """The pending items of running fan-outs that may start now (``max_parallel`` at once)."""
    found: list[Step] = []
    for sd in d.steps:
        names = items_of(state, sd.name) if sd.for_each is not None else []
        if not names or step_state(state, sd.name).status is not StepStatus.RUNNING:
            continue
        busy = sum(step_state(state, n).status in IN_FLIGHT for n in names)
        pending = [n for n in names if step_state(state, n).status is StepStatus.PENDING]
        found += [d.unit(n) for n in pending[: max(0, sd.max_parallel - busy)]]
    return found


def _close_fan_outs(plan: Plan) -> bool:
    """While compensating: a fan-out still running, once none of its items is in flight, is
    closed as failed (its items that took effect are compensated one by one)."""
    progressed = False
    for sd in plan.d.steps:
        names = items_of(plan.s, sd.name) if sd.for_each is not None else []
        if not names or plan.step_state(sd.name).status is not StepStatus.RUNNING:
            continue
        items = [plan.step_state(n) for n in names]
        if any(i.status in IN_FLIGHT for i in items):
            continue
        failed = next((i.error for i in items if i.error is not None), None)
        error = failed or ErrorInfo(type="Abandoned", message="the saga is compensating")
        plan.emit(StepFailedEvent, step=sd.name, attempt=0, error=error)
        progressed = True
    return progressed


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
    """Whether step ``name`` has started (whatever became of it since), or was skipped: it
    left ``pending``, and is not waiting for its timer.

    Args:
        state: The saga's state.
        name: The step's name.
    """
    return step_state(state, name).status not in (StepStatus.PENDING, StepStatus.SCHEDULED)


def owes_undo(d: SagaDefinition, state: SagaState, name: str) -> bool:
    """Whether compensating the saga must undo step ``name``: its action took (or may have
    taken) effect. A waiting step (``wait``, ``approval``) changes nothing, so owes nothing.

    Args:
        d: The saga's definition.
        state: The saga's state.
        name: The step's name.
    """
    sd = d.unit(name)
    if sd.for_each is not None and sd.name == split_item(name)[0]:
        return False  # a fan-out's items are undone, one by one; the step itself sends nothing
    undoable = sd.compensation is not None or sd.saga is not None
    return step_state(state, name).status in UNDO_OWED and sd.has_effect and undoable


def is_finished(d: SagaDefinition, state: SagaState, name: str) -> bool:
    """Whether step ``name`` is *finished*: it succeeded, and its finish-to-finish predecessors
    are finished and its start-to-finish predecessors have started.

    Args:
        d: The saga's definition.
        state: The saga's state.
        name: The step's name.
    """
    status = step_state(state, name).status
    if status is StepStatus.SKIPPED:
        return True  # it will never run: nothing to wait for
    if status is not StepStatus.SUCCEEDED:
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
    return all(_settled(d, state, dependent) for dependent, _ in d.dependents(name))


def _settled(d: SagaDefinition, state: SagaState, name: str) -> bool:
    """Whether step ``name`` leaves nothing to undo before its predecessors are undone."""
    status = step_state(state, name).status
    fanned = status not in (StepStatus.PENDING, StepStatus.SCHEDULED, StepStatus.SKIPPED)
    if d.step(name).for_each is not None and not is_item(name) and fanned:
        # Expanded (perhaps into no items, or failed before): settled once its items are.
        own = all(_settled(d, state, n) for n in items_of(state, name))
    else:
        # A waiting step that succeeded changed nothing: there is nothing of it to undo.
        waited = status is StepStatus.SUCCEEDED and not d.step(name).has_effect
        own = status in SETTLED_FOR_UNDO or waited
    if not own or status is StepStatus.COMPENSATED:
        return own  # a compensated step already waited for its own dependants
    # It has nothing of its own to undo, but steps after it may have run past it (it was
    # skipped, or waited, or failed while a start-to-start dependant went on): the order of
    # undoing is the order of causes, through it.
    return all(_settled(d, state, dependent) for dependent, _ in d.dependents(name))


def quiescent_and_stuck(d: SagaDefinition, state: SagaState) -> bool:
    """Whether some step is stuck and none is in flight: nothing can happen without an operator.

    Args:
        d: The saga's definition.
        state: The saga's state.
    """
    steps = (*d.steps, *units(d, state))
    statuses = [step_state(state, sd.name).status for sd in steps]
    return StepStatus.STUCK in statuses and not any(st in IN_FLIGHT for st in statuses)


def stuck_steps(d: SagaDefinition, state: SagaState) -> Iterator[tuple[str, StepState]]:
    """The stuck steps, with their states, in the definition's order.

    Args:
        d: The saga's definition.
        state: The saga's state.
    """
    for sd in units(d, state):
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
