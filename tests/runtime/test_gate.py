"""The trust boundary with payload sealing, on the memory transport (the properties themselves
are tried on the secured broker in tests/integration/test_trust_boundary.py).

Sealed, then signed: the signature covers the bytes written (the ciphertext), so a signed
record still verifies after the transport opened it, and nobody holding the public keyring can
test guesses of a sealed field against a signature over its plaintext. A record whose sealed
payload cannot be opened is set aside as ``unsealable``; a record on another partition than
its saga's as ``wrong_partition``.
"""

from __future__ import annotations

from typing import Any

import anyio
import orjson
import pytest

from saga import Coordinator, Participant, SagaClient, SagaDefinition, SagaStatus, Step
from saga.adapters.memory import MemoryBroker, MemoryTransport
from saga.adapters.sealing import AesGcmCodec, SealedTransport
from saga.core.codec import encode
from saga.core.messages import StartSaga
from saga.core.policy import parse_policy
from saga.runtime.dlq import REASON_HEADER
from saga.runtime.ports import Outgoing, Record, Topics
from saga.runtime.trust import Keyring, SigningKey, Trust, new_key

pytestmark = pytest.mark.anyio

TOPICS = Topics("saga")
SECRET = "wombat-3c1d-secret"
ORDER = SagaDefinition(
    name="order",
    steps=[Step(name="pay", service="bank", action="charge", compensation="refund")],
)
POLICY = """
version: 1
coordinators: [coordinator]
services: {bank: [bank]}
rules:
  - {who: [shop], may: [start], sagas: [order]}
"""


def _keys() -> tuple[dict[str, SigningKey], Keyring]:
    keys = {p: new_key(p) for p in ("coordinator", "bank", "shop")}
    return keys, Keyring(k.public_entry() for k in keys.values())


def _bank() -> Participant:
    bank = Participant("bank")

    @bank.handler("charge")
    async def charge(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {"receipt": f"r-{payload['card']}"}

    @bank.handler("refund")
    async def refund(payload: dict[str, Any], ctx: Any) -> None:
        return None

    return bank


def _dead(broker: MemoryBroker) -> list[Record]:
    return broker.records(TOPICS.dlq) if TOPICS.dlq in broker.topics else []


async def _until_dead(broker: MemoryBroker) -> None:
    with anyio.fail_after(10):
        while True:
            if _dead(broker):
                return
            await anyio.sleep(0.01)


async def test_sealed_and_signed_sagas_run_and_the_signatures_cover_the_ciphertext() -> None:
    broker = MemoryBroker()
    sealed = SealedTransport(MemoryTransport(broker), AesGcmCodec({"k1": b"k" * 32}, "k1"))
    keys, ring = _keys()
    policy = parse_policy(POLICY)
    coordinator = Coordinator(
        [ORDER],
        transport=sealed,
        partitions=2,
        trust=Trust.signed(keys["coordinator"], ring, policy),
    )
    async with (
        coordinator,
        _bank().serving(sealed, partitions=2, trust=Trust.signed(keys["bank"], ring, policy)),
        SagaClient(sealed, partitions=2, signer=keys["shop"]) as shop,
    ):
        saga_id = await shop.start("order", {"card": SECRET})
        state = await coordinator.wait(saga_id, 10)
    assert state.status is SagaStatus.COMPLETED
    assert state.steps["pay"].output == {"receipt": f"r-{SECRET}"}
    assert _dead(broker) == []
    for topic in (TOPICS.requests, TOPICS.commands("bank"), TOPICS.replies):
        (record,) = broker.records(topic)
        assert SECRET.encode() not in (record.value or b"")
        # What was signed is what the broker holds: it verifies as it is, not only opened.
        assert ring.verify(record) in {"shop", "coordinator", "bank"}


async def test_a_payload_that_cannot_be_opened_is_set_aside_as_unsealable() -> None:
    broker = MemoryBroker()
    old = SealedTransport(MemoryTransport(broker), AesGcmCodec({"k1": b"a" * 32}, "k1"))
    new = SealedTransport(MemoryTransport(broker), AesGcmCodec({"k2": b"b" * 32}, "k2"))
    async with Coordinator([ORDER], transport=new, partitions=1) as coordinator:
        start = StartSaga(message_id="m", saga_id="lost", saga_name="order", input={}, at=0.0)
        # Sealed under a key the coordinator does not have (k1 was dropped too early).
        async with old.producer() as producer:
            value = encode(start.model_copy(update={"input": {"card": SECRET}}))
            await producer.send([Outgoing(TOPICS.requests, b"lost", value)])
        await _until_dead(broker)
        assert await coordinator.status("lost") is None
    (dead,) = _dead(broker)
    assert dead.header(REASON_HEADER) == "unsealable"
    assert "k1" in (dead.header("saga.dlq.detail") or "")


async def test_a_record_on_another_partition_than_its_saga_is_set_aside() -> None:
    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    async with Coordinator([ORDER], transport=transport, partitions=2):
        home = transport.partition_for(b"elsewhere", 2)
        start = StartSaga(message_id="m", saga_id="elsewhere", saga_name="order", input={}, at=0)
        async with transport.producer() as producer:
            await producer.send(
                [Outgoing(TOPICS.requests, b"elsewhere", encode(start), partition=1 - home)]
            )
        await _until_dead(broker)
    (dead,) = _dead(broker)
    assert dead.header(REASON_HEADER) == "wrong_partition"
    assert orjson.loads(dead.value or b"")["saga_id"] == "elsewhere"
