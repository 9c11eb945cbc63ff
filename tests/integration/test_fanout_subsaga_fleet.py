"""Fan-out and sub-sagas in the pasta order services: real broker, real service processes.

The pasta order prepares each dish as an item of its ``dishes`` fan-out (`services.app`), and
a party's ``catering`` holds several orders, each a ``catering_order`` sub-saga, before its
pivot cooks them all. Each test checks the saga's log and state against the services' own
tables: which dishes the restaurant prepared and discarded, which charges were refunded,
which slots released (the fleet of tests/integration/conftest.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from typing import Any

import anyio
import orjson
import pytest

from saga import SagaState, SagaStatus, StepStatus
from saga.cli import main
from saga.core.messages import CompensationSucceeded, EventBase, StepStarted, StepSucceeded
from services.app import CATERING_PARALLEL, DISHES_PARALLEL
from services.orders import MENU, make_catering, make_order, submit_catering
from tests.integration.support import Services
from tests.integration.test_order_saga import dishes, effects, of_type

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(90)]


def order_with_dishes(i: int, count: int, fault: dict[str, str] | None = None) -> dict[str, Any]:
    """A small order (no approval) of ``count`` different dishes, one portion each."""
    order = make_order(i, fault)
    order["items"] = [{"dish": d, "quantity": 1, "price": MENU[d]} for d in sorted(MENU)[:count]]
    return order


def most_in_flight(events: Sequence[EventBase], step: str) -> int:
    """The most items of fan-out ``step`` that were running at once, by the log."""
    running: set[str] = set()
    most = 0
    for e in events:
        name = getattr(e, "step", "")
        if not name.startswith(f"{step}["):
            continue
        if isinstance(e, StepStarted):
            running.add(name)
            most = max(most, len(running))
        elif isinstance(e, StepSucceeded):
            running.discard(name)
    return most


async def saga_cli(s: Services, *args: str) -> tuple[int, str]:
    """Runs ``saga ARGS`` against the fleet's broker and prefix: exit status and stdout."""
    argv = [*args, "--prefix", s.prefix, "--bootstrap-servers", s.fleet.bootstrap]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run() -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(argv)
        return code, out.getvalue()

    try:
        return await anyio.to_thread.run_sync(run)
    finally:
        # `main` configures the root logger (it is a process's entry point): put pytest's back.
        root.handlers[:] = handlers
        root.setLevel(level)


async def run_catering(s: Services, party: dict[str, Any], timeout: float = 60) -> SagaState:
    """Starts the party's catering and waits until it ends."""
    (saga_id,) = await submit_catering(s.client, [party])
    return await s.client.wait(saga_id, timeout, poll=0.2)


async def children(s: Services, party: dict[str, Any]) -> list[SagaState]:
    """The catering's child sagas, one per order, in order."""
    found = []
    for i in range(len(party["orders"])):
        child = await s.client.status(f"{party['party_id']}/orders[{i}]")
        assert child is not None, f"no child saga for order {i}"
        found.append(child)
    return found


# -- the dishes fan-out -----------------------------------------------------------------------


async def test_every_dish_is_prepared_and_the_output_lists_them_in_order(
    services: Services,
) -> None:
    order = order_with_dishes(300, DISHES_PARALLEL + 2)
    order_id = order["order_id"]

    state = await services.run(order)

    assert state.status is SagaStatus.COMPLETED
    names = [f"dishes[{i}]" for i in range(len(order["items"]))]
    assert [n for n in state.steps if n.startswith("dishes[")] == names
    assert all(state.steps[n].status is StepStatus.SUCCEEDED for n in names)
    output = state.steps["dishes"].output
    assert output is not None
    assert [(o["position"], o["dish"]) for o in output["items"]] == [
        (i, item["dish"]) for i, item in enumerate(order["items"])
    ]
    rows = dishes(services, order_id)
    assert [(r["position"], r["dish"], r["status"]) for r in rows] == [
        (i, item["dish"], "prepared") for i, item in enumerate(order["items"])
    ]
    assert effects(services, order_id)["kitchen"] == ["cooking"]
    # Five dishes, three at a time: three on the go at first, never more.
    events = await services.events(order_id)
    assert most_in_flight(events, "dishes") == DISHES_PARALLEL
    cook = next(i for i, e in enumerate(events) if isinstance(e, StepStarted) and e.step == "cook")
    prepared = [i for i, e in enumerate(events) if isinstance(e, StepSucceeded) and e.step in names]
    assert len(prepared) == len(names)
    assert max(prepared) < cook


async def test_one_dish_failing_discards_exactly_the_dishes_prepared(services: Services) -> None:
    order = order_with_dishes(301, 3, {"dishes[1].prepare_dish": "fail"})
    order_id = order["order_id"]

    state = await services.run(order)

    assert state.status is SagaStatus.COMPENSATED
    assert state.steps["dishes[1]"].status is StepStatus.FAILED
    error = state.steps["dishes[1]"].error
    assert error is not None
    assert error.message == "dishes[1].prepare_dish: refused on purpose"
    # The other two were prepared (all three started at once), so both, and only they, are
    # thrown away; the second dish never reached the kitchen's table.
    assert state.steps["dishes[0]"].status is StepStatus.COMPENSATED
    assert state.steps["dishes[2]"].status is StepStatus.COMPENSATED
    rows = dishes(services, order_id)
    assert [(r["position"], r["status"]) for r in rows] == [(0, "discarded"), (2, "discarded")]
    events = await services.events(order_id)
    undone = [e.step for e in of_type(events, CompensationSucceeded)]
    assert sorted(s for s in undone if s.startswith("dishes")) == ["dishes[0]", "dishes[2]"]
    found = effects(services, order_id)
    assert (found["slot"], found["charge"], found["kitchen"]) == (
        ["released"],
        ["refunded"],
        ["cancelled"],
    )
    assert found["cooking"] == 0


# -- catering: a fan-out of sub-sagas ---------------------------------------------------------


async def test_a_catering_completes_with_every_child_order_completed(services: Services) -> None:
    party = make_catering(310, orders=CATERING_PARALLEL + 1)
    party_id = party["party_id"]

    state = await run_catering(services, party)

    assert state.status is SagaStatus.COMPLETED
    ids = [f"{party_id}/orders[{i}]" for i in range(len(party["orders"]))]
    output = state.steps["orders"].output
    assert output is not None
    assert [o["saga_id"] for o in output["items"]] == ids
    assert [state.steps[f"orders[{i}]"].child for i in range(len(ids))] == ids
    for order, child in zip(party["orders"], await children(services, party), strict=True):
        assert child.status is SagaStatus.COMPLETED
        assert child.name == "catering_order"
        assert child.input["order_id"] == order["order_id"]
        found = effects(services, order["order_id"])
        assert (found["slot"], found["charge"], found["kitchen"]) == (
            ["reserved"],
            ["charged"],
            ["cooking"],  # the catering's pivot cooked every order at once
        )
        assert found["dishes"] == ["prepared"] * len(order["items"])
        assert found["cooking"] == 1
    cook = state.steps["cook"].output
    assert cook is not None
    assert len(cook["tickets"]) == len(ids)

    code, out = await saga_cli(services, "status", party_id, "--json")
    assert code == 0
    status = orjson.loads(out)
    assert status["status"] == "completed"
    assert [(c["depth"], c["saga_id"], c["status"]) for c in status["children"]] == [
        (1, i, "completed") for i in ids
    ]


async def test_a_catering_whose_cook_fails_compensates_every_child_order(
    services: Services,
) -> None:
    party = make_catering(320, orders=3, fault={"cook.cook_party": "fail"})

    state = await run_catering(services, party)

    assert state.status is SagaStatus.COMPENSATED
    assert state.steps["cook"].status is StepStatus.FAILED
    assert all(state.steps[f"orders[{i}]"].status is StepStatus.COMPENSATED for i in range(3))
    for order, child in zip(party["orders"], await children(services, party), strict=True):
        assert child.status is SagaStatus.COMPENSATED
        assert f"compensated by its parent saga {party['party_id']!r}" in (child.reason or "")
        found = effects(services, order["order_id"])
        assert (found["slot"], found["charge"], found["kitchen"]) == (
            ["released"],
            ["refunded"],
            ["cancelled"],
        )
        assert found["dishes"] == ["discarded"] * len(order["items"])
        assert found["cooking"] == 0


async def test_a_child_order_that_fails_fails_the_catering_and_undoes_the_others(
    services: Services,
) -> None:
    party = make_catering(330, orders=3, order_faults={1: {"payment.charge": "fail"}})

    state = await run_catering(services, party)

    assert state.status is SagaStatus.COMPENSATED
    error = state.steps["orders[1]"].error
    assert error is not None
    assert error.type == "SagaCompensated"
    assert state.steps["cook"].status is StepStatus.PENDING
    first, failed, third = await children(services, party)
    assert failed.status is SagaStatus.COMPENSATED
    assert effects(services, party["orders"][1]["order_id"])["charge"] == []
    for order, child in ((party["orders"][0], first), (party["orders"][2], third)):
        assert child.status is SagaStatus.COMPENSATED
        found = effects(services, order["order_id"])
        assert (found["slot"], found["charge"]) == (["released"], ["refunded"])
        assert set(found["dishes"]) == {"discarded"}
