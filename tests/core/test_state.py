"""`evolve` and its transition tables: every legal edge, and every illegal one raising."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from saga.core.messages import (
    ApprovalReminded,
    CancelRejected,
    CompensationResolved,
    CompensationRetryScheduled,
    CompensationStarted,
    CompensationSucceeded,
    ErrorInfo,
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
from saga.core.state import (
    FINAL_STATUSES,
    RECORD_ONLY,
    SAGA_TRANSITIONS,
    STEP_TRANSITIONS,
    SagaState,
    SagaStatus,
    StepState,
    StepStatus,
    evolve,
)
from saga.errors import IllegalTransition, SagaError
from tests.core.support import fold

SAGA = "saga-7"
BOOM = ErrorInfo(type="ConnectionError", message="refused")


class Log:
    """Numbers events like the coordinator does: seq 1, 2, 3 ... and the clock one tick each."""

    def __init__(self) -> None:
        self.events: list[EventBase] = []

    def __call__(self, cls: type[EventBase], **fields: Any) -> EventBase:
        n = len(self.events) + 1
        event = cls(saga_id=SAGA, seq=n, at=100.0 + n, **fields)
        self.events.append(event)
        return event

    def state(self) -> SagaState:
        state = fold(self.events)
        assert state is not None
        return state


def _started(log: Log, steps: tuple[str, ...] = ("a", "b")) -> None:
    log(SagaStarted, name="order", version=2, input={"total": 5}, steps=list(steps))


# -- step events, by type: the fields each needs ---------------------------------------------------

STEP_EVENT_FIELDS: dict[type[EventBase], dict[str, Any]] = {
    StepStarted: {"attempt": 1, "deadline_at": 500.0},
    StepSucceeded: {"attempt": 1, "output": {"id": 1}},
    StepRetryScheduled: {"attempt": 1, "error": BOOM, "retry_at": 300.0},
    StepFailedEvent: {"attempt": 1, "error": BOOM},
    StepTimedOut: {"attempt": 1},
    StepStuck: {"phase": "action", "attempt": 1, "error": BOOM},
    CompensationStarted: {"attempt": 1, "deadline_at": 500.0},
    CompensationSucceeded: {"attempt": 1},
    CompensationRetryScheduled: {"attempt": 1, "error": BOOM, "retry_at": 300.0},
    StepResolved: {"attempt": 1, "note": "by hand"},
    CompensationResolved: {"attempt": 1, "note": "by hand"},
    StepScheduled: {"attempt": 0, "due_at": 900.0},
    StepExpanded: {"attempt": 0, "count": 2},
    StepSkipped: {"attempt": 0, "reason": "condition is false"},
    ApprovalReminded: {"attempt": 1, "escalated": False, "recipients": ["ann"], "next_at": None},
}
STEP_EVENTS = list(STEP_EVENT_FIELDS)
SAGA_EVENT_FIELDS: dict[type[EventBase], dict[str, Any]] = {
    SagaAborted: {"reason": "no"},
    SagaCompleted: {},
    SagaCompensated: {},
    SagaStuck: {"reason": "stuck"},
    SagaResumed: {"compensating": False},
    SagaRejected: {"name": "order", "input": {}, "reason": "no such saga", "message_id": "m"},
    StartIgnored: {"message_id": "m", "reason": "exists", "differs": []},
    StartRefused: {"message_id": "m", "reason": "exists", "differs": ["input"]},
    CancelRejected: {"reason": "too late"},
    RequestDenied: {"request": "retry", "message_id": "m", "by": "mallory", "reason": "no rule"},
    SagaDeadlinePassed: {"compensating": True},
    SagaCompensationAsked: {"attempt": 1, "message_id": "c"},
    SignalReceived: {"name": "cooked", "data": {"x": 1}, "message_id": "s"},
    SignalRejected: {"name": "cooked", "reason": "ended", "message_id": "s"},
}


def test_the_tables_cover_every_step_event_and_no_other() -> None:
    assert {kind for kind, _ in STEP_TRANSITIONS} == set(STEP_EVENTS)
    assert {kind for kind, _ in SAGA_TRANSITIONS} == {SagaStarted, *SAGA_EVENT_FIELDS}


# -- realistic histories that leave step 'a' in each status ----------------------------------------

A_HISTORIES: dict[StepStatus, list[tuple[type[EventBase], dict[str, Any]]]] = {
    StepStatus.PENDING: [],
    StepStatus.SCHEDULED: [(StepScheduled, {"step": "a", "attempt": 0, "due_at": 200.0})],
    StepStatus.SKIPPED: [(StepSkipped, {"step": "a", "attempt": 0, "reason": "no"})],
    StepStatus.RUNNING: [(StepStarted, {"step": "a", "attempt": 1, "deadline_at": 130.0})],
    StepStatus.RETRYING: [
        (StepStarted, {"step": "a", "attempt": 1, "deadline_at": 130.0}),
        (StepRetryScheduled, {"step": "a", "attempt": 1, "error": BOOM, "retry_at": 104.0}),
    ],
    StepStatus.SUCCEEDED: [
        (StepStarted, {"step": "a", "attempt": 1, "deadline_at": 130.0}),
        (StepSucceeded, {"step": "a", "attempt": 1, "output": {"id": "a-1"}}),
    ],
    StepStatus.FAILED: [
        (StepStarted, {"step": "a", "attempt": 1, "deadline_at": 130.0}),
        (StepFailedEvent, {"step": "a", "attempt": 1, "error": BOOM}),
    ],
    StepStatus.UNKNOWN: [
        (StepStarted, {"step": "a", "attempt": 1, "deadline_at": 130.0}),
        (StepTimedOut, {"step": "a", "attempt": 1}),
    ],
    StepStatus.STUCK: [
        (StepStarted, {"step": "a", "attempt": 1, "deadline_at": 130.0}),
        (StepStuck, {"step": "a", "phase": "action", "attempt": 1, "error": BOOM}),
        (SagaStuck, {"reason": "a is stuck"}),
    ],
}
_UNDO = [
    (StepStarted, {"step": "a", "attempt": 1, "deadline_at": 130.0}),
    (StepSucceeded, {"step": "a", "attempt": 1, "output": {"id": "a-1"}}),
    (StepStarted, {"step": "b", "attempt": 1, "deadline_at": 130.0}),
    (StepFailedEvent, {"step": "b", "attempt": 1, "error": BOOM}),
    (SagaAborted, {"reason": "b failed", "step": "b"}),
    (CompensationStarted, {"step": "a", "attempt": 1, "deadline_at": 140.0}),
]
A_HISTORIES |= {
    StepStatus.COMPENSATING: _UNDO,
    StepStatus.COMPENSATION_RETRYING: [
        *_UNDO,
        (CompensationRetryScheduled, {"step": "a", "attempt": 1, "error": BOOM, "retry_at": 9.0}),
    ],
    StepStatus.COMPENSATED: [*_UNDO, (CompensationSucceeded, {"step": "a", "attempt": 1})],
}


def _state_with_a(status: StepStatus) -> SagaState:
    log = Log()
    _started(log)
    for cls, fields in A_HISTORIES[status]:
        log(cls, **fields)
    state = log.state()
    assert state.steps["a"].status is status
    return state


def test_every_step_status_is_reachable_by_a_realistic_history() -> None:
    assert set(A_HISTORIES) == set(StepStatus)


def _saga_status_for(kind: type[EventBase], state: SagaState) -> SagaStatus:
    """A saga status in which ``kind`` is not ruled out by the saga's own status."""
    if kind in (StepStarted, StepScheduled, StepExpanded):
        return SagaStatus.RUNNING
    if kind is CompensationStarted:
        return SagaStatus.COMPENSATING
    if state.status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED):
        return SagaStatus.RUNNING
    return state.status


def _step_event(kind: type[EventBase], state: SagaState, step: str = "a") -> EventBase:
    return kind(
        saga_id=state.saga_id, seq=state.seq + 1, at=500.0, step=step, **STEP_EVENT_FIELDS[kind]
    )


ILLEGAL_STEP_PAIRS = [
    (kind, status)
    for kind, status in itertools.product(STEP_EVENTS, StepStatus)
    if (kind, status) not in STEP_TRANSITIONS
]
LEGAL_STEP_PAIRS = sorted(STEP_TRANSITIONS.items(), key=lambda kv: (kv[0][0].__name__, kv[0][1]))


@pytest.mark.parametrize(
    ("kind", "status"), ILLEGAL_STEP_PAIRS, ids=[f"{k.__name__}-{s}" for k, s in ILLEGAL_STEP_PAIRS]
)
def test_step_event_not_in_the_table_raises(kind: type[EventBase], status: StepStatus) -> None:
    realistic = _state_with_a(status)
    state = realistic.model_copy(update={"status": _saga_status_for(kind, realistic)})
    copy = state.model_copy(deep=True)
    with pytest.raises(IllegalTransition) as caught:
        evolve(state, _step_event(kind, state))
    assert f"is not legal when the step is {status.value}" in str(caught.value)
    assert "step 'a'" in str(caught.value)
    assert state == copy


@pytest.mark.parametrize(
    ("pair", "target"),
    LEGAL_STEP_PAIRS,
    ids=[f"{k.__name__}-{s}" for (k, s), _ in LEGAL_STEP_PAIRS],
)
def test_step_event_in_the_table_moves_along_its_edge(
    pair: tuple[type[EventBase], StepStatus], target: StepStatus
) -> None:
    kind, status = pair
    realistic = _state_with_a(status)
    state = realistic.model_copy(update={"status": _saga_status_for(kind, realistic)})
    after = evolve(state, _step_event(kind, state))
    assert after.steps["a"].status is target
    assert after.steps["b"] == state.steps["b"]
    assert after.seq == state.seq + 1
    assert after.status is state.status


@pytest.mark.parametrize(
    ("kind", "needs"),
    [(StepStarted, SagaStatus.RUNNING), (CompensationStarted, SagaStatus.COMPENSATING)],
)
@pytest.mark.parametrize("saga_status", list(SagaStatus))
def test_start_events_need_the_saga_in_one_status(
    kind: type[EventBase], needs: SagaStatus, saga_status: SagaStatus
) -> None:
    step_status = StepStatus.PENDING if kind is StepStarted else StepStatus.SUCCEEDED
    state = _state_with_a(step_status).model_copy(update={"status": saga_status})
    event = _step_event(kind, state)
    if saga_status is needs:
        assert evolve(state, event).steps["a"].status is STEP_TRANSITIONS[(kind, step_status)]
    else:
        copy = state.model_copy(deep=True)
        with pytest.raises(IllegalTransition, match=f"while the saga is {saga_status.value}"):
            evolve(state, event)
        assert state == copy


@pytest.mark.parametrize("kind", STEP_EVENTS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("ended", [SagaStatus.COMPLETED, SagaStatus.COMPENSATED])
def test_no_step_event_after_the_saga_ended(kind: type[EventBase], ended: SagaStatus) -> None:
    # Even an edge the step table has (from the step's status) is illegal once the saga ended.
    (status,) = [s for k, s in STEP_TRANSITIONS if k is kind][:1] or [StepStatus.PENDING]
    state = _state_with_a(status).model_copy(update={"status": ended})
    copy = state.model_copy(deep=True)
    with pytest.raises(IllegalTransition):
        evolve(state, _step_event(kind, state))
    assert state == copy


# -- saga events -----------------------------------------------------------------------------------


def _saga_in(status: SagaStatus) -> SagaState:
    """A saga brought to ``status`` by a realistic history."""
    log = Log()
    if status is SagaStatus.REJECTED:
        log(SagaRejected, name="order", input={"total": "x"}, reason="bad input", message_id="m")
        return log.state()
    _started(log, steps=("a",))
    if status is SagaStatus.RUNNING:
        return log.state()
    log(StepStarted, step="a", attempt=1, deadline_at=130.0)
    if status is SagaStatus.COMPLETED:
        log(StepSucceeded, step="a", attempt=1, output={})
        log(SagaCompleted)
    elif status is SagaStatus.STUCK:
        log(StepStuck, step="a", phase="action", attempt=1, error=BOOM)
        log(SagaStuck, reason="a is stuck")
    else:
        log(StepTimedOut, step="a", attempt=1)
        log(SagaAborted, reason="a timed out", step="a")
        if status is SagaStatus.COMPENSATED:
            log(CompensationStarted, step="a", attempt=1, deadline_at=150.0)
            log(CompensationSucceeded, step="a", attempt=1)
            log(SagaCompensated)
    state = log.state()
    assert state.status is status
    return state


SAGA_STATUSES: list[SagaStatus | None] = [None, *SagaStatus]
ILLEGAL_SAGA_PAIRS = [
    (kind, status)
    for kind, status in itertools.product([SagaStarted, *SAGA_EVENT_FIELDS], SAGA_STATUSES)
    if (kind, status) not in SAGA_TRANSITIONS
]


def _saga_event(kind: type[EventBase], state: SagaState | None) -> EventBase:
    seq = state.seq + 1 if state is not None else 1
    if kind is SagaStarted:
        return SagaStarted(
            saga_id=SAGA, seq=seq, at=1.0, name="order", version=2, input={}, steps=["a"]
        )
    return kind(saga_id=SAGA, seq=seq, at=900.0, **SAGA_EVENT_FIELDS[kind])


@pytest.mark.parametrize(
    ("kind", "status"), ILLEGAL_SAGA_PAIRS, ids=[f"{k.__name__}-{s}" for k, s in ILLEGAL_SAGA_PAIRS]
)
def test_saga_event_not_in_the_table_raises(
    kind: type[EventBase], status: SagaStatus | None
) -> None:
    state = _saga_in(status) if status is not None else None
    copy = state.model_copy(deep=True) if state is not None else None
    with pytest.raises(IllegalTransition):
        evolve(state, _saga_event(kind, state))
    assert state == copy


@pytest.mark.parametrize(("pair", "target"), list(SAGA_TRANSITIONS.items()), ids=lambda v: str(v))
def test_saga_event_in_the_table_moves_along_its_edge(
    pair: tuple[type[EventBase], SagaStatus | None], target: SagaStatus
) -> None:
    kind, status = pair
    state = _saga_in(status) if status is not None else None
    after = evolve(state, _saga_event(kind, state))
    assert after.status is target
    assert after.is_final is (target in FINAL_STATUSES)


@pytest.mark.parametrize("compensating", [False, True])
def test_resumed_goes_back_to_running_or_compensating(compensating: bool) -> None:
    state = _saga_in(SagaStatus.STUCK)
    event = SagaResumed(saga_id=SAGA, seq=state.seq + 1, at=999.0, compensating=compensating)
    after = evolve(state, event)
    assert after.status is (SagaStatus.COMPENSATING if compensating else SagaStatus.RUNNING)
    assert after.finished_at is None
    assert state.finished_at is not None


def test_cancel_rejected_changes_no_status() -> None:
    for status in SagaStatus:
        state = _saga_in(status)
        after = evolve(state, CancelRejected(saga_id=SAGA, seq=state.seq + 1, at=5.0, reason="x"))
        assert after.status is state.status
        assert after.steps == state.steps
        assert after.seq == state.seq + 1


@pytest.mark.parametrize("kind", sorted(RECORD_ONLY, key=lambda k: k.__name__))
@pytest.mark.parametrize("status", list(SagaStatus))
def test_record_only_events_are_legal_in_every_status_and_change_nothing_else(
    kind: type[EventBase], status: SagaStatus
) -> None:
    # A duplicate start (or a late cancel) appended to a finished saga is in the tables, as a
    # self-loop: the status, the finish time, the steps and the reason all stay as they were.
    state = _saga_in(status)
    assert SAGA_TRANSITIONS[(kind, status)] is status
    after = evolve(state, _saga_event(kind, state))
    assert after.status is status
    assert after.finished_at == state.finished_at
    assert after.steps == state.steps
    assert after.reason == state.reason
    assert after.input == state.input
    assert (after.seq, after.updated_at) == (state.seq + 1, 900.0)


def test_a_rejected_start_is_a_final_saga_with_its_reason_and_request() -> None:
    event = SagaRejected(
        saga_id=SAGA,
        seq=1,
        at=50.0,
        name="ordr",
        input={"total": 5},
        reason="no saga definition named 'ordr'",
        message_id="m-1",
    )
    state = evolve(None, event)
    assert state.status is SagaStatus.REJECTED
    assert state.is_final
    assert SagaStatus.REJECTED in FINAL_STATUSES
    assert (state.name, state.version, state.digest) == ("ordr", 0, None)
    assert state.input == {"total": 5}
    assert state.steps == {}
    assert state.reason == "no saga definition named 'ordr'"
    assert (state.started_at, state.finished_at, state.seq) == (50.0, 50.0, 1)
    assert state.percent_complete() == 0
    assert SagaState.model_validate(state.model_dump(mode="json")) == state


def test_a_rejected_saga_can_be_started_again_and_rejected_again() -> None:
    log = Log()
    log(SagaRejected, name="order", input={}, reason="input is invalid", message_id="m-1")
    log(SagaRejected, name="order", input={"x": 1}, reason="still invalid", message_id="m-2")
    again = log.state()
    assert (again.status, again.reason, again.input, again.seq) == (
        SagaStatus.REJECTED,
        "still invalid",
        {"x": 1},
        2,
    )
    log(SagaStarted, name="order", version=2, input={"total": 5}, steps=["a"], digest="d1")
    state = log.state()
    assert state.status is SagaStatus.RUNNING
    assert (state.seq, state.version, state.digest, state.input) == (3, 2, "d1", {"total": 5})
    assert (state.reason, state.finished_at, state.started_at) == (None, None, 103.0)
    assert state.steps == {"a": StepState()}
    # Once it runs, it cannot be rejected (or started) again.
    for kind in (SagaRejected, SagaStarted):
        with pytest.raises(IllegalTransition):
            evolve(state, _saga_event(kind, state))


def test_a_rejected_start_must_be_event_one() -> None:
    event = SagaRejected(
        saga_id=SAGA, seq=2, at=1, name="order", input={}, reason="x", message_id="m"
    )
    with pytest.raises(IllegalTransition, match="must be event 1"):
        evolve(None, event)


@pytest.mark.parametrize("kind", STEP_EVENTS, ids=lambda k: k.__name__)
def test_no_step_event_for_a_rejected_saga(kind: type[EventBase]) -> None:
    state = _saga_in(SagaStatus.REJECTED)
    with pytest.raises(IllegalTransition):
        evolve(state, _step_event(kind, state))


def test_the_definition_digest_is_kept_on_the_state() -> None:
    event = SagaStarted(
        saga_id=SAGA, seq=1, at=1, name="order", version=2, input={}, steps=["a"], digest="abc"
    )
    assert evolve(None, event).digest == "abc"
    old = SagaStarted(saga_id=SAGA, seq=1, at=1, name="order", version=2, input={}, steps=["a"])
    assert evolve(None, old).digest is None


# -- folding a whole history -----------------------------------------------------------------------


def test_fold_of_a_compensated_saga() -> None:
    log = Log()
    log(
        SagaStarted,
        name="order",
        version=2,
        input={"total": 5},
        steps=["pay", "ship"],
    )
    log(StepStarted, step="pay", attempt=1, deadline_at=130.0)
    log(StepRetryScheduled, step="pay", attempt=1, error=BOOM, retry_at=110.0)
    log(StepStarted, step="pay", attempt=2, deadline_at=140.0)
    log(StepSucceeded, step="pay", attempt=2, output={"charge": "c-1"})
    log(StepStarted, step="ship", attempt=1, deadline_at=150.0)
    failure = ErrorInfo(type="StepFailed", message="no stock", business=True)
    log(StepFailedEvent, step="ship", attempt=1, error=failure)
    log(SagaAborted, reason="ship failed: no stock", step="ship")
    log(CompensationStarted, step="pay", attempt=1, deadline_at=160.0)
    log(CompensationRetryScheduled, step="pay", attempt=1, error=BOOM, retry_at=112.0)
    log(CompensationStarted, step="pay", attempt=2, deadline_at=170.0)
    log(CompensationSucceeded, step="pay", attempt=2)
    log(SagaCompensated)

    states: list[SagaState] = []
    for event in log.events:
        states.append(evolve(states[-1] if states else None, event))
    assert [s.seq for s in states] == list(range(1, 14))
    assert [s.status for s in states].count(SagaStatus.RUNNING) == 7
    pay_statuses = [s.steps["pay"].status for s in states]
    assert list(dict.fromkeys(pay_statuses)) == [
        StepStatus.PENDING,
        StepStatus.RUNNING,
        StepStatus.RETRYING,
        StepStatus.SUCCEEDED,
        StepStatus.COMPENSATING,
        StepStatus.COMPENSATION_RETRYING,
        StepStatus.COMPENSATED,
    ]

    final = states[-1]
    assert final.status is SagaStatus.COMPENSATED
    assert final.is_final
    assert final.name == "order"
    assert final.version == 2
    assert final.input == {"total": 5}
    assert final.started_at == 101.0
    assert final.finished_at == final.updated_at == 113.0
    assert final.reason == "ship failed: no stock"
    assert final.outputs() == {"pay": {"charge": "c-1"}}
    assert final.percent_complete() == 100
    pay = final.steps["pay"]
    assert (pay.attempt, pay.compensation_attempt) == (2, 2)
    assert pay.started_at == 102.0
    assert pay.finished_at == 105.0
    assert pay.compensated_at == 112.0
    assert pay.deadline_at is None
    assert pay.retry_at is None
    ship = final.steps["ship"]
    assert ship.status is StepStatus.FAILED
    assert ship.error == failure

    # Snapshots are the state as data, and read back equal.
    assert SagaState.model_validate(final.model_dump(mode="json")) == final


def test_percent_complete_while_running_and_compensating() -> None:
    log = Log()
    _started(log, steps=("a", "b", "c", "d"))
    assert log.state().percent_complete() == 0
    for name in ("a", "b"):
        log(StepStarted, step=name, attempt=1, deadline_at=130.0)
        log(StepSucceeded, step=name, attempt=1, output={})
    assert log.state().percent_complete() == 50
    log(SagaAborted, reason="cancelled", step=None)
    assert log.state().percent_complete() == 0
    log(CompensationStarted, step="b", attempt=1, deadline_at=150.0)
    log(CompensationSucceeded, step="b", attempt=1)
    assert log.state().percent_complete() == 50


def test_timers_are_kept_in_the_state() -> None:
    log = Log()
    _started(log)
    log(StepStarted, step="a", attempt=1, deadline_at=130.0)
    assert log.state().steps["a"].deadline_at == 130.0
    log(StepRetryScheduled, step="a", attempt=1, error=BOOM, retry_at=104.5)
    a = log.state().steps["a"]
    assert (a.deadline_at, a.retry_at, a.error) == (None, 104.5, BOOM)
    log(StepStarted, step="a", attempt=2, deadline_at=160.0)
    a = log.state().steps["a"]
    assert (a.deadline_at, a.retry_at, a.attempt, a.started_at) == (160.0, None, 2, 102.0)
    log(StepTimedOut, step="a", attempt=2)
    a = log.state().steps["a"]
    assert a.status is StepStatus.UNKNOWN
    assert a.error is not None
    assert a.error.type == "Timeout"
    assert a.deadline_at is None


def test_operator_retry_resets_the_budget() -> None:
    log = Log()
    _started(log, steps=("a",))
    for attempt in (1, 2, 3):
        log(StepStarted, step="a", attempt=attempt, deadline_at=130.0)
        if attempt < 3:
            log(StepRetryScheduled, step="a", attempt=attempt, error=BOOM, retry_at=1.0)
    log(StepStuck, step="a", phase="action", attempt=3, error=BOOM)
    log(SagaStuck, reason="a is stuck")
    assert log.state().steps["a"].stuck_phase == "action"
    log(SagaResumed, compensating=False)
    log(StepStarted, step="a", attempt=4, deadline_at=200.0)
    a = log.state().steps["a"]
    assert (a.status, a.budget_from, a.stuck_phase) == (StepStatus.RUNNING, 3, None)


def test_operator_resolve_counts_a_stuck_step_as_succeeded() -> None:
    state = _saga_in(SagaStatus.STUCK)
    resumed = evolve(state, SagaResumed(saga_id=SAGA, seq=state.seq + 1, at=1, compensating=False))
    resolved = evolve(
        resumed,
        StepResolved(saga_id=SAGA, seq=resumed.seq + 1, at=2, step="a", attempt=1, note="by hand"),
    )
    a = resolved.steps["a"]
    assert (a.status, a.output, a.stuck_phase) == (StepStatus.SUCCEEDED, {}, None)


# -- illegal events, each named in the brief -------------------------------------------------------


def _running_saga() -> SagaState:
    log = Log()
    _started(log)
    log(StepStarted, step="a", attempt=1, deadline_at=130.0)
    return log.state()


ILLEGAL: dict[str, Callable[[SagaState], EventBase]] = {
    "success of a pending step": lambda s: StepSucceeded(
        saga_id=SAGA, seq=s.seq + 1, at=1, step="b", attempt=1, output={}
    ),
    "compensation while the saga is running": lambda s: CompensationStarted(
        saga_id=SAGA, seq=s.seq + 1, at=1, step="a", attempt=1, deadline_at=2
    ),
    "a gap in seq": lambda s: StepSucceeded(
        saga_id=SAGA, seq=s.seq + 2, at=1, step="a", attempt=1, output={}
    ),
    "a repeated seq": lambda s: StepSucceeded(
        saga_id=SAGA, seq=s.seq, at=1, step="a", attempt=1, output={}
    ),
    "a duplicate start": lambda s: SagaStarted(
        saga_id=SAGA, seq=s.seq + 1, at=1, name="order", version=2, input={}, steps=["a"]
    ),
    "an event of another saga": lambda s: StepSucceeded(
        saga_id="other", seq=s.seq + 1, at=1, step="a", attempt=1, output={}
    ),
    "compensated while the saga is running": lambda s: SagaCompensated(
        saga_id=SAGA, seq=s.seq + 1, at=1
    ),
    "resume of a running saga": lambda s: SagaResumed(
        saga_id=SAGA, seq=s.seq + 1, at=1, compensating=False
    ),
    "a second start of a running step": lambda s: StepStarted(
        saga_id=SAGA, seq=s.seq + 1, at=1, step="a", attempt=2, deadline_at=9
    ),
}


@pytest.mark.parametrize("name", sorted(ILLEGAL))
def test_illegal_event_raises_and_changes_nothing(name: str) -> None:
    state = _running_saga()
    copy = state.model_copy(deep=True)
    dumped = state.model_dump()
    with pytest.raises(IllegalTransition) as caught:
        evolve(state, ILLEGAL[name](state))
    assert isinstance(caught.value, SagaError)
    assert SAGA in str(caught.value)
    assert state == copy
    assert state.model_dump() == dumped


def test_events_before_the_start_raise() -> None:
    event = StepStarted(saga_id=SAGA, seq=1, at=1, step="a", attempt=1, deadline_at=2)
    with pytest.raises(IllegalTransition, match="has not started"):
        evolve(None, event)


def test_states_are_frozen() -> None:
    state = _running_saga()
    with pytest.raises(ValidationError):
        state.status = SagaStatus.COMPLETED  # type: ignore[misc]
    with pytest.raises(ValidationError):
        state.steps["a"].status = StepStatus.SUCCEEDED  # type: ignore[misc]


def test_evolve_returns_a_new_value_and_keeps_the_old_one() -> None:
    state = _running_saga()
    copy = state.model_copy(deep=True)
    after = evolve(
        state, StepSucceeded(saga_id=SAGA, seq=state.seq + 1, at=1, step="a", attempt=1, output={})
    )
    assert after is not state
    assert after.steps["a"].status is StepStatus.SUCCEEDED
    assert state == copy
    assert state.steps["a"].status is StepStatus.RUNNING


def test_a_start_that_is_not_the_first_event_raises() -> None:
    event = SagaStarted(saga_id=SAGA, seq=5, at=1, name="order", version=2, input={}, steps=["a"])
    with pytest.raises(IllegalTransition):
        evolve(None, event)


def test_an_event_for_an_unknown_step_raises() -> None:
    state = _running_saga()
    event = StepStarted(
        saga_id=SAGA, seq=state.seq + 1, at=1, step="ghost", attempt=1, deadline_at=9
    )
    with pytest.raises(IllegalTransition):
        evolve(state, event)


def test_step_state_defaults() -> None:
    assert StepState() == StepState(status=StepStatus.PENDING, attempt=0)


def _two_sagas() -> tuple[SagaState, SagaState]:
    states = []
    for saga_id in ("one", "two"):
        events: list[EventBase] = [
            SagaStarted(
                saga_id=saga_id,
                seq=1,
                at=1.0,
                name="n",
                version=1,
                input={},
                steps=[
                    "a",
                    "b",
                ],
            ),
            StepStarted(saga_id=saga_id, seq=2, at=2.0, step="a", attempt=1, deadline_at=9.0),
            StepSucceeded(saga_id=saga_id, seq=3, at=3.0, step="a", attempt=1, output={"x": 1}),
        ]
        state = fold(events)
        assert state is not None
        states.append(state)
    return states[0], states[1]


def test_states_share_what_they_have_in_common_and_stay_as_they_were() -> None:
    one, two = _two_sagas()
    # The bookkeeping of equal shapes is one object, and so are the steps not started.
    assert one.model_fields_set is two.model_fields_set
    assert one.steps["a"].model_fields_set is two.steps["a"].model_fields_set
    assert one.steps["b"] is two.steps["b"]
    assert one.model_fields_set == set(SagaState.model_fields) - {
        "finished_at",
        "reason",
        "undo_for",
        "requests",
    }
    assert one.steps["a"].model_fields_set == {
        "status",
        "attempt",
        "deadline_at",
        "retry_at",
        "wake_at",
        "started_at",
        "output",
        "finished_at",
        "error",
    }
    before = one.model_dump()
    later = evolve(
        two, StepStarted(saga_id="two", seq=4, at=4.0, step="b", attempt=1, deadline_at=9)
    )
    assert later.steps["b"].status is StepStatus.RUNNING
    assert one.model_dump() == before  # nothing shared was changed
    assert two.steps["b"] == StepState()


def test_a_state_read_back_from_its_snapshot_is_equal_and_shares_alike() -> None:
    one, two = _two_sagas()
    again = SagaState.model_validate(one.model_dump(mode="json"))
    other = SagaState.model_validate(two.model_dump(mode="json"))
    assert again == one
    assert again.model_dump() == one.model_dump()
    assert again.model_fields_set is other.model_fields_set
    assert again.steps["b"] is other.steps["b"]  # one shared step not started
    assert again.steps["b"] == StepState()
    assert next(iter(again.steps)) is next(iter(other.steps))  # one shared step name
    assert SagaState.model_validate_json(one.model_dump_json()) == one


def test_evolve_copies_like_model_copy() -> None:
    one, _ = _two_sagas()
    event = StepStarted(saga_id="one", seq=4, at=4.0, step="b", attempt=1, deadline_at=9.0)
    state = evolve(one, event)
    step = StepState().model_copy(
        update={
            "status": StepStatus.RUNNING,
            "attempt": 1,
            "deadline_at": 9.0,
            "retry_at": None,
            "wake_at": None,
            "started_at": 4.0,
        }
    )
    expected = one.model_copy(
        update={"seq": 4, "updated_at": 4.0, "steps": {**one.steps, "b": step}}
    )
    assert state == expected
    assert state.model_dump() == expected.model_dump()
    assert state.model_dump_json() == expected.model_dump_json()
    assert state.model_fields_set == expected.model_fields_set
    assert state.steps["b"].model_fields_set == step.model_fields_set
