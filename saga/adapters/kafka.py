"""The transport port on Apache Kafka, with aiokafka. The only module that imports aiokafka.

Choices that the engine's guarantees depend on:

- Consumers read ``read_committed``, start from the earliest offset, never auto-commit, and use
  the range assignor, which gives partition p of every subscribed topic to the same member:
  that keeps the co-partitioned requests, replies and log of one saga on one coordinator
  (aiokafka's default, round-robin, would not).
- A transactional producer sends its offsets once per transaction (aiokafka #1098) and every
  broker call runs under our own deadline: idempotent sends can otherwise wait through an outage
  for as long as the broker is gone.
- A producer that was fenced, or whose transaction failed, is closed and not reused; the caller
  opens a new one, which also aborts whatever the old one left open.
- Keys are partitioned with murmur2, as Kafka's Java clients and aiokafka's default partitioner
  do, so producers in any language agree on a saga's partition.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTP
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError, ProducerFenced, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from saga.errors import Fenced, TransportError
from saga.runtime.ports import Outgoing, RebalanceListener, Record, TopicPartition

__all__ = ["KafkaTransport"]

log = logging.getLogger(__name__)


class KafkaTransport:
    """The transport port on a Kafka cluster.

    Args:
        bootstrap_servers: ``host:port[,host:port...]``.
        deadline: Seconds any one broker operation (a send, a transaction, a read) may take
            before it fails with `TransportError`.
        client_id: Prefix for client ids, shown in broker logs.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        deadline: float = 30.0,
        client_id: str = "saga",
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.deadline = deadline
        self.client_id = client_id
        self._partition_counts: dict[str, int] = {}

    # -- topics ------------------------------------------------------------------------------

    async def ensure_topics(
        self, names: Sequence[str], partitions: int, compacted: Sequence[str] = ()
    ) -> None:
        """Creates missing topics (replication factor 1 on a single broker, else 3 at most).

        With three replicas a topic takes ``min.insync.replicas=2``: an ``acks=all`` write (every
        send and transaction of the engine) is then on two brokers before it is acknowledged, and
        one broker may fail without stopping writes. Otherwise the broker's default applies.

        Raises:
            TransportError: The broker could not be reached or refused (whatever failed).
        """
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
        try:
            with anyio.fail_after(self.deadline):
                await admin.start()
            with anyio.fail_after(self.deadline):
                existing = set(await admin.list_topics())
                brokers = len((await admin.describe_cluster())["brokers"])
                replication = min(3, brokers)
                durability = {"min.insync.replicas": "2"} if replication == 3 else {}
                wanted = [
                    NewTopic(
                        name=n,
                        num_partitions=partitions,
                        replication_factor=replication,
                        topic_configs={
                            **durability,
                            **({"cleanup.policy": "compact"} if n in compacted else {}),
                        },
                    )
                    for n in names
                    if n not in existing
                ]
                if wanted:
                    # Another process may create them first: the outcome is the same.
                    with contextlib.suppress(TopicAlreadyExistsError):
                        await admin.create_topics(wanted)
        except Exception as exc:
            # Not only TimeoutError: the admin client's start raises KafkaError, OSError, and
            # during a broker restart whatever aiokafka meets. The callers retry on this one.
            raise TransportError(
                f"could not create topics at {self.bootstrap_servers}: {exc!r}"
            ) from exc
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await _close_quietly(admin)

    async def partitions(self, topic: str) -> int:
        """The number of partitions of ``topic`` (cached: partition counts do not shrink)."""
        if topic not in self._partition_counts:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
            try:
                with anyio.fail_after(self.deadline):
                    await admin.start()
                    # Listing all topics never creates one; describing a missing topic does on
                    # brokers with auto.create.topics.enable, with one partition: so look first.
                    # A topic created a moment ago may take a little while to be listed.
                    listed = False
                    for _ in range(30):  # polling the broker for about 3 s: no event to wait on
                        if listed := topic in await admin.list_topics():
                            break
                        await anyio.sleep(0.1)
                    if not listed:
                        raise TransportError(
                            f"topic {topic!r} does not exist: start a coordinator with this "
                            "prefix first, or check the prefix"
                        )
                    while True:
                        (described,) = await admin.describe_topics([topic])
                        found = described.get("partitions") or []
                        if described.get("error_code", 0) == 0 and found:
                            break
                        await anyio.sleep(0.1)  # leaders are still being elected
            except (TimeoutError, KafkaError, OSError) as exc:
                raise TransportError(f"could not describe topic {topic!r}: {exc!r}") from exc
            finally:
                await admin.close()
            self._partition_counts[topic] = len(found)
        return self._partition_counts[topic]

    def partition_for(self, key: bytes, partitions: int) -> int:
        """Kafka's default partitioner: murmur2 of the key."""
        return int(murmur2(key) & 0x7FFFFFFF) % partitions

    # -- consuming ---------------------------------------------------------------------------

    @asynccontextmanager
    async def consumer(
        self,
        group_id: str,
        topics: Sequence[str],
        listener: RebalanceListener | None = None,
    ) -> AsyncIterator[_KafkaConsumer]:
        """A ``read_committed`` group member; leaves the group cleanly on exit."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=group_id,
            client_id=f"{self.client_id}-{group_id}",
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            partition_assignment_strategy=(RangePartitionAssignor,),
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
            max_poll_interval_ms=120_000,
            metadata_max_age_ms=30_000,
            fetch_max_wait_ms=50,  # replies wait on this: a long poll would add latency per step
        )
        consumer.subscribe(list(topics), listener=_Listener(listener))
        await _start(consumer, self.deadline, f"consumer of group {group_id!r}")
        try:
            yield _KafkaConsumer(consumer, self.deadline)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.deadline):
                await consumer.stop()  # also leaves the group, so a rebalance starts at once

    async def read(self, topic: str, partition: int, start: int = 0) -> AsyncIterator[Record]:
        """Reads committed records of one partition from ``start`` up to its end now."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            isolation_level="read_committed",
            enable_auto_commit=False,
            client_id=f"{self.client_id}-reader",
        )
        tp = KafkaTP(topic, partition)
        await _start(consumer, self.deadline, f"reader of {topic}/{partition}")
        try:
            consumer.assign([tp])
            with anyio.fail_after(self.deadline):
                end = (await consumer.end_offsets([tp]))[tp]
            if start >= end:
                return
            consumer.seek(tp, start)
            while True:
                with anyio.fail_after(self.deadline):
                    batch = await consumer.getmany(tp, timeout_ms=200, max_records=1000)
                for msg in batch.get(tp, []):
                    if msg.offset >= end:
                        return
                    yield _record(msg)
                with anyio.fail_after(self.deadline):
                    if await consumer.position(tp) >= end:
                        return
        except (KafkaError, TimeoutError) as exc:
            raise TransportError(f"reading {topic}/{partition} failed: {exc!r}") from exc
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.deadline):
                await consumer.stop()

    # -- producing ---------------------------------------------------------------------------

    @asynccontextmanager
    async def producer(self) -> AsyncIterator[_KafkaProducer]:
        """An idempotent producer (acks=all)."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=f"{self.client_id}-producer",
            enable_idempotence=True,
            acks="all",
            linger_ms=2,
        )
        await _start(producer, self.deadline, "producer")
        try:
            yield _KafkaProducer(producer, self.deadline)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.deadline):
                await producer.stop()

    @asynccontextmanager
    async def tx_producer(self, transactional_id: str) -> AsyncIterator[_KafkaTxProducer]:
        """A transactional producer. Starting it fences older producers with the same id and
        aborts their open transaction, so a reader started afterwards sees a settled log."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=f"{self.client_id}-{transactional_id}",
            transactional_id=transactional_id,
            enable_idempotence=True,
            acks="all",
            transaction_timeout_ms=60_000,
        )
        try:
            with anyio.fail_after(self.deadline):
                await producer.start()
        except ProducerFenced as exc:
            raise Fenced(str(exc)) from exc
        except Exception as exc:
            # Not only KafkaError: during a broker restart aiokafka has been seen to fail its
            # bootstrap with an AssertionError. Whatever it is, the caller retries the take-over.
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await _stop_quietly(producer)
            raise TransportError(f"could not start producer {transactional_id!r}: {exc!r}") from exc
        try:
            yield _KafkaTxProducer(producer, self.deadline)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.deadline):
                await producer.stop()


async def _start(client: AIOKafkaConsumer | AIOKafkaProducer, deadline: float, what: str) -> None:
    try:
        with anyio.fail_after(deadline):
            await client.start()
    except Exception as exc:  # see tx_producer: aiokafka does not only raise KafkaError here
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await _stop_quietly(client)
        raise TransportError(f"could not start the {what}: {exc!r}") from exc


def _record(msg: Any) -> Record:
    return Record(
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        key=msg.key,
        value=msg.value,
        headers=tuple(msg.headers or ()),
        timestamp=msg.timestamp / 1000,
    )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, inner: RebalanceListener | None) -> None:
        self.inner = inner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        if self.inner is not None:
            await self.inner.on_revoked(frozenset((tp.topic, tp.partition) for tp in revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if self.inner is not None:
            await self.inner.on_assigned(frozenset((tp.topic, tp.partition) for tp in assigned))


class _KafkaConsumer:
    def __init__(self, consumer: AIOKafkaConsumer, deadline: float) -> None:
        self._c = consumer
        self._deadline = deadline

    async def poll(self, timeout: float, max_records: int = 500) -> list[Record]:
        batches = await self._c.getmany(timeout_ms=int(timeout * 1000), max_records=max_records)
        return [_record(m) for msgs in batches.values() for m in msgs]

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset((tp.topic, tp.partition) for tp in self._c.assignment())

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if not offsets:
            return
        try:
            with anyio.fail_after(self._deadline):
                await self._c.commit({KafkaTP(t, p): o for (t, p), o in offsets.items()})
        except (KafkaError, TimeoutError) as exc:
            raise TransportError(f"offset commit failed: {exc}") from exc

    async def seek_to_committed(self, partitions: frozenset[TopicPartition]) -> None:
        owned = self.assignment()
        try:
            for t, p in partitions & owned:
                tp = KafkaTP(t, p)
                with anyio.fail_after(self._deadline):
                    committed = await self._c.committed(tp)
                if committed is None:
                    await self._c.seek_to_beginning(tp)
                else:
                    self._c.seek(tp, committed)
        except (KafkaError, TimeoutError) as exc:
            raise TransportError(f"rewinding to the committed offsets failed: {exc!r}") from exc


class _KafkaProducer:
    def __init__(self, producer: AIOKafkaProducer, deadline: float) -> None:
        self._p = producer
        self._deadline = deadline

    async def send(self, records: Sequence[Outgoing]) -> None:
        try:
            with anyio.fail_after(self._deadline):
                futures = [
                    await self._p.send(
                        r.topic, r.value, key=r.key, partition=r.partition, headers=list(r.headers)
                    )
                    for r in records
                ]
                for f in futures:
                    await f
        except (KafkaError, TimeoutError) as exc:
            raise TransportError(f"send failed: {exc!r}") from exc


class _KafkaTxProducer:
    def __init__(self, producer: AIOKafkaProducer, deadline: float) -> None:
        self._p = producer
        self._deadline = deadline
        self._broken: str | None = None

    async def commit(
        self,
        records: Sequence[Outgoing],
        offsets: Mapping[TopicPartition, int],
        group_id: str,
    ) -> list[int]:
        if self._broken:
            raise TransportError(f"producer unusable after an earlier failure: {self._broken}")
        p = self._p
        try:
            with anyio.fail_after(self._deadline):
                await p.begin_transaction()
                try:
                    futures = [
                        await p.send(
                            r.topic,
                            r.value,
                            key=r.key,
                            partition=r.partition,
                            headers=list(r.headers),
                        )
                        for r in records
                    ]
                    if offsets:
                        await p.send_offsets_to_transaction(
                            {KafkaTP(t, n): o for (t, n), o in offsets.items()}, group_id
                        )
                    await p.commit_transaction()
                except BaseException:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                        await _abort_quietly(p)
                    raise
            return [(await f).offset for f in futures]
        except ProducerFenced as exc:
            self._broken = "fenced"
            raise Fenced(str(exc)) from exc
        except Exception as exc:
            # Not only KafkaError: a producer that learns it was fenced after beginning the
            # transaction raises IllegalOperation from send. Whatever it is, the transaction
            # did not commit; the coordinator drops the partition and re-reads the log.
            self._broken = repr(exc)
            raise TransportError(f"transaction aborted: {exc!r}") from exc


async def _stop_quietly(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    try:
        await client.stop()
    except Exception as exc:  # it failed to start; stopping is only tidying up
        log.debug("stopping a client that failed to start also failed: %r", exc)


async def _close_quietly(admin: AIOKafkaAdminClient) -> None:
    try:
        await admin.close()
    except Exception as exc:  # the original error, if any, is the one worth raising
        log.debug("closing an admin client also failed: %r", exc)


async def _abort_quietly(producer: AIOKafkaProducer) -> None:
    # Best effort: a fenced or fatally failed producer refuses to abort (aiokafka asserts on the
    # state transition). It is discarded either way, and the broker aborts its transaction when
    # a new producer with the same id starts or the transaction times out.
    try:
        await producer.abort_transaction()
    except Exception as exc:  # the original error is the one worth raising
        log.debug("abort after a failed transaction also failed: %r", exc)
