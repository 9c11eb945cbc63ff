"""The server tests' saga: a shop order with a compensation, a conditional approval, a pivot
and a retriable step, and its three services, run in the test process on the real broker.

- ``fail`` in the input makes ``charge`` fail for good (a business failure): the saga
  compensates ``reserve`` and ends ``compensated``;
- a ``total`` over 100 needs ``ann``'s approval (the ``manager`` step); a rejection compensates;
- ``gift`` makes the ``gift_note`` step wait for the ``gift_note`` signal;
- a saga id in `BROKEN` makes ``notify`` fail technically until it is removed: two attempts,
  then the saga is ``stuck``, and an operator's retry finishes it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from saga import Participant, RetryPolicy, SagaDefinition, Step, StepContext, StepFailed
from saga.core.definition import Approval

__all__ = ["BROKEN", "ORDER", "Order", "participants", "sagas"]


class Order(BaseModel):
    """The order saga's input."""

    model_config = ConfigDict(extra="forbid")
    customer: str = Field(min_length=1)
    total: float = Field(gt=0)
    fail: bool = False
    gift: bool = False


ORDER = SagaDefinition(
    name="shop_order",
    input_model=Order,
    steps=[
        Step(
            name="reserve",
            service="stock",
            action="reserve",
            compensation="release",
            input={"customer": "$.input.customer"},
        ),
        Step(
            name="charge",
            service="bank",
            action="charge",
            compensation="refund",
            depends_on=["reserve"],
        ),
        Step(
            name="manager",
            approval=Approval(approvers=("ann",)),
            when="$.input.total > 100",
            timeout=3600,
            depends_on=["charge"],
        ),
        Step(
            name="gift_note",
            wait="gift_note",
            when="$.input.gift == true",
            timeout=3600,
            depends_on=["charge"],
        ),
        Step(
            name="ship",
            service="post",
            action="ship",
            kind="pivot",
            depends_on=["manager", "gift_note"],
        ),
        Step(
            name="notify",
            service="post",
            action="notify",
            kind="retriable",
            retry=RetryPolicy(max_attempts=2, initial_backoff=0.05),
            depends_on=["ship"],
        ),
    ],
)

sagas = [ORDER]

BROKEN: set[str] = set()
"""Saga ids whose ``notify`` fails (technically) while they are here."""


def participants() -> list[Participant]:
    """The stock, bank and post services."""
    stock, bank, post = Participant("stock"), Participant("bank"), Participant("post")

    @stock.handler("reserve")
    async def reserve(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"reservation": f"r-{ctx.saga_id}"}

    @stock.handler("release")
    async def release(payload: dict[str, Any], ctx: StepContext) -> None:
        return None

    @bank.handler("charge")
    async def charge(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        if payload.get("fail"):
            raise StepFailed("card declined")
        return {"charge_id": f"c-{ctx.saga_id}", "card": {"last4": "4242"}}

    @bank.handler("refund")
    async def refund(payload: dict[str, Any], ctx: StepContext) -> None:
        return None

    @post.handler("ship")
    async def ship(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"parcel": f"p-{ctx.saga_id}"}

    @post.handler("notify")
    async def notify(payload: dict[str, Any], ctx: StepContext) -> None:
        if ctx.saga_id in BROKEN:
            raise RuntimeError("mail server down")
        return None

    return [stock, bank, post]
