"""A coordinator frozen (SIGSTOP) past its session timeout becomes a zombie when it wakes up.

While it is frozen the group hands its partitions to the other coordinator, whose new
transactional producers fence the frozen one's. When it is continued (SIGCONT) it still holds
polled records and believes it owns its old partitions: its commits must be refused, it must
drop those partitions without crashing, and nothing it does may corrupt the log. The log, read
back ``read_committed``, must still number every saga's events 1..n without a duplicate, and
every saga must end once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import IllegalOperation

from saga import SagaClient, SagaStatus
from saga.adapters.kafka import KafkaTransport
from tests.chaos.cluster import Cluster, Proc, ensure_topics, eventually, wait_until_final
from tests.chaos.inprocess import open_in_process
from tests.chaos.workload import Workload, canary, random_plan, verify
from tests.durability.conftest import SEED

pytestmark = pytest.mark.kafka

PARTITIONS = 4
FROZEN = 13.0
"""Seconds the zombie stays frozen: past the 10 s session timeout and the rebalance."""


@pytest.mark.anyio
async def test_frozen_coordinator_is_fenced_and_writes_nothing(
    make_cluster: Callable[..., Cluster],
    transport: KafkaTransport,
    prefix: str,
    rng: random.Random,
) -> None:
    await ensure_topics(transport, prefix, PARTITIONS)
    cluster = make_cluster(partitions=PARTITIONS)
    zombie = cluster.coordinator("coordinator-1")
    cluster.participants()
    async with SagaClient(transport, prefix=prefix) as client:
        await canary(client)
        survivor = cluster.coordinator("coordinator-2")
        await eventually(
            lambda: len({r.partition for r in survivor.recoveries()}) == PARTITIONS // 2,
            60,
            "the group splits the partitions between the two coordinators",
        )
        owned = {r.partition for r in zombie.recoveries()} - {
            r.partition for r in survivor.recoveries()
        }
        work = Workload(client, rng)
        times: dict[str, float] = {}

        async def freeze() -> None:
            await anyio.sleep(1.0)
            times["paused"] = time.time()
            zombie.pause()
            await anyio.sleep(FROZEN)
            times["resumed"] = time.time()
            zombie.resume()

        async with anyio.create_task_group() as tg:
            tg.start_soon(freeze)
            await work.start_many(30, 0.6, lambda r: random_plan(r, sleep=0.3))
        await anyio.sleep(5)  # the zombie is awake, rejoins, and may get partitions back
        states = await wait_until_final(client, list(work.started), 120, check=cluster.check)

    verdict = await verify(transport, prefix, cluster.ledger, work.started)
    cluster.check()
    replay = f"replay with CHAOS_SEED={SEED}"
    assert all(s.is_final for s in states.values()), f"not all sagas ended ({replay})"
    assert not verdict.problems, f"{replay}\n{verdict.report()}"
    assert zombie.alive, f"the zombie did not survive its fencing:\n{zombie.tail()}"
    assert survivor.alive
    taken = {r.partition for r in survivor.recoveries() if r.at > times["paused"]}
    assert owned <= taken, f"the survivor took {taken}, not the zombie's {owned}"
    stale, fenced = _zombie_takeovers(zombie, survivor, times["resumed"])
    print(f"\nzombie owned {owned}; stale acquisitions {stale}; survivor fenced {fenced}")


def _ts(line: dict[str, object]) -> float:
    return datetime.fromisoformat(str(line["ts"])).timestamp()


def _zombie_takeovers(zombie: Proc, survivor: Proc, resumed: float) -> tuple[list[str], list[str]]:
    """What the zombie did between waking up and rejoining the group, from both logs.

    Returns:
        The zombie's partition take-overs before its new assignment arrived (it acted on the
        assignment it had before it froze), and the survivor's "fenced" warnings before its
        own revocation (someone else opened the transactional ids of partitions it owned).
    """
    lines = [(_ts(x), str(x.get("msg", ""))) for x in zombie.lines()]
    rejoined = min((t for t, m in lines if t > resumed and "newly assigned" in m), default=1e18)
    stale = [m for t, m in lines if resumed < t < rejoined and "recovered" in m]
    lines = [(_ts(x), str(x.get("msg", ""))) for x in survivor.lines()]
    revoked = min((t for t, m in lines if t > resumed and "Revoking" in m), default=1e18)
    fenced = [m for t, m in lines if resumed < t < revoked and "fenced by a newer" in m]
    return stale, fenced


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.anyio
async def test_a_transaction_that_turns_illegal_is_retried(
    bootstrap: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = KafkaTransport(bootstrap, deadline=15)
    await ensure_topics(transport, prefix, PARTITIONS)
    victim = 1
    ids = [
        f"saga-{i}"
        for i in range(1000)
        if transport.partition_for(f"saga-{i}".encode(), PARTITIONS) == victim
    ][:2]
    send_batch = AIOKafkaProducer.send_batch
    armed: list[bool] = []

    async def flaky_send_batch(
        self: AIOKafkaProducer, batch: Any, topic: str, *, partition: int
    ) -> Any:
        # What aiokafka did to the woken zombie, once, in the victim partition's transaction.
        txn = self._txn_manager
        mine = txn is not None and txn.transactional_id == f"{prefix}.coordinator.{victim}"
        if armed and mine and topic.endswith(".log"):
            armed.clear()
            raise IllegalOperation("Can't send messages while not in transaction")
        return await send_batch(self, batch, topic, partition=partition)

    monkeypatch.setattr(AIOKafkaProducer, "send_batch", flaky_send_batch)
    async with open_in_process(transport, prefix, PARTITIONS, tmp_path / "ledger.db") as c:
        await c.start("chain", {"plan": {}}, ids[0])
        assert (await c.wait(ids[0], 60)).status is SagaStatus.COMPLETED
        armed.append(True)
        await c.start("chain", {"plan": {}}, ids[1])
        state = await c.wait(ids[1], 20)
    assert not armed
    assert state.status is SagaStatus.COMPLETED
