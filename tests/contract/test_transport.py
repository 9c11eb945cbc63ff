"""One contract, two transports: what the runtime relies on holds for memory and for Kafka."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import anyio
import pytest

from saga.adapters.memory import MemoryTransport
from saga.errors import Fenced
from saga.runtime.ports import Outgoing, Record, TopicPartition, Transport

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "kafka"])
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    if request.param == "memory":
        yield MemoryTransport()
    else:
        from saga.adapters.kafka import KafkaTransport

        yield KafkaTransport(request.getfixturevalue("bootstrap"), deadline=20)


def unique(name: str) -> str:
    return f"contract-{name}-{uuid.uuid4().hex[:8]}"


async def read_all(t: Transport, topic: str, partition: int, start: int = 0) -> list[Record]:
    return [r async for r in t.read(topic, partition, start)]


async def read_eventually(
    t: Transport, topic: str, partition: int, count: int, start: int = 0
) -> list[Record]:
    """Kafka writes a transaction's commit markers after the commit call returns, so a
    read_committed reader sees the records a moment later; the memory broker at once."""
    with anyio.fail_after(10):
        while True:  # polling a broker: there is no event to wait on
            found = await read_all(t, topic, partition, start)
            if len(found) >= count:
                return found
            await anyio.sleep(0.05)


async def poll_until(consumer: object, count: int, seconds: float = 20) -> list[Record]:
    got: list[Record] = []
    with anyio.fail_after(seconds):
        while len(got) < count:
            got += await consumer.poll(0.2)  # type: ignore[attr-defined]
    return got


async def test_topics_are_created_once_with_the_partition_count(transport: Transport) -> None:
    topic = unique("topics")
    await transport.ensure_topics([topic], 3)
    await transport.ensure_topics([topic], 5)  # existing topics are left as they are
    assert await transport.partitions(topic) == 3


async def test_keyed_records_land_where_partition_for_says(transport: Transport) -> None:
    topic = unique("keys")
    await transport.ensure_topics([topic], 4)
    keys = [f"saga-{i}".encode() for i in range(12)]
    async with transport.producer() as producer:
        await producer.send([Outgoing(topic, k, b"v") for k in keys])
    for p in range(4):
        for r in await read_all(transport, topic, p):
            assert transport.partition_for(r.key or b"", 4) == p
    total = sum([len(await read_all(transport, topic, p)) for p in range(4)])
    assert total == len(keys)


async def test_group_member_commits_and_resumes_from_committed(transport: Transport) -> None:
    topic, group = unique("group"), unique("g")
    await transport.ensure_topics([topic], 1)
    async with transport.producer() as producer:
        await producer.send([Outgoing(topic, b"k", f"{i}".encode()) for i in range(5)])
    async with transport.consumer(group, [topic]) as consumer:
        first = await poll_until(consumer, 5)
        assert [r.value for r in first][:5] == [b"0", b"1", b"2", b"3", b"4"]
        await consumer.commit({(topic, 0): 3})
        await consumer.seek_to_committed(frozenset({(topic, 0)}))
        again = await poll_until(consumer, 2)
        assert [r.value for r in again][:2] == [b"3", b"4"]
    async with transport.consumer(group, [topic]) as consumer:
        resumed = await poll_until(consumer, 2)
        assert [r.value for r in resumed][:2] == [b"3", b"4"]


async def test_transaction_writes_records_and_offsets_atomically(transport: Transport) -> None:
    src, dst, group = unique("src"), unique("dst"), unique("g")
    await transport.ensure_topics([src, dst], 1)
    async with transport.tx_producer(unique("tx")) as tx:
        offsets = await tx.commit(
            [Outgoing(dst, b"k", b"a", partition=0), Outgoing(dst, b"k", b"b", partition=0)],
            {(src, 0): 7},
            group,
        )
    assert offsets == sorted(offsets)
    assert len(offsets) == 2
    assert [r.value for r in await read_eventually(transport, dst, 0, 2)] == [b"a", b"b"]
    assert [r.value for r in await read_all(transport, dst, 0, offsets[1])] == [b"b"]
    async with transport.producer() as producer:
        await producer.send([Outgoing(src, b"k", f"{i}".encode()) for i in range(9)])
    async with transport.consumer(group, [src]) as consumer:
        got = await poll_until(consumer, 2)
        assert got[0].offset == 7


async def test_a_newer_transactional_producer_fences_the_older(transport: Transport) -> None:
    dst, tid = unique("fence"), unique("tx")
    await transport.ensure_topics([dst], 1)
    async with transport.tx_producer(tid) as old:
        await old.commit([Outgoing(dst, b"k", b"old", partition=0)], {}, unique("g"))
        async with transport.tx_producer(tid) as new:
            with pytest.raises(Fenced):
                await old.commit([Outgoing(dst, b"k", b"zombie", partition=0)], {}, unique("g"))
            await new.commit([Outgoing(dst, b"k", b"new", partition=0)], {}, unique("g"))
    assert [r.value for r in await read_eventually(transport, dst, 0, 2)] == [b"old", b"new"]


async def test_range_assignment_keeps_copartitioned_topics_together(transport: Transport) -> None:
    a, b, group = unique("a"), unique("b"), unique("g")
    await transport.ensure_topics([a, b], 4)
    async with (
        transport.consumer(group, [a, b]) as one,
        transport.consumer(group, [a, b]) as two,
    ):
        owned: list[frozenset[TopicPartition]] = []
        with anyio.fail_after(30):
            while True:
                await one.poll(0.1)
                await two.poll(0.1)
                owned = [one.assignment(), two.assignment()]
                if all(owned) and len(owned[0] | owned[1]) == 8 and not owned[0] & owned[1]:
                    break
    for assignment in owned:
        assert {p for t, p in assignment if t == a} == {p for t, p in assignment if t == b}


async def test_concurrent_sends_are_each_acknowledged_and_all_written(transport: Transport) -> None:
    # Sends that overlap go out together (the Kafka producer groups them): each returns only
    # once its own records are written, and none is lost or written twice.
    topic = unique("many")
    await transport.ensure_topics([topic], 3)
    async with transport.producer() as producer:

        async def one(i: int) -> None:
            await producer.send([Outgoing(topic, f"k{i}".encode(), f"v{i}".encode())])

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
    found = [r for p in range(3) for r in await read_all(transport, topic, p)]
    assert sorted(r.value or b"" for r in found) == sorted(f"v{i}".encode() for i in range(200))
    for r in found:
        assert transport.partition_for(r.key or b"", 3) == r.partition


async def test_a_transaction_returns_each_records_offset(transport: Transport) -> None:
    # Many records, over several partitions and more than one batch of each, headers included:
    # the offset returned for each is where it was written.
    dst = unique("offsets")
    await transport.ensure_topics([dst], 3)
    records = [
        Outgoing(dst, f"saga-{i % 7}".encode(), f"{i}:".encode() + b"x" * 900, (("h", b"%d" % i),))
        for i in range(120)
    ] + [Outgoing(dst, b"elsewhere", b"pinned", partition=2)]
    async with transport.tx_producer(unique("tx")) as tx:
        offsets = await tx.commit(records, {}, unique("g"))
    assert len(offsets) == len(records)
    by_place = {}
    for p in range(3):
        for r in await read_eventually(transport, dst, p, 1):
            by_place[(p, r.offset)] = r
    for record, offset in zip(records, offsets, strict=True):
        p = (
            record.partition
            if record.partition is not None
            else transport.partition_for(record.key or b"", 3)
        )
        written = by_place[(p, offset)]
        assert (written.key, written.value, written.headers) == (
            record.key,
            record.value,
            record.headers,
        )
