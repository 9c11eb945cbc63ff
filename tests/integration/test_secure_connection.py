"""The Kafka adapter on the secured broker (SASL_SSL, SCRAM, ACLs): it connects, works as the
coordinator's principal, and says clearly why when it cannot connect or is not allowed."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import uuid
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from deploy.kafka_secure import SecureKafka
from saga.adapters.kafka import ConnectionFailed, KafkaSecurity, KafkaTransport, Unauthorized
from saga.runtime.ports import Outgoing, Topics

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


def security(broker: SecureKafka, principal: str, **override: object) -> KafkaSecurity:
    values = KafkaSecurity.env_values(broker.client_env(principal))
    return KafkaSecurity(**{**values, **override})


def transport(broker: SecureKafka, principal: str, **override: object) -> KafkaTransport:
    return KafkaTransport(
        broker.bootstrap_servers, deadline=20, security=security(broker, principal, **override)
    )


@pytest.fixture
def prefix(kafka_secure: SecureKafka) -> str:
    """A fresh topic prefix whose ACLs are granted (service ``payment``)."""
    name = f"sec{uuid.uuid4().hex[:8]}"
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
    # The broker writes a transaction's commit markers after the commit returns; until then
    # a read_committed reader stops short of it (the last stable offset): poll for it.
    found: list[bytes | None] = []
    for _ in range(400):
        if found := [r.value async for r in t.read(topics.log, 0)]:
            break
        await anyio.sleep(0.05)
    assert found == [b"event"]


async def test_a_service_uses_its_existing_topic_and_cannot_create_others(
    kafka_secure: SecureKafka, prefix: str
) -> None:
    topics = Topics(prefix)
    await transport(kafka_secure, "coordinator").ensure_topics([topics.commands("payment")], 1)
    service = transport(kafka_secure, "payment")
    await service.ensure_topics([topics.commands("payment")], 1)  # exists: nothing to create
    with pytest.raises(Unauthorized) as caught:
        await service.ensure_topics([topics.commands("payment"), topics.dlq], 1)
    assert f"User:payment may not create the missing topics {topics.dlq}" in str(caught.value)
    assert "coordinator" in str(caught.value)
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


def _other_ca(directory: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the broker's CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / "other-ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


async def test_an_untrusted_certificate_is_named(kafka_secure: SecureKafka, tmp_path: Path) -> None:
    ca = _other_ca(tmp_path)
    t = transport(kafka_secure, "payment", ssl_ca_location=ca)
    with pytest.raises(ConnectionFailed) as caught:
        await t.check()
    assert f"is not trusted by KAFKA_SSL_CA_LOCATION={ca}" in str(caught.value)
    assert caught.value.retriable is False


async def test_no_credentials_on_the_secured_port_is_named(kafka_secure: SecureKafka) -> None:
    t = KafkaTransport(kafka_secure.bootstrap_servers, deadline=10)
    with pytest.raises(ConnectionFailed) as caught:
        await t.check()
    assert "the port may expect TLS while KAFKA_SECURITY_PROTOCOL=PLAINTEXT" in str(caught.value)


def test_saga_status_reaches_the_secured_broker(kafka_secure: SecureKafka, prefix: str) -> None:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "SAGA_KAFKA_BOOTSTRAP"))
    }
    env.update(kafka_secure.client_env("client"))
    done = subprocess.run(
        [sys.executable, "-m", "saga", "status", "nosuchsaga", "--prefix", prefix],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    # Reached and authenticated: what is missing is the engine's topics, not the connection.
    assert f"topic '{prefix}." in done.stderr
    assert "does not exist" in done.stderr
    assert "cannot reach" not in done.stderr
    assert kafka_secure.users["client"] not in done.stdout + done.stderr
