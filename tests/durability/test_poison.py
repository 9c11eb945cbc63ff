"""Poison messages on every topic the engine reads go to the dead-letter topic, once each.

On the requests topic, the replies topic and each service's command topic we write messages
the engine must refuse: bytes that are not JSON, not UTF-8, an unknown schema version, unknown
fields, nesting deeper than 32, more bytes than the decoder accepts, and well-formed messages
that do not fit (an unknown saga, an unknown step, a reply from a service that does not own the
step, a command for another service, ...). All of them land on one partition, ahead of a valid
saga. Each must reach ``<prefix>.dlq`` exactly once, with its reason in the ``saga.dlq.reason``
header and its original bytes as the value, and the valid saga behind them must complete: a
poison message never stalls its partition.

The oversized case needs the broker to accept a message larger than the decoder's limit: with
the engine's default limit (1 MiB, Kafka's default too) that means raising the topics'
``max.message.bytes``; a second test uses a lower `Limits` in an in-process coordinator and
participants instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from saga import SagaClient, SagaStatus
from saga.adapters.kafka import KafkaTransport
from saga.core.codec import ENGINE_LIMITS, Limits
from saga.runtime.ports import Record, Topics
from tests.chaos.app import SERVICES
from tests.chaos.cluster import Cluster
from tests.chaos.inprocess import open_in_process
from tests.chaos.oracle import read_topic
from tests.chaos.workload import canary

pytestmark = pytest.mark.kafka

PARTITIONS = 3
POISONED = 1
"""Every poison message goes to this partition, ahead of the saga that must still flow."""
TOPIC_LIMIT = 4 * 1024 * 1024
"""``max.message.bytes`` of the poisoned topics, so that an oversized message gets in."""


@dataclass(frozen=True)
class Poison:
    """One bad message and the reason the engine must give for it."""

    topic: str
    key: bytes
    value: bytes
    reason: str
    what: str


def _key_on(transport: KafkaTransport, stem: str, partition: int = POISONED) -> str:
    """A key (saga id) that the default partitioner puts on ``partition``."""
    for i in range(10_000):
        key = f"{stem}-{i}"
        if transport.partition_for(key.encode(), PARTITIONS) == partition:
            return key
    raise AssertionError("no key found")


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"n": value}
    return value


def _start(saga_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "type": "start",
        "message_id": f"m-{saga_id}",
        "saga_id": saga_id,
        "saga_name": "chain",
        "input": {"plan": {}},
        "at": 1.0,
        **fields,
    }


def _reply(saga_id: str, step: str, service: str, **fields: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "type": "reply",
        "message_id": f"r-{saga_id}-{step}",
        "saga_id": saga_id,
        "step": step,
        "phase": "action",
        "attempt": 1,
        "service": service,
        "ok": True,
        "output": {},
        "at": 1.0,
        **fields,
    }


def _command(saga_id: str, service: str, action: str, **fields: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "type": "command",
        "message_id": f"c-{saga_id}-{action}",
        "saga_id": saga_id,
        "saga_name": "chain",
        "saga_version": 1,
        "step": action,
        "phase": "action",
        "service": service,
        "action": action,
        "attempt": 1,
        "idempotency_key": f"{saga_id}/{action}/action",
        "payload": {"plan": {}},
        "deadline_at": 4e9,
        "at": 1.0,
        **fields,
    }


def _bad_bytes(
    topic: str, key: bytes, valid: dict[str, Any], big: int, depth: int = 40
) -> list[Poison]:
    """The decoding failures, built around one valid message of the topic (``depth``: a
    nesting deeper than its reader accepts)."""
    raw = orjson.dumps(valid)
    return [
        Poison(topic, key, raw[: len(raw) // 2], "invalid_json", "truncated JSON"),
        Poison(topic, key, b'{"v": 1, "x": "\xff\xfe"}', "invalid_utf8", "invalid UTF-8"),
        Poison(topic, key, orjson.dumps({**valid, "v": 99}), "unknown_schema_version", "v=99"),
        Poison(topic, key, orjson.dumps({**valid, "sneaky": 1}), "invalid_message", "extra field"),
        Poison(
            topic, key, orjson.dumps({**valid, "v": 1, "deep": _nested(depth)}), "too_deep", "deep"
        ),
        Poison(topic, key, orjson.dumps({**valid, "pad": "x" * big}), "too_large", f"{big} bytes"),
    ]


def poisons(transport: KafkaTransport, prefix: str, known: str, big: int) -> list[Poison]:
    """Every poison message, all on partition `POISONED` of its topic.

    Args:
        known: A saga that exists (on the poisoned partition), for well-formed replies that do
            not fit it.
        big: Padding that makes a message larger than the decoder's limit.
    """
    t = Topics(prefix)
    ghost = _key_on(transport, "ghost")
    other = _key_on(transport, "other")
    k = known.encode()
    found: list[Poison] = []

    found += _bad_bytes(t.requests, ghost.encode(), _start(ghost), big)
    found += [
        Poison(t.requests, b"", b"", "empty", "no value"),
        Poison(t.requests, ghost.encode(), b"[1, 2, 3]", "not_an_object", "a JSON array"),
        Poison(
            t.requests,
            ghost.encode(),
            orjson.dumps({"v": 1, "type": "cancel", "message_id": "x", "saga_id": ghost, "at": 1}),
            "unknown_saga",
            "cancel an unknown saga",
        ),
        Poison(
            t.requests,
            other.encode(),
            orjson.dumps({"v": 1, "type": "cancel", "message_id": "y", "saga_id": known, "at": 1}),
            "wrong_key",
            "keyed by another saga",
        ),
    ]

    found += _bad_bytes(t.replies, ghost.encode(), _reply(ghost, "a", "alpha"), big)
    found += [
        Poison(
            t.replies,
            ghost.encode(),
            orjson.dumps(_reply(ghost, "a", "alpha")),
            "unknown_saga",
            "a reply for an unknown saga",
        ),
        Poison(
            t.replies,
            k,
            orjson.dumps(_reply(known, "no-such-step", "alpha")),
            "rejected",
            "a reply for an unknown step",
        ),
        Poison(
            t.replies,
            k,
            orjson.dumps(_reply(known, "a", "gamma")),
            "rejected",
            "a reply from a service that does not own the step",
        ),
    ]

    for service in SERVICES:
        topic = t.commands(service)
        elsewhere = next(s for s in SERVICES if s != service)
        # Commands are the engine's own records, read with its wider depth bound.
        deep = ENGINE_LIMITS.max_depth + 8
        found += _bad_bytes(topic, ghost.encode(), _command(ghost, service, "a"), big, deep)
        found += [
            Poison(
                topic,
                ghost.encode(),
                orjson.dumps(_command(ghost, elsewhere, "a")),
                "wrong_service",
                f"a command for {elsewhere} on {service}'s topic",
            ),
            Poison(
                topic,
                ghost.encode(),
                orjson.dumps(_command(ghost, service, "no-such-action")),
                "unknown_action",
                "an action nobody handles",
            ),
        ]
    return found


async def _create_topics(bootstrap: str, prefix: str) -> None:
    """The engine's topics, the poisoned ones with a raised ``max.message.bytes``."""
    t = Topics(prefix)
    roomy = [t.requests, t.replies, t.dlq] + [t.commands(s) for s in SERVICES]
    config = {"max.message.bytes": str(TOPIC_LIMIT)}
    topics = [NewTopic(n, PARTITIONS, 1, topic_configs=config) for n in roomy]
    topics += [NewTopic(t.log, PARTITIONS, 1), NewTopic(t.alerts, PARTITIONS, 1)]
    topics += [NewTopic(t.snapshots, PARTITIONS, 1, topic_configs={"cleanup.policy": "compact"})]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(topics)
    finally:
        await admin.close()


@asynccontextmanager
async def _producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, max_request_size=TOPIC_LIMIT, acks="all"
    )
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def _send(bootstrap: str, found: list[Poison]) -> dict[str, Poison]:
    """Writes the poison; returns it by ``topic/partition/offset`` (the DLQ source header)."""
    sent: dict[str, Poison] = {}
    async with _producer(bootstrap) as producer:
        for poison in found:
            meta = await producer.send_and_wait(
                poison.topic, poison.value, key=poison.key or None, partition=POISONED
            )
            sent[f"{meta.topic}/{meta.partition}/{meta.offset}"] = poison
    return sent


async def _dead_letters(transport: KafkaTransport, prefix: str, count: int) -> list[Record]:
    """The DLQ once it holds ``count`` records, and a moment longer (to catch any extra)."""
    found: list[Record] = []
    with anyio.move_on_after(60):
        while len(found) < count:
            found = await read_topic(transport, Topics(prefix).dlq)
            await anyio.sleep(0.5)
    await anyio.sleep(2)
    return await read_topic(transport, Topics(prefix).dlq)


def _check(records: list[Record], sent: dict[str, Poison]) -> None:
    problems = []
    seen: dict[str, int] = {}
    for record in records:
        headers = dict(record.headers)
        source = headers.get("saga.dlq.source", b"?").decode()
        reason = headers.get("saga.dlq.reason", b"?").decode()
        seen[source] = seen.get(source, 0) + 1
        poison = sent.get(source)
        if poison is None:
            problems.append(f"unexpected dead letter from {source}: {reason}")
            continue
        if reason != poison.reason:
            problems.append(f"{poison.topic} {poison.what}: reason {reason}, not {poison.reason}")
        truncated = headers.get("saga.dlq.truncated_from")
        if truncated is not None:
            # Too large to write whole: the head, with the full size and digest to match it by.
            import hashlib

            whole = poison.value or b""
            if (
                int(truncated) != len(whole)
                or not whole.startswith(record.value or b"")
                or (
                    headers.get("saga.dlq.sha256", b"").decode()
                    != hashlib.sha256(whole).hexdigest()
                )
            ):
                problems.append(f"{poison.topic} {poison.what}: the truncated copy does not match")
        elif record.value != poison.value:
            problems.append(f"{poison.topic} {poison.what}: the value is not the original bytes")
    for source, poison in sent.items():
        if seen.get(source, 0) != 1:
            times = seen.get(source, 0)
            problems.append(f"{poison.topic} {poison.what}: dead-lettered {times} times")
    assert not problems, "\n".join(problems)
    assert len(records) == len(sent)


@pytest.mark.anyio
async def test_poison_on_every_input_topic_is_dead_lettered_and_the_partition_flows(
    bootstrap: str, prefix: str, tmp_path: Path, make_cluster: Callable[..., Cluster]
) -> None:
    transport = KafkaTransport(bootstrap, deadline=20)
    await _create_topics(bootstrap, prefix)
    cluster = make_cluster(partitions=PARTITIONS)
    cluster.coordinator()
    cluster.participants()
    async with SagaClient(transport, prefix=prefix) as client:
        await canary(client)
        known = await client.start("chain", {"plan": {}}, _key_on(transport, "known"))
        assert (await client.wait(known, 60, poll=0.25)).status is SagaStatus.COMPLETED
        # The decoder's default limit is 1 MiB: one byte more is too large.
        found = poisons(transport, prefix, known, big=1024 * 1024)
        sent = await _send(bootstrap, [p for p in found if p.reason != "too_large"])
        flowing = await client.start("chain", {"plan": {}}, _key_on(transport, "flowing"))
        state = await client.wait(flowing, 60, poll=0.25)
        assert state.status is SagaStatus.COMPLETED, cluster.logs()
        # A start of an unknown definition is not poison: it is answered, as a rejected saga.
        nameless = await client.start("no-such-saga", {}, _key_on(transport, "nameless"))
        answer = await client.wait(nameless, 60, poll=0.25)
        assert answer.status is SagaStatus.REJECTED
        assert "no-such-saga" in (answer.reason or "")
    records = await _dead_letters(transport, prefix, len(sent))
    cluster.check()
    _check(records, sent)
    reasons = {p.reason for p in sent.values()}
    assert reasons >= {"invalid_json", "invalid_utf8", "unknown_schema_version", "too_deep"}


@pytest.mark.anyio
async def test_oversized_messages_are_dead_lettered_under_a_lower_limit(
    bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    transport = KafkaTransport(bootstrap, deadline=20)
    await _create_topics(bootstrap, prefix)
    limits = Limits(max_bytes=64 * 1024)
    async with open_in_process(
        transport, prefix, PARTITIONS, tmp_path / "ledger.db", limits=limits
    ) as coordinator:
        known = await coordinator.start("chain", {"plan": {}}, _key_on(transport, "known"))
        assert (await coordinator.wait(known, 60)).status is SagaStatus.COMPLETED
        found = poisons(transport, prefix, known, big=limits.max_bytes)
        sent = await _send(bootstrap, [p for p in found if p.reason == "too_large"])
        flowing = await coordinator.start("chain", {"plan": {}}, _key_on(transport, "flowing"))
        assert (await coordinator.wait(flowing, 60)).status is SagaStatus.COMPLETED
        records = await _dead_letters(transport, prefix, len(sent))
    assert len(sent) == 2 + len(SERVICES)
    _check(records, sent)


# Cancelled while it retries the stuck partition, the coordinator leaves a producer unclosed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.anyio
async def test_message_over_one_mib_is_dead_lettered_with_the_default_limit(
    bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    transport = KafkaTransport(bootstrap, deadline=20)
    await _create_topics(bootstrap, prefix)
    async with open_in_process(
        transport, prefix, PARTITIONS, tmp_path / "ledger.db"
    ) as coordinator:
        known = await coordinator.start("chain", {"plan": {}}, _key_on(transport, "known"))
        assert (await coordinator.wait(known, 60)).status is SagaStatus.COMPLETED
        found = poisons(transport, prefix, known, big=1024 * 1024)
        oversized = [p for p in found if p.reason == "too_large" and p.topic.endswith("requests")]
        sent = await _send(bootstrap, oversized)
        flowing = await coordinator.start("chain", {"plan": {}}, _key_on(transport, "flowing"))
        state = await coordinator.wait(flowing, 10)
        assert state.status is SagaStatus.COMPLETED
        records = await _dead_letters(transport, prefix, len(sent))
    _check(records, sent)
