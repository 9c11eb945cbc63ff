"""B6: the coordinator's resident memory per in-flight saga, parked on a ``wait`` step.

Method. The engine's processes run; the load generator first runs 500 sagas of the 3-step
saga (so the clients' buffers, caches and pools have grown to a working size: they are not
what is measured), waits until the coordinator is idle, and reads its RSS (VmRSS). Then it
starts N sagas of `bench.perf.app.PARKED`, whose one step waits for a signal that never comes,
at most 1,000 unacknowledged at a time, and counts each as parked when the log shows its
``step_started`` of the wait step. RSS is read again once half are parked and once all are
(each after a short idle pause). The figure is (RSS after - RSS before) / N; the marginal
figure, over the second half only, leaves out one-time growth (dict resizes of the first
thousands, the allocator's first arenas). RSS is the kernel's view: memory the allocator holds
but has freed counts too, which is what a deployment pays.
"""

from __future__ import annotations

from typing import Any

import anyio
import orjson

from bench.perf.app import PARK_SIGNAL, PARKED
from bench.perf.common import Context, engine, engine_generator, new_prefix
from bench.perf.load import EngineLoad, Generator, wait_until
from bench.perf.procs import rss_kib
from saga.runtime.signing import SigningKey

__all__ = ["ParkedLoad", "run"]

PARK_STEP = next(s.name for s in PARKED.steps if s.wait == PARK_SIGNAL)


class ParkedLoad(EngineLoad):
    """Starts `PARKED` sagas; a saga counts as ended (``parked``) once its wait step started."""

    def __init__(
        self,
        bootstrap: str,
        prefix: str,
        *,
        partitions: int = 6,
        signer: SigningKey | None = None,
    ) -> None:
        super().__init__(bootstrap, prefix, partitions=partitions, name=PARKED.name, signer=signer)

    def final(self, key: bytes | None, value: bytes | None) -> tuple[str, str] | None:
        """The wait step's ``step_started``."""
        if key is None or value is None or b"step_started" not in value:
            return None
        event = orjson.loads(value)
        if event.get("type") == "step_started" and event.get("step") == PARK_STEP:
            return key.decode(), "parked"
        return None


def run(ctx: Context, *, sagas: int | None = None) -> dict[str, Any]:
    """Runs B6; returns its figures."""
    n = sagas or (5_000 if ctx.quick else 20_000)
    prefix = new_prefix("b6")
    with engine(ctx, prefix) as procs:
        pid = procs.coordinator.pid

        async def idle_rss() -> int:
            await anyio.sleep(2.0)
            value = rss_kib(pid)
            if value is None:
                raise RuntimeError("the coordinator is gone")
            return value

        async def main() -> dict[str, Any]:
            async with engine_generator(ctx, procs) as gen:
                await gen.closed_loop(100, 3.0)  # warm: buffers, pools, caches
            before = await idle_rss()
            load = ParkedLoad(ctx.bootstrap, prefix, partitions=ctx.partitions, signer=ctx.signer())
            async with Generator(ctx.bootstrap, load, procs.check_alive) as parker:
                parker.tracker.slots = slots = anyio.Semaphore(1000)
                half = 0
                async with anyio.create_task_group() as tg:
                    for i in range(n):
                        await slots.acquire()
                        tg.start_soon(parker.start_one)
                        if i + 1 == n // 2:
                            await parker.drain(120)
                            half = await idle_rss()
                await wait_until(
                    lambda: len(parker.tracker.outcome) >= n, 300, "all parked", procs.check_alive
                )
                after = await idle_rss()
            return {
                "sagas": n,
                "rss_before_kib": before,
                "rss_half_kib": half,
                "rss_after_kib": after,
                "bytes_per_saga": round((after - before) * 1024 / n),
                "marginal_bytes_per_saga": round((after - half) * 1024 / (n - n // 2)),
            }

        return anyio.run(main)
