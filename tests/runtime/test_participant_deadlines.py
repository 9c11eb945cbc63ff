"""A handler's budget: cut off when it waits too long, however it waits; no cost when it does not.

`saga.runtime.handlers.invoke` runs a handler's first step outside any deadline and only what
follows its first wait under one (asyncio's, which may be entered after the handler entered
anyio scopes of its own). These tests pin what must not change with that: a hung handler is
answered ``Timeout``; scopes, task groups and worker threads inside handlers still work and are
cut off; the participant's own cancellation is never swallowed.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from saga.errors import StepFailed
from saga.runtime.handlers import Interception, Outcome, Registered, StepContext, invoke

pytestmark = pytest.mark.anyio

CTX = StepContext(
    saga_id="s-1",
    saga_name="order",
    step="pay",
    phase="action",
    action="charge",
    attempt=1,
    idempotency_key="s-1/pay",
    deadline_at=0.0,
)


async def call(fn: Any, budget: float, interceptors: list[Interception] | None = None) -> Outcome:
    return await invoke(
        Registered.of(fn, None),
        interceptors or [],
        {"amount": 1},
        CTX,
        budget,
        workers=anyio.CapacityLimiter(2),
        max_output_bytes=10_000,
    )


def failure(outcome: Outcome) -> tuple[bool, str | None, bool | None, str | None]:
    """(ok, error type, business, message) of an outcome."""
    ok, _, error = outcome
    if error is None:
        return ok, None, None, None
    return ok, error.type, error.business, error.message


async def test_a_handler_that_returns_without_waiting_succeeds() -> None:
    async def no_op(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"charged": payload["amount"], "step": ctx.step}

    assert await call(no_op, 1) == (True, {"charged": 1, "step": "pay"}, None)


async def test_a_handler_failing_before_it_waits_is_classified_as_ever() -> None:
    async def declined(payload: dict[str, Any], ctx: StepContext) -> None:
        raise StepFailed("card declined")

    async def broken(payload: dict[str, Any], ctx: StepContext) -> None:
        raise ValueError("boom")

    assert failure(await call(declined, 1)) == (False, "StepFailed", True, "card declined")
    assert failure(await call(broken, 1)) == (False, "ValueError", False, "boom")


async def test_a_handler_that_waits_gets_its_result_through() -> None:
    async def waits(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        await anyio.sleep(0.01)
        await anyio.lowlevel.checkpoint()
        return {"waited": True}

    assert await call(waits, 5) == (True, {"waited": True}, None)


async def test_a_hung_handler_is_cut_off() -> None:
    async def hangs(payload: dict[str, Any], ctx: StepContext) -> None:
        await anyio.sleep_forever()

    assert failure(await call(hangs, 0.2))[:3] == (False, "Timeout", False)


async def test_a_handler_hung_inside_its_own_scope_and_task_group_is_cut_off() -> None:
    # Its scopes are entered in its first step, before the deadline is: an anyio deadline
    # entered then could not be exited in order; asyncio's can.
    cleaned: list[str] = []

    async def scoped(payload: dict[str, Any], ctx: StepContext) -> None:
        with anyio.CancelScope():
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(anyio.sleep_forever)
                    await anyio.sleep_forever()
            finally:
                cleaned.append("inner")

    assert failure(await call(scoped, 0.2))[:2] == (False, "Timeout")
    assert cleaned == ["inner"]


async def test_a_handler_using_its_own_shorter_deadline_keeps_it() -> None:
    async def own(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        with anyio.move_on_after(0.05) as scope:
            await anyio.sleep_forever()
        return {"gave_up": scope.cancelled_caught}

    assert await call(own, 5) == (True, {"gave_up": True}, None)


async def test_a_hung_plain_handler_is_abandoned_at_its_deadline() -> None:
    release = threading.Event()

    def blocks(payload: dict[str, Any], ctx: StepContext) -> None:
        release.wait(10)

    try:
        outcome = await call(blocks, 0.2)
    finally:
        release.set()
    assert failure(outcome)[:2] == (False, "Timeout")


async def test_an_interceptor_that_waits_runs_under_the_deadline() -> None:
    async def handler(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"ok": True}

    async def slow(payload: dict[str, Any], ctx: StepContext, call_next: Any) -> Any:
        await anyio.sleep_forever()

    chain: list[Interception] = []
    chain.append(Interception(chain, slow))
    assert failure(await call(handler, 0.2, chain))[:2] == (False, "Timeout")


async def test_the_participants_own_cancellation_is_not_swallowed() -> None:
    reached: list[str] = []

    async def waits(payload: dict[str, Any], ctx: StepContext) -> None:
        await anyio.sleep_forever()

    with anyio.move_on_after(0.2) as stopping:
        await call(waits, 30)
        reached.append("after the call")  # a swallowed cancellation would get here
    assert stopping.cancelled_caught
    assert reached == []
