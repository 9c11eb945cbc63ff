"""The saga index in SQLite: the default adapter of `saga.index.port`.

One file, in WAL mode, so that one writer (the projector, in the process that runs it) and any
number of readers (``saga list`` in another shell, the API's worker threads) work at once: a
reader sees the last committed batch and never blocks the writer. Each thread reads through its
own connection; the writer has one, used from one thread at a time.

Tables (the states are the truth of a row; the other tables are its indexes)::

    meta       one row: schema version, prefix, generation, last applied, last look
    positions  (topic, partition) -> the next offset to read: where the projector resumes
    log_ends   log partition -> its end offset as last seen (the lag is measured against it)
    sagas      saga id -> name, version, status, seq, started/updated times, its record's
               partition and offset, and the state as JSON
    status_counts  (name, status) -> how many sagas: kept by triggers on ``sagas``, so that
               counts and the totals of name/status lists read a few rows, not every saga
    steps      (saga id, step) -> the step's status
    inputs     (saga id, top-level input key) -> the value's canonical JSON
    events     (saga id, seq) -> type, time, partition, offset, the event's JSON
    bad        (topic, partition, offset) -> why the record could not be used

Every query orders by ``(updated_at, saga_id)`` descending and pages by keyset (the cursor is
the last row's pair), so page N costs what page 1 does; each filter has an index. Statements
are fixed texts with parameters, so sqlite3's statement cache prepares each once per
connection. A batch is one transaction (`write`), and the positions move in it: a crash loses
no row and applies none twice.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from saga.core.state import SagaState
from saga.errors import ConfigurationError
from saga.index.port import (
    BadRecord,
    Change,
    HistoryEntry,
    IndexLag,
    Page,
    SagaQuery,
    SagaRow,
)
from saga.index.query import MAX_LIMIT, decode_cursor, encode_cursor, input_value

__all__ = ["SCHEMA_VERSION", "IndexInfo", "SqliteSagaIndex"]

SCHEMA_VERSION = 3
"""Bumped when the tables change; an index of another version is rebuilt, not migrated (it
is a projection: `SqliteSagaIndex.reset`)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    schema INTEGER NOT NULL,
    prefix TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    updated_at REAL,
    looked_at REAL
);
CREATE TABLE IF NOT EXISTS positions (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log_ends (
    partition INTEGER PRIMARY KEY, end_offset INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sagas (
    saga_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL,
    seq INTEGER NOT NULL,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    state BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS sagas_by_update ON sagas (updated_at, saga_id);
CREATE INDEX IF NOT EXISTS sagas_by_name ON sagas (name, updated_at, saga_id);
CREATE INDEX IF NOT EXISTS sagas_by_status ON sagas (status, updated_at, saga_id);
CREATE INDEX IF NOT EXISTS sagas_by_version ON sagas (name, version, updated_at, saga_id);
CREATE INDEX IF NOT EXISTS sagas_by_name_status ON sagas (name, status, updated_at, saga_id);
CREATE INDEX IF NOT EXISTS sagas_by_start ON sagas (started_at, updated_at, saga_id);
CREATE TABLE IF NOT EXISTS status_counts (
    name TEXT NOT NULL, status TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (name, status)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS sagas_counted AFTER INSERT ON sagas BEGIN
    INSERT INTO status_counts (name, status, n) VALUES (new.name, new.status, 1)
    ON CONFLICT (name, status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS sagas_recounted AFTER UPDATE OF name, status ON sagas
WHEN old.name IS NOT new.name OR old.status IS NOT new.status BEGIN
    UPDATE status_counts SET n = n - 1 WHERE name = old.name AND status = old.status;
    INSERT INTO status_counts (name, status, n) VALUES (new.name, new.status, 1)
    ON CONFLICT (name, status) DO UPDATE SET n = n + 1;
END;
CREATE TABLE IF NOT EXISTS steps (
    saga_id TEXT NOT NULL, step TEXT NOT NULL, status TEXT NOT NULL,
    PRIMARY KEY (saga_id, step)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS steps_by_status ON steps (step, status, saga_id);
CREATE INDEX IF NOT EXISTS steps_by_status_only ON steps (status, saga_id);
CREATE TABLE IF NOT EXISTS inputs (
    saga_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (saga_id, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS inputs_by_value ON inputs (key, value, saga_id);
CREATE TABLE IF NOT EXISTS events (
    saga_id TEXT NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, at REAL NOT NULL,
    partition INTEGER NOT NULL, offset INTEGER NOT NULL, event BLOB NOT NULL,
    PRIMARY KEY (saga_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bad (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
    key TEXT, reason TEXT NOT NULL,
    PRIMARY KEY (topic, partition, offset)
) WITHOUT ROWID;
"""

_TABLES = (
    "meta",
    "positions",
    "log_ends",
    "sagas",
    "status_counts",
    "steps",
    "inputs",
    "events",
    "bad",
)

_UPSERT_SAGA = """
INSERT INTO sagas (saga_id, name, version, status, seq, started_at, updated_at, partition,
                   offset, state)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (saga_id) DO UPDATE SET
    name = excluded.name, version = excluded.version, status = excluded.status,
    seq = excluded.seq, started_at = excluded.started_at, updated_at = excluded.updated_at,
    partition = excluded.partition, offset = excluded.offset, state = excluded.state
"""
_UPSERT_STEP = """
INSERT INTO steps (saga_id, step, status) VALUES (?, ?, ?)
ON CONFLICT (saga_id, step) DO UPDATE SET status = excluded.status
WHERE status != excluded.status
"""
# A saga's input is fixed at its start: a key once recorded is never rewritten.
_INSERT_INPUT = "INSERT OR IGNORE INTO inputs (saga_id, key, value) VALUES (?, ?, ?)"
_INSERT_EVENT = """
INSERT OR IGNORE INTO events (saga_id, seq, type, at, partition, offset, event)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""
_INSERT_BAD = "INSERT OR IGNORE INTO bad (topic, partition, offset, key, reason) VALUES (?,?,?,?,?)"
_UPSERT_POSITION = """
INSERT INTO positions (topic, partition, next) VALUES (?, ?, ?)
ON CONFLICT (topic, partition) DO UPDATE SET next = excluded.next
"""
_UPSERT_END = """
INSERT INTO log_ends (partition, end_offset) VALUES (?, ?)
ON CONFLICT (partition) DO UPDATE SET end_offset = max(end_offset, excluded.end_offset)
"""
_ROW_COLUMNS = "state, partition, offset"


@dataclass(frozen=True)
class IndexInfo:
    """What ``saga index status`` shows: the index's size, freshness and problems."""

    path: Path
    prefix: str
    generation: int
    sagas: int
    events: int
    bad: int
    """Records the projector could not use, in all."""
    recent_bad: Sequence[BadRecord]
    """The latest of them (at most ten)."""
    lag: IndexLag
    looked_at: float | None
    """When the projector last looked at the log's end (``None``: never)."""


class SqliteSagaIndex:
    """The saga index in one SQLite file (`saga.index.port.SagaIndex` and `IndexWriter`).

    Args:
        path: The database file.
        prefix: The topic prefix it projects. A writer must give it: a new file records it,
            an existing one must hold the same. A reader may leave it out.
        readonly: Open for reading only (another process writes): the file must exist.

    Raises:
        ConfigurationError: A read-only index whose file does not exist or is not an index;
            an index of another prefix.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, prefix: str | None = None, readonly: bool = False
    ) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._lock_file: int | None = None
        if readonly:
            if not self.path.is_file():
                raise ConfigurationError(
                    f"no saga index at {self.path}: build one with `saga index rebuild --db "
                    f"{self.path}`, or run `saga serve` with it"
                )
            found, schema = self._meta(self._reader())
            if found is None:
                raise ConfigurationError(f"{self.path} is not a saga index (no meta row)")
            if schema != SCHEMA_VERSION:
                raise ConfigurationError(
                    f"the saga index at {self.path} was made by another release (schema "
                    f"{schema}, not {SCHEMA_VERSION}): rebuild it (`saga index rebuild`)"
                )
            if prefix is not None and found != prefix:
                raise ConfigurationError(
                    f"the saga index at {self.path} projects prefix {found!r}, not {prefix!r}"
                )
            self.prefix = found
            return
        if prefix is None:
            raise ConfigurationError("a saga index opened for writing needs its topic prefix")
        self.prefix = prefix
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = _lock(self.path)
        db = sqlite3.connect(self.path, check_same_thread=False, cached_statements=64)
        db.execute("PRAGMA journal_mode=WAL")
        # A crash may lose the last batches, never corrupt: the positions move with the rows,
        # so what is lost is read again from Kafka.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        # The indexes take random inserts: a cache of 64 MB (the default is 2) keeps their
        # inner pages in memory at a few hundred thousand sagas.
        db.execute("PRAGMA cache_size=-65536")
        db.execute("PRAGMA temp_store=MEMORY")
        self._writer = db
        try:
            self._create(db)
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------------

    def _create(self, db: sqlite3.Connection) -> None:
        with db:
            db.executescript(_SCHEMA)
            row = db.execute("SELECT schema, prefix FROM meta WHERE id = 1").fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO meta (id, schema, prefix) VALUES (1, ?, ?)",
                    (SCHEMA_VERSION, self.prefix),
                )
                return
        schema, prefix = row
        if prefix != self.prefix:
            raise ConfigurationError(
                f"the saga index at {self.path} projects prefix {prefix!r}, not "
                f"{self.prefix!r}: give another file, or rebuild it (`saga index rebuild`)"
            )
        if schema != SCHEMA_VERSION:
            self.reset()  # a projection: rebuilt from Kafka rather than migrated

    def _reader(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            try:
                db = sqlite3.connect(uri, uri=True, check_same_thread=False, cached_statements=64)
                db.execute("PRAGMA busy_timeout=5000")
                db.execute("PRAGMA query_only=1")
                db.execute("PRAGMA cache_size=-16384")
                db.execute("PRAGMA mmap_size=268435456")  # reads without a copy per page
                db.execute("PRAGMA temp_store=MEMORY")
            except sqlite3.Error as exc:
                raise ConfigurationError(f"cannot open the saga index {self.path}: {exc}") from exc
            self._local.db = db
            with self._lock:
                self._readers.append(db)
        return db

    @staticmethod
    def _meta(db: sqlite3.Connection) -> tuple[str | None, int | None]:
        try:
            row = db.execute("SELECT prefix, schema FROM meta WHERE id = 1").fetchone()
        except sqlite3.DatabaseError:
            return None, None
        return (None, None) if row is None else (str(row[0]), int(row[1]))

    def close(self) -> None:
        """Closes every connection this object opened."""
        with self._lock:
            readers, self._readers = self._readers, []
            writer, self._writer = self._writer, None
        for db in readers:
            db.close()
        if writer is not None:
            writer.close()
        if self._lock_file is not None:
            os.close(self._lock_file)  # releases the lock
            self._lock_file = None
        self._local = threading.local()

    def __enter__(self) -> SqliteSagaIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading (SagaIndex) ---------------------------------------------------------------

    def query(self, query: SagaQuery) -> Page:
        """Sagas matching ``query``, newest update first (see `saga.index.query.matches`).

        Raises:
            saga.index.query.CursorError: The cursor is not one this index handed out.
        """
        db = self._reader()
        limit = max(1, min(query.limit, MAX_LIMIT))
        after = None if query.cursor is None else decode_cursor(query.cursor)
        plan = _plan(db, query)
        if plan is None:
            return Page([], 0, None)
        where, params = plan
        if _only_counted(query):
            total = self._counted(db, query)
        else:
            total = db.execute(f"SELECT count(*) FROM sagas WHERE {where}", params).fetchone()[0]
        if after is not None:
            where += " AND (updated_at, saga_id) < (?, ?)"
            params = [*params, *after]
        # The page's rowids first, from the indexes alone; then only its rows' states: the
        # sort never carries the states of every match.
        rows = db.execute(
            f"SELECT {_ROW_COLUMNS} FROM sagas WHERE rowid IN (SELECT rowid FROM sagas WHERE "
            f"{where} ORDER BY updated_at DESC, saga_id DESC LIMIT ?) "
            "ORDER BY updated_at DESC, saga_id DESC",
            [*params, limit + 1],
        ).fetchall()
        found = [_row(r) for r in rows[:limit]]
        last = found[-1].state if found and len(rows) > limit else None
        cursor = None if last is None else encode_cursor(last.updated_at, last.saga_id)
        return Page(found, int(total), cursor)

    @staticmethod
    def _counted(db: sqlite3.Connection, query: SagaQuery) -> int:
        """The total of a query on name and status only, from the counts the triggers keep."""
        sql, params = "SELECT coalesce(sum(n), 0) FROM status_counts WHERE 1", []
        if query.name is not None:
            sql += " AND name = ?"
            params.append(query.name)
        if query.status:
            statuses = list(dict.fromkeys(query.status))
            sql += f" AND status IN ({','.join('?' * len(statuses))})"
            params += statuses
        return int(db.execute(sql, params).fetchone()[0])

    def get(self, saga_id: str) -> SagaRow | None:
        """The saga's latest indexed state, or ``None``."""
        row = (
            self._reader()
            .execute(f"SELECT {_ROW_COLUMNS} FROM sagas WHERE saga_id = ?", (saga_id,))
            .fetchone()
        )
        return None if row is None else _row(row)

    def history(self, saga_id: str) -> Sequence[HistoryEntry]:
        """The saga's events in ``seq`` order (empty if unknown)."""
        rows = self._reader().execute(
            "SELECT seq, type, at, partition, offset, event FROM events WHERE saga_id = ? "
            "ORDER BY seq",
            (saga_id,),
        )
        return [HistoryEntry(s, t, a, p, o, orjson.loads(e)) for s, t, a, p, o, e in rows]

    def counts(self, name: str | None = None) -> Mapping[str, int]:
        """Sagas by status (of one saga name, or of all)."""
        db = self._reader()
        if name is None:
            rows = db.execute("SELECT status, sum(n) FROM status_counts GROUP BY status")
        else:
            rows = db.execute("SELECT status, n FROM status_counts WHERE name = ?", (name,))
        return {str(s): int(n) for s, n in sorted(rows) if n}

    def lag(self) -> IndexLag:
        """Log records not yet indexed by partition, as of the projector's last look."""
        db = self._reader()
        ends = dict(db.execute("SELECT partition, end_offset FROM log_ends").fetchall())
        log = f"{self.prefix}.log"
        nexts = dict(
            db.execute("SELECT partition, next FROM positions WHERE topic = ?", (log,)).fetchall()
        )
        behind = {int(p): max(0, int(e) - int(nexts.get(p, 0))) for p, e in sorted(ends.items())}
        meta = db.execute("SELECT updated_at, looked_at FROM meta WHERE id = 1").fetchone()
        return IndexLag(behind, *(meta or (None, None)))

    @property
    def generation(self) -> int:
        """Grows with every batch that changed a row, an event or a bad record."""
        row = self._reader().execute("SELECT generation FROM meta WHERE id = 1").fetchone()
        return 0 if row is None else int(row[0])

    def journal_mode(self) -> str:
        """The database's journal mode (``wal`` for an index this adapter made)."""
        return str(self._reader().execute("PRAGMA journal_mode").fetchone()[0])

    def info(self) -> IndexInfo:
        """Size, freshness and problems, for ``saga index status``."""
        db = self._reader()
        generation, looked_at = db.execute(
            "SELECT generation, looked_at FROM meta WHERE id = 1"
        ).fetchone()
        (sagas,) = db.execute("SELECT count(*) FROM sagas").fetchone()
        (events,) = db.execute("SELECT count(*) FROM events").fetchone()
        (bad,) = db.execute("SELECT count(*) FROM bad").fetchone()
        recent = [
            BadRecord(*r)
            for r in db.execute(
                "SELECT topic, partition, offset, key, reason FROM bad "
                "ORDER BY offset DESC LIMIT 10"
            )
        ]
        return IndexInfo(
            self.path, self.prefix, generation, sagas, events, bad, recent, self.lag(), looked_at
        )

    # -- writing (IndexWriter) -------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        if self._writer is None:
            raise ConfigurationError(f"the saga index at {self.path} was opened read-only")
        with self._lock, self._writer:
            yield self._writer

    def positions(self) -> dict[tuple[str, int], int]:
        """Per (topic, partition), the next offset to read."""
        with self._writing() as db:
            rows = db.execute("SELECT topic, partition, next FROM positions").fetchall()
        return {(str(t), int(p)): int(n) for t, p, n in rows}

    def load(self, saga_ids: Collection[str]) -> dict[str, SagaState]:
        """The indexed states of those of ``saga_ids`` the index holds."""
        found: dict[str, SagaState] = {}
        ids = list(saga_ids)
        with self._writing() as db:
            for start in range(0, len(ids), 500):  # below SQLite's bound on parameters
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for (raw,) in db.execute(
                    f"SELECT state FROM sagas WHERE saga_id IN ({marks})", chunk
                ):
                    state = SagaState.model_validate_json(raw)
                    found[state.saga_id] = state
        return found

    def write(self, change: Change) -> int:
        """Applies ``change`` in one transaction; returns the generation after it."""
        with self._writing() as db:
            if change.rows:
                db.executemany(_UPSERT_SAGA, [_saga_params(r) for r in change.rows.values()])
                db.executemany(
                    _UPSERT_STEP,
                    [
                        (r.state.saga_id, name, step.status.value)
                        for r in change.rows.values()
                        for name, step in r.state.steps.items()
                    ],
                )
                db.executemany(
                    _INSERT_INPUT,
                    [
                        (r.state.saga_id, key, input_value(value))
                        for r in change.rows.values()
                        for key, value in r.state.input.items()
                    ],
                )
            if change.events:
                db.executemany(
                    _INSERT_EVENT,
                    [
                        (saga_id, e.seq, e.type, e.at, e.partition, e.offset, orjson.dumps(e.event))
                        for saga_id, e in change.events
                    ],
                )
            if change.bad:
                db.executemany(
                    _INSERT_BAD,
                    [(b.topic, b.partition, b.offset, b.key, b.reason) for b in change.bad],
                )
            db.executemany(_UPSERT_POSITION, [(t, p, n) for (t, p), n in change.positions.items()])
            db.executemany(_UPSERT_END, list(change.log_ends.items()))
            if not change.empty:
                db.execute(
                    "UPDATE meta SET generation = generation + 1, "
                    "updated_at = coalesce(?, updated_at) WHERE id = 1",
                    (change.at,),
                )
            if change.caught_up and change.at is not None:
                db.execute("UPDATE meta SET looked_at = ? WHERE id = 1", (change.at,))
            (generation,) = db.execute("SELECT generation FROM meta WHERE id = 1").fetchone()
        return int(generation)

    def reset(self) -> None:
        """Drops every row and position: the next projection starts from offset 0."""
        with self._writing() as db:
            for table in _TABLES:
                db.execute(f"DROP TABLE IF EXISTS {table}")
            db.executescript(_SCHEMA)
            db.execute(
                "INSERT INTO meta (id, schema, prefix) VALUES (1, ?, ?)",
                (SCHEMA_VERSION, self.prefix),
            )
        with self._lock:
            assert self._writer is not None
            self._writer.execute("VACUUM")  # gives the dropped pages back to the file system

    def analyze(self) -> None:
        """Refreshes the planner's statistics (after a rebuild: which index is selective)."""
        with self._writing() as db:
            db.execute("ANALYZE")


def _lock(path: Path) -> int:
    """Takes the index's writer lock (a lock file beside it), held until closed.

    Raises:
        ConfigurationError: Another process writes the index.
    """
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigurationError(
            f"the saga index at {path} is being written by another process (a projector: "
            "`saga serve` or `saga index serve`): stop it first, or give another file"
        ) from None
    return fd


def _saga_params(row: SagaRow) -> tuple[Any, ...]:
    s = row.state
    return (
        s.saga_id,
        s.name,
        s.version,
        s.status.value,
        s.seq,
        s.started_at,
        s.updated_at,
        row.partition,
        row.offset,
        s.model_dump_json().encode(),
    )


def _row(r: tuple[Any, ...]) -> SagaRow:
    raw, partition, offset = r
    return SagaRow(SagaState.model_validate_json(raw), int(partition), int(offset))


_SELECTIVE = 2000
"""A child-table filter matching at most this many sagas drives the query (its saga ids are
looked up); a broader one is checked saga by saga, while the sagas' own indexes drive."""


def _only_counted(query: SagaQuery) -> bool:
    """Whether ``query`` filters on name and status only (its total is in ``status_counts``)."""
    return (
        query.version is None
        and query.step is None
        and query.step_status is None
        and query.started_after is None
        and query.started_before is None
        and query.updated_after is None
        and query.updated_before is None
        and not query.input
        and not query.saga_id_prefix
    )


def _children(query: SagaQuery) -> list[tuple[str, str, list[Any]]]:
    """The filters on the child tables: (table, condition on its alias ``c``, parameters)."""
    found: list[tuple[str, str, list[Any]]] = []
    if query.step is not None and query.step_status is not None:
        found.append(("steps", "c.step = ? AND c.status = ?", [query.step, query.step_status]))
    elif query.step is not None:
        found.append(("steps", "c.step = ?", [query.step]))
    elif query.step_status is not None:
        found.append(("steps", "c.status = ?", [query.step_status]))
    for key, value in query.input.items():
        found.append(("inputs", "c.key = ? AND c.value = ?", [key, input_value(value)]))
    return found


def _plan(db: sqlite3.Connection, query: SagaQuery) -> tuple[str, list[Any]] | None:
    """The WHERE clause and its parameters (everything but the cursor), or ``None`` if a
    filter matches nothing at all.

    SQLite's planner cannot tell a rare input value from a common one, so this does, bounded:
    it counts each child-table filter's matches up to `_SELECTIVE`; the rarest, if under it,
    becomes a list of saga ids to look up (``IN``), and the others are checked per saga
    (``EXISTS`` on the child's primary key).
    """
    clauses: list[str] = ["1"]
    params: list[Any] = []
    if query.name is not None:
        clauses.append("name = ?")
        params.append(query.name)
    if query.status:
        statuses = list(dict.fromkeys(query.status))
        clauses.append(f"status IN ({','.join('?' * len(statuses))})")
        params += statuses
    if query.version is not None:
        clauses.append("version = ?")
        params.append(query.version)
    for column, op, value in (
        ("started_at", ">=", query.started_after),
        ("started_at", "<=", query.started_before),
        ("updated_at", ">=", query.updated_after),
        ("updated_at", "<=", query.updated_before),
    ):
        if value is not None:
            clauses.append(f"{column} {op} ?")
            params.append(value)
    if query.saga_id_prefix:
        # A range on the primary key, not LIKE: LIKE is case-insensitive and knows wildcards.
        clauses.append("saga_id >= ? AND saga_id < ?")
        params += [query.saga_id_prefix, query.saga_id_prefix + "\U0010ffff"]
    children = _children(query)
    estimates = [
        db.execute(
            f"SELECT count(*) FROM (SELECT 1 FROM {table} AS c WHERE {cond} LIMIT ?)",
            [*args, _SELECTIVE + 1],
        ).fetchone()[0]
        for table, cond, args in children
    ]
    if any(n == 0 for n in estimates):
        return None
    driver = min(range(len(children)), key=estimates.__getitem__, default=None)
    for i, (table, cond, args) in enumerate(children):
        if i == driver and estimates[i] <= _SELECTIVE:
            clauses.append(f"saga_id IN (SELECT c.saga_id FROM {table} AS c WHERE {cond})")
        else:
            clauses.append(
                f"EXISTS (SELECT 1 FROM {table} AS c WHERE c.saga_id = sagas.saga_id AND {cond})"
            )
        params += args
    return " AND ".join(clauses), params
