"""The notification service: tells the customer that the order is cooking and who brings it.

Notifying comes after the pivot, so it is retriable: it is retried until it succeeds. The
message is recorded under the command's idempotency key, so a retry never texts twice.

Run with ``python -m saga participant --app services.notification:participant``.
"""

from __future__ import annotations

import time
from typing import Any

from saga import Participant, SQLiteReplyStore, StepContext
from services.db import ServiceDB
from services.faults import fault_for

__all__ = ["db", "participant"]

db = ServiceDB(
    "notification",
    """
    CREATE TABLE IF NOT EXISTS messages (
        idempotency_key TEXT PRIMARY KEY,
        order_id TEXT NOT NULL,
        customer TEXT NOT NULL,
        channel TEXT NOT NULL,
        text TEXT NOT NULL,
        sent_at REAL NOT NULL
    );
    CREATE INDEX IF NOT EXISTS messages_by_order ON messages (order_id);
    """,
)

participant = Participant("notification", store=SQLiteReplyStore(db.path))


@participant.handler("notify_customer")
def notify_customer(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Sends the customer one message about the order, once per idempotency key."""
    fault = fault_for(payload, ctx, "notify_customer")
    fault.before(ctx)
    text = (
        f"Ciao {payload['customer']}! Your order {payload['order_id']} is cooking "
        f"(ticket {payload['ticket']}); {payload['rider']} brings it at {payload['slot']}."
    )
    with db.transaction() as conn:
        conn.execute(
            "INSERT OR IGNORE INTO messages (idempotency_key, order_id, customer, channel, text,"
            " sent_at) VALUES (?, ?, ?, 'sms', ?, ?)",
            (ctx.idempotency_key, payload["order_id"], payload["customer"], text, time.time()),
        )
        row = conn.execute(
            "SELECT * FROM messages WHERE idempotency_key = ?", (ctx.idempotency_key,)
        ).fetchone()
    fault.after(ctx, db)
    return {"message_id": row["idempotency_key"], "channel": row["channel"], "text": row["text"]}
