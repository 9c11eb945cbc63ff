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
   to the dead-letter topic. Inputs that are valid but change nothing (a duplicate start, a
   stale reply from an attempt already given up) are *ignored*, with the reason.
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

from dataclasses import dataclass
from typing import Literal

from saga.core import schedule
from saga.core.definition import SagaDefinition
from saga.core.messages import (
    Alert,
    CancelSaga,
    Command,
    EventBase,
    Reply,
    ResolveSaga,
    RetrySaga,
    StartSaga,
)
from saga.core.plan import Plan, idempotency_key
from saga.core.state import SagaState

__all__ = [
    "Decision",
    "Input",
    "InputKind",
    "Tick",
    "decide",
    "idempotency_key",
    "input_kind",
    "next_due",
]


@dataclass(frozen=True, slots=True)
class Tick:
    """The clock's reading, given to a saga so that due deadlines and retries fire."""

    saga_id: str
    at: float


Input = StartSaga | CancelSaga | RetrySaga | ResolveSaga | Reply | Tick
"""Everything that can make a saga move."""

InputKind = Literal["start", "cancel", "retry", "resolve", "reply", "timer"]
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
    if definition is None:
        name = message.saga_name if isinstance(message, StartSaga) else state.name if state else "?"
        return Decision(state, rejected=f"no saga definition named {name!r}")
    plan = Plan(definition, state, now)
    verdict = _react(plan, message)
    if verdict is not None:
        kind, reason = verdict
        if kind == "rejected":
            return Decision(state, rejected=reason)
        return Decision(state, ignored=reason)
    schedule.advance(plan)
    return Decision(
        state=plan.state,
        events=tuple(plan.events),
        commands=tuple(plan.commands),
        alerts=tuple(plan.alerts),
    )


def next_due(state: SagaState) -> float | None:
    """The earliest deadline or retry time among the saga's steps, if any.

    Args:
        state: The saga's state.
    """
    times = [t for s in state.steps.values() for t in (s.deadline_at, s.retry_at) if t is not None]
    return min(times) if times else None


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
    return plan.on_retry(message)
