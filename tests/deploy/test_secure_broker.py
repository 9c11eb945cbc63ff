"""The secured session broker refuses what it should and grants exactly the engine's ACL layout.

Everything runs against the real `kafka_secure` broker with aiokafka, configured from
`SecureKafka.client_env` the way a service would be. One deployment (one `grant`, one set of
topics created by the coordinator principal) is shared by the module's ACL tests.
"""

from __future__ import annotations

import gc
import socket
import ssl
import stat
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.helpers import create_ssl_context
from cryptography import x509

from deploy.kafka import _broker_ready
from deploy.kafka_secure import (
    PRINCIPALS,
    AclOperation,
    ResourceType,
    SecureKafka,
    engine_acls,
    secure_dir,
    write_env_files,
)
from deploy.tls import new_ca

pytestmark = pytest.mark.anyio

SERVICES = ("payment", "rider")
ENGINE_TOPICS = ("requests", "replies", "log", "snapshots", "dlq", "alerts")
TIMEOUTS: dict[str, Any] = {"request_timeout_ms": 10_000}


def _client_kwargs(env: Mapping[str, str]) -> dict[str, Any]:
    """aiokafka settings from the variables of `SecureKafka.client_env`."""
    return {
        "bootstrap_servers": env["KAFKA_BOOTSTRAP_SERVERS"],
        "security_protocol": env["KAFKA_SECURITY_PROTOCOL"],
        "sasl_mechanism": env["KAFKA_SASL_MECHANISM"],
        "sasl_plain_username": env["KAFKA_SASL_USERNAME"],
        "sasl_plain_password": env["KAFKA_SASL_PASSWORD"],
        "ssl_context": create_ssl_context(cafile=env["KAFKA_SSL_CA_LOCATION"]),
        **TIMEOUTS,
    }


def _as(server: SecureKafka, principal: str) -> dict[str, Any]:
    return _client_kwargs(server.client_env(principal))


_REFUSED = pytest.mark.usefixtures("_collect_refused_clients")
"""For the tests whose clients the broker refuses: aiokafka (and asyncio's TLS transport under
it) does not always close the socket of a connection that failed its TLS or SASL handshake, and
the garbage collector reports it whenever it runs, in whichever test runs then. The fixture
collects at the end of the refusing test and tolerates exactly those warnings there."""


@pytest.fixture
def _collect_refused_clients() -> Iterator[None]:
    yield
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "unclosed", ResourceWarning)
        gc.collect()


async def _produce(topic: str, value: bytes = b"x", **kwargs: Any) -> int:
    """Sends one record; returns its offset."""
    producer = AIOKafkaProducer(enable_idempotence=True, **kwargs)
    try:  # stop() even after a failed start(): aiokafka complains of unclosed producers.
        await producer.start()
        meta = await producer.send_and_wait(topic, value)
        return int(meta.offset)
    finally:
        await producer.stop()


async def _consume(
    topic: str,
    group: str | None,
    *,
    at_least: int = 1,
    until: bytes | None = None,
    **kwargs: Any,
) -> list[bytes]:
    """Reads `topic` from the start, in `group` (committing) or without a group, until it has
    `at_least` records (one short read for 0) and `until` among them, or 10 s passed."""
    consumer = AIOKafkaConsumer(
        topic,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **kwargs,
    )
    values: list[bytes] = []
    try:
        await consumer.start()
        deadline = time.monotonic() + 10
        while True:
            batches = await consumer.getmany(timeout_ms=1000 if at_least == 0 else 500)
            values += [rec.value or b"" for recs in batches.values() for rec in recs]
            done = len(values) >= at_least and (until is None or until in values)
            if done or time.monotonic() > deadline:
                break
        if group is not None:
            await consumer.commit()
        return values
    finally:
        await consumer.stop()


@dataclass(frozen=True)
class Deployment:
    """One granted prefix on the secured broker, its topics created by the coordinator."""

    server: SecureKafka
    prefix: str

    def topic(self, name: str) -> str:
        return f"{self.prefix}.{name}"


@pytest.fixture(scope="module")
async def deployment(kafka_secure: SecureKafka) -> Deployment:
    """Grants one prefix for `SERVICES`; the coordinator creates the topics and sends each
    service a command, as the engine would."""
    prefix = f"sec{uuid.uuid4().hex[:8]}"
    kafka_secure.grant(prefix, SERVICES)
    dep = Deployment(kafka_secure, prefix)
    admin = AIOKafkaAdminClient(**_as(kafka_secure, "coordinator"))
    await admin.start()
    try:
        assert len((await admin.describe_cluster())["brokers"]) == 1
        await admin.create_topics(
            [
                NewTopic(
                    dep.topic(name),
                    num_partitions=1,
                    replication_factor=1,
                    topic_configs={"cleanup.policy": "compact"} if name == "snapshots" else {},
                )
                for name in [*ENGINE_TOPICS, *(f"commands.{s}" for s in SERVICES)]
            ]
        )
    finally:
        await admin.close()
    for service in SERVICES:
        await _produce(
            dep.topic(f"commands.{service}"),
            f"do {service}".encode(),
            **_as(kafka_secure, "coordinator"),
        )
    await _produce(dep.topic("log"), b"event", **_as(kafka_secure, "coordinator"))
    await _produce(dep.topic("dlq"), b"poison", **_as(kafka_secure, "coordinator"))
    await _produce(dep.topic("requests"), b"start", **_as(kafka_secure, "client"))
    return dep


# -- connections --------------------------------------------------------------------------------


def test_client_env_describes_the_sasl_ssl_listener(kafka_secure: SecureKafka) -> None:
    env = kafka_secure.client_env("payment")
    assert env == {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_secure.bootstrap_servers,
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "payment",
        "KAFKA_SASL_PASSWORD": kafka_secure.users["payment"],
        "KAFKA_SSL_CA_LOCATION": str(kafka_secure.ca_file),
    }
    assert set(PRINCIPALS) <= set(kafka_secure.users)
    assert len(set(kafka_secure.users.values())) == len(kafka_secure.users)  # All distinct.
    with pytest.raises(KeyError):
        kafka_secure.client_env("nobody")
    # The cache keeps every principal's password: owner only, in an owner-only directory.
    assert stat.S_IMODE(secure_dir().stat().st_mode) == 0o700
    assert stat.S_IMODE((secure_dir() / "users.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((kafka_secure.data_dir / "server.properties").stat().st_mode) == 0o600
    # The admin password is in server.properties only, never in the broker's log.
    assert kafka_secure.users["admin"] not in kafka_secure.log_path.read_text()


def test_broker_certificate_names_loopback_and_is_signed_by_the_ca(
    kafka_secure: SecureKafka,
) -> None:
    ca = x509.load_pem_x509_certificate(kafka_secure.ca_file.read_bytes())
    (leaf, *_) = x509.load_pem_x509_certificates(kafka_secure.server_pem.read_bytes())
    leaf.verify_directly_issued_by(ca)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert stat.S_IMODE(kafka_secure.server_pem.stat().st_mode) == 0o600


def test_env_files_export_client_env(kafka_secure: SecureKafka, tmp_path: Path) -> None:
    written = write_env_files(kafka_secure, tmp_path)
    path = written["client"]
    assert path == tmp_path / "client.env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    script = f'set -a; . "{path}"; set +a; env'
    done = subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, check=True, env={"PATH": "/bin"}
    )
    exported = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    for key, value in kafka_secure.client_env("client").items():
        assert exported[key] == value


@_REFUSED
async def test_client_without_tls_is_refused(kafka_secure: SecureKafka) -> None:
    # The raw PLAINTEXT probe of the unsecured broker gets no answer either.
    assert not _broker_ready(kafka_secure.port, timeout=5.0)
    with pytest.raises(KafkaConnectionError):
        await _produce("anything", bootstrap_servers=kafka_secure.bootstrap_servers, **TIMEOUTS)


@_REFUSED
async def test_tls_client_without_sasl_is_refused(kafka_secure: SecureKafka) -> None:
    kwargs = _as(kafka_secure, "admin")
    for key in ("sasl_mechanism", "sasl_plain_username", "sasl_plain_password"):
        kwargs.pop(key)
    kwargs["security_protocol"] = "SSL"
    with pytest.raises(KafkaConnectionError):
        await _produce("anything", **kwargs)


@_REFUSED
async def test_wrong_password_and_unknown_user_are_refused(
    kafka_secure: SecureKafka, caplog: pytest.LogCaptureFixture
) -> None:
    for user, password in [("client", "not-the-password"), ("nobody", "whatever")]:
        env = {
            **kafka_secure.client_env("client"),
            "KAFKA_SASL_USERNAME": user,
            "KAFKA_SASL_PASSWORD": password,
        }
        caplog.clear()
        with pytest.raises(KafkaConnectionError):
            await _produce("anything", **_client_kwargs(env))
        assert "invalid credentials" in caplog.text
    # The other mechanism works with the same password: both were created at format time.
    env = {**kafka_secure.client_env("client"), "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256"}
    consumer = AIOKafkaConsumer(**_client_kwargs(env))
    await consumer.start()
    try:
        assert isinstance(await consumer.topics(), set)
    finally:
        await consumer.stop()


@_REFUSED
async def test_untrusted_ca_fails_the_tls_handshake(
    kafka_secure: SecureKafka, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = new_ca(tmp_path, "some other CA")
    env = {**kafka_secure.client_env("client"), "KAFKA_SSL_CA_LOCATION": str(other.cert_file)}
    with pytest.raises(KafkaConnectionError):
        await _produce("anything", **_client_kwargs(env))
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
    context = ssl.create_default_context(cafile=str(other.cert_file))
    with (
        socket.create_connection(("127.0.0.1", kafka_secure.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_hostname_is_verified(kafka_secure: SecureKafka) -> None:
    context = ssl.create_default_context(cafile=str(kafka_secure.ca_file))
    for name in ("127.0.0.1", "localhost"):
        with (
            socket.create_connection(("127.0.0.1", kafka_secure.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=name) as sock,
        ):
            assert sock.version() is not None
    with (
        socket.create_connection(("127.0.0.1", kafka_secure.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="mismatch"),
    ):
        context.wrap_socket(raw, server_hostname="kafka.example.com")


@_REFUSED
async def test_controller_listener_takes_no_client(kafka_secure: SecureKafka) -> None:
    controller = f"127.0.0.1:{kafka_secure.controller_port}"
    assert not _broker_ready(kafka_secure.controller_port, timeout=5.0)
    # SCRAM users, even the super user, do not exist there: only the broker's PLAIN login.
    for principal in ("coordinator", "admin"):
        env = {**kafka_secure.client_env(principal), "KAFKA_BOOTSTRAP_SERVERS": controller}
        with pytest.raises(KafkaConnectionError):
            await _produce("anything", **_client_kwargs(env))


# -- ACLs ---------------------------------------------------------------------------------------


async def test_grant_is_idempotent_and_applies_the_layout(deployment: Deployment) -> None:
    server = deployment.server
    wanted = set(engine_acls(deployment.prefix, SERVICES))
    before = server.acls()
    assert wanted <= before
    server.grant(deployment.prefix, SERVICES)
    assert server.acls() == before
    mine = {b for b in before if deployment.prefix in b.name}
    assert mine == {b for b in wanted if b.resource_type != ResourceType.CLUSTER}
    # A service's rights name its own command topic only.
    payment = {b for b in mine if b.principal == "User:payment"}
    reads = {b.name for b in payment if b.operation == AclOperation.READ}
    assert reads == {deployment.topic("commands.payment"), deployment.topic("participant.payment")}


async def test_service_consumes_its_commands_in_its_group(deployment: Deployment) -> None:
    got = await _consume(
        deployment.topic("commands.payment"),
        deployment.topic("participant.payment"),
        **_as(deployment.server, "payment"),
    )
    assert got == [b"do payment"]


async def test_service_cannot_read_another_services_commands_or_the_engine_topics(
    deployment: Deployment,
) -> None:
    payment = _as(deployment.server, "payment")
    for topic in ("commands.rider", "log", "requests", "replies", "snapshots"):
        with pytest.raises(TopicAuthorizationFailedError):
            await _consume(deployment.topic(topic), None, **payment)
    with pytest.raises(TopicAuthorizationFailedError):
        await _consume(
            deployment.topic("commands.rider"), deployment.topic("participant.payment"), **payment
        )
    with pytest.raises(GroupAuthorizationFailedError):
        await _consume(
            deployment.topic("commands.payment"), deployment.topic("participant.rider"), **payment
        )


async def test_service_writes_replies_and_dead_letters_only(deployment: Deployment) -> None:
    payment = _as(deployment.server, "payment")
    assert await _produce(deployment.topic("replies"), b"reply", **payment) >= 0
    assert await _produce(deployment.topic("dlq"), b"poison", **payment) >= 0
    for topic in ("requests", "log", "snapshots", "commands.payment", "commands.rider"):
        with pytest.raises(TopicAuthorizationFailedError):
            await _produce(deployment.topic(topic), b"forged", **payment)


async def test_client_writes_requests_and_reads_the_log_only(deployment: Deployment) -> None:
    client = _as(deployment.server, "client")
    assert await _produce(deployment.topic("requests"), b"start", **client) >= 0
    assert b"event" in await _consume(deployment.topic("log"), None, **client)
    assert await _consume(deployment.topic("snapshots"), None, at_least=0, **client) == []
    for topic in ("replies", "log", "commands.payment", "dlq"):
        with pytest.raises(TopicAuthorizationFailedError):
            await _produce(deployment.topic(topic), b"forged", **client)
    for topic in ("commands.payment", "dlq", "alerts", "requests"):
        with pytest.raises(TopicAuthorizationFailedError):
            await _consume(deployment.topic(topic), None, **client)


async def test_client_tails_in_view_groups_only(deployment: Deployment) -> None:
    client = _as(deployment.server, "client")
    got = await _consume(deployment.topic("log"), deployment.topic("view.status"), **client)
    assert b"event" in got
    with pytest.raises(GroupAuthorizationFailedError):
        await _consume(deployment.topic("log"), deployment.topic("coordinator"), **client)


async def test_operator_also_reads_dead_letters_and_alerts(deployment: Deployment) -> None:
    operator = _as(deployment.server, "operator")
    assert await _produce(deployment.topic("requests"), b"resolve", **operator) >= 0
    assert b"poison" in await _consume(deployment.topic("dlq"), None, **operator)
    assert await _consume(deployment.topic("alerts"), None, at_least=0, **operator) == []
    for topic in ("replies", "dlq", "commands.rider"):
        with pytest.raises(TopicAuthorizationFailedError):
            await _produce(deployment.topic(topic), b"forged", **operator)


async def test_principal_without_grant_can_do_nothing(deployment: Deployment) -> None:
    airline = _as(deployment.server, "airline")  # A SCRAM user, but not in this deployment.
    # Cluster: with no write right anywhere, not even an idempotent producer id is granted.
    with pytest.raises((TopicAuthorizationFailedError, ClusterAuthorizationFailedError)):
        await _produce(deployment.topic("replies"), b"forged", **airline)
    with pytest.raises(TopicAuthorizationFailedError):
        await _consume(deployment.topic("commands.payment"), None, **airline)


async def test_coordinator_runs_transactions_on_the_engine_topics(
    deployment: Deployment,
) -> None:
    coordinator = _as(deployment.server, "coordinator")
    group = deployment.topic("coordinator")
    assert await _consume(deployment.topic("requests"), group, **coordinator) != []
    producer = AIOKafkaProducer(transactional_id=deployment.topic("coordinator.0"), **coordinator)
    await producer.start()
    try:
        async with producer.transaction():
            for name in ENGINE_TOPICS:
                await producer.send_and_wait(deployment.topic(name), b"k", key=b"k")
            await producer.send_and_wait(deployment.topic("commands.rider"), b"do more")
            await producer.send_offsets_to_transaction(
                {TopicPartition(deployment.topic("requests"), 0): 1}, group
            )
    finally:
        await producer.stop()
    got = await _consume(
        deployment.topic("commands.rider"),
        deployment.topic("participant.rider"),
        at_least=2,
        isolation_level="read_committed",
        **_as(deployment.server, "rider"),
    )
    assert got == [b"do rider", b"do more"]
    for name in ("replies", "snapshots", "dlq", "alerts"):
        got = await _consume(
            deployment.topic(name), None, until=b"k", isolation_level="read_committed",
            **coordinator,
        )  # fmt: skip
        assert b"k" in got


async def test_coordinator_is_confined_to_its_prefix(deployment: Deployment) -> None:
    coordinator = _as(deployment.server, "coordinator")
    # Prefixed ACLs end at the dot: `<prefix>x.log` belongs to another deployment.
    outside = f"{deployment.prefix}x.log"
    admin = AIOKafkaAdminClient(**coordinator)
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(outside, 1, 1)])
        assert response.topic_errors[0][1] == TopicAuthorizationFailedError.errno
    finally:
        await admin.close()
    producer = AIOKafkaProducer(transactional_id="other.coordinator.0", **coordinator)
    try:
        with pytest.raises(TransactionalIdAuthorizationFailed):
            await producer.start()
    finally:
        await producer.stop()
