"""The payment service: charges the customer for an order and refunds it.

A charge is keyed by the command's idempotency key, the way a payment provider takes an
idempotency header, so a redelivered or retried charge finds the first one instead of charging
twice. Orders over `CARD_LIMIT` are declined (a business failure).

Run with ``python -m saga participant --app services.payment:participant``.
"""

from __future__ import annotations

import time
from typing import Any

from saga import Participant, SQLiteReplyStore, StepContext, StepFailed
from services.db import ServiceDB
from services.faults import fault_for
from services.orders import order_id_of

__all__ = ["CARD_LIMIT", "db", "participant"]

CARD_LIMIT = 500.0
"""The largest amount a card is charged, in euros."""

db = ServiceDB(
    "payment",
    """
    CREATE TABLE IF NOT EXISTS charges (
        idempotency_key TEXT PRIMARY KEY,
        order_id TEXT NOT NULL,
        customer TEXT NOT NULL,
        amount REAL NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('charged', 'refunded')),
        charged_at REAL NOT NULL,
        refunded_at REAL
    );
    CREATE INDEX IF NOT EXISTS charges_by_order ON charges (order_id);
    """,
)

participant = Participant("payment", store=SQLiteReplyStore(db.path))


@participant.handler("charge")
def charge(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Charges ``amount`` to ``customer`` for ``order_id``, once per idempotency key."""
    fault = fault_for(payload, ctx, "charge")
    fault.before(ctx)
    amount = round(float(payload["amount"]), 2)
    if amount <= 0:
        raise StepFailed(f"order {payload['order_id']}: nothing to charge ({amount:.2f})")
    if amount > CARD_LIMIT:
        raise StepFailed(
            f"card declined: {amount:.2f} EUR is over the {CARD_LIMIT:.0f} EUR limit",
            {"amount": amount, "limit": CARD_LIMIT},
        )
    with db.transaction() as conn:
        conn.execute(
            "INSERT OR IGNORE INTO charges (idempotency_key, order_id, customer, amount, status,"
            " charged_at) VALUES (?, ?, ?, ?, 'charged', ?)",
            (ctx.idempotency_key, payload["order_id"], payload["customer"], amount, time.time()),
        )
        row = conn.execute(
            "SELECT * FROM charges WHERE idempotency_key = ?", (ctx.idempotency_key,)
        ).fetchone()
    fault.after(ctx, db)
    return {"charge_id": row["idempotency_key"], "amount": row["amount"], "currency": "EUR"}


@participant.handler("refund")
def refund(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Refunds the order's charge; a charge that never happened needs no refund."""
    fault = fault_for(payload, ctx, "refund")
    fault.before(ctx)
    order_id = order_id_of(payload, ctx)
    with db.transaction() as conn:
        refunded = conn.execute(
            "UPDATE charges SET status = 'refunded', refunded_at = ?"
            " WHERE order_id = ? AND status = 'charged'",
            (time.time(), order_id),
        ).rowcount
        total = conn.execute(
            "SELECT COALESCE(SUM(amount), 0) FROM charges WHERE order_id = ?"
            " AND status = 'refunded'",
            (order_id,),
        ).fetchone()[0]
    fault.after(ctx, db)
    return {"refunded": refunded, "amount": total}
