"""The broker dies (SIGKILL) and comes back on the same data; later it freezes (SIGSTOP) and
thaws. Nobody restarts the coordinator or the participants: they must ride it out, reconnect
by themselves and carry on, losing nothing.

These tests kill their own broker, never the session's.
"""

from __future__ import annotations

import gc
import logging
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from aiokafka.client import AIOKafkaClient

from deploy.kafka import KafkaServer, start_kafka
from saga import SagaClient, SagaStatus
from saga.adapters.kafka import KafkaTransport
from saga.core.codec import encode
from saga.core.messages import Command
from saga.runtime.ports import Outgoing, Record, Topics
from tests.chaos.app import Ledger, make_participant
from tests.chaos.cluster import (
    TOLERATE_LEAKED_KAFKA_CLIENTS,
    Cluster,
    ensure_topics,
    eventually,
    wait_until_final,
)
from tests.chaos.inprocess import open_in_process
from tests.chaos.oracle import read_topic
from tests.chaos.workload import Workload, canary, random_plan, verify
from tests.durability.conftest import SEED

pytestmark = [pytest.mark.kafka, *TOLERATE_LEAKED_KAFKA_CLIENTS]

PARTITIONS = 4


@pytest.fixture(scope="module")
def own_kafka() -> Iterator[KafkaServer]:
    """A broker for this module alone, which the tests kill and pause."""
    with start_kafka() as server:
        yield server


@pytest.mark.anyio
async def test_engine_rides_out_a_broker_crash_and_a_freeze(
    own_kafka: KafkaServer,
    make_cluster: Callable[..., Cluster],
    prefix: str,
    rng: random.Random,
) -> None:
    transport = KafkaTransport(own_kafka.bootstrap_servers, deadline=15)
    await ensure_topics(transport, prefix, PARTITIONS)
    cluster = make_cluster(partitions=PARTITIONS, on=own_kafka.bootstrap_servers)
    coordinator = cluster.coordinator()
    participants = cluster.participants()
    outages: list[tuple[str, float, float]] = []
    async with SagaClient(transport, prefix=prefix) as client:
        await canary(client)
        work = Workload(client, rng)

        async def outage() -> None:
            await anyio.sleep(rng.uniform(1.0, 2.0))
            down = time.time()
            own_kafka.kill()
            await anyio.sleep(rng.uniform(2.0, 4.0))
            await anyio.to_thread.run_sync(own_kafka.restart)
            outages.append(("killed", down, time.time()))
            await anyio.sleep(rng.uniform(3.0, 5.0))
            down = time.time()
            own_kafka.pause()
            try:
                await anyio.sleep(rng.uniform(4.0, 6.0))
            finally:
                own_kafka.resume()
            outages.append(("paused", down, time.time()))

        async with anyio.create_task_group() as tg:
            tg.start_soon(outage)
            await work.start_many(30, 0.4, lambda r: random_plan(r, sleep=0.3))
        states = await wait_until_final(client, list(work.started), 150, check=cluster.check)

    verdict = await verify(transport, prefix, cluster.ledger, work.started)
    cluster.check()
    replay = f"replay with CHAOS_SEED={SEED}"
    assert [o[0] for o in outages] == ["killed", "paused"]
    assert all(s.is_final for s in states.values()), (
        f"not all sagas ended ({replay})\n{cluster.logs()}"
    )
    assert not verdict.problems, f"{replay}\n{verdict.report()}"
    # Nobody restarted them: the same processes are still serving.
    for proc in (coordinator, *participants):
        assert proc.alive, f"{proc.name} did not survive:\n{proc.tail()}"
        assert len(proc.starts) == 1
    print(
        f"\nbroker outage: {len(work.started)} sagas; "
        + "; ".join(f"{kind} {end - start:.1f}s" for kind, start, end in outages)
        + f"; {work.start_failures} client sends retried"
    )


# The producer that failed to start is never stopped (part of the bug): keep its "unclosed"
# warning inside this test rather than in whichever test the garbage collector runs during.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.anyio
async def test_a_failed_take_over_is_retried(
    bootstrap: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = KafkaTransport(bootstrap, deadline=15)
    await ensure_topics(transport, prefix, PARTITIONS)
    victim = 1
    saga_id = next(
        f"victim-{i}"
        for i in range(1000)
        if transport.partition_for(f"victim-{i}".encode(), PARTITIONS) == victim
    )
    lookup = AIOKafkaClient.coordinator_lookup
    failed: list[str] = []

    async def flaky_lookup(self: AIOKafkaClient, kind: int, key: str) -> int:
        # What aiokafka did during the chaos run, once, for one partition's producer.
        if key == f"{prefix}.coordinator.{victim}" and not failed:
            failed.append(key)
            raise AssertionError("Did we not perform bootstrap?")
        return int(await lookup(self, kind, key))

    monkeypatch.setattr(AIOKafkaClient, "coordinator_lookup", flaky_lookup)
    # aiokafka logs the listener's failure with its traceback, which would keep the leaked
    # producer alive in the captured log records.
    monkeypatch.setattr(logging.getLogger("aiokafka.consumer.group_coordinator"), "disabled", True)
    try:
        async with open_in_process(transport, prefix, PARTITIONS, tmp_path / "ledger.db") as c:
            await c.start("chain", {"plan": {}}, saga_id)
            state = await c.wait(saga_id, 12)
    finally:
        gc.collect()
    assert failed
    assert state.status is SagaStatus.COMPLETED


@pytest.mark.anyio
async def test_participant_rides_out_a_reply_it_cannot_send(
    own_kafka: KafkaServer, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = KafkaTransport(own_kafka.bootstrap_servers, deadline=3)
    await ensure_topics(transport, prefix, PARTITIONS)
    ledger = Ledger(tmp_path / "ledger.db")
    monkeypatch.setenv("CHAOS_LEDGER", str(ledger.path))
    participant = make_participant("alpha")
    command = Command(
        message_id="m-1",
        saga_id="saga-1",
        saga_name="chain",
        saga_version=1,
        step="a",
        phase="action",
        service="alpha",
        action="a",
        attempt=1,
        idempotency_key="saga-1/a/action",
        payload={"plan": {"a": {"sleep": 2}}},  # the broker freezes while the handler runs
        deadline_at=time.time() + 120,
        at=time.time(),
    )
    crashed: list[BaseException] = []

    async def serve() -> None:
        try:
            await participant.run(transport, prefix=prefix, partitions=PARTITIONS)
        except Exception as exc:
            crashed.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        async with transport.producer() as producer:
            topic = Topics(prefix).commands("alpha")
            await producer.send([Outgoing(topic, b"saga-1", encode(command))])
        await eventually(lambda: bool(ledger.executions()), 60, "the handler starts")
        own_kafka.pause()
        try:
            await anyio.sleep(7)  # the handler ends, and the reply's send times out (3 s)
        finally:
            own_kafka.resume()
        replies: list[Record] = []
        with anyio.move_on_after(30):
            while True:
                replies = await read_topic(transport, Topics(prefix).replies)
                if replies or crashed:
                    break
                await anyio.sleep(0.5)
        tg.cancel_scope.cancel()
    assert not crashed, f"the participant crashed: {crashed!r}"
    assert len(replies) >= 1


@pytest.mark.anyio
async def test_participant_started_during_an_outage_waits_for_the_broker(
    own_kafka: KafkaServer, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = KafkaTransport(own_kafka.bootstrap_servers, deadline=3)
    await ensure_topics(transport, prefix, PARTITIONS)
    ledger = Ledger(tmp_path / "ledger.db")
    monkeypatch.setenv("CHAOS_LEDGER", str(ledger.path))
    participant = make_participant("alpha")
    crashed: list[BaseException] = []

    async def serve() -> None:
        try:
            await participant.run(transport, prefix=prefix, partitions=PARTITIONS)
        except Exception as exc:
            crashed.append(exc)

    replies: list[Record] = []
    async with anyio.create_task_group() as tg:
        own_kafka.pause()
        try:
            tg.start_soon(serve)
            await anyio.sleep(7)  # longer than the transport's deadline
        finally:
            own_kafka.resume()
        command = Command(
            message_id="m-2",
            saga_id="saga-2",
            saga_name="chain",
            saga_version=1,
            step="a",
            phase="action",
            service="alpha",
            action="a",
            attempt=1,
            idempotency_key="saga-2/a/action",
            payload={"plan": {}},
            deadline_at=time.time() + 120,
            at=time.time(),
        )
        async with transport.producer() as producer:
            topic = Topics(prefix).commands("alpha")
            await producer.send([Outgoing(topic, b"saga-2", encode(command))])
        with anyio.move_on_after(40):
            while True:
                replies = await read_topic(transport, Topics(prefix).replies)
                if replies or crashed:
                    break
                await anyio.sleep(0.5)
        tg.cancel_scope.cancel()
    assert not crashed, f"the participant gave up: {crashed!r}"
    assert len(replies) == 1
