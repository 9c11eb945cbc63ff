"""The closed-loop load generator every peer's workload runs, and its command line.

A workload module supplies `connect(args) -> (call, close)`: `call(i)` runs the 3-step workflow
number i to completion (start it, wait for its result) and raises on failure. This module then
measures either latency with one in flight (`--mode latency`: `--warmup` unmeasured workflows,
then `--n` measured ones, one after another) or throughput at a level (`--mode level`: five
sequential unmeasured workflows, then `--in-flight` loops that each start a workflow, await it
and start the next until `--seconds` have passed). Each workflow is bounded by `--timeout`;
after the window no new workflow starts and those still running are awaited (bounded by the
same timeout), so nothing spills into the next phase. The figures go to `--out` as JSON.

Standard library plus `bench.peers.stats` only: it runs in the peers' venv.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.peers.stats import latency_summary, level_summary

__all__ = [
    "SETTLE_S",
    "Call",
    "CallError",
    "Connect",
    "add_arguments",
    "main",
    "measure_latency",
    "measure_level",
]

Call = Callable[[int], Awaitable[object]]
"""Runs workflow number i to completion; raises when it fails."""

Connect = Callable[[argparse.Namespace], Awaitable[tuple[Call, Callable[[], Awaitable[None]]]]]
"""Connects to the peer; returns the call and a coroutine function that disconnects."""

_WARMUP_LEVEL_CALLS = 5
# How long a level waits for the peer to answer its warm-up workflows. A peer that collapsed at
# the previous level is still working through the workflows whose clients gave up; the level
# starts once it answers again, or is reported as collapsed.
SETTLE_S = 60.0


class CallError(Exception):
    """A workflow that the peer answered with a failure; `kind` groups it in the report."""

    def __init__(self, kind: str, detail: str) -> None:
        """Keeps the short kind (e.g. "HTTP 503") apart from the detail."""
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def _kind(exc: Exception) -> str:
    return exc.kind if isinstance(exc, CallError) else type(exc).__name__


async def _settle(call: Call, count: int, timeout: float) -> str | None:
    """Runs `count` unmeasured workflows one after another, retrying failures for `SETTLE_S`.

    Returns:
        None once all completed; else why the peer is not answering.
    """
    give_up = time.perf_counter() + SETTLE_S
    done = 0
    failures: list[str] = []
    while done < count:
        try:
            await asyncio.wait_for(call(-1 - done - len(failures)), min(timeout, SETTLE_S))
        except Exception as exc:
            failures.append(_kind(exc))
            if time.perf_counter() > give_up:
                return (
                    f"the peer did not complete {count} warm-up workflows within "
                    f"{SETTLE_S:g} s (failures: {', '.join(failures[:5])}); it was still "
                    "busy with an earlier phase's workflows or is down"
                )
            continue
        done += 1
    return None


async def measure_latency(call: Call, n: int, warmup: int, timeout: float) -> dict[str, Any]:
    """Runs `warmup` then `n` workflows one after another and summarises the measured ones.

    Args:
        call: Runs one workflow.
        n: Measured workflows.
        warmup: Unmeasured workflows run first (connections, caches, JIT-like first calls).
        timeout: Seconds allowed per workflow.

    Returns:
        The `latency_1` entry ({"p50_ms", "p99_ms", "n"}), plus "errors" when any failed.
    """
    unsettled = await _settle(call, warmup, timeout)
    if unsettled is not None:
        return {"collapsed": unsettled, "n": 0}
    latencies: list[float] = []
    errors: list[str] = []
    for i in range(n):
        started = time.perf_counter()
        try:
            await asyncio.wait_for(call(i), timeout)
        except Exception as exc:
            errors.append(_kind(exc))
            continue
        latencies.append(time.perf_counter() - started)
    if not latencies:
        return {"collapsed": f"all {n} sequential workflows failed: {errors[:3]}", "n": 0}
    result = latency_summary(latencies)
    if errors:
        result["errors"] = len(errors)
    return result


async def measure_level(
    call: Call, in_flight: int, seconds: float, timeout: float
) -> dict[str, Any]:
    """Keeps `in_flight` workflows running for `seconds` and summarises what completed.

    Args:
        call: Runs one workflow.
        in_flight: Concurrent closed loops.
        seconds: The measured window.
        timeout: Seconds allowed per workflow.

    Returns:
        The level's throughput entry (see `bench.peers.stats.level_summary`).
    """
    counter = iter(range(10**12))
    latencies: list[float] = []
    errors: list[str] = []
    late = 0

    async def loop(deadline: float) -> None:
        nonlocal late
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                await asyncio.wait_for(call(next(counter)), timeout)
            except Exception as exc:
                errors.append(_kind(exc))
                continue
            finished = time.perf_counter()
            if finished <= deadline:
                latencies.append(finished - started)
            else:
                late += 1

    # A few unmeasured sequential workflows first, so that this process's first connection and
    # first calls do not count. Not a burst at the full level: workflows a saturated peer has
    # not finished when their client gives up keep running on the server and would load the
    # measured window.
    unsettled = await _settle(call, _WARMUP_LEVEL_CALLS, timeout)
    if unsettled is not None:
        return {"collapsed": unsettled, "completed": 0, "errors": 0}
    deadline = time.perf_counter() + seconds
    await asyncio.gather(*(loop(deadline) for _ in range(in_flight)))
    return level_summary(latencies, errors, seconds, late=late, timeout_s=timeout)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the load generator's options to a workload's `load` sub-command."""
    parser.add_argument("--mode", choices=("latency", "level"), required=True)
    parser.add_argument("--n", type=int, default=200, help="measured workflows (latency)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured workflows (latency)")
    parser.add_argument("--in-flight", type=int, default=50, help="concurrent loops (level)")
    parser.add_argument("--seconds", type=float, default=15.0, help="window (level)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per workflow")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the figures")


async def _run(args: argparse.Namespace, connect: Connect) -> dict[str, Any]:
    call, close = await connect(args)
    try:
        if args.mode == "latency":
            return await measure_latency(call, args.n, args.warmup, args.timeout)
        return await measure_level(call, args.in_flight, args.seconds, args.timeout)
    finally:
        await close()


def main(args: argparse.Namespace, connect: Connect) -> None:
    """Runs the phase that `args` asks for and writes its figures to `args.out`.

    Args:
        args: Parsed options (see `add_arguments`) plus the workload's own.
        connect: The workload's connection factory.
    """
    status = 1
    try:
        result = asyncio.run(_run(args, connect))
        args.out.write_text(json.dumps(result))
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip interpreter finalization: the SDKs' native threads (Temporal's Rust core) can
        # abort or hang while Python tears down, after the figures are already written.
        os._exit(status)
