"""Coordinators join and leave one group while sagas run: Kafka moves the partitions around.

Two coordinators share the partitions; a third joins; the first leaves cleanly (SIGTERM: it
finishes its batch and leaves the group, so the rebalance starts at once); the second is killed
(SIGKILL: the group waits for its session to expire). The third ends up with every partition
and every saga still ends exactly once, as its planned faults say.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import anyio
import pytest

from saga import SagaClient
from saga.adapters.kafka import KafkaTransport
from tests.chaos.cluster import Cluster, ensure_topics, eventually, wait_until_final
from tests.chaos.workload import Workload, canary, random_plan, verify
from tests.durability.conftest import SEED

pytestmark = pytest.mark.kafka

PARTITIONS = 6


@pytest.mark.anyio
async def test_coordinators_join_leave_and_die_while_sagas_run(
    make_cluster: Callable[..., Cluster],
    transport: KafkaTransport,
    prefix: str,
    rng: random.Random,
) -> None:
    await ensure_topics(transport, prefix, PARTITIONS)
    cluster = make_cluster(partitions=PARTITIONS)
    first = cluster.coordinator("coordinator-1")
    second = cluster.coordinator("coordinator-2")
    cluster.participants()
    async with SagaClient(transport, prefix=prefix) as client:
        await canary(client)
        work = Workload(client, rng)
        statuses: dict[str, int | None] = {}

        async def churn() -> None:
            await anyio.sleep(rng.uniform(0.5, 1.5))
            third = cluster.coordinator("coordinator-3")
            await eventually(lambda: bool(third.recoveries()), 60, "coordinator-3 gets a share")
            await anyio.sleep(rng.uniform(0.5, 1.5))
            statuses["first"] = await anyio.to_thread.run_sync(first.terminate)
            await anyio.sleep(rng.uniform(0.5, 1.5))
            second.kill()

        async with anyio.create_task_group() as tg:
            tg.start_soon(churn)
            await work.start_many(30, 0.2, lambda r: random_plan(r, sleep=0.4))
        states = await wait_until_final(client, list(work.started), 120, check=cluster.check)
        # The sagas may all end before the group notices that coordinator-2 died (its session
        # times out): its partitions move to coordinator-3 then.
        await eventually(
            lambda: (
                {r.partition: r.proc for r in cluster.recoveries()}
                == dict.fromkeys(range(PARTITIONS), "coordinator-3")
            ),
            60,
            "coordinator-3 owns every partition",
        )

    verdict = await verify(transport, prefix, cluster.ledger, work.started)
    cluster.check()
    replay = f"replay with CHAOS_SEED={SEED}"
    assert all(s.is_final for s in states.values()), f"not all sagas ended ({replay})"
    assert not verdict.problems, f"{replay}\n{verdict.report()}"
    assert statuses["first"] == 0, f"SIGTERM did not stop coordinator-1 cleanly:\n{first.tail()}"
    owners = {r.partition: r.proc for r in cluster.recoveries()}
    assert set(owners.values()) == {"coordinator-3"}, f"last owners: {owners}"
    assert set(owners) == set(range(PARTITIONS))
