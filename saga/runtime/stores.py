"""Where a participant keeps the outcomes it has replied with, to deduplicate redeliveries.

`MemoryReplyStore` lives as long as the process; `SQLiteReplyStore` survives restarts and is
what a service with a local SQLite database should use (ideally the same file as its own data).

Besides outcomes, a store keeps counters (`ReplyStore.increment`): the participant counts each
start of a handler that has no outcome yet, before it runs, so that a command whose handler
kills its process every time is recognised after a few deliveries instead of looping forever.
That count must outlive the process that crashed, which is why it lives in the store and not in
the participant's memory; a durable store makes it durable.
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
    """Outcomes by idempotency key, and counters by name."""

    async def get(self, key: str) -> StoredReply | None:
        """The stored outcome for ``key``, if any."""
        ...

    async def put(
        self, key: str, ok: bool, output: dict[str, object] | None, error: ErrorInfo | None
    ) -> None:
        """Stores the outcome for ``key`` (the first write wins)."""
        ...

    async def increment(self, key: str) -> int:
        """Adds one to the counter ``key`` (0 until then) and returns its new value.

        Counters are apart from outcomes: `get` never returns one.
        """
        ...


class MemoryReplyStore:
    """Outcomes in a dict: deduplicates within one process's lifetime."""

    def __init__(self) -> None:
        self._data: dict[str, StoredReply] = {}
        self._counters: dict[str, int] = {}

    async def get(self, key: str) -> StoredReply | None:
        """The stored outcome for ``key``, if any."""
        return self._data.get(key)

    async def put(
        self, key: str, ok: bool, output: dict[str, object] | None, error: ErrorInfo | None
    ) -> None:
        """Stores the outcome for ``key`` (the first write wins)."""
        self._data.setdefault(key, (ok, output, error))

    async def increment(self, key: str) -> int:
        """Adds one to the counter ``key`` and returns its new value."""
        self._counters[key] = n = self._counters.get(key, 0) + 1
        return n


class SQLiteReplyStore:
    """Outcomes in a SQLite table (``saga_replies``), counters in another (``saga_counters``),
    durable across restarts.

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
            # Created here too for files of an older release, which have only saga_replies.
            db.execute(
                "CREATE TABLE IF NOT EXISTS saga_counters ("
                " key TEXT PRIMARY KEY, n INTEGER NOT NULL)"
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

    def _increment(self, key: str) -> int:
        with self._connect() as db:  # one transaction: the upsert and the read agree
            db.execute(
                "INSERT INTO saga_counters (key, n) VALUES (?, 1)"
                " ON CONFLICT (key) DO UPDATE SET n = n + 1",
                (key,),
            )
            (n,) = db.execute("SELECT n FROM saga_counters WHERE key = ?", (key,)).fetchone()
        return int(n)

    async def get(self, key: str) -> StoredReply | None:
        """The stored outcome for ``key``, if any."""
        return await anyio.to_thread.run_sync(self._get, key)

    async def put(
        self, key: str, ok: bool, output: dict[str, object] | None, error: ErrorInfo | None
    ) -> None:
        """Stores the outcome for ``key`` (the first write wins)."""
        await anyio.to_thread.run_sync(self._put, key, ok, output, error)

    async def increment(self, key: str) -> int:
        """Adds one to the counter ``key`` and returns its new value."""
        return await anyio.to_thread.run_sync(self._increment, key)
