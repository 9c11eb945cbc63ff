"""Run sagas in-process for unit tests: the memory transport, virtual time, injected faults.

Example::

    async def test_refund_when_restaurant_refuses() -> None:
        async with SagaHarness([order_saga], [payment, restaurant]) as h:
            h.fail("restaurant", "accept", business=True)
            saga_id = await h.start("order", {"amount": 12})
            state = await h.run_until_done(saga_id)
            assert state.status is SagaStatus.COMPENSATED
            assert h.calls("payment") == ["charge", "refund"]

The coordinator and participants are the real ones; only the broker (`MemoryBroker`) and the
clock (`VirtualClock`) are substitutes. Time stands still until the harness advances it, so
retry backoffs and step deadlines of minutes take no real time: `run_until_done` advances the
clock to the next deadline or retry whenever nothing else is happening (and no handler is
running).

The harness reaches the participants through their public hooks only: it runs each one with
``participant.run(transport, clock=...)`` and observes and injects faults with an interceptor
(`saga.Participant.intercept`) that it removes on exit, so participants declared once at module
level can be used by one harness after another, and a `SagaHarness.fail` of one test never
reaches the next. Plain (sync) handlers run in a worker thread, as they do in production.
"""

from __future__ import annotations

import contextvars
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskStatus

from saga.adapters.memory import MemoryBroker, MemoryTransport
from saga.core.codec import ENGINE_LIMITS, decode
from saga.core.definition import SagaDefinition
from saga.core.messages import Alert, EventBase, event_adapter
from saga.core.state import SagaState, StepStatus
from saga.errors import SagaTimeout, StepFailed
from saga.runtime.client import SagaClient
from saga.runtime.coordinator import Coordinator
from saga.runtime.observe import Observer
from saga.runtime.participant import (
    CallNext,
    HandlerResult,
    Interception,
    Interceptor,
    Participant,
    StepContext,
)
from saga.runtime.ports import Outgoing
from saga.runtime.retention import Retention

__all__ = ["SagaHarness", "VirtualClock"]

# The harness whose tasks are running: its interceptors act only on its own participants' runs,
# so that two harnesses over the same participants (one after the other, or at once) stay apart.
_current: contextvars.ContextVar[SagaHarness | None] = contextvars.ContextVar(
    "saga_testing_harness", default=None
)


class VirtualClock:
    """A clock that moves only when told to.

    Args:
        start: The initial time, in seconds since the epoch.
        on_advance: Called after each `advance`, to wake whoever waits on something other than
            this clock (`SagaHarness` passes `MemoryBroker.wake`, so that pollers look at their
            timers again).
    """

    def __init__(
        self,
        start: float = 1_700_000_000.0,
        *,
        on_advance: Callable[[], object] | None = None,
    ) -> None:
        self._now = start
        self._on_advance = on_advance
        self._sleepers: list[tuple[float, anyio.Event]] = []

    def now(self) -> float:
        """The virtual time."""
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Returns once virtual time has moved ``seconds`` forward."""
        wake = anyio.Event()
        self._sleepers.append((self._now + seconds, wake))
        self._wake_due()
        await wake.wait()

    def _wake_due(self) -> None:
        for until, wake in [s for s in self._sleepers if s[0] <= self._now]:
            self._sleepers.remove((until, wake))
            wake.set()

    def advance(self, seconds: float) -> None:
        """Moves time forward, wakes the sleepers now due, and calls ``on_advance``."""
        self._now += seconds
        self._wake_due()
        if self._on_advance is not None:
            self._on_advance()


async def _host(
    run: Callable[..., Coroutine[Any, Any, None]],
    harness: SagaHarness,
    *,
    task_status: TaskStatus[anyio.CancelScope],
) -> None:
    # Each component runs in its own cancel scope so that one can be stopped alone, and with
    # the harness as its context, which the tasks it spawns inherit.
    _current.set(harness)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            await tg.start(run)
            task_status.started(scope)


@dataclass
class _Fault:
    business: bool
    remaining: int | None  # None: every time
    message: str


class SagaHarness:
    """A coordinator and participants on an in-memory broker, with virtual time.

    Args:
        definitions: The sagas to run.
        participants: The services' participants (their handlers are called for real).
        partitions: Partitions of the in-memory topics.
        observer: Given to the coordinator and to every participant (tracing, metrics).
        retention: How long the coordinator keeps finished sagas (`saga.runtime.retention`).
    """

    def __init__(
        self,
        definitions: Iterable[SagaDefinition],
        participants: Sequence[Participant],
        *,
        partitions: int = 3,
        observer: Observer | None = None,
        retention: Retention | None = None,
    ) -> None:
        self.broker = MemoryBroker(default_partitions=partitions)
        self.retention = retention or Retention()
        self.clock = VirtualClock(on_advance=self.broker.wake)
        self.transport = MemoryTransport(self.broker)
        self.partitions = partitions
        self.observer = observer
        self.alerts: list[Alert] = []
        self._calls: dict[str, list[str]] = defaultdict(list)
        self._faults: dict[tuple[str, str], _Fault] = {}
        self._drops: dict[str, int] = defaultdict(int)
        self._running = 0
        self.coordinator = self._new_coordinator(definitions)
        self.participants = list(participants)
        self._stack = AsyncExitStack()

    def _new_coordinator(self, definitions: Iterable[SagaDefinition]) -> Coordinator:
        return Coordinator(
            definitions,
            transport=self.transport,
            partitions=self.partitions,
            clock=self.clock,
            alert_hooks=[self._on_alert],
            observer=self.observer,
            evict_after=self.retention.evict_after,
            tombstone_after=self.retention.tombstone_after,
        )

    async def _on_alert(self, alert: Alert) -> None:
        self.alerts.append(alert)

    async def __aenter__(self) -> SagaHarness:
        stack = self._stack
        try:
            # Undone last (after the tasks stopped): the interceptors and the broker's filter.
            self.broker.append_filters.append(self._keep)
            stack.callback(self.broker.append_filters.remove, self._keep)
            interceptions: list[Interception] = []
            for p in self.participants:
                interceptions.append(p.intercept(self._interceptor(p.service)))
                stack.callback(interceptions[-1].remove)
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(self._tg.cancel_scope.cancel)
            self._coordinator_scope = await self._tg.start(_host, self.coordinator.run, self)
            for p in self.participants:
                run = partial(
                    p.run,
                    self.transport,
                    partitions=self.partitions,
                    observer=self.observer,
                    clock=self.clock,
                )
                await self._tg.start(_host, run, self)
        except BaseException:
            await stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def restart_coordinator(self) -> None:
        """Stops the coordinator as a crash would (nothing flushed beyond the last committed
        transaction) and starts a new one, which recovers from the snapshots and the log."""
        self._coordinator_scope.cancel()
        await anyio.sleep(0.01)  # lets the old one leave the group
        self.coordinator = self._new_coordinator(self.coordinator.catalog.all())
        self._coordinator_scope = await self._tg.start(_host, self.coordinator.run, self)

    def _interceptor(self, service: str) -> Interceptor:
        async def intercept(
            payload: dict[str, Any], ctx: StepContext, call_next: CallNext
        ) -> HandlerResult:
            if _current.get() is not self:
                return await call_next(payload, ctx)  # another harness's run
            self._calls[service].append(ctx.action)
            self._running += 1
            try:
                fault = self._faults.get((service, ctx.action))
                if fault is not None and fault.remaining != 0:
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    if fault.business:
                        raise StepFailed(fault.message)
                    raise RuntimeError(fault.message)
                return await call_next(payload, ctx)
            finally:
                self._running -= 1

        return intercept

    def _keep(self, record: Outgoing) -> bool:
        for service, count in self._drops.items():
            if count and record.topic == self.coordinator.topics.commands(service):
                self._drops[service] = count - 1
                return False
        return True

    # -- faults and observations -------------------------------------------------------------

    def fail(
        self, service: str, action: str, *, times: int | None = None, business: bool = False
    ) -> None:
        """Makes a handler fail: a business failure, or a technical one (retried by policy).

        The fault lasts as long as this harness: the participant is left as it was on exit.

        Args:
            service: The participant's service name.
            action: The action or compensation name.
            times: Fail this many calls, then behave normally; ``None`` fails every call.
            business: Raise `saga.StepFailed` instead of a technical error.
        """
        kind = "business" if business else "technical"
        self._faults[(service, action)] = _Fault(business, times, f"injected {kind} failure")

    def drop_commands(self, service: str, count: int = 1) -> None:
        """Loses the next ``count`` commands to ``service`` before they are handled (a lost
        message: the step's deadline, then its retry policy, must recover)."""
        self._drops[service] += count

    def calls(self, service: str) -> list[str]:
        """The handler names called on ``service``, in order."""
        return list(self._calls[service])

    def events(self, saga_id: str) -> list[EventBase]:
        """The saga's events, read from the in-memory log."""
        key = saga_id.encode()
        return [
            decode(event_adapter, r.value, ENGINE_LIMITS)
            for r in self.broker.records(self.coordinator.topics.log)
            if r.key == key
        ]

    def dead_letters(self) -> list[Mapping[str, bytes]]:
        """The dead-letter topic's records' headers."""
        return [dict(r.headers) for r in self.broker.records(self.coordinator.topics.dlq)]

    # -- driving -----------------------------------------------------------------------------

    async def start(self, name: str, input: Mapping[str, Any], saga_id: str | None = None) -> str:
        """Starts a saga and returns its id."""
        return await self.coordinator.start(name, input, saga_id)

    async def cancel(self, saga_id: str, reason: str = "cancelled by request") -> int:
        """Asks for the saga to be cancelled; returns its ``seq`` for ``run_until_done(after=)``."""
        return await self.coordinator.cancel(saga_id, reason)

    async def retry(self, saga_id: str) -> int:
        """Re-drives a stuck saga; returns its ``seq`` for ``run_until_done(after=)``."""
        return await self.coordinator.retry(saga_id)

    async def resolve(self, saga_id: str, note: str = "resolved by an operator") -> int:
        """Declares a stuck saga's stuck steps handled; returns its ``seq`` for
        ``run_until_done(after=)``."""
        return await self.coordinator.resolve(saga_id, note)

    async def signal(
        self, saga_id: str, name: str, data: Mapping[str, Any] | None = None, *, by: str = "tester"
    ) -> int:
        """Delivers the signal ``name`` to the saga, sent as ``by``; returns its ``seq``."""
        async with self._client(by) as client:
            return await client.signal(saga_id, name, data)

    async def approve(self, saga_id: str, step: str, note: str = "", *, by: str = "tester") -> int:
        """Approves ``step`` as ``by`` (which must be one of its approvers, if it names any);
        returns the saga's ``seq``."""
        async with self._client(by) as client:
            return await client.approve(saga_id, step, note)

    async def reject(self, saga_id: str, step: str, note: str = "", *, by: str = "tester") -> int:
        """Rejects ``step`` as ``by``; returns the saga's ``seq``."""
        async with self._client(by) as client:
            return await client.reject(saga_id, step, note)

    def _client(self, actor: str) -> SagaClient:
        return SagaClient(self.transport, partitions=self.partitions, clock=self.clock, actor=actor)

    async def status(self, saga_id: str) -> SagaState | None:
        """The saga's current state."""
        return await self.coordinator.status(saga_id)

    async def run_until_waiting(
        self, saga_id: str, step: str, *, max_virtual_seconds: float = 86_400
    ) -> SagaState:
        """Runs until ``step`` is running (a ``wait`` step waiting for its signal, an
        ``approval`` step for a decision), advancing virtual time as `run_until_done` does.

        Raises:
            SagaTimeout: The saga ended, or nothing more is due, before the step ran.
        """
        return await self.run_until(
            saga_id,
            lambda s: s.steps.get(step) is not None and s.steps[step].status is StepStatus.RUNNING,
            f"step {step!r} running",
            max_virtual_seconds=max_virtual_seconds,
        )

    async def run_until_done(
        self, saga_id: str, *, after: int = 0, max_virtual_seconds: float = 86_400
    ) -> SagaState:
        """Runs until the saga ends, advancing virtual time whenever nothing else happens.

        Args:
            saga_id: The saga.
            after: Only a final state with a ``seq`` past this counts: pass what `retry`,
                `resolve` or `cancel` returned to run until what the request led to (a stuck
                saga is final, so without it the old stuck state is returned at once).
            max_virtual_seconds: How far virtual time may move at most.

        Raises:
            SagaTimeout: It did not end within ``max_virtual_seconds`` of virtual time, or it
                waits for something that never comes (no handler, no timer).
        """
        return await self.run_until(
            saga_id,
            lambda s: s.is_final and s.seq > after,
            f"past seq {after}",
            max_virtual_seconds=max_virtual_seconds,
        )

    async def run_until(
        self,
        saga_id: str,
        until: Callable[[SagaState], bool],
        what: str = "the condition",
        *,
        max_virtual_seconds: float = 86_400,
    ) -> SagaState:
        """Runs until the saga's state satisfies ``until``, advancing virtual time to the next
        timer whenever nothing else happens.

        Raises:
            SagaTimeout: ``until`` did not hold within ``max_virtual_seconds`` of virtual time,
                or nothing more is due (no handler at work, no timer).
        """
        limit = self.clock.now() + max_virtual_seconds
        idle_rounds = 0
        while True:
            state = await self.coordinator.status(saga_id)
            if state is not None and until(state):
                return state
            before = self._written()
            await self.broker.wait_for_change(0.02)
            await anyio.sleep(0.005)
            if self._written() != before or self._running:
                idle_rounds = 0  # something happened, or a handler is still at work
                continue
            idle_rounds += 1
            if idle_rounds < 3:
                continue
            # The earliest timer of any saga, not only this one's: a sub-saga, or another saga
            # this one waits for (a signal it sends), may be due first. A final saga has no
            # timers: only a request (a retry, a resolve) moves it on.
            due = self.coordinator.next_timer()
            if due is None or due > limit:
                where = state.status.value if state else "not started"
                if state is not None:
                    where += f" at seq {state.seq}"
                raise SagaTimeout(
                    f"saga {saga_id!r} is {where}, not {what}, and nothing more is due"
                )
            self.clock.advance(max(0.0, due - self.clock.now()) + 0.001)
            idle_rounds = 0

    def _written(self) -> int:
        return sum(len(p) for parts in self.broker.topics.values() for p in parts)
