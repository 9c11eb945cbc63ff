"""Where a participant keeps the outcomes it has replied with, to deduplicate redeliveries.

`MemoryReplyStore` lives as long as the process; `SQLiteReplyStore` survives restarts and is
what a service with a local SQLite database should use (ideally the same file as its own data).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Protocol

import anyio
import orjson

from saga.core.messages import ErrorInfo

__all__ = ["MemoryReplyStore", "ReplyStore", "SQLiteReplyStore", "StoredReply"]

StoredReply = tuple[bool, dict[str, object] | None, ErrorInfo | None]
"""(ok, output, error) of a handled command."""


class ReplyStore(Protocol):
    """Outcomes by idempotency key."""

    async def get(self, key: str) -> StoredReply | None:
        """The stored outcome for ``key``, if any."""
        ...

    async def put(
        self, key: str, ok: bool, output: dict[str, object] | None, error: ErrorInfo | None
    ) -> None:
        """Stores the outcome for ``key`` (the first write wins)."""
        ...


class MemoryReplyStore:
    """Outcomes in a dict: deduplicates within one process's lifetime."""

    def __init__(self) -> None:
        self._data: dict[str, StoredReply] = {}

    async def get(self, key: str) -> StoredReply | None:
        """The stored outcome for ``key``, if any."""
        return self._data.get(key)

    async def put(
        self, key: str, ok: bool, output: dict[str, object] | None, error: ErrorInfo | None
    ) -> None:
        """Stores the outcome for ``key`` (the first write wins)."""
        self._data.setdefault(key, (ok, output, error))


class SQLiteReplyStore:
    """Outcomes in a SQLite table (``saga_replies``), durable across restarts.

    Args:
        path: The database file; created if missing, readable and writable by its owner only
            (outputs may hold what a service would not show to other users of the machine).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._local = threading.local()
        if not os.path.exists(self.path):
            # An empty file is an empty database; SQLite gives its -wal and -shm files the
            # same mode. An existing file keeps the mode it has.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS saga_replies ("
                " key TEXT PRIMARY KEY, ok INTEGER NOT NULL, output BLOB, error BLOB)"
            )

    def _connect(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def _get(self, key: str) -> StoredReply | None:
        row = (
            self._connect()
            .execute("SELECT ok, output, error FROM saga_replies WHERE key = ?", (key,))
            .fetchone()
        )
        if row is None:
            return None
        output = orjson.loads(row[1]) if row[1] is not None else None
        error = ErrorInfo.model_validate_json(row[2]) if row[2] is not None else None
        return bool(row[0]), output, error

    def _put(
        self, key: str, ok: bool, output: dict[str, object] | None, error: ErrorInfo | None
    ) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR IGNORE INTO saga_replies (key, ok, output, error) VALUES (?, ?, ?, ?)",
                (
                    key,
                    int(ok),
                    orjson.dumps(output) if output is not None else None,
                    error.model_dump_json() if error is not None else None,
                ),
            )

    async def get(self, key: str) -> StoredReply | None:
        """The stored outcome for ``key``, if any."""
        return await anyio.to_thread.run_sync(self._get, key)

    async def put(
        self, key: str, ok: bool, output: dict[str, object] | None, error: ErrorInfo | None
    ) -> None:
        """Stores the outcome for ``key`` (the first write wins)."""
        await anyio.to_thread.run_sync(self._put, key, ok, output, error)
