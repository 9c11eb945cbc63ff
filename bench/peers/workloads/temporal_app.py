"""Temporal's side of the workload: a workflow of 3 sequential no-op activities.

Runs in the peers' venv (`temporalio`), in two kinds of process started by
`bench.peers.temporal_peer`:

    python -m bench.peers.workloads.temporal_app worker --address HOST:PORT --ready FILE
    python -m bench.peers.workloads.temporal_app load --address HOST:PORT --mode ... --out FILE

The worker hosts the workflow and the activities with the SDK's default slot counts (100
workflow tasks, 100 activities, 1000 cached workflows); the load generator, a separate process,
starts each workflow and waits for its result (`Client.execute_workflow`).
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker

# The workflow sandbox re-imports this module; the load generator is not workflow code.
with workflow.unsafe.imports_passed_through():
    from bench.peers import loadgen

TASK_QUEUE = "bench"
_STEP_TIMEOUT = timedelta(seconds=30)
_CONNECT_SECONDS = 60.0


@activity.defn
async def step_a(value: str) -> str:
    """The first no-op step."""
    return value


@activity.defn
async def step_b(value: str) -> str:
    """The second no-op step."""
    return value


@activity.defn
async def step_c(value: str) -> str:
    """The third no-op step."""
    return value


@workflow.defn
class BenchSaga:
    """Three activities, one after another, as the engine's 3-step saga."""

    @workflow.run
    async def run(self, value: str) -> str:
        """Runs the three steps and returns the last one's result."""
        value = await workflow.execute_activity(step_a, value, start_to_close_timeout=_STEP_TIMEOUT)
        value = await workflow.execute_activity(step_b, value, start_to_close_timeout=_STEP_TIMEOUT)
        return await workflow.execute_activity(step_c, value, start_to_close_timeout=_STEP_TIMEOUT)


async def _connect_client(address: str) -> Client:
    # The dev server accepts TCP before its frontend serves; retry until it answers.
    deadline = asyncio.get_running_loop().time() + _CONNECT_SECONDS
    while True:
        try:
            return await Client.connect(address)
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _serve(address: str, ready: Path) -> None:
    client = await _connect_client(address)
    worker = Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=[BenchSaga],
        activities=[step_a, step_b, step_c],
    )
    async with worker:
        # The runner polls for this file; a tiny synchronous write is fine here.
        ready.write_text("ready\n")  # noqa: ASYNC240
        await asyncio.Event().wait()


async def _connect_load(
    args: argparse.Namespace,
) -> tuple[loadgen.Call, Callable[[], Awaitable[None]]]:
    client = await _connect_client(args.address)
    run_id = uuid.uuid4().hex[:8]

    async def call(i: int) -> object:
        return await client.execute_workflow(
            BenchSaga.run, f"w{i}", id=f"bench-{run_id}-{i}", task_queue=TASK_QUEUE
        )

    async def close() -> None:
        return None

    return call, close


def main() -> None:
    """Parses the command line and runs the worker or one load phase."""
    parser = argparse.ArgumentParser(prog="temporal_app")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker")
    worker.add_argument("--address", required=True)
    worker.add_argument("--ready", type=Path, required=True)
    load = sub.add_parser("load")
    load.add_argument("--address", required=True)
    loadgen.add_arguments(load)
    args = parser.parse_args()
    if args.command == "worker":
        asyncio.run(_serve(args.address, args.ready))
    else:
        loadgen.main(args, _connect_load)


if __name__ == "__main__":
    main()
