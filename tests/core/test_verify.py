"""`saga.core.verify`: replaying recorded histories against a changed definition."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from saga.core.decide import Decision, Input, deny
from saga.core.definition import Approval, RetryPolicy, SagaDefinition, Step, StepKind
from saga.core.messages import DecideApproval, SignalSaga, StartSaga
from saga.core.triggers import Trigger, start_for
from saga.core.verify import CANNOT_VERIFY, verify
from tests.core.support import NO_JITTER, T0, Driver, make_step

V1 = SagaDefinition(
    name="order",
    steps=(
        make_step("reserve"),
        make_step("charge", after=["reserve"]),
        make_step("ship", after=["charge"], kind=StepKind.PIVOT),
    ),
)


def _changed(**changes: object) -> SagaDefinition:
    data = V1.to_dict()
    data["version"] = 2
    data.update(changes)
    return SagaDefinition.from_dict(data)


def _steps(*extra: dict[str, object], drop: str | None = None) -> list[dict[str, object]]:
    steps = [s for s in V1.to_dict()["steps"] if s["name"] != drop]
    return [*steps, *extra]


def _in_flight() -> Driver:
    """A v1 saga: reserve succeeded, charge running."""
    drv = Driver(V1)
    drv.start()
    drv.reply(drv.inflight.pop(0))
    assert [c.step for c in drv.inflight] == ["charge"]
    return drv


def _finished() -> Driver:
    drv = Driver(V1)
    drv.start()
    while drv.inflight:
        drv.reply(drv.inflight.pop(0))
    assert drv.state is not None
    assert drv.state.status.value == "completed"
    return drv


def test_the_same_definition_replays_without_divergence() -> None:
    assert verify(V1, V1, _in_flight().events) == []
    assert verify(V1, V1, _finished().events) == []


def test_a_history_with_failures_retries_timeouts_and_compensation_replays() -> None:
    d = SagaDefinition(
        name="order",
        steps=(
            make_step("reserve", retry=NO_JITTER),
            make_step("charge", after=["reserve"], retry=NO_JITTER),
        ),
    )
    drv = Driver(d)
    drv.start()
    drv.reply(drv.inflight.pop(0), "technical")  # a retry after backoff
    drv.tick_due()
    drv.reply(drv.inflight.pop(0))
    drv.inflight.pop(0)  # charge never answers: a timeout, then a retry
    drv.tick_due()
    drv.tick_due()
    drv.reply(drv.inflight.pop(0), "business")  # compensation of reserve follows
    drv.reply(drv.inflight.pop(0))
    assert drv.state is not None
    assert drv.state.status.value == "compensated"
    kinds = {e.type for e in drv.events}
    assert {"step_retry_scheduled", "compensation_started", "saga_aborted"} <= kinds
    assert verify(d, d, drv.events) == []


def test_a_cancel_is_replayed_as_a_cancel() -> None:
    drv = _in_flight()
    drv.cancel()
    drv.reply(drv.inflight.pop(0))  # charge's late success, then both compensate
    assert verify(V1, V1, drv.events) == []
    # Without a pivot in the new definition the cancel is decided the same.
    assert verify(V1, _changed(description="no change"), drv.events) == []


def test_a_new_step_before_a_pending_one_is_caught() -> None:
    new = _changed(
        steps=[
            *_steps(drop="ship"),
            {
                "name": "check",
                "service": "svc-check",
                "action": "do-check",
                "compensation": "undo-check",
                "depends_on": ["charge"],
            },
            {
                "name": "ship",
                "service": "svc-ship",
                "action": "do-ship",
                "kind": "pivot",
                "depends_on": ["check"],
            },
        ]
    )
    found = verify(V1, new, _in_flight().events)
    assert found, "the next decision starts check instead of ship"
    assert {d.step for d in found} & {"check", "ship"}
    assert all(d.saga_id == "saga-1" for d in found)


def test_a_removed_pending_step_is_caught() -> None:
    new = _changed(steps=_steps(drop="ship"))
    found = verify(V1, new, _in_flight().events)
    assert any(d.step == "ship" and "no such step" in d.got for d in found)


def test_a_changed_dependency_is_caught_in_the_history() -> None:
    # charge used to wait for reserve; now both would have started at once.
    steps = _steps()
    steps[1] = {**steps[1], "depends_on": []}
    found = verify(V1, _changed(steps=steps), _in_flight().events)
    assert [(d.seq, d.step) for d in found][:1] == [(1, "charge")]
    assert "command action do-charge" in found[0].got
    assert found[0].expected == "nothing"


def test_a_new_step_after_everything_passes_for_a_saga_in_flight() -> None:
    new = _changed(
        steps=_steps(
            {
                "name": "notify",
                "service": "svc-notify",
                "action": "do-notify",
                "kind": "retriable",
                "depends_on": ["ship"],
            }
        )
    )
    assert verify(V1, new, _in_flight().events) == []


def test_a_changed_description_and_a_retry_count_of_a_finished_step_pass() -> None:
    steps = _steps()
    steps[0] = {**steps[0], "retry": RetryPolicy(max_attempts=7).model_dump(mode="json")}
    new = _changed(description="reserve is retried more", steps=steps)
    assert new.digest != V1.digest
    assert verify(V1, new, _in_flight().events) == []


def test_a_removed_finished_step_that_would_be_compensated_is_caught() -> None:
    steps = [{**s, "depends_on": []} if s["name"] == "charge" else s for s in _steps()]
    new = _changed(steps=[s for s in steps if s["name"] != "reserve"])
    found = verify(V1, new, _in_flight().events)
    assert any(d.step == "reserve" and "succeeded" in d.expected for d in found)


def test_a_history_the_old_definition_did_not_write_cannot_be_verified() -> None:
    drv = _in_flight()
    other = SagaDefinition(
        name="order", steps=(make_step("reserve"), make_step("charge"), make_step("ship"))
    )
    found = verify(other, V1, drv.events)
    assert found[-1].got.startswith(CANNOT_VERIFY)


def test_a_stuck_saga_retried_and_resolved_replays() -> None:
    d = SagaDefinition(
        name="order",
        steps=(
            make_step("reserve"),
            make_step("ship", after=["reserve"], kind=StepKind.PIVOT),
            make_step("mail", after=["ship"], kind=StepKind.RETRIABLE, retry=NO_JITTER),
        ),
    )
    drv = Driver(d)
    drv.start()
    drv.reply(drv.inflight.pop(0))
    drv.reply(drv.inflight.pop(0))
    for _ in range(3):  # mail fails technically until its policy is exhausted: stuck
        drv.reply(drv.inflight.pop(0), "technical")
        if drv.state is not None and drv.state.status.value != "stuck":
            drv.tick_due()
    assert drv.state is not None
    assert drv.state.status.value == "stuck"
    drv.retry()
    drv.reply(drv.inflight.pop(0), "business")  # stuck again, then resolved by hand
    drv.resolve()
    assert drv.state.status.value == "completed"
    assert {"saga_resumed", "step_resolved"} <= {e.type for e in drv.events}
    assert verify(d, d, drv.events) == []


def test_the_next_decision_of_a_saga_waiting_for_a_retry_is_compared() -> None:
    d = SagaDefinition(
        name="order",
        steps=(make_step("reserve", retry=NO_JITTER), make_step("charge", after=["reserve"])),
    )
    drv = Driver(d)
    drv.start()
    drv.reply(drv.inflight.pop(0), "technical")  # a retry of reserve is due later
    steps = d.to_dict()["steps"]
    steps[0] = {**steps[0], "action": "do-reserve-v2"}
    new = SagaDefinition.from_dict({**d.to_dict(), "version": 2, "steps": steps})
    found = verify(d, new, drv.events)
    # The recorded decisions did not send reserve's action again; the due retry would.
    assert [(x.step, x.seq) for x in found] == [("reserve", 1), ("reserve", 4)]
    assert "do-reserve-v2" in found[-1].got
    assert "do-reserve " in found[-1].expected


# -- the primitives: timers, signals, approvals, conditions, starts by triggers -------------


def _saga(*steps: Step, **fields: Any) -> SagaDefinition:
    return SagaDefinition(name="p", steps=steps, **fields)


def _edit(d: SagaDefinition, step: str | None = None, **changes: Any) -> SagaDefinition:
    """``d`` as version 2, with ``changes`` to one step (``None`` as a value: the field goes;
    no ``step``: to the saga)."""
    data = d.to_dict()
    data["version"] = 2
    target = data if step is None else next(s for s in data["steps"] if s["name"] == step)
    for key, value in changes.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    return SagaDefinition.from_dict(data)


def _without(d: SagaDefinition, step: str, **deps: list[str]) -> SagaDefinition:
    """``d`` as version 2 without ``step``; ``deps`` gives other steps new dependencies."""
    data = d.to_dict()
    data["version"] = 2
    data["steps"] = [
        {**s, "depends_on": deps.get(s["name"], s.get("depends_on", []))}
        for s in data["steps"]
        if s["name"] != step
    ]
    return SagaDefinition.from_dict(data)


def _signal(drv: Driver, name: str, data: dict[str, Any], n: int = 1) -> None:
    drv.send(
        SignalSaga(
            message_id=f"sig-{n}", saga_id=drv.saga_id, name=name, data=data, at=drv.now, by="cook"
        )
    )


def _decide(drv: Driver, step: str, approve: bool, by: str = "ann", note: str = "") -> None:
    drv.send(
        DecideApproval(
            message_id=f"dec-{len(drv.events)}",
            saga_id=drv.saga_id,
            step=step,
            approve=approve,
            note=note,
            at=drv.now,
            by=by,
        )
    )


@dataclass
class _Recorder(Driver):
    """A driver that remembers where each decision's events end."""

    ends: list[int] = field(default_factory=list)

    def send(
        self, message: Input, definition: SagaDefinition | Literal["given"] | None = "given"
    ) -> Decision:
        decision = super().send(message, definition)
        if decision.events:
            self.ends.append(len(self.events))
        return decision


def _types(drv: Driver) -> list[str]:
    return [e.type for e in drv.events]


TIMED = _saga(make_step("a"), make_step("b", after=["a"], delay=3600), deadline=7200)
WAITING = _saga(
    make_step("pay"),
    Step(name="confirm", wait="cooked", timeout=600, depends_on=("pay",)),
    make_step("ship", after=["confirm"], input={"eta": "$.steps.confirm.output.eta"}),
)
APPROVING = _saga(
    make_step("reserve"),
    Step(
        name="manager",
        approval=Approval(
            approvers=("ann",), remind_after=3600, escalate_after=7200, escalate_to=("boss",)
        ),
        timeout=86_400,
        depends_on=("reserve",),
    ),
    make_step("pay", after=["manager"]),
)
CONDITIONAL = _saga(
    make_step("risk"),
    make_step("review", after=["risk"], when="$.input.total > 100"),
    make_step("pay", after=["review"]),
)


def _timers() -> tuple[SagaDefinition, _Recorder]:
    drv = _Recorder(TIMED)
    drv.start()
    drv.reply(drv.open_command("a"))
    drv.tick(T0 + 3600)  # b's timer fires
    drv.reply(drv.open_command("b"))
    return TIMED, drv


def _deadline() -> tuple[SagaDefinition, _Recorder]:
    d = _edit(TIMED, deadline=60)
    drv = _Recorder(d)
    drv.start()
    drv.reply(drv.open_command("a"))
    drv.tick(T0 + 60)  # the deadline passes while b waits for its timer
    drv.reply(drv.open_command("a", "compensation"))
    return d, drv


def _signals() -> tuple[SagaDefinition, _Recorder]:
    drv = _Recorder(WAITING)
    drv.start()
    drv.reply(drv.open_command("pay"))
    _signal(drv, "cooked", {"eta": 12})
    drv.reply(drv.open_command("ship"))
    _signal(drv, "cooked", {"eta": 1}, n=2)  # too late: rejected
    return WAITING, drv


def _early_signal() -> tuple[SagaDefinition, _Recorder]:
    drv = _Recorder(WAITING)
    drv.start()
    _signal(drv, "cooked", {"eta": 3})  # kept, and taken when confirm starts
    drv.reply(drv.open_command("pay"))
    return WAITING, drv


def _wait_timeout() -> tuple[SagaDefinition, _Recorder]:
    drv = _Recorder(WAITING)
    drv.start()
    drv.reply(drv.open_command("pay"))
    drv.tick(T0 + 600)
    drv.reply(drv.open_command("pay", "compensation"))
    return WAITING, drv


def _approvals() -> tuple[SagaDefinition, _Recorder]:
    drv = _Recorder(APPROVING)
    drv.start()
    drv.reply(drv.open_command("reserve"))
    drv.tick(T0 + 3600)  # a reminder
    _decide(drv, "manager", True, by="mallory")  # denied: not an approver
    drv.tick(T0 + 7200)  # the escalation
    _decide(drv, "manager", True, by="boss", note="fine: go")
    drv.reply(drv.open_command("pay"))
    return APPROVING, drv


def _rejection() -> tuple[SagaDefinition, _Recorder]:
    drv = _Recorder(APPROVING)
    drv.start()
    drv.reply(drv.open_command("reserve"))
    _decide(drv, "manager", False, by="ann (unverified)", note="too big: sorry")
    drv.reply(drv.open_command("reserve", "compensation"))
    return APPROVING, drv


def _approval_timeout() -> tuple[SagaDefinition, _Recorder]:
    drv = _Recorder(APPROVING)
    drv.start()
    drv.reply(drv.open_command("reserve"))
    drv.tick(T0 + 86_400)
    return APPROVING, drv


def _conditions() -> tuple[SagaDefinition, _Recorder]:
    drv = _Recorder(CONDITIONAL)
    drv.start({"total": 40})
    drv.reply(drv.open_command("risk"))  # review is skipped
    drv.reply(drv.open_command("pay"))
    return CONDITIONAL, drv


def _triggered() -> tuple[SagaDefinition, _Recorder]:
    trigger = Trigger(topic="orders.placed", saga_id="order-{$.event.id}")
    d = _edit(CONDITIONAL, triggers=[trigger.model_dump(mode="json")])
    drv = _Recorder(d, saga_id="order-9")
    for _ in range(2):  # a redelivery is recorded as a start ignored
        start = start_for(trigger, "p", "orders.placed", 0, 5, b'{"id": 9, "total": 400}', T0)
        assert isinstance(start, StartSaga)
        drv.send(start)
    drv.reply(drv.open_command("risk"))
    return d, drv


HISTORIES = {
    "timers": (_timers, {"step_scheduled", "saga_completed"}),
    "deadline": (_deadline, {"saga_deadline_passed", "step_skipped", "saga_compensated"}),
    "signals": (_signals, {"signal_received", "signal_rejected", "saga_completed"}),
    "early signal": (_early_signal, {"signal_received"}),
    "wait timeout": (_wait_timeout, {"step_failed", "saga_compensated"}),
    "approvals": (_approvals, {"approval_reminded", "request_denied", "saga_completed"}),
    "rejection": (_rejection, {"step_failed", "saga_compensated"}),
    "approval timeout": (_approval_timeout, {"step_failed", "compensation_started"}),
    "conditions": (_conditions, {"step_skipped", "saga_completed"}),
    "trigger": (_triggered, {"start_ignored", "step_started"}),
}


@pytest.mark.parametrize("name", HISTORIES)
def test_a_history_with_each_primitive_replays_on_its_own_definition(name: str) -> None:
    build, kinds = HISTORIES[name]
    d, drv = build()
    assert kinds <= set(_types(drv))
    assert verify(d, d, drv.events) == []
    # The history as it was after each decision replays too, and looks ahead from there
    # (through the waits, approvals and timers then in progress).
    assert len(drv.ends) > 2
    for end in drv.ends:
        assert verify(d, d, drv.events[:end]) == [], f"cut after seq {end}"


def test_a_changed_condition_that_skips_a_running_sagas_next_step_is_caught() -> None:
    drv = _Recorder(CONDITIONAL)
    drv.start({"total": 400})  # risk is out; review would run when it succeeds
    new = _edit(CONDITIONAL, "review", when="$.input.total > 1000")
    found = verify(CONDITIONAL, new, drv.events)
    review = [x for x in found if x.step == "review"]
    assert review, found
    assert review[0].seq == drv.events[-1].seq + 1  # the next decision, not the history
    assert "command action do-review" in review[0].expected
    assert "step_skipped" in review[0].got
    assert any(x.step == "pay" and "do-pay" in x.got for x in found)  # pay starts at once
    # A condition reworded but deciding the same passes.
    same = _edit(CONDITIONAL, "review", when="$.input.total >= 101")
    assert verify(CONDITIONAL, same, drv.events) == []


def test_a_changed_condition_is_caught_where_the_history_skipped_the_step() -> None:
    _, drv = _conditions()
    skipped = next(e for e in drv.events if e.type == "step_skipped")
    new = _edit(CONDITIONAL, "review", when="$.input.total > 10")
    found = verify(CONDITIONAL, new, drv.events)
    assert found
    assert {x.seq for x in found} == {skipped.seq - 1}  # where risk's reply was decided
    (review,) = [x for x in found if x.step == "review"]
    assert "step_skipped" in review.expected
    assert "do-review" in review.got


def test_a_removed_wait_step_is_caught_for_a_waiting_saga_and_in_a_history() -> None:
    new = _without(_edit(WAITING, "ship", input=None), "confirm", ship=["pay"])
    waiting = _Recorder(WAITING)
    waiting.start()
    waiting.reply(waiting.open_command("pay"))
    assert waiting.state is not None
    assert waiting.state.steps["confirm"].status.value == "running"
    found = verify(WAITING, new, waiting.events)
    assert any(x.step == "confirm" and "no such step" in x.got for x in found)
    # Its signal, when it comes, would be dead-lettered instead of taken.
    assert any(
        x.step is None and "signal_received" in x.expected and "no step waiting" in x.got
        for x in found
    )

    _, done = _signals()
    received = next(e for e in done.events if e.type == "signal_received")
    found = verify(WAITING, new, done.events)
    assert found
    assert found[0].seq <= received.seq


def test_a_renamed_signal_is_caught_before_it_arrives() -> None:
    drv = _Recorder(WAITING)
    drv.start()
    drv.reply(drv.open_command("pay"))
    found = verify(WAITING, _edit(WAITING, "confirm", wait="ready"), drv.events)
    assert {x.seq for x in found} == {drv.events[-1].seq + 1}
    assert any(
        x.step is None
        and x.expected.startswith("signal_received")
        and "no step waiting for 'cooked'" in x.got
        for x in found
    ), found
    assert any(x.step == "confirm" and x.got == "nothing" for x in found)


def test_changed_approvers_that_deny_a_recorded_decision_are_caught() -> None:
    _, drv = _approvals()
    approved = next(
        e for e in drv.events if e.type == "step_succeeded" and getattr(e, "step", "") == "manager"
    )
    new = _edit(APPROVING, "manager", approval={"approvers": ["ann"], "remind_after": 3600})
    found = verify(APPROVING, new, drv.events)
    at = [x for x in found if x.seq == approved.seq]
    assert any(x.step == "manager" and x.got == "nothing" for x in at), found
    assert any(x.step is None and x.got == "request_denied" for x in at), found


def test_changed_approvers_that_allow_a_recorded_denial_are_caught() -> None:
    _, drv = _approvals()
    denied = next(e for e in drv.events if e.type == "request_denied")
    approval = {"approvers": ["ann", "mallory"], "remind_after": 3600, "escalate_after": 7200}
    new = _edit(APPROVING, "manager", approval={**approval, "escalate_to": ["boss"]})
    found = verify(APPROVING, new, drv.events)
    assert found
    assert found[0].seq == denied.seq
    assert {x.step for x in found if x.seq == denied.seq} == {None, "manager", "pay"}


def test_a_recorded_rejection_is_replayed_with_its_approver() -> None:
    _, drv = _rejection()
    rejected = next(e for e in drv.events if e.type == "step_failed")
    # Anyone may decide: the same rejection.
    anyone = _edit(APPROVING, "manager", approval={"approvers": []})
    assert verify(APPROVING, anyone, drv.events) == []
    found = verify(
        APPROVING, _edit(APPROVING, "manager", approval={"approvers": ["bob"]}), drv.events
    )
    assert found
    assert found[0].seq == rejected.seq


def test_an_approval_in_progress_is_decided_ahead_by_each_approver() -> None:
    drv = _Recorder(APPROVING)
    drv.start()
    drv.reply(drv.open_command("reserve"))
    assert verify(APPROVING, APPROVING, drv.events) == []
    # boss may no longer decide: their approval or rejection would be denied.
    approval = {"approvers": ["ann"], "remind_after": 3600, "escalate_after": 7200}
    found = verify(APPROVING, _edit(APPROVING, "manager", approval=approval), drv.events)
    assert found
    assert all(x.seq == drv.events[-1].seq + 1 for x in found)
    assert any(x.step is None and x.got == "request_denied" for x in found)
    # The step turned into one that sends a command: no decision fits it.
    command = _edit(
        APPROVING, "manager", approval=None, service="svc-m", action="do-m", compensation="undo-m"
    )
    found = verify(APPROVING, command, drv.events)
    assert any("not an approval step" in x.got for x in found), found


def test_a_scheduled_step_is_decided_ahead_at_its_timer() -> None:
    d = _saga(make_step("a"), make_step("b", delay=3600))
    drv = _Recorder(d)
    drv.start()  # a is out (its deadline first), b waits for its timer
    assert drv.state is not None
    assert drv.state.steps["b"].status.value == "scheduled"
    assert verify(d, d, drv.events) == []
    found = verify(d, _edit(d, "b", action="do-b-v2"), drv.events)
    assert [(x.step, x.seq) for x in found] == [("b", drv.events[-1].seq + 1)]
    assert "do-b-v2" in found[0].got


def test_a_changed_delay_is_caught_where_the_step_was_scheduled() -> None:
    _, drv = _timers()
    scheduled = next(e for e in drv.events if e.type == "step_scheduled")
    found = verify(TIMED, _edit(TIMED, "b", delay=60), drv.events)
    assert found
    assert (found[0].seq, found[0].step) == (scheduled.seq - 1, "b")
    assert f"due at {T0 + 3600:g}" in found[0].expected
    assert f"due at {T0 + 60:g}" in found[0].got


def test_a_policy_denial_is_folded_without_deciding() -> None:
    drv = _Recorder(APPROVING)
    drv.start()
    drv.reply(drv.open_command("reserve"))
    assert drv.state is not None
    request = DecideApproval(
        message_id="dec-x", saga_id="saga-1", step="manager", approve=True, at=drv.now, by="ann"
    )
    decision = deny(drv.state, request, "ann", "the policy says no", drv.now)
    drv.state = decision.state
    drv.events.extend(decision.events)
    assert drv.events[-1].type == "request_denied"
    # ann is an approver: decided by the definition, her request would have been approved
    # (the history could not be verified). The policy refused it: a record, not a decision.
    assert verify(APPROVING, APPROVING, drv.events) == []


# -- fan-out and sub-sagas -------------------------------------------------------------------

DISHES = {"order": 7, "dishes": [{"name": "carbonara"}, {"name": "pesto"}, {"name": "ragu"}]}
FANNING = _saga(
    make_step("pay"),
    make_step(
        "cook",
        after=["pay"],
        for_each="$.input.dishes",
        max_parallel=2,
        retry=NO_JITTER,
        input={"dish": "$.item.name", "order": "$.input.order"},
    ),
    make_step("ship", after=["cook"], input={"cooked": "$.steps.cook.output.items"}),
)


def _fan_out() -> tuple[SagaDefinition, _Recorder]:
    drv = _Recorder(FANNING)
    drv.start(DISHES)
    drv.reply(drv.open_command("pay"))
    drv.reply(drv.open_command("cook[1]"), "technical")  # item 1 is retried by itself
    drv.reply(drv.open_command("cook[0]"), output={"pan": 1})  # item 2 starts
    drv.tick_due()
    drv.reply(drv.open_command("cook[2]"), output={"pan": 3})
    drv.reply(drv.open_command("cook[1]"), output={"pan": 2})
    drv.reply(drv.open_command("ship"))
    return FANNING, drv


def _fan_out_failing() -> tuple[SagaDefinition, _Recorder]:
    drv = _Recorder(_edit(FANNING, "cook", max_parallel=3))
    drv.start(DISHES)
    drv.reply(drv.open_command("pay"))
    drv.reply(drv.open_command("cook[0]"))
    drv.reply(drv.open_command("cook[1]"), "business")
    drv.reply(drv.open_command("cook[2]"))  # late: it is compensated too
    for step in ("cook[0]", "cook[2]", "pay"):
        drv.reply(drv.open_command(step, "compensation"))
    return drv.definition, drv


HOTEL = SagaDefinition(name="hotel", steps=(make_step("room"), make_step("desk", after=["room"])))
TRIP = SagaDefinition(
    name="trip",
    steps=(
        make_step("flight"),
        Step(name="stay", saga="hotel", depends_on=("flight",), input={"city": "$.input.city"}),
        make_step("pay", after=["stay"]),
    ),
)


def _trip() -> tuple[_Recorder, _Recorder]:
    """A trip whose flight is booked and whose stay has started its hotel (the child)."""
    parent = _Recorder(TRIP, saga_id="trip-1")
    parent.start({"city": "Lyon"})
    (start,) = parent.reply(parent.open_command("flight")).requests
    child = _Recorder(HOTEL, saga_id="trip-1/stay")
    child.send(start)
    return parent, child


def _trip_completed() -> tuple[_Recorder, _Recorder]:
    parent, child = _trip()
    child.reply(child.open_command("room"))
    (reply,) = child.reply(child.open_command("desk")).replies
    parent.send(reply)
    parent.reply(parent.open_command("pay"))
    return parent, child


def _trip_compensated_by_parent() -> tuple[_Recorder, _Recorder]:
    parent, child = _trip()
    child.reply(child.open_command("room"))
    (reply,) = child.reply(child.open_command("desk")).replies
    parent.send(reply)
    (ask,) = parent.reply(parent.open_command("pay"), "business").requests
    child.send(ask)  # the completed child is compensated: desk, then room
    child.reply(child.open_command("desk", "compensation"))
    (undone,) = child.reply(child.open_command("room", "compensation")).replies
    parent.send(undone)
    parent.reply(parent.open_command("flight", "compensation"))
    return parent, child


def _trip_child_failed() -> tuple[_Recorder, _Recorder]:
    parent, child = _trip()
    (reply,) = child.reply(child.open_command("room"), "business").replies
    parent.send(reply)
    parent.reply(parent.open_command("flight", "compensation"))
    return parent, child


def _trip_child_rejected() -> tuple[_Recorder, _Recorder]:
    parent = _Recorder(TRIP, saga_id="trip-1")
    parent.start({"city": "Lyon"})
    (start,) = parent.reply(parent.open_command("flight")).requests
    child = _Recorder(HOTEL, saga_id="trip-1/stay")
    (reply,) = child.send(start, None).replies  # no definition named 'hotel' here
    parent.send(reply)
    parent.reply(parent.open_command("flight", "compensation"))
    return parent, child


TRIPS = {
    "completed": (_trip_completed, "saga_completed", "saga_completed"),
    "compensated by its parent": (
        _trip_compensated_by_parent,
        "saga_compensated",
        "saga_compensation_asked",
    ),
    "child compensated": (_trip_child_failed, "saga_compensated", "saga_compensated"),
    "child rejected": (_trip_child_rejected, "saga_compensated", "saga_rejected"),
}


@pytest.mark.parametrize("build", [_fan_out, _fan_out_failing])
def test_a_history_with_a_fan_out_replays_on_its_own_definition(
    build: Callable[[], tuple[SagaDefinition, _Recorder]],
) -> None:
    d, drv = build()
    assert {"step_expanded", "step_succeeded"} <= set(_types(drv))
    assert any(getattr(e, "step", "").startswith("cook[") for e in drv.events)
    assert verify(d, d, drv.events) == []
    assert len(drv.ends) > 4
    for end in drv.ends:  # and ahead, with the items then in flight
        assert verify(d, d, drv.events[:end]) == [], f"cut after seq {end}"


@pytest.mark.parametrize("name", TRIPS)
def test_a_history_with_a_sub_saga_replays_on_both_sides(name: str) -> None:
    build, parent_kind, child_kind = TRIPS[name]
    parent, child = build()
    assert parent_kind in _types(parent)
    assert child_kind in _types(child)
    assert any(getattr(e, "child", None) == "trip-1/stay" for e in parent.events)
    for d, drv in ((TRIP, parent), (HOTEL, child)):
        assert verify(d, d, drv.events) == [], drv.saga_id
        for end in drv.ends:
            assert verify(d, d, drv.events[:end]) == [], f"{drv.saga_id}: cut after seq {end}"


def _expanded() -> _Recorder:
    drv = _Recorder(FANNING)
    drv.start(DISHES)
    drv.reply(drv.open_command("pay"))
    assert [c.step for c in drv.last.commands] == ["cook[0]", "cook[1]"]  # type: ignore[union-attr]
    return drv


def test_a_changed_max_parallel_is_caught_for_a_saga_in_flight() -> None:
    drv = _expanded()
    expanded = next(e for e in drv.events if e.type == "step_expanded")
    found = verify(FANNING, _edit(FANNING, "cook", max_parallel=3), drv.events)
    # Where pay's reply was decided (the decision's first event is pay's success), and again
    # ahead: whatever comes next, the third item would start with the other two.
    assert found[0].seq == expanded.seq - 1
    assert {x.step for x in found} == {"cook[2]"}
    assert found[0].expected == "nothing"
    assert "command action do-cook {'dish': 'ragu', 'order': 7}" in found[0].got
    found = verify(FANNING, _edit(FANNING, "cook", max_parallel=1), drv.events)
    assert [(x.seq, x.step) for x in found][:1] == [(expanded.seq - 1, "cook[1]")]
    assert found[0].got == "nothing"


def test_an_item_in_flight_is_decided_ahead() -> None:
    drv = _expanded()
    drv.reply(drv.open_command("cook[0]"))  # cook[1] and cook[2] are out
    assert verify(FANNING, FANNING, drv.events) == []
    # An item's failure now compensates pay with another action.
    found = verify(FANNING, _edit(FANNING, "cook", compensation="undo-cook-v2"), drv.events)
    assert found
    assert all(x.seq == drv.events[-1].seq + 1 for x in found)
    assert {x.step for x in found} == {"cook[0]"}
    assert "undo-cook-v2" in found[0].got


def test_a_changed_list_reference_is_caught_for_a_saga_in_flight() -> None:
    drv = _expanded()
    expanded = next(e for e in drv.events if e.type == "step_expanded")
    found = verify(FANNING, _edit(FANNING, "cook", for_each="$.input.plates"), drv.events)
    assert found
    assert found[0].seq == expanded.seq - 1  # where pay's reply was decided
    cook = next(x for x in found if x.step == "cook")
    assert "step_expanded" in cook.expected
    assert "step_failed" in cook.got


def test_a_fan_out_turned_into_one_step_is_caught() -> None:
    drv = _expanded()
    found = verify(FANNING, _edit(FANNING, "cook", for_each=None, input=None), drv.events)
    assert any(x.step == "cook[0]" and "no such step" in x.got for x in found), found


def test_a_changed_child_saga_name_is_caught_for_a_parent_in_flight() -> None:
    parent, _ = _trip()
    started = next(e for e in parent.events if getattr(e, "child", None))
    found = verify(TRIP, _edit(TRIP, "stay", saga="inn"), parent.events)
    assert (found[0].seq, found[0].step) == (started.seq - 1, "stay")
    assert "start saga hotel as trip-1/stay (attempt 1) {'city': 'Lyon'}" in found[0].expected
    assert "start saga inn as trip-1/stay" in found[0].got
    # And ahead: the hotel that did start would answer as itself, which the new one refuses.
    ahead = [x for x in found if x.seq == parent.events[-1].seq + 1]
    assert any(x.step is None and "from service 'saga:hotel'" in x.got for x in ahead), found
    assert {x.seq for x in found} == {started.seq - 1, parent.events[-1].seq + 1}
    # Its input changed: caught the same way.
    found = verify(TRIP, _edit(TRIP, "stay", input={"town": "$.input.city"}), parent.events)
    assert [x.step for x in found] == ["stay"]
    assert "{'town': 'Lyon'}" in found[0].got


def test_a_running_sub_saga_step_is_decided_ahead_on_its_childs_replies() -> None:
    parent, _ = _trip()
    assert verify(TRIP, TRIP, parent.events) == []
    ahead = parent.events[-1].seq + 1
    # The child completes: pay starts, with its new action.
    found = verify(TRIP, _edit(TRIP, "pay", action="do-pay-v2"), parent.events)
    assert [(x.seq, x.step) for x in found] == [(ahead, "pay")]
    assert "do-pay-v2" in found[0].got
    # The child is compensated (a business failure): flight is undone, by its new action.
    found = verify(TRIP, _edit(TRIP, "flight", compensation="undo-flight-v2"), parent.events)
    assert [(x.seq, x.step) for x in found] == [(ahead, "flight")]
    assert "undo-flight-v2" in found[0].got


def test_a_parents_compensation_is_decided_ahead_for_a_running_child() -> None:
    _, child = _trip()
    child.reply(child.open_command("room"))  # desk is out
    assert verify(HOTEL, HOTEL, child.events) == []
    # desk made the pivot: the child would refuse to be compensated instead of aborting.
    pivot = _edit(HOTEL, "desk", kind="pivot", compensation=None)
    found = verify(HOTEL, pivot, child.events)
    assert found
    assert all(x.seq == child.events[-1].seq + 1 for x in found)
    (saga,) = [x for x in found if x.step is None and "saga_aborted" in x.expected]
    assert "failed PastPivot" in saga.got


def test_a_childs_recorded_compensation_is_replayed_against_its_parent_ref() -> None:
    _, child = _trip_compensated_by_parent()
    asked = next(e for e in child.events if e.type == "saga_compensation_asked")
    assert verify(HOTEL, HOTEL, child.events) == []
    # The child's compensations changed: caught where the parent asked for it.
    found = verify(HOTEL, _edit(HOTEL, "desk", compensation="undo-desk-v2"), child.events)
    assert found
    assert (found[0].seq, found[0].step) == (asked.seq, "desk")
    assert "undo-desk-v2" in found[0].got
