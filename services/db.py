"""A service's own SQLite database: one file per service, shared with its reply store.

Handlers are plain functions, which the participant runs in worker threads, so each thread gets
its own connection. Connections run in autocommit mode and every write is one explicit
``BEGIN IMMEDIATE`` transaction: taking the write lock up front means two handlers never
deadlock upgrading a read lock, and WAL mode lets readers (the tests, an operator) look in while
the service writes.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["ServiceDB", "data_dir", "db_path"]

_COMMON_SCHEMA = """
CREATE TABLE IF NOT EXISTS fault_crashes (
    idempotency_key TEXT PRIMARY KEY,
    crashed_at REAL NOT NULL
);
"""
"""Remembers which commands already crashed the service once (see `services.faults`)."""


def data_dir() -> Path:
    """Where the services keep their databases: ``$SAGA_SERVICES_DATA``, else ``./var``."""
    return Path(os.environ.get("SAGA_SERVICES_DATA") or "var")


def db_path(service: str, root: Path | None = None) -> Path:
    """The database file of ``service`` under ``root`` (default: `data_dir`)."""
    return (root or data_dir()) / f"{service}.sqlite3"


class ServiceDB:
    """One service's database.

    Args:
        service: The service name; the file is ``<data dir>/<service>.sqlite3``.
        schema: ``CREATE TABLE IF NOT EXISTS`` statements for the service's own tables.
        path: Overrides the file location (tests).
    """

    def __init__(self, service: str, schema: str, path: Path | None = None) -> None:
        self.service = service
        self.path = path or db_path(service)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self.connect().executescript(_COMMON_SCHEMA + schema)

    def connect(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        db = self.connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of a read-only query, as dicts."""
        return [dict(row) for row in self.connect().execute(sql, params).fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        """The first row of a read-only query, or ``None``."""
        row = self.connect().execute(sql, params).fetchone()
        return dict(row) if row is not None else None

    def mark_crashed(self, key: str, now: float) -> bool:
        """Records that the command ``key`` crashed the service; False if it already had."""
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO fault_crashes (idempotency_key, crashed_at) VALUES (?, ?)",
                (key, now),
            )
            return cursor.rowcount == 1
