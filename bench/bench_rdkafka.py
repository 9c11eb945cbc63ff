"""The engine on aiokafka against the engine on librdkafka: the same workload, the same broker,
the same run.

Run: ``python -m bench.bench_rdkafka [--bootstrap HOST:PORT] [--sagas 400] [--windows 50,500]
[--repeat 1]``. Without ``--bootstrap`` it starts a throwaway broker with `deploy`. The
workload is `bench.bench_engine`'s (the 4-step saga, coordinator and four participants in this
process, no-op handlers, tracing off); each transport gets an unmeasured warm-up run first, then
the two alternate at each window (aiokafka, librdkafka, aiokafka, ...), so that a drift of the
shared machine hits both. CPU is the process's (every thread: librdkafka's own included), per
saga. Prints one JSON object per run, then the ratios librdkafka / aiokafka per window.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import anyio

from bench.bench_engine import DEFINITION, participants
from saga import Coordinator, SagaStatus
from saga.runtime.observe import NullObserver
from saga.runtime.ports import Transport


def _aiokafka(bootstrap: str) -> Transport:
    from saga.adapters.kafka import KafkaTransport

    return KafkaTransport(bootstrap)


def _rdkafka(bootstrap: str) -> Transport:
    from saga.adapters.rdkafka import RdKafkaTransport

    return RdKafkaTransport(bootstrap)


TRANSPORTS: dict[str, Callable[[str], Transport]] = {"aiokafka": _aiokafka, "rdkafka": _rdkafka}
"""The transports compared, by name, each made from a bootstrap address."""


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_run(transport: Transport, sagas: int, window: int) -> dict[str, Any]:
    """`bench.bench_engine.one_run`'s workload on ``transport``: ``sagas`` sagas, at most
    ``window`` in flight; returns the figures."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    observer = NullObserver()
    coordinator = Coordinator([DEFINITION], transport=transport, prefix=prefix, observer=observer)
    async with coordinator, anyio.create_task_group() as tg:
        for p in participants():
            await tg.start(functools.partial(p.run, transport, prefix=prefix, observer=observer))
        # Warm up: topics, group joins and metadata are not what we measure.
        warm = await coordinator.start("bench", {})
        await coordinator.wait(warm, 60)
        limiter = anyio.Semaphore(window)
        latencies: list[float] = []

        async def one(i: int) -> None:
            async with limiter:
                t0 = time.perf_counter()
                saga_id = await coordinator.start("bench", {"i": i})
                state = await coordinator.wait(saga_id, 120)
                assert state.status is SagaStatus.COMPLETED
                latencies.append(time.perf_counter() - t0)

        t0, cpu0 = time.perf_counter(), time.process_time()
        async with anyio.create_task_group() as runs:
            for i in range(sagas):
                runs.start_soon(one, i)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        tg.cancel_scope.cancel()
    latencies.sort()
    return {
        "sagas": sagas,
        "window": window,
        "seconds": round(elapsed, 3),
        "sagas_per_s": round(sagas / elapsed, 1),
        "latency_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "latency_p99_ms": round(_quantile(latencies, 0.99) * 1000, 1),
        "cpu_s": round(cpu, 3),
        "cpu_ms_per_saga": round(cpu * 1000 / sagas, 3),
        "transactions": coordinator.stats.transactions,
    }


def main() -> None:
    """Parses arguments, runs both transports at each window, prints JSON lines and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap")
    parser.add_argument("--sagas", type=int, default=400, help="sagas per run at window 50")
    parser.add_argument("--windows", default="50,500")
    parser.add_argument("--repeat", type=int, default=1, help="runs per transport and window")
    args = parser.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    with ExitStack() as stack:
        bootstrap = args.bootstrap
        if bootstrap is None:
            from deploy.kafka import start_kafka

            bootstrap = stack.enter_context(start_kafka()).bootstrap_servers
        for make in TRANSPORTS.values():  # unmeasured: the broker and each client warm up
            anyio.run(one_run, make(bootstrap), max(50, args.sagas // 4), windows[0])
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for window in windows:
            # More sagas at a larger window, so that the window is full for most of the run.
            sagas = max(args.sagas, 4 * window)
            for _ in range(args.repeat):
                for name, make in TRANSPORTS.items():
                    result = anyio.run(one_run, make(bootstrap), sagas, window)
                    runs.setdefault((name, window), []).append(result)
                    print(json.dumps({"transport": name, **result}), flush=True)
        ratios = {}
        for window in windows:
            a = runs[("aiokafka", window)]
            r = runs[("rdkafka", window)]

            def mean(rs: list[dict[str, Any]], key: str) -> float:
                return statistics.fmean(x[key] for x in rs)

            ratios[f"window_{window}"] = {
                "throughput_rdkafka_over_aiokafka": round(
                    mean(r, "sagas_per_s") / mean(a, "sagas_per_s"), 3
                ),
                "p50_rdkafka_over_aiokafka": round(
                    mean(r, "latency_p50_ms") / mean(a, "latency_p50_ms"), 3
                ),
                "p99_rdkafka_over_aiokafka": round(
                    mean(r, "latency_p99_ms") / mean(a, "latency_p99_ms"), 3
                ),
                "cpu_per_saga_rdkafka_over_aiokafka": round(
                    mean(r, "cpu_ms_per_saga") / mean(a, "cpu_ms_per_saga"), 3
                ),
            }
        print(json.dumps(ratios))


if __name__ == "__main__":
    main()
