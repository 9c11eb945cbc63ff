"""A saga's state, and `evolve`: the only way it changes.

Theory of operation
-------------------
A saga's state is a left fold of its events: ``state = evolve(evolve(None, e1), e2) ...``.
The log is the source of truth; snapshots, status views and metrics are all such folds.

Each step has a status, and each event that concerns a step moves it along one edge of
`STEP_TRANSITIONS`, a table keyed by (event type, current status). The saga's own status moves
along `SAGA_TRANSITIONS` likewise. The tables are the whole state machine: an event that has no
edge from the current status raises `IllegalTransition` and changes nothing (state is immutable;
`evolve` returns a new value). Events are numbered per saga (``seq``) without gaps, so a
duplicate or a missing event is caught too.

Step statuses, forward::

    pending -> running -> succeeded
                  |  ^
                  v  |                 (technical failure or timeout, attempts left)
               retrying
    running -> failed      (did not take effect: business failure, retries exhausted)
    running -> unknown     (last attempt timed out: may or may not have taken effect)
    running -> stuck       (a pivot's outcome unknown, or a retriable step exhausted)

and backward, once the saga is compensating::

    succeeded | unknown -> compensating -> compensated
                              |  ^
                              v  |
                     compensation_retrying
    compensating -> stuck  (the compensation exhausted its policy)

Saga statuses: ``running -> completed``; ``running -> compensating -> compensated``; either of
``running`` and ``compensating`` -> ``stuck``; ``stuck`` -> ``running`` or ``compensating``
again when an operator retries it, or resolves its stuck steps by hand (``stuck`` ->
``succeeded`` going forward, ``stuck`` -> ``compensated`` going backward).

A start the coordinator cannot run (no definition of its name, an invalid input) makes a saga
whose first event is `SagaRejected`: ``rejected``, final, with no steps. Nothing ran, so a later
valid start of the id moves it on (``rejected -> running``, its `SagaStarted` not event 1).

Some events only record something about the saga (`RECORD_ONLY`: a duplicate start, a cancel
that came too late): they are legal in every status, as self-loops of `SAGA_TRANSITIONS`, and
change nothing but ``seq`` and ``updated_at``, a finished saga's finish time included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from saga.core.definition import item_name
from saga.core.messages import (
    ApprovalReminded,
    CancelRejected,
    CompensationResolved,
    CompensationRetryScheduled,
    CompensationStarted,
    CompensationSucceeded,
    ErrorInfo,
    EventBase,
    ParentRef,
    Phase,
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
from saga.errors import IllegalTransition

__all__ = [
    "FINAL_STATUSES",
    "IN_FLIGHT",
    "RECORD_ONLY",
    "REMEMBERED_REQUESTS",
    "SAGA_TRANSITIONS",
    "SETTLED_FOR_UNDO",
    "STEP_TRANSITIONS",
    "TERMINAL_STATUSES",
    "UNDO_OWED",
    "SagaState",
    "SagaStatus",
    "StepState",
    "StepStatus",
    "evolve",
]


class StepStatus(StrEnum):
    """Where one step is; see the module docstring for the edges."""

    PENDING = "pending"
    SCHEDULED = "scheduled"
    """It could start, and waits for its timer (``delay`` or ``start_at``)."""
    SKIPPED = "skipped"
    """It will not run (its condition was false): finished for its dependants, not undone."""
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"
    COMPENSATING = "compensating"
    COMPENSATION_RETRYING = "compensation_retrying"
    COMPENSATED = "compensated"
    STUCK = "stuck"


class SagaStatus(StrEnum):
    """Where the saga is. ``completed``, ``compensated``, ``stuck`` and ``rejected`` are
    final."""

    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    STUCK = "stuck"
    REJECTED = "rejected"
    """Its start was refused before anything ran (see `SagaRejected`)."""


TERMINAL_STATUSES = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED})
"""Statuses a saga does not leave: no event but a `RECORD_ONLY` one is legal after them, with
one exception: the parent of a completed sub-saga may have it compensated (`SagaAborted`)."""
FINAL_STATUSES = TERMINAL_STATUSES | {SagaStatus.STUCK, SagaStatus.REJECTED}
"""Statuses in which nothing happens until an operator acts (``stuck``), a valid start comes
(``rejected``), or ever (the others)."""

IN_FLIGHT = frozenset(
    {
        StepStatus.SCHEDULED,
        StepStatus.RUNNING,
        StepStatus.RETRYING,
        StepStatus.COMPENSATING,
        StepStatus.COMPENSATION_RETRYING,
    }
)
"""Step statuses with an attempt out or a retry due: the saga cannot end while one has them."""
UNDO_OWED = frozenset({StepStatus.SUCCEEDED, StepStatus.UNKNOWN})
"""Step statuses whose action took (or may have taken) effect: compensating must undo them."""
SETTLED_FOR_UNDO = frozenset(
    {StepStatus.PENDING, StepStatus.SKIPPED, StepStatus.FAILED, StepStatus.COMPENSATED}
)
"""Step statuses that leave nothing to undo: once a step's dependents all have them, it may be
compensated."""

S = StepStatus
STEP_TRANSITIONS: dict[tuple[type[EventBase], StepStatus], StepStatus] = {
    (StepStarted, S.PENDING): S.RUNNING,
    (StepStarted, S.SCHEDULED): S.RUNNING,  # its timer fired
    (StepScheduled, S.PENDING): S.SCHEDULED,
    (StepExpanded, S.PENDING): S.RUNNING,  # a for_each step: its items run
    (StepExpanded, S.SCHEDULED): S.RUNNING,
    (StepSkipped, S.PENDING): S.SKIPPED,  # its condition is false
    (StepSkipped, S.SCHEDULED): S.SKIPPED,  # the saga compensates before its timer fired
    (StepFailedEvent, S.SCHEDULED): S.FAILED,  # its start time could not be read
    (ApprovalReminded, S.RUNNING): S.RUNNING,
    (StepStarted, S.RETRYING): S.RUNNING,
    (StepStarted, S.STUCK): S.RUNNING,  # an operator's retry
    (StepSucceeded, S.RUNNING): S.SUCCEEDED,
    (StepRetryScheduled, S.RUNNING): S.RETRYING,
    (StepFailedEvent, S.PENDING): S.FAILED,  # its input could not be built
    (StepFailedEvent, S.RUNNING): S.FAILED,
    (StepFailedEvent, S.RETRYING): S.FAILED,  # retries abandoned: the saga is compensating
    (StepTimedOut, S.RUNNING): S.UNKNOWN,
    (StepTimedOut, S.RETRYING): S.UNKNOWN,  # abandoned after an attempt that timed out
    (StepStuck, S.PENDING): S.STUCK,  # a step past the pivot whose input cannot be built
    (StepStuck, S.STUCK): S.STUCK,  # an operator's retry that could not start either
    (StepFailedEvent, S.STUCK): S.FAILED,  # likewise, for a pivot: it did not take effect
    (StepStuck, S.RUNNING): S.STUCK,
    (StepStuck, S.COMPENSATING): S.STUCK,
    (CompensationStarted, S.SUCCEEDED): S.COMPENSATING,
    (CompensationStarted, S.UNKNOWN): S.COMPENSATING,
    (CompensationStarted, S.COMPENSATION_RETRYING): S.COMPENSATING,
    (CompensationStarted, S.STUCK): S.COMPENSATING,  # an operator's retry
    (CompensationSucceeded, S.COMPENSATING): S.COMPENSATED,
    (CompensationRetryScheduled, S.COMPENSATING): S.COMPENSATION_RETRYING,
    (StepResolved, S.STUCK): S.SUCCEEDED,  # an operator's resolve, going forward
    (CompensationResolved, S.STUCK): S.COMPENSATED,  # an operator's resolve, compensating
}
"""(event type, step status before) -> step status after. Anything else is illegal."""

G = SagaStatus
RECORD_ONLY: frozenset[type[EventBase]] = frozenset(
    {CancelRejected, StartIgnored, StartRefused, RequestDenied, SignalRejected}
)
"""Events that record a request the saga answered without moving: legal in every status, they
change neither the status nor anything else but ``seq``, ``updated_at`` and the requests
handled (`SagaState.requests`)."""
SAGA_TRANSITIONS: dict[tuple[type[EventBase], SagaStatus | None], SagaStatus] = {
    (SagaStarted, None): G.RUNNING,
    (SagaStarted, G.REJECTED): G.RUNNING,  # a valid start after a rejected one: nothing ran
    (SagaRejected, None): G.REJECTED,
    (SagaRejected, G.REJECTED): G.REJECTED,  # another start it cannot run either
    (SagaAborted, G.RUNNING): G.COMPENSATING,
    # A completed sub-saga whose parent compensates the step that started it (no pivot).
    (SagaAborted, G.COMPLETED): G.COMPENSATING,
    (SagaCompleted, G.RUNNING): G.COMPLETED,
    (SagaCompensated, G.COMPENSATING): G.COMPENSATED,
    (SagaStuck, G.RUNNING): G.STUCK,
    (SagaStuck, G.COMPENSATING): G.STUCK,
    (SagaResumed, G.STUCK): G.RUNNING,  # or COMPENSATING: see SagaResumed.compensating
    (SagaDeadlinePassed, G.RUNNING): G.RUNNING,  # a SagaAborted follows before the pivot
    # A signal is kept while the saga can still use it (a wait step may start later).
    (SignalReceived, G.RUNNING): G.RUNNING,
    (SignalReceived, G.STUCK): G.STUCK,
    (SignalReceived, G.COMPENSATING): G.COMPENSATING,
    **{(SagaCompensationAsked, status): status for status in G},
    **{(kind, status): status for kind in RECORD_ONLY for status in G},
}
"""(event type, saga status before) -> saga status after, for the saga-level events (step events
are `STEP_TRANSITIONS`'). A `RECORD_ONLY` event is a self-loop in every status."""

STEP_EVENTS_NEED = {
    StepStarted: G.RUNNING,
    StepExpanded: G.RUNNING,
    StepScheduled: G.RUNNING,
    CompensationStarted: G.COMPENSATING,
}
"""Step events that are legal only while the saga has one particular status."""


# -- memory ------------------------------------------------------------------------------------
# A coordinator holds every saga in flight, and a pydantic model's share of that is mostly
# bookkeeping: each instance has its own set of the fields given when it was made, as large as
# its dict of values. States are immutable, so instances with the same set can share one, and
# the few strings every saga repeats (step and saga names, digests) can be shared the same way.
# Both tables are bounded: past their size, values are simply not shared.

_MAX_SHARED = 4096
_FIELDS_SETS: dict[frozenset[str], set[str]] = {}
_SHARED_IDS: dict[int, set[str]] = {}
"""The shared sets by id (each entry holds its set, so no other object can have its id)."""
_NAMES: dict[str, str] = {}


def _fields_set(names: Set[str]) -> set[str]:
    """A set equal to ``names``, shared by every model made with those fields."""
    key = frozenset(names)
    found = _FIELDS_SETS.get(key)
    if found is None:
        found = set(key)
        if len(_FIELDS_SETS) < _MAX_SHARED:
            _FIELDS_SETS[key] = _SHARED_IDS[id(found)] = found
    return found


def _name(text: str) -> str:
    """``text``, as the one shared copy of a step name, saga name or digest."""
    found = _NAMES.get(text)
    if found is None:
        if len(_NAMES) >= _MAX_SHARED:
            return text
        found = _NAMES[text] = text
    return found


def _names(texts: Iterable[str]) -> list[str]:
    return [_name(t) for t in texts]


_M = TypeVar("_M", bound=BaseModel)
_set = object.__setattr__


def _replace(model: _M, changes: dict[str, Any]) -> _M:
    """``model.model_copy(update=changes)`` for the frozen state models (no extra fields, no
    private attributes), without the generic copy's deep bookkeeping: the same values, the same
    fields set, nothing validated (the changes come from validated events)."""
    new = object.__new__(type(model))
    values = model.__dict__.copy()
    values.update(changes)
    _set(new, "__dict__", values)
    _set_fields(new, _union(model.__pydantic_fields_set__, changes))
    _set_extra(new, None)
    _set_private(new, None)
    return new


_DEFAULTS: dict[type[BaseModel], list[tuple[str, Callable[..., Any] | None, Any]]] = {}
"""Per model class, each field's name, default factory (these take no data) and default."""


def _build(cls: type[_M], **given: Any) -> _M:
    """``cls(**given)`` for the frozen state models, from values that are already valid (of
    validated events): the same instance, defaults and all, without validating them again."""
    defaults = _DEFAULTS.get(cls)
    if defaults is None:
        defaults = _DEFAULTS[cls] = [
            (name, field.default_factory, field.default) for name, field in cls.model_fields.items()
        ]
    values = {
        name: given[name] if name in given else factory() if factory is not None else default
        for name, factory, default in defaults
    }
    new = object.__new__(cls)
    _set(new, "__dict__", values)
    _set_fields(new, _fields_set(given.keys()))
    _set_extra(new, None)
    _set_private(new, None)
    new.model_post_init(None)
    return new


_set_fields = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__
_UNIONS: dict[tuple[int, tuple[str, ...]], tuple[set[str], set[str]]] = {}


def _union(fields: set[str], changes: dict[str, Any]) -> set[str]:
    """The shared fields set of a copy of a model with ``fields`` changed by ``changes``."""
    if changes.keys() <= fields:
        return fields  # the same set, shared (never changed)
    key = (id(fields), tuple(changes))
    hit = _UNIONS.get(key)
    # An entry holds its set, so no other set can have its id while the entry stands.
    if hit is not None and hit[0] is fields:
        return hit[1]
    found = _fields_set(fields | changes.keys())
    if len(_UNIONS) < _MAX_SHARED:
        _UNIONS[key] = (fields, found)
    return found


class StepState(BaseModel):
    """One step's progress, as folded from the log."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def model_post_init(self, context: Any, /) -> None:
        """Shares the fields set (see `_fields_set`)."""
        _set(self, "__pydantic_fields_set__", _fields_set(self.__pydantic_fields_set__))

    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    """The action's latest attempt (0: never started)."""
    compensation_attempt: int = 0
    """The compensation's latest attempt."""
    budget_from: int = 0
    """Attempts before this count do not use up the policy (an operator retry resets it)."""
    deadline_at: float | None = None
    """When the attempt in flight times out."""
    retry_at: float | None = None
    """When the next attempt is due."""
    output: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    """The latest failure of the action or compensation."""
    stuck_phase: Phase | None = None
    uncertain: bool = False
    """An attempt of the action timed out: it may still take effect, whatever follows."""
    started_at: float | None = None
    """When the first attempt was sent."""
    finished_at: float | None = None
    """When the action succeeded or failed for good."""
    compensated_at: float | None = None
    wake_at: float | None = None
    """When the step's timer fires: a scheduled step's start, an approval's next reminder."""
    child: str | None = None
    """A sub-saga step's child saga."""
    reminders: int = 0
    """Reminders and escalations an approval step has sent."""


class SagaState(BaseModel):
    """One saga's whole state: a fold of its events, serialised into snapshots."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    saga_id: str
    name: str
    version: int
    status: SagaStatus
    input: dict[str, Any]
    steps: dict[str, StepState]
    seq: int
    """The number of events folded in (the ``seq`` of the last one)."""
    started_at: float
    updated_at: float
    finished_at: float | None = None
    reason: str | None = None
    """Why the saga is compensating, compensated, stuck or rejected."""
    digest: str | None = Field(default=None, exclude_if=lambda v: v is None)
    """The digest of the definition it started on (`SagaStarted.digest`; ``None`` for sagas
    started before digests, or rejected without a definition)."""
    deadline_at: float | None = Field(default=None, exclude_if=lambda v: v is None)
    """When the saga should have ended (its definition's ``deadline``); ``None`` once that
    has been acted on, or without one."""
    signals: dict[str, dict[str, Any]] = Field(default_factory=dict, exclude_if=lambda v: not v)
    """Signals received that no ``wait`` step has taken yet, by name (the latest of each)."""
    parent: ParentRef | None = Field(default=None, exclude_if=lambda v: v is None)
    """The step of another saga that started this one (a sub-saga)."""
    undo_for: int | None = Field(default=None, exclude_if=lambda v: v is None)
    """The parent's compensation attempt this saga answers when it is compensated."""
    requests: tuple[str, ...] = Field(default=(), exclude_if=lambda v: not v)
    """The message ids of the latest operator requests the saga answered (cancel, retry,
    resolve; at most `REMEMBERED_REQUESTS`), so that the same request delivered or replayed
    again changes nothing."""

    def model_post_init(self, context: Any, /) -> None:
        """Shares what sagas have in common (see `_fields_set`): the fields set, the names, and
        the steps that have not started, whose value is the same in every saga."""
        _set(self, "__pydantic_fields_set__", _fields_set(self.__pydantic_fields_set__))
        values = self.__dict__
        values["name"] = _name(self.name)
        if self.digest is not None:
            values["digest"] = _name(self.digest)
        # Validation made this dict: it is still this instance's own to change.
        values["steps"] = {_name(k): _shared_step(v) for k, v in self.steps.items()}

    @property
    def is_final(self) -> bool:
        """Whether the saga has ended (``stuck`` waits for an operator)."""
        return self.status in FINAL_STATUSES

    def outputs(self) -> dict[str, Any]:
        """Every succeeded step's output, by step name."""
        return {n: s.output for n, s in self.steps.items() if s.output is not None}

    def percent_complete(self) -> int:
        """Progress in percent: forward work while running, undo work while compensating."""
        if self.status in TERMINAL_STATUSES:
            return 100
        total = len(self.steps) or 1
        if self.status is SagaStatus.RUNNING:
            finished = (StepStatus.SUCCEEDED, StepStatus.SKIPPED)  # skipped: will not run
            done = sum(s.status in finished for s in self.steps.values())
            return done * 100 // total
        owed = [s for s in self.steps.values() if s.compensation_attempt or s.status in UNDO_OWED]
        if not owed:
            return 0
        return sum(s.status is StepStatus.COMPENSATED for s in owed) * 100 // len(owed)


_PENDING = StepState()
_SHARED_PENDING: dict[int, StepState] = {}


def _shared_step(step: StepState) -> StepState:
    """``step``, or if it has not started, the one shared instance of its value (by fields
    set, which is kept: the ids are of shared sets, which live as long as the table)."""
    if step is _PENDING or step.__dict__ != _PENDING.__dict__:
        return step
    fields = step.__pydantic_fields_set__
    if _SHARED_IDS.get(id(fields)) is not fields:
        return step  # an unshared set: its id could be reused
    return _SHARED_PENDING.setdefault(id(fields), step)


def evolve(state: SagaState | None, event: EventBase) -> SagaState:
    """Applies one event to a saga's state and returns the new state.

    Raises:
        IllegalTransition: The event does not follow the state (wrong saga, a gap or duplicate
            in ``seq``, or no edge in the transition tables). The given state is unchanged.
    """
    kind = _KINDS.get(type(event)) or _kind_of(type(event))
    base = kind.base
    if kind.begins and isinstance(event, SagaStarted | SagaRejected):
        return _begin(state, event)
    if state is None:
        raise IllegalTransition(f"{event.type} for saga {event.saga_id!r}, which has not started")
    if event.saga_id != state.saga_id:
        raise IllegalTransition(f"event of saga {event.saga_id!r} applied to {state.saga_id!r}")
    if event.seq != state.seq + 1:
        raise IllegalTransition(
            f"saga {state.saga_id!r}: event seq {event.seq} does not follow {state.seq}"
        )
    changes: dict[str, Any] = {"seq": event.seq, "updated_at": event.at}
    # Each isinstance below is tried only where the event's kind says it holds: a pydantic
    # model's isinstance that fails goes through the ABC machinery, and costs as much as a fold.
    if kind.request and isinstance(event, _REQUEST_EVENTS) and event.message_id is not None:
        changes["requests"] = (*state.requests, event.message_id)[-REMEMBERED_REQUESTS:]
    if base is SignalReceived and isinstance(event, SignalReceived):
        changes["signals"] = {**state.signals, event.name: event.data}
    elif base is StepSucceeded and isinstance(event, StepSucceeded) and event.signal is not None:
        changes["signals"] = {k: v for k, v in state.signals.items() if k != event.signal}
    elif base is SagaDeadlinePassed:
        changes["deadline_at"] = None
    elif base is SagaCompensationAsked and isinstance(event, SagaCompensationAsked):
        changes["undo_for"] = event.attempt
    if kind.step and isinstance(event, StepEvent):
        changes["steps"] = {**state.steps, event.step: _evolve_step(state, event, base)}
        if base is StepExpanded and isinstance(event, StepExpanded):
            items = {item_name(event.step, i): _PENDING for i in range(event.count)}
            changes["steps"] |= items
    if kind.saga:
        changes.update(_evolve_saga(state, event, base))
    return _replace(state, changes)


@dataclass(frozen=True, slots=True)
class _Kind:
    """What `evolve` needs to know of an event class, found once per class."""

    base: type[EventBase]
    """The event class it is, or derives from."""
    begins: bool
    """A `SagaStarted` or `SagaRejected`."""
    request: bool
    """One of `_REQUEST_EVENTS`."""
    step: bool
    """A step event with edges in `STEP_TRANSITIONS`."""
    saga: bool
    """An event with edges in `SAGA_TRANSITIONS`."""


_KINDS: dict[type[EventBase], _Kind] = {}


def _kind_of(cls: type[EventBase]) -> _Kind:
    base = next((c for c in _EVENT_CLASSES if issubclass(cls, c)), cls)
    found = _Kind(
        base=base,
        begins=issubclass(cls, SagaStarted | SagaRejected),
        request=issubclass(cls, _REQUEST_EVENTS),
        step=issubclass(cls, StepEvent) and cls in _STEP_EVENT_TYPES,
        saga=cls in _SAGA_EVENT_TYPES,
    )
    _KINDS[cls] = found  # one entry per event class
    return found


_STEP_EVENT_TYPES = frozenset(t for (t, _) in STEP_TRANSITIONS)
_EVENT_CLASSES: tuple[type[EventBase], ...] = (
    *{t for (t, _) in STEP_TRANSITIONS},
    *{t for (t, _) in SAGA_TRANSITIONS},
)
"""The event classes `evolve` tells apart (none derives from another; the transition tables
name every one of them)."""
_REQUEST_EVENTS = (
    SagaCompensationAsked,
    SagaAborted,
    CancelRejected,
    SagaResumed,
    RequestDenied,
    SignalReceived,
    SignalRejected,
)
"""The events that answer an operator request, with its message id."""

REMEMBERED_REQUESTS = 32
"""How many operator requests a saga remembers (`SagaState.requests`): far more than a saga
sees in practice, and a bound on what a snapshot carries."""


def _begin(state: SagaState | None, event: SagaStarted | SagaRejected) -> SagaState:
    """A saga's first event, or a start after a rejected one (nothing ran: it begins anew)."""
    kind = type(event)
    if state is None:
        if event.seq != 1:
            raise IllegalTransition(
                f"saga {event.saga_id!r}: {kind.__name__} must be event 1, not {event.seq}"
            )
    else:
        if event.saga_id != state.saga_id:
            raise IllegalTransition(f"event of saga {event.saga_id!r} applied to {state.saga_id!r}")
        if (kind, state.status) not in SAGA_TRANSITIONS:
            raise IllegalTransition(
                f"saga {state.saga_id!r} has already started"
                if isinstance(event, SagaStarted)
                else f"saga {state.saga_id!r}: {kind.__name__} is not legal when the saga is "
                f"{state.status.value}"
            )
        if event.seq != state.seq + 1:
            raise IllegalTransition(
                f"saga {state.saga_id!r}: event seq {event.seq} does not follow {state.seq}"
            )
    status = SAGA_TRANSITIONS[(kind, state.status if state is not None else None)]
    if isinstance(event, SagaStarted):
        # Every value is of a validated event, or made here: validating them again would be
        # the most expensive part of a rebuild's first event of each saga.
        return _build(
            SagaState,
            saga_id=event.saga_id,
            name=event.name,
            version=event.version,
            status=status,
            input=event.input,
            steps=dict.fromkeys(event.steps, _PENDING),
            seq=event.seq,
            started_at=event.at,
            updated_at=event.at,
            digest=event.digest,
            deadline_at=event.deadline_at,
            parent=event.parent,
            # A signal sent between a rejected start and a valid one is kept.
            signals=state.signals if state is not None else {},
        )
    return SagaState(
        saga_id=event.saga_id,
        name=event.name,
        version=event.version or 0,
        status=status,
        input=event.input,
        steps={},
        seq=event.seq,
        started_at=event.at,
        updated_at=event.at,
        finished_at=event.at,
        reason=event.reason,
        digest=event.digest,
        parent=event.parent,
    )


def _evolve_step(state: SagaState, event: StepEvent, base: type[EventBase]) -> StepState:
    kind, name = type(event), event.step
    needed = STEP_EVENTS_NEED.get(kind)
    if needed is not None and state.status is not needed:
        raise IllegalTransition(
            f"saga {state.saga_id!r}, step {name!r}: {kind.__name__} while the saga is "
            f"{state.status.value}"
        )
    if state.status in TERMINAL_STATUSES:
        raise IllegalTransition(f"saga {state.saga_id!r} has ended; {kind.__name__} is not legal")
    step = state.steps.get(name)
    if step is None:
        raise IllegalTransition(f"saga {state.saga_id!r} has no step {name!r}")
    target = STEP_TRANSITIONS.get((kind, step.status))
    if target is None:
        raise IllegalTransition(
            f"saga {state.saga_id!r}, step {name!r}: {kind.__name__} is not legal when the step "
            f"is {step.status.value}"
        )
    at = event.at
    u: dict[str, Any] = {"status": target}
    if base is StepStarted and isinstance(event, StepStarted):
        u |= {"attempt": event.attempt, "deadline_at": event.deadline_at, "retry_at": None}
        u["wake_at"] = event.wake_at
        if event.child is not None:
            u["child"] = event.child
        if step.started_at is None:
            u["started_at"] = at
        if step.status is StepStatus.STUCK:
            u |= {"budget_from": event.attempt - 1, "stuck_phase": None}
    elif base is StepSucceeded and isinstance(event, StepSucceeded):
        u |= {"output": event.output, "deadline_at": None, "finished_at": at, "error": None}
        u["wake_at"] = None
    elif base is StepScheduled and isinstance(event, StepScheduled):
        u |= {"wake_at": event.due_at}
    elif base is StepExpanded and isinstance(event, StepExpanded):
        u |= {"wake_at": None, "started_at": at}
    elif base is StepSkipped and isinstance(event, StepSkipped):
        u |= {"wake_at": None, "finished_at": at}
    elif base is ApprovalReminded and isinstance(event, ApprovalReminded):
        u |= {"wake_at": event.next_at, "reminders": step.reminders + 1}
    elif base in _RETRIES and isinstance(event, StepRetryScheduled | CompensationRetryScheduled):
        u |= {"error": event.error, "deadline_at": None, "retry_at": event.retry_at}
        if base is StepRetryScheduled and event.error.type == "Timeout":
            u["uncertain"] = True
    elif base is StepFailedEvent and isinstance(event, StepFailedEvent):
        u |= {"error": event.error, "deadline_at": None, "retry_at": None, "finished_at": at}
        u["wake_at"] = None
    elif base is StepTimedOut and isinstance(event, StepTimedOut):
        u |= {
            "error": ErrorInfo(type="Timeout", message="outcome unknown: no reply by the deadline"),
            "deadline_at": None,
            "retry_at": None,
            "finished_at": at,
        }
    elif base is StepStuck and isinstance(event, StepStuck):
        u |= {"error": event.error, "deadline_at": None, "retry_at": None}
        u["stuck_phase"] = event.phase
    elif base is CompensationStarted and isinstance(event, CompensationStarted):
        u |= {"compensation_attempt": event.attempt, "deadline_at": event.deadline_at}
        u["retry_at"] = None
        if step.status is StepStatus.STUCK:
            u |= {"budget_from": event.attempt - 1, "stuck_phase": None}
        elif step.status is not StepStatus.COMPENSATION_RETRYING:
            u["budget_from"] = 0  # the compensation's own budget starts now
    elif base is CompensationSucceeded or base is CompensationResolved:
        u |= {"deadline_at": None, "compensated_at": at, "stuck_phase": None}
    elif base is StepResolved and isinstance(event, StepResolved):
        u |= {"output": step.output or {}, "finished_at": at, "stuck_phase": None}
    return _replace(step, u)


def _evolve_saga(state: SagaState, event: EventBase, base: type[EventBase]) -> dict[str, Any]:
    kind = type(event)
    if kind not in _SAGA_EVENT_TYPES:
        return {}  # step events leave the saga's status as it is
    target = SAGA_TRANSITIONS.get((kind, state.status))
    if target is None:
        raise IllegalTransition(
            f"saga {state.saga_id!r}: {kind.__name__} is not legal when the saga is "
            f"{state.status.value}"
        )
    if kind in RECORD_ONLY:
        return {}  # a self-loop: the status, and the finish time, stay as they are
    if base is SagaResumed and isinstance(event, SagaResumed):
        target = SagaStatus.COMPENSATING if event.compensating else SagaStatus.RUNNING
        return {"status": target, "finished_at": None}
    changes: dict[str, Any] = {"status": target}
    if (base is SagaAborted or base is SagaStuck) and isinstance(event, SagaAborted | SagaStuck):
        changes["reason"] = event.reason
    if base is SagaAborted:
        changes["finished_at"] = None  # a completed sub-saga compensated by its parent
    if target in FINAL_STATUSES:
        changes["finished_at"] = event.at
    return changes


_SAGA_EVENT_TYPES = frozenset(t for (t, _) in SAGA_TRANSITIONS)
_RETRIES = frozenset({StepRetryScheduled, CompensationRetryScheduled})
