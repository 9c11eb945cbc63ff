"""DBOS: the library on a SQLite system database, workflows run inside the load generator.

DBOS has no server: a workflow executes in the process that starts it (there are queues that
other processes dequeue from, but they poll the database and add their polling delay, which
is not the 3-step path measured here). So each phase is one process
(`bench.peers.workloads.dbos_app load`) that both starts and executes the workflows, on a
fresh SQLite file of its own.
"""

from __future__ import annotations

from typing import Any

from bench.peers.common import PeerRun, Plan
from bench.peers.install import Installed

__all__ = ["NAME", "run"]

NAME = "dbos"
_MODULE = "bench.peers.workloads.dbos_app"


def _guarantees(settings: str) -> str:
    return (
        "DBOS library (no server) with its system database on a local SQLite file; DBOS sets "
        f"only busy_timeout and foreign_keys, so SQLite's defaults hold ({settings}, read "
        "from the database after a phase): the workflow's start, each step's output and its "
        "end are each committed, and fsynced, before the workflow goes on. One process, one "
        "node, no replication; workflows run in the load generator's own process and event "
        "loop, so there is no network hop at all."
    )


def run(installed: Installed, plan: Plan) -> dict[str, Any]:
    """Measures DBOS, one process per phase.

    Args:
        installed: Where the peers are.
        plan: The run's sizes.

    Returns:
        The report's entry for DBOS.
    """
    with PeerRun(NAME, installed) as peer:
        settings_file = peer.workdir / "sqlite-settings.txt"

        def per_phase(role: str) -> list[str]:
            extra = ["--db", str(peer.workdir / f"{role}.sqlite")]
            if role == "latency":
                extra += ["--settings-out", str(settings_file)]
            return extra

        figures = peer.measure(_MODULE, [], plan, [], per_phase)
        settings = settings_file.read_text() if settings_file.exists() else "settings not read"
        v = installed.versions
        return {
            "version": f"dbos {v['dbos']} (Python), SQLite {v['sqlite']}",
            "guarantees": _guarantees(settings),
            **figures,
        }
