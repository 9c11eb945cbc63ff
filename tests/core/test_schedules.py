"""Random sagas under random schedules (hypothesis), checked against the saga calculus.

A schedule keeps a multiset of commands in flight and, by hypothesis's choices, delivers one
with a random outcome (success, business failure, technical failure), repeats an old reply
(a duplicate, or a stale one with another outcome), lets the clock run to the next timer and
ticks, or, when the saga is stuck, acts as an operator (retry or resolve). Then a closing
phase (everything succeeds, everything fails technically, or nothing answers) drives it to the
end. On every decision:

- the saga is never deadlocked: unless it has ended, a timer is pending (`next_due`);
- ``decision.state`` is the fold of all events so far from ``None`` (replay);
- no command is sent for a step whose compensation started.

At the end: it terminated within a bound, and the trace is legal (Garcia-Molina and Salem for
chains; for DAGs, reverse happens-before for compensations, the pivot rules, and the four
dependency types for starting and finishing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saga.core.decide import Decision, Input, Tick, decide, next_due
from saga.core.definition import (
    Dependency,
    DependencyType,
    RetryPolicy,
    SagaDefinition,
    Step,
    StepKind,
)
from saga.core.messages import (
    Alert,
    Command,
    CompensationResolved,
    CompensationStarted,
    CompensationSucceeded,
    EventBase,
    ResolveSaga,
    RetrySaga,
    SagaAborted,
    SagaCompleted,
    SagaStarted,
    StartSaga,
    StepResolved,
    StepStarted,
    StepSucceeded,
    StepTimedOut,
)
from saga.core.state import SagaState, SagaStatus, StepStatus, evolve
from saga.errors import DefinitionError
from tests.core.support import reply_to

SAGA_ID = "saga-p"
OUTCOMES = ("ok", "business", "technical")
WEIGHTED_OUTCOMES = ("ok", "ok", "ok", "ok", "technical", "business")
"""Mostly successes, so that random sagas get far enough to exercise the forward rules."""
FS, SS, FF, SF = (
    DependencyType.FINISH_TO_START,
    DependencyType.START_TO_START,
    DependencyType.FINISH_TO_FINISH,
    DependencyType.START_TO_FINISH,
)

# -- definitions -----------------------------------------------------------------------------------

policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 3),
    initial_backoff=st.sampled_from([0.5, 1.0, 3.0]),
    jitter=st.sampled_from([0.0, 0.3]),
)


@st.composite
def dags(draw: st.DrawFn, *, shape: str | None = None) -> SagaDefinition:
    """A valid DAG of 2-7 steps whose edges run from lower to higher index.

    Shapes: ``compensatable`` (no pivot), ``pivot`` (steps before index k compensatable, k the
    pivot, the rest retriable; the index order keeps every pivot rule), ``chain`` (a
    finish-to-start chain, optionally with a pivot), ``typed-chain`` (a chain of random
    dependency types plus random extra edges, with a pivot as in ``pivot``).
    """
    n = draw(st.integers(2, 7))
    shape = shape or draw(st.sampled_from(["compensatable", "pivot", "chain", "typed-chain"]))
    pivot = draw(st.integers(0, n - 1)) if shape in ("pivot", "typed-chain") else None
    if shape == "chain" and draw(st.booleans()):
        pivot = draw(st.integers(0, n - 1))
    steps = []
    for i in range(n):
        name = f"s{i}"
        if shape == "chain":
            deps = [Dependency(step=f"s{i - 1}")] if i else []
        else:
            # typed-chain: s(i-1) -> s(i) always, of a random type, so that combinations of
            # the four types (FF then FS, SF then FS, ...) come up often.
            deps = [
                Dependency(step=f"s{j}", type=draw(st.sampled_from(list(DependencyType))))
                for j in range(i)
                if (shape == "typed-chain" and j == i - 1) or draw(st.integers(0, 2)) == 0
            ]
        template: dict[str, str] | None = None
        readable = [dep.step for dep in deps if dep.type is FS]
        if readable and draw(st.booleans()):
            # Only a finish-to-start predecessor's output may be read (rule input-reference).
            source = draw(st.sampled_from(readable))
            template = {"prev": f"$.steps.{source}.output", "k": "$.input.k", "id": "$.saga_id"}
        if pivot is None or i < pivot:
            kind = StepKind.COMPENSATABLE
        else:
            kind = StepKind.PIVOT if i == pivot else StepKind.RETRIABLE
        steps.append(
            Step(
                name=name,
                service=f"svc{i % 3}",
                action=f"do-{name}",
                compensation=f"undo-{name}" if kind is StepKind.COMPENSATABLE else None,
                kind=kind,
                depends_on=tuple(deps),
                retry=draw(policies),
                compensation_retry=draw(policies),
                timeout=draw(st.sampled_from([2.0, 5.0, 30.0])),
                input=template,
            )
        )
    return SagaDefinition(name=f"random-{shape}", steps=tuple(steps))


def _is_chain(d: SagaDefinition) -> bool:
    return all(
        s.depends_on == ((Dependency(step=f"s{i - 1}"),) if i else ())
        for i, s in enumerate(d.steps)
    )


# -- the schedule ----------------------------------------------------------------------------------


@dataclass
class Run:
    """One saga under a schedule, checking the per-decision properties as it goes."""

    d: SagaDefinition
    now: float = 10_000.0
    state: SagaState | None = None
    replayed: SagaState | None = None
    inflight: list[Command] = field(default_factory=list)
    answered: list[tuple[Command, str]] = field(default_factory=list)
    events: list[EventBase] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    undoing: set[str] = field(default_factory=set)
    decisions: int = 0

    def feed(self, message: Input) -> Decision:
        decision = decide(self.d, self.state, message, self.now)
        self.decisions += 1
        # (c) the events, replayed from the very first, give the decision's state
        for event in decision.events:
            self.replayed = evolve(self.replayed, event)
        assert self.replayed == decision.state
        if not decision.events:
            assert decision.state == self.state
        # (d) nothing is sent for a step whose compensation has started
        for event in decision.events:
            if isinstance(event, CompensationStarted) and event.step not in self.undoing:
                self.undoing.add(event.step)
            if isinstance(event, StepStarted):
                assert event.step not in self.undoing, f"{event.step} restarted after its undo"
        for command in decision.commands:
            if command.phase == "action":
                assert command.step not in self.undoing, f"action {command.step} after its undo"
                # the payload is the step's input template, rendered against earlier outputs
                template = self.d.step(command.step).input
                if template is None:
                    assert command.payload == {"k": 1}
                else:
                    source = template["prev"].split(".")[2]
                    assert decision.state is not None
                    assert command.payload == {
                        "prev": decision.state.steps[source].output,
                        "k": 1,
                        "id": SAGA_ID,
                    }
        self.state = decision.state
        self.events += decision.events
        self.inflight += decision.commands
        self.alerts += decision.alerts
        # liveness: a saga that has not ended always has a timer to wake it
        assert self.state is not None
        if not self.state.is_final:
            assert next_due(self.state) is not None, f"deadlocked: {self.state}"
        return decision

    def start(self) -> None:
        start = StartSaga(
            message_id="start", saga_id=SAGA_ID, saga_name=self.d.name, input={"k": 1}, at=0
        )
        self.feed(start)

    def deliver(self, index: int, outcome: str) -> None:
        command = self.inflight.pop(index)
        self.answered.append((command, outcome))
        self.feed(reply_to(command, outcome, output={"by": command.step}, at=self.now))

    def tick(self) -> None:
        assert self.state is not None
        due = next_due(self.state)
        assert due is not None
        self.now = max(self.now, due)
        decision = self.feed(Tick(SAGA_ID, self.now))
        assert decision.ignored is None, "a due timer did not fire"

    @property
    def ended(self) -> bool:
        return self.state is not None and self.state.is_final


def drive(run: Run, data: st.DataObject, moves: int = 40) -> None:
    """The random phase, then a closing phase to the end."""
    operator_actions = 0
    for _ in range(moves):
        assert run.state is not None
        if run.state.status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED):
            return
        if run.state.status is SagaStatus.STUCK:
            if operator_actions >= 2 or not data.draw(st.booleans(), label="operator acts"):
                return
            operator_actions += 1
            if data.draw(st.booleans(), label="retry (else resolve)"):
                run.feed(RetrySaga(message_id="op", saga_id=SAGA_ID, at=run.now))
            else:
                run.feed(ResolveSaga(message_id="op", saga_id=SAGA_ID, at=run.now))
            continue
        moves_now = ["deliver"] * 4 if run.inflight else []
        moves_now.append("tick")
        if run.answered:
            moves_now.append("repeat")
        move = data.draw(st.sampled_from(moves_now), label="move")
        if move == "tick":
            run.tick()
        elif move == "deliver":
            index = data.draw(st.integers(0, len(run.inflight) - 1), label="which")
            run.deliver(index, data.draw(st.sampled_from(WEIGHTED_OUTCOMES), label="outcome"))
        else:
            command, before = data.draw(st.sampled_from(run.answered), label="old reply")
            outcome = data.draw(st.sampled_from([before, *OUTCOMES]), label="repeat outcome")
            decision = run.feed(reply_to(command, outcome, output={"by": command.step}))
            assert decision.ignored is not None, "a repeated reply was acted on"
            assert decision.rejected is None

    closing = data.draw(st.sampled_from(["ok", "technical", "silent"]), label="closing")
    for _ in range(2_000):
        if run.ended:
            return
        if run.inflight and closing != "silent":
            run.deliver(0, closing)
        else:
            run.inflight.clear()
            run.tick()
    raise AssertionError(f"the saga did not end: {run.state}")


# -- the legal traces ------------------------------------------------------------------------------


def check_trace(run: Run) -> None:
    d, state, events = run.d, run.state, run.events
    assert state is not None
    assert state.is_final
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert isinstance(events[0], SagaStarted)

    replay: SagaState | None = None
    for e in events:
        replay = evolve(replay, e)
    assert replay == state

    first: dict[tuple[type[EventBase], str], int] = {}
    for i, e in enumerate(events):
        step = getattr(e, "step", None)
        if step is not None:
            first.setdefault((type(e), step), i)

    def at(kind: type[EventBase], step: str) -> int | None:
        return first.get((kind, step))

    def succeeded_at(step: str) -> int | None:
        done = [x for x in (at(StepSucceeded, step), at(StepResolved, step)) if x is not None]
        return min(done) if done else None

    # Forward: the four dependency types, the pivot, and finishing.
    def finished_at(step: str) -> float:
        """When the step counts as finished (inf if never)."""
        times = [succeeded_at(step)]
        for dep in d.step(step).depends_on:
            if dep.type is FF:
                times.append(finished_at(dep.step))  # type: ignore[arg-type]
            elif dep.type is SF:
                times.append(at(StepStarted, dep.step))
        return float("inf") if None in times else max(times)  # type: ignore[type-var]

    pivot = d.pivot
    for s in d.steps:
        started = at(StepStarted, s.name)
        if started is None:
            continue
        for dep in s.depends_on:
            if dep.type is FS:
                assert finished_at(dep.step) < started, (s.name, "started before", dep.step)
            elif dep.type is SS:
                before = at(StepStarted, dep.step)
                assert before is not None
                assert before < started, (s.name, "started before", dep.step)
        if s.kind is StepKind.PIVOT:
            for other in d.steps:
                if other.kind is StepKind.COMPENSATABLE:
                    assert finished_at(other.name) < started, ("pivot before", other.name)
        if s.kind is StepKind.RETRIABLE:
            assert pivot is not None
            assert finished_at(pivot) < started, (s.name, "started before the pivot finished")
    aborted = next((i for i, e in enumerate(events) if isinstance(e, SagaAborted)), None)
    if aborted is not None:
        late = [e for e in events[aborted:] if isinstance(e, StepStarted)]
        assert late == [], "a step started after the saga aborted"

    # Backward: reverse happens-before, never a pivot or retriable step, never past the pivot.
    pivot_done = succeeded_at(pivot) if pivot else None
    replay = None
    for i, e in enumerate(events):
        if isinstance(e, CompensationStarted) and e.attempt == 1:
            assert replay is not None
            assert d.step(e.step).kind is StepKind.COMPENSATABLE
            assert pivot_done is None or i < pivot_done
            assert replay.steps[e.step].status in (StepStatus.SUCCEEDED, StepStatus.UNKNOWN)
            for dependent, _ in d.dependents(e.step):
                assert replay.steps[dependent].status in (
                    StepStatus.PENDING,
                    StepStatus.FAILED,
                    StepStatus.COMPENSATED,
                ), (e.step, "undone before", dependent)
        replay = evolve(replay, e)

    # Outcomes.
    undone = {s for s, st_ in state.steps.items() if st_.status is StepStatus.COMPENSATED}
    took_effect = {
        getattr(e, "step", "")
        for e in events
        if isinstance(e, StepSucceeded | StepTimedOut | StepResolved)
    }
    if state.status is SagaStatus.COMPLETED:
        assert all(s.status is StepStatus.SUCCEEDED for s in state.steps.values())
        assert not any(isinstance(e, CompensationStarted) for e in events)
        assert any(isinstance(e, SagaCompleted) for e in events)
    elif state.status is SagaStatus.COMPENSATED:
        assert pivot_done is None
        assert undone == took_effect
        for name, s in state.steps.items():
            assert s.status in (StepStatus.PENDING, StepStatus.FAILED, StepStatus.COMPENSATED), name
    else:
        assert any(s.status is StepStatus.STUCK for s in state.steps.values())
        assert run.alerts, "stuck without an alert"
        assert run.alerts[-1].steps == [
            n for n, s in state.steps.items() if s.status is StepStatus.STUCK
        ]
    stuck_events = sum(e.type == "saga_stuck" for e in events)  # type: ignore[attr-defined]
    assert len(run.alerts) == stuck_events  # one alert each time the saga gets stuck

    # Chains: T1..Tj then Cj..C1 (Garcia-Molina and Salem), C for what took effect.
    if _is_chain(d):
        trace = []
        for e in events:
            if isinstance(e, StepSucceeded | StepResolved):
                trace.append(("T", e.step))
            elif isinstance(e, StepTimedOut):
                trace.append(("U", e.step))  # outcome unknown: it may have taken effect
            elif isinstance(e, CompensationSucceeded | CompensationResolved):
                trace.append(("C", e.step))
        forward = [s for k, s in trace if k in "TU"]
        backward = [s for k, s in trace if k == "C"]
        kinds = [k for k, _ in trace]
        assert kinds == sorted(kinds, key=lambda k: k == "C"), trace  # every C after every T
        names = [s.name for s in d.steps]
        assert forward == names[: len(forward)], trace
        assert backward == list(reversed(forward))[: len(backward)], trace
        if state.status is SagaStatus.COMPENSATED:
            assert backward == list(reversed(forward)), trace


HEAVY = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@HEAVY
@given(d=dags(), data=st.data())
def test_random_dags_terminate_with_legal_traces(d: SagaDefinition, data: st.DataObject) -> None:
    run = Run(d)
    run.start()
    drive(run, data)
    check_trace(run)


@HEAVY
@given(d=dags(shape="chain"), data=st.data())
def test_random_chains_follow_garcia_molina_and_salem(
    d: SagaDefinition, data: st.DataObject
) -> None:
    run = Run(d)
    run.start()
    drive(run, data)
    check_trace(run)


@settings(max_examples=100, deadline=None)
@given(d=dags(), closing=st.sampled_from(["technical", "silent"]))
def test_retries_exhaust_so_a_saga_that_never_succeeds_still_ends(
    d: SagaDefinition, closing: str
) -> None:
    run = Run(d)
    run.start()
    for _ in range(2_000):
        if run.ended:
            break
        if run.inflight and closing == "technical":
            run.deliver(0, "technical")
        else:
            run.inflight.clear()
            run.tick()
    assert run.ended
    assert run.state is not None
    assert run.state.status is not SagaStatus.COMPLETED
    check_trace(run)


@settings(max_examples=100, deadline=None)
@given(d=dags())
def test_a_saga_where_everything_succeeds_completes(d: SagaDefinition) -> None:
    run = Run(d)
    run.start()
    while not run.ended:
        assert run.inflight, "nothing in flight, yet the saga has not ended"
        run.deliver(0, "ok")
    assert run.state is not None
    assert run.state.status is SagaStatus.COMPLETED
    assert run.decisions <= 1 + len(d.steps)
    check_trace(run)


# -- random defects --------------------------------------------------------------------------------

DEFECTS = {
    "cycle": "acyclic",
    "self-dependency": "acyclic",
    "unknown-dependency": "known-dependency",
    "missing-compensation": "compensation-required",
    "pivot-with-compensation": "no-compensation",
    "second-pivot": "single-pivot",
    "compensatable-after-pivot": "compensatable-before-pivot",
    "duplicate-name": "unique-names",
    "retriable-without-pivot": "retriable-after-pivot",
}


def _inject(data: dict[str, Any], defect: str, pick: int) -> str | None:
    """Breaks ``data`` with ``defect``; returns the step the problem must name (if one)."""
    steps: list[dict[str, Any]] = data["steps"]
    target = steps[pick % len(steps)]
    pivot = next((s for s in steps if s.get("kind") == "pivot"), None)
    if defect == "cycle":
        first, last = steps[0], steps[-1]
        first.setdefault("depends_on", []).append({"step": last["name"], "type": "ss"})
        last.setdefault("depends_on", []).append({"step": first["name"]})
        return None  # the cycle is reported at one of its steps
    if defect == "self-dependency":
        target.setdefault("depends_on", []).append(target["name"])
    elif defect == "unknown-dependency":
        target.setdefault("depends_on", []).append("nowhere:ff")
    elif defect == "missing-compensation":
        target.pop("kind", None)
        target.pop("compensation", None)
    elif defect == "pivot-with-compensation":
        target = pivot or target
        target.update(kind="pivot", compensation="undo")
        for s in steps:  # no other pivot, and nothing retriable left without one
            if s is not target and s.get("kind") == "pivot":
                s.update(kind="compensatable", compensation="undo")
    elif defect == "second-pivot":
        steps.append({"name": "extra", "service": "x", "action": "y", "kind": "pivot"})
        if pivot is None:
            steps.append({"name": "extra2", "service": "x", "action": "y", "kind": "pivot"})
        return None  # both pivots are named, as "steps [...]"
    elif defect == "compensatable-after-pivot":
        if pivot is None:
            pivot = steps[-1]
            pivot["kind"] = "pivot"
            pivot.pop("compensation", None)
        target = {"name": "late", "service": "x", "action": "y", "compensation": "z"}
        target["depends_on"] = [{"step": pivot["name"], "type": "fs"}]
        steps.append(target)
    elif defect == "duplicate-name":
        steps.append({**target, "depends_on": []})
    else:  # retriable-without-pivot
        for s in steps:
            if s.get("kind") == "pivot":
                s["kind"] = "compensatable"
                s["compensation"] = "undo"
        target = {"name": "forward", "service": "x", "action": "y", "kind": "retriable"}
        steps.append(target)
    return str(target["name"])


@settings(max_examples=250, deadline=None)
@given(d=dags(), defect=st.sampled_from(sorted(DEFECTS)), pick=st.integers(0, 6))
def test_random_defects_are_rejected_naming_the_rule_and_the_step(
    d: SagaDefinition, defect: str, pick: int
) -> None:
    data = d.to_dict()
    step = _inject(data, defect, pick)
    with pytest.raises(DefinitionError) as caught:
        SagaDefinition.from_dict(data)
    rule = DEFECTS[defect]
    matching = [p for p in caught.value.problems if f"[{rule}]" in p]
    assert matching, caught.value.problems
    assert all(p.startswith(f"saga {d.name!r}, step") for p in caught.value.problems)
    if step is not None:
        assert any(f"step {step!r}" in p for p in matching), (step, matching)
