"""A small order saga for the views' tests: a retried step and a business failure.

``payment`` fails technically on its first attempt when the input says ``flaky`` (so it is
retried), and ``kitchen`` refuses when the input says ``refuse`` (so the saga compensates).
`sagas` is what ``saga graph --app tests.views.sample_app:sagas`` loads.
"""

from __future__ import annotations

from typing import Any

from saga import Participant, RetryPolicy, SagaDefinition, Step, StepContext, StepFailed

__all__ = ["ORDER", "participants", "sagas"]

ORDER = SagaDefinition(
    name="order",
    steps=[
        Step(name="location", service="geo", action="check", compensation="release", timeout=10),
        Step(
            name="payment",
            service="pay",
            action="charge",
            compensation="refund",
            depends_on=["location"],
            retry=RetryPolicy(max_attempts=3, initial_backoff=0.2, jitter=0),
            timeout=10,
        ),
        Step(
            name="kitchen",
            service="kitchen",
            action="accept",
            compensation="cancel",
            depends_on=["payment"],
            timeout=10,
        ),
    ],
)

sagas = [ORDER]


def participants() -> list[Participant]:
    """The three services' participants, with handlers driven by the saga input."""
    geo, pay, kitchen = (Participant(s) for s in ("geo", "pay", "kitchen"))

    @geo.handler("check")
    async def check(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"zone": "north"}

    @geo.handler("release")
    async def release(payload: dict[str, Any], ctx: StepContext) -> None:
        return None

    @pay.handler("charge")
    async def charge(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        if payload.get("flaky") and ctx.attempt == 1:
            raise RuntimeError("card network did not answer")
        return {"charged": payload.get("amount", 0)}

    @pay.handler("refund")
    async def refund(payload: dict[str, Any], ctx: StepContext) -> None:
        return None

    @kitchen.handler("accept")
    async def accept(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        if payload.get("refuse"):
            raise StepFailed("kitchen is closed")
        return {"ticket": 7}

    @kitchen.handler("cancel")
    async def cancel(payload: dict[str, Any], ctx: StepContext) -> None:
        return None

    return [geo, pay, kitchen]
