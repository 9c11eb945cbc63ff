"""DBOS's side of the workload: a workflow of 3 sequential no-op steps on SQLite.

Runs in the peers' venv (`dbos`), started by `bench.peers.dbos_peer`:

    python -m bench.peers.workloads.dbos_app load --db FILE --mode ... --out FILE

DBOS is a library, not a server: a workflow runs in the process that calls it, checkpointing
its start, each step's output and its end into the system database. So here the load
generator and the worker are one process: each call runs the workflow in the caller's event
loop and returns when it has completed. `--db` is a fresh SQLite file per phase, so that a
phase never recovers (re-runs) workflows an earlier phase left pending.
"""

from __future__ import annotations

import argparse
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

from dbos import DBOS, DBOSConfig

from bench.peers import loadgen


@DBOS.step()
async def step_a(value: str) -> str:
    """The first no-op step."""
    return value


@DBOS.step()
async def step_b(value: str) -> str:
    """The second no-op step."""
    return value


@DBOS.step()
async def step_c(value: str) -> str:
    """The third no-op step."""
    return value


@DBOS.workflow()
async def bench_saga(value: str) -> str:
    """Three steps, one after another, as the engine's 3-step saga."""
    value = await step_a(value)
    value = await step_b(value)
    return await step_c(value)


async def _connect_load(
    args: argparse.Namespace,
) -> tuple[loadgen.Call, Callable[[], Awaitable[None]]]:
    config: DBOSConfig = {
        "name": "bench",
        "system_database_url": f"sqlite:///{args.db}",
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()

    async def call(i: int) -> object:
        return await bench_saga(f"w{i}")

    async def close() -> None:
        settings = _sqlite_settings(args.db)
        DBOS.destroy()
        if args.settings_out is not None:
            args.settings_out.write_text(settings)

    return call, close


def _sqlite_settings(db: Path) -> str:
    # journal_mode is a property of the file (WAL persists); synchronous is per connection, so
    # a fresh connection shows SQLite's compiled default, which DBOS leaves unchanged.
    with sqlite3.connect(db) as conn:
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
        synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
    names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
    return f"journal_mode={journal}, synchronous={names.get(synchronous, synchronous)}"


def main() -> None:
    """Parses the command line and runs one load phase."""
    parser = argparse.ArgumentParser(prog="dbos_app")
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load")
    load.add_argument("--db", type=Path, required=True)
    load.add_argument("--settings-out", type=Path, default=None)
    loadgen.add_arguments(load)
    args = parser.parse_args()
    loadgen.main(args, _connect_load)


if __name__ == "__main__":
    main()
