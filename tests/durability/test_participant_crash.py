"""A participant that dies after its side effect and before its reply does not repeat it.

The handler commits its effect to the ledger and then kills its own process (``os._exit``),
once per idempotency key: the reply is never sent and the command's offset never committed.
The restarted participant gets the command again, with the same idempotency key, runs the
handler again (the reply store has nothing: the crash came first), and the ledger's unique key
turns the second run into a no-op. Actions and compensations alike.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from saga import SagaClient, SagaStatus
from saga.adapters.kafka import KafkaTransport
from tests.chaos.cluster import Cluster, ensure_topics, wait_until_final
from tests.chaos.workload import Workload, canary, verify

pytestmark = pytest.mark.kafka

PARTITIONS = 4


@pytest.mark.anyio
async def test_redelivered_command_after_a_crash_does_not_repeat_the_effect(
    make_cluster: Callable[..., Cluster],
    transport: KafkaTransport,
    prefix: str,
    rng: random.Random,
) -> None:
    await ensure_topics(transport, prefix, PARTITIONS)
    cluster = make_cluster(partitions=PARTITIONS)
    cluster.coordinator()
    alpha, beta, gamma = cluster.participants()
    async with SagaClient(transport, prefix=prefix) as client:
        await canary(client)
        work = Workload(client, rng)
        forward = await work.start({"b": {"crash": True}})
        backward = await work.start({"c": {"business": True}, "a": {"comp_crash": True}})
        gamma_crash = await work.start({"c": {"crash": True}, "r": {"tech": 1}})
        states = await wait_until_final(client, list(work.started), 150, check=cluster.check)

    verdict = await verify(transport, prefix, cluster.ledger, work.started)
    cluster.check()
    assert not verdict.problems, verdict.report()
    assert states[forward].status is SagaStatus.COMPLETED
    assert states[backward].status is SagaStatus.COMPENSATED
    assert states[gamma_crash].status is SagaStatus.COMPLETED

    crashed = {
        f"{forward}/b/action": beta,
        f"{backward}/a/compensation": alpha,
        f"{gamma_crash}/c/action": gamma,
    }
    assert sorted(cluster.ledger.crashes()) == sorted(crashed)
    assert (alpha.crashes, beta.crashes, gamma.crashes) == (1, 1, 1)
    effects = cluster.ledger.effects()
    for key in crashed:
        saga_id, step, phase = key.split("/")
        runs = cluster.ledger.executions(saga_id)
        # The handler ran again after the crash, under the very same key ...
        assert runs[key] >= 2, f"{key} ran {runs[key]} time(s): the command was not redelivered"
        assert [k for k in runs if k.startswith(f"{saga_id}/{step}/{phase}")] == [key]
        # ... and the effect took place once.
        assert effects[(saga_id, step, phase)] == 1
    assert not cluster.ledger.duplicates()
