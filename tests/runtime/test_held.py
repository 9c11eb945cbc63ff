"""Idle sagas held packed in the coordinator's memory (`saga.runtime.held`): a packed saga reads
back equal, only idle unfinished sagas are packed, and a parked saga still moves on when its
signal comes."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from saga import Participant, SagaDefinition, SagaStatus, Step, StepContext
from saga.core.state import SagaState
from saga.runtime.held import HeldStates, pack, unpack
from saga.testing import SagaHarness
from tests.runtime.test_snapshot_value import _states


def test_a_packed_state_reads_back_equal() -> None:
    for state in _states():
        again = unpack(pack(state))
        assert again == state
        assert again.model_dump(mode="json") == state.model_dump(mode="json")
        assert len(pack(state)) < len(state.model_dump_json())


def _at(state: SagaState, updated_at: float, saga_id: str) -> SagaState:
    return state.model_copy(update={"updated_at": updated_at, "saga_id": saga_id})


def test_only_unfinished_sagas_idle_long_enough_are_packed() -> None:
    states = _states()
    running = next(s for s in states if not s.is_final)
    final = next(s for s in states if s.is_final)
    held = HeldStates(park_after=30.0)
    held["old"] = _at(running, 100.0, "old")
    held["done"] = _at(final, 100.0, "done")
    held["new"] = _at(running, 125.0, "new")
    assert held.park(now=140.0) == 1  # "old" idle 40 s; "new" 15 s; "done" is final
    assert held.packed == 1
    assert held["old"] == _at(running, 100.0, "old")
    assert held.unfinished() == 2
    assert len(held) == 3
    assert set(held) == {"old", "done", "new"}
    # A change brings it back as a model, the newest.
    held["old"] = _at(running, 150.0, "old")
    assert held.packed == 0
    assert held.park(now=170.0) == 1  # "new" now; "old" changed 20 s ago
    del held["new"]
    del held["done"]
    assert set(held) == {"old"}
    with pytest.raises(KeyError):
        del held["new"]


WAITING = SagaDefinition(
    name="waiting",
    steps=[
        Step(name="charge", service="pay", action="charge", compensation="refund"),
        Step(name="cooked", wait="kitchen_done", timeout=86_400, depends_on=["charge"]),
        Step(name="ship", service="pay", action="ship", kind="pivot", depends_on=["cooked"]),
    ],
)


@pytest.mark.anyio
async def test_a_parked_saga_moves_on_when_its_signal_comes() -> None:
    pay = Participant("pay")

    @pay.handler("charge")
    async def charge(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"charged": True}

    @pay.handler("refund")
    async def refund(payload: dict[str, Any], ctx: StepContext) -> None:
        return None

    @pay.handler("ship")
    async def ship(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"shipped": True}

    async with SagaHarness([WAITING], [pay]) as h:
        ids = [await h.start("waiting", {"n": n}) for n in range(3)]
        for saga_id in ids:
            await h.run_until_waiting(saga_id, "cooked")
        h.clock.advance(3600)  # idle for an hour: packed when the partitions look next

        def packed() -> int:
            return sum(p.states.packed for p in h.coordinator._parts.values())

        for _ in range(250):
            if packed() >= 3:
                break
            await anyio.sleep(0.02)
        assert packed() == 3
        for saga_id in ids:
            state = await h.coordinator.status(saga_id)  # read without unpacking for good
            assert state is not None
            assert state.status is SagaStatus.RUNNING
        await h.signal(ids[0], "kitchen_done", {"eta": 5})
        done = await h.run_until_done(ids[0])
        assert done.status is SagaStatus.COMPLETED
        assert done.steps["ship"].output == {"shipped": True}
