"""Sagas to run under faults, and the verdict on them once the dust settles.

`Workload` starts chain sagas with planned faults (`random_plan`) and remembers every start the
broker acknowledged; a start that fails (the broker is down) is sent again with the same saga id
until it is acknowledged, which starts the saga once. `verify` then reads the log and the ledger
and lists every broken guarantee (see `tests.chaos.oracle`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from saga import SagaClient, SagaStatus, SagaTimeout, TransportError
from saga.runtime.ports import Transport
from tests.chaos.app import CHAIN_STEPS, COMPENSATABLE, Ledger
from tests.chaos.oracle import (
    LogScan,
    chain_trace_problems,
    expected_outcome,
    fold_problems,
    ledger_problems,
    scan_log,
    seq_problems,
)

__all__ = ["Verdict", "Workload", "canary", "random_plan", "verify"]

Plan = dict[str, dict[str, Any]]


def random_plan(
    rng: random.Random,
    *,
    business: float = 0.25,
    tech: float = 0.3,
    crash: float = 0.0,
    sleep: float = 0.3,
) -> Plan:
    """Faults for one chain saga: at most one business failure (a compensatable step or the
    pivot), technical failures here and there (actions and compensations), planned participant
    crashes after the effect, and handler sleeps of up to ``sleep`` seconds."""
    plan: Plan = {step: {} for step in CHAIN_STEPS}
    if rng.random() < business:
        plan[rng.choice(["a", "b", "c", "p"])]["business"] = True
    for step in CHAIN_STEPS:
        faults = plan[step]
        if rng.random() < tech:
            faults["tech"] = rng.randint(1, 2)
        if step in COMPENSATABLE and rng.random() < tech:
            faults["comp_tech"] = rng.randint(1, 2)
        if rng.random() < crash:
            faults["crash"] = True
        if step in COMPENSATABLE and rng.random() < crash:
            faults["comp_crash"] = True
        if sleep:
            faults["sleep"] = round(rng.uniform(0, sleep), 3)
    return {s: f for s, f in plan.items() if f}


async def canary(client: SagaClient, timeout: float = 90.0) -> float:
    """Runs plain chain sagas until one completes: every process is up and in its group.

    Returns:
        The seconds it took.
    """
    started = time.monotonic()
    with anyio.fail_after(timeout):
        while True:
            try:
                saga_id = await client.start("chain", {"plan": {}, "canary": True})
                state = await client.wait(saga_id, timeout=60, poll=0.25)
            except (SagaTimeout, TransportError):
                continue
            if state.status is SagaStatus.COMPLETED:
                return time.monotonic() - started


@dataclass
class Workload:
    """Chain sagas started through a client, with their inputs."""

    client: SagaClient
    rng: random.Random
    started: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Saga id -> input, for every start the broker acknowledged."""
    start_failures: int = 0

    async def start(self, plan: Plan, **extra: Any) -> str:
        """Starts one chain saga; retries a failed send with the same id until it is acked."""
        saga_input = {"plan": plan, **extra}
        saga_id = f"chaos-{self.rng.getrandbits(64):016x}"
        while True:
            try:
                await self.client.start("chain", saga_input, saga_id)
            except TransportError:
                self.start_failures += 1
                await anyio.sleep(0.5)
                continue
            self.started[saga_id] = saga_input
            return saga_id

    async def start_many(
        self, count: int, interval: float, plan: Callable[[random.Random], Plan]
    ) -> list[str]:
        """Starts ``count`` sagas, one every ``interval`` seconds."""
        ids = []
        for _ in range(count):
            ids.append(await self.start(plan(self.rng)))
            await anyio.sleep(interval)
        return ids

    def expected(self) -> dict[str, SagaStatus]:
        """The status each started saga must end in."""
        return {s: expected_outcome(i) for s, i in self.started.items()}


@dataclass
class Verdict:
    """Everything `verify` found."""

    scan: LogScan
    final: dict[str, SagaStatus]
    problems: list[str]
    duplicates: list[tuple[str, str, str, int]]
    lost: list[str]

    @property
    def final_percent(self) -> float:
        """Sagas that reached completed or compensated, in percent of those started."""
        ended = (SagaStatus.COMPLETED, SagaStatus.COMPENSATED)
        total = len(self.final) or 1
        return 100.0 * sum(s in ended for s in self.final.values()) / total

    def report(self, limit: int = 25) -> str:
        """The problems, one per line (the first ``limit``)."""
        lines = self.problems[:limit]
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more")
        return "\n".join(lines)


async def verify(
    transport: Transport,
    prefix: str,
    ledger: Ledger,
    started: Mapping[str, Mapping[str, Any]],
    *,
    expected: Mapping[str, SagaStatus] | None = None,
) -> Verdict:
    """Reads the log and the ledger and checks every guarantee for the ``started`` sagas.

    Args:
        expected: Each saga's required final status; by default `expected_outcome` of its plan.
    """
    scan = await scan_log(transport, prefix)
    lost = seq_problems(scan, started)
    problems = list(lost) + fold_problems(scan)
    problems += [f"undecodable log record {u}" for u in scan.undecodable]
    statuses = scan.final()
    effects = ledger.effects()
    final: dict[str, SagaStatus] = {}
    for saga_id, saga_input in started.items():
        status = statuses.get(saga_id)
        if status is None:
            continue
        final[saga_id] = status
        want = (expected or {}).get(saga_id) or expected_outcome(saga_input)
        if status is not want:
            problems.append(f"saga {saga_id}: ended {status.value}, expected {want.value}")
        problems += chain_trace_problems(saga_id, scan.events[saga_id])
        problems += ledger_problems(saga_id, status, effects)
    duplicates = ledger.duplicates()
    problems += [f"duplicate effect {d}" for d in duplicates]
    return Verdict(scan, final, problems, duplicates, lost)
