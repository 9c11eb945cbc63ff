"""The location service: reserves a delivery slot in the customer's zone.

Slots are quarter hours; each zone delivers at most `SLOT_CAPACITY` orders per slot, so a busy
zone pushes orders to later slots. A zone that is not served is a business failure.

Run with ``python -m saga participant --app services.location:participant``.
"""

from __future__ import annotations

import time
from typing import Any

from saga import Participant, SQLiteReplyStore, StepContext, StepFailed
from services.db import ServiceDB
from services.faults import fault_for
from services.orders import order_id_of

__all__ = ["SLOT_CAPACITY", "ZONES", "db", "participant"]

ZONES = ("navigli", "brera", "isola", "porta-romana", "citta-studi")
"""The zones the riders cover."""

SLOT_CAPACITY = 12
"""Orders one zone delivers in one quarter hour."""

_SLOT = 15 * 60
_LEAD = 30 * 60  # the kitchen and the ride need about half an hour

db = ServiceDB(
    "location",
    """
    CREATE TABLE IF NOT EXISTS slots (
        idempotency_key TEXT PRIMARY KEY,
        order_id TEXT NOT NULL,
        zone TEXT NOT NULL,
        slot_start REAL NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('reserved', 'released')),
        reserved_at REAL NOT NULL,
        released_at REAL
    );
    CREATE INDEX IF NOT EXISTS slots_by_order ON slots (order_id);
    CREATE INDEX IF NOT EXISTS slots_by_zone ON slots (zone, slot_start, status);
    """,
)

participant = Participant("location", store=SQLiteReplyStore(db.path))


def _slot_view(row: dict[str, Any]) -> dict[str, Any]:
    start = row["slot_start"]
    return {
        "slot_id": row["idempotency_key"],
        "zone": row["zone"],
        "slot": time.strftime("%H:%M", time.localtime(start)),
        "slot_start": start,
    }


@participant.handler("reserve_slot")
def reserve_slot(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Reserves the first quarter hour with room in the zone, at least half an hour ahead."""
    fault = fault_for(payload, ctx, "reserve_slot")
    fault.before(ctx)
    zone = str(payload.get("zone", ""))
    if zone not in ZONES:
        raise StepFailed(f"zone {zone!r} is not served", {"zones": list(ZONES)})
    now = time.time()
    with db.transaction() as conn:
        # The key makes a redelivered command find its own reservation instead of a second one.
        row = conn.execute("SELECT * FROM slots WHERE idempotency_key = ?", (ctx.idempotency_key,))
        found = row.fetchone()
        if found is None:
            slot = (int(now + _LEAD) // _SLOT + 1) * _SLOT
            while (
                conn.execute(
                    "SELECT COUNT(*) FROM slots WHERE zone = ? AND slot_start = ?"
                    " AND status = 'reserved'",
                    (zone, slot),
                ).fetchone()[0]
                >= SLOT_CAPACITY
            ):
                slot += _SLOT
            conn.execute(
                "INSERT INTO slots (idempotency_key, order_id, zone, slot_start, status,"
                " reserved_at) VALUES (?, ?, ?, ?, 'reserved', ?)",
                (ctx.idempotency_key, payload["order_id"], zone, slot, now),
            )
            found = conn.execute(
                "SELECT * FROM slots WHERE idempotency_key = ?", (ctx.idempotency_key,)
            ).fetchone()
    fault.after(ctx, db)
    return _slot_view(dict(found))


@participant.handler("release_slot")
def release_slot(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Frees the order's slot; nothing to do if it was never reserved or is already free."""
    fault = fault_for(payload, ctx, "release_slot")
    fault.before(ctx)
    order_id = order_id_of(payload, ctx)
    with db.transaction() as conn:
        released = conn.execute(
            "UPDATE slots SET status = 'released', released_at = ?"
            " WHERE order_id = ? AND status = 'reserved'",
            (time.time(), order_id),
        ).rowcount
    fault.after(ctx, db)
    return {"released": released}
