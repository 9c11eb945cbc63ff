"""The waiting primitives of the pasta order, on the real broker with the real service processes.

The coordinator and the five services run as processes (`services.fleet.Fleet`, the module's
fleet of tests/integration/conftest.py). Each test drives one primitive of `services.app`
from outside, as people and other services would, and checks the saga's log and the services'
own databases:

- the approval of a large order: the manager approves (it completes, charged once) or rejects
  (it is compensated: the slot released, nothing charged); a client that is not an approver is
  refused;
- the kitchen's confirmation signal: the saga waits for it before cooking, its data is the
  step's output, and a signal sent before the step waits is kept for it;
- the delivery-window timer: ``cook`` does not start before the order's ``deliver_after``;
- the condition: a small order skips the approval and is charged without one;
- the event trigger and the outcome events: ``order-placed`` events start sagas, which
  publish ``order-completed`` and ``order-cancelled`` events.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import anyio
import orjson
import pytest

from saga import SagaState, SagaStatus, StepStatus
from saga.core.messages import (
    EventBase,
    RequestDenied,
    SignalReceived,
    StepScheduled,
    StepSkipped,
    StepStarted,
)
from saga.runtime.ports import Outgoing
from services.app import KITCHEN_SIGNAL, LARGE_ORDER, order_topics
from services.orders import make_order, place, submit
from tests.chaos.oracle import read_topic
from tests.integration.support import Services
from tests.integration.test_order_saga import effects

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(90)]


async def step_becomes(
    s: Services, saga_id: str, step: str, status: StepStatus, timeout: float = 30
) -> SagaState:
    """Polls until the saga's ``step`` has ``status``."""
    with anyio.fail_after(timeout):
        while True:
            state = await s.client.status(saga_id)
            if state is not None and state.steps[step].status is status:
                return state
            await anyio.sleep(0.2)


def of_type(events: list[EventBase], cls: type[EventBase]) -> list[Any]:
    return [e for e in events if isinstance(e, cls)]


# -- approval ---------------------------------------------------------------------------------


async def test_a_large_order_waits_for_the_manager_and_completes_when_approved(
    services: Services,
) -> None:
    order = make_order(101, large=True)
    assert order["amount"] > LARGE_ORDER
    (saga_id,) = await submit(services.client, [order])
    waiting = await step_becomes(services, saga_id, "approval", StepStatus.RUNNING)
    assert waiting.steps["payment"].status is StepStatus.PENDING
    assert services.table("payment", "charges", saga_id) == []

    # The test's client is not an approver: its decision is recorded as refused, nothing else.
    await services.client.approve(saga_id, "approval", "I am not the manager")
    async with services.fleet.manager() as manager:
        await manager.approve(saga_id, "approval", "a birthday party, fine")
    state = await services.client.wait(saga_id, 45, poll=0.2)

    assert state.status is SagaStatus.COMPLETED
    output = state.steps["approval"].output
    assert output is not None
    assert output["approved"] is True
    assert output["by"].startswith("manager")  # "manager (unverified)": nothing is signed here
    assert output["note"] == "a birthday party, fine"
    assert effects(services, saga_id)["charge"] == ["charged"]
    events = await services.events(saga_id)
    (denied,) = of_type(events, RequestDenied)
    assert denied.request == "approval"


async def test_a_large_order_the_manager_rejects_is_compensated(services: Services) -> None:
    order = make_order(102, large=True)
    (saga_id,) = await submit(services.client, [order])
    # The slot is reserved while the manager thinks (the two steps run side by side).
    await step_becomes(services, saga_id, "approval", StepStatus.RUNNING)
    await step_becomes(services, saga_id, "location", StepStatus.SUCCEEDED)
    async with services.fleet.manager() as manager:
        await manager.reject(saga_id, "approval", "forty portions? call the customer first")
    state = await services.client.wait(saga_id, 45, poll=0.2)

    assert state.status is SagaStatus.COMPENSATED
    assert state.steps["approval"].status is StepStatus.FAILED
    error = state.steps["approval"].error
    assert error is not None
    assert error.type == "Rejected"
    assert "call the customer first" in error.message
    assert state.steps["location"].status is StepStatus.COMPENSATED
    found = effects(services, saga_id)
    assert found["slot"] == ["released"]
    assert found["charge"] == []
    assert found["kitchen"] == []


# -- signal -----------------------------------------------------------------------------------


async def test_the_kitchen_confirmation_signal_lets_the_order_cook(services: Services) -> None:
    order = make_order(103, kitchen_confirms=True)
    early = make_order(104, kitchen_confirms=True)
    saga_id, early_id = await submit(services.client, [order, early])
    confirmation = {"chef": "Gino", "ready_in_minutes": 12}
    # Sent before its step waits (the saga has just started): kept until the step starts.
    await services.client.signal(early_id, KITCHEN_SIGNAL, {"chef": "Rosa"})

    waiting = await step_becomes(services, saga_id, "kitchen", StepStatus.RUNNING)
    assert waiting.steps["restaurant"].status is StepStatus.SUCCEEDED
    assert waiting.steps["cook"].status is StepStatus.PENDING
    assert services.table("restaurant", "cooking", saga_id) == []
    await services.client.signal(saga_id, KITCHEN_SIGNAL, confirmation)
    state = await services.client.wait(saga_id, 45, poll=0.2)
    kept = await services.client.wait(early_id, 45, poll=0.2)

    assert state.status is SagaStatus.COMPLETED
    assert state.steps["kitchen"].output == confirmation
    assert effects(services, saga_id)["cooking"] == 1
    (received,) = of_type(await services.events(saga_id), SignalReceived)
    assert received.name == KITCHEN_SIGNAL
    assert kept.status is SagaStatus.COMPLETED
    assert kept.steps["kitchen"].output == {"chef": "Rosa"}


# -- timer ------------------------------------------------------------------------------------


async def test_cooking_does_not_start_before_the_delivery_window(services: Services) -> None:
    order = make_order(105, deliver_after=time.time() + 5)
    opens = datetime.fromisoformat(order["deliver_after"]).timestamp()  # to the millisecond
    state = await services.run(order)

    assert state.status is SagaStatus.COMPLETED
    events = await services.events(order["order_id"])
    (scheduled,) = [e for e in of_type(events, StepScheduled) if e.step == "cook"]
    assert scheduled.due_at == pytest.approx(opens, abs=0.01)
    (started,) = [e for e in of_type(events, StepStarted) if e.step == "cook"]
    assert started.at >= opens
    # The kitchen's own record agrees: the pasta went into the water after the window opened.
    (cooking,) = services.table("restaurant", "cooking", order["order_id"])
    assert cooking["started_at"] >= opens


# -- condition --------------------------------------------------------------------------------


async def test_a_small_order_skips_the_approval(services: Services) -> None:
    order = make_order(106)
    assert order["amount"] <= LARGE_ORDER
    state = await services.run(order)

    assert state.status is SagaStatus.COMPLETED
    assert state.steps["approval"].status is StepStatus.SKIPPED
    assert state.steps["approval"].output is None
    events = await services.events(order["order_id"])
    skipped = {e.step: e.reason for e in of_type(events, StepSkipped)}
    assert "amount" in skipped["approval"]
    assert not [e for e in of_type(events, StepStarted) if e.step == "approval"]
    assert effects(services, order["order_id"])["charge"] == ["charged"]


# -- event trigger and outcome events ---------------------------------------------------------


async def outcome(s: Services, topic: str, order_id: str, timeout: float = 20) -> dict[str, Any]:
    """The one outcome event of ``order_id`` on ``topic``, once it is there."""
    with anyio.fail_after(timeout):
        while True:
            found = [
                orjson.loads(r.value)
                for r in await read_topic(s.client.transport, topic)
                if r.key == order_id.encode() and r.value
            ]
            if found:
                (event,) = found
                return dict(event)
            await anyio.sleep(0.5)


async def test_order_placed_events_start_sagas_which_publish_their_outcome(
    services: Services,
) -> None:
    topics = order_topics(services.prefix)
    good = make_order(107)
    declined = make_order(108, {"payment.charge": "fail"})
    viewed = make_order(109)
    placed = await place(services.client.transport, topics.placed, [good, declined])
    # Another kind of event on the topic: the trigger's condition passes it over.
    other = {"type": "order-viewed", "order": viewed}
    async with services.client.transport.producer() as producer:
        await producer.send([Outgoing(topics.placed, b"viewed", orjson.dumps(other))])

    assert placed == [good["order_id"], declined["order_id"]]
    completed = await outcome(services, topics.completed, good["order_id"])
    cancelled = await outcome(services, topics.cancelled, declined["order_id"])

    state = await services.client.status(good["order_id"])
    assert state is not None
    assert state.status is SagaStatus.COMPLETED
    assert state.input == good
    assert completed["type"] == "order-completed"
    assert completed["amount"] == good["amount"]
    assert completed["ticket"] == state.steps["restaurant"].output["ticket"]  # type: ignore[index]
    assert completed["approved_by"] is None  # a small order: no approval
    assert cancelled["type"] == "order-cancelled"
    assert cancelled["status"] == "compensated"
    assert "payment" in cancelled["reason"]
    # Each saga published to its own outcome's topic only.
    others = await read_topic(services.client.transport, topics.cancelled)
    assert good["order_id"].encode() not in {r.key for r in others}
    assert await services.client.status(viewed["order_id"]) is None
