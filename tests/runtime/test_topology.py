"""Topology traps: a changed partition count, and two definitions under one name and version.

Changing the topics' partition count moves a saga's records to another partition: in-flight
replies would be dead-lettered, a succeeded step compensated, a finished id started a second
time. Every checkpoint records the count it was written under, and a coordinator refuses to
run on another count (`TopologyChanged`) before it consumes anything.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Any

import anyio
import pytest

from saga import Coordinator, SagaDefinition, SagaStatus, Step
from saga.adapters.memory import MemoryBroker, MemoryTransport
from saga.core.codec import decode, encode
from saga.core.messages import Checkpoint, StartSaga, snapshot_adapter
from saga.core.replay import CHECKPOINT_PREFIX, checkpoint_key
from saga.errors import DefinitionError, SagaError, SagaTimeout, TopologyChanged
from saga.runtime.catalog import Catalog
from saga.runtime.ports import Outgoing, Topics
from saga.testing import SagaHarness
from tests.runtime.test_harness import TRIP, services

pytestmark = pytest.mark.anyio

T = Topics("saga")
ENGINE_TOPICS = (T.requests, T.replies, T.log, T.snapshots)


def _ids_on_every_partition(transport: MemoryTransport, partitions: int) -> list[str]:
    found: dict[int, str] = {}
    n = 0
    while len(found) < partitions:
        saga_id = f"trip-{n}"
        found.setdefault(transport.partition_for(saga_id.encode(), partitions), saga_id)
        n += 1
    return [found[p] for p in range(partitions)]


def _checkpoints(broker: MemoryBroker) -> dict[int, Checkpoint]:
    latest: dict[int, Checkpoint] = {}
    for record in broker.records(T.snapshots):
        if record.key is not None and record.key.startswith(CHECKPOINT_PREFIX):
            item = decode(snapshot_adapter, record.value)
            assert isinstance(item, Checkpoint)
            latest[item.partition] = item
    return latest


def _add_partition(broker: MemoryBroker, topics: tuple[str, ...] = ENGINE_TOPICS) -> None:
    """What ``kafka-topics --alter --partitions`` does: one more, empty, partition."""
    for topic in topics:
        broker.topics[topic].append([])


async def _ran_on_two_partitions() -> SagaHarness:
    """A harness (stopped) whose two partitions each finished a saga."""
    h = SagaHarness([TRIP], services(), partitions=2)
    async with h:
        for saga_id in _ids_on_every_partition(h.transport, 2):
            await h.start("trip", {"who": saga_id}, saga_id=saga_id)
            assert (await h.run_until_done(saga_id)).status is SagaStatus.COMPLETED
    return h


async def test_checkpoints_record_the_partition_count() -> None:
    h = await _ran_on_two_partitions()
    checkpoints = _checkpoints(h.broker)
    assert set(checkpoints) == {0, 1}
    assert {c.partitions for c in checkpoints.values()} == {2}


async def test_a_changed_partition_count_stops_the_coordinator_before_it_consumes() -> None:
    h = await _ran_on_two_partitions()
    _add_partition(h.broker)
    # A request waits on the changed topics; a coordinator must not act on it.
    start = StartSaga(message_id="m", saga_id="late", saga_name="trip", input={}, at=1.0)
    h.broker.append([Outgoing(T.requests, b"late", encode(start))])
    log_before = len(h.broker.records(T.log))
    committed = dict(h.broker.groups[T.coordinator_group].committed)
    coordinator = Coordinator([TRIP], transport=h.transport, partitions=3, clock=h.clock)
    with pytest.raises(TopologyChanged) as caught, anyio.fail_after(10):
        await coordinator.run()
    error = caught.value
    assert isinstance(error, SagaError)
    assert (error.recorded, error.current) == (2, 3)
    text = str(error)
    assert "2 partitions" in text
    assert "3" in text
    assert "new prefix" in text
    assert len(h.broker.records(T.log)) == log_before
    assert h.broker.groups[T.coordinator_group].committed == committed


async def test_the_context_manager_raises_it_too() -> None:
    h = await _ran_on_two_partitions()
    _add_partition(h.broker)
    coordinator = Coordinator([TRIP], transport=h.transport, partitions=3, clock=h.clock)
    with pytest.raises(TopologyChanged), anyio.fail_after(10):
        async with coordinator:
            pass


async def test_the_same_count_runs_and_old_checkpoints_without_a_count_are_accepted() -> None:
    h = await _ran_on_two_partitions()
    # A checkpoint as an older release wrote it, with no count: nothing to compare, so it runs,
    # and its next checkpoint records the count.
    old = Checkpoint(partition=0, log_offset=_checkpoints(h.broker)[0].log_offset)
    assert b"partitions" not in encode(old)
    h.broker.append([Outgoing(T.snapshots, checkpoint_key(0), encode(old), partition=0)])
    coordinator = Coordinator([TRIP], transport=h.transport, partitions=2, clock=h.clock)
    async with coordinator, contextlib.AsyncExitStack() as stack:
        for p in services():
            await stack.enter_async_context(p.serving(h.transport, partitions=2, clock=h.clock))
        fresh = next(  # on partition 0, whose checkpoint is the old one
            f"fresh-{n}"
            for n in itertools.count()
            if h.transport.partition_for(f"fresh-{n}".encode(), 2) == 0
        )
        await coordinator.start("trip", {"who": "y"}, saga_id=fresh)
        assert (await coordinator.wait(fresh, 10)).status is SagaStatus.COMPLETED
        assert (await coordinator.status("trip-0")) is not None
    assert {c.partitions for c in _checkpoints(h.broker).values()} == {2}


async def test_a_count_changed_under_a_running_coordinator_is_refused_on_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with SagaHarness([TRIP], services(), partitions=2) as h:
        for saga_id in _ids_on_every_partition(h.transport, 2):
            await h.start("trip", {"who": saga_id}, saga_id=saga_id)
            await h.run_until_done(saga_id)
        with caplog.at_level(logging.WARNING, logger="saga.coordinator"):
            _add_partition(h.broker)
            h.broker._rebalance(h.broker.groups[T.coordinator_group])  # as Kafka would
            late = next(
                f"late-{n}"
                for n in itertools.count()
                if h.transport.partition_for(f"late-{n}".encode(), 3) == 0
            )
            await h.start("trip", {"who": "late"}, saga_id=late)
            with pytest.raises(SagaTimeout, match="not started"):
                await h.run_until_done(late, max_virtual_seconds=1)
            assert h.events(late) == []
        messages = [r.getMessage() for r in caplog.records]
        assert any("partition 0" in m and "2 partitions" in m for m in messages), messages


# -- one name and version, one definition ----------------------------------------------------------


def _trip(**step_fields: Any) -> SagaDefinition:
    step = Step(name="flight", service="air", action="book", compensation="unbook", **step_fields)
    return SagaDefinition(name="trip", version=3, steps=[step])


def test_the_catalog_refuses_two_definitions_under_one_name_and_version() -> None:
    first, second = _trip(), _trip(timeout=5)
    assert first.digest != second.digest
    with pytest.raises(DefinitionError) as caught:
        Catalog([first, second])
    (problem,) = caught.value.problems
    assert caught.value.saga == "trip"
    assert problem.startswith("saga 'trip', version 3: [unique-version] ")
    assert first.digest in problem
    assert second.digest in problem
    with pytest.raises(DefinitionError):
        Coordinator([first, second], transport=MemoryTransport())


def test_the_catalog_accepts_the_same_definition_twice() -> None:
    catalog = Catalog([_trip(), _trip(), SagaDefinition.from_dict(_trip().to_dict())])
    assert [d.digest for d in catalog.all()] == [_trip().digest]


async def test_status_shows_the_digest_the_saga_started_on() -> None:
    async with SagaHarness([TRIP], services()) as h:
        saga_id = await h.start("trip", {"who": "ada"})
        state = await h.run_until_done(saga_id)
    assert state.digest == TRIP.digest
