"""decide, scenario by scenario, through the simulator."""

from __future__ import annotations

import pytest

from saga.core.decide import Tick, decide
from saga.core.definition import RetryPolicy, SagaDefinition, Step
from saga.core.messages import (
    CancelRejected,
    Reply,
    ResolveSaga,
    RetrySaga,
    StartSaga,
    StepRetryScheduled,
)
from saga.core.state import SagaStatus, StepStatus
from tests.core.sim import Sim

FAST = RetryPolicy(max_attempts=3, initial_backoff=1, jitter=0)


def chain(n: int = 4, **kw: object) -> SagaDefinition:
    steps = [
        Step(
            name=f"t{i}",
            service=f"s{i}",
            action="do",
            compensation="undo",
            retry=FAST,
            timeout=10,
            depends_on=[f"t{i - 1}"] if i > 1 else [],
            **kw,
        )  # type: ignore[arg-type]
        for i in range(1, n + 1)
    ]
    return SagaDefinition(name="chain", steps=steps)


def with_pivot() -> SagaDefinition:
    return SagaDefinition(
        name="p",
        steps=[
            Step(name="a", service="sa", action="do", compensation="undo", retry=FAST),
            Step(name="b", service="sb", action="do", compensation="undo", depends_on=["a"]),
            Step(name="piv", service="sp", action="do", kind="pivot", depends_on=["b"], retry=FAST),
            Step(
                name="r",
                service="sr",
                action="do",
                kind="retriable",
                depends_on=["piv"],
                retry=RetryPolicy(max_attempts=3, initial_backoff=1, jitter=0),
            ),
        ],
    )


def test_happy_chain_sends_each_step_after_the_previous() -> None:
    sim = Sim(chain())
    sim.start({"x": 1})
    sim.run_happy()
    assert sim.state is not None
    assert sim.state.status is SagaStatus.COMPLETED
    assert sim.history() == [("T", "t1"), ("T", "t2"), ("T", "t3"), ("T", "t4")]


@pytest.mark.parametrize("failing", [1, 2, 3, 4])
def test_business_failure_at_each_step_compensates_the_done_ones_in_reverse(failing: int) -> None:
    sim = Sim(chain())
    sim.start()
    for i in range(1, failing):
        sim.reply(sim.take(f"t{i}"))
    sim.reply(sim.take(f"t{failing}"), ok=False, business=True)
    sim.run_happy()
    assert sim.state is not None
    assert sim.state.status is SagaStatus.COMPENSATED
    done = [("T", f"t{i}") for i in range(1, failing)]
    undone = [("C", f"t{i}") for i in reversed(range(1, failing))]
    assert sim.history() == done + undone
    assert sim.state.steps[f"t{failing}"].status is StepStatus.FAILED


def test_technical_failure_is_retried_after_the_backoff_then_succeeds() -> None:
    sim = Sim(chain(2))
    sim.start()
    decision = sim.reply(sim.take("t1"), ok=False)
    (retry,) = decision.events
    assert isinstance(retry, StepRetryScheduled)
    assert retry.retry_at == sim.now + 1
    early = decide(sim.d, sim.state, Tick("s1", sim.now + 0.5), sim.now + 0.5)
    assert early.ignored == "nothing due"
    decision = sim.tick()
    assert [c.attempt for c in decision.commands] == [2]
    sim.run_happy()
    assert sim.state is not None
    assert sim.state.status is SagaStatus.COMPLETED
    assert sim.state.steps["t1"].attempt == 2


def test_idempotency_key_is_the_same_for_every_attempt() -> None:
    sim = Sim(chain(1))
    sim.start()
    first = sim.take("t1")
    sim.reply(first, ok=False)
    sim.tick()
    second = sim.take("t1")
    assert first.idempotency_key == second.idempotency_key
    assert first.message_id != second.message_id


def test_timeouts_exhausted_leave_the_outcome_unknown_and_it_is_compensated() -> None:
    sim = Sim(chain(2))
    sim.start()
    sim.reply(sim.take("t1"))
    sim.inflight.clear()  # t2's commands are lost: every attempt times out
    for _ in range(5):
        sim.tick()
        sim.inflight = [c for c in sim.inflight if c.phase != "action"]
        assert sim.state is not None
        if sim.state.status is not SagaStatus.RUNNING:
            break
    assert sim.state is not None
    assert sim.state.steps["t2"].status is StepStatus.COMPENSATING
    sim.run_happy()
    assert sim.state.status is SagaStatus.COMPENSATED
    assert ("C", "t2") in sim.history()
    assert sim.history()[-1] == ("C", "t1")


def test_pivot_failure_compensates_the_steps_before_it() -> None:
    sim = Sim(with_pivot())
    sim.start()
    sim.reply(sim.take("a"))
    sim.reply(sim.take("b"))
    sim.reply(sim.take("piv"), ok=False, business=True)
    sim.run_happy()
    assert sim.state is not None
    assert sim.state.status is SagaStatus.COMPENSATED
    assert sim.history()[-2:] == [("C", "b"), ("C", "a")]


def test_after_the_pivot_failures_go_forward_and_exhaustion_is_stuck_with_an_alert() -> None:
    sim = Sim(with_pivot())
    sim.start()
    for name in ("a", "b", "piv"):
        sim.reply(sim.take(name))
    alerts = []
    for _ in range(3):
        decision = sim.reply(sim.take("r"), ok=False)
        alerts += decision.alerts
        if sim.inflight or (sim.state and sim.state.is_final):
            continue
        if sim.state and not sim.state.is_final:
            sim.tick()
    assert sim.state is not None
    assert sim.state.status is SagaStatus.STUCK
    assert [a.steps for a in alerts] == [["r"]]
    assert not any(kind == "compensation" for kind, _, _ in sim.commands_sent())
    decision = sim.feed(RetrySaga(message_id="o", saga_id="s1", at=sim.now))
    (again,) = decision.commands
    assert again.idempotency_key.endswith("/r3")  # a fresh round: a stored failure is not replayed
    sim.inflight = [again]
    sim.run_happy()
    assert sim.state.status is SagaStatus.COMPLETED


def test_failing_compensation_ends_stuck_and_resolve_finishes_it() -> None:
    sim = Sim(chain(2))
    sim.start()
    sim.reply(sim.take("t1"))
    sim.reply(sim.take("t2"), ok=False, business=True)
    while sim.state is not None and not sim.state.is_final:
        if sim.inflight:
            sim.reply(sim.inflight.pop(0), ok=False)
        else:
            sim.tick()
    assert sim.state is not None
    assert sim.state.status is SagaStatus.STUCK
    assert sim.state.steps["t1"].stuck_phase == "compensation"
    sim.feed(ResolveSaga(message_id="o", saga_id="s1", at=sim.now))
    assert sim.state.status is SagaStatus.COMPENSATED
    assert sim.state.steps["t1"].status is StepStatus.COMPENSATED


def test_independent_branches_compensate_concurrently() -> None:
    d = SagaDefinition(
        name="fork",
        steps=[
            Step(name="root", service="s", action="do", compensation="undo"),
            Step(name="left", service="s", action="do", compensation="undo", depends_on=["root"]),
            Step(name="right", service="s", action="do", compensation="undo", depends_on=["root"]),
            Step(
                name="join",
                service="s",
                action="do",
                compensation="undo",
                depends_on=["left", "right"],
            ),
        ],
    )
    sim = Sim(d)
    sim.start()
    sim.reply(sim.take("root"))
    assert {c.step for c in sim.inflight} == {"left", "right"}
    sim.reply(sim.take("left"))
    sim.reply(sim.take("right"))
    decision = sim.reply(sim.take("join"), ok=False, business=True)
    assert {c.step for c in decision.commands} == {"left", "right"}  # the same decision
    assert all(c.phase == "compensation" for c in decision.commands)
    sim.reply(sim.take("left", "compensation"))
    assert not [c for c in sim.inflight if c.step == "root"]  # right is not undone yet
    sim.run_happy()
    assert sim.history()[-1] == ("C", "root")


def test_start_to_start_starts_the_successor_with_its_predecessor() -> None:
    d = SagaDefinition(
        name="ss",
        steps=[
            Step(name="a", service="s", action="do", compensation="undo"),
            Step(name="b", service="s", action="do", compensation="undo", depends_on=["a:ss"]),
        ],
    )
    sim = Sim(d)
    decision = sim.start()
    assert [c.step for c in decision.commands] == ["a", "b"]


def test_finish_to_finish_holds_the_successor_unfinished_until_its_predecessor_is() -> None:
    d = SagaDefinition(
        name="ff",
        steps=[
            Step(name="a", service="s", action="do", compensation="undo"),
            Step(name="b", service="s", action="do", compensation="undo", depends_on=["a:ff"]),
            Step(name="c", service="s", action="do", compensation="undo", depends_on=["b"]),
        ],
    )
    sim = Sim(d)
    sim.start()
    assert {c.step for c in sim.inflight} == {"a", "b"}
    decision = sim.reply(sim.take("b"))
    assert decision.commands == ()  # b succeeded but is not finished: c waits for a
    decision = sim.reply(sim.take("a"))
    assert [c.step for c in decision.commands] == ["c"]


def test_start_to_finish_waits_for_the_predecessor_to_start() -> None:
    d = SagaDefinition(
        name="sf",
        steps=[
            Step(name="gate", service="s", action="do", compensation="undo"),
            Step(name="a", service="s", action="do", compensation="undo", depends_on=["gate"]),
            Step(name="b", service="s", action="do", compensation="undo", depends_on=["a:sf"]),
            Step(name="c", service="s", action="do", compensation="undo", depends_on=["b"]),
        ],
    )
    sim = Sim(d)
    sim.start()
    decision = sim.reply(sim.take("b"))
    assert decision.commands == ()  # a has not started, so b is not finished
    decision = sim.reply(sim.take("gate"))
    assert {c.step for c in decision.commands} == {"a", "c"}


def test_cancel_before_the_pivot_compensates_and_after_it_is_rejected() -> None:
    sim = Sim(with_pivot())
    sim.start()
    sim.reply(sim.take("a"))
    sim.cancel()
    sim.run_happy()
    assert sim.state is not None
    assert sim.state.status is SagaStatus.COMPENSATED
    late = Sim(with_pivot(), saga_id="s1")
    late.start()
    for name in ("a", "b"):
        late.reply(late.take(name))
    decision = late.cancel()
    assert [type(e) for e in decision.events] == [CancelRejected]
    late.run_happy()
    assert late.state is not None
    assert late.state.status is SagaStatus.COMPLETED


def test_inputs_that_do_not_fit_are_rejected_and_duplicates_ignored() -> None:
    sim = Sim(chain(2))
    sim.start()
    cmd = sim.take("t1")
    wrong = Reply(
        message_id="r",
        saga_id="s1",
        step="t1",
        phase="action",
        attempt=1,
        service="intruder",
        ok=True,
        output={},
        at=sim.now,
    )
    assert "belongs to" in (decide(sim.d, sim.state, wrong, sim.now).rejected or "")
    ghost = wrong.model_copy(update={"step": "ghost", "service": "s1"})
    assert "no such step" in (decide(sim.d, sim.state, ghost, sim.now).rejected or "")
    sim.reply(cmd)
    stale = Reply(
        message_id="r",
        saga_id="s1",
        step="t1",
        phase="action",
        attempt=1,
        service="s1",
        ok=True,
        output={},
        at=sim.now,
    )
    assert "stale" in (decide(sim.d, sim.state, stale, sim.now).ignored or "")
    again = StartSaga(message_id="m", saga_id="s1", saga_name="chain", input={}, at=sim.now)
    assert "already started" in (decide(sim.d, sim.state, again, sim.now).ignored or "")
    assert decide(None, None, again, sim.now).rejected is not None


def test_input_templates_feed_outputs_to_later_steps_and_compensations() -> None:
    d = SagaDefinition(
        name="flow",
        steps=[
            Step(
                name="pay",
                service="p",
                action="charge",
                compensation="refund",
                input={"amount": "$.input.total", "who": "$.saga_id"},
            ),
            Step(
                name="ship",
                service="s",
                action="ship",
                compensation="unship",
                depends_on=["pay"],
                input={"charge": "$.steps.pay.output.id", "items": ["$.input.items.0", 7]},
            ),
        ],
    )
    sim = Sim(d)
    sim.start({"total": 12, "items": ["pasta"]})
    pay = sim.take("pay")
    assert pay.payload == {"amount": 12, "who": "s1"}
    sim.reply(pay, output={"id": "ch-1"})
    ship = sim.take("ship")
    assert ship.payload == {"charge": "ch-1", "items": ["pasta", 7]}
    sim.reply(ship, ok=False, business=True)
    refund = sim.take("pay", "compensation")
    assert refund.payload == {"input": {"amount": 12, "who": "s1"}, "output": {"id": "ch-1"}}


def test_decide_is_a_function_of_its_arguments() -> None:
    sim = Sim(chain(3))
    sim.start()
    cmd = sim.inflight[0]
    reply = Reply(
        message_id="r",
        saga_id="s1",
        step=cmd.step,
        phase="action",
        attempt=1,
        service=cmd.service,
        ok=False,
        error=None,
        at=sim.now,
    )
    reply = reply.model_copy(update={"ok": True, "output": {}})
    assert decide(sim.d, sim.state, reply, sim.now) == decide(sim.d, sim.state, reply, sim.now)
