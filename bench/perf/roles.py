"""The engine's processes of the benchmark: one coordinator, or participants.

Run by `bench.perf.procs`, each as a process of its own::

    python -m bench.perf.roles coordinator --bootstrap HOST:PORT --prefix P [--tracing]
    python -m bench.perf.roles participant --bootstrap HOST:PORT --prefix P --services s1,s2 \
        [--tracing] [--calls-out FILE]

Only the public API: `saga.Coordinator` and `saga.Participant` on a
`saga.adapters.kafka.KafkaTransport`, trust from the environment (`Trust.from_env`: the
spawner sets ``SAGA_UNSIGNED=1`` unless it runs signed), and with ``--tracing`` an
`saga.adapters.tracing.OpenTelemetryObserver` from the ``OTEL_*`` variables; without it no
observer at all (the engine's `NullObserver`), which is what "tracing off" means here.

Logs go to stderr as JSON lines (the coordinator's ``partition N: recovered K sagas in S s``
among them). On SIGTERM a participant process writes its handler calls per saga and step to
``--calls-out`` (JSON: ``{"saga_id step": calls}``) before it exits.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio

from bench.perf.app import CALLS, participant_for, sagas
from saga import Coordinator
from saga.adapters.clients import kafka_transport
from saga.runtime.logs import configure_logging
from saga.runtime.observe import Observer
from saga.runtime.trust import Trust

__all__ = ["main"]


def _observer(enabled: bool, name: str) -> Observer | None:
    if not enabled:
        return None
    from saga.adapters.tracing import OpenTelemetryObserver

    return OpenTelemetryObserver.from_env(name)


def _shutdown(observer: Observer | None) -> None:
    shutdown = getattr(observer, "shutdown", None)
    if shutdown is not None:
        shutdown()  # flushes the spans of the last transactions


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
    """Serves the benchmark sagas until signalled."""
    observer = _observer(args.tracing, "perf-coordinator")
    coordinator = Coordinator(
        sagas,
        transport=kafka_transport(args.bootstrap, instance_id=args.instance_id),
        prefix=args.prefix,
        partitions=args.partitions,
        observer=observer,
        trust=Trust.from_env(),
    )
    try:
        await _serve(coordinator.run)
    finally:
        _shutdown(observer)


async def run_participants(args: argparse.Namespace) -> None:
    """Serves the given services' participants until signalled; then writes the calls."""
    transport = kafka_transport(args.bootstrap, instance_id=args.instance_id)
    services = [s for s in args.services.split(",") if s]
    observer = _observer(args.tracing, f"perf-{'+'.join(services)}")
    trust = Trust.from_env()

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            for service in services:
                serve = functools.partial(
                    participant_for(service).run,
                    transport,
                    prefix=args.prefix,
                    partitions=args.partitions,
                    observer=observer,
                    trust=trust,
                )
                tg.start_soon(serve)

    try:
        await _serve(run)
    finally:
        _shutdown(observer)
        if args.calls_out is not None:
            calls = {f"{saga_id} {step}": n for (saga_id, step), n in CALLS.items()}
            tmp = args.calls_out.with_suffix(".tmp")
            tmp.write_text(json.dumps(calls))
            tmp.replace(args.calls_out)  # whole or absent: the driver may read it at any time


def main(argv: list[str] | None = None) -> None:
    """Parses the arguments and runs the chosen role."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("role", choices=["coordinator", "participant"])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--services", default="", help="participant: comma-separated services")
    parser.add_argument("--tracing", action="store_true", help="OpenTelemetry from OTEL_* vars")
    parser.add_argument("--calls-out", type=Path, help="participant: handler calls at exit")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--instance-id",
        default=os.environ.get("SAGA_INSTANCE_ID") or None,
        help="static group membership (a restarted coordinator takes its partitions back at once)",
    )
    args = parser.parse_args(argv)
    configure_logging(args.log_level, "json")
    # The coordinator's recovery lines are what the rebuild and recovery benchmarks read.
    import logging

    logging.getLogger("saga.coordinator").setLevel(logging.INFO)
    role = run_coordinator if args.role == "coordinator" else run_participants
    anyio.run(role, args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
