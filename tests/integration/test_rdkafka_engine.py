"""The engine end to end on the librdkafka transport: a coordinator and participants on the real
broker run sagas to completion and to compensation, survive a second coordinator joining, and
handle a fence (a newer producer taking one of the coordinator's transactional ids).

The coordinator and the participants run in the test process; what they did is checked twice:
the saga's own log (its events, read back ``read_committed``) and the participants' record of
the side effects they ran.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from saga import (
    Coordinator,
    Participant,
    SagaClient,
    SagaDefinition,
    SagaStatus,
    Step,
    StepContext,
    StepFailed,
)
from saga.adapters.rdkafka import RdKafkaTransport
from saga.core.messages import CompensationSucceeded, SagaCompleted, StepSucceeded
from saga.errors import Fenced
from saga.runtime.ports import Outgoing, Topics

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(180)]

PARTITIONS = 4

TRIP = SagaDefinition(
    name="trip",
    steps=[
        Step(name="flight", service="alpha", action="book", compensation="cancel"),
        Step(
            name="hotel",
            service="beta",
            action="book",
            compensation="cancel",
            depends_on=["flight"],
        ),
        Step(name="car", service="gamma", action="book", kind="pivot", depends_on=["hotel"]),
    ],
)


class Effects:
    """What the participants did, per saga: ``("book", service)`` and ``("cancel", service)``
    in the order they ran."""

    def __init__(self) -> None:
        self.by_saga: dict[str, list[tuple[str, str]]] = {}

    def participants(self) -> list[Participant]:
        found = []
        for service in ("alpha", "beta", "gamma"):
            p = Participant(service)

            @p.handler("book")
            async def book(
                payload: dict[str, Any], ctx: StepContext, service: str = service
            ) -> dict[str, Any]:
                if service == "gamma" and payload.get("no_cars"):
                    raise StepFailed("no car left")
                self.by_saga.setdefault(ctx.saga_id, []).append(("book", service))
                return {"booked": service}

            @p.handler("cancel")
            async def cancel(
                payload: dict[str, Any], ctx: StepContext, service: str = service
            ) -> None:
                self.by_saga.setdefault(ctx.saga_id, []).append(("cancel", service))

            found.append(p)
        return found


@asynccontextmanager
async def running(
    transport: RdKafkaTransport, prefix: str, effects: Effects
) -> AsyncIterator[Coordinator]:
    """A coordinator and the three participants on ``transport`` until the block ends."""
    coordinator = Coordinator([TRIP], transport=transport, prefix=prefix, partitions=PARTITIONS)
    async with coordinator, anyio.create_task_group() as tg:
        for p in effects.participants():
            await tg.start(
                functools.partial(p.run, transport, prefix=prefix, partitions=PARTITIONS)
            )
        yield coordinator
        tg.cancel_scope.cancel()


def new_prefix() -> str:
    return f"rdk-{uuid.uuid4().hex[:8]}"


async def test_sagas_complete_and_compensate(bootstrap: str) -> None:
    transport = RdKafkaTransport(bootstrap, deadline=20)
    prefix, effects = new_prefix(), Effects()
    async with running(transport, prefix, effects) as coordinator:
        ids = [await coordinator.start("trip", {"no_cars": i % 3 == 0}) for i in range(12)]
        with anyio.fail_after(90):
            states = {i: await coordinator.wait(i, 90) for i in ids}
    async with SagaClient(transport, prefix=prefix) as client:
        for n, saga_id in enumerate(ids):
            events = await client.events(saga_id)
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
            succeeded = [e.step for e in events if isinstance(e, StepSucceeded)]
            if n % 3 == 0:
                assert states[saga_id].status is SagaStatus.COMPENSATED
                assert effects.by_saga[saga_id] == [
                    ("book", "alpha"),
                    ("book", "beta"),
                    ("cancel", "beta"),
                    ("cancel", "alpha"),
                ]
                undone = [e.step for e in events if isinstance(e, CompensationSucceeded)]
                assert undone == ["hotel", "flight"]
            else:
                assert states[saga_id].status is SagaStatus.COMPLETED
                assert effects.by_saga[saga_id] == [
                    ("book", "alpha"),
                    ("book", "beta"),
                    ("book", "gamma"),
                ]
                assert succeeded == ["flight", "hotel", "car"]
                assert isinstance(events[-1], SagaCompleted)


async def test_a_second_coordinator_takes_half_and_every_saga_ends_once(bootstrap: str) -> None:
    prefix, effects = new_prefix(), Effects()
    first = RdKafkaTransport(bootstrap, deadline=20)
    async with running(first, prefix, effects) as one:
        early = [await one.start("trip", {}) for _ in range(8)]
        second = RdKafkaTransport(bootstrap, deadline=20)
        two = Coordinator([TRIP], transport=second, prefix=prefix, partitions=PARTITIONS)
        async with two:
            with anyio.fail_after(60):
                while True:  # the rebalance: no event to wait on from here
                    if one.stats.recoveries and two.stats.recoveries:
                        break
                    await anyio.sleep(0.1)
            late = [await two.start("trip", {}) for _ in range(8)]
            with anyio.fail_after(90):
                states = [await one.wait(i, 90) for i in early + late]
    assert all(s.status is SagaStatus.COMPLETED for s in states)
    for saga_id in early + late:
        assert effects.by_saga[saga_id] == [("book", "alpha"), ("book", "beta"), ("book", "gamma")]
    async with SagaClient(first, prefix=prefix) as client:
        for saga_id in early + late:
            events = await client.events(saga_id)
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
            assert sum(isinstance(e, SagaCompleted) for e in events) == 1


async def test_a_fenced_coordinator_drops_the_partition_and_takes_it_back(bootstrap: str) -> None:
    # A newer producer with one of the coordinator's transactional ids (as a new coordinator's
    # would be) fences the coordinator's: its next commit there is refused, it drops the
    # partition and takes it over again, which fences the intruder in turn; no saga is lost.
    transport = RdKafkaTransport(bootstrap, deadline=20)
    prefix, effects = new_prefix(), Effects()
    topics = Topics(prefix)
    victim = 1
    ids = [
        saga_id
        for i in range(200)
        if transport.partition_for((saga_id := f"trip-{prefix}-{i}").encode(), PARTITIONS) == victim
    ][:6]
    async with running(transport, prefix, effects) as coordinator:
        first = await coordinator.wait(await coordinator.start("trip", {}, ids[0]), 60)
        assert first.status is SagaStatus.COMPLETED
        async with transport.tx_producer(f"{prefix}.coordinator.{victim}") as intruder:
            for saga_id in ids[1:]:
                await coordinator.start("trip", {}, saga_id)
            with anyio.fail_after(90):
                states = [await coordinator.wait(i, 90) for i in ids[1:]]
            assert coordinator.stats.fenced >= 1
            with pytest.raises(Fenced):
                await intruder.commit(
                    [Outgoing(topics.log, b"zombie", b"x", partition=victim)], {}, "g"
                )
    assert all(s.status is SagaStatus.COMPLETED for s in states)
    async with SagaClient(transport, prefix=prefix) as client:
        for saga_id in ids:
            events = await client.events(saga_id)
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
    keys = {r.key async for r in transport.read(topics.log, victim)}
    assert b"zombie" not in keys
