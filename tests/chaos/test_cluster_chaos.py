"""The chaos run on a real 3-broker KRaft cluster: brokers fail under the engine, one at a time.

Two coordinators and three participants run as real processes (`tests.chaos.cluster.Cluster`)
with the full bootstrap list of the session's cluster (`kafka_cluster`: three combined
broker-controller nodes, every engine topic with three replicas and ``min.insync.replicas=2``).
Chain sagas with random business and technical failures and handler delays start in bursts, and
right after each burst, with their transactions in flight, one broker fault:

- ``log_leader_kill``: SIGKILL to the broker leading a partition of ``<prefix>.log``, which
  comes back on its data directory once the survivors have elected new leaders;
- ``command_leader_kill``: the same for a partition of a service's command topic;
- ``broker_pause``: SIGSTOP to the broker leading some engine partition, until the controller
  has fenced it (past ``broker.session.timeout.ms``) and a little longer, then SIGCONT.

Every kind happens once (in a seeded order), more at random in larger runs. Each fault is timed:
until every partition the broker led has another leader (the failover, which the test requires),
until the broker is registered again, and until every replica of every partition is back in
sync; the next fault waits for that. Then every saga must end as its plan dictates, and the
oracle (`tests.chaos.workload.verify`, reading the log and the services' ledger) must find no
lost event, no duplicate side effect and only legal traces.

``CHAOS_SEED`` picks the seed and ``CHAOS_SAGAS`` the size (24 by default, about two minutes in
``make test``; ``make chaos`` runs 150). A failing run prints its seed and how to replay it.
"""

from __future__ import annotations

import gc
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from deploy.kafka_cluster import ClusterBroker, ClusterMetadata, KafkaCluster
from saga import SagaClient
from saga.adapters.kafka import KafkaTransport
from saga.runtime.ports import Topics
from tests.chaos.app import SERVICES
from tests.chaos.cluster import (
    TOLERATE_LEAKED_KAFKA_CLIENTS,
    Cluster,
    ensure_topics,
    wait_until_final,
)
from tests.chaos.workload import Workload, canary, random_plan, verify

SEED = int(os.environ.get("CHAOS_SEED", "2718"))
SAGAS = int(os.environ.get("CHAOS_SAGAS", "24"))
PARTITIONS = 4
DEADLINE = 150.0
"""Seconds every saga has to end after the last fault."""
KINDS = ("log_leader_kill", "command_leader_kill", "broker_pause")
FAULTS = max(len(KINDS), SAGAS // 12)
FAILOVER_TIMEOUT = 60.0
"""Seconds the survivors have to elect new leaders for a hurt broker's partitions."""
HEAL_TIMEOUT = 120.0
"""Seconds a broker has to come back and bring every replica back in sync."""
REPLAY = (
    f"replay with: CHAOS_SEED={SEED} CHAOS_SAGAS={SAGAS} "
    ".venv/bin/python -m pytest tests/chaos/test_cluster_chaos.py"
)
pytestmark = [pytest.mark.kafka, *TOLERATE_LEAKED_KAFKA_CLIENTS]


@pytest.fixture
def cluster(kafka_cluster: KafkaCluster) -> Iterator[KafkaCluster]:
    """The session's cluster, healthy before the test and healed after it, whatever happened."""
    kafka_cluster.wait_healthy(HEAL_TIMEOUT)
    try:
        yield kafka_cluster
    finally:
        for broker in kafka_cluster.brokers:
            if broker.paused:
                broker.resume()
            if not broker.running:
                broker.start()
        kafka_cluster.wait_healthy(HEAL_TIMEOUT)


@pytest.fixture(autouse=True)
def _reclaim_garbage() -> Iterator[None]:
    """Collects garbage after the run, so that a client left open warns here (and fails this
    test, under ``filterwarnings = error``) rather than in a later, unrelated test."""
    yield
    gc.collect()


@dataclass
class Fault:
    """One broker fault and how the cluster took it."""

    kind: str
    target: str
    """The topic-partition whose leader was hurt, e.g. ``<prefix>.log/2``."""
    broker: int
    """The node id of the hurt broker."""
    at: float
    """When it was hurt (seconds since the epoch, as the events' ``at``)."""
    led: int = 0
    """Partitions (of every topic) the broker led when it was hurt."""
    new_leader: int = -1
    """The target partition's leader after the failover."""
    failover: float = 0.0
    """Seconds from the fault until every partition the broker led had another leader."""
    fenced: float | None = None
    """Seconds from a pause until the survivors no longer listed the broker."""
    down: float = 0.0
    """Seconds the broker was dead or frozen."""
    back: float = 0.0
    """Seconds from the restart (or resume) until the broker was registered again."""
    healed: float = 0.0
    """Seconds from the restart (or resume) until every replica was in sync again."""
    in_flight: int = 0
    """Sagas that had started and not ended when the fault hit (from the log)."""
    settled: float = 0.0
    """Seconds from the fault until the last of those sagas ended (from the log)."""

    def measure(self, spans: dict[str, tuple[float, float]]) -> None:
        """Finds the sagas in flight at the fault from each saga's first and last event."""
        hit = [end for begin, end in spans.values() if begin <= self.at < end]
        self.in_flight = len(hit)
        self.settled = max(hit, default=self.at) - self.at

    def line(self) -> str:
        fenced = "" if self.fenced is None else f", fenced after {self.fenced:.1f}s"
        return (
            f"{self.kind} of broker {self.broker} (leader of {self.target}, of {self.led} "
            f"partitions; {self.in_flight} sagas in flight, all ended {self.settled:.1f}s "
            f"later): leaders moved after "
            f"{self.failover:.1f}s{fenced} ({self.target} -> broker {self.new_leader}); down "
            f"{self.down:.1f}s; registered again {self.back:.1f}s and all in sync "
            f"{self.healed:.1f}s after its {'resume' if self.kind == 'broker_pause' else 'restart'}"
        )


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Polls a blocking ``condition`` in a worker thread; returns the seconds it took.

    The cluster's probes are socket calls that a frozen broker can hold for seconds: they must
    not block the event loop, which runs the test's own client.
    """
    started = time.monotonic()
    while not await anyio.to_thread.run_sync(condition):
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not within {timeout:.0f}s: {what}")
        await anyio.sleep(0.1)
    return time.monotonic() - started


@dataclass
class BrokerInjector:
    """Hurts one broker at a time and times how the cluster fails over and heals."""

    kafka: KafkaCluster
    prefix: str
    rng: random.Random
    faults: list[Fault] = field(default_factory=list)
    last_fault: float = 0.0

    def _target(self, kind: str) -> tuple[str, int]:
        topics = Topics(self.prefix)
        if kind == "log_leader_kill":
            topic = topics.log
        elif kind == "command_leader_kill":
            topic = topics.commands(self.rng.choice(SERVICES))
        else:
            choices = [topics.requests, topics.replies, topics.log, topics.snapshots]
            topic = self.rng.choice(choices + [topics.commands(s) for s in SERVICES])
        return topic, self.rng.randrange(PARTITIONS)

    def _survivors_agree(
        self, hurt: ClusterBroker, led: list[tuple[str, int]], fault: Fault
    ) -> Callable[[], bool]:
        """A probe: every survivor sees new leaders for what ``hurt`` led (and, for a pause,
        no longer lists it as registered)."""
        target = tuple(fault.target.rsplit("/", 1))

        def moved() -> bool:
            views: list[ClusterMetadata] = []
            for broker in self.kafka.brokers:
                if broker is hurt:
                    continue
                view = broker.metadata(timeout=2.0)
                if view is None:
                    return False
                views.append(view)
            for view in views:
                if hurt.node_id in view.brokers and fault.kind == "broker_pause":
                    return False
                for tp in led:
                    leader = view.leader(*tp)
                    if leader is None or leader == hurt.node_id:
                        return False
            leader = views[0].leader(target[0], int(target[1]))
            fault.new_leader = -1 if leader is None else leader
            return True

        return moved

    async def inject(self, kind: str) -> Fault:
        """One fault of ``kind``, its failover, and the repair that follows it."""
        await _until(self.kafka.healthy, HEAL_TIMEOUT, "the cluster is healthy before a fault")
        topic, partition = self._target(kind)
        meta = await anyio.to_thread.run_sync(self.kafka.metadata)
        node = meta.leader(topic, partition)
        assert node is not None, f"{topic}/{partition} has no leader in {meta}"
        hurt = self.kafka.broker(node)
        led = [tp for tp, s in meta.partitions.items() if s.leader == node]
        fault = Fault(kind, f"{topic}/{partition}", node, time.time(), led=len(led))
        hit = time.monotonic()
        if kind == "broker_pause":
            hurt.pause()
        else:
            hurt.kill()
        try:
            fault.failover = await _until(
                self._survivors_agree(hurt, led, fault),
                FAILOVER_TIMEOUT,
                f"the survivors elect new leaders for the {len(led)} partitions of broker {node}",
            )
            if kind == "broker_pause":
                fault.fenced = fault.failover
            # Down a little longer: the engine meets the new leaders with the broker still gone.
            await anyio.sleep(self.rng.uniform(0.5, 3.0))
        finally:
            fault.down = time.monotonic() - hit
            back = time.monotonic()
            if kind == "broker_pause":
                hurt.resume()
            else:
                await anyio.to_thread.run_sync(hurt.start)
        await _until(
            lambda: all(
                (view := b.metadata(timeout=2.0)) is not None and node in view.brokers
                for b in self.kafka.brokers
            ),
            HEAL_TIMEOUT,
            f"broker {node} is registered again",
        )
        fault.back = time.monotonic() - back
        await _until(self.kafka.healthy, HEAL_TIMEOUT, f"every replica is in sync after {kind}")
        fault.healed = time.monotonic() - back
        self.faults.append(fault)
        self.last_fault = time.time()
        return fault


def _kinds(rng: random.Random) -> list[str]:
    """Every kind once, in a seeded order, then random kinds up to `FAULTS`."""
    kinds = list(KINDS)
    rng.shuffle(kinds)
    return kinds + [rng.choice(KINDS) for _ in range(FAULTS - len(kinds))]


def _bursts(total: int, faults: int) -> list[tuple[int, int]]:
    """For each fault, the sagas started right before it and those started during it."""
    each = [total // faults + (i < total % faults) for i in range(faults)]
    return [(max(1, n // 2), n - max(1, n // 2)) for n in each]


async def _topic_configs(bootstrap: str, topic: str) -> dict[str, str]:
    """A topic's configuration, as a broker that knows the topic describes it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        with anyio.fail_after(30):
            while True:
                (response,) = await admin.describe_configs(
                    [ConfigResource(ConfigResourceType.TOPIC, topic)]
                )
                resources: Any = response.resources
                found: dict[str, str] = {}
                errors = []
                for error, message, _type, _name, entries, *_ in resources:
                    if error:  # a broker that has not heard of the new topic yet
                        errors.append((error, message))
                    for entry in entries:
                        found[str(entry[0])] = str(entry[1])
                if not errors:
                    return found
                await anyio.sleep(0.2)
    finally:
        await admin.close()


@pytest.mark.timeout(max(480, 240 + SAGAS * 5))
@pytest.mark.anyio
async def test_cluster_chaos(
    cluster: KafkaCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        await _chaos_run(cluster, tmp_path, capsys)
    except BaseException:
        with capsys.disabled():
            print(f"\ncluster chaos run failed (seed {SEED}); {REPLAY}")
        raise


async def _chaos_run(
    kafka: KafkaCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(SEED)
    prefix = f"cchaos-{SEED}-{uuid.uuid4().hex[:6]}"
    topics = Topics(prefix)
    transport = KafkaTransport(kafka.bootstrap_servers, deadline=15)
    await ensure_topics(transport, prefix, PARTITIONS)

    # The engine's topics are really replicated: three replicas, two of them needed for a write.
    checked = [topics.log, topics.snapshots, topics.commands("alpha")]
    await _until(
        lambda: all(len(kafka.metadata().topic(n)) == PARTITIONS for n in checked),
        30,
        "the new topics are in the cluster's metadata",
    )
    meta = await anyio.to_thread.run_sync(kafka.metadata)
    for name in checked:
        replicas = {len(s.replicas) for s in meta.topic(name).values()}
        assert replicas == {3}, f"{name} has replicas {meta.topic(name)}"
        configs = await _topic_configs(kafka.bootstrap_servers, name)
        assert configs.get("min.insync.replicas") == "2", f"{name}: {configs}"

    started_at = time.monotonic()
    with Cluster(kafka.bootstrap_servers, prefix, tmp_path, partitions=PARTITIONS) as engine:
        engine.coordinator("coordinator-1")
        engine.coordinator("coordinator-2")
        engine.participants()
        async with SagaClient(transport, prefix=prefix) as client:
            await canary(client)
            work = Workload(client, rng)
            injector = BrokerInjector(kafka, prefix, random.Random(rng.random()))
            kinds = _kinds(injector.rng)

            def plan(r: random.Random) -> dict[str, dict[str, object]]:
                return random_plan(r, business=0.25, tech=0.3, crash=0.0, sleep=0.3)

            for kind, (before, during) in zip(kinds, _bursts(SAGAS, len(kinds)), strict=True):
                await work.start_many(before, 0.3, plan)
                # The rest of the burst starts as the broker goes down, into the failover.
                async with anyio.create_task_group() as tg:
                    tg.start_soon(work.start_many, during, 0.5, plan)
                    await injector.inject(kind)
                engine.check()

            while True:
                states = await wait_until_final(
                    client, list(work.started), 10, poll=2.0, check=engine.check
                )
                if all(s.is_final for s in states.values()) and len(states) == len(work.started):
                    break
                if time.time() > injector.last_fault + DEADLINE:
                    break
        verdict = await verify(transport, prefix, engine.ledger, work.started)
        # Each saga's life from its first to its last event (not ended: to the end of time).
        spans = {}
        for saga_id in work.started:
            events = verdict.scan.events.get(saga_id) or []
            if events:
                final = saga_id in states and states[saga_id].is_final
                spans[saga_id] = (events[0].at, events[-1].at if final else float("inf"))
        for fault in injector.faults:
            fault.measure(spans)
        durations = sorted(end - begin for begin, end in spans.values())
        last_end = max((end for _, end in spans.values()), default=0.0)
        counts = Counter(f.kind for f in injector.faults)
        recoveries = len(engine.recoveries())
        summary = "\n".join(
            [
                f"cluster chaos seed={SEED}: {len(work.started)} sagas on 3 brokers; faults: "
                + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
                + f"; sagas final: {verdict.final_percent:.1f}% (the last ended "
                f"{last_end - injector.faults[-1].at:.1f}s after the last fault hit); saga "
                f"duration median {durations[len(durations) // 2]:.1f}s, max "
                f"{durations[-1]:.1f}s; duplicate effects: {len(verdict.duplicates)}; lost "
                f"events: {len(verdict.lost)}; start retries: {work.start_failures}; "
                f"coordinator partition recoveries: {recoveries}; "
                f"{time.monotonic() - started_at:.0f}s in all",
                *(f"  {f.line()}" for f in injector.faults),
            ]
        )
        with capsys.disabled():  # shown even when the output is captured (make test, make chaos)
            print("\n" + summary)
        engine.check()
        not_final = [s for s in work.started if s not in states or not states[s].is_final]
        assert not not_final, (
            f"{len(not_final)} sagas did not end within {DEADLINE:.0f}s of the last fault "
            f"({REPLAY})\n{summary}\n{engine.logs()}"
        )
        assert not verdict.problems, f"{REPLAY}\n{summary}\n{verdict.report()}"
        assert verdict.final_percent == 100.0, f"{REPLAY}\n{summary}"
        # The cluster really failed over: each fault moved its partition to another broker.
        assert len(injector.faults) == FAULTS
        for f in injector.faults:
            assert f.in_flight >= 1, f"no saga was in flight: {REPLAY}\n{f.line()}"
            assert f.led >= 1, f"{REPLAY}\n{f.line()}"
            assert f.new_leader not in (-1, f.broker), f"{REPLAY}\n{f.line()}"
        assert set(counts) == set(KINDS), summary
