"""The transport contract (tests/contract/test_transport.py and test_transport_tail.py) against
the librdkafka transport.

Every ``test_*`` of those modules that takes the ``transport`` fixture runs here too, with this
module's fixture: the librdkafka transport on the session broker. The scenarios are taken by
name, so a test added there runs here without a change; the checks only the librdkafka adapter
needs follow.
"""

from __future__ import annotations

import inspect
import re
import uuid

import anyio
import pytest

from saga.adapters.kafka_settings import KafkaSecurity, KafkaSettingsError
from saga.adapters.rdkafka import RdKafkaTransport
from saga.errors import ConnectionFailed, TransportError
from saga.runtime.ports import Outgoing, Record, TopicPartition
from tests.contract import test_transport, test_transport_tail

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

# The shared scenarios that take the `transport` fixture, collected as this module's tests
# (they resolve `transport` here); those that build their own transport are not repeated.
for _suite in (test_transport, test_transport_tail):
    for _name in dir(_suite):
        _scenario = getattr(_suite, _name)
        if _name.startswith("test_") and "transport" in inspect.signature(_scenario).parameters:
            assert _name not in globals(), f"two shared scenarios are called {_name}"
            globals()[_name] = _scenario


@pytest.fixture
def transport(bootstrap: str) -> RdKafkaTransport:
    return RdKafkaTransport(bootstrap, deadline=20)


def unique(name: str) -> str:
    return f"rdkafka-{name}-{uuid.uuid4().hex[:8]}"


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
    transport = RdKafkaTransport("127.0.0.1:9")  # nothing is connected: partitioning is local
    for key, hashed in JAVA_MURMUR2.items():
        for count in (1, 3, 6, 7, 64):
            assert transport.partition_for(key, count) == (hashed & 0x7FFFFFFF) % count


def test_partition_for_agrees_with_the_aiokafka_transport() -> None:
    from saga.adapters.kafka import KafkaTransport

    ours, theirs = RdKafkaTransport("127.0.0.1:9"), KafkaTransport("127.0.0.1:9")
    for i in range(500):
        key = f"saga-{uuid.UUID(int=i)}".encode()
        assert ours.partition_for(key, 12) == theirs.partition_for(key, 12)


def test_oauthbearer_is_refused_with_the_alternative_named() -> None:
    security = KafkaSecurity(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="OAUTHBEARER",
        sasl_oauthbearer_token_provider="tests.contract.wire:nothing",
    )
    with pytest.raises(KafkaSettingsError, match="use the aiokafka client"):
        RdKafkaTransport("127.0.0.1:9", security=security)


async def test_check_names_an_unreachable_broker() -> None:
    transport = RdKafkaTransport("127.0.0.1:9", deadline=3)
    with pytest.raises(
        ConnectionFailed, match=re.escape("cannot reach Kafka at 127.0.0.1:9")
    ) as caught:
        await transport.check()
    assert caught.value.retriable


async def test_check_passes_on_the_broker(transport: RdKafkaTransport) -> None:
    await transport.check()


class _Seen:
    """A listener that commits and rewinds from inside its callbacks, as the coordinator may:
    those consumer calls must not wait for the poll that is waiting for the listener."""

    def __init__(self) -> None:
        self.consumer: object = None
        self.events: list[tuple[str, frozenset[TopicPartition]]] = []

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        self.events.append(("revoked", partitions))
        await self.consumer.commit({tp: 1 for tp in partitions})  # type: ignore[attr-defined]

    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        assert self.consumer is not None
        assert self.consumer.assignment() == partitions  # type: ignore[attr-defined]
        await self.consumer.seek_to_committed(partitions)  # type: ignore[attr-defined]
        self.events.append(("assigned", partitions))


async def test_the_listener_may_use_the_consumer_inside_a_rebalance(
    transport: RdKafkaTransport,
) -> None:
    topic, group = unique("listen"), unique("g")
    await transport.ensure_topics([topic], 2)
    async with transport.producer() as producer:
        await producer.send([Outgoing(topic, None, b"%d" % i, partition=i % 2) for i in range(6)])
    seen = _Seen()
    async with transport.consumer(group, [topic], seen) as one:
        seen.consumer = one
        got: list[Record] = []
        with anyio.fail_after(30):
            while len(got) < 6:
                got += await one.poll(0.2)
        assert seen.events == [("assigned", frozenset({(topic, 0), (topic, 1)}))]
        async with transport.consumer(group, [topic]) as two:
            with anyio.fail_after(30):
                while not (one.assignment() and two.assignment()):
                    await one.poll(0.1)
                    await two.poll(0.1)
    # The revocation committed offset 1 of both partitions from inside the callback; the
    # new assignment (one partition each) rewound to it, also from inside.
    assert seen.events[1] == ("revoked", frozenset({(topic, 0), (topic, 1)}))
    kinds = [kind for kind, _ in seen.events]
    assert kinds[:3] == ["assigned", "revoked", "assigned"]
    async with transport.consumer(group, [topic]) as again:
        resumed: list[Record] = []
        with anyio.fail_after(30):
            while len(resumed) < 4:
                resumed += await again.poll(0.2)
    assert sorted(r.offset for r in resumed) == [1, 1, 2, 2]


async def test_a_record_too_large_aborts_its_transaction(transport: RdKafkaTransport) -> None:
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
        while True:  # the commit markers are written after commit returns: poll for them
            if found := [r async for r in transport.read(dst, 0)]:
                break
            await anyio.sleep(0.05)
    assert [r.value for r in found] == [b"after"]


async def test_a_missing_topic_is_named(transport: RdKafkaTransport) -> None:
    with pytest.raises(TransportError, match="does not exist"):
        await transport.partitions(unique("missing"))


async def test_a_tail_follows_from_its_offsets_and_reaches_the_end(
    transport: RdKafkaTransport,
) -> None:
    topic, tid = unique("tail"), unique("tx")
    await transport.ensure_topics([topic], 2)
    async with transport.tx_producer(tid) as tx:
        await tx.commit([Outgoing(topic, b"k", b"%d" % i, partition=0) for i in range(3)], {}, "g")
        await tx.commit([Outgoing(topic, b"k", b"p1", partition=1)], {}, "g")
    async with transport.tail(topic, {0: 1, 1: 0}) as tail:
        got: list[Record] = []
        with anyio.fail_after(20):
            while True:  # the markers are written after the commits returned: poll for them
                got += await tail.poll(0.2)
                ends = await tail.end_offsets()
                if len(got) >= 3 and await tail.positions() == ends:
                    break
        assert sorted((r.partition, r.value) for r in got) == [(0, b"1"), (0, b"2"), (1, b"p1")]
        # Past the transaction markers: the end that read_committed reaches.
        assert ends == {0: 4, 1: 2}
        async with transport.tx_producer(tid) as tx:
            await tx.commit([Outgoing(topic, b"k", b"later", partition=1)], {}, "g")
        more: list[Record] = []
        with anyio.fail_after(20):
            while not more:
                more = await tail.poll(0.2)
        assert [(r.partition, r.offset, r.value) for r in more] == [(1, 2, b"later")]


async def test_aborted_records_are_passed_over_by_a_tail(transport: RdKafkaTransport) -> None:
    from confluent_kafka import Producer

    topic = unique("aborted")
    await transport.ensure_topics([topic], 1)
    async with transport.tx_producer(unique("tx")) as tx:
        await tx.commit([Outgoing(topic, b"k", b"before", partition=0)], {}, "g")
    raw = Producer(
        {"bootstrap.servers": transport.bootstrap_servers, "transactional.id": unique("raw")}
    )
    raw.init_transactions(20)
    raw.begin_transaction()
    for i in range(3):
        raw.produce(topic, b"aborted-%d" % i, b"k", partition=0)
    raw.flush(20)  # in the log, then aborted: read_committed must pass over them
    raw.abort_transaction(20)
    raw.close()
    async with transport.tx_producer(unique("tx")) as tx:
        await tx.commit([Outgoing(topic, b"k", b"after", partition=0)], {}, "g")
    async with transport.tail(topic, {0: 0}) as tail:
        got: list[Record] = []
        with anyio.fail_after(20):
            while True:  # the markers are written after the commits returned: poll for them
                got += await tail.poll(0.2)
                ends = await tail.end_offsets()
                if await tail.positions() == ends and len(got) >= 2:
                    break
    assert [r.value for r in got] == [b"before", b"after"]
    assert ends == {0: 8}  # 1 + marker, 3 aborted + marker, 1 + marker
