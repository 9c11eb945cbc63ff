"""`decide`: given a saga's definition, state and one input, what happens next.

Theory of operation
-------------------
``decide(definition, state, input, now)`` is a pure function. It never reads a clock (``now``
is given), makes no random ids (message ids and idempotency keys are derived from the saga id,
step, phase and attempt) and performs no I/O. It returns a `Decision`: the events to append to
the log, the commands to send, the alerts to raise, and the state after the events (which is
exactly the fold of `saga.core.state.evolve` over them).

It works in two parts:

1. **React** to the input: a start request, a cancel, an operator retry, a participant's reply,
   or a `Tick` (the clock passed a step's deadline or retry time). Inputs that do not fit the
   saga (unknown step, a reply from the wrong service) are *rejected*, and the runtime sends them
   to the dead-letter topic. Inputs that are valid but change nothing (a stale reply from an
   attempt already given up, a tick with nothing due) are *ignored*, with the reason.

   A start is always answered in the log. One that cannot run (no definition of its name, an
   input that does not fit) is recorded as a `SagaRejected` saga, final, with the reason; as
   nothing ran, a later valid start of the id starts it. One for an id whose saga exists follows
   the request's ``if_exists`` (the id-reuse policy): the existing saga is kept, and the request
   is recorded as its `StartIgnored`, or as `StartRefused` under ``"refuse"`` when its name or
   input differs. Neither needs the definition, nor changes the saga's status.
2. **Advance** the saga to a fixpoint: abort when a step has failed for good; start every step
   whose dependencies allow it; compensate, in reverse dependency order, the steps whose
   dependents are all settled; end the saga when nothing is left to do.

Scheduling rules (DESIGN section 5):

- finish-to-start A->B: B starts once A is *finished*; start-to-start: once A has started.
  finish-to-finish: B is not *finished* until A is; start-to-finish: not until A has started.
  A step is finished when it succeeded and those two constraints hold.
- The pivot starts only when every compensatable step has finished, and retriable steps only
  once the pivot has: the point of no return is never crossed with undo work still possible.
- A technical failure or a missed deadline is retried per the step's `RetryPolicy` while the
  saga runs forward; a business failure never is. Retriable steps and compensations that exhaust
  their policy, and a pivot whose outcome is unknown, make the step *stuck*.
- While compensating, no new step starts and pending retries are abandoned. A step is
  compensated once it succeeded, or once its last attempt timed out (outcome unknown), and
  only after every step that depends on it has been compensated or never ran. Independent
  branches compensate concurrently.
- The saga ends ``completed``, ``compensated``, or ``stuck`` once nothing is in flight and
  something is stuck; an alert goes with ``stuck``.

This module holds the entry points. The reactions of part 1 are `saga.core.plan`; part 2, and
the rules of what may start or be compensated next, are `saga.core.schedule`.

Idempotency keys are ``saga/step/phase`` (plus ``/rN`` after an operator retry), the same for
every attempt: a retry after a timeout whose attempt did take effect returns the stored reply
instead of acting twice. DESIGN section 4 put the attempt in the key; that would let a slow
first attempt and its retry both take effect.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from saga.core import primitives, schedule, subsagas
from saga.core.definition import SagaDefinition
from saga.core.messages import (
    Alert,
    CancelRejected,
    CancelSaga,
    Command,
    CompensateSaga,
    DecideApproval,
    EventBase,
    Reply,
    Request,
    RequestDenied,
    ResolveSaga,
    RetrySaga,
    SagaCompensationAsked,
    SagaRejected,
    SagaStuck,
    SignalSaga,
    StartIgnored,
    StartRefused,
    StartSaga,
)
from saga.core.plan import Plan, idempotency_key
from saga.core.state import SagaState, SagaStatus, evolve
from saga.core.triggers import OutcomeRecord, outcome_records

__all__ = [
    "Decision",
    "Input",
    "InputKind",
    "Tick",
    "decide",
    "deny",
    "give_up",
    "idempotency_key",
    "input_kind",
    "message_id",
    "next_due",
]


@dataclass(frozen=True, slots=True)
class Tick:
    """The clock's reading, given to a saga so that due deadlines and retries fire."""

    saga_id: str
    at: float


Input = (
    StartSaga
    | CancelSaga
    | RetrySaga
    | ResolveSaga
    | SignalSaga
    | DecideApproval
    | CompensateSaga
    | Reply
    | Tick
)
"""Everything that can make a saga move."""

InputKind = Literal[
    "start", "cancel", "retry", "resolve", "signal", "approval", "compensate", "reply", "timer"
]
"""What kind of input a decision answered (`input_kind`)."""


def input_kind(message: Input) -> InputKind:
    """The kind of ``message``: its ``type``, with ``timer`` for a `Tick`.

    Args:
        message: The input a decision answered.
    """
    return "timer" if isinstance(message, Tick) else message.type


@dataclass(frozen=True, slots=True)
class Decision:
    """What `decide` concluded. ``state`` is the fold of ``events`` over the given state."""

    state: SagaState | None
    events: tuple[EventBase, ...] = ()
    commands: tuple[Command, ...] = ()
    alerts: tuple[Alert, ...] = ()
    outcomes: tuple[OutcomeRecord, ...] = ()
    """The outcome events its saga publishes (it has just ended; `saga.core.triggers`)."""
    requests: tuple[Request, ...] = ()
    """Requests to other sagas: a sub-saga's start, or its compensation
    (`saga.core.subsagas`)."""
    replies: tuple[Reply, ...] = ()
    """A sub-saga's replies to its parent's step."""
    rejected: str | None = None
    """Why the input does not fit the saga: it belongs in the dead-letter topic."""
    ignored: str | None = None
    """Why a valid input changed nothing (a duplicate, a stale reply, nothing due)."""


def decide(
    definition: SagaDefinition | None,
    state: SagaState | None,
    message: Input,
    now: float,
) -> Decision:
    """Decides what one input does to one saga. Pure: see the module docstring.

    Args:
        definition: The saga's definition (``None`` when no definition has the name asked for).
        state: The saga's current state, ``None`` when it has not started.
        message: The input.
        now: The current time, in seconds since the epoch.
    """
    decision = _decide(definition, state, message, now)
    replies = subsagas.replies_to_parent(decision.state, decision.events)
    if replies:
        decision = replace(decision, replies=(*decision.replies, *replies))
    return decision


def _decide(
    definition: SagaDefinition | None,
    state: SagaState | None,
    message: Input,
    now: float,
) -> Decision:
    rejected = state is not None and state.status is SagaStatus.REJECTED
    if isinstance(message, StartSaga):
        if state is not None and not rejected:
            return _duplicate_start(state, message, now)
        if definition is None:
            reason = f"no saga definition named {message.saga_name!r}"
            return _record(
                state,
                SagaRejected,
                now,
                saga_id=message.saga_id,
                message_id=message.message_id,
                name=message.saga_name,
                input=message.input,
                reason=reason,
                by=message.by,
                parent=message.parent,
            )
    elif state is not None and message_id(message) in state.requests:
        return Decision(state, ignored=f"request {message_id(message)} was already answered")
    elif state is not None and rejected:
        return _after_rejection(state, message, now)
    if definition is None:
        name = state.name if state else "?"
        return Decision(state, rejected=f"no saga definition named {name!r}")
    plan = Plan(definition, state, now)
    verdict = _react(plan, message)
    if verdict is not None:
        kind, reason = verdict
        if kind == "rejected":
            return Decision(state, rejected=reason)
        return Decision(state, ignored=reason)
    schedule.advance(plan)
    return _decided(plan)


def _decided(plan: Plan) -> Decision:
    """The plan's decision, with the outcome events its saga publishes if it just ended."""
    outcomes = (
        outcome_records(plan.d.outcomes, plan.state, plan.events) if plan.state is not None else []
    )
    return Decision(
        state=plan.state,
        events=tuple(plan.events),
        commands=tuple(plan.commands),
        alerts=tuple(plan.alerts),
        outcomes=tuple(outcomes),
        requests=tuple(plan.requests),
        replies=tuple(plan.replies),
    )


_REMEMBERED = (CancelSaga, RetrySaga, ResolveSaga, SignalSaga, DecideApproval, CompensateSaga)


def message_id(message: Input) -> str | None:
    """The message id of an operator request (cancel, retry, resolve), else ``None``: what
    `SagaState.requests` remembers, so that a request answered once is ignored after."""
    if isinstance(message, _REMEMBERED):
        return message.message_id
    return None


def deny(state: SagaState | None, request: Request, by: str, reason: str, now: float) -> Decision:
    """A signed request the authorization policy refused (`saga.core.policy.authorize`).

    The refusal is recorded and raises an alert, so the audit trail shows it: a start of an id
    with no saga (or a rejected one) is a `SagaRejected` saga, which a later allowed start
    still starts; any other request is a `RequestDenied` event of its saga, which changes
    nothing else. A request for an id that names no saga leaves no record (there is no log to
    put it in): the caller dead-letters it.

    Args:
        state: The saga's state, ``None`` when it has not started.
        request: The refused request, its ``by`` the verified principal.
        by: The principal that signed it.
        reason: Why the policy refused it.
        now: The current time.
    """
    text = f"{request.type} by {by!r} refused: {reason}"
    if isinstance(request, StartSaga) and (state is None or state.status is SagaStatus.REJECTED):
        decision = _record(
            state,
            SagaRejected,
            now,
            saga_id=request.saga_id,
            message_id=request.message_id,
            name=request.saga_name,
            input=request.input,
            reason=text,
            by=by,
        )
    elif state is None:
        return Decision(None, rejected=text)
    else:
        decision = _record(
            state,
            RequestDenied,
            now,
            request=request.type,
            message_id=request.message_id,
            by=by,
            reason=reason,
        )
    assert decision.state is not None
    name = request.saga_name if isinstance(request, StartSaga) else decision.state.name
    alert = Alert(
        saga_id=request.saga_id, saga_name=name, reason=text, steps=[], at=now, kind="denied"
    )
    return Decision(decision.state, events=decision.events, alerts=(alert,))


def next_due(state: SagaState) -> float | None:
    """The earliest deadline or retry time among the saga's steps, if any.

    Args:
        state: The saga's state.
    """
    times = [
        t
        for s in state.steps.values()
        for t in (s.deadline_at, s.retry_at, s.wake_at)
        if t is not None
    ]
    if state.deadline_at is not None and state.status is SagaStatus.RUNNING:
        times.append(state.deadline_at)
    return min(times) if times else None


def _record(
    state: SagaState | None, cls: type[EventBase], now: float, **fields: object
) -> Decision:
    """A decision of one event, which needs no definition (a rejection, a duplicate start)."""
    saga_id = fields.pop("saga_id", None) or (state.saga_id if state is not None else "")
    seq = state.seq + 1 if state is not None else 1
    event = cls(saga_id=saga_id, seq=seq, at=now, **fields)
    return Decision(evolve(state, event), events=(event,))


def _duplicate_start(state: SagaState, m: StartSaga, now: float) -> Decision:
    """A start for an id whose saga exists: kept, and recorded, by the id-reuse policy."""
    same = {"name": m.saga_name == state.name, "input": m.input == state.input}
    differs = [k for k, equal in same.items() if not equal]
    how = []
    if "name" in differs:
        how.append(f"as {state.name!r}, not {m.saga_name!r}")
    if "input" in differs:
        how.append("with another input")
    where = f"saga {state.saga_id!r} has already started ({state.status.value})"
    if differs and m.if_exists == "refuse":
        reason = f"{where} {', and '.join(how)}: refused (if_exists='refuse')"
        return _record(
            state,
            StartRefused,
            now,
            message_id=m.message_id,
            reason=reason,
            differs=differs,
            by=m.by,
        )
    if differs:
        reason = f"{where} {', and '.join(how)}: the existing saga is kept (if_exists='return')"
    else:
        reason = f"{where}: the existing saga is kept"
    return _record(
        state, StartIgnored, now, message_id=m.message_id, reason=reason, differs=differs, by=m.by
    )


def _after_rejection(state: SagaState, message: Input, now: float) -> Decision:
    """Any input but a start, for a rejected saga: it has no steps and sent nothing."""
    if isinstance(message, CancelSaga):
        return _record(
            state,
            CancelRejected,
            now,
            reason="the saga is rejected",
            message_id=message.message_id,
            by=message.by,
        )
    if isinstance(message, RetrySaga | ResolveSaga):
        return Decision(state, ignored=f"saga {state.saga_id!r} is rejected, not stuck")
    if isinstance(message, SignalSaga | DecideApproval):
        return Decision(state, rejected=f"saga {state.saga_id!r} was rejected: nothing waits")
    if isinstance(message, CompensateSaga):
        # Nothing ran: compensated already (`subsagas.replies_to_parent` answers the parent).
        return _record(
            state,
            SagaCompensationAsked,
            now,
            attempt=message.parent.attempt,
            message_id=message.message_id,
            by=message.by,
        )
    if isinstance(message, Reply):
        return Decision(
            state,
            rejected=f"saga {state.saga_id!r} was rejected ({state.reason}): it sent no commands",
        )
    return Decision(state, ignored="nothing due")


def _react(plan: Plan, message: Input) -> tuple[str, str] | None:
    # The dispatch on the input's type is here, with `Input` and `Tick`, so that the planner
    # (saga.core.plan) need not import this module.
    if isinstance(message, StartSaga):
        return plan.on_start(message)
    if plan.state is None:
        return "rejected", f"no saga with id {message.saga_id!r}"
    if isinstance(message, Reply):
        return plan.on_reply(message)
    if isinstance(message, Tick):
        return plan.on_tick()
    if isinstance(message, CancelSaga):
        return plan.on_cancel(message)
    if isinstance(message, ResolveSaga):
        return plan.on_resolve(message)
    if isinstance(message, SignalSaga):
        return primitives.on_signal(plan, message)
    if isinstance(message, DecideApproval):
        return primitives.on_approval(plan, message)
    if isinstance(message, CompensateSaga):
        return subsagas.on_compensate(plan, message)
    return plan.on_retry(message)


def give_up(
    definition: SagaDefinition, state: SagaState, reason: str, now: float
) -> Decision | None:
    """The saga stops where it is, stuck with ``reason``, and an operator is alerted.

    For what the saga's rules cannot express: the runtime could not carry out a decision (its
    records would exceed what the broker accepts), so the saga must not move on as if it had.
    ``None`` when the saga has already ended (nothing to stop).
    """
    if state.status not in (SagaStatus.RUNNING, SagaStatus.COMPENSATING):
        return None
    plan = Plan(definition, state, now)
    plan.emit(SagaStuck, reason=reason)
    schedule.raise_alert(plan)
    return _decided(plan)
