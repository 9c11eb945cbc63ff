"""The transport port on Apache Kafka with librdkafka (``confluent-kafka``), beside aiokafka's.

The same contract as `saga.adapters.kafka.KafkaTransport` (tests/contract runs against both),
with the protocol work in C: librdkafka encodes, batches, compresses and hashes keys on its own
threads, where aiokafka does it in Python on the event loop. Install it with the ``rdkafka``
extra (``confluent-kafka``, which bundles librdkafka).

How the blocking client meets the event loop:

- Every blocking call of a client (a poll, a commit, a transaction, a flush) runs on a worker
  thread through anyio, one call at a time per client: a consumer serialises its calls anyway
  (confluent-kafka's re-entrancy gate makes a second thread wait for the first), and a
  transactional producer's calls must keep their order. One thread hop per poll and per
  transaction, never per record.
- A consumer polls in slices of `POLL_SLICE` seconds, so that a commit or a seek from another
  task waits at most one slice for the consumer instead of a whole poll.
- Rebalance callbacks fire inside the poll, on its worker thread. The listener (async) runs on
  the event loop while that thread waits, so a revocation is finished before the partitions
  move, as the port requires. Consumer calls the listener makes meanwhile (a commit, a seek)
  are run on the waiting thread itself, which the gate admits (the same thread re-entering);
  sent anywhere else they would wait for the poll, which waits for the listener.
- ``assignment()`` is kept here, updated in the callbacks: librdkafka's own waits for the poll;
  so is the member's group metadata, which a transaction's offsets are sent with.
- Readers and tails (`read`, `tail`) are consumers in no group, assigned their partitions; the
  end of a partition is librdkafka's end-of-partition event, whose offset is past the
  transaction markers (a record's offset + 1 is not, at the end of a transactional log).

Choices that the engine's guarantees depend on (as in the aiokafka adapter):

- Consumers read ``read_committed``, start from the earliest offset, never auto-commit, and use
  the range assignor (partition p of every subscribed topic to the same member).
- Keyed records are partitioned with ``murmur2_random``: Kafka's Java default partitioner, which
  aiokafka's adapter uses too (librdkafka's own default, ``consistent_random``, is CRC32).
- A transaction's offsets are sent with the consumer group's metadata: the live member's (its
  generation and member id, so the broker refuses a zombie's offsets, KIP-447) when a consumer
  of that group is open in this transport, else the group id alone, as aiokafka sends it.
- A producer that was fenced, or whose transaction failed, is not reused: the caller opens a
  new one, which also aborts whatever the old one left open.
- Every client gets the same security settings (`KafkaSecurity`, mapped to librdkafka's names).
  OAUTHBEARER is not offered: the token provider is an aiokafka ``AbstractTokenProvider`` (async,
  bound to the event loop), which librdkafka's refresh callback, on its own thread, cannot call;
  `RdKafkaTransport` refuses it with a `KafkaSettingsError` naming the alternative.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import lru_cache, partial
from typing import Any, TypeVar, cast

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from confluent_kafka import (
    Consumer as RdConsumer,
)
from confluent_kafka import (
    IsolationLevel,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
    murmur2,
)
from confluent_kafka import (
    Producer as RdProducer,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._listoffsets import OffsetSpec
from confluent_kafka.cimpl import NewTopic

from saga.adapters.kafka_members import KafkaClientSettings
from saga.adapters.kafka_settings import (
    ENV,
    ConnectionFailed,
    KafkaSecurity,
    KafkaSettingsError,
    Unauthorized,
)
from saga.errors import Fenced, TransportError
from saga.runtime.ports import Outgoing, RebalanceListener, Record
from saga.runtime.ports import TopicPartition as TP

__all__ = ["POLL_SLICE", "RdKafkaTransport"]

log = logging.getLogger(__name__)
_librdkafka_log = logging.getLogger(f"{__name__}.librdkafka")

T = TypeVar("T")

POLL_SLICE = 0.1
"""The longest a consumer's poll holds the consumer (seconds); a longer poll is several."""

MAX_RECORD_BYTES = 1_048_576
"""``message.max.bytes``: aiokafka's ``max_request_size``, which its adapter keeps, so that the
two clients refuse the same records."""

TX_RETRY_BACKOFF_MS = 10
"""``retry.backoff.ms`` of the transactional producers (librdkafka's default: 100): see
`saga.adapters.kafka.TX_RETRY_BACKOFF_MS` (Kafka 3.6+ answers back-to-back transactions with
CONCURRENT_TRANSACTIONS for a millisecond or two, and the retry's wait was the p99)."""

_FENCED_CODES = frozenset(
    {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
)
"""The errors that mean a newer producer with the same transactional id exists."""

_DENIED = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "topic",
    KafkaError.GROUP_AUTHORIZATION_FAILED: "consumer group",
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: "transactional id",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "the cluster",
}
"""The broker's refusals of a right, by the kind of resource refused."""

_QUIET = frozenset({KafkaError._PARTITION_EOF, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN})
"""Consumer events that are not failures: librdkafka reconnects on its own."""


class RdKafkaTransport(KafkaClientSettings):
    """The transport port on a Kafka cluster, with librdkafka.

    Takes the arguments of `saga.adapters.kafka.KafkaTransport` and means the same by them.

    Args:
        bootstrap_servers: ``host:port[,host:port...]``.
        deadline: Seconds any one broker operation (a send, a transaction, a read) may take
            before it fails with `TransportError`.
        client_id: Prefix for client ids, shown in broker logs.
        security: TLS and SASL settings for every client (default: ``PLAINTEXT``, no SASL);
            OAUTHBEARER is refused (see the module's docstring).
        instance_id: This process's stable name in its consumer groups (static membership,
            ``group.instance.id``); consumers of one group opened at once through this
            transport are told apart by a suffix (``-2``, ``-3``, in the order opened).
        session_timeout: Seconds a member may go silent before the group gives its partitions
            to the others.

    Raises:
        KafkaSettingsError: ``security`` names files that cannot be used, or OAUTHBEARER.
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
        self._common = {"bootstrap.servers": bootstrap_servers, **_security_config(self.security)}
        self._members: dict[str, list[_RdKafkaConsumer]] = {}  # group -> its open consumers
        self._bare_metadata: dict[str, Any] = {}  # group -> its metadata without a member
        self._partition_counts: dict[str, int] = {}
        self._admin_client: AdminClient | None = None
        self._admin_lock = threading.Lock()

    def _config(self, suffix: str, **extra: object) -> dict[str, Any]:
        return {
            **self._common,
            "client.id": f"{self.client_id}-{suffix}",
            "logger": _librdkafka_log,
            **extra,
        }

    def _admin(self) -> AdminClient:
        """The transport's admin client, made on first use (from a worker thread) and kept:
        it is thread-safe, and reads ask it for offsets."""
        with self._admin_lock:
            if self._admin_client is None:
                self._admin_client = AdminClient(self._config("admin"))
            # Its log lines wait in a queue until served: served here, before each use.
            self._admin_client.poll(0)
            return self._admin_client

    # -- checking the connection -------------------------------------------------------------

    async def check(self) -> None:
        """Connects once (lists the cluster's topics), to fail at start-up with a clear message.

        Raises:
            Unauthorized: The broker refused the credentials.
            ConnectionFailed: No connection could be set up; the message says why (unreachable,
                an untrusted certificate, another security protocol on the port) and which
                setting to look at.
            TransportError: The cluster could not be described.
        """
        await anyio.to_thread.run_sync(self._check)

    def _check(self) -> None:
        errors: list[KafkaError] = []
        admin = AdminClient(self._config("check", error_cb=errors.append))
        end = time.monotonic() + self.deadline
        while True:
            try:
                admin.list_topics(timeout=min(1.0, max(0.1, end - time.monotonic())))
                return
            except KafkaException as exc:
                failure = exc
            admin.poll(0)  # serves error_cb: the causes librdkafka met while connecting
            decisive = [e for e in errors if e.code() not in _RETRIED_CONNECTING]
            if decisive or time.monotonic() >= end:
                cause = (decisive or errors or [failure.args[0]])[0]
                raise self._explain(cause)

    def _explain(self, error: KafkaError) -> TransportError:
        """What a connection failure means, with the setting to fix (as the aiokafka adapter
        words it)."""
        s = self.security
        at = f"Kafka at {self.bootstrap_servers}"
        protocol = f"{ENV['security_protocol']}={s.security_protocol}"
        text = error.str()
        lowered = text.lower()
        code = error.code()
        if code == KafkaError._AUTHENTICATION or "authentication failed" in lowered:
            return Unauthorized(
                f"{at} refused the credentials of user {s.sasl_username!r} "
                f"({ENV['sasl_username']} / {ENV['sasl_password']} or "
                f"{ENV['sasl_password_file']}) with {s.sasl_mechanism}: check the user name and "
                "the password, and that the user exists for this mechanism"
            )
        if "certificate verify failed" in lowered or "broker certificate could not" in lowered:
            if "hostname" in lowered or "ip address mismatch" in lowered:
                return ConnectionFailed(
                    f"the certificate of {at} does not name the host connected to ({text}): "
                    "connect by a name the certificate lists, or turn the check off (tests "
                    f"only) with --no-ssl-hostname-check / {ENV['ssl_check_hostname']}=none",
                    retriable=False,
                )
            ca = s.ssl_ca_location or "the system's CAs"
            return ConnectionFailed(
                f"the broker's certificate at {self.bootstrap_servers} is not trusted by "
                f"{ENV['ssl_ca_location']}={ca} ({text}): give the CA that signed the broker's "
                "certificate; or the hostname does not match",
                retriable=False,
            )
        if "unsupported sasl mechanism" in lowered or ("mechanism" in lowered and "not" in lowered):
            return ConnectionFailed(
                f"{at} does not enable SASL mechanism {s.sasl_mechanism} on this listener "
                f"({ENV['sasl_mechanism']}): use one the broker enables ({text})",
                retriable=False,
            )
        tls = s.security_protocol in ("SSL", "SASL_SSL")
        if tls and ("ssl" in lowered or "handshake" in lowered):
            return ConnectionFailed(
                f"{at} broke off the TLS handshake ({text}): the port may not speak TLS (a "
                f"PLAINTEXT or SASL_PLAINTEXT listener) while {protocol}; check the port and "
                "the protocol",
                retriable=True,
            )
        if ("disconnected" in lowered and "after" in lowered) or "unexpected" in lowered:
            return ConnectionFailed(
                f"{at} closed the connection at the first request ({text}): the port may expect "
                f"TLS or SASL while {protocol}; set {ENV['security_protocol']} to match (and "
                f"{ENV['ssl_ca_location']}), or check the port",
                retriable=True,
            )
        if code in _RETRIED_CONNECTING or code == KafkaError._TIMED_OUT:
            return ConnectionFailed(
                f"cannot reach {at} ({text}): start it, or check the address "
                "(--bootstrap-servers / SAGA_KAFKA_BOOTSTRAP / KAFKA_BOOTSTRAP_SERVERS)",
                retriable=True,
            )
        return TransportError(f"connecting to {at} failed: {error.name()}: {text}")

    # -- topics ------------------------------------------------------------------------------

    async def ensure_topics(
        self, names: Sequence[str], partitions: int, compacted: Sequence[str] = ()
    ) -> None:
        """Creates missing topics (replication factor 1 on a single broker, else 3 at most, with
        ``min.insync.replicas=2`` at 3); existing ones are left as they are.

        Raises:
            TransportError: The broker could not be reached or refused (whatever failed).
        """
        await anyio.to_thread.run_sync(self._ensure_topics, list(names), partitions, compacted)

    def _ensure_topics(self, names: list[str], partitions: int, compacted: Sequence[str]) -> None:
        what = f"could not create topics at {self.bootstrap_servers}"
        try:
            metadata = self._admin().list_topics(timeout=self.deadline)
        except KafkaException as exc:
            raise self._error(exc, what, "Describe") from exc
        # Listed first and only the missing ones created: a service's principal may not create
        # topics, and its command topic exists already.
        missing = [n for n in names if n not in metadata.topics]
        if not missing:
            return
        replication = min(3, len(metadata.brokers))
        durability = {"min.insync.replicas": "2"} if replication == 3 else {}
        wanted = [
            NewTopic(
                n,
                num_partitions=partitions,
                replication_factor=replication,
                config={**durability, **({"cleanup.policy": "compact"} if n in compacted else {})},
            )
            for n in missing
        ]
        futures = self._admin().create_topics(
            wanted, operation_timeout=self.deadline, request_timeout=self.deadline
        )
        refused, failed = [], []
        for name, future in futures.items():
            try:
                future.result(timeout=self.deadline)
            except KafkaException as exc:
                error = exc.args[0]
                if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue  # another process created it first: the outcome is the same
                if error.code() in (
                    KafkaError.TOPIC_AUTHORIZATION_FAILED,
                    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
                ):
                    refused.append(name)
                else:
                    failed.append(f"{name} ({error.str() or error.name()})")
            except TimeoutError as exc:
                raise TransportError(f"{what}: no answer in {self.deadline} s") from exc
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
        """The number of partitions of ``topic`` (cached: partition counts do not shrink).

        Raises:
            TransportError: The topic does not exist, or the broker could not be asked.
        """
        if topic not in self._partition_counts:
            count = await anyio.to_thread.run_sync(self._describe, topic)
            self._partition_counts[topic] = count
        return self._partition_counts[topic]

    def _describe(self, topic: str) -> int:
        end = time.monotonic() + self.deadline
        listed = time.monotonic() + 3  # a topic created a moment ago may take a while to list
        while True:
            try:
                # All topics: asking for one by name creates it on brokers that auto-create.
                found = self._admin().list_topics(timeout=max(0.1, end - time.monotonic()))
            except KafkaException as exc:
                raise self._error(exc, f"could not describe topic {topic!r}", "Describe") from exc
            described = found.topics.get(topic)
            now = time.monotonic()
            if described is None:
                if now < listed:
                    time.sleep(0.1)  # polling the broker: no event to wait on
                    continue
                unseen = (
                    f" (or {self.security.principal} may not Describe it)"
                    if self.security.security_protocol != "PLAINTEXT"
                    else ""
                )
                raise TransportError(
                    f"topic {topic!r} does not exist{unseen}: start a coordinator with this "
                    "prefix first, or check the prefix"
                )
            if described.error is not None:
                if described.error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                    what = f"could not describe topic {topic!r}"
                    named = {"topic": repr(topic)}
                    raise _denied(described.error, what, self, "Describe", named)
            elif described.partitions and all(p.leader >= 0 for p in described.partitions.values()):
                return len(described.partitions)
            if now >= end:
                raise TransportError(f"could not describe topic {topic!r}: no leaders in time")
            time.sleep(0.1)  # leaders are still being elected

    def partition_for(self, key: bytes, partitions: int) -> int:
        """Kafka's default partitioner: murmur2 of the key (librdkafka's, in C)."""
        return _partition_of(key, partitions)

    # -- consuming ---------------------------------------------------------------------------

    @asynccontextmanager
    async def consumer(
        self,
        group_id: str,
        topics: Sequence[str],
        listener: RebalanceListener | None = None,
    ) -> AsyncIterator[_RdKafkaConsumer]:
        """A ``read_committed`` group member; leaves the group cleanly on exit (a static member,
        with ``instance_id``, stays: its partitions wait for it to come back)."""
        with self._instance(group_id) as instance:
            timeout_ms = int(self.session_timeout * 1000)
            config = self._config(
                group_id,
                **{
                    "group.id": group_id,
                    "isolation.level": "read_committed",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "auto.offset.reset": "earliest",
                    "partition.assignment.strategy": "range",
                    "session.timeout.ms": timeout_ms,
                    "heartbeat.interval.ms": min(1_000, timeout_ms // 3),
                    "max.poll.interval.ms": 120_000,
                    "metadata.max.age.ms": 30_000,
                    "fetch.wait.max.ms": 50,  # replies wait on this: a long poll adds latency
                },
            )
            if instance is not None:
                config["group.instance.id"] = instance
            member = _RdKafkaConsumer(self, group_id, listener)
            await member._open(config, list(topics))
            members = self._members.setdefault(group_id, [])
            members.append(member)
            try:
                yield member
            finally:
                members.remove(member)
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.deadline):
                    await member._close()

    def _group_metadata(self, group_id: str) -> object:
        """The metadata a transaction's offsets are sent with (called on a worker thread): the
        live member's, else the group id's alone (made once, by a consumer that never
        connects)."""
        for member in self._members.get(group_id, ()):
            if (live := member._metadata()) is not None:
                return live
        metadata = self._bare_metadata.get(group_id)
        if metadata is None:
            bare = RdConsumer({"group.id": group_id, "logger": _librdkafka_log})
            try:
                metadata = self._bare_metadata[group_id] = bare.consumer_group_metadata()
            finally:
                bare.close()
        return metadata

    async def read(self, topic: str, partition: int, start: int = 0) -> AsyncIterator[Record]:
        """Reads committed records of one partition from ``start`` up to its end now.

        Raises:
            TransportError: The broker could not be reached in time, or refused.
        """
        what = f"reading {topic}/{partition} failed"
        ends = await anyio.to_thread.run_sync(self._end_offsets, topic, [partition], what)
        end = ends[partition]
        if start >= end:
            return
        reader = _Reader(self, topic, partition, start, end)
        await anyio.to_thread.run_sync(reader.open, limiter=reader.limiter)
        try:
            while True:
                with anyio.fail_after(self.deadline):
                    batch, done = await anyio.to_thread.run_sync(
                        reader.next, limiter=reader.limiter
                    )
                for record in batch:
                    yield record
                if done:
                    return
        except TimeoutError as exc:
            raise TransportError(f"{what}: no records in {self.deadline} s") from exc
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(reader.close, limiter=reader.limiter)

    def _end_offsets(self, topic: str, partitions: Sequence[int], what: str) -> dict[int, int]:
        """The last stable offsets (``read_committed``'s end) of ``partitions`` (called on a
        worker thread)."""
        latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
        end = time.monotonic() + self.deadline
        while True:
            futures = self._admin().list_offsets(
                {TopicPartition(topic, p): latest for p in partitions},
                isolation_level=IsolationLevel.READ_COMMITTED,
                request_timeout=max(0.1, end - time.monotonic()),
            )
            try:
                return {
                    tp.partition: int(f.result(timeout=max(0.1, end - time.monotonic())).offset)
                    for tp, f in futures.items()
                }
            except KafkaException as exc:
                error = exc.args[0]
                # A topic created a moment ago has no leader yet (aiokafka retries this too).
                retry = error.retriable() or error.code() in _NO_LEADER_YET
                if not retry or time.monotonic() >= end:
                    raise self._error(exc, what, "Describe", {"topic": repr(topic)}) from exc
            except TimeoutError as exc:
                raise TransportError(f"{what}: no end offset in {self.deadline} s") from exc
            time.sleep(0.05)  # polling the broker: no event to wait on

    @asynccontextmanager
    async def tail(self, topic: str, starts: Mapping[int, int]) -> AsyncIterator[_RdKafkaTail]:
        """A ``read_committed`` reader of the partitions of ``topic`` that ``starts`` names,
        from those offsets on, in no consumer group: one consumer, assigned and kept open (an
        offset the broker no longer holds reads from the earliest it does)."""
        if any(o < 0 for o in starts.values()):
            raise ValueError(f"tail of {topic}: offsets cannot be negative ({dict(starts)})")
        tail = _RdKafkaTail(self, topic, starts)
        await anyio.to_thread.run_sync(tail.open, limiter=tail.limiter)
        try:
            yield tail
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(tail.close, limiter=tail.limiter)

    # -- producing ---------------------------------------------------------------------------

    @asynccontextmanager
    async def producer(self) -> AsyncIterator[_RdKafkaProducer]:
        """An idempotent producer (acks=all)."""
        config = self._config(
            "producer",
            **{
                "enable.idempotence": True,
                "acks": "all",
                "partitioner": "murmur2_random",
                "linger.ms": 1,
                "message.max.bytes": MAX_RECORD_BYTES,
                # A record not acknowledged by the deadline is given up (its sender was told it
                # failed) rather than delivered minutes later, after the sender's retry.
                "message.timeout.ms": self._message_timeout_ms(),
            },
        )
        producer = _RdKafkaProducer(self, config)
        try:
            yield producer
        finally:
            with anyio.CancelScope(shield=True):
                await producer._close()

    @asynccontextmanager
    async def tx_producer(self, transactional_id: str) -> AsyncIterator[_RdKafkaTxProducer]:
        """A transactional producer. Starting it fences older producers with the same id and
        aborts their open transaction, so a reader started afterwards sees a settled log.

        Raises:
            Fenced: A newer producer with the same id started meanwhile.
            TransportError: It could not start (whatever failed; the caller retries).
        """
        config = self._config(
            transactional_id,
            **{
                "transactional.id": transactional_id,
                "enable.idempotence": True,
                "acks": "all",
                "partitioner": "murmur2_random",
                "transaction.timeout.ms": 60_000,
                "retry.backoff.ms": TX_RETRY_BACKOFF_MS,
                "message.max.bytes": MAX_RECORD_BYTES,
                "message.timeout.ms": self._message_timeout_ms(),
            },
        )
        producer = _RdKafkaTxProducer(self, transactional_id)
        await producer._open(config)
        try:
            yield producer
        finally:
            with anyio.CancelScope(shield=True):
                await producer._close()

    def _message_timeout_ms(self) -> int:
        # librdkafka requires it within the transaction timeout (60 s).
        return max(1_000, min(60_000, int(self.deadline * 1000)))

    # -- errors ------------------------------------------------------------------------------

    def _error(
        self,
        exc: BaseException,
        what: str,
        right: str,
        resources: Mapping[str, str] | None = None,
    ) -> TransportError:
        """``exc`` from librdkafka as the `TransportError` to raise (see `_denied` for
        ``resources``)."""
        return _as_transport_error(exc, what, self, right, resources)


_NO_LEADER_YET = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        # Metadata a moment behind the broker's (a topic just created, a leader just moved):
        # the Java client retries both after refreshing its metadata.
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError._TIMED_OUT,
    }
)

_RETRIED_CONNECTING = frozenset(
    {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE}
)
"""Connection errors librdkafka retries by itself; a cause is looked for past them."""


@lru_cache(maxsize=8192)
def _partition_of(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (librdkafka's murmur2, Java's), cached: a saga's key is
    partitioned again and again while the saga runs."""
    return murmur2(key, partitions)


def _security_config(s: KafkaSecurity) -> dict[str, Any]:
    """librdkafka's names for the settings of ``s``.

    Raises:
        KafkaSettingsError: OAUTHBEARER (see the module's docstring), or a file that cannot be
            used (checked as the aiokafka adapter checks it: the TLS context is built once).
    """
    config: dict[str, Any] = {"security.protocol": s.security_protocol.lower()}
    if s.security_protocol in ("SSL", "SASL_SSL"):
        s.ssl_context()  # the same checks and messages as the aiokafka adapter's, at start-up
        config["ssl.endpoint.identification.algorithm"] = (
            "https" if s.ssl_check_hostname else "none"
        )
        if s.ssl_ca_location is not None:
            config["ssl.ca.location"] = str(s.ssl_ca_location)
        if s.ssl_certificate_location is not None:
            config["ssl.certificate.location"] = str(s.ssl_certificate_location)
        if s.ssl_key_location is not None:
            config["ssl.key.location"] = str(s.ssl_key_location)
        if s.ssl_key_password is not None:
            config["ssl.key.password"] = s.ssl_key_password.get_secret_value()
    if s.sasl_mechanism == "OAUTHBEARER":
        raise KafkaSettingsError(
            f"sasl_mechanism ({ENV['sasl_mechanism']}) OAUTHBEARER is not supported with the "
            "librdkafka client: its token provider is an aiokafka AbstractTokenProvider, which "
            "librdkafka cannot call; use the aiokafka client (unset SAGA_KAFKA_CLIENT), or "
            "SCRAM-SHA-512"
        )
    if s.sasl_mechanism is not None:
        password = s.password()
        config["sasl.mechanism"] = s.sasl_mechanism
        config["sasl.username"] = s.sasl_username
        config["sasl.password"] = None if password is None else password.get_secret_value()
    return config


def _denied(
    error: KafkaError,
    what: str,
    t: RdKafkaTransport,
    right: str,
    resources: Mapping[str, str] | None = None,
) -> Unauthorized:
    """The refusal as `Unauthorized`, naming the principal, the right and the resource:
    ``resources`` gives the names the caller knows by kind (librdkafka's error has none)."""
    kind = _DENIED[error.code()]
    principal = t.security.principal
    if error.code() == KafkaError.GROUP_AUTHORIZATION_FAILED:
        lacking = "Read"
    elif error.code() == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
        lacking = "Write"
    elif error.code() == KafkaError.CLUSTER_AUTHORIZATION_FAILED:
        lacking = "IdempotentWrite" if right == "Write" else right
    else:
        lacking = right
    named = (resources or {}).get(kind)
    if kind == "the cluster":
        resource = kind
    elif named is not None:
        resource = f"{kind} {named}"
    else:
        resource = f"the {kind} ({error.str()})"
    return Unauthorized(
        f"{what}: {principal} lacks the {lacking} right on {resource}: grant it (an ACL "
        f"allowing {principal} {lacking} on {resource}), or run with a principal that has it"
    )


def _as_transport_error(
    exc: BaseException,
    what: str,
    t: RdKafkaTransport,
    right: str,
    resources: Mapping[str, str] | None = None,
) -> TransportError:
    """``exc`` as the `TransportError` to raise: a refused right as `Unauthorized`; a
    librdkafka error with its name and text, retriable unless librdkafka says it is fatal or
    the same request cannot succeed (a record too large)."""
    if isinstance(exc, TransportError):
        return exc
    error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    if not isinstance(error, KafkaError):
        return TransportError(f"{what}: {exc!r}")
    if error.code() in _DENIED:
        return _denied(error, what, t, right, resources)
    if error.code() == KafkaError._AUTHENTICATION:
        return t._explain(error)
    failure = TransportError(f"{what}: {error.name()}: {error.str()}")
    if error.fatal() or error.code() in (
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_CONFIG,
    ):
        failure.retriable = False
    return failure


def _record(m: Message) -> Record:
    headers = m.headers()
    return Record(
        topic=cast(str, m.topic()),
        partition=cast(int, m.partition()),
        offset=cast(int, m.offset()),
        key=m.key(),
        value=m.value(),
        headers=tuple(cast("list[tuple[str, bytes]]", headers)) if headers else (),
        timestamp=m.timestamp()[1] / 1000,
    )


class _Callback:
    """A rebalance callback under way on a consumer's worker thread: the consumer calls the
    listener makes meanwhile, to run on that thread."""

    __slots__ = ("jobs",)

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()


class _Job:
    __slots__ = ("args", "done", "error", "fn", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.done = anyio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class _RdKafkaConsumer:
    """A group member: see the module's docstring for how its calls meet the event loop."""

    def __init__(
        self, transport: RdKafkaTransport, group_id: str, listener: RebalanceListener | None
    ) -> None:
        self._t = transport
        self._group = group_id
        self._listener = listener
        self._c: RdConsumer | None = None
        self._token = anyio.lowlevel.current_token()
        self._assignment: frozenset[TP] = frozenset()
        self._busy = False  # a blocking call of this consumer is under way on a worker thread
        self._waiting = 0  # calls other than polls waiting for the consumer
        self._group_metadata: object = None  # this member's, as of its latest assignment
        self._changed = anyio.Event()  # set when it ends or a callback starts (then replaced)
        self._callback: _Callback | None = None
        self._listener_failure: BaseException | None = None

    async def _open(self, config: dict[str, Any], topics: list[str]) -> None:
        def start() -> RdConsumer:
            consumer = RdConsumer(config)
            consumer.subscribe(
                topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
            )
            return consumer

        try:
            self._c = await anyio.to_thread.run_sync(start)
        except KafkaException as exc:
            what = f"could not start the consumer of {self._group!r}"
            raise self._t._error(exc, what, "Read", {"consumer group": repr(self._group)}) from exc

    async def _close(self) -> None:
        if self._c is not None:
            consumer = self._c
            try:
                await self._call(consumer.close)  # leaves the group: its revocation runs here
            except (KafkaException, RuntimeError) as exc:  # closing is tidying up
                log.debug("closing a consumer of %r failed: %r", self._group, exc)

    # -- serialised calls --------------------------------------------------------------------

    def _signal(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _call(self, fn: Callable[..., T], *args: Any, poll: bool = False) -> T:
        """``fn(*args)`` on a worker thread, after the consumer's call under way; during a
        rebalance callback, on the callback's own thread (not a ``poll``: it waits).

        The other calls go before a poll: the poller asks again as soon as its slice ends, and
        would otherwise take the consumer back before a waiting commit could."""
        waiting = False
        try:
            while True:
                callback = self._callback
                if callback is not None and not poll:
                    job = _Job(fn, args)
                    callback.jobs.put(job)
                    await job.done.wait()
                    if job.error is not None:
                        raise job.error
                    return cast(T, job.result)
                if not self._busy and callback is None and not (poll and self._waiting):
                    if waiting:
                        waiting = False
                        self._waiting -= 1
                    self._busy = True
                    try:
                        return await anyio.to_thread.run_sync(fn, *args)
                    finally:
                        self._busy = False
                        self._signal()
                if not poll and not waiting:
                    waiting = True
                    self._waiting += 1
                await self._changed.wait()
        finally:
            if waiting:
                self._waiting -= 1

    # -- rebalance callbacks, on the worker thread of the poll ---------------------------------

    def _on_assign(self, consumer: RdConsumer, partitions: list[TopicPartition]) -> None:
        consumer.assign(partitions)  # before the listener: it may ask for the assignment
        # Taken here, where the consumer admits it: from another thread it waits for the poll,
        # and a transaction waiting for it can hold up a revocation waiting for the transaction.
        # The generation changes only in a rebalance, which ends here.
        self._group_metadata = consumer.consumer_group_metadata()
        assigned = frozenset((tp.topic, tp.partition) for tp in partitions)
        self._assignment = assigned
        if self._listener is not None:
            self._run_listener(self._listener.on_assigned, assigned)

    def _on_revoke(self, consumer: RdConsumer, partitions: list[TopicPartition]) -> None:
        revoked = frozenset((tp.topic, tp.partition) for tp in partitions)
        try:
            if self._listener is not None and revoked:
                self._run_listener(self._listener.on_revoked, revoked)
        finally:
            self._assignment = self._assignment - revoked
            consumer.unassign()

    def _on_lost(self, consumer: RdConsumer, partitions: list[TopicPartition]) -> None:
        # The session ended without us (a long freeze): gone as if revoked, and the listener
        # must drop them the same way.
        self._on_revoke(consumer, partitions)

    def _run_listener(self, handler: Callable[[frozenset[TP]], Any], parts: frozenset[TP]) -> None:
        """Runs ``handler(parts)`` on the event loop and waits for it, running the consumer's
        calls it makes meanwhile here (see the module's docstring)."""
        callback = _Callback()

        async def listen() -> None:
            try:
                await handler(parts)
            except Exception as exc:
                # Raised from the poll when it returns: as the listener's own failure.
                self._listener_failure = exc
            finally:
                self._callback = None
                callback.jobs.put(None)

        def begin() -> None:
            self._callback = callback
            self._signal()

        anyio.from_thread.run_sync(begin, token=self._token)

        # A thread of its own waits for the listener, so that this one stays free for its calls.
        def wait() -> None:
            try:
                anyio.from_thread.run(listen, token=self._token)
            except BaseException as exc:  # the event loop is closing: nobody waits for us
                log.warning(
                    "consumer of %r: the rebalance listener did not run: %r", self._group, exc
                )
                callback.jobs.put(None)

        waiter = threading.Thread(
            target=wait,
            name=f"saga-rebalance-{self._group}",
            daemon=True,
        )
        waiter.start()
        while (job := callback.jobs.get()) is not None:
            try:
                job.result = job.fn(*job.args)
            except BaseException as exc:
                job.error = exc
            anyio.from_thread.run_sync(job.done.set, token=self._token)
        waiter.join()

    def _metadata(self) -> object:
        """This member's group metadata as of its latest assignment (``None`` before one)."""
        return self._group_metadata

    # -- the port ----------------------------------------------------------------------------

    async def poll(self, timeout: float, max_records: int = 500) -> list[Record]:
        """Records from the assigned partitions, waiting up to ``timeout`` seconds for some."""
        end = anyio.current_time() + timeout
        while True:
            left = end - anyio.current_time()
            records = await self._call(
                self._fetch, max(0.0, min(POLL_SLICE, left)), max_records, poll=True
            )
            failure, self._listener_failure = self._listener_failure, None
            if failure is not None:
                raise failure
            if records or left <= POLL_SLICE:
                return records

    def _fetch(self, timeout: float, max_records: int) -> list[Record]:
        c = self._c
        assert c is not None
        # consume(n, timeout) waits for all n or the timeout; poll returns at the first record,
        # and the rest already fetched are taken without waiting.
        first = c.poll(timeout)
        if first is None:
            return []
        messages = [first]
        if max_records > 1:
            messages += c.consume(max_records - 1, 0)
        records = []
        for m in messages:
            error = m.error()
            if error is None:
                records.append(_record(m))
            elif error.code() in _DENIED or error.fatal():
                named = {"topic": repr(m.topic()), "consumer group": repr(self._group)}
                raise self._t._error(KafkaException(error), "poll failed", "Read", named)
            elif error.code() not in _QUIET:
                log.warning("consumer of %r: %s: %s", self._group, error.name(), error.str())
        return records

    def assignment(self) -> frozenset[TP]:
        """The partitions this member owns now."""
        return self._assignment

    async def commit(self, offsets: Mapping[TP, int]) -> None:
        """Commits the next offsets to read (outside any transaction)."""
        if not offsets:
            return
        c = self._c
        assert c is not None
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            with anyio.fail_after(self._t.deadline):
                done = await self._call(_commit_sync, c, tps)
        except (KafkaException, TimeoutError) as exc:
            named = {"consumer group": repr(self._group)}
            raise self._t._error(exc, "offset commit failed", "Read", named) from exc
        for tp in done or ():
            if tp.error is not None:
                named = {"consumer group": repr(self._group), "topic": repr(tp.topic)}
                failure = KafkaException(tp.error)
                raise self._t._error(failure, "offset commit failed", "Read", named)

    async def seek_to_committed(self, partitions: frozenset[TP]) -> None:
        """Rewinds to the group's committed offsets, so that uncommitted records come again."""
        owned = sorted(partitions & self._assignment)
        if not owned:
            return
        c = self._c
        assert c is not None
        deadline = self._t.deadline

        def rewind() -> None:
            committed = c.committed([TopicPartition(t, p) for t, p in owned], timeout=deadline)
            for tp in committed:
                if tp.error is not None:
                    raise KafkaException(tp.error)
                # No committed offset: from the beginning (OFFSET_BEGINNING), as a new member.
                target = tp.offset if tp.offset >= 0 else -2
                c.seek(TopicPartition(tp.topic, tp.partition, target))

        try:
            await self._call(rewind)
        except KafkaException as exc:
            what = "rewinding to the committed offsets failed"
            raise self._t._error(exc, what, "Describe") from exc


def _commit_sync(c: RdConsumer, offsets: list[TopicPartition]) -> list[TopicPartition]:
    return c.commit(offsets=offsets, asynchronous=False)


class _Groupless:
    """A consumer that joins no group, assigned partitions of one topic from given offsets
    (`_Reader`, `_RdKafkaTail`); its calls run on a worker thread of its own, in order."""

    def __init__(self, t: RdKafkaTransport, topic: str, starts: Mapping[int, int]) -> None:
        self.t = t
        self.topic = topic
        self.positions = dict(sorted(starts.items()))  # the next offset each poll reads
        self.limiter = anyio.CapacityLimiter(1)
        self.consumer: RdConsumer | None = None

    def open(self) -> None:
        config = self.t._config(
            "reader",
            **{
                "group.id": f"{self.t.client_id}-reader",  # required, never joined or committed
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                # An offset retention deleted reads from the earliest held.
                "auto.offset.reset": "earliest",
                # The end is reported: past the transaction markers that hold the last offsets.
                "enable.partition.eof": True,
                "fetch.wait.max.ms": 50,  # as the group consumers': a follower waits on it
            },
        )
        self.consumer = RdConsumer(config)
        self.consumer.assign([TopicPartition(self.topic, p, o) for p, o in self.positions.items()])

    def fetch(self, timeout: float, max_records: int) -> tuple[list[Record], set[int]]:
        """The records at hand (waiting up to ``timeout`` for the first), and the partitions
        found at their end."""
        c = self.consumer
        assert c is not None
        first = c.poll(timeout)
        messages = [first, *c.consume(max_records - 1, 0)] if first is not None else []
        records: list[Record] = []
        ended: set[int] = set()
        for m in messages:
            error = m.error()
            partition = cast(int, m.partition())
            if error is None:
                records.append(_record(m))
                self.positions[partition] = cast(int, m.offset()) + 1
            elif error.code() == KafkaError._PARTITION_EOF:
                # Its offset is the fetch position, past markers and aborted records.
                self.positions[partition] = cast(int, m.offset())
                ended.add(partition)
            elif error.code() == KafkaError.GROUP_AUTHORIZATION_FAILED:
                # librdkafka looks up the group it requires even for a consumer that never
                # joins, fetches or commits: a principal without rights on it reads anyway.
                continue
            elif error.code() in _DENIED or error.fatal():
                what = f"reading {self.topic} failed"
                named = {"topic": repr(self.topic)}
                raise self.t._error(KafkaException(error), what, "Read", named)
            elif error.code() not in _QUIET:
                log.warning("reader of %s: %s: %s", self.topic, error.name(), error.str())
        return records, ended

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()


class _Reader(_Groupless):
    """One partition read to an end offset."""

    def __init__(
        self, t: RdKafkaTransport, topic: str, partition: int, start: int, end: int
    ) -> None:
        super().__init__(t, topic, {partition: start})
        self.partition = partition
        self.end = end

    def next(self) -> tuple[list[Record], bool]:
        """The next records below the end, and whether the end was reached."""
        records, ended = self.fetch(0.2, 1000)
        below = [r for r in records if r.offset < self.end]
        return below, bool(ended) or len(below) < len(records)


class _RdKafkaTail:
    """A `Tail` (`RdKafkaTransport.tail`): a group-less consumer kept open."""

    def __init__(self, t: RdKafkaTransport, topic: str, starts: Mapping[int, int]) -> None:
        self._t = t
        self._topic = topic
        self._reader = _Groupless(t, topic, starts)
        self.limiter = self._reader.limiter

    def open(self) -> None:
        self._reader.open()

    def close(self) -> None:
        self._reader.close()

    async def poll(self, timeout: float, max_records: int = 500) -> list[Record]:
        """The next committed records of the tailed partitions, waiting up to ``timeout``
        seconds for some (in slices, so that closing the tail does not wait for a long poll)."""
        end = anyio.current_time() + timeout
        while True:
            left = end - anyio.current_time()
            records, _ = await anyio.to_thread.run_sync(
                self._reader.fetch,
                max(0.0, min(POLL_SLICE, left)),
                max_records,
                limiter=self.limiter,
            )
            if records or left <= POLL_SLICE:
                return records

    async def end_offsets(self) -> dict[int, int]:
        """Per tailed partition, its last stable offset now."""
        what = f"tail of {self._topic}: end offsets failed"
        partitions = list(self._reader.positions)
        return await anyio.to_thread.run_sync(self._t._end_offsets, self._topic, partitions, what)

    async def positions(self) -> dict[int, int]:
        """Per tailed partition, the offset the next poll reads from (past the markers once
        the partition's end was reached: librdkafka reports the end with the position)."""
        await anyio.lowlevel.checkpoint()
        return dict(self._reader.positions)


class _Flush:
    """Records handed to a `_RdKafkaProducer` while its previous write was under way."""

    __slots__ = ("done", "errors", "records")

    def __init__(self) -> None:
        self.records: list[Outgoing] = []
        self.done = anyio.Event()
        self.errors: list[tuple[KafkaError, str | None]] = []  # with the record's topic

    def delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self.errors.append((error, message.topic()))


class _RdKafkaProducer:
    """The idempotent producer, writing in groups, as the aiokafka adapter's does: records
    handed in while a write is under way go out together in the next one, whose senders all
    wait for one flush (one thread hop) instead of one each."""

    def __init__(self, t: RdKafkaTransport, config: dict[str, Any]) -> None:
        self._t = t
        self._p = RdProducer(config)  # connects in the background: nothing blocks here
        self._limiter = anyio.CapacityLimiter(1)
        self._open: _Flush | None = None
        self._writing: anyio.Event | None = None

    async def send(self, records: Sequence[Outgoing]) -> None:
        """Writes the records and waits until the broker acknowledged all of them."""
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
        if group.errors:
            error, topic = group.errors[0]
            named = {"topic": repr(topic)} if topic else None
            raise self._t._error(KafkaException(error), "send failed", "Write", named)

    async def _write(self, group: _Flush) -> None:
        try:
            while self._writing is not None:
                await self._writing.wait()
            self._open = None  # what comes now goes into the next write
            self._writing = writing = anyio.Event()
            try:
                for r in group.records:
                    _produce(self._p, r, group.delivered)
                left = await anyio.to_thread.run_sync(
                    self._p.flush, self._t.deadline, limiter=self._limiter
                )
                if left:
                    raise TransportError(
                        f"send failed: {left} records not acknowledged in {self._t.deadline} s"
                    )
            finally:
                self._writing = None
                writing.set()
        except KafkaException as exc:
            group.errors.append((exc.args[0], None))
        except BufferError as exc:
            group.errors.append((KafkaError(KafkaError._QUEUE_FULL, str(exc)), None))
        finally:
            if self._open is group:
                self._open = None
            group.done.set()

    async def _close(self) -> None:
        def close() -> None:
            self._p.flush(self._t.deadline)
            self._p.close()

        await anyio.to_thread.run_sync(close, limiter=self._limiter)


def _produce(p: RdProducer, r: Outgoing, delivered: Callable[..., None]) -> None:
    p.produce(
        r.topic,
        r.value,
        r.key,
        partition=-1 if r.partition is None else r.partition,
        on_delivery=delivered,
        headers=list(r.headers) if r.headers else None,
    )


def _close_quietly(p: RdProducer) -> None:
    # Nothing is in flight between transactions: closing does not wait for records. After a
    # fatal error (a fence) confluent-kafka's close raises SystemError; the producer is
    # discarded either way.
    try:
        p.close()
    except Exception as exc:
        log.debug("closing a transactional producer failed: %r", exc)


class _RdKafkaTxProducer:
    """A transactional producer: each commit is one transaction, in one worker thread call."""

    def __init__(self, t: RdKafkaTransport, transactional_id: str) -> None:
        self._t = t
        self._id = transactional_id
        self._p: RdProducer | None = None
        self._limiter = anyio.CapacityLimiter(1)
        self._broken: str | None = None

    async def _open(self, config: dict[str, Any]) -> None:
        def start() -> RdProducer:
            producer = RdProducer(config)
            try:
                producer.init_transactions(self._t.deadline)
            except BaseException:
                _close_quietly(producer)  # its threads and connections, now rather than at GC
                raise
            return producer

        try:
            self._p = await anyio.to_thread.run_sync(start, limiter=self._limiter)
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() in _FENCED_CODES:
                raise Fenced(f"producer {self._id!r}: {error.str()}") from exc
            what = f"could not start producer {self._id!r}"
            named = {"transactional id": repr(self._id)}
            raise self._t._error(exc, what, "Write", named) from exc

    async def _close(self) -> None:
        if self._p is not None:
            await anyio.to_thread.run_sync(_close_quietly, self._p, limiter=self._limiter)

    async def commit(
        self,
        records: Sequence[Outgoing],
        offsets: Mapping[TP, int],
        group_id: str,
    ) -> list[int]:
        """Writes the records and commits the consumer offsets in one transaction.

        Raises:
            Fenced: A newer producer with the same transactional id exists.
            TransportError: The transaction was aborted; nothing was written.
        """
        if self._broken:
            raise TransportError(f"producer unusable after an earlier failure: {self._broken}")
        try:
            return await anyio.to_thread.run_sync(
                self._transact, records, offsets, group_id, limiter=self._limiter
            )
        except KafkaException as exc:
            error = exc.args[0]
            if isinstance(error, KafkaError) and error.code() in _FENCED_CODES:
                self._broken = "fenced"
                raise Fenced(f"producer {self._id!r}: {error.str()}") from exc
            self._broken = repr(error)
            named = {
                "topic": ", ".join(repr(t) for t in sorted({r.topic for r in records})),
                "transactional id": repr(self._id),
                "consumer group": repr(group_id),
            }
            raise self._t._error(exc, "transaction aborted", "Write", named) from exc
        except TransportError as exc:
            self._broken = str(exc)
            raise

    def _transact(
        self, records: Sequence[Outgoing], offsets: Mapping[TP, int], group_id: str
    ) -> list[int]:
        p = self._p
        assert p is not None
        end = time.monotonic() + self._t.deadline
        written: list[int] = [-1] * len(records)

        def delivered(i: int, error: KafkaError | None, message: Message) -> None:
            if error is None:
                written[i] = cast(int, message.offset())

        p.begin_transaction()
        try:
            for i, r in enumerate(records):
                try:
                    _produce(p, r, partial(delivered, i))
                except KafkaException as exc:
                    if exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE:
                        size = len(r.key or b"") + len(r.value or b"")
                        raise TransportError(
                            f"transaction aborted: the record for {r.topic} is {size} bytes, "
                            f"larger than a request may be ({MAX_RECORD_BYTES})",
                        ) from exc
                    raise
            if offsets:
                p.send_offsets_to_transaction(
                    [TopicPartition(t, n, o) for (t, n), o in offsets.items()],
                    self._t._group_metadata(group_id),
                    max(0.1, end - time.monotonic()),
                )
            p.commit_transaction(max(0.1, end - time.monotonic()))
        except BaseException:
            try:
                p.abort_transaction(min(5.0, max(0.1, end - time.monotonic())))
            except KafkaException as exc:  # fenced or fatal: the broker aborts it anyway
                log.debug("abort after a failed transaction also failed: %r", exc)
            raise
        if -1 in written:  # commit_transaction flushes: every record was acknowledged
            raise TransportError("transaction committed without every record's offset")
        return written
