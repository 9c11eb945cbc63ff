"""A saga that uses every primitive (an approval with a reminder, a signal, a fan-out, a
condition that skips, a timer and a sub-saga), run on the harness to give the views a real log.
`sagas` is what ``saga graph --app tests.views.primitives_app:sagas`` loads."""

from __future__ import annotations

from typing import Any

from saga import Participant, SagaDefinition, Step, StepContext
from saga.core.definition import Approval
from saga.core.messages import EventBase
from saga.testing import SagaHarness

__all__ = ["ORDER", "RECEIPT", "primitives_log", "sagas", "services"]

ORDER = SagaDefinition(
    name="order",
    steps=[
        Step(name="pay", service="bank", action="charge", compensation="refund"),
        Step(
            name="manager",
            approval=Approval(approvers=("ann",), remind_after=60),
            timeout=3600,
            depends_on=["pay"],
        ),
        Step(name="kitchen", wait="kitchen_confirmed", timeout=3600, depends_on=["manager"]),
        Step(
            name="dishes",
            service="kitchen",
            action="cook",
            compensation="discard",
            for_each="$.input.dishes",
            input={"dish": "$.item"},
            depends_on=["kitchen"],
        ),
        Step(
            name="extra",
            service="bank",
            action="charge",
            compensation="refund",
            when='$.input.total > 1000 and $.input.tier == "gold"',
            depends_on=["pay"],
        ),
        Step(
            name="deliver",
            service="post",
            action="ship",
            compensation="recall",
            delay=120,
            depends_on=["dishes"],
        ),
        Step(name="receipt", saga="receipt", depends_on=["deliver"]),
    ],
)

RECEIPT = SagaDefinition(
    name="receipt",
    steps=[Step(name="print", service="post", action="print", kind="pivot")],
)

sagas = [ORDER, RECEIPT]


def services() -> list[Participant]:
    """The three services, each answering at once."""
    bank, kitchen, post = Participant("bank"), Participant("kitchen"), Participant("post")

    async def ok(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"done": ctx.step}

    for participant, actions in (
        (bank, ("charge", "refund")),
        (kitchen, ("cook", "discard")),
        (post, ("ship", "recall", "print")),
    ):
        for action in actions:
            participant.handler(action)(ok)
    return [bank, kitchen, post]


_CACHE: dict[str, list[EventBase]] = {}


async def primitives_log() -> list[EventBase]:
    """The events of one order that goes through every primitive and completes (run once)."""
    if "order" not in _CACHE:
        async with SagaHarness(sagas, services()) as h:
            saga_id = await h.start("order", {"total": 50, "dishes": ["soup", "pasta"]}, "o-1")
            await h.run_until_waiting(saga_id, "manager")
            h.clock.advance(61)
            await h.run_until(saga_id, lambda s: s.steps["manager"].reminders == 1, "reminded")
            h.clock.advance(300)  # the decision comes a while after the reminder
            await h.approve(saga_id, "manager", "fine", by="ann")
            await h.run_until_waiting(saga_id, "kitchen")
            await h.signal(saga_id, "kitchen_confirmed", {"eta": 5}, by="chef")
            await h.run_until_done(saga_id)
            _CACHE["order"] = h.events(saga_id)
    return list(_CACHE["order"])
