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
clock to the next deadline or retry whenever nothing else is happening.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskStatus

from saga.adapters.memory import MemoryBroker, MemoryTransport
from saga.core.codec import decode
from saga.core.decide import next_due
from saga.core.definition import SagaDefinition
from saga.core.messages import Alert, EventBase, event_adapter
from saga.core.state import SagaState
from saga.errors import SagaTimeout, StepFailed
from saga.runtime.coordinator import Coordinator
from saga.runtime.participant import Participant, StepContext, _Registered

__all__ = ["SagaHarness", "VirtualClock"]


class VirtualClock:
    """A clock that moves only when told to.

    Args:
        start: The initial time, in seconds since the epoch.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._broker: MemoryBroker | None = None
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
        """Moves time forward and wakes whoever waits on the broker."""
        self._now += seconds
        self._wake_due()
        if self._broker is not None:
            self._broker.append([])  # a no-op write that wakes pollers


async def _host(run: Any, *, task_status: TaskStatus[anyio.CancelScope]) -> None:
    # Each component runs in its own cancel scope so that one can be stopped alone.
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
    """

    def __init__(
        self,
        definitions: Iterable[SagaDefinition],
        participants: Sequence[Participant],
        *,
        partitions: int = 3,
    ) -> None:
        self.clock = VirtualClock()
        self.broker = MemoryBroker(default_partitions=partitions)
        self.clock._broker = self.broker
        self.transport = MemoryTransport(self.broker)
        self.alerts: list[Alert] = []
        self._calls: dict[str, list[str]] = defaultdict(list)
        self._faults: dict[tuple[str, str], _Fault] = {}
        self.coordinator = Coordinator(
            definitions,
            transport=self.transport,
            partitions=partitions,
            clock=self.clock,
            alert_hooks=[self._on_alert],
        )
        self.participants = list(participants)
        self._stack = AsyncExitStack()

    async def _on_alert(self, alert: Alert) -> None:
        self.alerts.append(alert)

    async def __aenter__(self) -> SagaHarness:
        self._tg = await self._stack.enter_async_context(anyio.create_task_group())
        self._stack.callback(self._tg.cancel_scope.cancel)
        try:
            self._coordinator_scope = await self._tg.start(_host, self.coordinator.run)
            for p in self.participants:
                p.transport = self.transport
                p.clock = self.clock
                for action, registered in list(p._handlers.items()):
                    p._handlers[action] = self._instrument(p.service, action, registered)
                await self._tg.start(_host, p.run)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def restart_coordinator(self) -> None:
        """Stops the coordinator as a crash would (nothing flushed beyond the last committed
        transaction) and starts a new one, which recovers from the snapshots and the log."""
        self._coordinator_scope.cancel()
        await anyio.sleep(0.01)  # lets the old one leave the group
        self.coordinator = Coordinator(
            self.coordinator._latest.values(),
            transport=self.transport,
            partitions=self.coordinator.partition_count,
            clock=self.clock,
            alert_hooks=[self._on_alert],
            observer=self.coordinator.observer,
        )
        self._coordinator_scope = await self._tg.start(_host, self.coordinator.run)

    def _instrument(self, service: str, action: str, inner: _Registered) -> _Registered:
        async def wrapped(payload: dict[str, Any], ctx: StepContext) -> Any:
            self._calls[service].append(action)
            fault = self._faults.get((service, action))
            if fault is not None and fault.remaining != 0:
                if fault.remaining is not None:
                    fault.remaining -= 1
                if fault.business:
                    raise StepFailed(fault.message)
                raise RuntimeError(fault.message)
            if inner.is_async:
                return await inner.fn(payload, ctx)  # type: ignore[misc]
            result = inner.fn(payload, ctx)
            return await result if inspect.isawaitable(result) else result

        return _Registered(wrapped, inner.input_model, True)

    # -- faults and observations -------------------------------------------------------------

    def fail(
        self, service: str, action: str, *, times: int | None = None, business: bool = False
    ) -> None:
        """Makes a handler fail: a business failure, or a technical one (retried by policy).

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
        self._faults[(service, "*drop*")] = _Fault(False, count, "dropped")
        topic = self.coordinator.topics.commands(service)
        original = self.broker.append

        def append(records: Any) -> list[int]:
            fault = self._faults.get((service, "*drop*"))
            kept, dropped = [], set()
            for i, r in enumerate(records):
                if r.topic == topic and fault is not None and fault.remaining:
                    fault.remaining -= 1
                    dropped.add(i)
                else:
                    kept.append(r)
            offsets = iter(original(kept))
            # A lost record has no offset; -1 keeps positions aligned for the caller.
            return [-1 if i in dropped else next(offsets) for i in range(len(records))]

        self.broker.append = append  # type: ignore[method-assign]

    def calls(self, service: str) -> list[str]:
        """The handler names called on ``service``, in order."""
        return list(self._calls[service])

    def events(self, saga_id: str) -> list[EventBase]:
        """The saga's events, read from the in-memory log."""
        key = saga_id.encode()
        return [
            decode(event_adapter, r.value)
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

    async def status(self, saga_id: str) -> SagaState | None:
        """The saga's current state."""
        return await self.coordinator.status(saga_id)

    async def run_until_done(
        self, saga_id: str, *, max_virtual_seconds: float = 86_400
    ) -> SagaState:
        """Runs until the saga ends, advancing virtual time whenever nothing else happens.

        Raises:
            SagaTimeout: It did not end within ``max_virtual_seconds`` of virtual time, or it
                waits for something that never comes (no handler, no timer).
        """
        limit = self.clock.now() + max_virtual_seconds
        idle_rounds = 0
        while True:
            state = await self.coordinator.status(saga_id)
            if state is not None and state.is_final:
                return state
            before = sum(len(p) for parts in self.broker.topics.values() for p in parts)
            await self.broker.wait_for_change(0.02)
            await anyio.sleep(0.005)
            after = sum(len(p) for parts in self.broker.topics.values() for p in parts)
            if after != before:
                idle_rounds = 0
                continue
            idle_rounds += 1
            if idle_rounds < 3:
                continue
            due = next_due(state) if state is not None else None
            if due is None or due > limit:
                where = state.status.value if state else "not started"
                raise SagaTimeout(f"saga {saga_id!r} is {where} and nothing more is due")
            self.clock.advance(max(0.0, due - self.clock.now()) + 0.001)
            idle_rounds = 0
