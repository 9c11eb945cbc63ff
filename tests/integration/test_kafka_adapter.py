"""The Kafka adapter against the broker itself: where keys go, large records, static membership.

What tests/contract checks for both transports is not repeated here; these are the properties
only a real broker (and Kafka's other clients) can show.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import pytest
from aiokafka import AIOKafkaProducer

from saga.adapters.kafka import KafkaTransport
from saga.errors import TransportError
from saga.runtime.ports import Outgoing, TopicPartition

pytestmark = pytest.mark.anyio


def unique(name: str) -> str:
    return f"adapter-{name}-{uuid.uuid4().hex[:8]}"


JAVA_MURMUR2 = {
    # org.apache.kafka.common.utils.UtilsTest#testMurmur2: Utils.murmur2 of each, signed.
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


def test_partition_for_is_what_the_java_client_computes() -> None:
    transport = KafkaTransport("127.0.0.1:9")  # nothing is connected: partitioning is local
    for key, hashed in JAVA_MURMUR2.items():
        for count in (1, 3, 6, 7, 64):
            # Utils.toPositive(Utils.murmur2(key)) % numPartitions
            assert transport.partition_for(key, count) == (hashed & 0x7FFFFFFF) % count


async def test_keys_land_where_another_client_puts_them(bootstrap: str) -> None:
    # Records the engine sends without a partition go where aiokafka's own default partitioner
    # (another client, the broker's placement being the evidence) sends the same keys.
    transport = KafkaTransport(bootstrap, deadline=20)
    ours, theirs = unique("ours"), unique("theirs")
    await transport.ensure_topics([ours, theirs], 5)
    keys = [f"{uuid.uuid4()}-{'x' * (i % 9)}".encode() for i in range(150)]
    async with transport.producer() as producer:
        await producer.send([Outgoing(ours, k, b"v") for k in keys])
    raw = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await raw.start()
    try:
        for future in [await raw.send(theirs, b"v", key=k) for k in keys]:
            await future
    finally:
        await raw.stop()
    placed: dict[str, dict[bytes, int]] = {ours: {}, theirs: {}}
    for topic in (ours, theirs):
        for p in range(5):
            async for r in transport.read(topic, p):
                placed[topic][r.key or b""] = p
    assert placed[ours] == placed[theirs]
    assert len(placed[ours]) == len(keys)
    assert set(placed[ours].values()) == set(range(5))
    for key, p in placed[theirs].items():
        assert transport.partition_for(key, 5) == p


async def test_a_record_too_large_aborts_its_transaction(bootstrap: str) -> None:
    transport = KafkaTransport(bootstrap, deadline=20)
    dst, tid = unique("large"), unique("tx")
    await transport.ensure_topics([dst], 1)
    async with transport.tx_producer(tid) as tx:
        with pytest.raises(TransportError, match="larger than a request may be"):
            await tx.commit(
                [
                    Outgoing(dst, b"k", b"small", partition=0),
                    Outgoing(dst, b"k", b"x" * 2_000_000, partition=0),
                ],
                {},
                unique("g"),
            )
    async with transport.tx_producer(tid) as tx:
        await tx.commit([Outgoing(dst, b"k", b"after", partition=0)], {}, unique("g"))
    with anyio.fail_after(20):
        # The commit markers are written after the commit returns: nothing to wait on.
        while not (found := [r async for r in transport.read(dst, 0)]):  # noqa: ASYNC110
            await anyio.sleep(0.05)
    assert [r.value for r in found] == [b"after"]


MEMBER = """
import json, sys
import anyio
from saga.adapters.kafka import KafkaTransport

async def main(bootstrap: str, group: str, topic: str, instance: str) -> None:
    transport = KafkaTransport(bootstrap, instance_id=instance, deadline=20)
    async with transport.consumer(group, [topic]) as consumer:
        last = None
        while True:
            await consumer.poll(0.2)
            now = sorted(p for _, p in consumer.assignment())
            if now != last:
                print(json.dumps(now), flush=True)
                last = now

anyio.run(main, *sys.argv[1:])
"""


class _Seen:
    """What a member's rebalance listener was told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, frozenset[TopicPartition]]] = []

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        self.events.append(("revoked", partitions))

    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        self.events.append(("assigned", partitions))


@contextmanager
def member(
    bootstrap: str, group: str, topic: str, instance: str
) -> Iterator[subprocess.Popen[str]]:
    """A group member in a process of its own, printing its partitions whenever they change."""
    args = [sys.executable, "-c", MEMBER, bootstrap, group, topic, instance]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        yield child
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


async def partitions_of(child: subprocess.Popen[str], count: int) -> list[int]:
    """The partitions ``child`` prints once it has ``count`` of them."""
    assert child.stdout is not None
    with anyio.fail_after(60):
        while True:
            line = await anyio.to_thread.run_sync(child.stdout.readline, abandon_on_cancel=True)
            assert line, f"the member exited ({child.poll()})"
            if len(found := json.loads(line)) == count:
                return list(found)


async def test_a_restarted_static_member_takes_its_partitions_back_without_a_rebalance(
    bootstrap: str,
) -> None:
    # Static membership: a member killed with SIGKILL and started again under the same
    # instance id gets the same partitions, and the group's other member sees no rebalance
    # at all (neither a revocation nor a new assignment): nobody waited for the dead member's
    # session to end.
    topic, group = unique("static"), unique("g")
    transport = KafkaTransport(bootstrap, instance_id="stays", deadline=20)
    await transport.ensure_topics([topic], 6)
    seen = _Seen()
    async with transport.consumer(group, [topic], seen) as stays, anyio.create_task_group() as tg:

        async def keep_polling() -> None:
            while True:
                await stays.poll(0.1)

        tg.start_soon(keep_polling)
        with member(bootstrap, group, topic, "comes-back") as first:
            before = await partitions_of(first, 3)
            with anyio.fail_after(60):
                while len(stays.assignment()) != 3:  # noqa: ASYNC110 (the group's doing)
                    await anyio.sleep(0.05)
            kept = stays.assignment()
            events = len(seen.events)
            first.kill()
            first.wait()
        with member(bootstrap, group, topic, "comes-back") as second:
            after = await partitions_of(second, 3)
            await anyio.sleep(1)  # time for a rebalance, were one started, to show
            assert after == before
            assert seen.events[events:] == []
            assert stays.assignment() == kept
            assert {p for _, p in kept}.isdisjoint(after)
        tg.cancel_scope.cancel()


def test_instance_ids_within_a_transport_are_told_apart() -> None:
    transport = KafkaTransport("127.0.0.1:9", instance_id="coordinator-0")
    with (
        transport._instance("g") as one,
        transport._instance("g") as two,
        transport._instance("other") as three,
    ):
        assert (one, two, three) == ("coordinator-0", "coordinator-0-2", "coordinator-0")
    with transport._instance("g") as again:
        assert again == "coordinator-0"
    with KafkaTransport("127.0.0.1:9")._instance("g") as none:
        assert none is None
