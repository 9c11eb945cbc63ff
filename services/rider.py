"""The rider service: assigns a rider of the order's zone, or releases one.

The saga looks for a rider as soon as the restaurant has started on the order (start-to-start),
so the two run side by side. Each zone has a few riders; the least busy one is assigned.

Run with ``python -m saga participant --app services.rider:participant``.
"""

from __future__ import annotations

import time
from typing import Any

from saga import Participant, SQLiteReplyStore, StepContext, StepFailed
from services.db import ServiceDB
from services.faults import fault_for
from services.orders import order_id_of

__all__ = ["RIDERS", "db", "participant"]

RIDERS: dict[str, tuple[str, ...]] = {
    "navigli": ("Giulia", "Marco", "Sara"),
    "brera": ("Luca", "Chiara"),
    "isola": ("Paolo", "Elena", "Davide"),
    "porta-romana": ("Francesca", "Matteo"),
    "citta-studi": ("Alessandro", "Martina", "Simone"),
}
"""The riders of each zone."""

db = ServiceDB(
    "rider",
    """
    CREATE TABLE IF NOT EXISTS assignments (
        idempotency_key TEXT PRIMARY KEY,
        order_id TEXT NOT NULL,
        zone TEXT NOT NULL,
        rider TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('assigned', 'released')),
        assigned_at REAL NOT NULL,
        released_at REAL
    );
    CREATE INDEX IF NOT EXISTS assignments_by_order ON assignments (order_id);
    CREATE INDEX IF NOT EXISTS assignments_by_rider ON assignments (rider, status);
    """,
)

participant = Participant("rider", store=SQLiteReplyStore(db.path))


@participant.handler("assign")
def assign(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Assigns the zone's least busy rider to the order for its delivery slot."""
    fault = fault_for(payload, ctx, "assign")
    fault.before(ctx)
    zone = str(payload["zone"])
    riders = RIDERS.get(zone)
    if not riders:
        raise StepFailed(f"no riders in zone {zone!r}")
    with db.transaction() as conn:
        found = conn.execute(
            "SELECT * FROM assignments WHERE idempotency_key = ?", (ctx.idempotency_key,)
        ).fetchone()
        if found is None:
            busy = dict(
                conn.execute(
                    "SELECT rider, COUNT(*) FROM assignments WHERE zone = ? AND status = 'assigned'"
                    " GROUP BY rider",
                    (zone,),
                ).fetchall()
            )
            rider = min(riders, key=lambda r: (busy.get(r, 0), r))
            conn.execute(
                "INSERT INTO assignments (idempotency_key, order_id, zone, rider, status,"
                " assigned_at) VALUES (?, ?, ?, ?, 'assigned', ?)",
                (ctx.idempotency_key, payload["order_id"], zone, rider, time.time()),
            )
            found = conn.execute(
                "SELECT * FROM assignments WHERE idempotency_key = ?", (ctx.idempotency_key,)
            ).fetchone()
    fault.after(ctx, db)
    return {"rider": found["rider"], "zone": zone, "slot": payload.get("slot")}


@participant.handler("release")
def release(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Frees the order's rider; nothing to do if none was assigned."""
    fault = fault_for(payload, ctx, "release")
    fault.before(ctx)
    order_id = order_id_of(payload, ctx)
    with db.transaction() as conn:
        released = conn.execute(
            "UPDATE assignments SET status = 'released', released_at = ?"
            " WHERE order_id = ? AND status = 'assigned'",
            (time.time(), order_id),
        ).rowcount
    fault.after(ctx, db)
    return {"released": released}
