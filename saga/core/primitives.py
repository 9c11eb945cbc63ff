"""The steps that wait: durable timers, signals, approvals, conditions and the saga deadline.

Each is events in the log like everything else, so it survives restarts and replays, and the
state holds every time it waits for (`saga.core.decide.next_due` reads them): a coordinator
that restarts arms them again, and a timer a day away costs no polling.

- **Conditions.** A step whose ``when`` is false when it could start is *skipped*
  (`StepSkipped`): finished for its dependants, never compensated.
- **Timers.** A step with a ``delay`` or a ``start_at`` is *scheduled* when it could start
  (`StepScheduled`, its ``wake_at`` the due time) and starts when the clock reaches it. A
  start time that cannot be read fails the step for good (``InputInvalid``).
- **Signals.** A ``wait`` step runs (`StepStarted`, no command) until its signal arrives
  (`SignalReceived`, then `StepSucceeded` with the signal's data) or its ``timeout`` passes (a
  business failure). A signal that comes before its step waits is kept in the state and taken
  when the step starts; one for a saga that ended, or whose step already finished, is
  answered with a `SignalRejected` event.
- **Approvals.** An ``approval`` step runs until an approver decides (`DecideApproval`): an
  approval succeeds it (its output says who, and their note), a rejection is a business
  failure, and compensation follows. While it waits an alert asks the approvers, a reminder and
  an escalation follow after their delays (`ApprovalReminded`), and its ``timeout`` rejects
  it. A decision from someone who is not an approver is recorded as a `RequestDenied`.
- **Deadline.** A saga whose definition has a ``deadline`` and is still running then is
  compensated if its pivot has not started (`SagaDeadlinePassed`, then `SagaAborted`), else
  alerted once and left to go on.

Waiting steps change nothing outside the saga: a compensating saga abandons them (a running one
fails as ``Abandoned``, a scheduled one is skipped) and has nothing of theirs to undo.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from saga.core import conditions, dataflow
from saga.core.definition import Step
from saga.core.messages import (
    Alert,
    AlertKind,
    ApprovalReminded,
    DecideApproval,
    ErrorInfo,
    RequestDenied,
    SagaAborted,
    SagaDeadlinePassed,
    SignalReceived,
    SignalRejected,
    SignalSaga,
    StepExpanded,
    StepFailedEvent,
    StepScheduled,
    StepSkipped,
    StepStarted,
    StepSucceeded,
)
from saga.core.state import FINAL_STATUSES, SagaStatus, StepStatus
from saga.core.wire import UNVERIFIED

if TYPE_CHECKING:
    from saga.core.plan import Plan

__all__ = [
    "MAX_ITEMS",
    "abandon",
    "begin",
    "fire_timers",
    "on_approval",
    "on_signal",
    "start",
    "start_waiting",
    "waiting_timeout",
]


def begin(plan: Plan, sd: Step) -> None:
    """A pending step whose dependencies allow it to start: skipped if its condition is
    false, scheduled if it has a timer, else started."""
    if sd.when is not None:
        condition = conditions.parse(sd.when)  # parsed at load already: cannot fail here
        scope = _scope(plan)
        if not condition.evaluate(scope):
            reason = f"condition {sd.when!r} is {condition.explain(scope)}"
            plan.emit(StepSkipped, step=sd.name, attempt=0, reason=reason)
            return
    if sd.delay is not None or sd.start_at is not None:
        try:
            due = _due(plan, sd)
        except ValueError as exc:
            error = ErrorInfo(type="InputInvalid", message=str(exc), business=True)
            plan.emit(StepFailedEvent, step=sd.name, attempt=0, error=error)
            return
        if due > plan.now:
            plan.emit(StepScheduled, step=sd.name, attempt=0, due_at=due)
            return
    start(plan, sd)


def start(plan: Plan, sd: Step) -> None:
    """Starts a step that may start now: a fan-out expands into its items (which the
    scheduler starts, ``max_parallel`` at a time), any other step starts its first attempt."""
    if sd.for_each is None:
        plan.start_step(sd, 1)
        return
    try:
        items = plan.items(sd)
        if len(items) > MAX_ITEMS:
            raise dataflow.ResolveError(
                f"for_each {sd.for_each}: {len(items)} items, more than {MAX_ITEMS}"
            )
    except dataflow.ResolveError as exc:
        error = ErrorInfo(type="InputInvalid", message=str(exc), business=True)
        plan.emit(StepFailedEvent, step=sd.name, attempt=0, error=error)
        return
    plan.emit(StepExpanded, step=sd.name, attempt=0, count=len(items))
    if not items:
        plan.emit(StepSucceeded, step=sd.name, attempt=0, output={"items": []})


MAX_ITEMS = 1000
"""Most items of one fan-out: each is a step in the saga's state (and in its snapshot)."""


def start_waiting(plan: Plan, sd: Step, attempt: int) -> None:
    """Starts a ``wait`` or ``approval`` step: no command; it waits until its signal or a
    decision comes, or its timeout."""
    deadline = plan.now + sd.timeout
    approval = sd.approval
    first = _next_reminder(sd, plan.now, 0) if approval is not None else None
    plan.emit(StepStarted, step=sd.name, attempt=attempt, deadline_at=deadline, wake_at=first)
    if sd.wait is not None and sd.wait in plan.s.signals:
        data = plan.s.signals[sd.wait]
        plan.emit(StepSucceeded, step=sd.name, attempt=attempt, output=data, signal=sd.wait)
    elif approval is not None:
        who = ", ".join(approval.approvers) or "whoever the policy allows"
        _alert(plan, sd, "approval", f"step {sd.name!r} waits for a decision by {who}", False)


def waiting_timeout(sd: Step) -> ErrorInfo:
    """The failure of a waiting step whose timeout passed: a business failure (nothing was
    done that a retry could finish)."""
    if sd.wait is not None:
        text = f"signal {sd.wait!r} did not arrive within {sd.timeout:g} s"
    else:
        text = f"no decision within {sd.timeout:g} s: the approval counts as rejected"
    return ErrorInfo(type="Timeout", message=text, business=True)


def on_signal(plan: Plan, m: SignalSaga) -> tuple[str, str] | None:
    """A signal: taken by its ``wait`` step, kept for it, or answered with why not."""
    s = plan.s
    sd = plan.d.waits_for(m.name)
    if sd is None:
        return "rejected", f"saga {m.saga_id!r} ({s.name}) has no step waiting for {m.name!r}"
    ss = plan.step_state(sd.name)
    reason = None
    if s.status in FINAL_STATUSES:
        reason = f"the saga is {s.status.value}"
    elif ss.status not in (StepStatus.PENDING, StepStatus.SCHEDULED, StepStatus.RUNNING):
        reason = f"step {sd.name!r}, which waits for it, is {ss.status.value}"
    if reason is not None:
        plan.emit(SignalRejected, name=m.name, reason=reason, message_id=m.message_id, by=m.by)
        return None
    plan.emit(SignalReceived, name=m.name, data=m.data, message_id=m.message_id, by=m.by)
    if ss.status is StepStatus.RUNNING:
        plan.emit(StepSucceeded, step=sd.name, attempt=ss.attempt, output=m.data, signal=m.name)
    return None


def on_approval(plan: Plan, m: DecideApproval) -> tuple[str, str] | None:
    """An approver's decision on an ``approval`` step that waits for one."""
    where = f"saga {m.saga_id!r}, step {m.step!r}"
    if not plan.d.has_step(m.step) or plan.d.step(m.step).approval is None:
        return "rejected", f"{where}: not an approval step"
    sd = plan.d.step(m.step)
    approval = sd.approval
    assert approval is not None
    ss = plan.step_state(sd.name)
    if ss.status is not StepStatus.RUNNING:
        return "rejected", f"{where}: not waiting for a decision ({ss.status.value})"
    who = (m.by or "").removesuffix(UNVERIFIED)
    if not approval.may_decide(who):
        allowed = ", ".join((*approval.approvers, *approval.escalate_to))
        plan.emit(
            RequestDenied,
            request="approval",
            message_id=m.message_id,
            by=m.by or "unknown",
            reason=f"{who or 'nobody'!r} is not an approver of step {sd.name!r} ({allowed})",
        )
        return None
    if m.approve:
        output: dict[str, Any] = {"approved": True, "by": m.by, "note": m.note}
        plan.emit(StepSucceeded, step=sd.name, attempt=ss.attempt, output=output)
    else:
        text = f"rejected by {m.by}" + (f": {m.note}" if m.note else "")
        plan.action_failed(sd, ErrorInfo(type="Rejected", message=text, business=True))
    return None


def fire_timers(plan: Plan) -> bool:
    """Fires the waiting steps' timers and the saga's deadline that are due; whether any was."""
    fired = False
    for sd in plan.d.steps:
        ss = plan.step_state(sd.name)
        if ss.wake_at is None or ss.wake_at > plan.now:
            continue
        if ss.status is StepStatus.SCHEDULED and plan.s.status is SagaStatus.RUNNING:
            fired = True
            start(plan, sd)
        elif ss.status is StepStatus.RUNNING and sd.approval is not None:
            fired = True
            _remind(plan, sd, ss.reminders)
    deadline = plan.s.deadline_at
    if deadline is not None and deadline <= plan.now and plan.s.status is SagaStatus.RUNNING:
        fired = True
        pivot = plan.d.pivot
        # A skipped pivot is crossed all the same: the steps after it go forward only.
        before_pivot = pivot is None or plan.step_state(pivot).status in (
            StepStatus.PENDING,
            StepStatus.SCHEDULED,
        )
        plan.emit(SagaDeadlinePassed, compensating=before_pivot)
        if before_pivot:
            plan.emit(SagaAborted, reason="the saga's deadline passed", step=None)
        else:
            text = f"saga {plan.s.saga_id!r} passed its deadline after its pivot: it goes on"
            plan.alerts.append(
                Alert(
                    saga_id=plan.s.saga_id,
                    saga_name=plan.s.name,
                    reason=text,
                    steps=[],
                    at=plan.now,
                    kind="deadline",
                )
            )
    return fired


def abandon(plan: Plan, sd: Step) -> bool:
    """While compensating: gives up a waiting step (or one waiting for its timer); whether
    it did. Neither has anything to undo."""
    ss = plan.step_state(sd.name)
    if ss.status is StepStatus.SCHEDULED:
        reason = "the saga is compensating: its timer is cancelled"
        plan.emit(StepSkipped, step=sd.name, attempt=0, reason=reason)
        return True
    if ss.status is StepStatus.RUNNING and not sd.has_effect:
        error = ErrorInfo(type="Abandoned", message="the saga is compensating", business=True)
        plan.emit(StepFailedEvent, step=sd.name, attempt=ss.attempt, error=error)
        return True
    return False


# -- helpers ---------------------------------------------------------------------------------


def _scope(plan: Plan) -> conditions.Scope:
    s = plan.s
    return conditions.Scope(saga_id=s.saga_id, saga_input=s.input, outputs=s.outputs())


def _due(plan: Plan, sd: Step) -> float:
    """When a step with a timer starts: now plus its delay, or the time its ``start_at`` reads.

    Raises:
        ValueError: ``start_at`` names nothing, or not a time (the message says which).
    """
    if sd.delay is not None:
        return plan.now + sd.delay
    assert sd.start_at is not None
    s = plan.s
    try:
        value = dataflow.render(
            sd.start_at, saga_id=s.saga_id, saga_input=s.input, outputs=s.outputs()
        )
    except dataflow.ResolveError as exc:
        raise ValueError(f"start_at: {exc}") from None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"start_at {sd.start_at}: {value!r} is not an ISO-8601 time") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    raise ValueError(
        f"start_at {sd.start_at}: expected seconds since the epoch or an ISO-8601 text, "
        f"got {type(value).__name__}"
    )


def _next_reminder(sd: Step, started: float, sent: int) -> float | None:
    """When an approval step's next reminder (``sent == 0``) or escalation is due."""
    approval = sd.approval
    assert approval is not None
    times = [t for t in (approval.remind_after, approval.escalate_after) if t is not None]
    times.sort()
    return started + times[sent] if sent < len(times) else None


def _remind(plan: Plan, sd: Step, sent: int) -> None:
    """Sends an approval step's reminder or escalation, and arms the next one."""
    approval = sd.approval
    assert approval is not None
    ss = plan.step_state(sd.name)
    started = (ss.deadline_at or plan.now) - sd.timeout  # when this attempt asked
    escalated = approval.escalate_after is not None and (
        approval.remind_after is None
        or approval.escalate_after <= approval.remind_after
        or sent >= 1
    )
    recipients = list(approval.escalate_to if escalated else approval.approvers)
    plan.emit(
        ApprovalReminded,
        step=sd.name,
        attempt=ss.attempt,
        escalated=escalated,
        recipients=recipients,
        next_at=_next_reminder(sd, started, sent + 1),
    )
    kind: AlertKind = "escalation" if escalated else "reminder"
    text = f"step {sd.name!r} still waits for a decision" + (
        f"; escalated to {', '.join(approval.escalate_to)}" if escalated else ""
    )
    _alert(plan, sd, kind, text, escalated)


def _alert(plan: Plan, sd: Step, kind: AlertKind, text: str, escalated: bool) -> None:
    approval = sd.approval
    recipients: list[str] = []
    if approval is not None:
        recipients = list(approval.escalate_to if escalated else approval.approvers)
    plan.alerts.append(
        Alert(
            saga_id=plan.s.saga_id,
            saga_name=plan.s.name,
            reason=text,
            steps=[sd.name],
            at=plan.now,
            kind=kind,
            recipients=recipients,
        )
    )
