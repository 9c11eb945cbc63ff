"""The planner behind `saga.core.decide`: one decision in the making.

A `Plan` holds what one call of `decide` has concluded so far: the state after the events
emitted until now, and the events, commands and alerts themselves. Its methods are part 1 of
deciding (see `saga.core.decide`): the reactions to each kind of input, with the failures a
reply or a deadline brings and the retries they schedule, and the starting of an attempt (its
event and its command). Part 2, advancing to a fixpoint, is `saga.core.schedule.advance`, which
drives a plan through the same methods. Everything that changes the state goes through
`Plan.emit`, so the state is always the fold of the events.

`idempotency_key` is here rather than in `saga.core.decide` (which re-exports it) because the
commands are built here, and `saga.core.decide` imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from saga.core import dataflow, primitives, schedule, subsagas
from saga.core.definition import SagaDefinition, Step, StepKind, split_item
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
    Request,
    ResolveSaga,
    RetrySaga,
    SagaAborted,
    SagaResumed,
    SagaStarted,
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

__all__ = ["Plan", "idempotency_key"]


def idempotency_key(saga_id: str, step: str, phase: Phase, round_: int = 0) -> str:
    """The key a participant dedupes on: the same for every attempt of one step and phase.

    Args:
        saga_id: The saga's id.
        step: The step's name.
        phase: ``action`` or ``compensation``.
        round_: How many operator retries came before (``0`` before any). Each starts a new key
            for an action, so that a stuck step runs again for real. A compensation ignores it
            and keeps one key for good: a compensation that took effect but whose reply was
            lost must not take effect again when an operator retries it (a second refund).
    """
    key = f"{saga_id}/{step}/{phase}"
    return f"{key}/r{round_}" if round_ and phase == "action" else key


@dataclass
class Plan:
    """One decision in the making: the state so far, and what has been decided on the way.

    The reactions (``on_*``) return ``None`` when the input was taken, or a ``(kind, reason)``
    pair, ``kind`` being ``"rejected"`` or ``"ignored"``, when it changed nothing.
    """

    d: SagaDefinition
    """The saga's definition."""
    state: SagaState | None
    """The state after the events emitted so far; ``None`` until the saga starts."""
    now: float
    """The time of the decision, in seconds since the epoch."""
    events: list[EventBase] = field(default_factory=list)
    """The events to append to the log, in order."""
    commands: list[Command] = field(default_factory=list)
    """The commands to send."""
    alerts: list[Alert] = field(default_factory=list)
    """The alerts to raise."""
    requests: list[Request] = field(default_factory=list)
    """Requests to other sagas (a sub-saga's start or compensation)."""
    replies: list[Reply] = field(default_factory=list)
    """Replies to this saga's parent (it is a sub-saga)."""

    # -- bookkeeping -------------------------------------------------------------------------

    @property
    def s(self) -> SagaState:
        """The state, for the callers that run once the saga has started."""
        assert self.state is not None  # every caller runs after the saga started
        return self.state

    def emit(self, cls: type[EventBase], **fields: Any) -> None:
        """Appends an event of type ``cls`` and folds it into the state."""
        saga_id = fields.pop("saga_id", None) or self.s.saga_id
        seq = self.state.seq + 1 if self.state is not None else 1
        event = cls(saga_id=saga_id, seq=seq, at=self.now, **fields)
        self.state = evolve(self.state, event)
        self.events.append(event)

    def step_state(self, name: str) -> StepState:
        """The state of step ``name`` now."""
        return schedule.step_state(self.s, name)

    def stuck_steps(self) -> Iterator[tuple[str, StepState]]:
        """The stuck steps now, with their states."""
        return schedule.stuck_steps(self.d, self.s)

    # -- reacting to the input ---------------------------------------------------------------

    def on_start(self, m: StartSaga) -> tuple[str, str] | None:
        """A start request for an id with no saga, or a rejected one (nothing ran): starts the
        saga, or records it as rejected when its input does not fit the definition.

        A start for an id whose saga exists is answered by `saga.core.decide` (the id-reuse
        policy needs no definition); one reaching here changes nothing.
        """
        from saga.core.messages import SagaRejected  # here: this reaction is its only user

        if self.state is not None and self.state.status is not SagaStatus.REJECTED:
            return "ignored", f"saga {m.saga_id!r} has already started"
        if self.d.input_model is not None:
            try:
                self.d.input_model.model_validate(m.input)
            except ValidationError as exc:
                self.emit(
                    SagaRejected,
                    saga_id=m.saga_id,
                    message_id=m.message_id,
                    name=self.d.name,
                    version=self.d.version,
                    digest=self.d.digest,
                    input=m.input,
                    reason=f"saga {self.d.name!r}: input is invalid: {_brief(exc)}",
                    by=m.by,
                    parent=m.parent,
                )
                return None
        self.emit(
            SagaStarted,
            saga_id=m.saga_id,
            name=self.d.name,
            version=self.d.version,
            input=m.input,
            steps=[s.name for s in self.d.steps],
            digest=self.d.digest,
            by=m.by,
            deadline_at=self.now + self.d.deadline if self.d.deadline is not None else None,
            parent=m.parent,
        )
        return None

    def on_reply(self, r: Reply) -> tuple[str, str] | None:
        """A participant's reply to the current attempt of an action or compensation."""
        where = f"saga {r.saga_id!r}, step {r.step!r}"
        if not self.d.has_step(r.step) or (
            self.d.step(r.step).for_each is not None and r.step not in self.s.steps
        ):
            return "rejected", f"{where}: saga {self.d.name!r} has no such step"
        sd = self.d.unit(r.step)
        if sd.for_each is not None and not schedule.is_item(r.step):
            return "rejected", f"{where}: a for_each step is answered item by item"
        if r.service != (answers := subsagas.responder(sd)):
            return (
                "rejected",
                f"{where}: reply from service {r.service!r}, step belongs to {answers!r}",
            )
        if r.phase == "compensation" and sd.compensation is None and sd.saga is None:
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
        """The clock: fires the deadlines and retries that are due by ``now``."""
        fired = False
        timeout = ErrorInfo(type="Timeout", message="no reply before the step's deadline")
        for sd in schedule.units(self.d, self.s):
            ss = self.step_state(sd.name)
            if ss.deadline_at is not None and ss.deadline_at <= self.now:
                fired = True
                if ss.status is StepStatus.RUNNING and not sd.has_effect:
                    self.action_failed(sd, primitives.waiting_timeout(sd))
                elif ss.status is StepStatus.RUNNING:
                    self.action_failed(sd, timeout, timed_out=True)
                elif ss.status is StepStatus.COMPENSATING:
                    self.compensation_failed(sd, timeout)
            elif ss.retry_at is not None and ss.retry_at <= self.now:
                fired = True
                if ss.status is StepStatus.RETRYING and self.s.status is SagaStatus.RUNNING:
                    self.start_step(sd, ss.attempt + 1)
                elif ss.status is StepStatus.COMPENSATION_RETRYING:
                    self.start_compensation(sd, ss.compensation_attempt + 1)
        fired = primitives.fire_timers(self) or fired
        return None if fired else ("ignored", "nothing due")

    def on_cancel(self, m: CancelSaga) -> tuple[str, str] | None:
        """A cancel: aborts a running saga whose pivot has not started, else records why not."""
        s = self.s
        if s.status is not SagaStatus.RUNNING:
            reason = f"the saga is {s.status.value}"
        elif (pivot := self.d.pivot) and self.step_state(pivot).status is not StepStatus.PENDING:
            reason = f"the pivot {pivot!r} has started: the saga can only go forward"
        else:
            self.emit(
                SagaAborted,
                reason=f"cancelled: {m.reason}",
                step=None,
                message_id=m.message_id,
                by=m.by,
            )
            return None
        self.emit(CancelRejected, reason=reason, message_id=m.message_id, by=m.by)
        return None

    def on_retry(self, m: RetrySaga) -> tuple[str, str] | None:
        """An operator's retry: tries each stuck step again, with a fresh retry budget."""
        return self.resume(
            m,
            action=lambda sd, ss: self.start_step(sd, ss.attempt + 1),
            compensation=lambda sd, ss: self.start_compensation(sd, ss.compensation_attempt + 1),
        )

    def on_resolve(self, m: ResolveSaga) -> tuple[str, str] | None:
        """An operator's resolve: records each stuck step as settled by hand."""
        return self.resume(
            m,
            action=lambda sd, ss: self.emit(
                StepResolved, step=sd.name, attempt=ss.attempt, note=m.note
            ),
            compensation=lambda sd, ss: self.emit(
                CompensationResolved, step=sd.name, attempt=ss.compensation_attempt, note=m.note
            ),
        )

    def resume(
        self,
        m: RetrySaga | ResolveSaga,
        *,
        action: Callable[[Step, StepState], None],
        compensation: Callable[[Step, StepState], None],
    ) -> tuple[str, str] | None:
        """An operator's retry or resolve: resumes a stuck saga and hands each stuck step to
        ``action`` or ``compensation``, by the phase it is stuck in."""
        if self.s.status is not SagaStatus.STUCK:
            return "ignored", f"saga {m.saga_id!r} is {self.s.status.value}, not stuck"
        stuck = list(self.stuck_steps())
        compensating = any(ss.stuck_phase == "compensation" for _, ss in stuck)
        self.emit(
            SagaResumed,
            compensating=compensating,
            reason=m.note if isinstance(m, ResolveSaga) else m.reason,
            message_id=m.message_id,
            by=m.by,
        )
        for name, ss in stuck:
            (compensation if ss.stuck_phase == "compensation" else action)(self.d.unit(name), ss)
        return None

    # -- failures ----------------------------------------------------------------------------

    def action_failed(self, sd: Step, error: ErrorInfo, *, timed_out: bool = False) -> None:
        """An attempt of ``sd``'s action failed: retry it, or the step failed, timed out or is
        stuck."""
        ss = self.step_state(sd.name)
        used = ss.attempt - ss.budget_from
        running = self.s.status is SagaStatus.RUNNING
        # An earlier attempt that timed out may still land under the same idempotency key. A
        # business failure is stored under that key, so a late delivery replays it and takes no
        # effect; a technical failure is stored for its own attempt only, so the earlier one
        # may still succeed late and the outcome stays unknown.
        unknown = timed_out or (ss.uncertain and not error.business)
        retries = sd.saga is None  # a sub-saga runs once: its step is not tried again
        if not error.business and running and retries and sd.retry.allows_retry(used, error.type):
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
        """An attempt of ``sd``'s compensation failed: retry it, or the step is stuck."""
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
        """Starts ``attempt`` of ``sd``'s action, or fails the step if its input cannot be built.
        A waiting step (``wait``, ``approval``) starts waiting instead (`saga.core.primitives`)."""
        if not sd.has_effect:
            primitives.start_waiting(self, sd, attempt)
            return
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
        if sd.saga is not None:
            subsagas.start_child(self, sd, attempt, payload)
            return
        deadline = self.now + sd.timeout
        self.emit(StepStarted, step=sd.name, attempt=attempt, deadline_at=deadline)
        assert sd.action is not None  # a step with an effect sends a command (rule step-work)
        self.command(sd, "action", sd.action, attempt, payload, deadline)

    def start_compensation(self, sd: Step, attempt: int) -> None:
        """Starts ``attempt`` of ``sd``'s compensation (a sub-saga step's: its child's)."""
        if sd.saga is not None:
            subsagas.compensate_child(self, sd, attempt)
            return
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
        """``sd``'s input, built from its template and checked against its input model.

        Raises:
            dataflow.ResolveError: The template cannot be resolved, or is not an object.
            ValidationError: The input does not fit the step's input model.
        """
        s = self.s
        value = dataflow.render(
            sd.input, saga_id=s.saga_id, saga_input=s.input, outputs=s.outputs(), **self.item(sd)
        )
        if sd.input_model is not None:
            value = sd.input_model.model_validate(value).model_dump(mode="json")
        if not isinstance(value, dict):
            raise dataflow.ResolveError(f"the input must be an object, got {type(value).__name__}")
        return value

    def item(self, sd: Step) -> dict[str, Any]:
        """``{"item": ...}``, the item ``sd`` runs for when it is an item of a fan-out (for
        `saga.core.dataflow.render`); ``{}`` otherwise.

        Raises:
            dataflow.ResolveError: The list can no longer be read (it could when the step
                expanded; the data it reads does not change after).
        """
        index = split_item(sd.name)[1]
        if sd.for_each is None or index is None:
            return {}
        return {"item": self.items(sd)[index]}

    def items(self, sd: Step) -> list[Any]:
        """The list a ``for_each`` step runs over.

        Raises:
            dataflow.ResolveError: The reference names nothing, or not a list.
        """
        s = self.s
        assert sd.for_each is not None
        found = dataflow.render(
            sd.for_each, saga_id=s.saga_id, saga_input=s.input, outputs=s.outputs()
        )
        if not isinstance(found, list):
            raise dataflow.ResolveError(
                f"for_each {sd.for_each}: expected a list, got {type(found).__name__}"
            )
        return found

    def command(
        self, sd: Step, phase: Phase, action: str, attempt: int, payload: Any, deadline: float
    ) -> None:
        """Adds the command that runs ``attempt`` of ``sd``'s ``phase``."""
        s = self.s
        round_ = self.step_state(sd.name).budget_from
        assert sd.service is not None  # only steps with an effect send commands
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
                # Relative, for the participant to count on its own clock (see `Command`).
                budget=sd.timeout,
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
    # One line per pydantic error, "loc: msg", so that it fits an event's error message.
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors()
        )
    return str(exc)
