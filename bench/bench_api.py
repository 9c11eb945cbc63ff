"""API start-to-completed latency against the CLI's, in one run, on a real broker.

Run: ``python -m bench.bench_api [--bootstrap HOST:PORT] [--sagas 30] [--cli-runs 5]``.
Without ``--bootstrap`` it starts a throwaway broker with `deploy`. A 3-step sequential saga
with no-op handlers; the coordinator, the participants, the index projector and the server
(`saga.server`, on uvicorn on a free port) run in this process. Three ways to start a saga and
learn that it completed are timed, one saga at a time:

- ``api``: ``POST /api/v1/sagas``, then ``GET /api/v1/sagas/{id}`` every 20 ms until it says
  completed (answered from the index, which the projector updates every ``--interval`` s);
- ``client``: `SagaClient.start` then `SagaClient.wait` polling the snapshots every 20 ms (what
  ``saga start --wait`` does, without starting a process);
- ``cli``: ``python -m saga start hot --wait 60`` as a child process, wall time (the
  interpreter's start-up included, and its default 0.5 s polling).

Prints one JSON object: p50, p99 and mean milliseconds of each, and the settings.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx

from saga import Coordinator, Participant, SagaDefinition, Step, StepContext
from saga.adapters.kafka import KafkaTransport
from saga.index.projector import run_projector
from saga.index.sqlite import SqliteSagaIndex
from saga.runtime.client import SagaClient
from saga.server import Authenticator, SagaService, create_app, open_server

DEFINITION = SagaDefinition(
    name="hot",
    steps=[
        Step(name="a", service="s1", action="do", compensation="undo"),
        Step(name="b", service="s2", action="do", compensation="undo", depends_on=["a"]),
        Step(name="c", service="s3", action="do", kind="pivot", depends_on=["b"]),
    ],
)


def participants() -> list[Participant]:
    """The three no-op services."""
    found = []
    for name in ("s1", "s2", "s3"):
        p = Participant(name)

        async def ok(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
            return {}

        p.handler("do")(ok)
        p.handler("undo")(ok)
        found.append(p)
    return found


def summary(millis: list[float]) -> dict[str, float]:
    """p50, p99 and mean of a sample, in milliseconds."""
    ordered = sorted(millis)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered), 1),
        "p99_ms": round(p99, 1),
        "mean_ms": round(statistics.fmean(ordered), 1),
    }


async def time_api(http: httpx.AsyncClient, n: int) -> list[float]:
    """Milliseconds from POST to a GET that says completed, per saga."""
    found = []
    for _ in range(n):
        saga_id = uuid.uuid4().hex
        began = time.perf_counter()
        r = await http.post("/api/v1/sagas", json={"name": "hot", "saga_id": saga_id})
        assert r.status_code == 202, r.text
        while True:
            r = await http.get(f"/api/v1/sagas/{saga_id}")
            if r.status_code == 200 and r.json()["state"]["status"] == "completed":
                break
            await anyio.sleep(0.02)
        found.append((time.perf_counter() - began) * 1000)
    return found


async def time_client(client: SagaClient, n: int) -> list[float]:
    """Milliseconds from `SagaClient.start` to `SagaClient.wait` returning, per saga."""
    found = []
    for _ in range(n):
        began = time.perf_counter()
        saga_id = await client.start("hot", {})
        state = await client.wait(saga_id, 60, poll=0.02)
        assert state.status.value == "completed"
        found.append((time.perf_counter() - began) * 1000)
    return found


def time_cli(bootstrap: str, prefix: str, n: int) -> list[float]:
    """Wall milliseconds of ``saga start --wait`` processes."""
    env = {**os.environ, "SAGA_LOG_LEVEL": "error"}
    found = []
    for _ in range(n):
        began = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "saga",
                "start",
                "hot",
                "--wait",
                "60",
                "--prefix",
                prefix,
                "--bootstrap-servers",
                bootstrap,
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        found.append((time.perf_counter() - began) * 1000)
    return found


async def run(bootstrap: str, sagas: int, cli_runs: int, interval: float, workdir: Path) -> Any:
    """Runs the engine and the server, then times the three ways."""
    prefix = f"bench-api-{uuid.uuid4().hex[:8]}"
    transport = KafkaTransport(bootstrap)
    index = SqliteSagaIndex(workdir / "index.sqlite3", prefix=prefix)
    service = SagaService(transport, index, prefix=prefix, definitions=[DEFINITION])
    app = create_app(service, Authenticator(open_as="bench"))
    results: dict[str, Any] = {}
    async with (
        Coordinator([DEFINITION], transport=transport, prefix=prefix),
        anyio.create_task_group() as tg,
    ):
        for p in participants():
            await tg.start(functools.partial(p.run, transport, prefix=prefix))
        await tg.start(
            functools.partial(run_projector, transport, prefix, index, interval=interval)
        )
        async with (
            open_server(app) as server,
            httpx.AsyncClient(base_url=server.url) as http,
            SagaClient(transport, prefix=prefix) as client,
        ):
            await time_client(client, 3)  # warm-up: topics, producers, metadata
            await time_api(http, 3)
            results["api"] = summary(await time_api(http, sagas))
            results["client"] = summary(await time_client(client, sagas))
            cli = await anyio.to_thread.run_sync(time_cli, bootstrap, prefix, cli_runs)
            results["cli"] = summary(cli)
        tg.cancel_scope.cancel()
    index.close()
    results["api_over_client"] = round(results["api"]["p50_ms"] / results["client"]["p50_ms"], 2)
    results["api_over_cli"] = round(results["api"]["p50_ms"] / results["cli"]["p50_ms"], 2)
    results["settings"] = {"sagas": sagas, "cli_runs": cli_runs, "index_interval_s": interval}
    return results


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap")
    parser.add_argument("--sagas", type=int, default=30)
    parser.add_argument("--cli-runs", type=int, default=5)
    parser.add_argument("--interval", type=float, default=0.05, help="projector pass interval")
    args = parser.parse_args()
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        bootstrap = args.bootstrap
        if bootstrap is None:
            from deploy.kafka import start_kafka

            bootstrap = stack.enter_context(start_kafka()).bootstrap_servers
        out = anyio.run(run, bootstrap, args.sagas, args.cli_runs, args.interval, Path(tmp))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
