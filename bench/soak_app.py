"""The soak benchmark's engine processes: one coordinator, or the four participants.

Run by `bench.soak`, each as a process of its own::

    python -m bench.soak_app coordinator --bootstrap HOST:PORT --prefix P \
        [--partitions 6] [--evict-after 30] [--tombstone-after 60] [--stats-every 2]
    python -m bench.soak_app participants --bootstrap HOST:PORT --prefix P

The coordinator runs `bench.bench_engine.DEFINITION` (a fork and a join before a pivot, three
sequential stages, every step a no-op) with the retention settings given, logs JSON lines on
stderr (``partition N: recovered K sagas in S s`` among them) and prints its counters as one
JSON line ``{"soak_stats": {...}}`` on stdout every ``--stats-every`` seconds. When the
coordinator has no retention settings (``Coordinator(evict_after=..., tombstone_after=...)``),
it says so in a ``{"soak_warning": ...}`` line and runs without them. Both processes stop on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

from bench.bench_engine import DEFINITION, participants
from saga import Coordinator
from saga.adapters.kafka import KafkaTransport
from saga.runtime.logs import configure_logging

RETENTION_PARAMETERS = ("evict_after", "tombstone_after")
"""The coordinator's retention settings, passed only when its constructor has them."""


def supports_retention() -> bool:
    """Whether this checkout's `Coordinator` takes ``evict_after`` and ``tombstone_after``."""
    parameters = inspect.signature(Coordinator.__init__).parameters
    return all(name in parameters for name in RETENTION_PARAMETERS)


def emit(line: dict[str, Any]) -> None:
    """Prints one JSON line on stdout (the process's log file)."""
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def coordinator_stats(coordinator: Coordinator) -> dict[str, Any]:
    """The counters the soak driver samples: retention's (None when absent) and the engine's."""
    stats = coordinator.stats
    # `_parts` is private; read here only to count the states in memory with or without
    # retention's own `held` counter.
    parts = list(getattr(coordinator, "_parts", {}).values())
    return {
        "at": time.time(),
        "held": getattr(stats, "held", None),
        "evicted": getattr(stats, "evicted", None),
        "tombstoned": getattr(stats, "tombstoned", None),
        "states": sum(len(p.states) for p in parts),
        "partitions": len(parts),
        "records": stats.records,
        "events": stats.events,
        "transactions": stats.transactions,
        "recoveries": stats.recoveries,
    }


async def _serve(run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch_signals)
        await run()
        tg.cancel_scope.cancel()


async def run_coordinator(args: argparse.Namespace) -> None:
    """Serves the benchmark saga with the retention settings until signalled."""
    kwargs: dict[str, Any] = {}
    if supports_retention():
        kwargs = {"evict_after": args.evict_after, "tombstone_after": args.tombstone_after}
    else:
        emit({"soak_warning": "Coordinator has no evict_after/tombstone_after: no retention"})
    coordinator = Coordinator(
        [DEFINITION],
        transport=KafkaTransport(args.bootstrap),
        prefix=args.prefix,
        partitions=args.partitions,
        **kwargs,
    )
    emit({"soak_config": {"retention": bool(kwargs), **kwargs, "partitions": args.partitions}})

    async def report() -> None:
        while True:
            emit({"soak_stats": coordinator_stats(coordinator)})
            await anyio.sleep(args.stats_every)

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(report)
            await coordinator.run()

    await _serve(run)


async def run_participants(args: argparse.Namespace) -> None:
    """Serves the four no-op participants until signalled."""
    transport = KafkaTransport(args.bootstrap)

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            for p in participants():
                serve = functools.partial(
                    p.run, transport, prefix=args.prefix, partitions=args.partitions
                )
                tg.start_soon(serve)

    await _serve(run)


def _seconds_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def main(argv: list[str] | None = None) -> None:
    """Parses the arguments and runs the chosen role."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("role", choices=["coordinator", "participants"])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--evict-after", type=float, default=300.0)
    parser.add_argument(
        "--tombstone-after", type=_seconds_or_none, default=7 * 86400.0, help="seconds, or none"
    )
    parser.add_argument("--stats-every", type=float, default=2.0)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    configure_logging(args.log_level, "json")
    role = run_coordinator if args.role == "coordinator" else run_participants
    anyio.run(role, args)


if __name__ == "__main__":
    main()
