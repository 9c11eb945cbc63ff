"""The pasta order end to end: real broker, the coordinator and five services as processes.

Every test checks two views that must agree: the saga's own log (`SagaClient.events`) and
the services' own databases, where each side effect must appear exactly once and every undone
effect must be undone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from saga import SagaState, SagaStatus, StepStatus
from saga.core.definition import split_item
from saga.core.messages import (
    Alert,
    CompensationStarted,
    CompensationSucceeded,
    EventBase,
    SagaAborted,
    SagaCompleted,
    StepFailedEvent,
    StepRetryScheduled,
    StepStarted,
    StepStuck,
    StepSucceeded,
    StepTimedOut,
)
from saga.core.schedule import is_item
from services.faults import CRASH_EXIT_STATUS
from services.orders import make_order
from tests.integration.support import STEP_TIMEOUT, Services

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(90)]


# -- reading the two views --------------------------------------------------------------------


def effects(s: Services, order_id: str) -> dict[str, Any]:
    """Every service's rows for the order, reduced to their statuses."""
    return {
        "slot": [r["status"] for r in s.table("location", "slots", order_id)],
        "charge": [r["status"] for r in s.table("payment", "charges", order_id)],
        "kitchen": [r["status"] for r in s.table("restaurant", "orders", order_id)],
        "cooking": len(s.table("restaurant", "cooking", order_id)),
        "dishes": [r["status"] for r in dishes(s, order_id)],
        "rider": [r["status"] for r in s.table("rider", "assignments", order_id)],
        "messages": len(s.table("notification", "messages", order_id)),
    }


NOTHING = {
    "slot": [],
    "charge": [],
    "kitchen": [],
    "cooking": 0,
    "dishes": [],
    "rider": [],
    "messages": 0,
}


def dishes(s: Services, order_id: str) -> list[dict[str, Any]]:
    """The restaurant's rows of the order's dishes, by position in the order."""
    return s.rows(
        "restaurant", "SELECT * FROM dishes WHERE order_id = ? ORDER BY position", (order_id,)
    )


def of_type(events: Sequence[EventBase], cls: type[EventBase]) -> list[Any]:
    return [e for e in events if isinstance(e, cls)]


def index(events: Sequence[EventBase], cls: type[EventBase], step: str) -> int:
    """Position of the first event of type ``cls`` about ``step``."""
    for i, e in enumerate(events):
        if isinstance(e, cls) and getattr(e, "step", None) == step:
            return i
    raise AssertionError(f"no {cls.__name__} for {step!r} in {[type(e).__name__ for e in events]}")


def compensated(events: Sequence[EventBase]) -> list[str]:
    """The steps compensated, not counting the items of the ``dishes`` fan-out
    (`dishes_undone` has those)."""
    return [e.step for e in of_type(events, CompensationSucceeded) if not is_item(e.step)]


def dishes_undone(events: Sequence[EventBase]) -> list[int]:
    """The positions of the dishes whose ``dishes[i]`` item was compensated."""
    found = [split_item(e.step) for e in of_type(events, CompensationSucceeded)]
    return sorted(i for base, i in found if base == "dishes" and i is not None)


def assert_undone_before(events: Sequence[EventBase], first: str, then: str) -> None:
    """``first`` was compensated before ``then``'s compensation even started."""
    assert index(events, CompensationSucceeded, first) < index(events, CompensationStarted, then)


def attempts(events: Sequence[EventBase], step: str) -> list[int]:
    return [e.attempt for e in of_type(events, StepStarted) if e.step == step]


async def wait_for(s: Services, saga_id: str, status: SagaStatus, timeout: float) -> SagaState:
    """Polls until the saga has ``status`` (`SagaClient.wait` returns at ``stuck`` too)."""
    with anyio.fail_after(timeout):
        while True:
            state = await s.client.status(saga_id)
            if state is not None and state.status is status:
                return state
            await anyio.sleep(0.2)


# -- the happy path ---------------------------------------------------------------------------


async def test_happy_path_completes_with_every_effect_applied_once(services: Services) -> None:
    order = make_order(1)
    order_id = order["order_id"]

    state = await services.run(order)
    await services.run(order)  # starting the same order again starts nothing new

    assert state.status is SagaStatus.COMPLETED
    # A small order needs no approval, and this restaurant's kitchen does not confirm by hand:
    # both conditional steps are skipped (tests/integration/test_primitives_fleet.py runs them).
    waiting = {"approval": StepStatus.SKIPPED, "kitchen": StepStatus.SKIPPED}
    assert {n: s.status for n, s in state.steps.items()} == {
        **dict.fromkeys(state.steps, StepStatus.SUCCEEDED),
        **waiting,
    }
    assert effects(services, order_id) == {
        "slot": ["reserved"],
        "charge": ["charged"],
        "kitchen": ["cooking"],
        "cooking": 1,
        "dishes": ["prepared"] * len(order["items"]),
        "rider": ["assigned"],
        "messages": 1,
    }
    (charge,) = services.table("payment", "charges", order_id)
    assert charge["amount"] == pytest.approx(order["amount"])
    (message,) = services.table("notification", "messages", order_id)
    assert state.steps["rider"].output is not None
    assert state.steps["rider"].output["rider"] in message["text"]
    events = await services.events(order_id)
    assert not of_type(events, CompensationStarted)
    # The second start changed nothing and is on the record (the id-reuse policy "return").
    assert isinstance(events[-2], SagaCompleted)
    assert events[-1].type == "start_ignored"


# -- business failures ------------------------------------------------------------------------

ANY_DISHES = {k: v for k, v in NOTHING.items() if k != "dishes"}

FAILURES = {
    "location": (
        {"location.reserve_slot": "fail"},
        NOTHING,
        [],
        [],
    ),
    "payment": (
        {"payment.charge": "fail"},
        NOTHING | {"slot": ["released"]},
        ["location"],
        [],
    ),
    "restaurant": (
        {"restaurant.accept": "fail"},
        NOTHING | {"slot": ["released"], "charge": ["refunded"], "rider": ["released"]},
        ["rider", "payment", "location"],
        # The rider was sought as soon as the restaurant started (start-to-start), so it is
        # undone too; payment and rider are independent and may be undone in either order.
        [("payment", "location"), ("rider", "location")],
    ),
    "rider": (
        {"rider.assign": "fail"},
        # No "dishes": the rider fails about when the restaurant accepts, so the dishes may
        # or may not have been prepared (whatever was, is discarded: the test checks that).
        ANY_DISHES | {"slot": ["released"], "charge": ["refunded"], "kitchen": ["cancelled"]},
        ["restaurant", "payment", "location"],
        [("restaurant", "payment"), ("payment", "location")],
    ),
    "cook": (
        {"cook.start_cooking": "fail"},
        {
            "slot": ["released"],
            "charge": ["refunded"],
            "kitchen": ["cancelled"],
            "cooking": 0,
            "dishes": ["discarded"] * len(make_order(10)["items"]),
            "rider": ["released"],
            "messages": 0,
        },
        ["rider", "restaurant", "payment", "location"],
        [
            ("dishes[0]", "restaurant"),
            ("rider", "restaurant"),
            ("restaurant", "payment"),
            ("payment", "location"),
        ],
    ),
}


@pytest.mark.parametrize("failing", list(FAILURES))
async def test_business_failure_compensates_what_was_done_in_reverse_order(
    services: Services, failing: str
) -> None:
    faults, expected_effects, undone, order_pairs = FAILURES[failing]
    order = make_order(10, faults)

    state = await services.run(order)

    assert state.status is SagaStatus.COMPENSATED
    assert state.steps[failing].status is StepStatus.FAILED
    error = state.steps[failing].error
    assert error is not None
    assert error.business
    assert error.message == f"{next(iter(faults))}: refused on purpose"
    events = await services.events(order["order_id"])
    # A fan-out still running when the saga fails is closed as failed too: not counted.
    failed = of_type(events, StepFailedEvent)
    assert [e.step for e in failed if split_item(e.step)[0] != "dishes"] == [failing]
    assert sorted(compensated(events)) == sorted(undone)
    for first, then in order_pairs:
        assert_undone_before(events, first, then)
    found = effects(services, order["order_id"])
    if "dishes" not in expected_effects:
        assert set(found.pop("dishes")) <= {"discarded"}
    assert found == expected_effects
    # Exactly the dishes that were prepared were discarded, each by its own item.
    prepared = [r["position"] for r in dishes(services, order["order_id"])]
    assert dishes_undone(events) == prepared
    # Nothing runs after the failure but compensations: the pivot never started.
    assert state.steps["cook"].status in (StepStatus.PENDING, StepStatus.FAILED)
    assert state.steps["notify"].status is StepStatus.PENDING


# -- technical failures, timeouts, cancellation -----------------------------------------------


async def test_technical_failure_is_retried_until_it_succeeds(services: Services) -> None:
    order = make_order(20, {"payment.charge": "error:2"})

    state = await services.run(order)

    assert state.status is SagaStatus.COMPLETED
    assert state.steps["payment"].attempt == 3
    events = await services.events(order["order_id"])
    assert attempts(events, "payment") == [1, 2, 3]
    retries = [e for e in of_type(events, StepRetryScheduled) if e.step == "payment"]
    assert [(e.attempt, e.error.type) for e in retries] == [
        (1, "InjectedError"),
        (2, "InjectedError"),
    ]
    assert [e.attempt for e in of_type(events, StepSucceeded) if e.step == "payment"] == [3]
    assert services.table("payment", "charges", order["order_id"])[0]["status"] == "charged"
    assert len(services.table("payment", "charges", order["order_id"])) == 1


async def test_a_step_that_keeps_timing_out_is_compensated_too(services: Services) -> None:
    # Slower than the timeout on every attempt: the restaurant's outcome is unknown, so the
    # saga compensates it as well (its cancel finds nothing to cancel, which must be fine).
    order = make_order(30, {"restaurant.accept": f"delay:{STEP_TIMEOUT + 2:g}"})

    state = await services.run(order, timeout=60)

    assert state.status is SagaStatus.COMPENSATED
    events = await services.events(order["order_id"])
    assert attempts(events, "restaurant") == [1, 2, 3]
    timed_out = [e for e in of_type(events, StepTimedOut) if e.step == "restaurant"]
    assert [e.attempt for e in timed_out] == [3]
    assert state.steps["restaurant"].status is StepStatus.COMPENSATED
    assert sorted(compensated(events)) == ["location", "payment", "restaurant", "rider"]
    assert_undone_before(events, "restaurant", "payment")
    assert_undone_before(events, "payment", "location")
    assert effects(services, order["order_id"]) == NOTHING | {
        "slot": ["released"],
        "charge": ["refunded"],
        "rider": ["released"],
    }


async def test_rider_starts_while_the_restaurant_is_still_deciding(services: Services) -> None:
    order = make_order(40, {"restaurant.accept": "delay:1"})

    state = await services.run(order)

    assert state.status is SagaStatus.COMPLETED
    events = await services.events(order["order_id"])
    restaurant_done = index(events, StepSucceeded, "restaurant")
    assert index(events, StepStarted, "rider") < restaurant_done
    assert index(events, StepSucceeded, "rider") < restaurant_done
    assert index(events, StepStarted, "restaurant") < index(events, StepStarted, "rider")
    assert restaurant_done < index(events, StepStarted, "cook")


async def test_after_the_pivot_the_saga_recovers_forward(services: Services) -> None:
    order = make_order(50, {"notify.notify_customer": "error:2"})

    state = await services.run(order)

    assert state.status is SagaStatus.COMPLETED
    events = await services.events(order["order_id"])
    assert attempts(events, "notify") == [1, 2, 3]
    assert index(events, StepSucceeded, "cook") < index(events, StepStarted, "notify")
    assert not of_type(events, CompensationStarted)
    assert len(services.table("notification", "messages", order["order_id"])) == 1


async def test_a_failing_compensation_leaves_the_saga_stuck_with_an_alert(
    services: Services,
) -> None:
    order = make_order(60, {"restaurant.accept": "fail", "payment.refund": "always_error"})
    order_id = order["order_id"]

    state = await services.run(order)

    assert state.status is SagaStatus.STUCK
    assert state.steps["payment"].status is StepStatus.STUCK
    assert state.steps["payment"].stuck_phase == "compensation"
    events = await services.events(order_id)
    (stuck,) = of_type(events, StepStuck)
    assert (stuck.step, stuck.phase, stuck.attempt) == ("payment", "compensation", 4)
    # The slot is held until the refund is sorted out: location is undone only after payment.
    assert effects(services, order_id) == NOTHING | {
        "slot": ["reserved"],
        "charge": ["charged"],
        "rider": ["released"],
    }
    transport = services.client.transport
    topic = f"{services.prefix}.alerts"
    partition = transport.partition_for(order_id.encode(), await transport.partitions(topic))
    alerts = [
        Alert.model_validate_json(r.value)
        async for r in transport.read(topic, partition)
        if r.key == order_id.encode() and r.value
    ]
    assert [(a.saga_id, a.saga_name, a.steps) for a in alerts] == [
        (order_id, "pasta_order", ["payment"])
    ]

    # An operator refunds by hand and says so: the saga carries on and releases the slot.
    await services.client.resolve(order_id, "refunded by hand")
    state = await wait_for(services, order_id, SagaStatus.COMPENSATED, 30)
    assert state.steps["location"].status is StepStatus.COMPENSATED
    assert effects(services, order_id)["slot"] == ["released"]


async def test_cancel_mid_saga_compensates(services: Services) -> None:
    order = make_order(70, {"restaurant.accept": "delay:2"})
    order_id = order["order_id"]
    await services.client.start("pasta_order", order, saga_id=order_id)
    with anyio.fail_after(20):
        while True:
            state = await services.client.status(order_id)
            if state is not None and state.steps["restaurant"].status is StepStatus.RUNNING:
                break
            await anyio.sleep(0.1)

    await services.client.cancel(order_id, "customer changed their mind")
    state = await services.client.wait(order_id, 30, poll=0.2)

    assert state.status is SagaStatus.COMPENSATED
    events = await services.events(order_id)
    (aborted,) = of_type(events, SagaAborted)
    assert aborted.step is None
    assert aborted.reason == "cancelled: customer changed their mind"
    # The restaurant accepted after the cancel (it was slow): its late success is undone too.
    assert effects(services, order_id) == {
        "slot": ["released"],
        "charge": ["refunded"],
        "kitchen": ["cancelled"],
        "cooking": 0,
        "dishes": [],  # the saga was compensating when the restaurant accepted
        "rider": ["released"],
        "messages": 0,
    }
    assert_undone_before(events, "restaurant", "payment")
    assert_undone_before(events, "payment", "location")


# -- crashes ----------------------------------------------------------------------------------


async def test_participant_crash_after_the_charge_does_not_charge_twice(
    services: Services,
) -> None:
    payment = services.fleet.processes["payment"]
    crashes_before = payment.exit_codes.count(CRASH_EXIT_STATUS)
    order = make_order(80, {"payment.charge": "crash_after"})
    order_id = order["order_id"]

    # The payment service dies right after charging, before replying or committing; the
    # fleet restarts it, the command comes again, and the stored charge is the answer.
    state = await services.run(order, timeout=60)

    assert state.status is SagaStatus.COMPLETED
    assert payment.exit_codes.count(CRASH_EXIT_STATUS) == crashes_before + 1
    charges = services.table("payment", "charges", order_id)
    assert [c["status"] for c in charges] == ["charged"]
    assert state.steps["payment"].output is not None
    assert state.steps["payment"].output["charge_id"] == charges[0]["idempotency_key"]
    crashed = services.rows(
        "payment",
        "SELECT * FROM fault_crashes WHERE idempotency_key = ?",
        (charges[0]["idempotency_key"],),
    )
    assert len(crashed) == 1
    assert effects(services, order_id)["messages"] == 1
