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

Idempotency keys are ``saga/step/phase`` (plus ``/rN`` after an operator retry), the same for
every attempt: a retry after a timeout whose attempt did take effect returns the stored reply
instead of acting twice. DESIGN section 4 put the attempt in the key; that would let a slow
first attempt and its retry both take effect.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from saga.core import dataflow
from saga.core.definition import DependencyType, SagaDefinition, Step, StepKind
from saga.core.messages import (
    Alert,
    CancelRejected,
    CancelSaga,
    Command,
    CompensationResolved,
    CompensationRetryScheduled,
    CompensationStarted,
    CompensationSucceeded,
    ErrorInfo,
    EventBase,
    Phase,
    Reply,
    ResolveSaga,
    RetrySaga,
    SagaAborted,
    SagaCompensated,
    SagaCompleted,
    SagaResumed,
    SagaStarted,
    SagaStuck,
    StartSaga,
    StepFailedEvent,
    StepResolved,
    StepRetryScheduled,
    StepStarted,
    StepStuck,
    StepSucceeded,
    StepTimedOut,
)
from saga.core.state import SagaState, SagaStatus, StepState, StepStatus, evolve

__all__ = ["Decision", "Input", "Tick", "decide", "idempotency_key", "next_due"]


@dataclass(frozen=True, slots=True)
class Tick:
    """The clock's reading, given to a saga so that due deadlines and retries fire."""

    saga_id: str
    at: float


Input = StartSaga | CancelSaga | RetrySaga | ResolveSaga | Reply | Tick
"""Everything that can make a saga move."""


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


_SETTLED_FOR_UNDO = frozenset({StepStatus.PENDING, StepStatus.FAILED, StepStatus.COMPENSATED})
_IN_FLIGHT = frozenset(
    {
        StepStatus.RUNNING,
        StepStatus.RETRYING,
        StepStatus.COMPENSATING,
        StepStatus.COMPENSATION_RETRYING,
    }
)
_UNDO_OWED = frozenset({StepStatus.SUCCEEDED, StepStatus.UNKNOWN})
_PENDING = StepState()


def decide(
    definition: SagaDefinition | None,
    state: SagaState | None,
    message: Input,
    now: float,
    *,
    trace_parent: str | None = None,
) -> Decision:
    """Decides what one input does to one saga. Pure: see the module docstring.

    Args:
        definition: The saga's definition (``None`` when no definition has the name asked for).
        state: The saga's current state, ``None`` when it has not started.
        message: The input.
        now: The current time, in seconds since the epoch.
        trace_parent: The W3C traceparent to record when the input starts a saga.
    """
    if definition is None:
        name = message.saga_name if isinstance(message, StartSaga) else getattr(state, "name", "?")
        return Decision(state, rejected=f"no saga definition named {name!r}")
    plan = _Plan(definition, state, now)
    verdict = plan.react(message, trace_parent)
    if verdict is not None:
        kind, reason = verdict
        if kind == "rejected":
            return Decision(state, rejected=reason)
        return Decision(state, ignored=reason)
    plan.advance()
    return Decision(
        state=plan.state,
        events=tuple(plan.events),
        commands=tuple(plan.commands),
        alerts=tuple(plan.alerts),
    )


def next_due(state: SagaState) -> float | None:
    """The earliest deadline or retry time among the saga's steps, if any."""
    times = [t for s in state.steps.values() for t in (s.deadline_at, s.retry_at) if t is not None]
    return min(times) if times else None


def idempotency_key(saga_id: str, step: str, phase: Phase, round_: int = 0) -> str:
    """The key a participant dedupes on: the same for every attempt of one step and phase."""
    key = f"{saga_id}/{step}/{phase}"
    return f"{key}/r{round_}" if round_ else key


@dataclass
class _Plan:
    d: SagaDefinition
    state: SagaState | None
    now: float
    events: list[EventBase] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)

    # -- bookkeeping -------------------------------------------------------------------------

    @property
    def s(self) -> SagaState:
        assert self.state is not None  # every caller runs after the saga started
        return self.state

    def emit(self, cls: type[EventBase], **fields: Any) -> None:
        saga_id = fields.pop("saga_id", None) or self.s.saga_id
        seq = self.state.seq + 1 if self.state is not None else 1
        event = cls(saga_id=saga_id, seq=seq, at=self.now, **fields)
        self.state = evolve(self.state, event)
        self.events.append(event)

    def step_state(self, name: str) -> StepState:
        return self.s.steps.get(name, _PENDING)

    # -- reacting to the input ---------------------------------------------------------------

    def react(self, message: Input, trace_parent: str | None) -> tuple[str, str] | None:
        if isinstance(message, StartSaga):
            return self.on_start(message, trace_parent)
        if self.state is None:
            return "rejected", f"no saga with id {message.saga_id!r}"
        if isinstance(message, Reply):
            return self.on_reply(message)
        if isinstance(message, Tick):
            return self.on_tick()
        if isinstance(message, CancelSaga):
            return self.on_cancel(message)
        if isinstance(message, ResolveSaga):
            return self.on_resolve(message)
        return self.on_retry(message)

    def on_start(self, m: StartSaga, trace_parent: str | None) -> tuple[str, str] | None:
        if self.state is not None:
            return "ignored", f"saga {m.saga_id!r} has already started"
        if self.d.input_model is not None:
            try:
                self.d.input_model.model_validate(m.input)
            except ValidationError as exc:
                return "rejected", f"saga {self.d.name!r}: input is invalid: {_brief(exc)}"
        self.emit(
            SagaStarted,
            saga_id=m.saga_id,
            name=self.d.name,
            version=self.d.version,
            input=m.input,
            steps=[s.name for s in self.d.steps],
            trace_parent=trace_parent,
        )
        return None

    def on_reply(self, r: Reply) -> tuple[str, str] | None:
        where = f"saga {r.saga_id!r}, step {r.step!r}"
        if not self.d.has_step(r.step):
            return "rejected", f"{where}: saga {self.d.name!r} has no such step"
        sd = self.d.step(r.step)
        if r.service != sd.service:
            return (
                "rejected",
                f"{where}: reply from service {r.service!r}, step belongs to {sd.service!r}",
            )
        if r.phase == "compensation" and sd.compensation is None:
            return "rejected", f"{where}: compensation reply for a step that has no compensation"
        if r.ok == (r.error is not None):
            return "rejected", f"{where}: a reply carries an error exactly when it is not ok"
        ss = self.step_state(r.step)
        if r.phase == "action":
            if ss.status is not StepStatus.RUNNING or ss.attempt != r.attempt:
                return (
                    "ignored",
                    f"{where}: stale reply for attempt {r.attempt} ({ss.status.value})",
                )
            if r.ok:
                output = r.output or {}
                problem = _check_output(sd, output)
                if problem is None:
                    self.emit(StepSucceeded, step=r.step, attempt=r.attempt, output=output)
                else:
                    self.action_failed(sd, ErrorInfo(type="OutputInvalid", message=problem))
            else:
                assert r.error is not None
                # A handler cut off at its deadline may have done part of its work: the
                # outcome is as unknown as when no reply comes at all.
                self.action_failed(sd, r.error, timed_out=r.error.type == "Timeout")
            return None
        if ss.status is not StepStatus.COMPENSATING or ss.compensation_attempt != r.attempt:
            return "ignored", f"{where}: stale compensation reply for attempt {r.attempt}"
        if r.ok:
            self.emit(CompensationSucceeded, step=r.step, attempt=r.attempt)
        else:
            assert r.error is not None
            self.compensation_failed(sd, r.error)
        return None

    def on_tick(self) -> tuple[str, str] | None:
        fired = False
        timeout = ErrorInfo(type="Timeout", message="no reply before the step's deadline")
        for sd in self.d.steps:
            ss = self.step_state(sd.name)
            if ss.deadline_at is not None and ss.deadline_at <= self.now:
                fired = True
                if ss.status is StepStatus.RUNNING:
                    self.action_failed(sd, timeout, timed_out=True)
                elif ss.status is StepStatus.COMPENSATING:
                    self.compensation_failed(sd, timeout)
            elif ss.retry_at is not None and ss.retry_at <= self.now:
                fired = True
                if ss.status is StepStatus.RETRYING and self.s.status is SagaStatus.RUNNING:
                    self.start_step(sd, ss.attempt + 1)
                elif ss.status is StepStatus.COMPENSATION_RETRYING:
                    self.start_compensation(sd, ss.compensation_attempt + 1)
        return None if fired else ("ignored", "nothing due")

    def on_cancel(self, m: CancelSaga) -> tuple[str, str] | None:
        s = self.s
        if s.status is not SagaStatus.RUNNING:
            reason = f"the saga is {s.status.value}"
        elif (pivot := self.d.pivot) and self.step_state(pivot).status is not StepStatus.PENDING:
            reason = f"the pivot {pivot!r} has started: the saga can only go forward"
        else:
            self.emit(SagaAborted, reason=f"cancelled: {m.reason}", step=None)
            return None
        self.emit(CancelRejected, reason=reason)
        return None

    def on_retry(self, m: RetrySaga) -> tuple[str, str] | None:
        if self.s.status is not SagaStatus.STUCK:
            return "ignored", f"saga {m.saga_id!r} is {self.s.status.value}, not stuck"
        stuck = [sd for sd in self.d.steps if self.step_state(sd.name).status is StepStatus.STUCK]
        compensating = any(self.step_state(sd.name).stuck_phase == "compensation" for sd in stuck)
        self.emit(SagaResumed, compensating=compensating)
        for sd in stuck:
            ss = self.step_state(sd.name)
            if ss.stuck_phase == "compensation":
                self.start_compensation(sd, ss.compensation_attempt + 1)
            else:
                self.start_step(sd, ss.attempt + 1)
        return None

    def on_resolve(self, m: ResolveSaga) -> tuple[str, str] | None:
        if self.s.status is not SagaStatus.STUCK:
            return "ignored", f"saga {m.saga_id!r} is {self.s.status.value}, not stuck"
        stuck = [sd for sd in self.d.steps if self.step_state(sd.name).status is StepStatus.STUCK]
        compensating = any(self.step_state(sd.name).stuck_phase == "compensation" for sd in stuck)
        self.emit(SagaResumed, compensating=compensating)
        for sd in stuck:
            if self.step_state(sd.name).stuck_phase == "compensation":
                self.emit(CompensationResolved, step=sd.name, note=m.note)
            else:
                self.emit(StepResolved, step=sd.name, note=m.note)
        return None

    # -- failures ----------------------------------------------------------------------------

    def action_failed(self, sd: Step, error: ErrorInfo, *, timed_out: bool = False) -> None:
        ss = self.step_state(sd.name)
        used = ss.attempt - ss.budget_from
        running = self.s.status is SagaStatus.RUNNING
        # An earlier attempt that timed out may still land under the same idempotency key. A
        # business failure is stored under that key, so a late delivery replays it and takes no
        # effect; a technical failure is not stored, so the outcome stays unknown.
        unknown = timed_out or (ss.uncertain and not error.business)
        if not error.business and running and sd.retry.allows_retry(used, error.type):
            delay = sd.retry.backoff(used, f"{self.s.saga_id}/{sd.name}/action")
            self.emit(
                StepRetryScheduled,
                step=sd.name,
                attempt=ss.attempt,
                error=error,
                retry_at=self.now + delay,
            )
        elif sd.kind is StepKind.RETRIABLE or (sd.kind is StepKind.PIVOT and unknown):
            self.emit(StepStuck, step=sd.name, phase="action", attempt=ss.attempt, error=error)
        elif unknown:
            self.emit(StepTimedOut, step=sd.name, attempt=ss.attempt)
        else:
            self.emit(StepFailedEvent, step=sd.name, attempt=ss.attempt, error=error)

    def compensation_failed(self, sd: Step, error: ErrorInfo) -> None:
        ss = self.step_state(sd.name)
        used = ss.compensation_attempt - ss.budget_from
        if not error.business and sd.compensation_retry.allows_retry(used, error.type):
            delay = sd.compensation_retry.backoff(used, f"{self.s.saga_id}/{sd.name}/compensation")
            self.emit(
                CompensationRetryScheduled,
                step=sd.name,
                attempt=ss.compensation_attempt,
                error=error,
                retry_at=self.now + delay,
            )
        else:
            self.emit(
                StepStuck,
                step=sd.name,
                phase="compensation",
                attempt=ss.compensation_attempt,
                error=error,
            )

    # -- starting work -----------------------------------------------------------------------

    def start_step(self, sd: Step, attempt: int) -> None:
        try:
            payload = self.render_input(sd)
        except (dataflow.ResolveError, ValidationError) as exc:
            error = ErrorInfo(type="InputInvalid", message=_brief(exc), business=True)
            if sd.kind is StepKind.RETRIABLE:
                # Past the pivot there is no going back: an operator must fix the data.
                self.emit(StepStuck, step=sd.name, phase="action", attempt=attempt - 1, error=error)
            else:
                self.emit(StepFailedEvent, step=sd.name, attempt=attempt - 1, error=error)
            return
        deadline = self.now + sd.timeout
        self.emit(StepStarted, step=sd.name, attempt=attempt, deadline_at=deadline)
        self.command(sd, "action", sd.action, attempt, payload, deadline)

    def start_compensation(self, sd: Step, attempt: int) -> None:
        assert sd.compensation is not None  # only compensatable steps are ever compensated
        try:
            step_input: Any = self.render_input(sd)
        except (dataflow.ResolveError, ValidationError):
            step_input = None  # the action never ran with it; the compensation must cope
        payload = {"input": step_input, "output": self.step_state(sd.name).output}
        deadline = self.now + sd.timeout
        self.emit(CompensationStarted, step=sd.name, attempt=attempt, deadline_at=deadline)
        self.command(sd, "compensation", sd.compensation, attempt, payload, deadline)

    def render_input(self, sd: Step) -> Any:
        s = self.s
        value = dataflow.render(
            sd.input, saga_id=s.saga_id, saga_input=s.input, outputs=s.outputs()
        )
        if sd.input_model is not None:
            value = sd.input_model.model_validate(value).model_dump(mode="json")
        if not isinstance(value, dict):
            raise dataflow.ResolveError(f"the input must be an object, got {type(value).__name__}")
        return value

    def command(
        self, sd: Step, phase: Phase, action: str, attempt: int, payload: Any, deadline: float
    ) -> None:
        s = self.s
        round_ = self.step_state(sd.name).budget_from
        self.commands.append(
            Command(
                message_id=f"{s.saga_id}/{sd.name}/{phase}/{attempt}",
                saga_id=s.saga_id,
                saga_name=s.name,
                saga_version=s.version,
                step=sd.name,
                phase=phase,
                service=sd.service,
                action=action,
                attempt=attempt,
                idempotency_key=idempotency_key(s.saga_id, sd.name, phase, round_),
                payload=payload,
                deadline_at=deadline,
                at=self.now,
            )
        )

    # -- advancing to a fixpoint -------------------------------------------------------------

    def advance(self) -> None:
        while True:
            status = self.s.status
            if status is SagaStatus.RUNNING:
                if not self.advance_forward():
                    return
            elif status is SagaStatus.COMPENSATING:
                if not self.advance_backward():
                    return
            else:
                return

    def advance_forward(self) -> bool:
        """One round of forward progress; False when the saga cannot move further now."""
        for sd in self.d.steps:
            ss = self.step_state(sd.name)
            if ss.status in (StepStatus.FAILED, StepStatus.UNKNOWN):
                reason = f"step {sd.name!r} failed: {ss.error.message if ss.error else 'unknown'}"
                self.emit(SagaAborted, reason=reason, step=sd.name)
                return True
        ready = [sd for sd in self.d.steps if self.is_ready(sd)]
        for sd in ready:
            self.start_step(sd, 1)
        if ready:
            return True
        if all(self.is_finished(sd.name) for sd in self.d.steps):
            self.emit(SagaCompleted)
        elif self.quiescent_and_stuck():
            self.emit(SagaStuck, reason=self.stuck_reason())
            self.raise_alert()
        return False

    def advance_backward(self) -> bool:
        progressed = False
        for sd in self.d.steps:
            ss = self.step_state(sd.name)
            if ss.status is StepStatus.RETRYING:
                progressed = True
                if ss.uncertain:
                    self.emit(StepTimedOut, step=sd.name, attempt=ss.attempt)
                else:
                    error = ErrorInfo(
                        type="Abandoned",
                        message="retries abandoned: the saga is compensating",
                    )
                    self.emit(StepFailedEvent, step=sd.name, attempt=ss.attempt, error=error)
        for sd in self.d.steps:
            if self.step_state(sd.name).status in _UNDO_OWED and self.dependents_settled(sd.name):
                progressed = True
                self.start_compensation(sd, 1)
        if progressed:
            return True
        statuses = [self.step_state(sd.name).status for sd in self.d.steps]
        if any(st in _IN_FLIGHT for st in statuses):
            return False
        if StepStatus.STUCK in statuses:
            self.emit(SagaStuck, reason=self.stuck_reason())
            self.raise_alert()
        elif not any(st in _UNDO_OWED for st in statuses):
            self.emit(SagaCompensated)
        return False

    def is_ready(self, sd: Step) -> bool:
        if self.step_state(sd.name).status is not StepStatus.PENDING:
            return False
        for dep in sd.depends_on:
            if dep.type is DependencyType.FINISH_TO_START and not self.is_finished(dep.step):
                return False
            if dep.type is DependencyType.START_TO_START and not self.has_started(dep.step):
                return False
        if sd.kind is StepKind.PIVOT:
            return all(
                self.is_finished(o.name) for o in self.d.steps if o.kind is StepKind.COMPENSATABLE
            )
        if sd.kind is StepKind.RETRIABLE:
            pivot = self.d.pivot
            return pivot is not None and self.is_finished(pivot)
        return True

    def has_started(self, name: str) -> bool:
        return self.step_state(name).status is not StepStatus.PENDING

    def is_finished(self, name: str) -> bool:
        if self.step_state(name).status is not StepStatus.SUCCEEDED:
            return False
        for dep in self.d.step(name).depends_on:
            if dep.type is DependencyType.FINISH_TO_FINISH and not self.is_finished(dep.step):
                return False
            if dep.type is DependencyType.START_TO_FINISH and not self.has_started(dep.step):
                return False
        return True

    def dependents_settled(self, name: str) -> bool:
        return all(
            self.step_state(dependent).status in _SETTLED_FOR_UNDO
            for dependent, _ in self.d.dependents(name)
        )

    def quiescent_and_stuck(self) -> bool:
        statuses = [self.step_state(sd.name).status for sd in self.d.steps]
        return StepStatus.STUCK in statuses and not any(st in _IN_FLIGHT for st in statuses)

    def stuck_steps(self) -> Iterator[tuple[str, StepState]]:
        for sd in self.d.steps:
            ss = self.step_state(sd.name)
            if ss.status is StepStatus.STUCK:
                yield sd.name, ss

    def stuck_reason(self) -> str:
        parts = [
            f"step {name!r} ({ss.stuck_phase}): {ss.error.message if ss.error else 'unknown'}"
            for name, ss in self.stuck_steps()
        ]
        return "; ".join(parts) + " — run `saga retry` once the cause is fixed"

    def raise_alert(self) -> None:
        s = self.s
        self.alerts.append(
            Alert(
                saga_id=s.saga_id,
                saga_name=s.name,
                reason=s.reason or "stuck",
                steps=[name for name, _ in self.stuck_steps()],
                at=self.now,
            )
        )


def _check_output(sd: Step, output: dict[str, Any]) -> str | None:
    if sd.output_model is None:
        return None
    try:
        sd.output_model.model_validate(output)
    except ValidationError as exc:
        return f"output does not match {sd.output_model.__name__}: {_brief(exc)}"
    return None


def _brief(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors()
        )
    return str(exc)
