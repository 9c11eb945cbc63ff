"""The audit trail in the core: who asked for what, why, and what was refused.

Requests carry ``by`` (the verified principal, set by the coordinator) and a reason; the events
they cause record both, `deny` records a refusal, and a request answered once is ignored when
it comes again (delivered twice, or replayed by someone who copied it off the topic).
"""

from __future__ import annotations

from saga.core.decide import decide, deny
from saga.core.definition import StepKind
from saga.core.events import (
    CancelRejected,
    RequestDenied,
    SagaAborted,
    SagaRejected,
    SagaResumed,
    SagaStarted,
)
from saga.core.messages import CancelSaga, ResolveSaga, RetrySaga, StartSaga
from saga.core.state import REMEMBERED_REQUESTS, SagaStatus
from tests.core.support import NO_JITTER, Driver, chain


def _stuck() -> Driver:
    """A saga whose retriable step (after its pivot) exhausted its retries: stuck."""
    kinds = [StepKind.PIVOT, StepKind.RETRIABLE]
    drv = Driver(chain("p", "a", kinds=kinds, retry=NO_JITTER))
    drv.start()
    drv.reply(drv.open_command("p"))
    _exhaust(drv)
    return drv


def _exhaust(drv: Driver) -> None:
    """Fails step ``a`` technically until the saga is stuck."""
    for _ in range(3):
        drv.reply(drv.open_command("a"), "technical")
        if drv.state is not None and drv.state.status is SagaStatus.RUNNING:
            drv.tick_due()
    assert drv.state is not None
    assert drv.state.status is SagaStatus.STUCK


def test_the_starting_principal_is_recorded() -> None:
    drv = Driver(chain("a"))
    start = StartSaga(
        message_id="m1", saga_id="saga-1", saga_name="chain", input={}, at=drv.now, by="shop"
    )
    (started,) = [e for e in drv.send(start).events if isinstance(e, SagaStarted)]
    assert started.by == "shop"


def test_a_cancel_records_who_and_why() -> None:
    drv = Driver(chain("a", "b"))
    drv.start()
    cancel = CancelSaga(
        message_id="c1", saga_id="saga-1", reason="customer called", at=drv.now, by="alice"
    )
    (aborted,) = drv.send(cancel).events[:1]
    assert isinstance(aborted, SagaAborted)
    assert (aborted.by, aborted.message_id) == ("alice", "c1")
    assert aborted.reason == "cancelled: customer called"


def test_a_retry_and_a_resolve_record_who_and_why() -> None:
    drv = _stuck()
    retry = RetrySaga(
        message_id="r1", saga_id="saga-1", at=drv.now, reason="database is back", by="alice"
    )
    resumed = drv.send(retry).events[0]
    assert isinstance(resumed, SagaResumed)
    assert (resumed.by, resumed.reason, resumed.message_id) == ("alice", "database is back", "r1")

    drv = _stuck()
    resolve = ResolveSaga(
        message_id="s1", saga_id="saga-1", at=drv.now, note="charged by phone", by="bob"
    )
    resumed = drv.send(resolve).events[0]
    assert isinstance(resumed, SagaResumed)
    assert (resumed.by, resumed.reason) == ("bob", "charged by phone")


def test_a_request_answered_once_is_ignored_when_it_comes_again() -> None:
    drv = _stuck()
    retry = RetrySaga(message_id="r1", saga_id="saga-1", at=drv.now, by="alice")
    assert drv.send(retry).events
    # Stuck again, then the very same (signed) retry is replayed: nothing happens.
    _exhaust(drv)
    again = drv.send(retry)
    assert again.events == ()
    assert again.commands == ()
    assert again.ignored == "request r1 was already answered"
    # A new request (another id) is honoured.
    fresh = RetrySaga(message_id="r2", saga_id="saga-1", at=drv.now, by="alice")
    assert drv.send(fresh).commands


def test_a_cancel_delivered_twice_is_recorded_once() -> None:
    drv = Driver(chain("a", "b"))
    drv.start()
    cancel = CancelSaga(message_id="c9", saga_id=drv.saga_id, at=drv.now, by="alice")
    assert isinstance(drv.send(cancel).events[0], SagaAborted)
    again = drv.send(cancel)
    assert again.ignored == "request c9 was already answered"
    assert again.events == ()
    # Without the memory it would have been recorded as a CancelRejected (no longer running).
    assert not any(isinstance(e, CancelRejected) for e in drv.events)


def test_the_remembered_requests_are_bounded() -> None:
    drv = Driver(chain("a"))
    drv.start()
    for n in range(REMEMBERED_REQUESTS + 5):
        drv.send(CancelSaga(message_id=f"c{n}", saga_id="saga-1", at=drv.now))
    assert drv.state is not None
    assert len(drv.state.requests) == REMEMBERED_REQUESTS
    assert drv.state.requests[-1] == f"c{REMEMBERED_REQUESTS + 4}"


def test_a_refused_start_of_a_new_id_is_a_rejected_saga_that_a_later_start_replaces() -> None:
    definition = chain("a")
    start = StartSaga(
        message_id="m1", saga_id="x", saga_name="chain", input={}, at=1.0, by="mallory"
    )
    denied = deny(None, start, "mallory", "no rule allows it", 1.0)
    (event,) = denied.events
    assert isinstance(event, SagaRejected)
    assert event.by == "mallory"
    assert "refused: no rule allows it" in event.reason
    assert denied.state is not None
    assert denied.state.status is SagaStatus.REJECTED
    (alert,) = denied.alerts
    assert alert.kind == "denied"
    assert alert.saga_name == "chain"
    allowed = start.model_copy(update={"message_id": "m2", "by": "shop"})
    after = decide(definition, denied.state, allowed, 2.0)
    assert after.state is not None
    assert after.state.status is SagaStatus.RUNNING


def test_a_refused_operator_request_is_an_event_that_changes_nothing_else() -> None:
    drv = _stuck()
    before = drv.state
    assert before is not None
    retry = RetrySaga(message_id="r1", saga_id="saga-1", at=drv.now, by="mallory")
    denied = deny(before, retry, "mallory", "no rule allows it", drv.now)
    (event,) = denied.events
    assert isinstance(event, RequestDenied)
    assert (event.request, event.by, event.message_id) == ("retry", "mallory", "r1")
    assert denied.commands == ()
    assert denied.state is not None
    assert denied.state.status is SagaStatus.STUCK
    assert denied.state.steps == before.steps
    assert denied.state.seq == before.seq + 1
    # The refused id is remembered: the same request cannot be honoured later by replaying it.
    assert "r1" in denied.state.requests


def test_a_refused_request_for_an_unknown_saga_leaves_no_record() -> None:
    retry = RetrySaga(message_id="r1", saga_id="nope", at=1.0, by="mallory")
    denied = deny(None, retry, "mallory", "no rule", 1.0)
    assert denied.state is None
    assert denied.events == ()
    assert denied.rejected
