"""What the pasta order tests share: the step timeout they run with and the `Services` handle."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saga import SagaClient, SagaState
from saga.core.messages import EventBase
from services.db import db_path
from services.fleet import Fleet
from services.orders import submit

__all__ = ["STEP_TIMEOUT", "Services"]

STEP_TIMEOUT = 5.0
"""The services' step timeout in these tests. Long enough that a crashed participant is back
before the payment step's three attempts run out: its replacement must wait for the broker to
expire the dead member's session (10 s) before it gets the partitions."""


@dataclass
class Services:
    """What a test gets: the running fleet, a client, and the services' own data."""

    fleet: Fleet
    client: SagaClient

    @property
    def prefix(self) -> str:
        """The topic prefix of this module's processes."""
        return self.fleet.prefix

    @property
    def data_dir(self) -> Path:
        """Where the services keep their SQLite files."""
        return self.fleet.data_dir

    def rows(self, service: str, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Runs a query against one service's own database."""
        with closing(sqlite3.connect(db_path(service, self.data_dir), timeout=30)) as db:
            db.row_factory = sqlite3.Row
            return [dict(row) for row in db.execute(sql, params).fetchall()]

    def table(self, service: str, table: str, order_id: str) -> list[dict[str, Any]]:
        """One order's rows of one service's table."""
        return self.rows(service, f"SELECT * FROM {table} WHERE order_id = ?", (order_id,))

    async def run(self, order: dict[str, Any], timeout: float = 45.0) -> SagaState:
        """Starts the order's saga and waits until it ends."""
        (saga_id,) = await submit(self.client, [order])
        return await self.client.wait(saga_id, timeout, poll=0.2)

    async def events(self, saga_id: str) -> list[EventBase]:
        """The saga's events, from the log."""
        return await self.client.events(saga_id)
