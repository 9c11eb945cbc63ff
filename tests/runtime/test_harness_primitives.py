"""The steps that wait, run for real by the coordinator on the memory transport under virtual
time (`saga.testing`), including a coordinator restart while each of them is pending: the
timer, the wait and the approval live in the recovered state, so they carry on."""

from __future__ import annotations

from typing import Any

import pytest

from saga import (
    Participant,
    SagaDefinition,
    SagaStatus,
    Step,
    StepContext,
    StepFailed,
    StepStatus,
)
from saga.core.definition import Approval
from saga.testing import SagaHarness

pytestmark = pytest.mark.anyio

DAY = 86_400.0

ORDER = SagaDefinition(
    name="order",
    steps=[
        Step(name="charge", service="pay", action="charge", compensation="refund"),
        Step(
            name="approve",
            approval=Approval(
                approvers=("ann",), remind_after=3600, escalate_after=7200, escalate_to=("boss",)
            ),
            timeout=DAY,
            depends_on=["charge"],
            when="$.input.total > 100",
        ),
        Step(name="cooked", wait="kitchen_done", timeout=DAY, depends_on=["approve"]),
        Step(
            name="deliver",
            service="ride",
            action="deliver",
            kind="pivot",
            depends_on=["cooked"],
            start_at="$.input.deliver_at",
            input={"eta": "$.steps.cooked.output.eta"},
        ),
    ],
)


def services(calls: list[tuple[str, Any]]) -> list[Participant]:
    pay, ride = Participant("pay"), Participant("ride")

    @pay.handler("charge")
    async def charge(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        calls.append(("charge", ctx.saga_id))
        return {"charge_id": "ch-1"}

    @pay.handler("refund")
    async def refund(payload: dict[str, Any], ctx: StepContext) -> None:
        calls.append(("refund", ctx.saga_id))

    @ride.handler("deliver")
    async def deliver(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        calls.append(("deliver", payload["eta"]))
        return {"rider": "r-9"}

    return [pay, ride]


async def test_a_large_order_waits_for_approval_the_kitchen_and_its_delivery_time() -> None:
    calls: list[tuple[str, Any]] = []
    async with SagaHarness([ORDER], services(calls)) as h:
        t0 = h.clock.now()
        saga_id = await h.start("order", {"total": 250, "deliver_at": t0 + 2 * 3600 + 60})
        await h.run_until_waiting(saga_id, "approve")
        # An hour without a decision: a reminder; two hours: escalated to the boss.
        state = await h.run_until(saga_id, lambda s: s.steps["approve"].reminders == 2)
        assert [(a.kind, a.recipients) for a in h.alerts] == [
            ("approval", ["ann"]),
            ("reminder", ["ann"]),
            ("escalation", ["boss"]),
        ]
        await h.restart_coordinator()  # while the approval is pending
        await h.approve(saga_id, "approve", "ok for this customer", by="boss")
        await h.run_until_waiting(saga_id, "cooked")
        await h.restart_coordinator()  # while the wait is pending
        await h.signal(saga_id, "kitchen_done", {"eta": 15})
        state = await h.run_until(
            saga_id, lambda s: s.steps["deliver"].status is StepStatus.SCHEDULED
        )
        assert state.steps["deliver"].wake_at == t0 + 2 * 3600 + 60
        await h.restart_coordinator()  # while the timer is pending
        state = await h.run_until_done(saga_id)
    assert state.status is SagaStatus.COMPLETED
    assert calls == [("charge", saga_id), ("deliver", 15)]
    assert state.steps["approve"].output == {
        "approved": True,
        "by": "boss (unverified)",
        "note": "ok for this customer",
    }
    # The delivery started at its time, not before.
    assert state.steps["deliver"].started_at is not None
    assert state.steps["deliver"].started_at >= t0 + 2 * 3600 + 60


async def test_a_small_order_skips_the_approval_and_a_rejection_compensates() -> None:
    calls: list[tuple[str, Any]] = []
    async with SagaHarness([ORDER], services(calls)) as h:
        small = await h.start("order", {"total": 20, "deliver_at": h.clock.now()})
        await h.signal(small, "kitchen_done", {"eta": 5})  # early: kept until the step waits
        done = await h.run_until_done(small)
        assert done.status is SagaStatus.COMPLETED
        assert done.steps["approve"].status is StepStatus.SKIPPED

        big = await h.start("order", {"total": 500, "deliver_at": h.clock.now()})
        await h.run_until_waiting(big, "approve")
        await h.reject(big, "approve", "too big for today", by="ann")
        rejected = await h.run_until_done(big)
    assert rejected.status is SagaStatus.COMPENSATED
    assert rejected.steps["approve"].error is not None
    assert rejected.steps["approve"].error.message == (
        "rejected by ann (unverified): too big for today"
    )
    assert ("refund", big) in calls
    assert ("deliver", 5) in calls  # the small order's


async def test_an_approval_nobody_decides_counts_as_rejected_at_its_timeout() -> None:
    calls: list[tuple[str, Any]] = []
    async with SagaHarness([ORDER], services(calls)) as h:
        saga_id = await h.start("order", {"total": 900, "deliver_at": h.clock.now()})
        await h.run_until_waiting(saga_id, "approve")
        await h.restart_coordinator()
        state = await h.run_until_done(saga_id)
    assert state.status is SagaStatus.COMPENSATED
    assert calls == [("charge", saga_id), ("refund", saga_id)]
    error = state.steps["approve"].error
    assert error is not None
    assert error.type == "Timeout"


KITCHEN = SagaDefinition(
    name="kitchen",
    steps=[
        Step(name="pay", service="pay", action="charge", compensation="refund"),
        Step(
            name="cook",
            service="stove",
            action="cook",
            compensation="bin",
            depends_on=["pay"],
            for_each="$.input.dishes",
            max_parallel=2,
            input={"dish": "$.item"},
        ),
        Step(name="serve", service="stove", action="serve", kind="pivot", depends_on=["cook"]),
    ],
)


def kitchen(calls: list[tuple[str, Any]], burnt: str | None = None) -> list[Participant]:
    pay, stove = Participant("pay"), Participant("stove")

    @pay.handler("charge")
    async def charge(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {}

    @pay.handler("refund")
    async def refund(payload: dict[str, Any], ctx: StepContext) -> None:
        calls.append(("refund", ctx.step))

    @stove.handler("cook")
    async def cook(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        if payload["dish"] == burnt:
            raise StepFailed(f"{burnt} burnt")
        calls.append(("cook", payload["dish"]))
        return {"plate": payload["dish"].upper()}

    @stove.handler("bin")
    async def bin_(payload: dict[str, Any], ctx: StepContext) -> None:
        calls.append(("bin", payload["input"]["dish"]))

    @stove.handler("serve")
    async def serve(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {}

    return [pay, stove]


async def test_a_fan_out_survives_a_restart_and_compensates_exactly_what_it_cooked() -> None:
    calls: list[tuple[str, Any]] = []
    dishes = ["pesto", "ragu", "cacio", "burnt-toast"]
    async with SagaHarness([KITCHEN], kitchen(calls, burnt="burnt-toast")) as h:
        ok = await h.start("kitchen", {"dishes": dishes[:3]})
        await h.run_until(ok, lambda s: "cook[0]" in s.steps)
        await h.restart_coordinator()  # while the fan-out is pending
        done = await h.run_until_done(ok)
        assert done.status is SagaStatus.COMPLETED
        assert done.steps["cook"].output == {
            "items": [{"plate": "PESTO"}, {"plate": "RAGU"}, {"plate": "CACIO"}]
        }
        calls.clear()
        bad = await h.start("kitchen", {"dishes": dishes})
        failed = await h.run_until_done(bad)
    assert failed.status is SagaStatus.COMPENSATED
    cooked = sorted(d for kind, d in calls if kind == "cook")
    binned = sorted(d for kind, d in calls if kind == "bin")
    assert binned == cooked  # exactly the items that took effect, no more
    assert "burnt-toast" not in binned
    assert ("refund", "pay") in calls


PARENT = SagaDefinition(
    name="trip",
    steps=[
        Step(name="flight", service="air", action="book", compensation="cancel"),
        Step(
            name="stay",
            saga="hotel",
            depends_on=["flight"],
            input={"city": "$.input.city", "nights": "$.input.nights"},
            timeout=600,
        ),
        Step(
            name="pay",
            service="air",
            action="pay",
            compensation="refund",
            depends_on=["stay"],
            input={"room": "$.steps.stay.output.outputs.room.room"},
        ),
    ],
)
HOTEL = SagaDefinition(
    name="hotel",
    steps=[
        Step(name="room", service="inn", action="reserve", compensation="release"),
        Step(
            name="breakfast",
            service="inn",
            action="add",
            compensation="drop",
            depends_on=["room"],
            delay=60,  # the kitchen opens in a minute (virtual time)
        ),
    ],
)


def travel(calls: list[str], *, full: bool = False, declined: bool = False) -> list[Participant]:
    air, inn = Participant("air"), Participant("inn")

    @air.handler("book")
    async def book(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        calls.append("book flight")
        return {}

    @air.handler("cancel")
    async def cancel(payload: dict[str, Any], ctx: StepContext) -> None:
        calls.append("cancel flight")

    @air.handler("pay")
    async def pay(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        if declined:
            raise StepFailed("card declined")
        calls.append(f"pay {payload['room']}")
        return {}

    @air.handler("refund")
    async def refund(payload: dict[str, Any], ctx: StepContext) -> None:
        calls.append("refund")

    @inn.handler("reserve")
    async def reserve(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        calls.append(f"reserve in {payload['city']}")
        return {"room": "12B"}

    @inn.handler("release")
    async def release(payload: dict[str, Any], ctx: StepContext) -> None:
        calls.append("release room")

    @inn.handler("add")
    async def add(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        if full:
            raise StepFailed("no breakfast left")
        calls.append("add breakfast")
        return {}

    @inn.handler("drop")
    async def drop(payload: dict[str, Any], ctx: StepContext) -> None:
        calls.append("drop breakfast")

    return [air, inn]


async def test_a_sub_saga_completes_its_step_with_the_child_outputs() -> None:
    calls: list[str] = []
    async with SagaHarness([PARENT, HOTEL], travel(calls)) as h:
        trip = await h.start("trip", {"city": "Lyon", "nights": 2})
        child_id = f"{trip}/stay"
        await h.run_until(child_id, lambda s: s.steps["breakfast"].status is StepStatus.SCHEDULED)
        await h.restart_coordinator()  # while the child waits for its timer
        done = await h.run_until_done(trip)
        child = await h.status(f"{trip}/stay")
    assert done.status is SagaStatus.COMPLETED
    assert done.steps["stay"].child == f"{trip}/stay"
    assert child is not None
    assert child.status is SagaStatus.COMPLETED
    assert child.parent is not None
    assert (child.parent.saga_id, child.parent.step) == (trip, "stay")
    assert calls == ["book flight", "reserve in Lyon", "add breakfast", "pay 12B"]


async def test_compensating_the_step_compensates_the_completed_child() -> None:
    calls: list[str] = []
    async with SagaHarness([PARENT, HOTEL], travel(calls, declined=True)) as h:
        trip = await h.start("trip", {"city": "Oslo", "nights": 1})
        done = await h.run_until_done(trip)
        child = await h.status(f"{trip}/stay")
    assert done.status is SagaStatus.COMPENSATED
    assert child is not None
    assert child.status is SagaStatus.COMPENSATED  # completed, then undone by its parent
    assert calls == [
        "book flight",
        "reserve in Oslo",
        "add breakfast",
        "drop breakfast",
        "release room",
        "cancel flight",
    ]


async def test_a_child_that_compensates_fails_its_step_and_the_parent_compensates() -> None:
    calls: list[str] = []
    async with SagaHarness([PARENT, HOTEL], travel(calls, full=True)) as h:
        trip = await h.start("trip", {"city": "Rome", "nights": 3})
        done = await h.run_until_done(trip)
    assert done.status is SagaStatus.COMPENSATED
    error = done.steps["stay"].error
    assert error is not None
    assert error.type == "SagaCompensated"
    assert "no breakfast left" in error.message
    # The child undid its own work; the parent undid the flight; nothing was undone twice.
    assert calls == ["book flight", "reserve in Rome", "release room", "cancel flight"]
