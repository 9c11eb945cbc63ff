"""The restaurant service: accepts an order, starts cooking it, or cancels it.

Accepting is compensatable (the order can still be cancelled); starting to cook is the saga's
pivot: once the pasta is in the water the order is not undone. A restaurant that is closed,
or an order with a dish it does not make, is a business failure.

Run with ``python -m saga participant --app services.restaurant:participant``.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from saga import Participant, SQLiteReplyStore, StepContext, StepFailed
from services.db import ServiceDB
from services.faults import fault_for
from services.orders import MENU, order_id_of

__all__ = ["db", "participant"]

db = ServiceDB(
    "restaurant",
    """
    CREATE TABLE IF NOT EXISTS orders (
        idempotency_key TEXT PRIMARY KEY,
        order_id TEXT NOT NULL,
        restaurant TEXT NOT NULL,
        items TEXT NOT NULL,
        ticket INTEGER NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('accepted', 'cooking', 'cancelled')),
        accepted_at REAL NOT NULL,
        cooking_at REAL,
        cancelled_at REAL
    );
    CREATE INDEX IF NOT EXISTS orders_by_order ON orders (order_id);
    CREATE TABLE IF NOT EXISTS cooking (
        idempotency_key TEXT PRIMARY KEY,
        order_id TEXT NOT NULL,
        started_at REAL NOT NULL
    );
    """,
)

participant = Participant("restaurant", store=SQLiteReplyStore(db.path))

_PREP_MINUTES_PER_DISH = 4


@participant.handler("accept")
def accept(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Takes the order into the kitchen's queue and gives it a ticket number."""
    fault = fault_for(payload, ctx, "accept")
    fault.before(ctx)
    items: list[dict[str, Any]] = list(payload["items"])
    unknown = sorted({i["dish"] for i in items} - set(MENU))
    if unknown:
        raise StepFailed(f"the kitchen does not make {', '.join(unknown)}", {"dishes": unknown})
    with db.transaction() as conn:
        found = conn.execute(
            "SELECT * FROM orders WHERE idempotency_key = ?", (ctx.idempotency_key,)
        ).fetchone()
        if found is None:
            ticket = conn.execute("SELECT COALESCE(MAX(ticket), 0) + 1 FROM orders").fetchone()[0]
            conn.execute(
                "INSERT INTO orders (idempotency_key, order_id, restaurant, items, ticket, status,"
                " accepted_at) VALUES (?, ?, ?, ?, ?, 'accepted', ?)",
                (
                    ctx.idempotency_key,
                    payload["order_id"],
                    payload["restaurant"],
                    orjson.dumps(items).decode(),
                    ticket,
                    time.time(),
                ),
            )
            found = conn.execute(
                "SELECT * FROM orders WHERE idempotency_key = ?", (ctx.idempotency_key,)
            ).fetchone()
    fault.after(ctx, db)
    dishes = sum(int(i.get("quantity", 1)) for i in items)
    return {
        "ticket": found["ticket"],
        "restaurant": found["restaurant"],
        "prep_minutes": 8 + _PREP_MINUTES_PER_DISH * dishes,
    }


@participant.handler("start_cooking")
def start_cooking(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Starts cooking an accepted order (the point of no return)."""
    fault = fault_for(payload, ctx, "start_cooking")
    fault.before(ctx)
    order_id = order_id_of(payload, ctx)
    now = time.time()
    with db.transaction() as conn:
        order = conn.execute(
            "SELECT * FROM orders WHERE order_id = ? AND status != 'cancelled'", (order_id,)
        ).fetchone()
        if order is None:
            raise StepFailed(
                f"order {order_id} is not in the kitchen (never accepted or cancelled)"
            )
        started = conn.execute(
            "INSERT OR IGNORE INTO cooking (idempotency_key, order_id, started_at)"
            " VALUES (?, ?, ?)",
            (ctx.idempotency_key, order_id, now),
        ).rowcount
        if started:
            conn.execute(
                "UPDATE orders SET status = 'cooking', cooking_at = ? WHERE order_id = ?"
                " AND status = 'accepted'",
                (now, order_id),
            )
        cooking = conn.execute(
            "SELECT started_at FROM cooking WHERE idempotency_key = ?", (ctx.idempotency_key,)
        ).fetchone()
    fault.after(ctx, db)
    return {"ticket": order["ticket"], "cooking_since": cooking["started_at"]}


@participant.handler("cancel")
def cancel(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Cancels the order if the kitchen has it; nothing to do if it never arrived."""
    fault = fault_for(payload, ctx, "cancel")
    fault.before(ctx)
    order_id = order_id_of(payload, ctx)
    with db.transaction() as conn:
        # Cooking orders are never cancelled: the pivot is after this step, so the engine
        # does not compensate once cooking started; the condition only guards the data.
        cancelled = conn.execute(
            "UPDATE orders SET status = 'cancelled', cancelled_at = ?"
            " WHERE order_id = ? AND status = 'accepted'",
            (time.time(), order_id),
        ).rowcount
    fault.after(ctx, db)
    return {"cancelled": cancelled}
