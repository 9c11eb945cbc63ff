"""The librdkafka transport on the secured broker (SASL_SSL, SCRAM, ACLs): the settings of
`KafkaSecurity` reach librdkafka, and refusals are named as the aiokafka adapter names them."""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import pytest

from deploy.kafka_secure import SecureKafka
from saga.adapters.rdkafka import RdKafkaTransport
from saga.errors import ConnectionFailed, Unauthorized
from saga.runtime.ports import Outgoing, Topics
from tests.integration.test_secure_connection import _other_ca, security

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def transport(broker: SecureKafka, principal: str, **override: object) -> RdKafkaTransport:
    return RdKafkaTransport(
        broker.bootstrap_servers, deadline=20, security=security(broker, principal, **override)
    )


@pytest.fixture
def prefix(kafka_secure: SecureKafka) -> str:
    """A fresh topic prefix whose ACLs are granted (service ``payment``)."""
    name = f"rdsec{uuid.uuid4().hex[:8]}"
    kafka_secure.grant(name, ["payment"])
    return name


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256"])
async def test_the_coordinator_principal_creates_produces_consumes_and_commits(
    kafka_secure: SecureKafka, prefix: str, mechanism: str
) -> None:
    t = transport(kafka_secure, "coordinator", sasl_mechanism=mechanism)
    await t.check()
    topics = Topics(prefix)
    await t.ensure_topics([topics.requests, topics.log, topics.commands("payment")], 1)
    assert await t.partitions(topics.log) == 1
    async with t.producer() as producer:
        await producer.send([Outgoing(topics.requests, b"k", b"request")])
    group = f"{prefix}.coordinator"
    async with t.consumer(group, [topics.requests]) as consumer:
        got: list[bytes | None] = []
        with anyio.fail_after(30):
            while not got:
                got = [r.value for r in await consumer.poll(0.5)]
        assert got == [b"request"]
        async with t.tx_producer(f"{prefix}.coordinator.0") as tx:
            offsets = await tx.commit(
                [Outgoing(topics.log, b"k", b"event")], {(topics.requests, 0): 1}, group
            )
    assert len(offsets) == 1
    with anyio.fail_after(20):
        while True:  # the commit markers are written after commit returns: poll for them
            if found := [r.value async for r in t.read(topics.log, 0)]:
                break
            await anyio.sleep(0.05)
    assert found == [b"event"]


async def test_a_service_cannot_create_topics_or_write_commands(
    kafka_secure: SecureKafka, prefix: str
) -> None:
    topics = Topics(prefix)
    await transport(kafka_secure, "coordinator").ensure_topics([topics.commands("payment")], 1)
    service = transport(kafka_secure, "payment")
    await service.ensure_topics([topics.commands("payment")], 1)  # exists: nothing to create
    with pytest.raises(Unauthorized) as caught:
        await service.ensure_topics([topics.commands("payment"), topics.dlq], 1)
    assert f"User:payment may not create the missing topics {topics.dlq}" in str(caught.value)
    with pytest.raises(Unauthorized) as denied:
        async with service.producer() as producer:
            await producer.send([Outgoing(topics.commands("payment"), b"k", b"forged")])
    assert f"User:payment lacks the Write right on topic '{topics.commands('payment')}'" in str(
        denied.value
    )
    assert denied.value.retriable is False


async def test_a_wrong_password_is_named_without_showing_it(kafka_secure: SecureKafka) -> None:
    wrong = "not-the-Password-42"
    t = transport(kafka_secure, "payment", sasl_password=wrong)
    with pytest.raises(Unauthorized) as caught:
        await t.check()
    message = str(caught.value)
    assert "refused the credentials of user 'payment'" in message
    assert "KAFKA_SASL_USERNAME / KAFKA_SASL_PASSWORD" in message
    assert wrong not in message
    assert kafka_secure.users["payment"] not in message


async def test_an_untrusted_broker_certificate_is_named(
    kafka_secure: SecureKafka, tmp_path: Path
) -> None:
    t = transport(kafka_secure, "payment", ssl_ca_location=_other_ca(tmp_path))
    with pytest.raises(ConnectionFailed) as caught:
        await t.check()
    assert "is not trusted by KAFKA_SSL_CA_LOCATION" in str(caught.value)
    assert caught.value.retriable is False
