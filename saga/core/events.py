"""The saga events: what the coordinator appends to the log, and what a state is a fold of.

Every event has the fields of `EventBase` (``saga_id``, ``seq`` numbering a saga's events from 1
without gaps, ``at``) and a literal ``type``; the events about one step share `StepEvent`
(``step`` and ``attempt``). `Event` is their discriminated union; its adapter is with the
others in `saga.core.messages`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from saga.core.wire import ErrorInfo, JsonObject, ParentRef, Phase, WireMessage, unset

__all__ = [
    "ApprovalReminded",
    "CancelRejected",
    "CompensationResolved",
    "CompensationRetryScheduled",
    "CompensationStarted",
    "CompensationSucceeded",
    "Event",
    "EventBase",
    "RequestDenied",
    "SagaAborted",
    "SagaCompensated",
    "SagaCompensationAsked",
    "SagaCompleted",
    "SagaDeadlinePassed",
    "SagaRejected",
    "SagaResumed",
    "SagaStarted",
    "SagaStuck",
    "SignalReceived",
    "SignalRejected",
    "StartIgnored",
    "StartRefused",
    "StepEvent",
    "StepExpanded",
    "StepFailedEvent",
    "StepResolved",
    "StepRetryScheduled",
    "StepScheduled",
    "StepSkipped",
    "StepStarted",
    "StepStuck",
    "StepSucceeded",
    "StepTimedOut",
]


class EventBase(WireMessage):
    """Fields every event has. ``seq`` numbers a saga's events from 1 without gaps."""

    type: str
    """The event's kind; each event class narrows it to its own literal."""
    saga_id: str
    seq: int = Field(ge=1)
    at: float


class StepEvent(EventBase):
    """An event about one step: its action or its compensation, at one attempt."""

    step: str
    attempt: int
    """The attempt of the action (or, for compensation events, of the compensation)."""


class SagaStarted(EventBase):
    """A saga began with its input; the first event of every saga."""

    type: Literal["saga_started"] = "saga_started"
    name: str
    version: int
    input: JsonObject
    steps: list[str]
    """The definition's step names, all pending."""
    digest: str | None = Field(default=None, exclude_if=unset)
    """`saga.core.definition.SagaDefinition.digest` of the definition it started on (``None``
    in records written before digests)."""
    deadline_at: float | None = Field(default=None, exclude_if=unset)
    """When the saga should have ended (its definition's ``deadline`` after the start)."""
    parent: ParentRef | None = Field(default=None, exclude_if=unset)
    """The step that started it as a sub-saga, which its outcome is replied to."""
    by: str | None = Field(default=None, exclude_if=unset)
    """Who asked (the request's verified principal; ``None`` in records written before it)."""


class SagaRejected(EventBase):
    """A start request that could not start the saga: no definition has its name, or its input
    does not fit the definition. Nothing ran; the saga is ``rejected`` (final), with the reason.
    A later start of the same id with a valid request starts it (`SagaStarted` follows)."""

    type: Literal["saga_rejected"] = "saga_rejected"
    message_id: str
    """The request's."""
    name: str
    """The saga name the request asked for."""
    version: int | None = None
    """The version it would have started on, when a definition has the name."""
    digest: str | None = None
    """That definition's digest."""
    input: JsonObject
    """The request's input."""
    reason: str
    parent: ParentRef | None = Field(default=None, exclude_if=unset)
    """The step that asked for it as a sub-saga (its failure is replied to it)."""
    by: str | None = Field(default=None, exclude_if=unset)
    """Who asked (the request's verified principal; ``None`` in records written before it)."""


class StartIgnored(EventBase):
    """A start for an id that already names a saga, kept as it is (``if_exists="return"``, or
    a request no different from the saga's)."""

    type: Literal["start_ignored"] = "start_ignored"
    message_id: str
    """The request's."""
    reason: str
    differs: list[str]
    """What the request had that the saga has not: ``name``, ``input``, or nothing."""
    by: str | None = Field(default=None, exclude_if=unset)
    """Who asked (the request's verified principal; ``None`` in records written before it)."""


class StartRefused(EventBase):
    """A start for an id that already names a saga, with another name or input, under
    ``if_exists="refuse"``: refused; the existing saga is kept."""

    type: Literal["start_refused"] = "start_refused"
    message_id: str
    """The request's."""
    reason: str
    differs: list[str]
    """What differed from the saga: ``name``, ``input`` or both."""
    by: str | None = Field(default=None, exclude_if=unset)
    """Who asked (the request's verified principal; ``None`` in records written before it)."""


class StepStarted(StepEvent):
    """An attempt of a step's action was sent."""

    type: Literal["step_started"] = "step_started"
    deadline_at: float
    wake_at: float | None = Field(default=None, exclude_if=unset)
    """An ``approval`` step's first reminder (or escalation), if it has one."""
    child: str | None = Field(default=None, exclude_if=unset)
    """A sub-saga step's child saga (its id)."""


class StepSucceeded(StepEvent):
    """The step's action succeeded with an output (a ``wait`` step's: the signal's data; an
    ``approval`` step's: who approved, and their note)."""

    type: Literal["step_succeeded"] = "step_succeeded"
    output: JsonObject
    signal: str | None = Field(default=None, exclude_if=unset)
    """The signal a ``wait`` step took (and the saga no longer keeps)."""


class StepScheduled(StepEvent):
    """The step could start, and waits for its ``delay`` or ``start_at`` (a durable timer: it
    lives in the state, so a restarted coordinator arms it again)."""

    type: Literal["step_scheduled"] = "step_scheduled"
    due_at: float


class StepExpanded(StepEvent):
    """A ``for_each`` step began: it runs once per item of its list, each item a step of its
    own in the state (``dishes[0]``, ``dishes[1]``, ...: `saga.core.definition.item_name`)
    with its own attempts, output and compensation."""

    type: Literal["step_expanded"] = "step_expanded"
    count: int = Field(ge=0)


class StepSkipped(StepEvent):
    """The step will not run: its ``when`` condition was false (or, still waiting for its
    timer, the saga began compensating). It counts as finished for its dependants and is
    never compensated."""

    type: Literal["step_skipped"] = "step_skipped"
    reason: str


class ApprovalReminded(StepEvent):
    """An ``approval`` step still waits: its approvers were reminded, or it was escalated."""

    type: Literal["approval_reminded"] = "approval_reminded"
    escalated: bool
    recipients: list[str]
    next_at: float | None = None
    """When the next reminder or escalation is due (``None``: no more)."""


class StepRetryScheduled(StepEvent):
    """An attempt failed technically (or timed out) and another is due at ``retry_at``."""

    type: Literal["step_retry_scheduled"] = "step_retry_scheduled"
    error: ErrorInfo
    retry_at: float


class StepFailedEvent(StepEvent):
    """The step failed for good and did not take effect (business failure, retries exhausted,
    input could not be built, or retries abandoned because the saga is compensating)."""

    type: Literal["step_failed"] = "step_failed"
    error: ErrorInfo


class StepTimedOut(StepEvent):
    """The step's last attempt missed its deadline: its outcome is unknown, so it will be
    compensated (compensations must be safe when the action never happened)."""

    type: Literal["step_timed_out"] = "step_timed_out"


class StepStuck(StepEvent):
    """A step cannot go on without an operator: a compensation or a retriable step exhausted
    its policy, or a pivot's outcome is unknown."""

    type: Literal["step_stuck"] = "step_stuck"
    phase: Phase
    error: ErrorInfo


class CompensationStarted(StepEvent):
    """An attempt of a step's compensation was sent."""

    type: Literal["compensation_started"] = "compensation_started"
    deadline_at: float


class CompensationSucceeded(StepEvent):
    """The step's compensation succeeded: its effect is undone."""

    type: Literal["compensation_succeeded"] = "compensation_succeeded"


class CompensationRetryScheduled(StepEvent):
    """A compensation attempt failed and another is due at ``retry_at``."""

    type: Literal["compensation_retry_scheduled"] = "compensation_retry_scheduled"
    error: ErrorInfo
    retry_at: float


class SagaAborted(EventBase):
    """The saga stopped going forward and began compensating."""

    type: Literal["saga_aborted"] = "saga_aborted"
    reason: str
    step: str | None = None
    """The step whose failure caused it, if any (``None`` for a cancel)."""
    message_id: str | None = Field(default=None, exclude_if=unset)
    """The request's (``None`` when no request caused it)."""
    by: str | None = Field(default=None, exclude_if=unset)
    """Who asked (the request's verified principal; ``None`` in records written before it)."""


class SagaCompleted(EventBase):
    """Every step finished: the saga succeeded."""

    type: Literal["saga_completed"] = "saga_completed"


class SagaCompensated(EventBase):
    """Every completed compensatable step was undone."""

    type: Literal["saga_compensated"] = "saga_compensated"


class SagaStuck(EventBase):
    """Nothing more can happen without an operator (see `StepStuck`); an alert is raised."""

    type: Literal["saga_stuck"] = "saga_stuck"
    reason: str


class SagaResumed(EventBase):
    """An operator asked to retry a stuck saga; its stuck steps run again with fresh budgets."""

    type: Literal["saga_resumed"] = "saga_resumed"
    compensating: bool
    """Whether the saga resumes its compensation (else it resumes going forward)."""
    reason: str | None = Field(default=None, exclude_if=unset)
    """The operator's reason (a retry's) or note (a resolve's)."""
    message_id: str | None = Field(default=None, exclude_if=unset)
    """The request's (``None`` when no request caused it)."""
    by: str | None = Field(default=None, exclude_if=unset)
    """Who asked (the request's verified principal; ``None`` in records written before it)."""


class StepResolved(StepEvent):
    """An operator declared a step stuck going forward done by hand: it counts as succeeded."""

    type: Literal["step_resolved"] = "step_resolved"
    note: str


class CompensationResolved(StepEvent):
    """An operator declared a stuck compensation done by hand: the step counts as compensated."""

    type: Literal["compensation_resolved"] = "compensation_resolved"
    note: str


class CancelRejected(EventBase):
    """A cancel arrived too late (the pivot had started) or for a finished saga."""

    type: Literal["cancel_rejected"] = "cancel_rejected"
    reason: str
    message_id: str | None = Field(default=None, exclude_if=unset)
    """The request's (``None`` when no request caused it)."""
    by: str | None = Field(default=None, exclude_if=unset)
    """Who asked (the request's verified principal; ``None`` in records written before it)."""


class SignalReceived(EventBase):
    """A named external event for the saga (`saga signal`): a ``wait`` step waiting for it
    completes with its data; one that arrives first is kept until its step waits."""

    type: Literal["signal_received"] = "signal_received"
    name: str
    data: JsonObject
    message_id: str
    by: str | None = Field(default=None, exclude_if=unset)


class SignalRejected(EventBase):
    """A signal the saga cannot take (it has ended, or its step has already finished)."""

    type: Literal["signal_rejected"] = "signal_rejected"
    name: str
    reason: str
    message_id: str
    by: str | None = Field(default=None, exclude_if=unset)


class SagaDeadlinePassed(EventBase):
    """The saga's deadline passed while it ran: it is compensated (a `SagaAborted` follows)
    if its pivot had not started, else an alert is raised and it goes on."""

    type: Literal["saga_deadline_passed"] = "saga_deadline_passed"
    compensating: bool


class SagaCompensationAsked(EventBase):
    """The saga's parent compensates the step that started it: this saga is compensated (a
    `SagaAborted` follows when it can be), and tells the parent's compensation attempt
    ``attempt`` when it is."""

    type: Literal["saga_compensation_asked"] = "saga_compensation_asked"
    attempt: int
    message_id: str
    by: str | None = Field(default=None, exclude_if=unset)


class RequestDenied(EventBase):
    """A signed request that the authorization policy refused (`saga.core.policy`): recorded
    so that the audit trail shows refused attempts next to accepted ones. Nothing changed."""

    type: Literal["request_denied"] = "request_denied"
    request: str
    """The request's kind: ``cancel``, ``retry``, ``resolve`` (a refused start of an id with
    no saga is a `SagaRejected`)."""
    message_id: str
    by: str
    """The principal that signed it."""
    reason: str


Event = Annotated[
    SagaStarted
    | StepStarted
    | StepSucceeded
    | StepRetryScheduled
    | StepFailedEvent
    | StepTimedOut
    | StepStuck
    | CompensationStarted
    | CompensationSucceeded
    | CompensationRetryScheduled
    | SagaAborted
    | SagaCompleted
    | SagaCompensated
    | SagaStuck
    | SagaResumed
    | StepResolved
    | CompensationResolved
    | CancelRejected
    | SagaRejected
    | StartIgnored
    | StartRefused
    | RequestDenied
    | StepScheduled
    | StepExpanded
    | StepSkipped
    | ApprovalReminded
    | SignalReceived
    | SignalRejected
    | SagaDeadlinePassed
    | SagaCompensationAsked,
    Field(discriminator="type"),
]
