"""What the index's Kafka tests share: the sample services under a fresh prefix, and orders."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import saga
from saga.runtime.ports import Transport
from tests.views.sample_app import ORDER, participants

__all__ = ["ORDERS", "PARTITIONS", "engine", "run_orders"]

PARTITIONS = 2
ORDERS = {
    "ok": {"amount": 12, "flaky": True, "customer": "c-1"},  # payment retried, then completed
    "refused": {"amount": 5, "refuse": True, "customer": "c-2"},  # the kitchen refuses
    "plain": {"amount": 7, "customer": "c-1"},
}


@asynccontextmanager
async def engine(transport: Transport, prefix: str) -> AsyncIterator[saga.Coordinator]:
    """A coordinator and the sample services on ``transport``."""
    geo, pay, kitchen = participants()
    async with (
        saga.Coordinator(
            [ORDER], transport=transport, prefix=prefix, partitions=PARTITIONS
        ) as coordinator,
        geo.serving(transport, prefix=prefix, partitions=PARTITIONS),
        pay.serving(transport, prefix=prefix, partitions=PARTITIONS),
        kitchen.serving(transport, prefix=prefix, partitions=PARTITIONS),
    ):
        yield coordinator


async def run_orders(coordinator: saga.Coordinator, prefix: str, names: list[str]) -> list[str]:
    """Starts the named orders under fresh ids and waits until each has ended."""
    ids = [
        await coordinator.start("order", ORDERS[n], f"{n}-{prefix}-{uuid.uuid4().hex[:4]}")
        for n in names
    ]
    for saga_id in ids:
        assert (await coordinator.wait(saga_id, 60)).is_final
    return ids
