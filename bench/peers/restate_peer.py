"""Restate: the server binary from npm, a Python SDK deployment and a load-generator process.

The server runs single-node with its default configuration (data in the scratch directory,
TCP listeners on loopback only); the deployment (`bench.peers.workloads.restate_app serve`)
is registered through the admin API, and the load generator calls the handler through the
ingress. The guarantees text is built from the server's own `--dump-config` under the same
environment, so it states what this run actually used.
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path
from typing import Any

import httpx

from bench.peers.common import PeerRun, Plan
from bench.peers.install import Installed
from deploy._proc import LOOPBACK, StartError, free_port, port_accepts

__all__ = ["NAME", "run"]

NAME = "restate"
_MODULE = "bench.peers.workloads.restate_app"
_SERVICE = "BenchSaga"


def _server_env(peer: PeerRun, ingress: int, admin: int, node: int) -> dict[str, str]:
    env = peer.env()
    env.update(
        {
            "RESTATE_INGRESS__BIND_ADDRESS": f"{LOOPBACK}:{ingress}",
            "RESTATE_ADMIN__BIND_ADDRESS": f"{LOOPBACK}:{admin}",
            "RESTATE_BIND_ADDRESS": f"{LOOPBACK}:{node}",
            "RESTATE_ADVERTISED_ADDRESS": f"http://{LOOPBACK}:{node}/",
            "RESTATE_DISABLE_TELEMETRY": "true",
            "RESTATE_LOG_FILTER": "warn",
            "RESTATE_LOG_DISABLE_ANSI_CODES": "true",
        }
    )
    return env


def _guarantees(config: dict[str, Any]) -> str:
    bifrost = config.get("bifrost", {})
    provider = bifrost.get("default-provider", "?")
    replication = config.get("default-replication", "?")
    log_server = config.get("log-server", {})
    local = bifrost.get("local", {})
    store = log_server if provider == "replicated" else local
    fsync = "off" if store.get("rocksdb-disable-wal-fsync", False) else "on"
    wal = "off" if store.get("rocksdb-disable-wal", False) else "on"
    partitions = config.get("default-num-partitions", "?")
    return (
        "restate-server single node, default configuration (read from its --dump-config): "
        f"every journal entry (the invocation, each ctx.run result) is appended to the log "
        f"(Bifrost, provider {provider}, replication {replication}: the one local log-server) "
        f"stored in RocksDB with WAL {wal} and WAL fsync {fsync} (writes batched: group "
        "commit) before it is acknowledged; partition state in RocksDB, rebuilt from the log. "
        f"{partitions} partitions. No replication beyond this node's disk. The service is "
        "served by the Python SDK under Hypercorn (HTTP/2 cleartext) in a separate process; "
        "the load generator calls the ingress over HTTP/1.1."
    )


def _dump_config(binary: Path, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [str(binary), "--dump-config"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return tomllib.loads(proc.stdout)


def _register(admin_url: str, deployment_url: str) -> None:
    with httpx.Client(timeout=30.0) as client:
        response = client.post(f"{admin_url}/deployments", json={"uri": deployment_url})
        if response.status_code not in (200, 201):
            raise StartError(
                f"registering {deployment_url} failed: HTTP {response.status_code} "
                f"{response.text[:500]}"
            )
        service = client.get(f"{admin_url}/services/{_SERVICE}")
        if service.status_code != 200:
            raise StartError(f"{_SERVICE} not known after registration: {service.text[:500]}")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def run(installed: Installed, plan: Plan) -> dict[str, Any]:
    """Starts the server and the deployment, registers it, measures, stops both.

    Args:
        installed: Where the peers are.
        plan: The run's sizes.

    Returns:
        The report's entry for Restate.
    """
    if installed.restate_server is None:
        raise StartError("the Restate server is not installed")
    binary = installed.restate_server
    with PeerRun(NAME, installed) as peer:
        ingress, admin, node, deployment = (free_port() for _ in range(4))
        env = _server_env(peer, ingress, admin, node)
        config = _dump_config(binary, env, peer.workdir)
        server = peer.spawn(
            "server",
            [
                str(binary),
                "--no-logo",
                "--listen-mode",
                "tcp",
                "--base-dir",
                str(peer.workdir / "restate-data"),
                "--node-name",
                "bench",
            ],
            env=env,
            cwd=peer.workdir,
        )
        admin_url = f"http://{LOOPBACK}:{admin}"
        peer.wait_until(
            "the Restate admin API answered", lambda: _healthy(f"{admin_url}/health"), 60, server
        )
        peer.wait_until("the Restate ingress accepted", lambda: port_accepts(ingress), 60, server)
        service = peer.python("deployment", _MODULE, "serve", "--port", str(deployment))
        peer.wait_until(
            "the Restate deployment accepted", lambda: port_accepts(deployment), 60, server, service
        )
        _register(admin_url, f"http://{LOOPBACK}:{deployment}")
        figures = peer.measure(
            _MODULE, ["--ingress", f"http://{LOOPBACK}:{ingress}"], plan, [server, service]
        )
        v = installed.versions
        return {
            "version": (
                f"{v['restate-server']}; Python SDK restate-sdk {v['restate-sdk']} "
                f"under hypercorn {v['hypercorn']}"
            ),
            "guarantees": _guarantees(config),
            **figures,
        }
