"""Properties of the core over random sagas and random schedules (hypothesis).

For every random valid DAG definition and every random schedule of replies (successes,
business and technical failures, duplicates, stale replies, lost commands, clock jumps):
every saga terminates; every executed trace is legal; each decision's state is the fold of its
events, and decide is pure (both checked inside `tests.core.support.Driver`); and random
defects make definitions invalid with the right rule.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saga.core.decide import next_due
from saga.core.definition import (
    Approval,
    DependencyType,
    RetryPolicy,
    SagaDefinition,
    Step,
    StepKind,
)
from saga.core.messages import (
    CompensationStarted,
    CompensationSucceeded,
    DecideApproval,
    SignalSaga,
    StepFailedEvent,
    StepScheduled,
    StepStarted,
    StepSucceeded,
)
from saga.core.state import SagaStatus, StepStatus
from saga.errors import DefinitionError
from tests.core.support import Driver

TYPES = list(DependencyType)


@st.composite
def definitions(draw: st.DrawFn) -> SagaDefinition:
    """DAGs whose edges go from lower to higher index; optionally a pivot at index k, with
    compensatable steps before it and retriable ones after (the index order makes every
    pivot rule hold by construction)."""
    n = draw(st.integers(2, 6))
    pivot = draw(st.one_of(st.none(), st.integers(1, n - 1)))
    steps = []
    for i in range(n):
        deps: list[Any] = []
        for j in range(i):
            if draw(st.integers(0, 2)) == 0 or (j == i - 1 and draw(st.booleans())):
                deps.append({"step": f"s{j}", "type": draw(st.sampled_from(TYPES))})
        if pivot is None or i < pivot:
            kind = StepKind.COMPENSATABLE
        else:
            kind = StepKind.PIVOT if i == pivot else StepKind.RETRIABLE
        retry = RetryPolicy(max_attempts=draw(st.integers(1, 3)), initial_backoff=1, jitter=0.5)
        steps.append(
            Step(
                name=f"s{i}",
                service=f"svc{i % 3}",
                action="do",
                compensation="undo" if kind is StepKind.COMPENSATABLE else None,
                kind=kind,
                depends_on=deps,
                retry=retry,
                compensation_retry=RetryPolicy(
                    max_attempts=draw(st.integers(1, 3)), initial_backoff=1
                ),
                timeout=draw(st.sampled_from([2.0, 5.0])),
            )
        )
    return SagaDefinition(name="random", steps=steps)


OUTCOMES = {"ok": "ok", "dup": "ok", "biz": "business", "tech": "technical"}


def run(drv: Driver, data: st.DataObject, budget: int = 120) -> None:
    """A random schedule, then a fair one (everything delivered, successes), to the end."""
    for _ in range(budget):
        assert drv.state is not None
        if drv.state.is_final:
            return
        move = data.draw(st.sampled_from(["ok", "ok", "ok", "biz", "tech", "dup", "lose", "tick"]))
        if move == "tick" or not drv.inflight:
            if drv.state.is_final:
                return
            drv.tick_due()
            continue
        command = drv.inflight.pop(data.draw(st.integers(0, len(drv.inflight) - 1)))
        if move == "lose":
            continue
        if move == "dup":
            drv.inflight.append(command)
        drv.reply(command, OUTCOMES[move])
    for _ in range(400):
        assert drv.state is not None
        if drv.state.is_final:
            return
        if drv.inflight:
            drv.reply(drv.inflight.pop(0))
        else:
            drv.tick_due()
    raise AssertionError(f"saga did not end: {drv.state}")


def check_legal(drv: Driver) -> None:
    state = drv.state
    assert state is not None
    d = drv.definition
    order = {id(e): i for i, e in enumerate(drv.events)}
    undo_start = {e.step: order[id(e)] for e in drv.events if isinstance(e, CompensationStarted)}
    undo_end = {e.step: order[id(e)] for e in drv.events if isinstance(e, CompensationSucceeded)}
    history = [tuple(entry.split(":", 1)) for entry in drv.trace()]
    undo_done = {step: i for i, (kind, step) in enumerate(history) if kind == "C"}
    started = {e.step for e in drv.events if isinstance(e, StepStarted)}
    succeeded = {e.step for e in drv.events if isinstance(e, StepSucceeded)}

    # Compensations only for steps that started, only for compensatable steps.
    for step in undo_start:
        assert step in started
        assert d.step(step).kind is StepKind.COMPENSATABLE
    # Nothing is compensated once the pivot succeeded; nothing compensates a pivot or later.
    pivot = d.pivot
    if pivot and pivot in succeeded:
        assert not undo_start
    # No action is sent for a step after its compensation started.
    for e in drv.events:
        if isinstance(e, StepStarted) and e.step in undo_start:
            assert order[id(e)] < undo_start[e.step]
    # Reverse happens-before: a step's undo starts only after every dependent that started was
    # undone (its compensation succeeded) or failed without effect.
    failed = {e.step: order[id(e)] for e in drv.events if isinstance(e, StepFailedEvent)}
    for step, at in undo_start.items():
        for dependent, _ in d.dependents(step):
            if dependent in started:
                settled_at = undo_end.get(dependent, failed.get(dependent, at + 1))
                assert settled_at < at, (step, dependent)
    # Outcomes.
    if state.status is SagaStatus.COMPLETED:
        assert all(s.status is StepStatus.SUCCEEDED for s in state.steps.values())
        assert not undo_start
    if state.status is SagaStatus.COMPENSATED:
        for name, s in state.steps.items():
            assert s.status in (StepStatus.PENDING, StepStatus.FAILED, StepStatus.COMPENSATED), name
        for step in succeeded:
            assert step in undo_done
    # For a pure chain the trace is T1..Tj Cj..C1 (Garcia-Molina and Salem).
    if is_chain(d) and state.status is not SagaStatus.STUCK:
        forward = [s for k, s in history if k == "T"]
        backward = [s for k, s in history if k == "C"]
        assert [k for k, _ in history] == ["T"] * len(forward) + ["C"] * len(backward)
        assert forward == [s.name for s in d.steps][: len(forward)]
        assert all(
            b in forward or state.steps[b].status is StepStatus.COMPENSATED for b in backward
        )
        assert [s for s in reversed([s.name for s in d.steps]) if s in backward] == backward


def is_chain(d: SagaDefinition) -> bool:
    return all(
        [(dep.step, dep.type) for dep in s.depends_on]
        == ([(f"s{i - 1}", DependencyType.FINISH_TO_START)] if i else [])
        for i, s in enumerate(d.steps)
    )


SETTINGS = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SETTINGS
@given(definitions(), st.data())
def test_every_saga_terminates_with_a_legal_trace(d: SagaDefinition, data: st.DataObject) -> None:
    drv = Driver(d)
    drv.start({"k": 1})
    run(drv, data)
    check_legal(drv)


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 6), st.data())
def test_chains_follow_garcia_molina_and_salem(n: int, data: st.DataObject) -> None:
    steps = [
        Step(
            name=f"s{i}",
            service="svc",
            action="do",
            compensation="undo",
            depends_on=[f"s{i - 1}"] if i else [],
            retry=RetryPolicy(max_attempts=2, initial_backoff=1),
        )
        for i in range(n)
    ]
    drv = Driver(SagaDefinition(name="chain", steps=steps))
    drv.start({})
    run(drv, data)
    check_legal(drv)
    assert drv.state is not None
    assert drv.state.status is not SagaStatus.STUCK or any(
        s.stuck_phase == "compensation" for s in drv.state.steps.values()
    )


DEFECTS = {
    "cycle": "[acyclic]",
    "unknown": "[known-dependency]",
    "no_compensation": "[compensation-required]",
    "compensatable_after_pivot": "[compensatable-before-pivot]",
    "duplicate": "[unique-names]",
    "retriable_without_pivot": "[retriable-after-pivot]",
}


@settings(max_examples=150, deadline=None)
@given(definitions(), st.sampled_from(sorted(DEFECTS)), st.data())
def test_random_defects_are_rejected_with_their_rule(
    d: SagaDefinition, defect: str, data: st.DataObject
) -> None:
    raw = d.to_dict()
    steps = raw["steps"]
    last = steps[-1]
    if defect == "cycle":
        last.setdefault("depends_on", []).append({"step": steps[0]["name"]})
        steps[0].setdefault("depends_on", []).append({"step": last["name"]})
    elif defect == "unknown":
        last.setdefault("depends_on", []).append({"step": "nowhere"})
    elif defect == "no_compensation":
        first = steps[0]
        first.pop("compensation", None)
        first.pop("kind", None)
    elif defect == "compensatable_after_pivot":
        pivot = next((s for s in steps if s.get("kind") == "pivot"), None)
        if pivot is None:
            pivot = last
            pivot["kind"] = "pivot"
            pivot.pop("compensation", None)
        steps.append(
            {
                "name": "late",
                "service": "x",
                "action": "y",
                "compensation": "z",
                "depends_on": [{"step": pivot["name"]}],
            }
        )
    elif defect == "duplicate":
        steps.append(dict(steps[0]))
    else:
        for s in steps:
            if s.get("kind") == "pivot":
                s["kind"] = "compensatable"
                s["compensation"] = "undo"
        steps.append({"name": "fwd", "service": "x", "action": "y", "kind": "retriable"})
    with pytest.raises(DefinitionError) as info:
        SagaDefinition.from_dict(raw)
    assert any(DEFECTS[defect] in p for p in info.value.problems), info.value.problems


# -- with the steps that wait: timers, signals, approvals, conditions ------------------------


@st.composite
def waiting_definitions(draw: st.DrawFn) -> SagaDefinition:
    """`definitions`, with some steps delayed or conditional, and some compensatable ones
    turned into ``wait``, ``approval`` or fan-out (``for_each``) steps; a deadline
    sometimes."""
    base = draw(definitions())
    steps = []
    for i, s in enumerate(base.steps):
        extra: dict[str, Any] = {}
        if draw(st.integers(0, 3)) == 0:
            extra["delay"] = draw(st.sampled_from([0.0, 1.0, 30.0]))
        if draw(st.integers(0, 3)) == 0:
            extra["when"] = f"$.input.k > {draw(st.integers(0, 2))}"
        work = draw(st.integers(0, 5)) if s.kind is StepKind.COMPENSATABLE else 9
        if work == 0:
            extra |= {"service": None, "action": None, "compensation": None, "wait": f"sig{i}"}
        elif work == 1:
            approval = Approval(approvers=("ann",), remind_after=draw(st.sampled_from([1.0, 4.0])))
            extra |= {"service": None, "action": None, "compensation": None, "approval": approval}
        elif work == 2:
            extra |= {"for_each": "$.input.xs", "max_parallel": draw(st.integers(1, 2))}
        steps.append(s.model_copy(update=extra))
    deadline = draw(st.one_of(st.none(), st.sampled_from([5.0, 50.0])))
    # Rebuilt through the constructor, so that the rules check the changed steps.
    return SagaDefinition(name="waiting", steps=steps, deadline=deadline)


def run_waiting(drv: Driver, data: st.DataObject, budget: int = 120) -> None:
    """`run`'s schedule, with signals and decisions (approve, reject, by a stranger) mixed in,
    then a fair end: every waiting step gets its signal or its approval."""
    waits = [s for s in drv.definition.steps if s.wait is not None]
    approvals = [s for s in drv.definition.steps if s.approval is not None]
    sent = 0

    def signal(sd: Step) -> None:
        nonlocal sent
        sent += 1
        assert sd.wait is not None
        drv.send(SignalSaga(message_id=f"sig{sent}", saga_id=drv.saga_id, name=sd.wait, at=drv.now))

    def decide_on(sd: Step, approve: bool, by: str) -> None:
        nonlocal sent
        sent += 1
        m = DecideApproval(
            message_id=f"dec{sent}",
            saga_id=drv.saga_id,
            step=sd.name,
            approve=approve,
            at=drv.now,
            by=by,
        )
        drv.send(m)

    for _ in range(budget):
        assert drv.state is not None
        if drv.state.is_final:
            return
        move = data.draw(st.sampled_from(["reply", "reply", "signal", "decide", "tick"]))
        if move == "signal" and waits:
            signal(data.draw(st.sampled_from(waits)))
        elif move == "decide" and approvals:
            sd = data.draw(st.sampled_from(approvals))
            if drv.state.steps[sd.name].status is StepStatus.RUNNING:
                decide_on(sd, data.draw(st.booleans()), data.draw(st.sampled_from(["ann", "eve"])))
        elif move == "reply" and drv.inflight:
            command = drv.inflight.pop(data.draw(st.integers(0, len(drv.inflight) - 1)))
            drv.reply(command, data.draw(st.sampled_from(["ok", "ok", "business", "technical"])))
        elif next_due(drv.state) is not None:
            drv.tick_due()
    for _ in range(400):
        assert drv.state is not None
        if drv.state.is_final:
            return
        running = [s for s in approvals if drv.state.steps[s.name].status is StepStatus.RUNNING]
        waiting = [s for s in waits if drv.state.steps[s.name].status is StepStatus.RUNNING]
        if drv.inflight:
            drv.reply(drv.inflight.pop(0))
        elif running:
            decide_on(running[0], True, "ann")
        elif waiting:
            signal(waiting[0])
        else:
            drv.tick_due()
    raise AssertionError(f"saga did not end: {drv.state}")


@SETTINGS
@given(waiting_definitions(), st.integers(0, 3), st.integers(0, 3), st.data())
def test_sagas_with_waiting_steps_terminate_with_a_legal_trace(
    d: SagaDefinition, k: int, n: int, data: st.DataObject
) -> None:
    drv = Driver(d)
    drv.start({"k": k, "xs": list(range(n))})
    run_waiting(drv, data)
    state = drv.state
    assert state is not None
    compensated = {e.step for e in drv.events if isinstance(e, CompensationStarted)}
    # Only steps with an effect are ever compensated, and only if they started.
    started = {e.step for e in drv.events if isinstance(e, StepStarted)}
    assert all(d.step(s).has_effect and s in started for s in compensated)
    # Skipped steps never started; steps with a false condition were skipped.
    for name, ss in state.steps.items():
        sd = d.step(name)
        if ss.status is StepStatus.SKIPPED:
            assert name not in started
        if sd.when is not None and name in started:
            assert k > int(sd.when.rsplit(" ", 1)[1])
    # Reverse order: a step is undone only after whatever came after it was (looking through
    # the steps that have nothing to undo: waits, approvals, skipped steps, to what follows).
    undo_start = {e.step: i for i, e in enumerate(drv.events) if isinstance(e, CompensationStarted)}
    undo_end = {e.step: i for i, e in enumerate(drv.events) if isinstance(e, CompensationSucceeded)}
    for step, at in undo_start.items():
        for later in _after(d, step.split("[")[0], n):
            if later in undo_start:
                assert undo_end.get(later, at + 1) < at, (step, later)
    # No step started before its timer fired.
    scheduled = {e.step: e.due_at for e in drv.events if isinstance(e, StepScheduled)}
    for e in drv.events:
        if isinstance(e, StepStarted) and e.step in scheduled and e.attempt == 1:
            assert e.at >= scheduled[e.step]
    if state.status is SagaStatus.COMPLETED:
        assert all(
            s.status in (StepStatus.SUCCEEDED, StepStatus.SKIPPED) for s in state.steps.values()
        )
    # A fan-out's output lists its items' outputs, in order.
    for sd in d.steps:
        if sd.for_each is not None and state.steps[sd.name].status is StepStatus.SUCCEEDED:
            items = [state.steps[f"{sd.name}[{i}]"].output for i in range(n)]
            assert state.steps[sd.name].output == {"items": items}
    if state.status is SagaStatus.COMPENSATED:
        for name, ss in state.steps.items():
            if d.step(name).for_each is not None and "[" not in name:
                continue  # a fan-out is undone item by item
            assert ss.status in (
                StepStatus.PENDING,
                StepStatus.SKIPPED,
                StepStatus.FAILED,
                StepStatus.COMPENSATED,
            ) or (ss.status is StepStatus.SUCCEEDED and not d.step(name).has_effect), name


def _after(d: SagaDefinition, name: str, n: int) -> set[str]:
    """Every step or item that depends on ``name``, directly or through any other step."""
    found: set[str] = set()
    stack = [name]
    while stack:
        for dependent, _ in d.dependents(stack.pop()):
            if dependent not in found:
                found.add(dependent)
                found.update(f"{dependent}[{i}]" for i in range(n))
                stack.append(dependent)
    return found
