"""The messages on the wire and in the log: frozen, strict pydantic models.

Every message carries ``v``, its schema version, and a literal ``type`` so that a topic's
messages form one discriminated union, decoded by one module-level `TypeAdapter`; every adapter
of the engine is defined here, at the bottom. Events share `EventBase`, and the events about one
step share `StepEvent` (``step`` and ``attempt``), so readers of the log use attributes that the
type checker knows instead of probing for them. Unknown fields are rejected. Times are seconds
since the epoch (floats): they are what the clock port returns, cheap to encode, and
`saga replay` renders them for people.

Topics and what they hold (see DESIGN section 3):

- requests: `StartSaga`, `CancelSaga`, `RetrySaga`, `ResolveSaga`
- commands.<service>: `Command`
- replies: `Reply`
- log: the `Event` union
- snapshots: `Snapshot` (and `Checkpoint`, one per partition)
- alerts: `Alert`
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

__all__ = [
    "SCHEMA_VERSION",
    "Alert",
    "CancelRejected",
    "CancelSaga",
    "Checkpoint",
    "Command",
    "CompensationResolved",
    "CompensationRetryScheduled",
    "CompensationStarted",
    "CompensationSucceeded",
    "ErrorInfo",
    "Event",
    "EventBase",
    "IfExists",
    "Phase",
    "Reply",
    "Request",
    "ResolveSaga",
    "RetrySaga",
    "SagaAborted",
    "SagaCompensated",
    "SagaCompleted",
    "SagaRejected",
    "SagaResumed",
    "SagaStarted",
    "SagaStuck",
    "Snapshot",
    "SnapshotRecord",
    "StartIgnored",
    "StartRefused",
    "StartSaga",
    "StepEvent",
    "StepFailedEvent",
    "StepResolved",
    "StepRetryScheduled",
    "StepStarted",
    "StepStuck",
    "StepSucceeded",
    "StepTimedOut",
    "alert_adapter",
    "command_adapter",
    "event_adapter",
    "reply_adapter",
    "request_adapter",
    "snapshot_adapter",
]

SCHEMA_VERSION = 1
"""The schema version written by this release. Readers accept every version they know."""

Phase = Literal["action", "compensation"]
"""Whether a command or reply concerns a step's action or its compensation."""

JsonObject = dict[str, Any]

IfExists = Literal["return", "refuse"]
"""The id-reuse policy of a start request for an id that already names a saga (`StartSaga`)."""


def _unset(value: object) -> bool:
    # Optional fields added after release 1 are left out of a record that does not use them,
    # so that such a record is byte for byte what an older release wrote.
    return value is None


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    """Schema version of this message."""


class ErrorInfo(_Message):
    """What went wrong in a step, as reported by a participant or the coordinator."""

    type: str
    """Exception type name, ``StepFailed`` for business failures, ``Timeout`` for deadlines.

    The participant also reports, without an exception of that name: ``OutputInvalid`` (the
    handler's output is not a JSON object: not a dict, or holding a NaN, bytes, an object, a key
    that is not a string; business) and ``OutputTooLarge`` (the reply would exceed the
    participant's ``max_reply_bytes``; business), both permanent: running again would return
    the same; ``Expired`` (the command was older than its budget when the participant took it,
    so the handler did not run; technical) and ``Redelivered`` (the command came again and
    again without its handler ever finishing, its process dying each time, so it was
    dead-lettered instead of run once more; technical)."""
    message: str
    """Human-readable reason."""
    business: bool = False
    """True for a business failure (not retried)."""
    details: JsonObject = Field(default_factory=dict)
    """Structured data the participant attached."""


# -- requests (clients -> coordinator) ------------------------------------------------------------


class StartSaga(_Message):
    """Asks the coordinator to start a saga. An id names one saga: starting it twice starts it
    once.

    A start for an id that already names a saga follows ``if_exists``, the id-reuse policy:
    ``"return"`` (the default) keeps the existing saga and changes nothing; ``"refuse"`` refuses
    the request when its name or input differs from the existing saga's. Either way the
    coordinator records the duplicate as an event of the existing saga (`StartIgnored` or
    `StartRefused`). A start the coordinator cannot run (no definition has the name, or the
    input does not fit it) is recorded as a rejected saga (`SagaRejected`); as nothing ran, a
    later valid start of the same id starts it.
    """

    type: Literal["start"] = "start"
    message_id: str
    saga_id: str
    saga_name: str
    input: JsonObject
    at: float
    if_exists: IfExists = Field(default="return", exclude_if=lambda v: v == "return")
    """What a start for an id that exists does: ``return`` (keep it) or ``refuse``."""


class CancelSaga(_Message):
    """Asks the coordinator to cancel a saga; honoured until its pivot starts."""

    type: Literal["cancel"] = "cancel"
    message_id: str
    saga_id: str
    reason: str = "cancelled by request"
    at: float


class RetrySaga(_Message):
    """Operator command: run a stuck saga's stuck steps or compensations again."""

    type: Literal["retry"] = "retry"
    message_id: str
    saga_id: str
    at: float


class ResolveSaga(_Message):
    """Operator command: declare a stuck saga's stuck steps handled by hand.

    A step stuck going forward counts as succeeded; one stuck compensating counts as
    compensated. The saga then carries on by its ordinary rules.
    """

    type: Literal["resolve"] = "resolve"
    message_id: str
    saga_id: str
    note: str = "resolved by an operator"
    at: float


Request = StartSaga | CancelSaga | RetrySaga | ResolveSaga
"""Anything a client sends to the requests topic."""
request_adapter: TypeAdapter[Request] = TypeAdapter(
    Annotated[Request, Field(discriminator="type")]
)


# -- commands and replies -------------------------------------------------------------------------


class Command(_Message):
    """A step's action or compensation, sent to the service's command topic."""

    type: Literal["command"] = "command"
    message_id: str
    saga_id: str
    saga_name: str
    saga_version: int
    step: str
    phase: Phase
    service: str
    """The service that owns the step; a participant of another service refuses the command."""
    action: str
    """The handler name on the participant (the step's action or compensation)."""
    attempt: int
    idempotency_key: str
    """Stable across attempts of the same step and phase; see `saga.core.decide`."""
    payload: JsonObject
    deadline_at: float
    """When the coordinator stops waiting for this attempt, on the coordinator's clock."""
    at: float
    budget: float | None = None
    """Seconds the attempt may take (the step's timeout), counted by the participant from when
    it takes the command, on its own clock, so that clocks that disagree do not eat it up.
    ``None`` in commands written before it existed: ``deadline_at - at`` is the same span. A
    participant of an earlier release refuses a command with a budget (an unknown field):
    upgrade participants before coordinators."""


class Reply(_Message):
    """A participant's outcome for one command."""

    type: Literal["reply"] = "reply"
    message_id: str
    saga_id: str
    step: str
    phase: Phase
    attempt: int
    service: str
    ok: bool
    output: JsonObject | None = None
    error: ErrorInfo | None = None
    at: float


# -- events (the log) -----------------------------------------------------------------------------


class EventBase(_Message):
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
    digest: str | None = Field(default=None, exclude_if=_unset)
    """`saga.core.definition.SagaDefinition.digest` of the definition it started on (``None``
    in records written before digests)."""


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


class StartIgnored(EventBase):
    """A start for an id that already names a saga, kept as it is (``if_exists="return"``, or
    a request no different from the saga's)."""

    type: Literal["start_ignored"] = "start_ignored"
    message_id: str
    """The request's."""
    reason: str
    differs: list[str]
    """What the request had that the saga has not: ``name``, ``input``, or nothing."""


class StartRefused(EventBase):
    """A start for an id that already names a saga, with another name or input, under
    ``if_exists="refuse"``: refused; the existing saga is kept."""

    type: Literal["start_refused"] = "start_refused"
    message_id: str
    """The request's."""
    reason: str
    differs: list[str]
    """What differed from the saga: ``name``, ``input`` or both."""


class StepStarted(StepEvent):
    """An attempt of a step's action was sent."""

    type: Literal["step_started"] = "step_started"
    deadline_at: float


class StepSucceeded(StepEvent):
    """The step's action succeeded with an output."""

    type: Literal["step_succeeded"] = "step_succeeded"
    output: JsonObject


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
    | StartRefused,
    Field(discriminator="type"),
]
event_adapter: TypeAdapter[Event] = TypeAdapter(Event)


# -- snapshots and alerts -------------------------------------------------------------------------


class Snapshot(_Message):
    """The latest state of one saga (the compacted snapshots topic, keyed by saga id)."""

    type: Literal["snapshot"] = "snapshot"
    saga_id: str
    state: JsonObject
    """`saga.core.state.SagaState` as data."""


class Checkpoint(_Message):
    """Per log partition: every event before ``log_offset`` is covered by the snapshots."""

    type: Literal["checkpoint"] = "checkpoint"
    partition: int
    log_offset: int
    partitions: int | None = Field(default=None, ge=1, exclude_if=_unset)
    """The topics' partition count it was written under (``None`` in older records): a
    coordinator refuses to run on another count (`saga.errors.TopologyChanged`)."""


class Alert(_Message):
    """Raised when a saga gets stuck; operators act with `saga retry` or `saga resolve`."""

    type: Literal["alert"] = "alert"
    saga_id: str
    saga_name: str
    reason: str
    steps: list[str]
    at: float


SnapshotRecord = Annotated[Snapshot | Checkpoint, Field(discriminator="type")]
"""What the snapshots topic holds: one `Snapshot` per saga and one `Checkpoint` per partition."""

# One adapter per topic's message type, built once (building a TypeAdapter is costly).
snapshot_adapter: TypeAdapter[Snapshot | Checkpoint] = TypeAdapter(SnapshotRecord)
command_adapter: TypeAdapter[Command] = TypeAdapter(Command)
reply_adapter: TypeAdapter[Reply] = TypeAdapter(Reply)
alert_adapter: TypeAdapter[Alert] = TypeAdapter(Alert)
