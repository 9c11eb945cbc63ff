"""`decide`, scenario by scenario, with exact commands, events and timers.

Every input goes through `tests.core.support.Driver`, which also checks, on every call, that
decide is a pure function (the same arguments give an equal result, the given state is left
alone) and that the decision's state is the fold of its events.
"""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel

from saga.core.decide import Tick, decide, idempotency_key, next_due
from saga.core.definition import RetryPolicy, SagaDefinition, StepKind
from saga.core.messages import (
    CancelSaga,
    ErrorInfo,
    Reply,
    ResolveSaga,
    RetrySaga,
    SagaRejected,
    SagaStarted,
    StartIgnored,
    StartRefused,
    StartSaga,
)
from saga.core.state import SagaStatus, StepStatus
from tests.core.support import NO_JITTER, T0, Driver, chain, make_step, reply_to

C, P, R = StepKind.COMPENSATABLE, StepKind.PIVOT, StepKind.RETRIABLE


def _with_pivot(**retriable_fields: object) -> SagaDefinition:
    """a -> b -> pivot -> r (finish-to-start)."""
    return SagaDefinition(
        name="order",
        steps=(
            make_step("a", retry=NO_JITTER),
            make_step("b", after=["a"], retry=NO_JITTER),
            make_step("pivot", kind=P, after=["b"], retry=NO_JITTER, timeout=10),
            make_step("r", kind=R, after=["pivot"], **retriable_fields),  # type: ignore[arg-type]
        ),
    )


def _succeed(drv: Driver, *steps: str) -> None:
    for step in steps:
        drv.reply(drv.open_command(step))


# -- the happy path --------------------------------------------------------------------------------


def test_happy_chain_sends_one_command_per_decision_in_order() -> None:
    drv = Driver(chain("a", "b", "c", "d"))
    first = drv.start({"order": 7})
    assert drv.event_types(first) == ["saga_started", "step_started"]
    assert drv.sent(first) == [("action", "a")]
    (command,) = first.commands
    assert command.message_id == "saga-1/a/action/1"
    assert command.service == "svc-a"
    assert command.action == "do-a"
    assert command.attempt == 1
    assert command.payload == {"order": 7}
    assert command.deadline_at == T0 + 30
    assert command.budget == 30  # the step's timeout, for the participant to count itself
    assert command.saga_name == "chain"
    assert command.saga_version == 1

    for now, (done, nxt) in enumerate([("a", "b"), ("b", "c"), ("c", "d")], start=1):
        drv.now = T0 + now
        decision = drv.reply(drv.open_command(done), output={"from": done})
        assert drv.event_types(decision) == ["step_succeeded", "step_started"]
        assert drv.sent(decision) == [("action", nxt)]
    last = drv.reply(drv.open_command("d"))
    assert drv.event_types(last) == ["step_succeeded", "saga_completed"]
    assert last.commands == ()
    assert drv.state is not None
    assert drv.state.status is SagaStatus.COMPLETED
    assert drv.state.finished_at == drv.now
    assert drv.trace() == ["T:a", "T:b", "T:c", "T:d"]
    assert [e.seq for e in drv.events] == list(range(1, len(drv.events) + 1))
    assert next_due(drv.state) is None
    assert drv.state.outputs()["a"] == {"from": "a"}


def test_a_saga_without_dependencies_starts_every_step_at_once() -> None:
    d = SagaDefinition(name="fan", steps=tuple(make_step(n) for n in "xyz"))
    drv = Driver(d)
    assert sorted(drv.sent(drv.start())) == [("action", "x"), ("action", "y"), ("action", "z")]


# -- business failures -----------------------------------------------------------------------------


@pytest.mark.parametrize("failing", [0, 1, 2, 3])
def test_business_failure_at_each_step_compensates_the_others_in_reverse(failing: int) -> None:
    names = ["t1", "t2", "t3", "t4"]
    drv = Driver(chain(*names))
    drv.start()
    _succeed(drv, *names[:failing])
    decision = drv.reply(drv.open_command(names[failing]), "business")
    done = names[:failing]
    assert drv.state is not None
    assert drv.state.steps[names[failing]].status is StepStatus.FAILED
    if not done:
        assert drv.event_types(decision) == ["step_failed", "saga_aborted", "saga_compensated"]
    else:
        assert drv.event_types(decision) == ["step_failed", "saga_aborted", "compensation_started"]
    # Exactly one compensation at a time, last step first.
    for step in reversed(done):
        assert drv.sent() == [("compensation", step)]
        (undo,) = drv.last.commands  # type: ignore[union-attr]
        assert undo.action == f"undo-{step}"
        assert undo.payload == {"input": {"order": 7}, "output": {}}
        drv.reply(undo)
    assert drv.state.status is SagaStatus.COMPENSATED
    assert drv.trace() == [f"T:{n}" for n in done] + [f"C:{n}" for n in reversed(done)]
    compensated = [c.step for c in drv.commands if c.phase == "compensation"]
    assert names[failing] not in compensated
    assert drv.state.reason is not None
    assert names[failing] in drv.state.reason
    for later in names[failing + 1 :]:
        assert drv.state.steps[later].status is StepStatus.PENDING


def test_business_failures_are_not_retried() -> None:
    drv = Driver(chain("a", retry=RetryPolicy(max_attempts=10)))
    drv.start()
    drv.reply(drv.open_command("a"), "business")
    assert drv.state is not None
    assert drv.state.status is SagaStatus.COMPENSATED
    assert [c.attempt for c in drv.commands] == [1]


# -- technical failures and timeouts ---------------------------------------------------------------


def test_technical_failure_is_retried_after_the_backoff() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff=2, jitter=0.5)
    drv = Driver(chain("a", "b", retry=policy))
    drv.start()
    first = drv.open_command("a")
    drv.now = T0 + 1
    failed = drv.reply(first, "technical")
    assert drv.event_types(failed) == ["step_retry_scheduled"]
    assert failed.commands == ()
    (retry,) = failed.events
    expected = T0 + 1 + policy.backoff(1, "saga-1/a/action")
    assert retry.retry_at == expected  # type: ignore[attr-defined]
    assert retry.error.type == "ConnectionError"  # type: ignore[attr-defined]
    assert drv.state is not None
    assert drv.state.steps["a"].status is StepStatus.RETRYING
    assert next_due(drv.state) == expected

    early = drv.tick(expected - 0.001)
    assert early.ignored == "nothing due"
    assert early.events == ()
    assert early.commands == ()

    due = drv.tick(expected)
    assert drv.event_types(due) == ["step_started"]
    (second,) = due.commands
    assert (second.step, second.attempt) == ("a", 2)
    assert second.idempotency_key == first.idempotency_key == "saga-1/a/action"
    assert second.message_id != first.message_id
    assert second.deadline_at == expected + 30

    drv.reply(second)
    _succeed(drv, "b")
    assert drv.state.status is SagaStatus.COMPLETED
    assert drv.state.steps["a"].attempt == 2


def test_retries_back_off_longer_each_time_until_exhausted() -> None:
    policy = RetryPolicy(max_attempts=4, initial_backoff=1, multiplier=3, jitter=0)
    drv = Driver(chain("a", retry=policy))
    drv.start()
    gaps = []
    for _ in range(3):
        failed_at = drv.now
        drv.reply(drv.open_command("a"), "technical")
        assert drv.state is not None
        due = next_due(drv.state)
        assert due is not None
        gaps.append(due - failed_at)
        drv.tick(due)
    assert gaps == [1, 3, 9]
    last = drv.reply(drv.open_command("a"), "technical")
    assert drv.event_types(last) == ["step_failed", "saga_aborted", "saga_compensated"]
    assert [c.attempt for c in drv.commands] == [1, 2, 3, 4]


def test_retry_on_limits_which_errors_are_retried() -> None:
    drv = Driver(chain("a", retry=RetryPolicy(max_attempts=5, retry_on=("Timeout",))))
    drv.start()
    decision = drv.reply(drv.open_command("a"), "technical")  # a ConnectionError
    assert drv.event_types(decision)[0] == "step_failed"


def test_timeout_then_retry() -> None:
    drv = Driver(chain("a", "b", retry=NO_JITTER, timeout=5))
    drv.start()
    first = drv.open_command("a")
    assert drv.state is not None
    assert next_due(drv.state) == T0 + 5
    assert drv.tick(T0 + 4.999).ignored == "nothing due"
    timed_out = drv.tick(T0 + 5)
    assert drv.event_types(timed_out) == ["step_retry_scheduled"]
    (event,) = timed_out.events
    assert event.error.type == "Timeout"  # type: ignore[attr-defined]
    assert event.retry_at == T0 + 5 + 1  # type: ignore[attr-defined]
    again = drv.tick(T0 + 6)
    (second,) = again.commands
    assert second.attempt == 2
    assert second.deadline_at == T0 + 6 + 5
    # The first attempt's late reply is stale: the second attempt is the one that counts.
    late = drv.reply(first)
    assert late.ignored is not None
    assert "stale" in late.ignored
    drv.reply(second)
    assert drv.sent() == [("action", "b")]


def test_timeouts_exhausted_leave_the_outcome_unknown_and_the_step_is_compensated() -> None:
    drv = Driver(chain("a", "b", "c", retry=NO_JITTER, timeout=5))
    drv.start()
    _succeed(drv, "a")
    for attempt in (1, 2, 3):
        assert drv.open_command("b").attempt == attempt
        drv.tick_due()  # the deadline passes
        if attempt < 3:
            drv.tick_due()  # the retry is due
    decision = drv.last
    assert decision is not None
    assert drv.event_types(decision) == ["step_timed_out", "saga_aborted", "compensation_started"]
    assert drv.state is not None
    assert drv.state.steps["b"].status is StepStatus.COMPENSATING
    assert drv.sent() == [("compensation", "b")]
    (undo,) = decision.commands
    assert undo.payload == {"input": {"order": 7}, "output": None}
    drv.reply(undo)
    assert drv.sent() == [("compensation", "a")]
    drv.reply(drv.open_command("a", "compensation"))
    assert drv.state.status is SagaStatus.COMPENSATED
    assert drv.trace() == ["T:a", "C:b", "C:a"]
    assert drv.state.steps["c"].status is StepStatus.PENDING


def test_output_that_fails_its_model_is_a_technical_failure() -> None:
    class Charge(BaseModel):
        charge_id: str

    d = SagaDefinition(name="s", steps=(make_step("a", output_model=Charge, retry=NO_JITTER),))
    drv = Driver(d)
    drv.start()
    decision = drv.reply(drv.open_command("a"), output={"wrong": 1})
    assert drv.event_types(decision) == ["step_retry_scheduled"]
    assert decision.events[0].error.type == "OutputInvalid"  # type: ignore[attr-defined]
    drv.tick_due()
    drv.reply(drv.open_command("a"), output={"charge_id": "c-1"})
    assert drv.state is not None
    assert drv.state.status is SagaStatus.COMPLETED


def test_input_that_cannot_be_built_fails_the_step_for_good() -> None:
    d = SagaDefinition(
        name="s",
        steps=(
            make_step("a"),
            make_step("b", after=["a"], input={"charge": "$.steps.a.output.charge_id"}),
        ),
    )
    drv = Driver(d)
    drv.start()
    decision = drv.reply(drv.open_command("a"), output={"no_charge": True})
    types = drv.event_types(decision)
    assert types[:4] == ["step_succeeded", "step_failed", "saga_aborted", "compensation_started"]
    failure = decision.events[1].error  # type: ignore[attr-defined]
    assert failure.type == "InputInvalid"
    assert failure.business
    assert "$.steps.a.output.charge_id" in failure.message
    assert [c.step for c in drv.commands if c.step == "b"] == []


def test_input_templates_feed_outputs_to_later_steps_and_compensations() -> None:
    d = SagaDefinition(
        name="flow",
        steps=(
            make_step("pay", input={"amount": "$.input.total", "who": "$.saga_id"}),
            make_step(
                "ship",
                after=["pay"],
                input={"charge": "$.steps.pay.output.id", "items": ["$.input.items.0", 7]},
            ),
        ),
    )
    drv = Driver(d, saga_id="s1")
    drv.start({"total": 12, "items": ["pasta"]})
    pay = drv.open_command("pay")
    assert pay.payload == {"amount": 12, "who": "s1"}
    drv.reply(pay, output={"id": "ch-1"})
    ship = drv.open_command("ship")
    assert ship.payload == {"charge": "ch-1", "items": ["pasta", 7]}
    drv.reply(ship, "business")
    refund = drv.open_command("pay", "compensation")
    assert refund.payload == {"input": {"amount": 12, "who": "s1"}, "output": {"id": "ch-1"}}


# -- the pivot and the steps after it --------------------------------------------------------------


def test_pivot_failure_compensates_the_steps_before_it() -> None:
    drv = Driver(_with_pivot())
    drv.start()
    _succeed(drv, "a", "b")
    drv.reply(drv.open_command("pivot"), "business")
    assert drv.sent() == [("compensation", "b")]
    drv.reply(drv.open_command("b", "compensation"))
    drv.reply(drv.open_command("a", "compensation"))
    assert drv.state is not None
    assert drv.state.status is SagaStatus.COMPENSATED
    assert drv.trace() == ["T:a", "T:b", "C:b", "C:a"]
    assert drv.state.steps["pivot"].status is StepStatus.FAILED
    assert drv.state.steps["r"].status is StepStatus.PENDING


def test_pivot_waits_for_every_compensatable_step() -> None:
    d = SagaDefinition(
        name="s",
        steps=(make_step("a"), make_step("side"), make_step("pivot", kind=P, after=["a"])),
    )
    drv = Driver(d)
    drv.start()
    decision = drv.reply(drv.open_command("a"))
    assert decision.commands == ()  # 'side' has not finished; the pivot waits for it
    decision = drv.reply(drv.open_command("side"))
    assert drv.sent(decision) == [("action", "pivot")]


def test_pivot_timeout_exhausted_makes_the_saga_stuck_not_compensated() -> None:
    drv = Driver(_with_pivot())
    drv.start()
    _succeed(drv, "a", "b")
    for _ in range(5):
        drv.tick_due()
        assert drv.state is not None
        if drv.state.status is SagaStatus.STUCK:
            break
    assert drv.state is not None
    assert drv.state.status is SagaStatus.STUCK
    assert drv.state.steps["pivot"].status is StepStatus.STUCK
    assert drv.state.steps["pivot"].stuck_phase == "action"
    assert not [c for c in drv.commands if c.phase == "compensation"]
    assert len(drv.alerts) == 1
    assert drv.alerts[0].steps == ["pivot"]
    # The operator finds the order was accepted and resolves it: the saga goes forward.
    drv.resolve("accepted by phone")
    assert drv.sent() == [("action", "r")]
    drv.reply(drv.open_command("r"))
    assert drv.state.status is SagaStatus.COMPLETED


def test_retriable_step_after_the_pivot_is_retried_then_stuck_with_one_alert() -> None:
    drv = Driver(_with_pivot(retry=NO_JITTER))
    drv.start()
    _succeed(drv, "a", "b", "pivot")
    drv.reply(drv.open_command("r"), "technical")
    assert drv.state is not None
    assert drv.state.steps["r"].status is StepStatus.RETRYING
    drv.tick_due()
    drv.reply(drv.open_command("r"), "technical")
    drv.tick_due()
    last = drv.reply(drv.open_command("r"), "technical")
    assert drv.event_types(last) == ["step_stuck", "saga_stuck"]
    assert drv.state.status is SagaStatus.STUCK
    assert [c.attempt for c in drv.commands if c.step == "r"] == [1, 2, 3]
    (alert,) = drv.alerts
    assert alert.steps == ["r"]
    assert alert.saga_id == "saga-1"
    assert alert.saga_name == "order"
    assert "saga retry" in alert.reason
    assert not [c for c in drv.commands if c.phase == "compensation"]
    # Ticking a stuck saga does nothing and raises no second alert.
    assert drv.tick(drv.now + 3600).ignored == "nothing due"
    assert len(drv.alerts) == 1


def test_business_failure_after_the_pivot_makes_the_step_stuck() -> None:
    drv = Driver(_with_pivot())
    drv.start()
    _succeed(drv, "a", "b", "pivot")
    decision = drv.reply(drv.open_command("r"), "business")
    assert drv.event_types(decision) == ["step_stuck", "saga_stuck"]
    assert not [c for c in drv.commands if c.phase == "compensation"]


def test_operator_retry_reruns_a_stuck_step_with_a_new_idempotency_round() -> None:
    drv = Driver(_with_pivot(retry=NO_JITTER))
    drv.start()
    _succeed(drv, "a", "b", "pivot")
    for _ in range(2):
        drv.reply(drv.open_command("r"), "technical")
        drv.tick_due()
    drv.reply(drv.open_command("r"), "technical")
    assert drv.state is not None
    assert drv.state.status is SagaStatus.STUCK
    old_key = drv.open_command("r").idempotency_key

    resumed = drv.retry()
    assert drv.event_types(resumed) == ["saga_resumed", "step_started"]
    assert resumed.events[0].compensating is False  # type: ignore[attr-defined]
    (again,) = resumed.commands
    assert again.attempt == 4
    assert (
        again.idempotency_key == idempotency_key("saga-1", "r", "action", 3) == "saga-1/r/action/r3"
    )
    assert again.idempotency_key != old_key
    assert drv.state.status is SagaStatus.RUNNING
    # A fresh budget: it may fail twice more before it is stuck again.
    drv.reply(again, "technical")
    assert drv.state.steps["r"].status is StepStatus.RETRYING
    drv.tick_due()
    assert drv.open_command("r").idempotency_key == again.idempotency_key
    drv.reply(drv.open_command("r"))
    assert drv.state.status is SagaStatus.COMPLETED


def test_operator_retry_and_resolve_are_ignored_unless_the_saga_is_stuck() -> None:
    drv = Driver(chain("a"))
    drv.start()
    assert drv.retry().ignored == "saga 'saga-1' is running, not stuck"
    assert drv.resolve().ignored == "saga 'saga-1' is running, not stuck"


# -- compensations that fail -----------------------------------------------------------------------


def test_compensation_failing_until_exhausted_makes_the_saga_stuck() -> None:
    undo_policy = RetryPolicy(max_attempts=3, initial_backoff=1, jitter=0)
    drv = Driver(chain("a", "b", compensation_retry=undo_policy))
    drv.start()
    _succeed(drv, "a")
    drv.reply(drv.open_command("b"), "business")
    for attempt in (1, 2):
        undo = drv.open_command("a", "compensation")
        assert undo.attempt == attempt
        decision = drv.reply(undo, "technical")
        assert drv.event_types(decision) == ["compensation_retry_scheduled"]
        assert drv.state is not None
        assert drv.state.steps["a"].status is StepStatus.COMPENSATION_RETRYING
        drv.tick_due()
    last_undo = drv.open_command("a", "compensation")
    assert last_undo.attempt == 3
    decision = drv.reply(last_undo, "technical")
    assert drv.event_types(decision) == ["step_stuck", "saga_stuck"]
    assert drv.state is not None
    assert drv.state.status is SagaStatus.STUCK
    a = drv.state.steps["a"]
    assert (a.status, a.stuck_phase) == (StepStatus.STUCK, "compensation")
    (alert,) = decision.alerts
    assert alert.steps == ["a"]
    keys = {c.idempotency_key for c in drv.commands if c.phase == "compensation"}
    assert keys == {"saga-1/a/compensation"}

    # The operator retries: the compensation runs again, in a new round.
    resumed = drv.retry()
    assert drv.event_types(resumed) == ["saga_resumed", "compensation_started"]
    assert resumed.events[0].compensating is True  # type: ignore[attr-defined]
    (undo,) = resumed.commands
    assert undo.attempt == 4
    # One key across the retry: a compensation that took effect before (its reply lost) must
    # not take effect again under a new key.
    assert undo.idempotency_key == "saga-1/a/compensation"
    drv.reply(undo)
    assert drv.state.status is SagaStatus.COMPENSATED


def test_compensation_timeout_is_retried() -> None:
    drv = Driver(chain("a", "b", timeout=5))
    drv.start()
    _succeed(drv, "a")
    drv.reply(drv.open_command("b"), "business")
    timed_out = drv.tick_due()
    assert drv.event_types(timed_out) == ["compensation_retry_scheduled"]
    assert timed_out.events[0].error.type == "Timeout"  # type: ignore[attr-defined]
    again = drv.tick_due()
    assert [(c.phase, c.step, c.attempt) for c in again.commands] == [("compensation", "a", 2)]


def test_resolving_a_stuck_compensation_finishes_the_saga() -> None:
    drv = Driver(chain("a", "b", compensation_retry=RetryPolicy(max_attempts=1)))
    drv.start()
    _succeed(drv, "a")
    drv.reply(drv.open_command("b"), "business")
    drv.reply(drv.open_command("a", "compensation"), "business")
    assert drv.state is not None
    assert drv.state.status is SagaStatus.STUCK
    decision = drv.resolve("refunded by hand")
    assert drv.event_types(decision) == [
        "saga_resumed",
        "compensation_resolved",
        "saga_compensated",
    ]
    assert drv.state.steps["a"].status is StepStatus.COMPENSATED


# -- parallel branches -----------------------------------------------------------------------------


def _diamond() -> SagaDefinition:
    return SagaDefinition(
        name="diamond",
        steps=(
            make_step("root"),
            make_step("left", after=["root"]),
            make_step("right", after=["root"]),
            make_step("join", after=["left", "right"]),
        ),
    )


def test_parallel_branches_start_together_and_compensate_concurrently() -> None:
    drv = Driver(_diamond())
    drv.start()
    fork = drv.reply(drv.open_command("root"))
    assert sorted(drv.sent(fork)) == [("action", "left"), ("action", "right")]
    _succeed(drv, "left", "right")
    failed = drv.reply(drv.open_command("join"), "business")
    assert sorted(drv.sent(failed)) == [("compensation", "left"), ("compensation", "right")]
    # root waits for both branches to be undone.
    first = drv.reply(drv.open_command("right", "compensation"))
    assert first.commands == ()
    second = drv.reply(drv.open_command("left", "compensation"))
    assert drv.sent(second) == [("compensation", "root")]
    drv.reply(drv.open_command("root", "compensation"))
    assert drv.state is not None
    assert drv.state.status is SagaStatus.COMPENSATED
    assert drv.trace()[-1] == "C:root"


def test_a_branch_in_flight_when_the_other_fails_is_compensated_after_it_reports() -> None:
    drv = Driver(_diamond())
    drv.start()
    _succeed(drv, "root")
    aborted = drv.reply(drv.open_command("left"), "business")
    assert drv.event_types(aborted) == ["step_failed", "saga_aborted"]
    assert aborted.commands == ()  # right is in flight: root cannot be undone yet
    reported = drv.reply(drv.open_command("right"))
    assert drv.sent(reported) == [("compensation", "right")]
    drv.reply(drv.open_command("right", "compensation"))
    assert drv.sent() == [("compensation", "root")]
    drv.reply(drv.open_command("root", "compensation"))
    assert drv.state is not None
    assert drv.state.status is SagaStatus.COMPENSATED
    assert drv.state.steps["join"].status is StepStatus.PENDING


def test_a_branch_retrying_when_the_other_fails_is_abandoned() -> None:
    drv = Driver(_diamond())
    drv.start()
    _succeed(drv, "root")
    drv.reply(drv.open_command("right"), "technical")
    decision = drv.reply(drv.open_command("left"), "business")
    assert drv.event_types(decision) == [
        "step_failed",
        "saga_aborted",
        "step_failed",
        "compensation_started",
    ]
    assert decision.events[2].error.type == "Abandoned"  # type: ignore[attr-defined]
    assert drv.sent(decision) == [("compensation", "root")]


# -- the four dependency types ---------------------------------------------------------------------


def test_start_to_start_starts_the_successor_in_the_same_decision() -> None:
    d = SagaDefinition(name="ss", steps=(make_step("a"), make_step("b", after=["a:ss"])))
    drv = Driver(d)
    first = drv.start()
    assert drv.sent(first) == [("action", "a"), ("action", "b")]
    drv.reply(drv.open_command("b"))
    assert drv.state is not None
    assert drv.state.status is SagaStatus.RUNNING
    drv.reply(drv.open_command("a"))
    assert drv.state.status is SagaStatus.COMPLETED


def test_start_to_start_waits_for_the_predecessor_to_start() -> None:
    d = SagaDefinition(
        name="ss",
        steps=(make_step("gate"), make_step("a", after=["gate"]), make_step("b", after=["a:ss"])),
    )
    drv = Driver(d)
    assert drv.sent(drv.start()) == [("action", "gate")]
    assert drv.sent(drv.reply(drv.open_command("gate"))) == [("action", "a"), ("action", "b")]


def test_finish_to_finish_holds_the_successor_unfinished() -> None:
    d = SagaDefinition(
        name="ff",
        steps=(
            make_step("a"),
            make_step("b", after=["a:ff"]),
            make_step("c", after=["b"]),
        ),
    )
    drv = Driver(d)
    assert sorted(drv.sent(drv.start())) == [("action", "a"), ("action", "b")]
    early = drv.reply(drv.open_command("b"))
    assert drv.event_types(early) == ["step_succeeded"]
    assert early.commands == ()  # b succeeded, but is not finished before a: c waits
    assert drv.state is not None
    assert drv.state.steps["b"].status is StepStatus.SUCCEEDED
    assert drv.state.status is SagaStatus.RUNNING
    done = drv.reply(drv.open_command("a"))
    assert drv.sent(done) == [("action", "c")]
    drv.reply(drv.open_command("c"))
    assert drv.state.status is SagaStatus.COMPLETED


def test_finish_to_finish_alone_does_not_complete_the_saga_early() -> None:
    d = SagaDefinition(
        name="ff",
        steps=(make_step("gate"), make_step("a", after=["gate"]), make_step("b", after=["a:ff"])),
    )
    drv = Driver(d)
    drv.start()
    drv.reply(drv.open_command("b"))
    drv.reply(drv.open_command("gate"))
    assert drv.state is not None
    assert drv.state.status is SagaStatus.RUNNING
    drv.reply(drv.open_command("a"))
    assert drv.state.status is SagaStatus.COMPLETED


def test_finish_to_finish_failure_of_the_predecessor_compensates_the_successor() -> None:
    d = SagaDefinition(name="ff", steps=(make_step("a"), make_step("b", after=["a:ff"])))
    drv = Driver(d)
    drv.start()
    drv.reply(drv.open_command("b"))
    decision = drv.reply(drv.open_command("a"), "business")
    assert drv.sent(decision) == [("compensation", "b")]
    drv.reply(drv.open_command("b", "compensation"))
    assert drv.state is not None
    assert drv.state.status is SagaStatus.COMPENSATED
    assert drv.trace() == ["T:b", "C:b"]


def test_start_to_finish_holds_the_successor_until_the_predecessor_starts() -> None:
    d = SagaDefinition(
        name="sf",
        steps=(
            make_step("gate"),
            make_step("a", after=["gate"]),
            make_step("b", after=["a:sf"]),
            make_step("c", after=["b"]),
        ),
    )
    drv = Driver(d)
    assert sorted(drv.sent(drv.start())) == [("action", "b"), ("action", "gate")]
    early = drv.reply(drv.open_command("b"))
    assert early.commands == ()  # a has not started, so b is not finished: c waits
    opened = drv.reply(drv.open_command("gate"))
    assert sorted(drv.sent(opened)) == [("action", "a"), ("action", "c")]  # a started: b finished
    _succeed(drv, "a", "c")
    assert drv.state is not None
    assert drv.state.status is SagaStatus.COMPLETED


def test_finish_to_start_is_the_default() -> None:
    d = SagaDefinition(name="fs", steps=(make_step("a"), make_step("b", after=["a:fs"])))
    drv = Driver(d)
    assert drv.sent(drv.start()) == [("action", "a")]
    assert drv.sent(drv.reply(drv.open_command("a"))) == [("action", "b")]


# -- cancel ----------------------------------------------------------------------------------------


def test_cancel_before_the_pivot_compensates() -> None:
    drv = Driver(_with_pivot())
    drv.start()
    _succeed(drv, "a")
    decision = drv.cancel("the customer left")
    assert drv.event_types(decision) == ["saga_aborted"]
    assert decision.commands == ()  # b is in flight
    assert drv.state is not None
    assert drv.state.reason == "cancelled: the customer left"
    drv.reply(drv.open_command("b"))
    assert drv.sent() == [("compensation", "b")]
    drv.reply(drv.open_command("b", "compensation"))
    drv.reply(drv.open_command("a", "compensation"))
    assert drv.state.status is SagaStatus.COMPENSATED
    assert drv.state.steps["pivot"].status is StepStatus.PENDING
    assert drv.trace() == ["T:a", "T:b", "C:b", "C:a"]


def test_cancel_after_the_pivot_started_is_rejected_and_the_saga_goes_on() -> None:
    drv = Driver(_with_pivot())
    drv.start()
    _succeed(drv, "a", "b")
    decision = drv.cancel()
    assert drv.event_types(decision) == ["cancel_rejected"]
    assert "pivot" in decision.events[0].reason  # type: ignore[attr-defined]
    assert decision.commands == ()
    assert drv.state is not None
    assert drv.state.status is SagaStatus.RUNNING
    _succeed(drv, "pivot", "r")
    assert drv.state.status is SagaStatus.COMPLETED
    assert not [c for c in drv.commands if c.phase == "compensation"]


@pytest.mark.parametrize("ending", ["completed", "compensated"])
def test_cancel_of_a_finished_saga_is_rejected(ending: str) -> None:
    drv = Driver(chain("a"))
    drv.start()
    drv.reply(drv.open_command("a"), "ok" if ending == "completed" else "business")
    decision = drv.cancel()
    assert drv.event_types(decision) == ["cancel_rejected"]
    assert decision.events[0].reason == f"the saga is {ending}"  # type: ignore[attr-defined]


# -- inputs that do not fit: rejected; inputs that change nothing: ignored ------------------------


def _running() -> Driver:
    drv = Driver(_with_pivot())
    drv.start()
    return drv


def test_reply_from_the_wrong_service_is_rejected() -> None:
    drv = _running()
    decision = drv.reply(drv.open_command("a"), service="svc-b")
    assert decision.rejected == (
        "saga 'saga-1', step 'a': reply from service 'svc-b', step belongs to 'svc-a'"
    )
    assert decision.events == ()
    assert decision.state == drv.state


def test_reply_for_an_unknown_step_is_rejected() -> None:
    drv = _running()
    ghost = reply_to(drv.open_command("a")).model_copy(update={"step": "ghost"})
    assert drv.send(ghost).rejected == "saga 'saga-1', step 'ghost': saga 'order' has no such step"


def test_compensation_reply_for_a_step_without_compensation_is_rejected() -> None:
    drv = _running()
    fake = Reply(
        message_id="x",
        saga_id="saga-1",
        step="pivot",
        phase="compensation",
        attempt=1,
        service="svc-pivot",
        ok=True,
        output={},
        at=1,
    )
    assert "has no compensation" in (drv.send(fake).rejected or "")


@pytest.mark.parametrize(
    "fields",
    [
        {"ok": True, "error": ErrorInfo(type="X", message="y")},
        {"ok": False, "error": None},
    ],
)
def test_reply_with_ok_and_error_at_odds_is_rejected(fields: dict[str, object]) -> None:
    drv = _running()
    odd = reply_to(drv.open_command("a")).model_copy(update=fields)
    assert "error exactly when it is not ok" in (drv.send(odd).rejected or "")


def test_inputs_for_a_saga_that_has_not_started_are_rejected() -> None:
    drv = Driver(chain("a"))
    assert drv.tick().rejected == "no saga with id 'saga-1'"
    assert drv.cancel().rejected == "no saga with id 'saga-1'"
    assert drv.state is None


def test_start_without_a_definition_is_recorded_as_a_rejected_saga() -> None:
    # Not a dead letter: the start is answered. The saga is recorded as rejected, with the
    # reason, so that status and wait report it instead of "not started" for ever.
    start = StartSaga(message_id="m", saga_id="s", saga_name="nope", input={"a": 1}, at=1)
    decision = decide(None, None, start, 1.0)
    assert (decision.rejected, decision.ignored, decision.commands) == (None, None, ())
    (event,) = decision.events
    assert isinstance(event, SagaRejected)
    assert (event.seq, event.name, event.input, event.message_id) == (1, "nope", {"a": 1}, "m")
    assert (event.version, event.digest) == (None, None)
    assert event.reason == "no saga definition named 'nope'"
    assert decision.state is not None
    assert decision.state.status is SagaStatus.REJECTED
    assert decision.state.reason == "no saga definition named 'nope'"
    assert decision.state.is_final


def test_start_with_invalid_input_is_recorded_as_rejected_and_can_be_started_again() -> None:
    class Order(BaseModel):
        total: int

    d = SagaDefinition(name="s", steps=(make_step("a"),), input_model=Order)
    drv = Driver(d)
    rejected = drv.start({"total": "lots"})
    assert rejected.rejected is None
    assert drv.event_types(rejected) == ["saga_rejected"]
    assert rejected.commands == ()
    (event,) = rejected.events
    assert isinstance(event, SagaRejected)
    assert (event.version, event.digest) == (1, d.digest)
    assert event.reason.startswith("saga 's': input is invalid: total")
    assert drv.state is not None
    assert drv.state.status is SagaStatus.REJECTED
    assert drv.state.reason == event.reason
    # Nothing ran, so the id can be started again with a valid request.
    started = drv.start({"total": 3})
    assert started.rejected is None
    assert drv.event_types(started) == ["saga_started", "step_started"]
    assert [e.seq for e in drv.events] == [1, 2, 3]
    assert drv.state.status is SagaStatus.RUNNING
    assert (drv.state.input, drv.state.reason) == ({"total": 3}, None)


def test_a_rejected_saga_can_be_started_once_its_definition_is_deployed() -> None:
    drv = Driver(chain("a"))
    drv.start(definition=None)
    assert drv.state is not None
    assert drv.state.status is SagaStatus.REJECTED
    assert drv.event_types(drv.start()) == ["saga_started", "step_started"]
    drv.reply(drv.open_command("a"))
    assert drv.state.status is SagaStatus.COMPLETED


def test_inputs_for_a_rejected_saga_need_no_definition() -> None:
    drv = Driver(chain("a"))
    drv.start(name="nope", definition=None)
    cancel = drv.send(
        CancelSaga(message_id="c", saga_id="saga-1", reason="never mind", at=T0), None
    )
    assert drv.event_types(cancel) == ["cancel_rejected"]
    assert cancel.events[0].reason == "the saga is rejected"  # type: ignore[attr-defined]
    retry = drv.send(RetrySaga(message_id="r", saga_id="saga-1", at=T0), None)
    assert retry.ignored == "saga 'saga-1' is rejected, not stuck"
    assert drv.send(Tick("saga-1", T0 + 999), None).ignored == "nothing due"
    reply = Reply(
        message_id="x", saga_id="saga-1", step="a", phase="action", attempt=1, service="svc-a",
        ok=True, output={}, at=T0,
    )  # fmt: skip
    assert drv.send(reply, None).rejected == (
        "saga 'saga-1' was rejected (no saga definition named 'nope'): it sent no commands"
    )
    assert drv.state is not None
    assert drv.state.status is SagaStatus.REJECTED


def test_stale_and_duplicate_replies_are_ignored() -> None:
    drv = _running()
    a = drv.open_command("a")
    drv.reply(a)
    duplicate = drv.reply(a)
    assert duplicate.ignored == "saga 'saga-1', step 'a': stale reply for attempt 1 (succeeded)"
    assert duplicate.events == ()
    assert duplicate.commands == ()
    b = drv.open_command("b")
    future = drv.send(reply_to(b).model_copy(update={"attempt": 2}))
    assert future.ignored is not None
    pending = drv.send(reply_to(b).model_copy(update={"step": "pivot", "service": "svc-pivot"}))
    assert pending.ignored == "saga 'saga-1', step 'pivot': stale reply for attempt 1 (pending)"
    undo = drv.send(reply_to(b).model_copy(update={"phase": "compensation"}))
    assert undo.ignored == "saga 'saga-1', step 'b': stale compensation reply for attempt 1"


def test_duplicate_start_keeps_the_saga_and_is_recorded() -> None:
    drv = _running()
    before = drv.state
    assert before is not None
    same = drv.start()
    assert (same.rejected, same.ignored, same.commands) == (None, None, ())
    (event,) = same.events
    assert isinstance(event, StartIgnored)
    assert (event.seq, event.message_id, event.differs) == (before.seq + 1, "start/saga-1", [])
    assert event.reason == "saga 'saga-1' has already started (running): the existing saga is kept"
    other = drv.start({"other": "input"})
    (event,) = other.events
    assert isinstance(event, StartIgnored)
    assert event.differs == ["input"]
    assert event.reason == (
        "saga 'saga-1' has already started (running) with another input: the existing saga is "
        "kept (if_exists='return')"
    )
    assert drv.state is not None
    assert drv.state.input == {"order": 7}
    assert drv.state.status is SagaStatus.RUNNING
    assert drv.state.steps == before.steps


def test_duplicate_start_under_refuse_is_refused_when_it_differs() -> None:
    drv = _running()
    refused = drv.start({"other": "input"}, if_exists="refuse")
    (event,) = refused.events
    assert isinstance(event, StartRefused)
    assert event.differs == ["input"]
    assert event.reason == (
        "saga 'saga-1' has already started (running) with another input: refused "
        "(if_exists='refuse')"
    )
    renamed = drv.start(name="other-saga", if_exists="refuse")
    (event,) = renamed.events
    assert isinstance(event, StartRefused)
    assert event.differs == ["name"]
    assert "as 'order', not 'other-saga'" in event.reason
    # The same request again is no conflict: it is kept, as under "return".
    (event,) = drv.start(if_exists="refuse").events
    assert isinstance(event, StartIgnored)
    assert event.differs == []
    assert drv.state is not None
    assert drv.state.input == {"order": 7}


@pytest.mark.parametrize("if_exists", ["return", "refuse"])
@pytest.mark.parametrize("ending", ["completed", "compensated"])
def test_duplicate_start_of_a_finished_saga_is_recorded_without_changing_it(
    if_exists: Literal["return", "refuse"], ending: str
) -> None:
    drv = Driver(chain("a"))
    drv.start()
    drv.reply(drv.open_command("a"), "ok" if ending == "completed" else "business")
    final = drv.state
    assert final is not None
    assert final.status.value == ending
    drv.now = T0 + 100
    # Even with a definition unknown to this coordinator: the existing saga answers.
    decision = drv.start({"order": 8}, name="gone", if_exists=if_exists, definition=None)
    (event,) = decision.events
    assert type(event) is (StartRefused if if_exists == "refuse" else StartIgnored)
    assert event.differs == ["name", "input"]  # type: ignore[attr-defined]
    assert decision.commands == ()
    assert drv.state is not None
    assert drv.state.status is final.status
    assert drv.state.finished_at == final.finished_at
    assert drv.state.steps == final.steps
    assert drv.state.seq == final.seq + 1


def test_the_definition_digest_is_recorded_on_the_saga() -> None:
    d = chain("a", "b")
    drv = Driver(d)
    drv.start()
    started = drv.events[0]
    assert isinstance(started, SagaStarted)
    assert started.digest == d.digest
    assert drv.state is not None
    assert drv.state.digest == d.digest


def test_tick_with_nothing_due_is_ignored() -> None:
    drv = _running()
    assert drv.tick(T0).ignored == "nothing due"
    assert decide(drv.definition, drv.state, Tick("saga-1", T0), T0).ignored == "nothing due"


# -- keys, ids and purity --------------------------------------------------------------------------


def test_idempotency_keys_are_equal_across_attempts_and_differ_by_step_and_phase() -> None:
    drv = Driver(chain("a", "b", retry=NO_JITTER, timeout=5))
    drv.start()
    for _ in range(2):
        drv.tick_due()  # timeout
        drv.tick_due()  # retry
    attempts = [c for c in drv.commands if c.step == "a"]
    assert [c.attempt for c in attempts] == [1, 2, 3]
    assert {c.idempotency_key for c in attempts} == {"saga-1/a/action"}
    assert len({c.message_id for c in attempts}) == 3
    drv.reply(attempts[-1])
    drv.reply(drv.open_command("b"), "business")
    undo = drv.open_command("a", "compensation")
    assert undo.idempotency_key == "saga-1/a/compensation"
    assert drv.open_command("b").idempotency_key == "saga-1/b/action"


def test_idempotency_key_function() -> None:
    assert idempotency_key("s", "a", "action") == "s/a/action"
    assert idempotency_key("s", "a", "compensation", 0) == "s/a/compensation"
    assert idempotency_key("s", "a", "action", 2) == "s/a/action/r2"
    assert idempotency_key("s", "a", "compensation", 2) == "s/a/compensation"  # never a round


def test_decide_is_pure() -> None:
    d = _with_pivot()
    start = StartSaga(message_id="m", saga_id="p", saga_name="order", input={"x": 1}, at=0)
    one = decide(d, None, start, 5.0)
    two = decide(d, None, start, 5.0)
    assert one == two
    assert one.state is not None
    state_before = one.state.model_copy(deep=True)
    (cmd,) = one.commands
    for message in (
        reply_to(cmd),
        reply_to(cmd, "technical"),
        reply_to(cmd, "business"),
        Tick("p", 1e12),
        CancelSaga(message_id="c", saga_id="p", at=6),
        RetrySaga(message_id="r", saga_id="p", at=6),
        ResolveSaga(message_id="r", saga_id="p", at=6),
    ):
        assert decide(d, one.state, message, 6.0) == decide(d, one.state, message, 6.0)
        assert one.state == state_before
    # Time only comes in through ``now``: the same reply at another time differs only in times.
    later = decide(d, one.state, reply_to(cmd), 60.0)
    sooner = decide(d, one.state, reply_to(cmd), 6.0)
    assert [type(e) for e in later.events] == [type(e) for e in sooner.events]
    assert [e.at for e in later.events] == [60.0] * len(later.events)


def test_next_due_is_the_earliest_timer() -> None:
    d = SagaDefinition(
        name="s",
        steps=(make_step("a", timeout=50), make_step("b", timeout=20, retry=NO_JITTER)),
    )
    drv = Driver(d)
    drv.start()
    assert drv.state is not None
    assert next_due(drv.state) == T0 + 20
    drv.now = T0 + 1
    drv.reply(drv.open_command("b"), "technical")
    assert next_due(drv.state) == T0 + 2  # b's retry, before a's deadline


# -- known bugs ------------------------------------------------------------------------------------


def test_retriable_step_whose_input_cannot_be_built_is_stuck_not_compensated() -> None:
    d = SagaDefinition(
        name="order",
        steps=(
            make_step("a"),
            make_step("pivot", kind=P, after=["a"]),
            make_step("r", kind=R, after=["pivot"], input={"ref": "$.steps.pivot.output.id"}),
        ),
    )
    drv = Driver(d)
    drv.start()
    drv.reply(drv.open_command("a"))
    decision = drv.reply(drv.open_command("pivot"), output={"no_id": 1})  # raises today
    assert not [c for c in decision.commands if c.phase == "compensation"]
    assert drv.state is not None
    assert drv.state.steps["r"].status is StepStatus.STUCK
    assert drv.state.status is SagaStatus.STUCK
    assert len(decision.alerts) == 1


def test_resolving_a_step_whose_output_is_read_later_does_not_crash() -> None:
    d = SagaDefinition(
        name="order",
        steps=(
            make_step("a"),
            make_step("pivot", kind=P, after=["a"]),
            make_step("r1", kind=R, after=["pivot"], retry=RetryPolicy(max_attempts=1)),
            make_step("r2", kind=R, after=["r1"], input={"rider": "$.steps.r1.output.rider"}),
        ),
    )
    drv = Driver(d)
    drv.start()
    _succeed(drv, "a", "pivot")
    drv.reply(drv.open_command("r1"), "technical")
    assert drv.state is not None
    assert drv.state.status is SagaStatus.STUCK
    drv.resolve("assigned a rider by phone")  # raises today
    assert not [c for c in drv.commands if c.phase == "compensation"]
    assert drv.state.status is not SagaStatus.COMPENSATING
