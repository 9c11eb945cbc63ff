"""The peers' workload for ``make bench-peers``: the engine and the raw reference at 1 in flight
(latency) and at 50, 500 and 2,000 in flight (throughput), in the shape the peers' runner
reads::

    {"systems": {"saga-engine": {"version", "guarantees",
                                 "latency_1": {"p50_ms", "p99_ms", "n"},
                                 "throughput": {"50": {"sagas_per_s", "completed", "errors",
                                                       "p50_ms", "p99_ms"}, "500": ..., ...}},
                 "raw-aiokafka": {...}}}
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from bench.perf.common import Context
from bench.perf.throughput import sweep

__all__ = ["GUARANTEES", "LEVELS", "run"]

LEVELS = (50, 500, 2000)

GUARANTEES = {
    "saga-engine": (
        "Every decision is committed in a Kafka transaction (events, commands, snapshots and the "
        "consumed offsets together, acks=all, idempotent producers): exactly-once state "
        "changes in the coordinator across crashes; participants reply with an idempotent "
        "producer, commit their offsets after the reply is acknowledged and answer a "
        "redelivered command from their reply store (effectively-once). Here one "
        "broker, replication 1: Kafka acknowledges once the record is in the broker's page "
        "cache (it does not fsync per write; durability against machine loss comes from "
        "replication, which a single broker does not have)."
    ),
    "raw-aiokafka": (
        "The same broker and the same transactional writes (acks=all, idempotent, offsets "
        "committed in the transaction) for 3 request→reply round trips, but no saga state, "
        "no log of events, no snapshots, timers, retries or compensation: a floor and a "
        "ceiling, not a peer."
    ),
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _system(ctx: Context, system: str, seconds: float) -> dict[str, Any]:
    levels = sweep(ctx, system, [1, *LEVELS], seconds)
    one = levels["1"]
    keys = ("sagas_per_s", "completed", "errors", "p50_ms", "p99_ms")
    return {
        "version": _version("saga-engine") if system == "engine" else _version("aiokafka"),
        "latency_1": {"p50_ms": one["p50_ms"], "p99_ms": one["p99_ms"], "n": one["completed"]},
        "throughput": {str(n): {k: levels[str(n)][k] for k in keys} for n in LEVELS},
        "detail": levels,
    }


def run(ctx: Context) -> dict[str, Any]:
    """Runs the engine, then the raw reference; returns the runner's document."""
    seconds = 4.0 if ctx.quick else 15.0
    engine = _system(ctx, "engine", seconds)
    raw = _system(ctx, "raw", seconds)
    return {
        "systems": {
            "saga-engine": {**engine, "guarantees": GUARANTEES["saga-engine"]},
            "raw-aiokafka": {**raw, "guarantees": GUARANTEES["raw-aiokafka"]},
        }
    }
