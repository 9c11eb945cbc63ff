"""The restaurant service: accepts an order, prepares its dishes, starts cooking it, or cancels it.

Accepting is compensatable (the order can still be cancelled); so is preparing each dish
(``prepare_dish``, one command per item of the ``dishes`` fan-out; undo: ``discard_dish``),
and the ``dishes`` table records every dish prepared and discarded, by its position in the
order. Starting to cook is the saga's pivot: once the pasta is in the water the order is not
undone; ``cook_party`` starts every order of a catering at once (the catering's pivot). A
restaurant that is closed, or an order with a dish it does not make, is a business failure.

Run with ``python -m saga participant --app services.restaurant:participant``.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import orjson

from saga import Participant, SQLiteReplyStore, StepContext, StepFailed
from saga.core.definition import split_item
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
    CREATE TABLE IF NOT EXISTS dishes (
        idempotency_key TEXT PRIMARY KEY,
        order_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        dish TEXT NOT NULL,
        quantity INTEGER NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('prepared', 'discarded')),
        prepared_at REAL NOT NULL,
        discarded_at REAL
    );
    CREATE INDEX IF NOT EXISTS dishes_by_order ON dishes (order_id);
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


def _position(ctx: StepContext) -> int:
    """The dish's position in its order: the index of the fan-out item (``dishes[2]``)."""
    index = split_item(ctx.step)[1]
    if index is None:
        raise StepFailed(f"step {ctx.step!r} is not an item of a fan-out over the dishes")
    return index


@participant.handler("prepare_dish")
def prepare_dish(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Prepares one dish of an accepted order (the mise en place: it can still be thrown
    away); one command per item of the order's ``dishes`` fan-out."""
    fault = fault_for(payload, ctx, "prepare_dish")
    fault.before(ctx)
    dish: dict[str, Any] = dict(payload["dish"])
    if dish.get("dish") not in MENU:
        raise StepFailed(f"the kitchen does not make {dish.get('dish')!r}")
    position = _position(ctx)
    with db.transaction() as conn:
        conn.execute(
            "INSERT OR IGNORE INTO dishes (idempotency_key, order_id, position, dish, quantity,"
            " status, prepared_at) VALUES (?, ?, ?, ?, ?, 'prepared', ?)",
            (
                ctx.idempotency_key,
                payload["order_id"],
                position,
                dish["dish"],
                int(dish.get("quantity", 1)),
                time.time(),
            ),
        )
        found = conn.execute(
            "SELECT * FROM dishes WHERE idempotency_key = ?", (ctx.idempotency_key,)
        ).fetchone()
    fault.after(ctx, db)
    return {
        "position": found["position"],
        "dish": found["dish"],
        "quantity": found["quantity"],
        "prep_minutes": _PREP_MINUTES_PER_DISH * found["quantity"],
    }


@participant.handler("discard_dish")
def discard_dish(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Throws away one prepared dish of an order that is undone; nothing to do if it was
    never prepared (its command timed out before it arrived, say)."""
    fault = fault_for(payload, ctx, "discard_dish")
    fault.before(ctx)
    order_id = order_id_of(payload, ctx)
    with db.transaction() as conn:
        discarded = conn.execute(
            "UPDATE dishes SET status = 'discarded', discarded_at = ?"
            " WHERE order_id = ? AND position = ? AND status = 'prepared'",
            (time.time(), order_id, _position(ctx)),
        ).rowcount
    fault.after(ctx, db)
    return {"discarded": discarded}


def _start_cooking(conn: sqlite3.Connection, key: str, order_id: str, now: float) -> dict[str, Any]:
    """Starts cooking one accepted order once per ``key``; its ticket and since when."""
    order = conn.execute(
        "SELECT * FROM orders WHERE order_id = ? AND status != 'cancelled'", (order_id,)
    ).fetchone()
    if order is None:
        raise StepFailed(f"order {order_id} is not in the kitchen (never accepted or cancelled)")
    started = conn.execute(
        "INSERT OR IGNORE INTO cooking (idempotency_key, order_id, started_at) VALUES (?, ?, ?)",
        (key, order_id, now),
    ).rowcount
    if started:
        conn.execute(
            "UPDATE orders SET status = 'cooking', cooking_at = ? WHERE order_id = ?"
            " AND status = 'accepted'",
            (now, order_id),
        )
    cooking = conn.execute(
        "SELECT started_at FROM cooking WHERE idempotency_key = ?", (key,)
    ).fetchone()
    return {"ticket": order["ticket"], "cooking_since": cooking["started_at"]}


@participant.handler("start_cooking")
def start_cooking(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Starts cooking an accepted order (the point of no return)."""
    fault = fault_for(payload, ctx, "start_cooking")
    fault.before(ctx)
    order_id = order_id_of(payload, ctx)
    with db.transaction() as conn:
        cooking = _start_cooking(conn, ctx.idempotency_key, order_id, time.time())
    fault.after(ctx, db)
    return cooking


@participant.handler("cook_party")
def cook_party(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Starts cooking every order of a catering at once (the catering's point of no return):
    all of them or, if one is not in the kitchen, none."""
    fault = fault_for(payload, ctx, "cook_party")
    fault.before(ctx)
    order_ids = [str(o["order_id"]) for o in payload["orders"]]
    now = time.time()
    with db.transaction() as conn:
        # One key per order: the cooking table's key is the command's, and this command
        # starts several orders.
        tickets = [_start_cooking(conn, f"{ctx.idempotency_key}:{o}", o, now) for o in order_ids]
    fault.after(ctx, db)
    return {
        "party_id": payload["party_id"],
        "tickets": [t["ticket"] for t in tickets],
        "cooking_since": min((t["cooking_since"] for t in tickets), default=now),
    }


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
