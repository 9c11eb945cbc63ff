"""B1, B2, B3 (and the peers' workload): closed-loop sweeps over in-flight levels, the engine and
the raw reference each on processes of their own, one after the other on the same broker.

Method: the load generator keeps exactly N sagas in flight (a new start as soon as one ends)
for a settling second and then a measured window; throughput is completions in the window per
second, latency the start → completed times of the sagas that ended in it. Levels run in
increasing order on the same warmed-up processes, each drained before the next.

B1, the maximum sustainable throughput, is the best throughput among the levels whose p99 is at
most 250 ms (a closed loop bounds the backlog at N by construction; by Little's law a level
beyond what the system carries only adds queueing, which shows in the p99). The raw ceiling is
chosen by the same rule from the raw sweep. B2 is the level of 1, B3 the level of 50.
"""

from __future__ import annotations

from typing import Any

import anyio

from bench.perf.common import Context, engine, engine_generator, new_prefix, raw, raw_generator

__all__ = ["P99_LIMIT_MS", "best_sustainable", "sweep"]

P99_LIMIT_MS = 250.0


async def _levels(gen: Any, levels: list[int], seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for level in levels:
        out[str(level)] = await gen.closed_loop(level, seconds)
    return out


def sweep(
    ctx: Context, system: str, levels: list[int], seconds: float, **engine_options: Any
) -> dict[str, Any]:
    """Runs ``levels`` on fresh processes of ``system``: ``engine``, ``raw`` or ``raw-plain``
    (the raw reference with plain replies)."""
    prefix = new_prefix(system)
    if system == "engine":
        with engine(ctx, prefix, **engine_options) as procs:

            async def run_engine() -> dict[str, Any]:
                async with engine_generator(ctx, procs) as gen:
                    return await _levels(gen, levels, seconds)

            return anyio.run(run_engine)
    with raw(ctx, prefix, plain_replies=system == "raw-plain") as rprocs:

        async def run_raw() -> dict[str, Any]:
            async with raw_generator(ctx, rprocs) as gen:
                return await _levels(gen, levels, seconds)

        return anyio.run(run_raw)


def best_sustainable(levels: dict[str, Any]) -> dict[str, Any] | None:
    """The level with the best throughput among those with p99 ≤ 250 ms and no errors."""
    ok = [
        r
        for r in levels.values()
        if r["p99_ms"] is not None and r["p99_ms"] <= P99_LIMIT_MS and r["errors"] == 0
    ]
    return max(ok, key=lambda r: r["sagas_per_s"], default=None)


def best_any(levels: dict[str, Any]) -> dict[str, Any] | None:
    """The level with the best throughput, whatever its latency (saturation)."""
    runs = [r for r in levels.values() if r["sagas_per_s"] is not None]
    return max(runs, key=lambda r: r["sagas_per_s"], default=None)
