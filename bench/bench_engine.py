"""End-to-end throughput and latency on a real broker: plain, with signed messages, with
signed and sealed messages, and with tracing on, in one run.

Run: ``python -m bench.bench_engine --bootstrap HOST:PORT [--otlp http://HOST:4318]
[--sagas 300] [--window 50]``. Without ``--bootstrap`` it starts a throwaway broker (and, for
the tracing run, a Jaeger) with `deploy`. The coordinator and four participants run in this
process (one core), so the figures are a floor for a deployment with one process per service.
Prints one JSON object per run and the ratios against the plain run.

The signed run signs every command, reply and request with Ed25519 and verifies each before
it is decided (`saga.runtime.trust`, `saga.runtime.gate`); the sealed run also seals inputs
and outputs with AES-GCM (`saga.adapters.sealing`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import anyio

from saga import Coordinator, Participant, SagaDefinition, SagaStatus, Step, StepContext
from saga.adapters.kafka import KafkaTransport
from saga.adapters.sealing import AesGcmCodec, SealedTransport
from saga.core.policy import parse_policy
from saga.runtime.observe import NullObserver, Observer
from saga.runtime.ports import Transport
from saga.runtime.trust import Keyring, Trust, new_key

DEFINITION = SagaDefinition(
    name="bench",
    steps=[
        Step(name="a", service="s1", action="do", compensation="undo"),
        Step(name="b", service="s2", action="do", compensation="undo", depends_on=["a"]),
        Step(name="c", service="s3", action="do", compensation="undo", depends_on=["a"]),
        Step(name="d", service="s4", action="do", kind="pivot", depends_on=["b", "c"]),
    ],
)


def participants() -> list[Participant]:
    found = []
    for service in ("s1", "s2", "s3", "s4"):
        p = Participant(service)

        @p.handler("do")
        async def do(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
            return {"ok": ctx.step}

        @p.handler("undo")
        async def undo(payload: dict[str, Any], ctx: StepContext) -> None:
            return None

        found.append(p)
    return found


POLICY = """
version: 1
coordinators: [coordinator]
services: {s1: [s1], s2: [s2], s3: [s3], s4: [s4]}
rules: []
"""


def trusts() -> Callable[[str], Trust]:
    """Each principal's signed `Trust` (coordinator and the four services)."""
    keys = {p: new_key(p) for p in ("coordinator", "s1", "s2", "s3", "s4")}
    ring = Keyring(k.public_entry() for k in keys.values())
    policy = parse_policy(POLICY)
    return lambda principal: Trust.signed(keys[principal], ring, policy)


async def one_run(
    bootstrap: str,
    sagas: int,
    window: int,
    observer: Observer,
    *,
    signed: bool = False,
    sealed: bool = False,
    transport: Transport | None = None,
) -> dict[str, Any]:
    """Runs ``sagas`` sagas with at most ``window`` in flight; returns the figures.

    ``transport``: the client to run on (default: aiokafka's on ``bootstrap``)."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    if transport is None:
        transport = KafkaTransport(bootstrap)
    if sealed:
        transport = SealedTransport(transport, AesGcmCodec({"k1": os.urandom(32)}, "k1"))
    trust = trusts() if signed else None
    coordinator = Coordinator(
        [DEFINITION],
        transport=transport,
        prefix=prefix,
        observer=observer,
        trust=trust("coordinator") if trust else None,
    )
    async with coordinator:
        services = participants()
        async with anyio.create_task_group() as tg:
            for p in services:
                run = functools.partial(
                    p.run,
                    transport,
                    prefix=prefix,
                    observer=observer,
                    trust=trust(p.service) if trust else None,
                )
                await tg.start(run)
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
        "steps_per_s": round(4 * sagas / elapsed, 1),
        "latency_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "latency_p95_ms": round(latencies[int(0.95 * (len(latencies) - 1))] * 1000, 1),
        "latency_p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 1),
        "latency_per_step_p50_ms": round(statistics.median(latencies) * 1000 / 3, 1),
        "cpu_s": round(cpu, 3),
        "cpu_ms_per_step": round(cpu * 1000 / (4 * sagas), 3),
        "cpu_ms_per_saga": round(cpu * 1000 / sagas, 3),
        "transactions": coordinator.stats.transactions,
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    """Parses arguments, runs plain, signed, signed and sealed, and traced; prints JSON lines
    and the ratios against the plain run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap")
    parser.add_argument("--otlp", help="OTLP HTTP endpoint for the tracing run")
    parser.add_argument("--sagas", type=int, default=300)
    parser.add_argument("--window", type=int, default=50)
    args = parser.parse_args()
    with ExitStack() as stack:
        bootstrap, otlp = args.bootstrap, args.otlp
        if bootstrap is None:
            from deploy.kafka import start_kafka

            bootstrap = stack.enter_context(start_kafka()).bootstrap_servers
        if otlp is None:
            from deploy.jaeger import start_jaeger

            otlp = stack.enter_context(start_jaeger()).otlp_http_endpoint
        from saga.adapters.tracing import OpenTelemetryObserver

        runs = {}
        off = NullObserver()
        # Unmeasured: the first run on a fresh broker pays for its warming up (page cache,
        # the group coordinator, the transaction log), which would flatter every later run.
        anyio.run(functools.partial(one_run, bootstrap, args.sagas // 4, args.window, off))
        for name, signed in (("plain", False), ("signed", True)):
            runs[name] = anyio.run(
                functools.partial(one_run, bootstrap, args.sagas, args.window, off, signed=signed)
            )
            print(json.dumps({"run": name, **runs[name]}), flush=True)
        both = functools.partial(
            one_run, bootstrap, args.sagas, args.window, off, signed=True, sealed=True
        )
        runs["signed+sealed"] = anyio.run(both)
        print(json.dumps({"run": "signed+sealed", **runs["signed+sealed"]}), flush=True)
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp
        observer = OpenTelemetryObserver.from_env("bench")
        runs["traced"] = anyio.run(one_run, bootstrap, args.sagas, args.window, observer)
        observer.shutdown()
        print(json.dumps({"run": "traced", **runs["traced"]}), flush=True)
        plain = runs["plain"]
        ratios = {
            f"{name}_over_plain": {
                "throughput": round(r["sagas_per_s"] / plain["sagas_per_s"], 3),
                "latency_p50": round(r["latency_p50_ms"] / plain["latency_p50_ms"], 3),
                "cpu": round(r["cpu_s"] / plain["cpu_s"], 3),
            }
            for name, r in runs.items()
            if name != "plain"
        }
        print(json.dumps(ratios))


if __name__ == "__main__":
    main()
