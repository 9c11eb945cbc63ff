"""Scenario tests of the steps that wait (saga.core.primitives), pure: timers, signals,
approvals, conditions and the saga deadline, through `decide` as the coordinator calls it.

The driver checks on every call that the decision's state is the fold of its events, so each
scenario also checks that the new events fold.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from saga.core.decide import next_due
from saga.core.definition import Approval, SagaDefinition, Step, StepKind
from saga.core.messages import DecideApproval, SignalSaga
from saga.core.state import SagaStatus, StepStatus
from saga.errors import DefinitionError
from tests.core.support import NO_JITTER, T0, Driver, make_step


def _saga(*steps: Step, **fields: Any) -> SagaDefinition:
    return SagaDefinition(name="p", steps=steps, **fields)


def _types(drv: Driver, since: int = 0) -> list[str]:
    return [e.type for e in drv.events[since:]]


def _signal(drv: Driver, name: str, data: dict[str, Any], n: int = 1) -> Any:
    return drv.send(
        SignalSaga(message_id=f"sig-{n}", saga_id=drv.saga_id, name=name, data=data, at=drv.now)
    )


def _decide(drv: Driver, step: str, approve: bool, by: str = "ann", note: str = "") -> Any:
    m = DecideApproval(
        message_id=f"dec-{len(drv.events)}",
        saga_id=drv.saga_id,
        step=step,
        approve=approve,
        note=note,
        at=drv.now,
        by=by,
    )
    return drv.send(m)


# -- timers ----------------------------------------------------------------------------------


def test_a_delayed_step_is_scheduled_then_starts_when_its_timer_fires() -> None:
    drv = Driver(_saga(make_step("a"), make_step("b", after=["a"], delay=3600)))
    drv.start()
    drv.reply(drv.open_command("a"))
    assert drv.state is not None
    assert drv.state.steps["b"].status is StepStatus.SCHEDULED
    assert next_due(drv.state) == T0 + 3600
    assert drv.tick(T0 + 3599).ignored == "nothing due"  # an early tick changes nothing
    drv.tick(T0 + 3600)
    assert drv.state.steps["b"].status is StepStatus.RUNNING
    assert drv.open_command("b").at == T0 + 3600


def test_start_at_reads_a_time_from_the_input_in_seconds_or_iso_8601() -> None:
    at = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    for value in (at.timestamp(), at.isoformat(), "2030-01-02T03:04:05"):
        drv = Driver(_saga(make_step("deliver", start_at="$.input.when")))
        drv.start({"when": value})
        assert drv.state is not None
        assert drv.state.steps["deliver"].wake_at == at.timestamp()


def test_a_start_time_in_the_past_starts_at_once_and_an_unreadable_one_fails_the_step() -> None:
    drv = Driver(_saga(make_step("deliver", start_at="$.input.when")))
    drv.start({"when": T0 - 10})
    assert drv.state is not None
    assert drv.state.steps["deliver"].status is StepStatus.RUNNING

    drv = Driver(_saga(make_step("deliver", start_at="$.input.when")))
    drv.start({"when": "next tuesday"})
    assert drv.state is not None
    ss = drv.state.steps["deliver"]
    assert ss.status is StepStatus.FAILED
    assert ss.error is not None
    assert "not an ISO-8601 time" in ss.error.message
    assert drv.state.status is SagaStatus.COMPENSATED  # nothing ran: nothing to undo


def test_a_scheduled_step_is_skipped_when_the_saga_compensates_first() -> None:
    d = _saga(make_step("a"), make_step("b", delay=600), make_step("c"))
    drv = Driver(d)
    drv.start()
    drv.reply(drv.open_command("a"))
    drv.reply(drv.open_command("c"), "business")
    assert drv.state is not None
    assert drv.state.steps["b"].status is StepStatus.SKIPPED
    drv.reply(drv.open_command("a", "compensation"))
    assert drv.state.status is SagaStatus.COMPENSATED
    assert [c.step for c in drv.commands if c.phase == "compensation"] == ["a"]


def test_the_saga_deadline_compensates_before_the_pivot() -> None:
    d = _saga(make_step("a"), make_step("p", kind=StepKind.PIVOT, after=["a"]), deadline=60)
    drv = Driver(d)
    drv.start()
    assert drv.state is not None
    assert drv.state.deadline_at == T0 + 60
    drv.now = T0 + 1
    drv.reply(drv.open_command("a"))
    # The pivot is out but its reply is late: as the pivot has started, the deadline alerts.
    drv.tick(T0 + 60)
    assert drv.state.status is SagaStatus.RUNNING
    (alert,) = drv.alerts
    assert alert.kind == "deadline"
    assert drv.state.deadline_at is None  # acted on once

    drv = Driver(_saga(make_step("a"), make_step("b", after=["a"], delay=3600), deadline=60))
    drv.start()
    drv.reply(drv.open_command("a"))
    drv.tick(T0 + 60)
    assert _types(drv)[-4:] == [
        "saga_deadline_passed",
        "saga_aborted",
        "step_skipped",
        "compensation_started",
    ]


# -- signals ---------------------------------------------------------------------------------


def test_a_wait_step_completes_with_the_signal_data() -> None:
    d = _saga(
        make_step("pay"),
        Step(name="confirm", wait="cooked", timeout=600, depends_on=("pay",)),
        make_step("ship", after=["confirm"], input={"eta": "$.steps.confirm.output.eta"}),
    )
    drv = Driver(d)
    drv.start()
    drv.reply(drv.open_command("pay"))
    assert drv.state is not None
    assert drv.state.steps["confirm"].status is StepStatus.RUNNING
    assert [c.step for c in drv.commands] == ["pay"]  # a wait step sends no command
    _signal(drv, "cooked", {"eta": 12})
    assert drv.state.steps["confirm"].output == {"eta": 12}
    assert drv.open_command("ship").payload == {"eta": 12}
    assert drv.state.signals == {}


def test_a_signal_before_its_step_waits_is_kept_and_taken_later() -> None:
    d = _saga(
        make_step("pay"), Step(name="confirm", wait="cooked", timeout=600, depends_on=("pay",))
    )
    drv = Driver(d)
    drv.start()
    _signal(drv, "cooked", {"eta": 3})
    assert drv.state is not None
    assert drv.state.signals == {"cooked": {"eta": 3}}
    drv.reply(drv.open_command("pay"))
    assert drv.state.steps["confirm"].status is StepStatus.SUCCEEDED
    assert drv.state.steps["confirm"].output == {"eta": 3}
    assert drv.state.signals == {}
    assert drv.state.status is SagaStatus.COMPLETED


def test_a_wait_step_fails_at_its_timeout_and_the_saga_compensates() -> None:
    d = _saga(
        make_step("pay"), Step(name="confirm", wait="cooked", timeout=600, depends_on=("pay",))
    )
    drv = Driver(d)
    drv.start()
    drv.reply(drv.open_command("pay"))
    drv.tick(T0 + 600)
    assert drv.state is not None
    ss = drv.state.steps["confirm"]
    assert ss.status is StepStatus.FAILED
    assert ss.error is not None
    assert ss.error.business
    assert ss.error.type == "Timeout"
    assert drv.state.status is SagaStatus.COMPENSATING
    assert drv.open_command("pay", "compensation")


def test_signals_that_cannot_be_taken_get_an_answer() -> None:
    d = _saga(Step(name="confirm", wait="cooked", timeout=600))
    drv = Driver(d)
    drv.start()
    assert _signal(drv, "burnt", {}).rejected == (
        "saga 'saga-1' (p) has no step waiting for 'burnt'"
    )
    _signal(drv, "cooked", {"n": 1}, n=1)
    assert drv.state is not None
    assert drv.state.status is SagaStatus.COMPLETED
    late = _signal(drv, "cooked", {"n": 2}, n=2)
    (event,) = late.events
    assert event.type == "signal_rejected"
    assert "the saga is completed" in event.reason  # type: ignore[attr-defined]
    # The same signal delivered twice is taken once.
    assert _signal(drv, "cooked", {"n": 1}, n=1).ignored == "request sig-1 was already answered"


def test_the_rules_refuse_two_waits_for_one_signal_and_a_waiting_pivot() -> None:
    with pytest.raises(DefinitionError) as caught:
        _saga(
            Step(name="a", wait="go", timeout=5),
            Step(name="b", wait="go", timeout=5),
            Step(name="c", wait="x", kind=StepKind.PIVOT, timeout=5),
            Step(name="d", service="s", action="do", wait="y", compensation="undo"),
        )
    text = str(caught.value)
    assert "[unique-signal] signal 'go' is already waited for by step 'a'" in text
    assert "[no-effect] a wait step cannot be the pivot" in text
    assert "[step-work] a step has exactly one of action (with service), wait, approval" in text


# -- approvals -------------------------------------------------------------------------------


def _approving(**approval: Any) -> SagaDefinition:
    return _saga(
        make_step("reserve"),
        Step(
            name="manager",
            approval=Approval(approvers=("ann",), **approval),
            timeout=86_400,
            depends_on=("reserve",),
        ),
        make_step("pay", after=["manager"]),
    )


def test_an_approval_asks_the_approvers_and_an_approval_moves_on() -> None:
    drv = Driver(_approving())
    drv.start()
    drv.reply(drv.open_command("reserve"))
    (ask,) = drv.alerts
    assert (ask.kind, ask.steps, ask.recipients) == ("approval", ["manager"], ["ann"])
    _decide(drv, "manager", True, note="fine")
    assert drv.state is not None
    assert drv.state.steps["manager"].output == {"approved": True, "by": "ann", "note": "fine"}
    assert drv.open_command("pay")


def test_a_rejection_is_a_business_failure_and_compensation_follows() -> None:
    drv = Driver(_approving())
    drv.start()
    drv.reply(drv.open_command("reserve"))
    _decide(drv, "manager", False, note="too big")
    assert drv.state is not None
    ss = drv.state.steps["manager"]
    assert ss.status is StepStatus.FAILED
    assert ss.error is not None
    assert ss.error.message == "rejected by ann: too big"
    assert drv.state.status is SagaStatus.COMPENSATING
    drv.reply(drv.open_command("reserve", "compensation"))
    assert drv.state.status is SagaStatus.COMPENSATED


def test_a_decision_by_someone_else_is_recorded_and_changes_nothing() -> None:
    drv = Driver(_approving())
    drv.start()
    drv.reply(drv.open_command("reserve"))
    _decide(drv, "manager", True, by="mallory")
    assert drv.state is not None
    assert drv.state.steps["manager"].status is StepStatus.RUNNING
    assert drv.events[-1].type == "request_denied"
    # Unsigned deployments record a claimed name with a mark; the approver list still applies.
    _decide(drv, "manager", True, by="ann (unverified)")
    assert drv.state.steps["manager"].status is StepStatus.SUCCEEDED


def test_reminders_and_an_escalation_then_the_final_timeout_rejects() -> None:
    drv = Driver(_approving(remind_after=3600, escalate_after=7200, escalate_to=("boss",)))
    drv.start()
    drv.reply(drv.open_command("reserve"))
    assert drv.state is not None
    assert next_due(drv.state) == T0 + 3600
    drv.tick(T0 + 3600)
    drv.tick(T0 + 7200)
    assert [(a.kind, a.recipients) for a in drv.alerts] == [
        ("approval", ["ann"]),
        ("reminder", ["ann"]),
        ("escalation", ["boss"]),
    ]
    assert drv.state.steps["manager"].reminders == 2
    assert drv.state.steps["manager"].wake_at is None
    # The one escalated to may decide too.
    _decide(drv, "manager", True, by="boss")
    assert drv.state.steps["manager"].status is StepStatus.SUCCEEDED

    drv = Driver(_approving(remind_after=3600))
    drv.start()
    drv.reply(drv.open_command("reserve"))
    drv.tick(T0 + 86_400)
    assert drv.state is not None
    ss = drv.state.steps["manager"]
    assert ss.status is StepStatus.FAILED
    assert ss.error is not None
    assert "counts as rejected" in ss.error.message


def test_a_decision_for_a_step_not_waiting_is_refused() -> None:
    drv = Driver(_approving())
    drv.start()
    assert _decide(drv, "manager", True).rejected == (
        "saga 'saga-1', step 'manager': not waiting for a decision (pending)"
    )
    assert _decide(drv, "reserve", True).rejected == (
        "saga 'saga-1', step 'reserve': not an approval step"
    )


# -- conditions ------------------------------------------------------------------------------


def _conditional() -> SagaDefinition:
    return _saga(
        make_step("risk"),
        make_step(
            "review",
            after=["risk"],
            when='$.input.total > 100 or $.steps.risk.output.level == "high"',
        ),
        make_step("pay", after=["review"]),
    )


def test_a_step_whose_condition_is_false_is_skipped_and_its_dependants_go_on() -> None:
    drv = Driver(_conditional())
    drv.start({"total": 40})
    drv.reply(drv.open_command("risk"), output={"level": "low"})
    assert drv.state is not None
    ss = drv.state.steps["review"]
    assert ss.status is StepStatus.SKIPPED
    assert drv.events[-2].type == "step_skipped"
    assert "does not hold (40 > 100)" in drv.events[-2].reason  # type: ignore[attr-defined]
    drv.reply(drv.open_command("pay"), "business")
    # Compensation skips the skipped step: only risk is undone.
    assert [c.step for c in drv.commands if c.phase == "compensation"] == ["risk"]


def test_a_step_whose_condition_holds_runs() -> None:
    drv = Driver(_conditional())
    drv.start({"total": 40})
    drv.reply(drv.open_command("risk"), output={"level": "high"})
    assert drv.open_command("review")


def test_the_rules_check_conditions_at_load() -> None:
    with pytest.raises(DefinitionError) as caught:
        _saga(
            make_step("a", when="$.input.total >"),
            make_step("b", when="$.steps.c.output.ok == true"),
            make_step("c"),
        )
    text = str(caught.value)
    assert "step 'a': [condition] when '$.input.total >': at 16: expected a value" in text
    assert "step 'b': [condition] reads the output of 'c' but does not depend on it" in text


# -- fan-out ---------------------------------------------------------------------------------


def _fan_out(max_parallel: int = 2, **fields: Any) -> SagaDefinition:
    return _saga(
        make_step("pay"),
        make_step(
            "cook",
            after=["pay"],
            for_each="$.input.dishes",
            max_parallel=max_parallel,
            input={"dish": "$.item.name", "order": "$.input.order"},
            **fields,
        ),
        make_step("ship", after=["cook"], input={"cooked": "$.steps.cook.output.items"}),
    )


DISHES = {"order": 7, "dishes": [{"name": "carbonara"}, {"name": "pesto"}, {"name": "ragu"}]}


def test_a_fan_out_runs_each_item_at_most_max_parallel_at_once() -> None:
    drv = Driver(_fan_out(max_parallel=2))
    drv.start(DISHES)
    drv.reply(drv.open_command("pay"))
    assert [c.step for c in drv.last.commands] == ["cook[0]", "cook[1]"]  # type: ignore[union-attr]
    first = drv.open_command("cook[0]")
    assert first.payload == {"dish": "carbonara", "order": 7}
    assert first.idempotency_key == "saga-1/cook[0]/action"
    drv.reply(first, output={"pan": 1})
    assert [c.step for c in drv.last.commands] == ["cook[2]"]  # type: ignore[union-attr]
    drv.reply(drv.open_command("cook[2]"), output={"pan": 3})
    drv.reply(drv.open_command("cook[1]"), output={"pan": 2})
    assert drv.state is not None
    assert drv.state.steps["cook"].output == {"items": [{"pan": 1}, {"pan": 2}, {"pan": 3}]}
    assert drv.open_command("ship").payload == {"cooked": [{"pan": 1}, {"pan": 2}, {"pan": 3}]}
    drv.reply(drv.open_command("ship"))
    assert drv.state.status is SagaStatus.COMPLETED


def test_when_an_item_fails_exactly_the_items_that_took_effect_are_compensated() -> None:
    drv = Driver(_fan_out(max_parallel=3))
    drv.start(DISHES)
    drv.reply(drv.open_command("pay"))
    drv.reply(drv.open_command("cook[0]"))
    drv.reply(drv.open_command("cook[1]"), "business")
    assert drv.state is not None
    assert drv.state.status is SagaStatus.COMPENSATING
    # cook[2] is still out: nothing before it is undone until it answers.
    assert [c.step for c in drv.commands if c.phase == "compensation"] == ["cook[0]"]
    drv.reply(drv.open_command("cook[2]"))
    undo = [c.step for c in drv.commands if c.phase == "compensation"]
    assert sorted(undo) == ["cook[0]", "cook[2]"]
    payload = drv.open_command("cook[2]", "compensation").payload
    assert payload["input"] == {"dish": "ragu", "order": 7}
    for step in ("cook[0]", "cook[2]"):
        drv.reply(drv.open_command(step, "compensation"))
    drv.reply(drv.open_command("pay", "compensation"))
    assert drv.state.status is SagaStatus.COMPENSATED
    assert drv.state.steps["cook[1]"].status is StepStatus.FAILED


def test_an_empty_list_succeeds_at_once_and_a_missing_one_fails_the_step() -> None:
    drv = Driver(_fan_out())
    drv.start({"order": 1, "dishes": []})
    drv.reply(drv.open_command("pay"))
    assert drv.state is not None
    assert drv.state.steps["cook"].output == {"items": []}
    assert drv.open_command("ship")

    drv = Driver(_fan_out())
    drv.start({"order": 1, "dishes": "carbonara"})
    drv.reply(drv.open_command("pay"))
    assert drv.state is not None
    error = drv.state.steps["cook"].error
    assert error is not None
    assert "expected a list" in error.message
    assert drv.state.status is SagaStatus.COMPENSATING


def test_items_are_retried_one_by_one_and_replies_for_unknown_items_are_refused() -> None:
    drv = Driver(_fan_out(max_parallel=3, retry=NO_JITTER))
    drv.start(DISHES)
    drv.reply(drv.open_command("pay"))
    drv.reply(drv.open_command("cook[1]"), "technical")
    assert drv.state is not None
    assert drv.state.steps["cook[1]"].status is StepStatus.RETRYING
    drv.tick_due()
    assert drv.open_command("cook[1]").attempt == 2
    stray = drv.open_command("cook[0]").model_copy(update={"step": "cook[9]"})
    assert drv.reply(stray).rejected == "saga 'saga-1', step 'cook[9]': saga 'p' has no such step"


def test_the_rules_check_fan_outs() -> None:
    with pytest.raises(DefinitionError) as caught:
        _saga(
            make_step("a", input={"x": "$.item"}),
            make_step("b", for_each="dishes"),
            Step(name="c", wait="go", timeout=5, for_each="$.input.xs"),
        )
    text = str(caught.value)
    assert "step 'a': [input-reference] reads $.item, which only the input of a for_each" in text
    assert "step 'b': [for-each] for_each must be one reference" in text
    assert "step 'c': [for-each] only a step that sends a command can run for each item" in text


# -- sub-sagas -------------------------------------------------------------------------------


def _parent_and_child() -> tuple[Driver, SagaDefinition]:
    child = _saga(make_step("room"), make_step("desk", kind=StepKind.PIVOT, after=["room"]))
    parent = _saga(
        make_step("flight"),
        Step(name="stay", saga="p", depends_on=("flight",), input={"city": "$.input.city"}),
    )
    return Driver(parent, saga_id="trip"), child


def test_a_sub_saga_step_sends_the_child_start_and_takes_its_reply() -> None:
    drv, child_def = _parent_and_child()
    drv.start({"city": "Lyon"})
    decision = drv.reply(drv.open_command("flight"))
    (start,) = decision.requests
    assert start.type == "start"
    assert (start.saga_id, start.saga_name, start.input) == ("trip/stay", "p", {"city": "Lyon"})
    assert start.parent is not None  # type: ignore[union-attr]
    assert drv.state is not None
    assert drv.state.steps["stay"].child == "trip/stay"
    # The child runs to its end; its last decision replies to the parent.
    child = Driver(child_def, saga_id="trip/stay")
    first = child.send(start)
    assert first.replies == ()
    child.reply(child.open_command("room"))
    done = child.reply(child.open_command("desk"))
    (reply,) = done.replies
    assert (reply.saga_id, reply.step, reply.ok, reply.service) == ("trip", "stay", True, "saga:p")
    drv.send(reply)
    assert drv.state.status is SagaStatus.COMPLETED
    assert drv.state.steps["stay"].output == {
        "saga_id": "trip/stay",
        "outputs": {"room": {}, "desk": {}},
    }


def test_a_child_past_its_pivot_refuses_to_be_compensated() -> None:
    child_def = _saga(make_step("room"), make_step("desk", kind=StepKind.PIVOT, after=["room"]))
    parent = _saga(
        Step(name="stay", saga="p", input={"city": "$.input.city"}),
        make_step("pay", after=["stay"]),
    )
    drv = Driver(parent, saga_id="trip")
    (start,) = drv.start({"city": "Lyon"}).requests
    child = Driver(child_def, saga_id="trip/stay")
    child.send(start)
    child.reply(child.open_command("room"))
    (reply,) = child.reply(child.open_command("desk")).replies
    drv.send(reply)
    # A later step fails: the parent compensates the stay, which asks the child, which refuses
    # (its pivot ran), so the parent's compensation of the step fails as any would.
    (ask,) = drv.reply(drv.open_command("pay"), "business").requests
    assert ask.type == "compensate"
    (refusal,) = child.send(ask).replies
    assert refusal.phase == "compensation"
    assert refusal.error is not None
    assert refusal.error.type == "PastPivot"
    assert child.state is not None
    assert child.state.status is SagaStatus.COMPLETED
    drv.send(refusal)
    assert drv.state is not None
    assert drv.state.steps["stay"].status is StepStatus.STUCK


def test_a_rejected_child_fails_its_step_and_a_compensation_of_it_is_answered_at_once() -> None:
    drv, _ = _parent_and_child()
    drv.start({"city": "Lyon"})
    (start,) = drv.reply(drv.open_command("flight")).requests
    orphan = Driver(_saga(make_step("x")), saga_id="trip/stay")
    rejected = orphan.send(start, None)  # no definition named 'p' here
    (reply,) = rejected.replies
    assert reply.error is not None
    assert reply.error.type == "SagaRejected"
    drv.send(reply)
    assert drv.state is not None
    assert drv.state.steps["stay"].status is StepStatus.FAILED  # not compensated: nothing ran


def test_compensation_waits_for_steps_after_a_wait_or_a_skipped_step() -> None:
    # restaurant -> kitchen (a wait: nothing to undo) -> dishes: the restaurant is undone only
    # after the dishes are, whatever sits between them; likewise through a skipped step.
    for middle in (
        Step(name="kitchen", wait="ok", timeout=60, depends_on=("restaurant",)),
        make_step("kitchen", after=["restaurant"], when="$.input.never == true"),
    ):
        d = _saga(
            make_step("restaurant"),
            middle,
            make_step("dishes", after=["kitchen"]),
            make_step("cook", kind=StepKind.PIVOT, after=["dishes"]),
        )
        drv = Driver(d)
        drv.start({"never": False})
        drv.reply(drv.open_command("restaurant"))
        if middle.wait is not None:
            _signal(drv, "ok", {})
        drv.reply(drv.open_command("dishes"))
        drv.reply(drv.open_command("cook"), "business")
        assert [c.step for c in drv.commands if c.phase == "compensation"] == ["dishes"]
        drv.reply(drv.open_command("dishes", "compensation"))
        assert [c.step for c in drv.commands if c.phase == "compensation"] == [
            "dishes",
            "restaurant",
        ]


def test_a_skipped_pivot_is_crossed_all_the_same_for_the_deadline() -> None:
    d = _saga(
        make_step("a"),
        make_step("p", kind=StepKind.PIVOT, after=["a"], when="$.input.k > 0"),
        make_step("r", kind=StepKind.RETRIABLE, after=["p"]),
        deadline=60,
    )
    drv = Driver(d)
    drv.start({"k": 0})
    drv.reply(drv.open_command("a"))
    assert drv.state is not None
    assert drv.state.steps["p"].status is StepStatus.SKIPPED
    assert drv.open_command("r")  # past the (skipped) pivot: only forward from here
    drv.tick(T0 + 60)
    assert drv.state.status is SagaStatus.RUNNING
    assert [a.kind for a in drv.alerts] == ["deadline"]
