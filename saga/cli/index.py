"""``saga index rebuild``, ``status`` and ``serve``: the indexed saga store (`saga.index`).

The index is one SQLite file (``--db``, default ``$SAGA_INDEX`` or `DEFAULT_INDEX`). ``saga
serve`` keeps it up to date while it serves the API; ``saga index serve`` does only that.
``saga list`` and ``saga status`` answer from it when it is fresh (`open_fresh`), and scan the
snapshots topic otherwise, saying which answered.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from saga.cli.common import CliError, kafka_transport, out, sealed
from saga.errors import ConfigurationError

# The index's modules are imported where they are used: the other commands of the CLI
# (`saga coordinator` first) do not load them.
if TYPE_CHECKING:
    from saga.index.sqlite import IndexInfo, SqliteSagaIndex

__all__ = [
    "DEFAULT_INDEX",
    "DEFAULT_MAX_AGE",
    "Fresh",
    "add_commands",
    "index_path",
    "open_fresh",
]

DEFAULT_INDEX = "saga-index.sqlite3"
"""The index file when neither ``--db``/``--index`` nor ``$SAGA_INDEX`` names one (in the
current directory)."""

DEFAULT_MAX_AGE = 10.0
"""Seconds since the projector's last look after which ``saga list`` and ``status`` no longer
trust the index (``$SAGA_INDEX_MAX_AGE``): no projector is running on it."""


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds ``saga index`` and its subcommands to the ``saga`` parser's subcommands."""
    p = sub.add_parser("index", help="the indexed saga store: rebuild, status, serve")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="COMMAND")
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument(
        "--db",
        type=Path,
        metavar="PATH",
        help=f"the index file (default: $SAGA_INDEX or ./{DEFAULT_INDEX})",
    )

    q = isub.add_parser(
        "rebuild",
        parents=[common, db],
        help="drop the index and rebuild it from Kafka; prints counts and the rate",
    )
    q.set_defaults(handler=_rebuild)

    q = isub.add_parser(
        "status", parents=[common, db], help="how far behind the log the index is, and problems"
    )
    q.set_defaults(handler=_status)

    q = isub.add_parser(
        "serve", parents=[common, db], help="keep the index up to date (until interrupted)"
    )
    q.add_argument(
        "--interval", type=float, default=0.25, help="seconds between passes (default: 0.25)"
    )
    q.set_defaults(handler=_serve)


def index_path(given: str | os.PathLike[str] | None) -> Path:
    """The index file: the one given, else ``$SAGA_INDEX``, else `DEFAULT_INDEX`."""
    return Path(given or os.environ.get("SAGA_INDEX") or DEFAULT_INDEX)


def _writer(args: argparse.Namespace) -> SqliteSagaIndex:
    from saga.index.sqlite import SqliteSagaIndex

    try:
        return SqliteSagaIndex(index_path(args.db), prefix=args.prefix)
    except ConfigurationError as exc:
        raise CliError(str(exc)) from None


async def _rebuild(args: argparse.Namespace) -> int:
    from saga.index.projector import rebuild_index

    transport = sealed(args, kafka_transport(args))
    with _writer(args) as index:
        stats = await rebuild_index(transport, index)
        await anyio.to_thread.run_sync(index.analyze)
        info = index.info()
        counts = dict(index.counts())
    data = {
        "db": str(info.path),
        "prefix": info.prefix,
        "sagas": info.sagas,
        "events": info.events,
        "records_read": stats.records,
        "bad_records": info.bad,
        "seconds": round(stats.seconds, 3),
        "sagas_per_second": round(stats.sagas_per_second, 1),
        "records_per_second": round(stats.records_per_second, 1),
        "by_status": counts,
    }
    text = (
        f"rebuilt {info.path} (prefix {info.prefix!r}) from Kafka\n"
        f"sagas     {info.sagas}  ({_statuses(counts)})\n"
        f"events    {info.events}\n"
        f"records   {stats.records} read, {info.bad} could not be used\n"
        f"time      {stats.seconds:.2f} s  ({stats.sagas_per_second:,.0f} sagas/s, "
        f"{stats.records_per_second:,.0f} records/s)"
    )
    out(args, data, text + _bad_lines(info))
    return 0


def _statuses(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in counts.items()) or "none"


def _bad_lines(info: IndexInfo) -> str:
    if not info.bad:
        return ""
    lines = [f"\nrecords that could not be used ({info.bad}; the latest):"]
    lines += [
        f"  {b.topic}/{b.partition}@{b.offset} key {b.key}: {b.reason}" for b in info.recent_bad
    ]
    return "\n".join(lines)


async def _status(args: argparse.Namespace) -> int:
    from saga.index.sqlite import SqliteSagaIndex

    path = index_path(args.db)
    try:
        with SqliteSagaIndex(path, readonly=True) as index:
            info = index.info()
            counts = dict(index.counts())
    except ConfigurationError as exc:
        raise CliError(str(exc)) from None
    age = None if info.looked_at is None else max(0.0, time.time() - info.looked_at)
    data = {
        "db": str(info.path),
        "prefix": info.prefix,
        "generation": info.generation,
        "sagas": info.sagas,
        "events": info.events,
        "by_status": counts,
        "behind": {str(p): n for p, n in info.lag.behind.items()},
        "behind_total": info.lag.total,
        "updated_at": info.lag.updated_at,
        "looked_at": info.looked_at,
        "seconds_since_look": None if age is None else round(age, 3),
        "bad_records": info.bad,
        "recent_bad": [b.__dict__ for b in info.recent_bad],
    }
    per_partition = " ".join(f"{p}:{n}" for p, n in info.lag.behind.items()) or "-"
    text = (
        f"index     {info.path} (prefix {info.prefix!r}, generation {info.generation})\n"
        f"sagas     {info.sagas}  ({_statuses(counts)})\n"
        f"events    {info.events}\n"
        f"lag       {info.lag.total} log records behind  (by partition {per_partition})\n"
        f"looked    {_age(age)}\n"
        f"problems  {info.bad} records could not be used"
    )
    out(args, data, text + _bad_lines(info))
    return 0


def _age(age: float | None) -> str:
    if age is None:
        return "never: the projector has not finished a pass"
    return f"{age:.1f} s ago" + (" (no projector running?)" if age > max_age() else "")


async def _serve(args: argparse.Namespace) -> int:
    from saga.index.projector import Projector

    transport = sealed(args, kafka_transport(args))
    with _writer(args) as index:
        projector = Projector(transport, index, interval=args.interval)
        stats = await projector.catch_up()
        print(
            f"saga: index {index.path} caught up ({stats.sagas} sagas in {stats.seconds:.1f} s); "
            "following the log (Ctrl-C stops)",
            file=sys.stderr,
        )
        await projector.run()
    return 0


def max_age() -> float:
    """`DEFAULT_MAX_AGE`, or ``$SAGA_INDEX_MAX_AGE``."""
    raw = os.environ.get("SAGA_INDEX_MAX_AGE")
    try:
        return float(raw) if raw else DEFAULT_MAX_AGE
    except ValueError:
        raise CliError(f"$SAGA_INDEX_MAX_AGE={raw!r} is not a number of seconds") from None


@dataclass(frozen=True)
class Fresh:
    """What `open_fresh` found: the index to answer from (``None``: scan), and a note saying
    which source answers and why (``None``: no index was asked for, so nothing to say)."""

    index: SqliteSagaIndex | None
    note: str | None


def open_fresh(given: str | None, prefix: str, *, disabled: bool = False) -> Fresh:
    """The index to answer ``saga list`` and ``status`` from, if it is fresh: under
    ``prefix``, and looked at by a running projector at most `max_age` seconds ago.

    ``given`` (``--index``), else ``$SAGA_INDEX``, names the file; without either, the default
    file is used if it exists, and nothing is said when it does not.
    """
    if disabled:
        return Fresh(None, None)
    explicit = given or os.environ.get("SAGA_INDEX")
    path = index_path(explicit)
    if not explicit and not path.is_file():
        return Fresh(None, None)
    why = _unfit(path, prefix)
    if isinstance(why, str):
        return Fresh(None, f"index {path} not used ({why}); scanned the snapshots topic")
    index, age, behind = why
    note = f"answered from the index {path} (looked {age:.1f} s ago, {behind} records behind)"
    return Fresh(index, note)


def _unfit(path: Path, prefix: str) -> str | tuple[SqliteSagaIndex, float, int]:
    from saga.index.sqlite import SqliteSagaIndex

    try:
        index = SqliteSagaIndex(path, readonly=True)
    except ConfigurationError as exc:
        return str(exc)
    info = index.info()
    if info.prefix != prefix:
        index.close()
        return f"it projects prefix {info.prefix!r}, not {prefix!r}"
    if info.looked_at is None:
        index.close()
        return "its projector has not caught up yet"
    age = max(0.0, time.time() - info.looked_at)
    if age > max_age():
        index.close()
        return f"last looked at the log {age:.0f} s ago: is a projector (`saga serve`) running?"
    return index, age, info.lag.total
