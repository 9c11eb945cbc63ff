"""The local broker does what the engine needs: topics, transactional read-process-write,
and surviving a crash with its data (the chaos tests kill and restart it).

These tests exercise Kafka and aiokafka, not the engine: when they fail, the infrastructure
(or the client library) is at fault, not the saga code.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from deploy.kafka import start_kafka

pytestmark = pytest.mark.anyio


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def _create_topics(bootstrap: str, *names: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, num_partitions=1, replication_factor=1) for name in names]
        )
    finally:
        await admin.close()


@asynccontextmanager
async def _consumer(
    bootstrap: str, *topics: str, **config: object
) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(
        *topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest", **config
    )
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def _drain(consumer: AIOKafkaConsumer, want: int, timeout: float = 20.0) -> list[bytes]:
    """Reads until `want` values arrived, then one more short poll to catch any extras."""
    values: list[bytes] = []
    with anyio.fail_after(timeout):
        while len(values) < want:
            batches = await consumer.getmany(timeout_ms=500)
            values += [rec.value for recs in batches.values() for rec in recs]
    batches = await consumer.getmany(timeout_ms=1000)
    values += [rec.value for recs in batches.values() for rec in recs]
    return values


async def test_create_topic_produce_and_consume(bootstrap: str) -> None:
    topic = _name("infra-plain")
    await _create_topics(bootstrap, topic)

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(topic, f"m{i}".encode(), key=b"k")
    finally:
        await producer.stop()

    async with _consumer(bootstrap, topic) as consumer:
        values = await _drain(consumer, 5)
    assert values == [f"m{i}".encode() for i in range(5)]


async def test_transactions_hide_aborted_records_and_commit_offsets(bootstrap: str) -> None:
    source, sink, group = _name("infra-in"), _name("infra-out"), _name("infra-group")
    await _create_topics(bootstrap, source, sink)

    plain = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await plain.start()
    try:
        for i in range(4):
            await plain.send_and_wait(source, f"in{i}".encode())
    finally:
        await plain.stop()

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=_name("infra-tx"), enable_idempotence=True
    )
    await producer.start()
    try:
        async with _consumer(
            bootstrap, source, group_id=group, enable_auto_commit=False,
            isolation_level="read_committed",
        ) as inputs:  # fmt: skip
            records: list[ConsumerRecord[bytes, bytes]] = []
            with anyio.fail_after(20):
                while len(records) < 4:
                    batches = await inputs.getmany(timeout_ms=500)
                    records += [rec for recs in batches.values() for rec in recs]
            assert [r.value for r in records] == [f"in{i}".encode() for i in range(4)]
            tp = TopicPartition(source, 0)

            # Transaction 1 processes in0..in1 and commits the outputs with the offsets.
            async with producer.transaction():
                for rec in records[:2]:
                    await producer.send(sink, b"ok-" + rec.value)
                await producer.send_offsets_to_transaction({tp: records[1].offset + 1}, group)

            # Transaction 2 processes in2..in3 and aborts: neither outputs nor offsets count.
            await producer.begin_transaction()
            for rec in records[2:]:
                await producer.send(sink, b"aborted-" + rec.value)
            await producer.send_offsets_to_transaction({tp: records[3].offset + 1}, group)
            await producer.abort_transaction()

            committed = await inputs.committed(tp)
    finally:
        await producer.stop()

    assert committed == records[1].offset + 1 == 2

    async with _consumer(bootstrap, sink, isolation_level="read_committed") as reader:
        seen_committed = await _drain(reader, 2)
    assert seen_committed == [b"ok-in0", b"ok-in1"]

    # The aborted records are in the log: an uncommitted reader sees them. This shows the
    # assertion above can fail, i.e. the broker really is filtering by transaction outcome.
    async with _consumer(bootstrap, sink, isolation_level="read_uncommitted") as reader:
        seen_all = await _drain(reader, 4)
    assert seen_all == [b"ok-in0", b"ok-in1", b"aborted-in2", b"aborted-in3"]


async def test_killed_broker_restarts_on_its_data_and_pause_freezes_it() -> None:
    # Its own broker: killing the session one would disturb the other tests.
    with start_kafka() as server:
        topic = _name("infra-restart")
        await _create_topics(server.bootstrap_servers, topic)
        producer = AIOKafkaProducer(bootstrap_servers=server.bootstrap_servers, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"before-crash")
        finally:
            await producer.stop()

        old_pid = server.pid
        server.kill()
        assert not server.running
        await anyio.to_thread.run_sync(server.start)
        assert server.pid != old_pid

        async with _consumer(server.bootstrap_servers, topic) as consumer:
            assert await _drain(consumer, 1) == [b"before-crash"]

        server.pause()
        try:
            assert not await anyio.to_thread.run_sync(server.ping, 1.0)
        finally:
            server.resume()
        assert await anyio.to_thread.run_sync(server.ping)
