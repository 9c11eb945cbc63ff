"""The real coordinator and participants on the memory transport, behind a hostile network.

A hypothesis `RuleBasedStateMachine` runs `saga.Coordinator` and three `saga.Participant`s on a
`saga.adapters.memory.MemoryBroker` with a `saga.testing.VirtualClock`. The two sides do not
share topics: the coordinator writes commands under the prefix ``saga`` and the participants
read theirs under ``net`` (and reply there), so every command and reply passes through the test,
which plays the network. Its rules start sagas with planned failures, deliver any message in
flight (so, in any order), deliver one twice, drop one, advance the clock (deadlines and retry
backoffs fire), crash the coordinator (its successor rebuilds every saga from the snapshots and
the log) and crash a participant (its successor keeps the reply store, as a database would).

After every rule, invariants: no side effect took place twice for one step and phase (the
services' ledger, keyed by the idempotency key the engine hands out), and the log holds a legal,
gap-free trace for every saga. At the end the network turns fair: every message is delivered and
the clock moves to the next deadline until nothing is left; then every saga must have ended,
completed or compensated (never stuck: the budgets exceed what the rules can use up), with the
effects its outcome implies.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from saga import Coordinator, MemoryReplyStore, Participant, RetryPolicy, SagaDefinition, StepFailed
from saga.adapters.memory import MemoryBroker, MemoryTransport, _MemoryConsumer
from saga.core.codec import decode
from saga.core.decide import next_due
from saga.core.messages import event_adapter
from saga.core.state import SagaState, SagaStatus
from saga.runtime.participant import StepContext
from saga.runtime.ports import Outgoing, RebalanceListener, Record, Topics
from saga.testing import VirtualClock
from tests.chaos.app import CHAIN, COMPENSATABLE, SERVICES
from tests.chaos.oracle import (
    LogScan,
    chain_trace_problems,
    fold_problems,
    ledger_problems,
    seq_problems,
)

PARTITIONS = 2
MAX_SAGAS = 4

_BRIEF = RetryPolicy(max_attempts=2, initial_backoff=0.5, max_backoff=1.0, jitter=0.0)
"""Compensatable actions give up after two attempts, so lost commands lead to timeouts and
compensations of steps whose outcome is unknown."""
_ENDLESS = RetryPolicy(max_attempts=200, initial_backoff=0.5, max_backoff=1.0, jitter=0.0)
"""More attempts than a run has rules: the pivot, the retriable step and the compensations."""

DEFINITION = SagaDefinition(
    name=CHAIN.name,
    steps=tuple(
        s.model_copy(
            update={
                "retry": _BRIEF if s.name in COMPENSATABLE else _ENDLESS,
                "compensation_retry": _ENDLESS,
                "timeout": 5.0,
            }
        )
        for s in CHAIN.steps
    ),
)

_FAULTS = {
    **dict.fromkeys(COMPENSATABLE, ("business", "tech", "comp_tech")),
    "p": ("business", "tech"),
    "r": ("tech",),
}
_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "business": st.just(True),
    "tech": st.integers(1, 2),
    "comp_tech": st.integers(1, 2),
}

plans = st.fixed_dictionaries(
    {},
    optional={
        step: st.fixed_dictionaries({}, optional={k: _VALUES[k] for k in keys})
        for step, keys in _FAULTS.items()
    },
).map(lambda plan: _one_business_failure(plan))


def _one_business_failure(plan: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """At most one business failure per saga, as `tests.chaos.workload.random_plan` plans."""
    seen = False
    for step in ("a", "b", "c", "p"):
        faults = plan.get(step)
        if faults and faults.get("business"):
            if seen:
                del faults["business"]
            seen = True
    return plan


@dataclass
class MemoryLedger:
    """The services' side effects, with the semantics of `tests.chaos.app.Ledger`."""

    effects: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    applied: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    voids: set[tuple[str, str]] = field(default_factory=set)
    runs: Counter[str] = field(default_factory=Counter)

    def apply(self, ctx: StepContext) -> str:
        what = (ctx.saga_id, ctx.step, ctx.phase)
        if ctx.phase == "action":
            undone = (ctx.saga_id, ctx.step) in self.voids or any(
                e == (ctx.saga_id, ctx.step, "compensation") for e in self.effects.values()
            )
            if undone:
                return "refused"
        elif (ctx.saga_id, ctx.step, "action") not in self.effects.values():
            self.voids.add((ctx.saga_id, ctx.step))
            return "void"
        if ctx.idempotency_key in self.effects:
            return "already"
        self.effects[ctx.idempotency_key] = what
        self.applied[what] += 1
        return "applied"

    def counts(self) -> dict[tuple[str, str, str], int]:
        return dict(Counter(self.effects.values()))


async def _handler(ledger: MemoryLedger, payload: dict[str, Any], ctx: StepContext) -> Any:
    compensating = ctx.phase == "compensation"
    saga_input = payload.get("input") if compensating else payload
    plan = ((saga_input or {}).get("plan") or {}).get(ctx.step) or {}
    pre = "comp_" if compensating else ""
    ledger.runs[ctx.idempotency_key] += 1
    if ledger.runs[ctx.idempotency_key] <= int(plan.get(pre + "tech", 0)):
        raise RuntimeError("injected technical failure")
    if not compensating and plan.get("business"):
        raise StepFailed("injected business failure")
    if ledger.apply(ctx) == "refused":
        raise StepFailed("compensated before this action arrived")
    return {"key": ctx.idempotency_key}


async def _host(
    run: Callable[..., Coroutine[Any, Any, None]], *, task_status: TaskStatus[anyio.CancelScope]
) -> None:
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            await tg.start(run)
            task_status.started(scope)


class PromptTransport(MemoryTransport):
    """The memory transport, with polls that return as soon as anything happens.

    The memory consumer's poll waits for records until its timeout; a clock advance (an empty
    append) wakes it, but it goes back to waiting, so a due timer would fire only when the
    coordinator's poll times out (up to 0.5 s of real time). Returning early with no records is
    within the port's contract (Kafka's own fetch does it) and keeps the runs fast.
    """

    @asynccontextmanager
    async def consumer(
        self, group_id: str, topics: Sequence[str], listener: RebalanceListener | None = None
    ) -> AsyncIterator[_MemoryConsumer]:
        async with super().consumer(group_id, topics, listener) as member:
            wait = member.poll

            async def poll(timeout: float, max_records: int = 500) -> list[Record]:
                records = await wait(0, max_records)
                if not records:
                    await self.broker.wait_for_change(timeout)
                    records = await wait(0, max_records)
                return records

            member.poll = poll  # type: ignore[method-assign]
            yield member


class World:
    """Everything that lives in the portal's event loop: broker, clock, engine, network."""

    def __init__(self) -> None:
        self.broker = MemoryBroker(default_partitions=PARTITIONS)
        self.clock = VirtualClock(on_advance=self.broker.wake)
        self.transport = PromptTransport(self.broker)
        self.engine = Topics("saga")
        self.net = Topics("net")
        self.ledger = MemoryLedger()
        self.stores = {s: MemoryReplyStore() for s in SERVICES}
        self.in_flight: list[tuple[str, Record]] = []
        """Messages on the network: (destination topic, record)."""
        self.cursors: Counter[tuple[str, int]] = Counter()
        self.sagas: dict[str, dict[str, Any]] = {}
        self.scopes: dict[str, anyio.CancelScope] = {}
        self.coordinator = self._coordinator()
        self.stats: Counter[str] = Counter()

    def _coordinator(self) -> Coordinator:
        return Coordinator(
            [DEFINITION],
            transport=self.transport,
            prefix="saga",
            partitions=PARTITIONS,
            clock=self.clock,
        )

    def _participant(self, service: str) -> Participant:
        participant = Participant(service, store=self.stores[service])
        for step in DEFINITION.steps:
            if step.service == service:
                handler = functools.partial(_handler, self.ledger)
                participant.handler(step.action)(handler)
                if step.compensation:
                    participant.handler(step.compensation)(handler)
        return participant

    async def boot(self, *, task_status: TaskStatus[None]) -> None:
        topics = [self.engine.requests, self.engine.replies, self.engine.log]
        topics += [self.engine.commands(s) for s in SERVICES] + [self.net.replies]
        topics += [self.net.commands(s) for s in SERVICES]
        await self.transport.ensure_topics(topics, PARTITIONS)
        async with anyio.create_task_group() as tg:
            self.tg = tg
            self.scopes["coordinator"] = await tg.start(_host, self.coordinator.run)
            for service in SERVICES:
                run = functools.partial(
                    self._participant(service).run,
                    self.transport,
                    prefix="net",
                    partitions=PARTITIONS,
                    clock=self.clock,
                )
                self.scopes[service] = await tg.start(_host, run)
            task_status.started()
            await anyio.sleep_forever()

    # -- what the rules do -------------------------------------------------------------------

    async def start(self, plan: dict[str, Any]) -> None:
        saga_input = {"plan": plan}
        saga_id = await self.coordinator.start("chain", saga_input, f"s{len(self.sagas)}")
        self.sagas[saga_id] = saga_input
        await self.settle()

    async def deliver(self, index: int, *, keep: bool = False) -> None:
        topic, record = self.in_flight[index] if keep else self.in_flight.pop(index)
        self.broker.append([Outgoing(topic, record.key, record.value, record.headers)])
        await self.settle()

    async def drop(self, index: int) -> None:
        self.in_flight.pop(index)

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await self.settle()

    async def crash_coordinator(self) -> None:
        self.scopes["coordinator"].cancel()
        await anyio.lowlevel.checkpoint()
        self.coordinator = self._coordinator()
        self.scopes["coordinator"] = await self.tg.start(_host, self.coordinator.run)
        await self.settle()

    async def crash_participant(self, service: str) -> None:
        self.scopes[service].cancel()
        await anyio.lowlevel.checkpoint()
        run = functools.partial(
            self._participant(service).run,
            self.transport,
            prefix="net",
            partitions=PARTITIONS,
            clock=self.clock,
        )
        self.scopes[service] = await self.tg.start(_host, run)
        await self.settle()

    # -- the network -------------------------------------------------------------------------

    def _collect(self) -> None:
        """Moves what the engine and the services wrote onto the network."""
        routes = [(self.engine.commands(s), self.net.commands(s)) for s in SERVICES]
        routes.append((self.net.replies, self.engine.replies))
        for source, destination in routes:
            for partition, log in enumerate(self.broker.topics.get(source, [])):
                start = self.cursors[(source, partition)]
                for record in log[start:]:
                    self.in_flight.append((destination, record))
                self.cursors[(source, partition)] = len(log)

    def _idle(self) -> bool:
        """Every consumer has committed everything it can read."""
        groups = [(self.engine.coordinator_group, [self.engine.requests, self.engine.replies])]
        groups += [(self.net.participant_group(s), [self.net.commands(s)]) for s in SERVICES]
        for group_id, topics in groups:
            group = self.broker.groups.get(group_id)
            if group is None or not group.members:
                return False
            for topic in topics:
                for partition, log in enumerate(self.broker.topics.get(topic, [])):
                    if group.committed.get((topic, partition), 0) < len(log):
                        return False
        return True

    async def states(self) -> dict[str, SagaState]:
        found = {}
        for saga_id in self.sagas:
            state = await self.coordinator.status(saga_id)
            if state is not None:
                found[saga_id] = state
        return found

    async def settle(self) -> None:
        """Waits until the engine and the services have nothing left to do, then collects."""
        for _ in range(2000):
            await self.broker.wait_for_change(0.002)
            if self._idle():
                now = self.clock.now()
                states = await self.states()
                due = [t for s in states.values() if (t := next_due(s)) is not None and t <= now]
                if not due and len(states) == len(self.sagas):
                    self._collect()
                    return
        raise AssertionError("the engine did not settle")

    async def be_fair(self) -> dict[str, SagaState]:
        """Delivers everything and lets time pass until every saga has ended."""
        for _ in range(500):
            self._collect()
            if self.in_flight:
                while self.in_flight:
                    await self.deliver(0)
                continue
            states = await self.states()
            waiting = [s for s in states.values() if not s.is_final]
            if not waiting:
                return states
            due = [t for s in waiting if (t := next_due(s)) is not None]
            assert due, f"sagas wait for nothing: {[s.saga_id for s in waiting]}"
            await self.advance(max(0.0, min(due) - self.clock.now()) + 0.001)
        raise AssertionError("the sagas did not end once the network was fair")

    def scan(self) -> LogScan:
        scan = LogScan()
        for record in self.broker.records(self.engine.log):
            event = decode(event_adapter, record.value)
            scan.events[event.saga_id].append(event)
            scan.records += 1
        return scan


class HostileNetwork(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._stack = ExitStack()
        self.portal: BlockingPortal = self._stack.enter_context(start_blocking_portal())
        self.world = World()
        self._boot, _ = self.portal.start_task(self.world.boot)

    def _call(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        return self.portal.call(functools.partial(fn, *args, **kwargs))

    @precondition(lambda self: len(self.world.sagas) < MAX_SAGAS)
    @rule(plan=plans)
    def start_saga(self, plan: dict[str, Any]) -> None:
        self._call(self.world.start, plan)

    @precondition(lambda self: self.world.in_flight)
    @rule(pick=st.integers(0, 10_000))
    def deliver(self, pick: int) -> None:
        self._call(self.world.deliver, pick % len(self.world.in_flight))

    @precondition(lambda self: self.world.in_flight)
    @rule(pick=st.integers(0, 10_000))
    def duplicate(self, pick: int) -> None:
        self._call(self.world.deliver, pick % len(self.world.in_flight), keep=True)

    @precondition(lambda self: self.world.in_flight)
    @rule(pick=st.integers(0, 10_000))
    def drop(self, pick: int) -> None:
        self._call(self.world.drop, pick % len(self.world.in_flight))

    @rule(seconds=st.sampled_from([0.3, 1.0, 2.5, 6.0]))
    def advance_clock(self, seconds: float) -> None:
        self._call(self.world.advance, seconds)

    @precondition(lambda self: self.world.stats["coordinator crashes"] < 4)
    @rule()
    def crash_coordinator(self) -> None:
        self.world.stats["coordinator crashes"] += 1
        self._call(self.world.crash_coordinator)

    @precondition(lambda self: self.world.stats["participant crashes"] < 4)
    @rule(service=st.sampled_from(SERVICES))
    def crash_participant(self, service: str) -> None:
        self.world.stats["participant crashes"] += 1
        self._call(self.world.crash_participant, service)

    @invariant()
    def no_effect_twice(self) -> None:
        twice = {k: n for k, n in self.world.ledger.applied.items() if n > 1}
        assert not twice, f"effects applied more than once: {twice}"

    @invariant()
    def traces_are_legal(self) -> None:
        scan = self.world.scan()
        problems = seq_problems(scan, self.world.sagas) + fold_problems(scan)
        for saga_id, events in scan.events.items():
            problems += chain_trace_problems(saga_id, events)
        assert not problems, "\n".join(problems)

    def teardown(self) -> None:
        try:
            states = self._call(self.world.be_fair)
            scan = self.world.scan()
            effects = self.world.ledger.counts()
            problems = []
            for saga_id, saga_input in self.world.sagas.items():
                status = states[saga_id].status
                if status not in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED):
                    problems.append(f"saga {saga_id} ended {status.value}")
                business = any(f.get("business") for f in saga_input["plan"].values())
                if business and status is not SagaStatus.COMPENSATED:
                    problems.append(f"saga {saga_id} has a business failure but {status.value}")
                problems += chain_trace_problems(saga_id, scan.events[saga_id])
                problems += ledger_problems(saga_id, status, effects)
            assert not problems, "\n".join(problems)
        finally:
            self._boot.cancel()
            self._stack.close()


HostileNetwork.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_hostile_network = HostileNetwork.TestCase


def test_late_attempt_after_retries_ran_out_is_undone() -> None:
    with start_blocking_portal() as portal:
        world = World()
        boot, _ = portal.start_task(world.boot)
        try:

            def call(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
                return portal.call(functools.partial(fn, *args))

            call(world.start, {"a": {"tech": 1}})  # the first run of a's handler fails
            call(world.advance, 6.0)  # attempt 1 of a times out: its command is still on its way
            call(world.advance, 1.0)  # attempt 2 is sent after the backoff
            (second,) = [
                i
                for i, (_, record) in enumerate(world.in_flight)
                if b'"attempt":2' in (record.value or b"")
            ]
            call(world.deliver, second)  # attempt 2 runs first and fails: retries ran out
            states = call(world.be_fair)  # then attempt 1 arrives and takes effect
        finally:
            boot.cancel()
    effects = world.ledger.counts()
    (saga_id,) = world.sagas
    assert states[saga_id].status is SagaStatus.COMPENSATED
    assert effects.get((saga_id, "a", "action"), 0) == effects.get(
        (saga_id, "a", "compensation"), 0
    ), f"a took effect and was never undone: {effects}"


def _find(world: World, needle: Callable[[str, Record], bool]) -> int:
    (index,) = [i for i, (dest, r) in enumerate(world.in_flight) if needle(dest, r)]
    return index


def _command(attempt: int) -> Callable[[str, Record], bool]:
    return lambda dest, r: (
        ".commands." in dest and f'"attempt":{attempt}'.encode() in (r.value or b"")
    )


def _reply(dest: str, record: Record) -> bool:
    return dest.endswith(".replies")


def test_redelivered_command_after_retries_ran_out_is_undone() -> None:
    with start_blocking_portal() as portal:
        world = World()
        boot, _ = portal.start_task(world.boot)
        try:

            def call(fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
                return portal.call(functools.partial(fn, *args, **kwargs))

            call(world.start, {"a": {"tech": 2}})  # a's handler fails its first two runs
            call(world.deliver, _find(world, _command(1)))  # run 1: technical failure
            call(world.deliver, _find(world, _reply))  # a retry is scheduled
            call(world.advance, 1.0)  # attempt 2 is sent
            # Attempt 2 is delivered (run 2: technical failure) and will be delivered again.
            call(world.deliver, _find(world, _command(2)), keep=True)
            call(world.deliver, _find(world, _reply))  # retries ran out: the saga compensates
            states = call(world.be_fair)  # the redelivery runs the handler a third time
        finally:
            boot.cancel()
    effects = world.ledger.counts()
    (saga_id,) = world.sagas
    assert states[saga_id].status is SagaStatus.COMPENSATED
    assert effects.get((saga_id, "a", "action"), 0) == effects.get(
        (saga_id, "a", "compensation"), 0
    ), f"a took effect and was never undone: {effects}"
