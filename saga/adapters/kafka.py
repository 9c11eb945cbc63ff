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
  do, so producers in any language agree on a saga's partition. The adapter partitions itself
  (cached per key) and hands aiokafka one batch per partition: its per-record send was the
  larger part of a step's protocol cost. A transaction commits only once every batch of it was
  acknowledged (aiokafka would commit without a failed batch). Non-transactional sends that
  overlap are written together (`_KafkaProducer`).
- Transactional producers retry after 10 ms, not aiokafka's 100 (`TX_RETRY_BACKOFF_MS`: Kafka's
  transaction verification answers back-to-back transactions with retriable errors).
- With ``instance_id`` the consumers are static group members (KIP-345): a restarted process
  takes its partitions back without a rebalance.
- Every client gets the same security options (`KafkaSecurity`: TLS, SASL). aiokafka reports a
  failed bootstrap only as "Unable to bootstrap", the cause in a log line; so when a client
  cannot start, one connection is tried by hand to name the cause (refused credentials, an
  untrusted certificate, a TLS client on a plaintext port, ...) and the setting to fix.
- A broker's authorization error (a missing ACL) becomes `Unauthorized`, which says which
  principal lacks which right on which resource; it is not retriable.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTP
from aiokafka.abc import AbstractTokenProvider
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import AIOKafkaConnection
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnsupportedSaslMechanismError,
    for_code,
)
from aiokafka.partitioner import murmur2
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from saga.adapters.kafka_members import KafkaClientSettings
from saga.adapters.kafka_settings import (
    ENV,
    ConnectionFailed,
    KafkaSecurity,
    KafkaSettingsError,
    Unauthorized,
)
from saga.errors import Fenced, TransportError
from saga.runtime.ports import Outgoing, RebalanceListener, Record, TopicPartition

__all__ = ["ConnectionFailed", "KafkaSecurity", "KafkaTransport", "Unauthorized"]

log = logging.getLogger(__name__)

TX_RETRY_BACKOFF_MS = 10
"""aiokafka's wait before retrying a request of a transactional producer (its default: 100).

Kafka 3.6+ verifies each transactional produce and offset commit with the transaction
coordinator (KIP-890 part 1). Right after the previous transaction of the same producer ended,
while its markers are still being written, that check answers CONCURRENT_TRANSACTIONS, which the
broker hands to clients of aiokafka's protocol versions as NOT_ENOUGH_REPLICAS (a produce) or
COORDINATOR_LOAD_IN_PROGRESS / UNKNOWN_TOPIC_OR_PARTITION (a TxnOffsetCommit): retriable, and
aiokafka retries after ``retry_backoff_ms``. Back to back transactions, the engine's normal
rhythm, meet it every few dozen transactions: at 100 ms that was the p99 of a saga. The markers
take a millisecond or two, so 10 ms retries a few times at most; the same wait applies to real
failures (an unreachable broker) and is bounded by the transport's deadline there."""


class KafkaTransport(KafkaClientSettings):
    """The transport port on a Kafka cluster.

    Args:
        bootstrap_servers: ``host:port[,host:port...]``.
        deadline: Seconds any one broker operation (a send, a transaction, a read) may take
            before it fails with `TransportError`.
        client_id: Prefix for client ids, shown in broker logs.
        security: TLS and SASL settings for every client (default: ``PLAINTEXT``, no SASL).
        instance_id: This process's stable name in its consumer groups (Kafka's static
            membership, ``group.instance.id``), e.g. ``coordinator-0``; ``None`` (the default)
            joins as a new member each time. A process restarted under the same name, after a
            crash or a stop, takes its partitions back at once, without a rebalance: the group
            does not wait out the dead member's session. The price: a member that stops and does
            not come back keeps its partitions for ``session_timeout`` before they move. Two
            live processes must not share a name (the newer fences the older out of the
            group); consumers of one group opened at once through this transport are told
            apart by a suffix (``-2``, ``-3``, in the order opened).
        session_timeout: Seconds a member may go silent (a crashed process) before the group
            gives its partitions to the others; the broker bounds it
            (``group.min.session.timeout.ms``, 6 s by default).

    Raises:
        KafkaSettingsError: ``security`` names files that cannot be used (a key that does not
            match its certificate, an unreadable password file) or no token provider.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        deadline: float = 30.0,
        client_id: str = "saga",
        security: KafkaSecurity | None = None,
        instance_id: str | None = None,
        session_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            bootstrap_servers,
            deadline=deadline,
            client_id=client_id,
            security=security,
            instance_id=instance_id,
            session_timeout=session_timeout,
        )
        # Built once: one TLS context and one token provider for every client.
        self._options = self.security.aiokafka_options()
        provider = self._options.get("sasl_oauth_token_provider")
        if provider is not None and not isinstance(provider, AbstractTokenProvider):
            raise KafkaSettingsError(
                f"sasl_oauthbearer_token_provider ({ENV['sasl_oauthbearer_token_provider']}): "
                f"{provider!r} is not an aiokafka.abc.AbstractTokenProvider: subclass it"
            )
        self._partition_counts: dict[str, int] = {}

    def _admin(self) -> AIOKafkaAdminClient:
        return AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap_servers,
            client_id=f"{self.client_id}-admin",
            request_timeout_ms=int(self.deadline * 1000),
            **self._options,
        )

    # -- checking the connection -------------------------------------------------------------

    async def check(self) -> None:
        """Connects once (describes the cluster), to fail at start-up with a clear message.

        Raises:
            Unauthorized: The broker refused the credentials.
            ConnectionFailed: No connection could be set up; the message says why (unreachable,
                an untrusted certificate, a hostname mismatch, another security protocol on the
                port) and which setting to look at.
            TransportError: The cluster could not be described.
        """
        failures: list[TransportError] = []
        for host, port in _hosts(self.bootstrap_servers):
            problem = await self._probe(host, port)
            if problem is None:
                break
            failures.append(problem)
        else:
            # The settings are the same for every broker: the first refusal that retrying cannot
            # help is the one to fix; else the first failure.
            raise next((f for f in failures if not f.retriable), failures[0])
        admin = self._admin()
        try:
            with anyio.fail_after(self.deadline):
                await admin.start()
                await admin.describe_cluster()
        except Exception as exc:
            raise await self._failure(
                exc, f"could not describe the cluster at {self.bootstrap_servers}"
            ) from exc
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await _close_quietly(admin)

    async def _probe(self, host: str, port: int) -> TransportError | None:
        """Connects to one broker by hand and asks for metadata: ``None`` if that worked, else
        the cause named (aiokafka's own bootstrap only logs it)."""
        authenticated = False
        # Built here rather than with aiokafka's create_conn, which does not close what it
        # opened when connecting fails or is cancelled (by the deadline): the socket leaked.
        conn = AIOKafkaConnection(
            host,
            port,
            client_id=f"{self.client_id}-check",
            request_timeout_ms=int(self.deadline * 1000),
            **self._options,
        )
        try:
            with anyio.fail_after(self.deadline):
                await conn.connect()
                authenticated = True
                await conn.send(MetadataRequest([]))
        except Exception as exc:
            return self._explain(exc, host, port, authenticated=authenticated)
        finally:
            conn.close()
        return None

    def _explain(
        self, exc: Exception, host: str, port: int, *, authenticated: bool
    ) -> TransportError:
        s = self.security
        at = f"Kafka at {host}:{port}"
        protocol = f"{ENV['security_protocol']}={s.security_protocol}"
        if isinstance(exc, SaslAuthenticationFailed):
            if s.sasl_mechanism == "OAUTHBEARER":
                return Unauthorized(
                    f"{at} refused the OAUTHBEARER token "
                    f"({ENV['sasl_oauthbearer_token_provider']}): it may be expired, or not "
                    "for this cluster; check the token provider"
                )
            return Unauthorized(
                f"{at} refused the credentials of user {s.sasl_username!r} "
                f"({ENV['sasl_username']} / {ENV['sasl_password']} or "
                f"{ENV['sasl_password_file']}) with {s.sasl_mechanism}: check the user name and "
                "the password, and that the user exists for this mechanism"
            )
        if isinstance(exc, ssl.SSLCertVerificationError):
            ca = s.ssl_ca_location or "the system's CAs"
            hostname = exc.verify_code in (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, IP_ADDRESS_
            if hostname:
                return ConnectionFailed(
                    f"the certificate of {at} does not name {host} ({exc.verify_message}): "
                    "connect by a name the certificate lists, or turn the check off (tests "
                    "only) with --no-ssl-hostname-check / "
                    f"{ENV['ssl_check_hostname']}=none",
                    retriable=False,
                )
            return ConnectionFailed(
                f"the broker's certificate at {host}:{port} is not trusted by "
                f"{ENV['ssl_ca_location']}={ca} ({exc.verify_message}): give the CA that "
                "signed the broker's certificate; or the hostname does not match",
                retriable=False,
            )
        if isinstance(exc, IllegalSaslStateError):
            return ConnectionFailed(
                f"{at} does not take SASL on this port ({protocol}): it may be an SSL or "
                f"PLAINTEXT listener; set {ENV['security_protocol']} to match, or use the SASL "
                "port",
                retriable=False,
            )
        if isinstance(exc, UnsupportedSaslMechanismError):
            return ConnectionFailed(
                f"{at} does not enable SASL mechanism {s.sasl_mechanism} on this listener "
                f"({ENV['sasl_mechanism']}): use one the broker enables",
                retriable=False,
            )
        tls = s.security_protocol in ("SSL", "SASL_SSL")
        if tls and isinstance(exc, ssl.SSLError | ConnectionResetError):
            return ConnectionFailed(
                f"{at} broke off the TLS handshake ({exc.__class__.__name__}): the port may not "
                f"speak TLS (a PLAINTEXT or SASL_PLAINTEXT listener) while {protocol}; check the "
                "port and the protocol",
                retriable=True,
            )
        if isinstance(exc, KafkaConnectionError) and "closed" in str(exc):
            if not tls:
                return ConnectionFailed(
                    f"{at} closed the connection at the first request: the port may expect TLS "
                    f"while {protocol}; set {ENV['security_protocol']} to SSL or SASL_SSL (and "
                    f"{ENV['ssl_ca_location']}), or check the port",
                    retriable=True,
                )
            if authenticated and s.sasl_mechanism is None:
                return ConnectionFailed(
                    f"{at} closed the connection after TLS: the listener may require SASL while "
                    f"{protocol}; set {ENV['security_protocol']}=SASL_SSL, "
                    f"{ENV['sasl_mechanism']} and the credentials",
                    retriable=True,
                )
        if isinstance(exc, TimeoutError | OSError | KafkaConnectionError):
            return ConnectionFailed(
                f"cannot reach {at} ({exc.__class__.__name__}: {exc}): start it, or check the "
                "address (--bootstrap-servers / SAGA_KAFKA_BOOTSTRAP / KAFKA_BOOTSTRAP_SERVERS)",
                retriable=True,
            )
        return TransportError(f"connecting to {at} failed: {exc!r}")

    async def _failure(self, exc: Exception, what: str, right: str = "Describe") -> TransportError:
        """``exc`` from a client as a `TransportError`: a refused right as `Unauthorized`, and
        a failed bootstrap with its cause found by a connection tried by hand."""
        if isinstance(exc, TransportError):
            return exc
        if isinstance(exc, KafkaConnectionError) and "bootstrap" in str(exc):
            for host, port in _hosts(self.bootstrap_servers)[:1]:
                with anyio.move_on_after(self.deadline):
                    problem = await self._probe(host, port)
                    if problem is not None:
                        return problem
        return _as_transport_error(exc, what, self.security.principal, right)

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
        admin = self._admin()
        try:
            with anyio.fail_after(self.deadline):
                await admin.start()
            with anyio.fail_after(self.deadline):
                # Listed first and only the missing ones created: a service's principal may not
                # create topics, and its command topic exists already.
                existing = set(await admin.list_topics())
                missing = [n for n in names if n not in existing]
                if not missing:
                    return
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
                    for n in missing
                ]
                response = await admin.create_topics(wanted)
            self._check_created(response.topic_errors)
        except Exception as exc:
            # Not only TimeoutError: the admin client's start raises KafkaError, OSError, and
            # during a broker restart whatever aiokafka meets. The callers retry on a retriable
            # TransportError.
            raise await self._failure(
                exc, f"could not create topics at {self.bootstrap_servers}", "Create"
            ) from exc
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await _close_quietly(admin)

    def _check_created(self, results: Sequence[Sequence[Any]]) -> None:
        """Raises for the topics the broker did not create (each result is ``(topic,
        error_code[, error_message])``); one that exists already is fine: another process
        created it first, and the outcome is the same."""
        refused, failed = [], []
        for result in results:
            name, code = result[0], result[1]
            if code in (0, TopicAlreadyExistsError.errno):
                continue
            error = for_code(code)
            if error in (TopicAuthorizationFailedError, ClusterAuthorizationFailedError):
                refused.append(name)
            else:
                detail = result[2] if len(result) > 2 and result[2] else error.__name__
                failed.append(f"{name} ({detail})")
        principal = self.security.principal
        if refused:
            raise Unauthorized(
                f"{principal} may not create the missing topics {', '.join(refused)} at "
                f"{self.bootstrap_servers} (or may not see them): they must be created by a "
                "principal that may, normally the coordinator's (start a coordinator with this "
                f"prefix first), or grant {principal} Create (and Describe) on them"
            )
        if failed:
            raise TransportError(
                f"Kafka at {self.bootstrap_servers} did not create the topics {', '.join(failed)}"
            )

    async def partitions(self, topic: str) -> int:
        """The number of partitions of ``topic`` (cached: partition counts do not shrink)."""
        if topic not in self._partition_counts:
            admin = self._admin()
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
                        unseen = (
                            f" (or {self.security.principal} may not Describe it)"
                            if self.security.security_protocol != "PLAINTEXT"
                            else ""
                        )
                        raise TransportError(
                            f"topic {topic!r} does not exist{unseen}: start a coordinator with "
                            "this prefix first, or check the prefix"
                        )
                    while True:
                        (described,) = await admin.describe_topics([topic])
                        found = described.get("partitions") or []
                        code = described.get("error_code", 0)
                        if code == TopicAuthorizationFailedError.errno:
                            raise TopicAuthorizationFailedError(topic)
                        if code == 0 and found:
                            break
                        await anyio.sleep(0.1)  # leaders are still being elected
            except (TimeoutError, KafkaError, OSError) as exc:
                raise await self._failure(exc, f"could not describe topic {topic!r}") from exc
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await _close_quietly(admin)
            self._partition_counts[topic] = len(found)
        return self._partition_counts[topic]

    def partition_for(self, key: bytes, partitions: int) -> int:
        """Kafka's default partitioner: murmur2 of the key."""
        return _partition_of(key, partitions)

    # -- consuming ---------------------------------------------------------------------------

    @asynccontextmanager
    async def consumer(
        self,
        group_id: str,
        topics: Sequence[str],
        listener: RebalanceListener | None = None,
    ) -> AsyncIterator[_KafkaConsumer]:
        """A ``read_committed`` group member; leaves the group cleanly on exit (a static member,
        with ``instance_id``, stays: its partitions wait for it to come back)."""
        with self._instance(group_id) as instance:
            async with self._member(group_id, topics, listener, instance) as member:
                yield member

    @asynccontextmanager
    async def _member(
        self,
        group_id: str,
        topics: Sequence[str],
        listener: RebalanceListener | None,
        instance: str | None,
    ) -> AsyncIterator[_KafkaConsumer]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=group_id,
            group_instance_id=instance,
            client_id=f"{self.client_id}-{group_id}",
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            partition_assignment_strategy=(RangePartitionAssignor,),
            session_timeout_ms=int(self.session_timeout * 1000),
            heartbeat_interval_ms=min(1_000, int(self.session_timeout * 1000) // 3),
            max_poll_interval_ms=120_000,
            metadata_max_age_ms=30_000,
            fetch_max_wait_ms=50,  # replies wait on this: a long poll would add latency per step
            **self._options,
        )
        consumer.subscribe(list(topics), listener=_Listener(listener))
        await self._start(consumer, f"consumer of group {group_id!r}", "Read")
        try:
            yield _KafkaConsumer(consumer, self.deadline, self.security.principal)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.deadline):
                # A dynamic member also leaves the group, so a rebalance starts at once; a static
                # one does not (aiokafka sends no LeaveGroup for it): its name holds its place.
                await consumer.stop()

    async def read(self, topic: str, partition: int, start: int = 0) -> AsyncIterator[Record]:
        """Reads committed records of one partition from ``start`` up to its end now."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            isolation_level="read_committed",
            enable_auto_commit=False,
            client_id=f"{self.client_id}-reader",
            **self._options,
        )
        tp = KafkaTP(topic, partition)
        await self._start(consumer, f"reader of {topic}/{partition}", "Read")
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
            raise _as_transport_error(
                exc, f"reading {topic}/{partition} failed", self.security.principal, "Read"
            ) from exc
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.deadline):
                await consumer.stop()

    @asynccontextmanager
    async def tail(self, topic: str, starts: Mapping[int, int]) -> AsyncIterator[_KafkaTail]:
        """A ``read_committed`` reader of the partitions of ``topic`` that ``starts`` names,
        from those offsets on, in no consumer group: one consumer, assigned and kept open (an
        offset the broker no longer holds reads from the earliest it does)."""
        if any(o < 0 for o in starts.values()):
            raise ValueError(f"tail of {topic}: offsets cannot be negative ({dict(starts)})")
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            isolation_level="read_committed",
            enable_auto_commit=False,
            # Not aiokafka's "latest": a start that retention deleted would skip to the end.
            auto_offset_reset="earliest",
            client_id=f"{self.client_id}-tail",
            fetch_max_wait_ms=50,  # as the group consumers': a follower's latency waits on it
            **self._options,
        )
        await self._start(consumer, f"tail of {topic}", "Read")
        try:
            tps = {p: KafkaTP(topic, p) for p in sorted(starts)}
            consumer.assign(list(tps.values()))
            for p, tp in tps.items():
                consumer.seek(tp, starts[p])
            yield _KafkaTail(consumer, topic, tps, self.deadline, self.security.principal)
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
            **self._options,
        )
        await self._start(producer, "producer", "Write")
        try:
            yield _KafkaProducer(producer, self.deadline, self.security.principal)
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
            retry_backoff_ms=TX_RETRY_BACKOFF_MS,
            **self._options,
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
            raise await self._failure(
                exc, f"could not start producer {transactional_id!r}", "Write"
            ) from exc
        try:
            yield _KafkaTxProducer(producer, self.deadline, self.security.principal)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.deadline):
                await producer.stop()

    async def _start(
        self, client: AIOKafkaConsumer | AIOKafkaProducer, what: str, right: str
    ) -> None:
        try:
            with anyio.fail_after(self.deadline):
                await client.start()
        except BaseException as exc:  # see tx_producer: aiokafka does not only raise KafkaError
            # Stopped whatever ended the start, a cancellation too: a client left half started
            # would leak its connections.
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await _stop_quietly(client)
            if not isinstance(exc, Exception):
                raise
            raise await self._failure(exc, f"could not start the {what}", right) from exc


@lru_cache(maxsize=8192)
def _partition_of(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner, cached: aiokafka's murmur2 is pure Python (about 8 µs for a
    saga id here), and a saga's key is partitioned again and again while the saga runs (each
    command, each reply's check of its home partition)."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


def _hosts(bootstrap_servers: str) -> list[tuple[str, int]]:
    hosts = []
    for entry in bootstrap_servers.split(","):
        host, _, port = entry.strip().rpartition(":")
        hosts.append((host.strip("[]") or entry.strip(), int(port) if port.isdigit() else 9092))
    return hosts


_DENIED = (
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    ClusterAuthorizationFailedError,
)


def _as_transport_error(
    exc: BaseException, what: str, principal: str, right: str
) -> TransportError:
    """``exc`` as the `TransportError` to raise: a refused right as `Unauthorized`, naming
    the principal, the right and the resource (aiokafka puts the resource in the arguments)."""
    if isinstance(exc, TransportError):
        return exc
    if not isinstance(exc, _DENIED):
        return TransportError(f"{what}: {exc!r}")
    names = [
        str(n)
        for a in exc.args
        for n in (sorted(map(str, a)) if isinstance(a, set | frozenset | list | tuple) else [a])
    ]
    resource = ", ".join(repr(n) for n in names) or "?"
    if isinstance(exc, TopicAuthorizationFailedError):
        lacking, kind = right, f"topic {resource}"
    elif isinstance(exc, GroupAuthorizationFailedError):
        lacking, kind = "Read", f"consumer group {resource}"
    elif isinstance(exc, TransactionalIdAuthorizationFailed):
        lacking, kind = "Write", f"transactional id {resource}"
    else:
        lacking, kind = "IdempotentWrite" if right == "Write" else right, "the cluster"
    return Unauthorized(
        f"{what}: {principal} lacks the {lacking} right on {kind}: grant it (an ACL "
        f"allowing {principal} {lacking} on {kind}), or run with a principal that has it"
    )


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
    def __init__(self, consumer: AIOKafkaConsumer, deadline: float, principal: str) -> None:
        self._c = consumer
        self._deadline = deadline
        self._principal = principal

    async def poll(self, timeout: float, max_records: int = 500) -> list[Record]:
        try:
            batches = await self._c.getmany(timeout_ms=int(timeout * 1000), max_records=max_records)
        except _DENIED as exc:  # only these: other errors keep propagating as they always did
            raise _as_transport_error(exc, "poll failed", self._principal, "Read") from exc
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
            raise _as_transport_error(exc, "offset commit failed", self._principal, "Read") from exc

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
            raise _as_transport_error(
                exc, "rewinding to the committed offsets failed", self._principal, "Describe"
            ) from exc


class _KafkaTail:
    """One group-less consumer assigned a topic's partitions (`KafkaTransport.tail`)."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        topic: str,
        tps: Mapping[int, KafkaTP],
        deadline: float,
        principal: str,
    ) -> None:
        self._c = consumer
        self._topic = topic
        self._tps = dict(tps)
        self._deadline = deadline
        self._principal = principal

    async def poll(self, timeout: float, max_records: int = 500) -> list[Record]:
        try:
            # getmany returns after ``timeout`` by itself; the deadline bounds what it may do
            # beyond (aiokafka waits on its coordinator and metadata there).
            with anyio.fail_after(timeout + self._deadline):
                batches = await self._c.getmany(
                    timeout_ms=int(timeout * 1000), max_records=max_records
                )
        except (KafkaError, TimeoutError) as exc:
            raise self._error(exc, "poll") from exc
        return [_record(m) for msgs in batches.values() for m in msgs]

    async def end_offsets(self) -> dict[int, int]:
        try:
            with anyio.fail_after(self._deadline):
                # The consumer reads read_committed, so aiokafka asks for the last stable ones.
                ends = await self._c.end_offsets(list(self._tps.values()))
        except (KafkaError, TimeoutError) as exc:
            raise self._error(exc, "end offsets") from exc
        return {tp.partition: int(offset) for tp, offset in ends.items()}

    async def positions(self) -> dict[int, int]:
        try:
            with anyio.fail_after(self._deadline):
                # At once for a position set by seek or by getmany (which moves it past control
                # batches and aborted records); a position being reset waits for the reset.
                return {p: int(await self._c.position(tp)) for p, tp in self._tps.items()}
        except (KafkaError, TimeoutError) as exc:
            raise self._error(exc, "positions") from exc

    def _error(self, exc: BaseException, what: str) -> TransportError:
        return _as_transport_error(
            exc, f"tail of {self._topic}: {what} failed", self._principal, "Read"
        )


class _Flush:
    """Records handed to a `_KafkaProducer` while its previous write was under way."""

    __slots__ = ("done", "error", "records")

    def __init__(self) -> None:
        self.records: list[Outgoing] = []
        self.done = anyio.Event()
        self.error: BaseException | None = None


class _KafkaProducer:
    """The idempotent producer, writing in groups.

    Each `send` waits until its records are acknowledged. Records handed in while a write is
    under way go out together in the next one, in one batch per partition, under one deadline:
    the participant's replies finish one by one, and a deadline scope and a produce call per
    reply cost more than the reply's encoding. The first sender of a group writes it (after
    the write before it ended: a partition's batches then go out in the order they were sent);
    the others wait for it.
    """

    def __init__(self, producer: AIOKafkaProducer, deadline: float, principal: str) -> None:
        self._p = producer
        self._deadline = deadline
        self._principal = principal
        self._open: _Flush | None = None  # records for the next write, still taking more
        self._writing: anyio.Event | None = None  # set when the write under way ends

    async def send(self, records: Sequence[Outgoing]) -> None:
        if not records:
            return
        group = self._open
        if group is not None:
            group.records.extend(records)
            await group.done.wait()
        else:
            group = self._open = _Flush()
            group.records.extend(records)
            await self._write(group)
        if group.error is not None:
            raise self._error(group.error)

    async def _write(self, group: _Flush) -> None:
        try:
            while self._writing is not None:
                await self._writing.wait()
            self._open = None  # what comes now goes into the next write
            self._writing = writing = anyio.Event()
            try:
                with anyio.fail_after(self._deadline):
                    placed = await _enqueue(self._p, group.records)
                    for future in {id(f): f for f, _ in placed}.values():
                        await future
            finally:
                self._writing = None
                writing.set()
        except BaseException as exc:
            # The others of the group get the failure too; a cancellation of this sender alone
            # (only the participant stopping cancels senders, all of them) fails theirs as well.
            group.error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            if self._open is group:
                self._open = None
            group.done.set()

    def _error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, KafkaError | TimeoutError):
            return _as_transport_error(exc, "send failed", self._principal, "Write")
        if isinstance(exc, Exception):
            return exc
        return TransportError(f"send failed: the write was cancelled ({exc!r})")


class _KafkaTxProducer:
    def __init__(self, producer: AIOKafkaProducer, deadline: float, principal: str) -> None:
        self._p = producer
        self._deadline = deadline
        self._principal = principal
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
                    placed = await _enqueue(p, records)
                    if offsets:
                        await p.send_offsets_to_transaction(
                            {KafkaTP(t, n): o for (t, n), o in offsets.items()}, group_id
                        )
                    # Every batch acknowledged before the commit: aiokafka commits a transaction
                    # whose batch failed (a record too large, say) without it, so a failure must
                    # abort instead. No wait added: the commit waits for the batches anyway.
                    written = [(await f).offset + i for f, i in placed]
                    await p.commit_transaction()
                except BaseException:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                        await _abort_quietly(p)
                    raise
            return written
        except ProducerFenced as exc:
            self._broken = "fenced"
            raise Fenced(str(exc)) from exc
        except Exception as exc:
            # Not only KafkaError: a producer that learns it was fenced after beginning the
            # transaction raises IllegalOperation from send. Whatever it is, the transaction
            # did not commit; the coordinator drops the partition and re-reads the log.
            self._broken = repr(exc)
            raise _as_transport_error(exc, "transaction aborted", self._principal, "Write") from exc


async def _enqueue(p: AIOKafkaProducer, records: Sequence[Outgoing]) -> list[tuple[Any, int]]:
    """Hands ``records`` to ``p`` in one batch per partition (more where a batch is full).

    Returns, for each record in order, its batch's future (its result's offset is the batch's
    first) and the record's place in the batch. Keyed records without a partition are placed
    by Kafka's default partitioner here, with the partition counts of the producer's metadata:
    aiokafka's own send costs a murmur2 in pure Python, two lists, a size estimate, a metadata
    wait and a future per record, where a batch costs one of each per partition.

    Raises:
        MessageSizeTooLargeError: A record is larger than a request may be (nothing was sent).
    """
    counts: dict[str, int] = {}
    current: dict[tuple[str, int], BatchBuilder] = {}
    batches: list[tuple[str, int, BatchBuilder]] = []
    placed: list[tuple[BatchBuilder, int]] = []
    for r in records:
        if len(r.value or b"") + len(r.key or b"") > _LARGE:
            _check_size(r)
        n = r.partition
        if n is None:
            count = counts.get(r.topic)
            if count is None:
                count = counts[r.topic] = len(await p.partitions_for(r.topic))
            n = _partition_of(r.key, count) if r.key is not None else random.randrange(count)
        headers = list(r.headers) if r.headers else _NO_HEADERS  # the builder wants a list
        builder = current.get((r.topic, n))
        meta = None
        if builder is not None:
            meta = builder.append(timestamp=None, key=r.key, value=r.value, headers=headers)
        if meta is None:  # a new partition, or its batch is full: the first record always fits
            builder = current[(r.topic, n)] = p.create_batch()
            batches.append((r.topic, n, builder))
            meta = builder.append(timestamp=None, key=r.key, value=r.value, headers=headers)
        placed.append((builder, meta.offset))
    futures = {}
    for topic, n, builder in batches:
        builder.close()  # closed: it goes out at once, without lingering for more
        futures[id(builder)] = await p.send_batch(builder, topic, partition=n)
    return [(futures[id(b)], i) for b, i in placed]


_NO_HEADERS: list[tuple[str, bytes]] = []  # only read
_MAX_REQUEST = 1_048_576  # aiokafka's max_request_size, which the producers keep
_LARGE = _MAX_REQUEST - 64 * 1024  # below this, key and value leave room for any headers


def _check_size(r: Outgoing) -> None:
    size = DefaultRecordBatchBuilder.estimate_size_in_bytes(r.key, r.value, list(r.headers))
    if size > _MAX_REQUEST:
        raise MessageSizeTooLargeError(
            f"the record for {r.topic} is {size} bytes, larger than a request may be "
            f"({_MAX_REQUEST})"
        )


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
