"""Growth is bounded: finished sagas leave memory, then the snapshots; polls do not rescan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

from saga import (
    Participant,
    SagaDefinition,
    SagaStatus,
    SagaTimeout,
    Step,
    StepContext,
    StepFailed,
)
from saga.adapters.memory import MemoryBroker, MemoryTransport
from saga.core.codec import encode
from saga.core.messages import Reply
from saga.runtime.client import SagaClient
from saga.runtime.coordinator import Coordinator
from saga.runtime.ports import Outgoing, Record, Topics
from saga.runtime.retention import Retention
from saga.testing import SagaHarness

pytestmark = pytest.mark.anyio

ONE = SagaDefinition(
    name="one",
    steps=[Step(name="only", service="svc", action="do", kind="pivot", timeout=600)],
)


def service() -> Participant:
    p = Participant("svc")

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"done": payload.get("n")}

    return p


SVC = service()


async def _until(h: SagaHarness, holds: Callable[[], bool]) -> None:
    """Waits (a few real seconds at most) for the coordinator's loop to make ``holds`` true
    after virtual time moved: it evicts and tombstones on its own, within a poll."""
    with anyio.fail_after(5):
        while not holds():
            await h.broker.wait_for_change(0.05)


async def _idle(h: SagaHarness) -> None:
    """Gives the coordinator's loop time for a poll or two (for what must NOT happen)."""
    await anyio.sleep(1.2)


async def test_finished_sagas_leave_memory_but_status_still_answers() -> None:
    retention = Retention(evict_after=60, tombstone_after=3600)
    async with SagaHarness([ONE], [SVC], retention=retention) as h:
        ids = [await h.start("one", {"n": n}) for n in range(5)]
        finals = [await h.run_until_done(i) for i in ids]
        assert all(s.status is SagaStatus.COMPLETED for s in finals)
        assert h.coordinator.stats.held == 5
        h.clock.advance(61)
        await _until(h, lambda: h.coordinator.stats.held == 0)
        assert h.coordinator.stats.evicted == 5
        assert all(h.coordinator.local_status(i) is None for i in ids)
        # Still answered, from the snapshots.
        assert [await h.status(i) for i in ids] == finals


async def test_a_late_reply_for_an_evicted_saga_is_ignored_not_dead_lettered() -> None:
    retention = Retention(evict_after=1, tombstone_after=3600)
    async with SagaHarness([ONE], [SVC], retention=retention) as h:
        saga_id = await h.start("one", {"n": 1})
        await h.run_until_done(saga_id)
        h.clock.advance(2)
        await _until(h, lambda: h.coordinator.local_status(saga_id) is None)
        ignored = h.coordinator.stats.ignored
        late = Reply(
            message_id="late", saga_id=saga_id, step="only", phase="action", attempt=1,
            service="svc", ok=True, output={}, at=h.clock.now(),
        )  # fmt: skip
        topic = h.coordinator.topics.replies
        async with h.transport.producer() as producer:
            await producer.send([Outgoing(topic, saga_id.encode(), encode(late))])
        with anyio.fail_after(5):
            while h.coordinator.stats.ignored == ignored:
                await h.broker.wait_for_change(0.05)
        assert h.dead_letters() == []


async def test_a_duplicate_start_of_an_evicted_saga_starts_nothing() -> None:
    retention = Retention(evict_after=1, tombstone_after=3600)
    async with SagaHarness([ONE], [SVC], retention=retention) as h:
        saga_id = await h.start("one", {"n": 1})
        before = await h.run_until_done(saga_id)
        h.clock.advance(2)
        await _until(h, lambda: h.coordinator.local_status(saga_id) is None)
        events = len(h.events(saga_id))
        await h.start("one", {"n": 1}, saga_id)
        with anyio.fail_after(5):  # the request reloads the saga into memory, then is decided
            while h.coordinator.local_status(saga_id) is None:
                await h.broker.wait_for_change(0.05)
        await _idle(h)
        assert h.calls("svc") == ["do"]  # not run again
        assert (await h.status(saga_id)) is not None
        assert (await h.status(saga_id)).status is before.status  # type: ignore[union-attr]
        assert len(h.events(saga_id)) >= events
        assert all(e.type != "saga_started" for e in h.events(saga_id)[events:])


async def test_snapshots_are_tombstoned_later_and_the_history_stays_in_the_log() -> None:
    retention = Retention(evict_after=10, tombstone_after=100)
    async with SagaHarness([ONE], [SVC], retention=retention) as h:
        saga_id = await h.start("one", {"n": 1})
        await h.run_until_done(saga_id)
        h.clock.advance(11)
        await _until(h, lambda: h.coordinator.local_status(saga_id) is None)
        assert await h.status(saga_id) is not None
        h.clock.advance(90)
        await _until(h, lambda: h.coordinator.stats.tombstoned == 1)
        assert await h.status(saga_id) is None
        snapshots = h.broker.records(h.coordinator.topics.snapshots)
        assert [r.value for r in snapshots if r.key == saga_id.encode()][-1] is None
        assert h.events(saga_id)[-1].type == "saga_completed"  # the log keeps the history
        await h.restart_coordinator()
        await _until(h, lambda: h.coordinator.stats.recoveries == h.partitions)
        assert h.coordinator.local_status(saga_id) is None  # recovery brought nothing back


STUCKY = SagaDefinition(
    name="stucky",
    steps=[
        Step(name="first", service="svc", action="do", compensation="undo"),
        Step(name="then", service="svc", action="fail", kind="pivot", depends_on=["first"]),
    ],
)


async def test_stuck_sagas_are_never_evicted() -> None:
    svc = service()

    @svc.handler("undo")
    async def undo(payload: dict[str, Any], ctx: StepContext) -> None:
        raise RuntimeError("the undo is broken")  # retried until exhausted: stuck

    @svc.handler("fail")
    async def fail(payload: dict[str, Any], ctx: StepContext) -> None:
        raise StepFailed("no")

    retention = Retention(evict_after=1, tombstone_after=10)
    async with SagaHarness([STUCKY], [svc], retention=retention) as h:
        saga_id = await h.start("stucky", {"n": 1})
        assert (await h.run_until_done(saga_id)).status is SagaStatus.STUCK
        h.clock.advance(100)
        await _idle(h)
        assert h.coordinator.local_status(saga_id) is not None


def test_a_snapshot_must_outlive_the_state_in_memory() -> None:
    with pytest.raises(ValueError, match="tombstone_after"):
        Retention(evict_after=100, tombstone_after=10)


async def test_a_wait_that_times_out_leaves_no_waiter_behind() -> None:
    slow = Participant("svc")

    @slow.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> None:
        await anyio.sleep_forever()

    async with SagaHarness([ONE], [slow]) as h:
        saga_id = await h.start("one", {})
        for _ in range(3):
            with pytest.raises(SagaTimeout):
                await h.coordinator.wait(saga_id, 0.05)
        assert h.coordinator._waiters == {}


class _Counting(MemoryTransport):
    """Counts the records read from each topic."""

    def __init__(self, broker: MemoryBroker) -> None:
        super().__init__(broker)
        self.read_counts: dict[str, int] = {}

    async def read(self, topic: str, partition: int, start: int = 0) -> AsyncIterator[Record]:
        async for record in super().read(topic, partition, start):
            self.read_counts[topic] = self.read_counts.get(topic, 0) + 1
            yield record


async def test_a_client_that_polls_reads_only_what_is_new() -> None:
    broker = MemoryBroker(default_partitions=1)
    transport = _Counting(broker)
    topics = Topics("saga")
    async with (
        Coordinator([ONE], transport=transport, partitions=1) as coordinator,
        SVC.serving(transport, partitions=1),
        SagaClient(transport, partitions=1) as client,
    ):
        ids = [await coordinator.start("one", {"n": n}) for n in range(20)]
        for saga_id in ids:
            await coordinator.wait(saga_id, 10)
        size = len(broker.records(topics.snapshots))
        transport.read_counts.clear()
        target = ids[0]
        for _ in range(10):
            assert (await client.status(target)).status is SagaStatus.COMPLETED  # type: ignore[union-attr]
        # One read of the partition for the first question, nothing after: not ten scans.
        assert transport.read_counts.get(topics.snapshots, 0) == size
