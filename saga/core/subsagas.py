"""Sub-sagas: a step that starts another saga and completes with its outcome.

A step with ``saga: NAME`` is answered by the engine itself rather than by a participant. When
it starts, the parent's decision sends a `StartSaga` for the child (its id `child_id`: the
parent's id and the step's name, so a redelivery starts it once) with a `ParentRef` to the
step and attempt; the child records it. When the child ends, the child's decision replies to
the parent with an ordinary `Reply` (service ``saga:NAME``): ok with the child's outputs when it
completed, a business failure when it compensated (or could not start). Both go through the
topics like any message, so parent and child may live on different partitions and
coordinators, and each is signed by the coordinator that sends it.

Compensating the step sends the child a `CompensateSaga`: a running child is cancelled, a
completed one is compensated anyway (unless it is past its pivot: that is refused, and the
parent's compensation fails as any compensation does), and the child replies to that
compensation attempt once it is compensated. A timeout of the step leaves the child's outcome
unknown, so the step is compensated like any other whose outcome is unknown; retries do not
apply, since the child runs once.

The child's trace links to the parent's (the start request carries the parent's trace
context), and `saga status` shows the tree through `StepState.child`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from saga.core.definition import Step
from saga.core.messages import (
    CompensateSaga,
    CompensationStarted,
    ErrorInfo,
    EventBase,
    ParentRef,
    Reply,
    SagaAborted,
    SagaCompensated,
    SagaCompensationAsked,
    SagaCompleted,
    SagaRejected,
    StartSaga,
    StepStarted,
)
from saga.core.state import SagaState, SagaStatus, StepStatus

if TYPE_CHECKING:
    from saga.core.plan import Plan

__all__ = [
    "child_id",
    "compensate_child",
    "on_compensate",
    "replies_to_parent",
    "responder",
    "start_child",
]


def child_id(saga_id: str, step: str) -> str:
    """The id of the child saga that step ``step`` of saga ``saga_id`` starts."""
    return f"{saga_id}/{step}"


def responder(sd: Step) -> str | None:
    """Who answers step ``sd``: its service, or ``saga:NAME`` for a sub-saga step."""
    return f"saga:{sd.saga}" if sd.saga is not None else sd.service


def start_child(plan: Plan, sd: Step, attempt: int, payload: dict[str, Any]) -> None:
    """Starts ``attempt`` of sub-saga step ``sd``: the child's start request."""
    assert sd.saga is not None
    s = plan.s
    child = child_id(s.saga_id, sd.name)
    deadline = plan.now + sd.timeout
    plan.emit(StepStarted, step=sd.name, attempt=attempt, deadline_at=deadline, child=child)
    plan.requests.append(
        StartSaga(
            message_id=f"{child}/start",
            saga_id=child,
            saga_name=sd.saga,
            input=payload,
            at=plan.now,
            parent=ParentRef(saga_id=s.saga_id, step=sd.name, attempt=attempt),
        )
    )


def compensate_child(plan: Plan, sd: Step, attempt: int) -> None:
    """Starts ``attempt`` of sub-saga step ``sd``'s compensation: the child is compensated."""
    s = plan.s
    child = plan.step_state(sd.name).child or child_id(s.saga_id, sd.name)
    deadline = plan.now + sd.timeout
    plan.emit(CompensationStarted, step=sd.name, attempt=attempt, deadline_at=deadline)
    plan.requests.append(
        CompensateSaga(
            message_id=f"{child}/compensate/{attempt}",
            saga_id=child,
            parent=ParentRef(saga_id=s.saga_id, step=sd.name, attempt=attempt),
            at=plan.now,
        )
    )


def on_compensate(plan: Plan, m: CompensateSaga) -> tuple[str, str] | None:
    """The parent compensates the step that started this saga."""
    s = plan.s
    plan.emit(SagaCompensationAsked, attempt=m.parent.attempt, message_id=m.message_id, by=m.by)
    pivot = plan.d.pivot
    past_pivot = pivot is not None and plan.step_state(pivot).status is not StepStatus.PENDING
    if s.status in (SagaStatus.RUNNING, SagaStatus.COMPLETED) and not past_pivot:
        reason = f"compensated by its parent saga {m.parent.saga_id!r}"
        plan.emit(SagaAborted, reason=reason, step=None, message_id=m.message_id, by=m.by)
    elif s.status in (SagaStatus.RUNNING, SagaStatus.COMPLETED):
        text = f"saga {s.saga_id!r} is past its pivot {pivot!r}: it cannot be compensated"
        error = ErrorInfo(type="PastPivot", message=text, business=True)
        plan.replies.append(_reply(s, m.parent, "compensation", error=error, at=plan.now))
    elif s.status is SagaStatus.STUCK:
        text = f"saga {s.saga_id!r} is stuck: an operator must retry or resolve it first"
        error = ErrorInfo(type="SagaStuck", message=text)
        plan.replies.append(_reply(s, m.parent, "compensation", error=error, at=plan.now))
    # Compensating: it answers when it is compensated; compensated: `replies_to_parent` does.
    return None


def replies_to_parent(state: SagaState | None, events: Sequence[EventBase]) -> list[Reply]:
    """What a sub-saga tells its parent after a decision that ended it (or that a parent's
    compensation found it already compensated, or rejected)."""
    if state is None or state.parent is None or not events:
        return []
    parent, at = state.parent, events[-1].at
    kinds = {type(e) for e in events}
    if SagaCompleted in kinds and state.status is SagaStatus.COMPLETED:
        output = {"saga_id": state.saga_id, "outputs": state.outputs()}
        return [_reply(state, parent, "action", output=output, at=at)]
    undo = state.undo_for
    if SagaCompensated in kinds and undo is None:
        text = f"sub-saga {state.saga_id!r} was compensated: {state.reason}"
        error = ErrorInfo(type="SagaCompensated", message=text, business=True)
        return [_reply(state, parent, "action", error=error, at=at)]
    if SagaRejected in kinds and undo is None:
        text = f"sub-saga {state.saga_id!r} could not start: {state.reason}"
        error = ErrorInfo(type="SagaRejected", message=text, business=True)
        return [_reply(state, parent, "action", error=error, at=at)]
    settled = state.status in (SagaStatus.COMPENSATED, SagaStatus.REJECTED)
    asked = SagaCompensationAsked in kinds or SagaCompensated in kinds
    if undo is not None and settled and asked:
        compensated = ParentRef(saga_id=parent.saga_id, step=parent.step, attempt=undo)
        return [_reply(state, compensated, "compensation", output={}, at=at)]
    return []


def _reply(
    state: SagaState,
    parent: ParentRef,
    phase: str,
    *,
    at: float,
    output: dict[str, Any] | None = None,
    error: ErrorInfo | None = None,
) -> Reply:
    attempt = parent.attempt
    return Reply(
        message_id=f"{state.saga_id}/reply/{phase}/{attempt}",
        saga_id=parent.saga_id,
        step=parent.step,
        phase="action" if phase == "action" else "compensation",
        attempt=attempt,
        service=f"saga:{state.name}",
        ok=error is None,
        output=output if error is None else None,
        error=error,
        at=at,
    )
