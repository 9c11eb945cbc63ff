"""`Transport.tail`, one contract for memory and Kafka: a long-lived, group-less reader that
starts where it is told, reads several partitions ``read_committed``, reports the end it can
reach, and follows what is appended after it opened."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Sequence

import anyio
import pytest

from saga.adapters.memory import MemoryTransport
from saga.adapters.sealing import AesGcmCodec, SealedTransport
from saga.errors import TransportError
from saga.runtime.ports import Outgoing, Record, Tail, Transport

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "kafka"])
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    if request.param == "memory":
        yield MemoryTransport()
    else:
        from saga.adapters.kafka import KafkaTransport

        yield KafkaTransport(request.getfixturevalue("bootstrap"), deadline=20)


def unique(name: str) -> str:
    return f"contract-tail-{name}-{uuid.uuid4().hex[:8]}"


async def poll_until(tail: Tail, count: int, seconds: float = 20) -> list[Record]:
    """Polls until ``count`` records came (failing after ``seconds``)."""
    got: list[Record] = []
    with anyio.fail_after(seconds):
        while len(got) < count:
            got += await tail.poll(0.2, 100)
    return got


async def caught_up(tail: Tail, seconds: float = 20) -> dict[int, int]:
    """Polls until the tail's positions reach its end offsets (Kafka writes a transaction's
    markers just after the commit returns); returns them."""
    with anyio.fail_after(seconds):
        while True:
            ends = await tail.end_offsets()
            if await tail.positions() == ends:
                return ends
            assert await tail.poll(0.1, 100) == [], "only markers were left to pass over"


def by_partition(records: Sequence[Record]) -> dict[int, list[tuple[int, bytes | None]]]:
    found: dict[int, list[tuple[int, bytes | None]]] = {}
    for r in records:
        found.setdefault(r.partition, []).append((r.offset, r.value))
    return found


async def fill(t: Transport, topic: str, per_partition: dict[int, int]) -> None:
    """Writes ``n`` records ``p-i`` to each partition ``p``, interleaved across partitions."""
    records = [
        Outgoing(topic, f"k{p}".encode(), f"{p}-{i}".encode(), partition=p)
        for i in range(max(per_partition.values()))
        for p, n in sorted(per_partition.items())
        if i < n
    ]
    async with t.producer() as producer:
        await producer.send(records)


async def test_a_tail_starts_at_the_given_offsets_of_the_given_partitions(
    transport: Transport,
) -> None:
    topic = unique("starts")
    await transport.ensure_topics([topic], 3)
    await fill(transport, topic, {0: 5, 1: 5, 2: 5})
    async with transport.tail(topic, {0: 2, 1: 0}) as tail:
        assert await tail.positions() == {0: 2, 1: 0}
        got = await poll_until(tail, 8)
        assert await caught_up(tail) == {0: 5, 1: 5}  # partition 2 is not tailed
        assert await tail.poll(0.2) == []
    assert by_partition(got) == {
        0: [(i, f"0-{i}".encode()) for i in range(2, 5)],
        1: [(i, f"1-{i}".encode()) for i in range(5)],
    }
    assert all(r.topic == topic and r.key == f"k{r.partition}".encode() for r in got)


async def test_a_tail_reads_several_partitions_each_in_offset_order(transport: Transport) -> None:
    topic = unique("several")
    await transport.ensure_topics([topic], 4)
    counts = {0: 30, 1: 7, 2: 0, 3: 19}
    await fill(transport, topic, counts)
    async with transport.tail(topic, dict.fromkeys(range(4), 0)) as tail:
        got = await poll_until(tail, sum(counts.values()))
        assert await caught_up(tail) == counts
    assert by_partition(got) == {
        p: [(i, f"{p}-{i}".encode()) for i in range(n)] for p, n in counts.items() if n
    }


async def aborted(t: Transport, records: Sequence[Outgoing]) -> None:
    """Writes ``records`` in a transaction that is aborted: on Kafka they are in the log (with
    an abort marker) for read_committed to pass over; the memory broker never writes them."""
    if isinstance(t, MemoryTransport):
        t.broker.fail_next_commits = 1
        async with t.tx_producer(unique("tx")) as tx:
            with pytest.raises(TransportError):
                await tx.commit(records, {}, unique("g"))
        return
    from aiokafka import AIOKafkaProducer

    # Any Kafka transport (aiokafka's, librdkafka's) of the session's plaintext broker: the
    # aborted transaction is written by a client of its own, aiokafka's.
    bootstrap = getattr(t, "bootstrap_servers", None)
    assert isinstance(bootstrap, str), f"{t!r} names no broker to write to"
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=unique("tx"), acks="all"
    )
    await producer.start()
    try:
        await producer.begin_transaction()
        for r in records:
            await producer.send_and_wait(r.topic, r.value, key=r.key, partition=r.partition)
        await producer.abort_transaction()
    finally:
        await producer.stop()


async def committed(t: Transport, records: Sequence[Outgoing]) -> None:
    async with t.tx_producer(unique("tx")) as tx:
        await tx.commit(records, {}, unique("g"))


async def test_a_tail_never_returns_the_records_of_aborted_transactions(
    transport: Transport,
) -> None:
    topic = unique("aborted")
    await transport.ensure_topics([topic], 2)

    def batch(tag: str) -> list[Outgoing]:
        return [Outgoing(topic, b"k", f"{tag}-{i}".encode(), partition=i % 2) for i in range(4)]

    async with transport.tail(topic, {0: 0, 1: 0}) as tail:
        await committed(transport, batch("first"))
        await aborted(transport, batch("aborted"))
        await committed(transport, batch("last"))
        got = await poll_until(tail, 8)
        ends = await caught_up(tail)
        assert await tail.poll(0.3) == []
    values = by_partition(got)
    assert [v for _, v in values[0]] == [b"first-0", b"first-2", b"last-0", b"last-2"]
    assert [v for _, v in values[1]] == [b"first-1", b"first-3", b"last-1", b"last-3"]
    for p, records in values.items():
        offsets = [o for o, _ in records]
        assert offsets == sorted(offsets)
        assert ends[p] > offsets[-1]  # the end is past the last committed record (and markers)


async def test_end_offsets_are_the_ends_a_tail_reaches(transport: Transport) -> None:
    topic = unique("ends")
    await transport.ensure_topics([topic], 3)
    async with transport.tail(topic, dict.fromkeys(range(3), 0)) as tail:
        assert await tail.end_offsets() == {0: 0, 1: 0, 2: 0}
        await fill(transport, topic, {0: 4, 1: 1, 2: 6})
        with anyio.fail_after(20):
            while True:  # polling the broker: there is no event to wait on
                if await tail.end_offsets() == {0: 4, 1: 1, 2: 6}:
                    break
                await anyio.sleep(0.05)
        assert await tail.positions() == {0: 0, 1: 0, 2: 0}  # nothing read yet
        await poll_until(tail, 11)
        assert await tail.positions() == {0: 4, 1: 1, 2: 6}


async def test_records_appended_after_it_opened_arrive_without_reopening(
    transport: Transport,
) -> None:
    topic = unique("follow")
    await transport.ensure_topics([topic], 2)
    await fill(transport, topic, {0: 3, 1: 3})
    async with transport.tail(topic, {0: 3, 1: 3}) as tail:
        assert await tail.poll(0.3) == []
        for round_ in range(3):
            got: list[Record] = []

            async def follow(tail: Tail = tail, got: list[Record] = got) -> None:
                # Waiting longer than the test may take: the records must wake the poll.
                with anyio.fail_after(20):
                    while len(got) < 2:
                        got += await tail.poll(30)

            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                await anyio.sleep(0.1)  # the poll is waiting now
                async with transport.producer() as producer:
                    await producer.send(
                        [
                            Outgoing(topic, b"k", f"late-{round_}-{p}".encode(), partition=p)
                            for p in (0, 1)
                        ]
                    )
            assert sorted((r.partition, r.offset, r.value) for r in got) == [
                (p, 3 + round_, f"late-{round_}-{p}".encode()) for p in (0, 1)
            ]
        assert await caught_up(tail) == {0: 6, 1: 6}


async def test_a_sealed_transport_opens_what_its_tail_polls(transport: Transport) -> None:
    topic = unique("sealed")
    await transport.ensure_topics([topic], 1)
    sealed = SealedTransport(transport, AesGcmCodec({"k1": os.urandom(32)}, "k1"))
    plain = b'{"input":{"customer":"c-1"}}'
    async with sealed.producer() as producer:
        await producer.send([Outgoing(topic, b"saga-1", plain, partition=0)])
    async with sealed.tail(topic, {0: 0}) as tail:
        (opened,) = await poll_until(tail, 1)
        assert await caught_up(tail) == {0: 1}
    async with transport.tail(topic, {0: 0}) as tail:
        (raw,) = await poll_until(tail, 1)
    assert opened.value == plain
    assert opened.wire_value == raw.value
    assert raw.value is not None
    assert b"$sealed" in raw.value
    assert b"c-1" not in raw.value


async def test_an_open_transaction_holds_the_end_back(bootstrap: str) -> None:
    """Kafka only (the memory broker commits a transaction in one step, with no open state):
    records of a transaction not yet decided are neither returned nor counted in the end."""
    from aiokafka import AIOKafkaProducer

    from saga.adapters.kafka import KafkaTransport

    transport = KafkaTransport(bootstrap, deadline=20)
    topic = unique("open")
    await transport.ensure_topics([topic], 1)
    await fill(transport, topic, {0: 2})
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=unique("tx"), acks="all"
    )
    await producer.start()
    try:
        async with transport.tail(topic, {0: 0}) as tail:
            assert len(await poll_until(tail, 2)) == 2
            await producer.begin_transaction()
            for i in range(3):
                await producer.send_and_wait(topic, f"open-{i}".encode(), partition=0)
            assert await tail.end_offsets() == {0: 2}  # the last stable offset, not 5
            assert await tail.poll(0.5) == []
            await producer.commit_transaction()
            got = await poll_until(tail, 3)
            assert [r.value for r in got] == [f"open-{i}".encode() for i in range(3)]
            assert await caught_up(tail) == {0: 6}  # 2 + 3 records + the commit marker
    finally:
        await producer.stop()
