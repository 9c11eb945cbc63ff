"""A seeded chaos run: many sagas with planned failures while everything is killed in turn.

Two coordinators and three participants run as real processes on a broker of this module's
own. Chain sagas start throughout the run, each with random business and technical failures,
handler delays and planned participant crashes (`tests.chaos.workload.random_plan`), while a
fault injector kills (SIGKILL) and stops (SIGTERM) coordinators, kills participants, and kills
(then restarts on the same data) or freezes (SIGSTOP, then SIGCONT) the broker. Every fault kind
happens at least once; the order, the choices and the timings come from the seed. Faults come
one at a time: each is repaired, and the coordinators' group has settled, before the next.

The oracle does not trust the engine: it reads the services' ledger of side effects and the log
(``read_committed``), and checks that every saga reached the outcome its plan dictates within a
deadline after the last fault, that no side effect took place twice, that every trace is legal
(T1..Tn or T1..Tj Cj..C1; completed means every effect and no undo; compensated means a net
effect of zero), and that nothing acknowledged was lost (every started saga has its
``SagaStarted``; every saga's events are numbered 1..n).

``CHAOS_SEED`` picks the seed (a fixed one by default) and ``CHAOS_SAGAS`` the size (30 by
default, which fits in ``make test``; ``make chaos`` runs a larger one). The same seed replays
the same plans and fault schedule; the processes' interleavings still differ from run to run.
"""

from __future__ import annotations

import gc
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import anyio
import pytest

from deploy.kafka import KafkaServer, start_kafka
from services.secure import SecureSetup
from tests.chaos.cluster import (
    TOLERATE_LEAKED_KAFKA_CLIENTS,
    Cluster,
    Proc,
    ensure_topics,
    eventually,
    wait_until_final,
)
from tests.chaos.workload import Workload, canary, random_plan, verify

SEED = int(os.environ.get("CHAOS_SEED", "1861"))
SAGAS = int(os.environ.get("CHAOS_SAGAS", "30"))
PARTITIONS = 4
DEADLINE = 150.0
"""Seconds every saga has to end after the last fault."""
pytestmark = [pytest.mark.kafka, *TOLERATE_LEAKED_KAFKA_CLIENTS]

KINDS = (
    "coordinator_kill",
    "coordinator_term",
    "participant_kill",
    "broker_kill",
    "broker_pause",
)


@pytest.fixture(scope="module")
def chaos_kafka() -> Iterator[KafkaServer]:
    """A broker that this module kills and freezes (never the session's)."""
    with start_kafka() as server:
        yield server


@pytest.fixture(autouse=True)
def _reclaim_garbage() -> Iterator[None]:
    """Collects garbage after the run, so that a client left open warns here (and fails this
    test, under ``filterwarnings = error``) rather than in a later, unrelated test."""
    yield
    gc.collect()


@dataclass
class Injector:
    """Hurts the cluster and the broker, one fault at a time, and remembers what it did."""

    cluster: Cluster
    kafka: KafkaServer
    rng: random.Random
    faults: Counter[str] = field(default_factory=Counter)
    coordinator_kills: list[float] = field(default_factory=list)
    last_fault: float = 0.0

    async def _up(self, proc: Proc) -> None:
        """Waits until a (re)started process reached the broker and is joining its group."""
        since = proc.starts[-1]

        def joining() -> bool:
            return any(
                "joining group" in str(line.get("msg", ""))
                and datetime.fromisoformat(str(line["ts"])).timestamp() >= since
                for line in proc.lines()
            )

        await eventually(joining, 60, f"{proc.name} comes back up")

    async def inject(self, kind: str) -> None:
        """One fault of ``kind``, and the repair that follows it."""
        rng = self.rng
        if kind in ("coordinator_kill", "coordinator_term"):
            proc = rng.choice([p for p in self.cluster.coordinators() if p.alive])
            if kind == "coordinator_kill":
                self.coordinator_kills.append(time.time())
                proc.kill()
            else:
                await anyio.to_thread.run_sync(proc.terminate)
            await anyio.sleep(rng.uniform(0.0, 2.0))
            restarted = time.time()
            proc.start()
            await self._up(proc)
            # One fault at a time: the group has settled and every partition has an owner
            # again before the next one. (A rebalance that meets a broker crash can orphan
            # partitions: see test_a_failed_take_over_is_retried.)
            await eventually(
                lambda: (
                    {r.partition for r in self.cluster.recoveries() if r.at >= restarted}
                    == set(range(PARTITIONS))
                ),
                90,
                "every partition is taken over again after the coordinators' rebalance",
            )
        elif kind == "participant_kill":
            proc = rng.choice([p for p in self.cluster.procs.values() if p.role == "participant"])
            proc.kill()  # the supervisor restarts it at once
            await eventually(lambda: proc.alive, 10, f"{proc.name} is restarted")
            await self._up(proc)
        elif kind in ("broker_kill", "broker_pause"):
            # Not while a process is still joining its group: one that cannot get its partitions
            # within its transport deadline gives up (see test_broker_outage.py).
            await eventually(
                lambda: all(p.joined() for p in self.cluster.procs.values() if p.alive),
                120,
                "every process has joined its group",
            )
            self.cluster.broker_down.set()
            try:
                if kind == "broker_kill":
                    self.kafka.kill()
                    await anyio.sleep(rng.uniform(1.0, 4.0))
                    await anyio.to_thread.run_sync(self.kafka.restart)
                else:
                    self.kafka.pause()
                    try:
                        await anyio.sleep(rng.uniform(2.0, 6.0))
                    finally:
                        self.kafka.resume()
            finally:
                self.cluster.broker_down.clear()
        self.faults[kind] += 1
        self.last_fault = time.time()

    async def run(self, count: int, done: anyio.Event) -> None:
        """Every kind once (in a seeded order), then random kinds until ``count`` faults."""
        kinds = list(KINDS)
        self.rng.shuffle(kinds)
        kinds += [self.rng.choice(KINDS) for _ in range(max(0, count - len(kinds)))]
        for kind in kinds:
            await anyio.sleep(self.rng.uniform(1.0, 4.0))
            await self.inject(kind)
        done.set()


def _recovery_times(cluster: Cluster, kills: list[float]) -> list[float]:
    """Seconds from each coordinator kill until every partition was taken over again."""
    recoveries = cluster.recoveries()
    times = []
    for at in kills:
        seen: set[int] = set()
        for r in recoveries:
            if r.at >= at:
                seen.add(r.partition)
                if len(seen) == PARTITIONS:
                    times.append(r.at - at)
                    break
    return times


REPLAY = f"replay with: CHAOS_SEED={SEED} CHAOS_SAGAS={SAGAS} make chaos"

Check = Callable[[Cluster], Awaitable[None]]
"""More assertions on a finished run, made while its cluster (and broker) is still up."""


@pytest.mark.timeout(max(300, 120 + SAGAS * 3))
@pytest.mark.anyio
async def test_chaos(
    chaos_kafka: KafkaServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await _chaos_run(chaos_kafka, tmp_path, capsys)


@contextmanager
def _replay_on_failure(
    capsys: pytest.CaptureFixture[str], label: str, replay: str
) -> Iterator[None]:
    """Tells how to replay a failed run, even when the output is captured."""
    try:
        yield
    except BaseException:
        with capsys.disabled():
            print(f"\n{label} run failed (seed {SEED}); {replay}")
        raise


async def _chaos_run(
    kafka: KafkaServer,
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    *,
    sagas: int = SAGAS,
    deadline: float = DEADLINE,
    label: str = "chaos",
    replay: str = REPLAY,
    secure: SecureSetup | None = None,
    check: Check | None = None,
) -> None:
    """The chaos run on ``kafka``: ``sagas`` sagas under at least every fault kind once, each
    saga to end within ``deadline`` seconds of the last fault, then the oracle's verdict.

    With ``secure`` the processes, the client and the oracle (as ``admin``) run as that
    deployment, on its prefix; without, unsigned on a fresh one. ``check`` makes a caller's own
    assertions after the common ones, before the cluster stops. ``label`` names the run in its
    summary, and ``replay`` tells how to run it again when it fails.
    """
    rng = random.Random(SEED)
    prefix = secure.prefix if secure is not None else f"chaos-{SEED}-{uuid.uuid4().hex[:6]}"
    started_at = time.monotonic()
    with (
        _replay_on_failure(capsys, label, replay),
        Cluster(
            kafka.bootstrap_servers, prefix, workdir, partitions=PARTITIONS, secure=secure
        ) as cluster,
    ):
        transport = cluster.transport()  # as admin when secured: the oracle reads everything
        await ensure_topics(transport, prefix, PARTITIONS)
        cluster.coordinator("coordinator-1")
        cluster.coordinator("coordinator-2")
        cluster.participants()
        async with cluster.client() as client:
            await canary(client)
            work = Workload(client, rng)
            injector = Injector(cluster, kafka, random.Random(rng.random()))
            done = anyio.Event()
            count = max(len(KINDS), sagas // 8)

            def plan(r: random.Random) -> dict[str, dict[str, object]]:
                return random_plan(r, business=0.25, tech=0.3, crash=0.03, sleep=0.3)

            async with anyio.create_task_group() as tg:
                tg.start_soon(injector.run, count, done)
                await work.start_many(sagas, 0.5, plan)
                await done.wait()

            # The planned participant crashes are faults too, and go on as long as sagas run.
            def last_fault() -> float:
                crashes = cluster.ledger.rows("SELECT MAX(at) FROM crashes")[0][0]
                return max(injector.last_fault, float(crashes or 0.0))

            while True:
                states = await wait_until_final(
                    client, list(work.started), 10, poll=2.0, check=cluster.check
                )
                if all(s.is_final for s in states.values()) and len(states) == len(work.started):
                    break
                if time.time() > last_fault() + deadline:
                    break
            ended_after = time.time() - last_fault()
        verdict = await verify(transport, prefix, cluster.ledger, work.started)
        planned: Counter[str] = Counter()
        for saga_input in work.started.values():
            for faults in saga_input["plan"].values():
                planned["business"] += bool(faults.get("business"))
                planned["technical"] += int(faults.get("tech", 0)) + int(faults.get("comp_tech", 0))
        faults = Counter(injector.faults)
        faults["participant_crash"] = len(cluster.ledger.crashes())
        recovery = _recovery_times(cluster, injector.coordinator_kills)
        summary = (
            f"{label} seed={SEED}: {len(work.started)} sagas run; faults injected: "
            + ", ".join(f"{k}={v}" for k, v in sorted(faults.items()))
            + f"; planned failures: business={planned['business']}, "
            f"technical={planned['technical']}; sagas final: {verdict.final_percent:.1f}% "
            f"(all ended within {ended_after:.0f}s of the last fault); duplicate effects: "
            f"{len(verdict.duplicates)}; lost events: {len(verdict.lost)}; recovery after a "
            f"coordinator kill: "
            + (", ".join(f"{s:.1f}s" for s in recovery) or "n/a")
            + f"; {time.monotonic() - started_at:.0f}s in all"
        )
        with capsys.disabled():  # shown even when the output is captured (make test, make chaos)
            print("\n" + summary)
        cluster.check()
        not_final = [s for s in work.started if s not in states or not states[s].is_final]
        assert not not_final, (
            f"{len(not_final)} sagas did not end within {deadline:.0f}s of the last fault "
            f"({replay})\n{summary}\n{cluster.logs()}"
        )
        assert not verdict.problems, f"{replay}\n{summary}\n{verdict.report()}"
        assert verdict.final_percent == 100.0, f"{replay}\n{summary}"
        assert set(faults) >= set(KINDS), summary
        if check is not None:
            await check(cluster)
