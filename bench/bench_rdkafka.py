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
from contextlib import ExitStack
from typing import Any

import anyio

from bench import bench_engine
from saga.adapters.clients import Client, kafka_transport
from saga.runtime.observe import NullObserver

CLIENTS: tuple[Client, ...] = ("aiokafka", "rdkafka")
"""The transports compared (`saga.adapters.clients`), in the order each window runs them."""


def one_run(client: Client, bootstrap: str, sagas: int, window: int) -> dict[str, Any]:
    """`bench.bench_engine.one_run`'s workload, tracing off, on ``client``'s transport."""
    transport = kafka_transport(bootstrap, client=client)
    run = functools.partial(
        bench_engine.one_run, bootstrap, sagas, window, NullObserver(), transport=transport
    )
    return anyio.run(run)


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
        for client in CLIENTS:  # unmeasured: the broker and each client warm up
            one_run(client, bootstrap, max(50, args.sagas // 4), windows[0])
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for window in windows:
            # More sagas at a larger window, so that the window is full for most of the run.
            sagas = max(args.sagas, 4 * window)
            for _ in range(args.repeat):
                for name in CLIENTS:
                    result = one_run(name, bootstrap, sagas, window)
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
