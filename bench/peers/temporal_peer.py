"""Temporal: the CLI's dev server, a worker process and a load-generator process.

The server is `temporal server start-dev` (frontend, history, matching and worker services in
one process) with file persistence in the scratch directory, so that an acknowledged step is
on disk as with the other systems; the workload is `bench.peers.workloads.temporal_app`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from bench.peers.common import PeerRun, Plan
from bench.peers.install import Installed
from deploy._proc import LOOPBACK, free_port, port_accepts

__all__ = ["NAME", "run"]

NAME = "temporal"
_MODULE = "bench.peers.workloads.temporal_app"


def _journal_mode(db: Path) -> str:
    try:
        with sqlite3.connect(db) as conn:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    except sqlite3.Error as exc:
        return f"unreadable ({exc})"


def _guarantees(journal_mode: str) -> str:
    return (
        "Temporal CLI dev server (all services in one process, 1 history shard, one node, no "
        "replication) with file persistence (--db-filename): SQLite through a single "
        "connection, and the CLI passes no pragma, so SQLite's defaults apply: "
        f"journal_mode={journal_mode} (read from the file after the run), synchronous=FULL, "
        "i.e. every persistence transaction (workflow start, each activity's scheduling and "
        "completion events) is fsynced before the server acknowledges it. The worker and the "
        "load generator are separate processes talking gRPC to the server."
    )


def _version(installed: Installed) -> str:
    v = installed.versions
    return f"{v['temporal-cli']}; Python SDK temporalio {v['temporalio']}"


def run(installed: Installed, plan: Plan) -> dict[str, Any]:
    """Starts the dev server and a worker, measures, stops both.

    Args:
        installed: Where the peers are.
        plan: The run's sizes.

    Returns:
        The report's entry for Temporal.
    """
    with PeerRun(NAME, installed) as peer:
        port = free_port()
        db = peer.workdir / "temporal.db"
        server = peer.spawn(
            "server",
            [
                str(installed.temporal),
                "server",
                "start-dev",
                "--ip",
                LOOPBACK,
                "--port",
                str(port),
                "--http-port",
                str(free_port()),
                "--metrics-port",
                str(free_port()),
                "--headless",
                "--db-filename",
                str(db),
                "--log-level",
                "error",
            ],
        )
        peer.wait_until("the Temporal frontend accepted", lambda: port_accepts(port), 60, server)
        address = f"{LOOPBACK}:{port}"
        ready = peer.workdir / "worker.ready"
        worker = peer.python(
            "worker", _MODULE, "worker", "--address", address, "--ready", str(ready)
        )
        peer.wait_until("the Temporal worker started", ready.exists, 90, server, worker)
        figures = peer.measure(_MODULE, ["--address", address], plan, [server, worker])
        worker.stop(grace=5.0)
        server.stop(grace=10.0)
        return {
            "version": _version(installed),
            "guarantees": _guarantees(_journal_mode(db)),
            **figures,
        }
