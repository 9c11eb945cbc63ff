"""A coordinator killed with SIGKILL at random moments while sagas run, and started again.

The new process recovers every partition from the snapshots and the log, re-arms the timers
that live in the sagas' states, and carries on: every saga ends exactly once, as its planned
faults say; no step's effect is applied twice (the services' ledger) and none is lost (the log,
read back ``read_committed``). The recovery time is measured from the restart to the first event
the new process committed, and from the restart to the coordinator's own "recovered" log lines.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import anyio
import pytest

from saga import SagaClient
from saga.adapters.kafka import KafkaTransport
from tests.chaos.cluster import Cluster, ensure_topics, eventually, wait_until_final
from tests.chaos.workload import Workload, canary, random_plan, verify
from tests.durability.conftest import SEED

pytestmark = pytest.mark.kafka

PARTITIONS = 4
KILLS = 2


@pytest.mark.anyio
async def test_coordinator_killed_mid_flight_recovers_every_saga_once(
    make_cluster: Callable[..., Cluster],
    transport: KafkaTransport,
    prefix: str,
    rng: random.Random,
) -> None:
    await ensure_topics(transport, prefix, PARTITIONS)
    cluster = make_cluster(partitions=PARTITIONS)
    coordinator = cluster.coordinator()
    cluster.participants()
    async with SagaClient(transport, prefix=prefix) as client:
        await canary(client)
        work = Workload(client, rng)
        restarts: list[float] = []

        async def kill_and_restart() -> None:
            for _ in range(KILLS):
                await anyio.sleep(rng.uniform(0.5, 3.0))
                coordinator.kill()
                await anyio.sleep(rng.uniform(0.0, 1.0))
                restarts.append(time.time())
                coordinator.start()
                # The next kill only once this incarnation has taken its partitions over.
                await eventually(
                    lambda: len([r for r in cluster.recoveries() if r.at >= restarts[-1]]) == 4,
                    60,
                    "the restarted coordinator recovers every partition",
                )

        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_and_restart)
            await work.start_many(20, 0.25, lambda r: random_plan(r, sleep=0.4))
        states = await wait_until_final(client, list(work.started), 120, check=cluster.check)

    verdict = await verify(transport, prefix, cluster.ledger, work.started)
    cluster.check()
    replay = f"replay with CHAOS_SEED={SEED}"
    assert len(states) == len(work.started), f"sagas without a state ({replay})"
    assert all(s.is_final for s in states.values()), f"not all sagas ended ({replay})"
    assert not verdict.problems, f"{replay}\n{verdict.report()}"

    # Recovery: from each restart to the first event committed after it, and to the
    # coordinator's "recovered" lines (the group waits for the killed member's session to
    # expire, 10 s, before it hands the partitions over).
    windows = list(zip(restarts, [*restarts[1:], float("inf")], strict=True))
    first_event = []
    logged = []
    for start, end in windows:
        later = [e.at for ev in verdict.scan.events.values() for e in ev if start < e.at < end]
        first_event.append(min(later) - start if later else float("nan"))
        mine = [r.at for r in cluster.recoveries() if start <= r.at < end]
        logged.append(max(mine) - start)
    rebuild = [r.seconds for r in cluster.recoveries() if r.at >= restarts[0]]
    print(
        f"\ncoordinator crash: {len(work.started)} sagas, {KILLS} kills; recovery after restart: "
        f"first new event {', '.join(f'{s:.1f}s' for s in first_event)}; all partitions "
        f"recovered {', '.join(f'{s:.1f}s' for s in logged)}; state rebuild per partition "
        f"max {max(rebuild):.3f}s"
    )
    assert all(s < 45 for s in logged), f"slow recovery: {logged}"
