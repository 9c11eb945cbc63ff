"""The messages on the wire and in the log: frozen, strict pydantic models.

Every message carries ``v``, its schema version, and a literal ``type`` so that a topic's
messages form one discriminated union, decoded by one module-level `TypeAdapter`; every adapter
of the engine is defined here, at the bottom, and every message is importable from here. The
events live in `saga.core.events` (they share `EventBase`, and the events about one step share
`StepEvent`: ``step`` and ``attempt``, so readers of the log use attributes that the type
checker knows instead of probing for them); the base model and the small shared types in
`saga.core.wire`. Unknown fields are rejected. Times are seconds
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

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from saga.core.events import (
    ApprovalReminded,
    CancelRejected,
    CompensationResolved,
    CompensationRetryScheduled,
    CompensationStarted,
    CompensationSucceeded,
    Event,
    EventBase,
    RequestDenied,
    SagaAborted,
    SagaCompensated,
    SagaCompensationAsked,
    SagaCompleted,
    SagaDeadlinePassed,
    SagaRejected,
    SagaResumed,
    SagaStarted,
    SagaStuck,
    SignalReceived,
    SignalRejected,
    StartIgnored,
    StartRefused,
    StepEvent,
    StepExpanded,
    StepFailedEvent,
    StepResolved,
    StepRetryScheduled,
    StepScheduled,
    StepSkipped,
    StepStarted,
    StepStuck,
    StepSucceeded,
    StepTimedOut,
)
from saga.core.wire import (
    SCHEMA_VERSION,
    ErrorInfo,
    IfExists,
    JsonObject,
    ParentRef,
    Phase,
    WireMessage,
    unset,
)

__all__ = [
    "SCHEMA_VERSION",
    "Alert",
    "AlertKind",
    "ApprovalReminded",
    "CancelRejected",
    "CancelSaga",
    "Checkpoint",
    "Command",
    "CompensateSaga",
    "CompensationResolved",
    "CompensationRetryScheduled",
    "CompensationStarted",
    "CompensationSucceeded",
    "DecideApproval",
    "ErrorInfo",
    "Event",
    "EventBase",
    "IfExists",
    "ParentRef",
    "Phase",
    "Reply",
    "Request",
    "RequestDenied",
    "ResolveSaga",
    "RetrySaga",
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
    "SignalSaga",
    "Snapshot",
    "SnapshotRecord",
    "StartIgnored",
    "StartRefused",
    "StartSaga",
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
    "alert_adapter",
    "command_adapter",
    "event_adapter",
    "reply_adapter",
    "request_adapter",
    "snapshot_adapter",
]

# -- requests (clients -> coordinator) ------------------------------------------------------------


class StartSaga(WireMessage):
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
    by: str | None = Field(default=None, exclude_if=unset)
    """Who asks: the principal that signed the request, as the coordinator verified it (what a
    request says here itself is a claim, replaced by the verified signer when messages are
    signed)."""
    parent: ParentRef | None = Field(default=None, exclude_if=unset)
    """The step of the saga that starts this one as a sub-saga (only coordinators send it)."""


class CancelSaga(WireMessage):
    """Asks the coordinator to cancel a saga; honoured until its pivot starts."""

    type: Literal["cancel"] = "cancel"
    message_id: str
    saga_id: str
    reason: str = "cancelled by request"
    at: float
    by: str | None = Field(default=None, exclude_if=unset)
    """Who asks: the principal that signed the request, as the coordinator verified it (what a
    request says here itself is a claim, replaced by the verified signer when messages are
    signed)."""


class RetrySaga(WireMessage):
    """Operator command: run a stuck saga's stuck steps or compensations again."""

    type: Literal["retry"] = "retry"
    message_id: str
    saga_id: str
    at: float
    reason: str | None = Field(default=None, exclude_if=unset)
    """Why the operator retries, for the audit trail."""
    by: str | None = Field(default=None, exclude_if=unset)
    """Who asks: the principal that signed the request, as the coordinator verified it (what a
    request says here itself is a claim, replaced by the verified signer when messages are
    signed)."""


class ResolveSaga(WireMessage):
    """Operator command: declare a stuck saga's stuck steps handled by hand.

    A step stuck going forward counts as succeeded; one stuck compensating counts as
    compensated. The saga then carries on by its ordinary rules.
    """

    type: Literal["resolve"] = "resolve"
    message_id: str
    saga_id: str
    note: str = "resolved by an operator"
    at: float
    by: str | None = Field(default=None, exclude_if=unset)
    """Who asks: the principal that signed the request, as the coordinator verified it (what a
    request says here itself is a claim, replaced by the verified signer when messages are
    signed)."""


class SignalSaga(WireMessage):
    """Delivers a named external event to a running saga: a ``wait`` step waiting for
    ``name`` completes with ``data`` as its output."""

    type: Literal["signal"] = "signal"
    message_id: str
    saga_id: str
    name: str
    data: JsonObject = Field(default_factory=dict)
    at: float
    by: str | None = Field(default=None, exclude_if=unset)
    """Who sends it (see `StartSaga.by`)."""


class DecideApproval(WireMessage):
    """An approver's decision on an ``approval`` step: approved (the step succeeds) or
    rejected (a business failure: the saga compensates)."""

    type: Literal["approval"] = "approval"
    message_id: str
    saga_id: str
    step: str
    approve: bool
    note: str = ""
    at: float
    by: str | None = Field(default=None, exclude_if=unset)
    """Who decides (see `StartSaga.by`); checked against the step's approvers."""


class CompensateSaga(WireMessage):
    """A parent saga compensating its sub-saga step: the child is compensated (a completed
    child too, unless past its pivot), and answers the parent's compensation when it is. Only
    coordinators send it."""

    type: Literal["compensate"] = "compensate"
    message_id: str
    saga_id: str
    parent: ParentRef
    at: float
    by: str | None = Field(default=None, exclude_if=unset)


Request = (
    StartSaga | CancelSaga | RetrySaga | ResolveSaga | SignalSaga | DecideApproval | CompensateSaga
)
"""Anything a client sends to the requests topic."""
request_adapter: TypeAdapter[Request] = TypeAdapter(Annotated[Request, Field(discriminator="type")])


# -- commands and replies -------------------------------------------------------------------------


class Command(WireMessage):
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


class Reply(WireMessage):
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


event_adapter: TypeAdapter[Event] = TypeAdapter(Event)


# -- snapshots and alerts -------------------------------------------------------------------------


class Snapshot(WireMessage):
    """The latest state of one saga (the compacted snapshots topic, keyed by saga id)."""

    type: Literal["snapshot"] = "snapshot"
    saga_id: str
    state: JsonObject
    """`saga.core.state.SagaState` as data."""


class Checkpoint(WireMessage):
    """Per log partition: every event before ``log_offset`` is covered by the snapshots."""

    type: Literal["checkpoint"] = "checkpoint"
    partition: int
    log_offset: int
    partitions: int | None = Field(default=None, ge=1, exclude_if=unset)
    """The topics' partition count it was written under (``None`` in older records): a
    coordinator refuses to run on another count (`saga.errors.TopologyChanged`)."""


AlertKind = Literal[
    "stuck", "denied", "forbidden", "approval", "reminder", "escalation", "deadline"
]
"""Why an alert was raised: a saga is ``stuck``; a request was ``denied`` by the policy; a
signed message came from a principal that may not send it (``forbidden``); an ``approval``
step waits for a decision (then a ``reminder``, an ``escalation``); a saga past its pivot
missed its ``deadline``."""


class Alert(WireMessage):
    """Raised when a saga gets stuck (operators act with `saga retry` or `saga resolve`), and
    when the trust boundary refuses a signed message (someone should look at who sent it)."""

    type: Literal["alert"] = "alert"
    saga_id: str
    saga_name: str
    reason: str
    steps: list[str]
    at: float
    kind: AlertKind = Field(default="stuck", exclude_if=lambda v: v == "stuck")
    recipients: list[str] = Field(default_factory=list, exclude_if=lambda v: not v)
    """Who should be told (an approval's approvers, or whom it escalates to)."""


SnapshotRecord = Annotated[Snapshot | Checkpoint, Field(discriminator="type")]
"""What the snapshots topic holds: one `Snapshot` per saga and one `Checkpoint` per partition."""

# One adapter per topic's message type, built once (building a TypeAdapter is costly).
snapshot_adapter: TypeAdapter[Snapshot | Checkpoint] = TypeAdapter(SnapshotRecord)
command_adapter: TypeAdapter[Command] = TypeAdapter(Command)
reply_adapter: TypeAdapter[Reply] = TypeAdapter(Reply)
alert_adapter: TypeAdapter[Alert] = TypeAdapter(Alert)
