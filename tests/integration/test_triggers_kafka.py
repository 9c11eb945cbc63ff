"""Event triggers on the real broker: events on a service's own topic start sagas through the
relay's transactions, a malformed event is dead-lettered with its source while the next still
starts, and a relay that reads everything again (its group rewound) starts no saga twice."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import orjson
import pytest

from saga import Coordinator, Participant, SagaDefinition, SagaStatus, Step, StepContext
from saga.adapters.kafka import KafkaTransport
from saga.core.codec import ENGINE_LIMITS, decode
from saga.core.messages import SagaStarted, StartIgnored, StartSaga, event_adapter, request_adapter
from saga.core.triggers import Subscription, Trigger
from saga.runtime.dlq import REASON_HEADER, SOURCE_HEADER
from saga.runtime.ports import Outgoing, Record, Topics
from saga.runtime.triggers import TriggerRelay

pytestmark = pytest.mark.anyio

PARTITIONS = 2

ORDER = SagaDefinition(
    name="order",
    steps=[Step(name="cook", service="kitchen", action="cook", compensation="bin", timeout=20)],
)
TRIGGER = Trigger(
    topic="unset",  # set per test: the topic is unique to it
    when='$.event.type == "order-placed"',
    saga_id="order-{$.event.order_id}",
    input={"dish": "$.event.dish"},
)


def kitchen(cooked: list[str]) -> Participant:
    p = Participant("kitchen")

    @p.handler("cook")
    async def cook(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        cooked.append(payload["dish"])
        return {"plate": payload["dish"]}

    @p.handler("bin")
    async def bin_(payload: dict[str, Any], ctx: StepContext) -> None:
        return None

    return p


async def read_all(transport: KafkaTransport, topic: str) -> list[Record]:
    found: list[Record] = []
    for p in range(await transport.partitions(topic)):
        found += [r async for r in transport.read(topic, p)]
    return found


async def events(transport: KafkaTransport, topics: Topics, saga_id: str) -> list[Any]:
    return [
        decode(event_adapter, r.value, ENGINE_LIMITS)
        for r in await read_all(transport, topics.log)
        if r.key == saga_id.encode()
    ]


async def test_events_on_a_topic_start_sagas_once_each(bootstrap: str) -> None:
    transport = KafkaTransport(bootstrap, deadline=20)
    prefix = f"trig-{uuid.uuid4().hex[:10]}"
    topics = Topics(prefix)
    source = f"{prefix}-orders-placed"  # a service's topic, not under the engine's prefix
    trigger = TRIGGER.model_copy(update={"topic": source})
    await transport.ensure_topics([source], PARTITIONS)
    cooked: list[str] = []

    def relay() -> TriggerRelay:
        return TriggerRelay(
            transport, [Subscription("order", trigger)], prefix=prefix, partitions=PARTITIONS
        )

    placed = [
        {"type": "order-placed", "order_id": "A1", "dish": "carbonara"},
        {"type": "order-viewed", "order_id": "A2", "dish": "pesto"},  # filtered out
    ]
    async with (
        Coordinator([ORDER], transport=transport, prefix=prefix, partitions=PARTITIONS) as coord,
        kitchen(cooked).serving(transport, prefix=prefix, partitions=PARTITIONS),
        anyio.create_task_group() as tg,
    ):
        first = relay()
        scope = await tg.start(_serve, first)
        async with transport.producer() as producer:
            a3 = {"type": "order-placed", "order_id": "A3", "dish": "cacio"}
            await producer.send(
                [
                    Outgoing(source, b"A1", orjson.dumps(placed[0]), (), 0),
                    Outgoing(source, b"A2", orjson.dumps(placed[1]), (), 0),
                    Outgoing(source, b"bad", b"{not json", (), 1),
                    Outgoing(source, b"A3", orjson.dumps(a3), (), 1),
                ]
            )
        done1 = await coord.wait("order-A1", 60)
        done3 = await coord.wait("order-A3", 60)
        assert (done1.status, done1.input) == (SagaStatus.COMPLETED, {"dish": "carbonara"})
        assert (done3.status, done3.input) == (SagaStatus.COMPLETED, {"dish": "cacio"})
        assert await coord.status("order-A2") is None
        with anyio.fail_after(30):  # a bound against a hang, not a measure of speed
            while True:
                if first.stats.records >= 4:
                    break
                await anyio.sleep(0.05)
        assert first.stats.dead_letters == {"invalid_json": 1}
        scope.cancel()

        # Read everything again, as a relay that died before its commits were known would.
        second = relay()
        await rewind(transport, second.group, source)
        await tg.start(_serve, second)
        with anyio.fail_after(60):
            while True:
                found = await events(transport, topics, "order-A3")
                if any(isinstance(e, StartIgnored) for e in found):
                    break
                await anyio.sleep(0.1)
        tg.cancel_scope.cancel()

    starts = [decode(request_adapter, r.value) for r in await read_all(transport, topics.requests)]
    assert all(isinstance(s, StartSaga) for s in starts)
    assert sorted(s.saga_id for s in starts) == ["order-A1", "order-A1", "order-A3", "order-A3"]
    for saga_id in ("order-A1", "order-A3"):
        found = await events(transport, topics, saga_id)
        assert sum(isinstance(e, SagaStarted) for e in found) == 1
    assert sorted(cooked) == ["cacio", "carbonara"]
    dead = await read_all(transport, topics.dlq)
    assert [(d.header(REASON_HEADER), d.header(SOURCE_HEADER)) for d in dead] == [
        ("invalid_json", f"{source}/1/0"),
        ("invalid_json", f"{source}/1/0"),
    ]
    assert dead[0].value == b"{not json"


async def rewind(transport: KafkaTransport, group: str, topic: str) -> None:
    """Commits offset 0 of every partition of ``topic`` for ``group`` (no member left in it)."""
    everything = frozenset((topic, p) for p in range(PARTITIONS))
    async with transport.consumer(group, [topic]) as consumer:
        with anyio.fail_after(60):
            while True:
                await consumer.poll(0.2, 1)  # joins the group; what it reads is not committed
                if consumer.assignment() == everything:
                    break
        await consumer.commit(dict.fromkeys(everything, 0))


async def _serve(relay: TriggerRelay, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    with anyio.CancelScope() as scope:
        task_status.started(scope)
        await relay.run()
