"""Sagas wired to the services' own topics, through the coordinator (`saga.testing`): events on
a topic start sagas (the coordinator runs the trigger relay), and each saga publishes its
outcome event in the transaction of its final event (the outbox)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from saga import Participant, SagaDefinition, SagaStatus, Step, StepContext, StepFailed
from saga.core.triggers import Outcome, Trigger
from saga.runtime.ports import Outgoing
from saga.testing import SagaHarness

pytestmark = pytest.mark.anyio

ORDER = SagaDefinition(
    name="order",
    steps=[Step(name="pay", service="bank", action="charge", compensation="refund")],
    triggers=[
        Trigger(
            topic="shop.order-placed",
            when="$.event.total > 0",
            saga_id="order-{$.event.order_id}",
            input={"order": "$.event.order_id", "total": "$.event.total"},
        )
    ],
    outcomes=[
        Outcome(topic="shop.order-finished"),
        Outcome(
            topic="shop.order-cancelled",
            on=("compensated",),
            value={"order": "$.input.order", "why": "$.reason"},
        ),
    ],
)


def bank() -> Participant:
    p = Participant("bank")

    @p.handler("charge")
    async def charge(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        if payload["total"] > 1000:
            raise StepFailed("card declined")
        return {"charge": f"ch-{payload['order']}"}

    @p.handler("refund")
    async def refund(payload: dict[str, Any], ctx: StepContext) -> None:
        return None

    return p


async def _publish(h: SagaHarness, *events: dict[str, Any] | bytes) -> None:
    async with h.transport.producer() as producer:
        await producer.send(
            [
                Outgoing("shop.order-placed", None, e if isinstance(e, bytes) else orjson.dumps(e))
                for e in events
            ]
        )


def _values(h: SagaHarness, topic: str) -> list[dict[str, Any]]:
    if topic not in h.broker.topics:
        return []
    return [orjson.loads(r.value or b"") for r in h.broker.records(topic)]


async def test_events_start_sagas_and_each_saga_publishes_its_outcome() -> None:
    async with SagaHarness([ORDER], [bank()]) as h:
        await h.transport.ensure_topics(["shop.order-placed"], 3)
        await _publish(
            h,
            {"order_id": 7, "total": 40},
            {"order_id": 8, "total": 5000},
            {"order_id": 9, "total": 0},  # filtered: starts nothing
            b"not json",  # dead-lettered with its source, the rest goes on
        )
        done = await h.run_until_done("order-7")
        declined = await h.run_until_done("order-8")
        # The outcomes are in the transactions that ended the sagas: there is nothing to wait.
        assert await h.status("order-9") is None
        dead = h.dead_letters()
    assert done.status is SagaStatus.COMPLETED
    assert declined.status is SagaStatus.COMPENSATED
    finished = {e["saga_id"]: e for e in _values(h, "shop.order-finished")}
    assert finished.keys() == {"order-7", "order-8"}
    assert finished["order-7"]["status"] == "completed"
    assert finished["order-8"]["status"] == "compensated"
    (cancelled,) = _values(h, "shop.order-cancelled")
    assert cancelled["order"] == 8
    assert "card declined" in cancelled["why"]
    (letter,) = dead
    assert letter["saga.dlq.source"].startswith(b"shop.order-placed/")


async def test_an_outcome_is_published_once_whatever_comes_after_the_end() -> None:
    async with SagaHarness([ORDER], [bank()]) as h:
        await h.transport.ensure_topics(["shop.order-placed"], 3)
        await _publish(h, {"order_id": 1, "total": 10})
        first = await h.run_until_done("order-1")
        # The same event again (a redelivery): the start is ignored, nothing is published.
        await _publish(h, {"order_id": 1, "total": 10})
        again = await h.run_until(first.saga_id, lambda s: s.seq > first.seq)
    assert again.status is SagaStatus.COMPLETED
    assert [e["saga_id"] for e in _values(h, "shop.order-finished")] == ["order-1"]
