"""A local Kafka cluster of several KRaft nodes on loopback, from the same cached Kafka.

Every node runs in combined mode (``process.roles=broker,controller``) and votes in one
controller quorum, which is the cheapest shape on a small machine: three JVMs, each as small as
the single broker of `deploy.kafka`. Each node is a `ClusterBroker`, a `KafkaServer` with its
own ports and data directory, so it can be killed, stopped, paused, resumed and restarted on its
data like the single broker. Replication is ``min(3, brokers)`` with ``min.insync.replicas`` one
less (2 on three brokers), for the internal topics too, and a broker that stops heartbeating is
fenced after 3 s, so a killed or frozen broker is noticed in a few seconds.

`start_kafka_cluster` picks free loopback ports below the kernel's ephemeral range (so that no
client connection can take a killed broker's port before it restarts), formats every data
directory with one cluster id, starts every node at once (a voter cannot become ready before a
majority of the quorum runs) and waits until each broker lists every broker as registered and
the quorum has a leader. `KafkaCluster` answers
which broker leads a partition and which replicas are in sync from raw Metadata and
DescribeQuorum requests, so this module needs no third-party client and no event loop, like the
rest of the package.

Command line (used by `make kafka-up BROKERS=3` / `make kafka-down`):

    python -m deploy.kafka_cluster up [--brokers 3] [--port 9092] [--controller-port 9093]
    python -m deploy.kafka_cluster down
    python -m deploy.kafka_cluster status

Node k (1, 2, ...) of ``up`` listens on ``port + 2(k-1)`` and ``controller-port + 2(k-1)``
(9092/9093, 9094/9095, 9096/9097 by default) and keeps its data in
``<cache>/run/kafka-cluster/broker-<k>``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import random
import shutil
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from deploy._daemon import Daemon
from deploy._proc import (
    LOOPBACK,
    InfraError,
    PortInUseError,
    StartError,
    check_port_free,
    free_port,
    log_tail,
    run_dir,
    stop_process,
)
from deploy._server import choose_ports
from deploy.kafka import (
    KAFKA_VERSION,
    KafkaServer,
    _random_cluster_id,
    _request,
    _server_properties,
)

__all__ = [
    "ClusterBroker",
    "ClusterMetadata",
    "KafkaCluster",
    "PartitionState",
    "QuorumState",
    "cluster_properties",
    "fetch_metadata",
    "fetch_quorum",
    "main",
    "start_kafka_cluster",
]

METADATA_TOPIC = "__cluster_metadata"
"""The KRaft quorum's own log (one partition), as DescribeQuorum names it."""


def cluster_properties(brokers: int) -> dict[str, str]:
    """The settings that differ from a single node's: replication, and fencing in seconds.

    Args:
        brokers: How many brokers the cluster has.

    Returns:
        server.properties entries that override `deploy.kafka`'s single-node ones.
    """
    replication = min(3, brokers)
    min_isr = max(1, replication - 1)
    return {
        "default.replication.factor": str(replication),
        "min.insync.replicas": str(min_isr),
        "offsets.topic.replication.factor": str(replication),
        "transaction.state.log.replication.factor": str(replication),
        "transaction.state.log.min.isr": str(min_isr),
        # Never elect a replica that is out of sync: that would lose acknowledged writes.
        "unclean.leader.election.enable": "false",
        # A broker that stops heartbeating (killed, frozen) is fenced after 3 s and drops out of
        # every ISR; a follower that falls behind while still heartbeating drops out after 10 s
        # (30 s by default) rather than holding up acks=all writes that long.
        "broker.heartbeat.interval.ms": "500",
        "broker.session.timeout.ms": "3000",
        "replica.lag.time.max.ms": "10000",
    }


# -- the wire protocol: just enough of Metadata v1 and DescribeQuorum v0 -------------------------


class _Reader:
    """Reads Kafka's big-endian primitives from a response, front to back."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def _unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return int(value)

    def int8(self) -> int:
        return self._unpack(">b")

    def int16(self) -> int:
        return self._unpack(">h")

    def int32(self) -> int:
        return self._unpack(">i")

    def int64(self) -> int:
        return self._unpack(">q")

    def string(self) -> str:
        size = self.int16()
        return self._take(max(size, 0))

    def uvarint(self) -> int:
        result = shift = 0
        while True:
            byte = self._unpack(">B")
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    def compact_string(self) -> str:
        return self._take(max(self.uvarint() - 1, 0))

    def compact_length(self) -> int:
        return max(self.uvarint() - 1, 0)

    def skip_tags(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()  # tag
            self._take(self.uvarint())

    def _take(self, size: int) -> str:
        if self.offset + size > len(self.data):
            raise struct.error("response ends early")
        text = self.data[self.offset : self.offset + size].decode("utf-8", errors="replace")
        self.offset += size
        return text


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@dataclass(frozen=True)
class PartitionState:
    """One partition as a broker's Metadata answer describes it.

    Attributes:
        leader: The leader's node id, -1 while there is none.
        replicas: The assigned replicas' node ids.
        isr: The in-sync replicas' node ids.
    """

    leader: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]

    @property
    def in_sync(self) -> bool:
        """Whether the partition has a leader and every replica is in sync."""
        return self.leader >= 0 and set(self.isr) == set(self.replicas)


@dataclass(frozen=True)
class ClusterMetadata:
    """A Metadata v1 answer of one broker.

    Attributes:
        brokers: The registered, unfenced brokers: node id to client port.
        controller: The node id the broker names as controller (in KRaft, any live broker).
        partitions: Every topic-partition of the cluster.
    """

    brokers: dict[int, int]
    controller: int
    partitions: dict[tuple[str, int], PartitionState]

    def leader(self, topic: str, partition: int) -> int | None:
        """The node id leading the topic-partition, None when unknown or leaderless."""
        state = self.partitions.get((topic, partition))
        return state.leader if state is not None and state.leader >= 0 else None

    def topic(self, topic: str) -> dict[int, PartitionState]:
        """The partitions of one topic, by number (empty when the topic is unknown)."""
        return {p: s for (t, p), s in self.partitions.items() if t == topic}


@dataclass(frozen=True)
class QuorumState:
    """A DescribeQuorum v0 answer: the controller quorum's leader and voters.

    Attributes:
        leader: The active controller's node id, -1 during an election.
        epoch: The leader epoch.
        voters: The voters' node ids.
    """

    leader: int
    epoch: int
    voters: tuple[int, ...]


def _query(port: int, timeout: float, ask: Callable[[socket.socket], bytes]) -> bytes | None:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=min(timeout, 2.0)) as sock:
            sock.settimeout(timeout)
            return ask(sock)
    except (OSError, struct.error):
        return None


def fetch_metadata(port: int, timeout: float = 3.0) -> ClusterMetadata | None:
    """Sends Metadata v1 for every topic to the broker on `port`.

    Listing every topic (a null topic list) never creates one, unlike naming a missing topic.

    Args:
        port: The broker's client port on 127.0.0.1.
        timeout: Seconds to wait for the answer; a paused broker takes all of it.

    Returns:
        The answer, or None when the broker does not answer in time.
    """
    raw = _query(port, timeout, lambda sock: _request(sock, 3, 1, 1, struct.pack(">i", -1)))
    if raw is None:
        return None
    try:
        reader = _Reader(raw)
        brokers: dict[int, int] = {}
        for _ in range(reader.int32()):
            node = reader.int32()
            reader.string()  # host
            brokers[node] = reader.int32()
            reader.string()  # rack (nullable: length -1)
        controller = reader.int32()
        partitions: dict[tuple[str, int], PartitionState] = {}
        for _ in range(reader.int32()):
            reader.int16()  # topic error code
            name = reader.string()
            reader.int8()  # is_internal
            for _ in range(reader.int32()):
                reader.int16()  # partition error code (e.g. LEADER_NOT_AVAILABLE)
                index = reader.int32()
                leader = reader.int32()
                replicas = tuple(reader.int32() for _ in range(reader.int32()))
                isr = tuple(reader.int32() for _ in range(reader.int32()))
                partitions[(name, index)] = PartitionState(leader, replicas, isr)
    except struct.error:
        return None
    return ClusterMetadata(brokers, controller, partitions)


def fetch_quorum(port: int, timeout: float = 3.0) -> QuorumState | None:
    """Sends DescribeQuorum v0 (a broker forwards it to the active controller).

    Args:
        port: A broker's client port (or a controller's port) on 127.0.0.1.
        timeout: Seconds to wait for the answer.

    Returns:
        The quorum's state, or None when there is no answer or it is an error.
    """
    name = METADATA_TOPIC.encode()
    body = (
        b"\x00"  # the request header's tagged fields (header v2: DescribeQuorum is flexible)
        + _uvarint(2) + _uvarint(len(name) + 1) + name  # one topic
        + _uvarint(2) + struct.pack(">i", 0) + b"\x00"  # one partition, partition 0
        + b"\x00"  # the topic's tagged fields
        + b"\x00"  # the request's tagged fields
    )  # fmt: skip
    raw = _query(port, timeout, lambda sock: _request(sock, 55, 0, 1, body))
    if raw is None:
        return None
    try:
        reader = _Reader(raw)
        reader.skip_tags()  # response header v1
        if reader.int16() != 0:
            return None
        for _ in range(reader.compact_length()):
            topic = reader.compact_string()
            for _ in range(reader.compact_length()):
                reader.int32()  # partition index
                error = reader.int16()
                leader = reader.int32()
                epoch = reader.int32()
                reader.int64()  # high watermark
                voters = []
                for _ in range(reader.compact_length()):
                    voters.append(reader.int32())
                    reader.int64()  # log end offset
                    reader.skip_tags()
                for _ in range(reader.compact_length()):  # observers
                    reader.int32()
                    reader.int64()
                    reader.skip_tags()
                reader.skip_tags()
                if topic == METADATA_TOPIC and error == 0:
                    return QuorumState(leader, epoch, tuple(voters))
            reader.skip_tags()
    except struct.error:
        return None
    return None


# -- the brokers and the cluster -------------------------------------------------------------


class ClusterBroker(KafkaServer):
    """One node of a `KafkaCluster`: a broker and a controller voter, with its own data.

    `kill`, `stop`, `pause`, `resume` and `restart` work as on `KafkaServer`; `restart` waits
    until the broker has registered with the quorum again.
    """

    TITLE = "the Kafka cluster broker"

    def __init__(
        self,
        *,
        node_id: int,
        port: int,
        controller_port: int,
        voters: str,
        cluster_id: str,
        brokers: int,
        data_dir: Path,
        ready_timeout: float,
    ) -> None:
        """Describes a node; `start_kafka_cluster` creates and starts them.

        Args:
            node_id: The node's id (1, 2, ...).
            port: The PLAINTEXT listener port on 127.0.0.1.
            controller_port: The controller listener port on 127.0.0.1.
            voters: The controller quorum, ``id@host:port,...``.
            cluster_id: The id every node's storage is formatted with.
            brokers: How many brokers the cluster has (for the replication settings).
            data_dir: Holds server.properties, log4j.properties, kafka.log and the log dirs.
            ready_timeout: Seconds each start may take before `StartError`.
        """
        super().__init__(
            port=port,
            controller_port=controller_port,
            data_dir=data_dir,
            owns_data_dir=False,
            ready_timeout=ready_timeout,
        )
        self.node_id = node_id
        self.voters = voters
        self.shared_cluster_id = cluster_id
        self.cluster_size = brokers
        self.paused = False
        """Whether `pause` froze the broker (until `resume`, `stop` or `kill`)."""

    @property
    def label(self) -> str:
        """The node and its address, for start-up errors."""
        return f"Kafka broker {self.node_id} on {self.bootstrap_servers}"

    def ports(self) -> dict[str, int]:
        """Returns the client and controller ports, keyed by role and node."""
        return {
            f"Kafka broker {self.node_id}": self.port,
            f"Kafka controller {self.node_id}": self.controller_port,
        }

    def ping(self, timeout: float = 5.0) -> bool:
        """Tells whether the broker answers Metadata and lists itself as registered.

        Args:
            timeout: Seconds to wait for the answer; a paused broker takes all of it.
        """
        meta = fetch_metadata(self.port, timeout)
        return meta is not None and self.node_id in meta.brokers

    def metadata(self, timeout: float = 3.0) -> ClusterMetadata | None:
        """This broker's view of the cluster, None when it does not answer in time."""
        return fetch_metadata(self.port, timeout)

    def pause(self) -> None:
        """Freezes the broker with SIGSTOP (see `KafkaServer.pause`)."""
        super().pause()
        self.paused = True

    def resume(self) -> None:
        """Continues a paused broker with SIGCONT."""
        super().resume()
        self.paused = False

    def stop(self, grace: float | None = None) -> None:
        """Shuts the broker down cleanly (see `KafkaServer.stop`)."""
        super().stop(grace)
        self.paused = False

    def kill(self) -> None:
        """Kills the broker with SIGKILL; its data stays for `restart`."""
        super().kill()
        self.paused = False

    def _config(self, log_dirs: Path) -> str:
        return _server_properties(
            self.port,
            self.controller_port,
            log_dirs,
            node_id=self.node_id,
            voters=self.voters,
            overrides=cluster_properties(self.cluster_size),
        )

    def _cluster_id(self) -> str:
        return self.shared_cluster_id

    def __repr__(self) -> str:
        """Shows the node, the endpoint, the pid and the data directory."""
        pid = self._shown_pid()
        return (
            f"ClusterBroker({self.node_id}, {self.bootstrap_servers}, pid={pid}, "
            f"paused={self.paused}, data_dir={self.data_dir})"
        )


def _in_parallel(brokers: Iterable[ClusterBroker], act: Callable[[ClusterBroker], None]) -> None:
    todo = list(brokers)
    if not todo:
        return
    with concurrent.futures.ThreadPoolExecutor(len(todo), thread_name_prefix="kafka") as pool:
        for future in [pool.submit(act, broker) for broker in todo]:
            future.result()


class KafkaCluster:
    """A running (or stopped) local Kafka cluster and the directory holding its brokers' data.

    Use it as a context manager: leaving the block stops every broker and, if
    `start_kafka_cluster` created the directory, removes it.
    """

    STOP_GRACE = 20.0
    """Seconds `stop` allows the brokers for a clean shutdown."""

    def __init__(
        self, brokers: Sequence[ClusterBroker], directory: Path, *, owns_directory: bool
    ) -> None:
        """Describes a cluster; `start_kafka_cluster` creates and starts it.

        Args:
            brokers: The nodes, in node id order.
            directory: Holds one ``broker-<id>`` directory per node.
            owns_directory: Whether `close` removes `directory`.
        """
        self.brokers = list(brokers)
        self.directory = directory
        self._owns_directory = owns_directory

    @property
    def bootstrap_servers(self) -> str:
        """Every broker's address, e.g. "127.0.0.1:40123,127.0.0.1:40125,127.0.0.1:40127"."""
        return ",".join(b.bootstrap_servers for b in self.brokers)

    def broker(self, node_id: int) -> ClusterBroker:
        """The broker with this node id.

        Raises:
            KeyError: No broker has it.
        """
        for broker in self.brokers:
            if broker.node_id == node_id:
                return broker
        raise KeyError(f"no broker with node id {node_id}")

    def answering(self) -> list[ClusterBroker]:
        """The brokers that run and are not paused (they may still be starting)."""
        return [b for b in self.brokers if b.running and not b.paused]

    def metadata(self, timeout: float = 3.0) -> ClusterMetadata:
        """The cluster as the first answering broker (running, not paused) describes it.

        Raises:
            InfraError: No broker answered within `timeout`.
        """
        for broker in self.answering():
            meta = broker.metadata(timeout)
            if meta is not None:
                return meta
        raise InfraError(f"no broker of the Kafka cluster at {self.bootstrap_servers} answers")

    def leader(self, topic: str, partition: int) -> ClusterBroker | None:
        """The broker leading the topic-partition now, None when it has no leader (or the
        leader is not one of these brokers).

        Raises:
            InfraError: No broker answered.
        """
        node = self.metadata().leader(topic, partition)
        return None if node is None else self.broker(node)

    def quorum(self, timeout: float = 3.0) -> QuorumState | None:
        """The controller quorum's state, from the first answering broker; None when no
        broker answers (or the quorum has no leader to forward the request to)."""
        for broker in self.answering():
            state = fetch_quorum(broker.port, timeout)
            if state is not None:
                return state
        return None

    def healthy(self, *, in_sync: bool = True) -> bool:
        """Whether every broker runs, lists every broker as registered, the quorum has a leader
        and (with `in_sync`) every partition of every topic has all its replicas in sync."""
        if any(not b.running or b.paused for b in self.brokers):
            return False
        wanted = {b.node_id for b in self.brokers}
        views = [b.metadata() for b in self.brokers]
        if any(view is None or set(view.brokers) != wanted for view in views):
            return False
        quorum = self.quorum()
        if quorum is None or quorum.leader < 0:
            return False
        if in_sync:
            return all(
                view is not None and all(s.in_sync for s in view.partitions.values())
                for view in views
            )
        return True

    def wait_healthy(self, timeout: float = 60.0, *, in_sync: bool = True) -> float:
        """Waits until `healthy`; returns the seconds it took.

        Raises:
            StartError: Not healthy within `timeout`; the message quotes the brokers' logs.
        """
        started = time.monotonic()
        deadline = started + timeout
        while not self.healthy(in_sync=in_sync):
            if time.monotonic() >= deadline:
                raise StartError(
                    f"the Kafka cluster at {self.bootstrap_servers} is not healthy after "
                    f"{timeout:.0f} s (brokers {self._state()}).\n{self.logs()}"
                )
            time.sleep(0.2)
        return time.monotonic() - started

    def start(self, ready_timeout: float = 120.0) -> None:
        """Starts every broker that is not running, at once, and waits until the cluster is
        healthy (every broker registered, the quorum with a leader).

        Raises:
            PortInUseError: A port is taken; every broker has been stopped.
            StartError: A broker exited or the cluster did not become healthy in time; every
                broker has been stopped, and the message quotes every broker's log.
        """
        failures: list[BaseException] = []

        def start_one(broker: ClusterBroker) -> None:
            try:
                broker.start()
            except BaseException as exc:
                failures.append(exc)
                # The others wait for a quorum that may never form: end their waits now.
                for other in self.brokers:
                    if other is not broker:
                        other.kill()

        try:
            _in_parallel([b for b in self.brokers if not b.running], start_one)
            if failures:
                first = failures[0]
                if not isinstance(first, StartError):
                    raise first
                raise StartError(f"the Kafka cluster did not start: {first}\n\n{self.logs()}")
            self.wait_healthy(ready_timeout, in_sync=False)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        """Kills every broker with SIGKILL; the data stays."""
        for broker in self.brokers:
            broker.kill()

    def stop(self, grace: float | None = None) -> None:
        """Shuts every broker down at once (SIGTERM), killing those left after `grace` s."""
        wait = self.STOP_GRACE if grace is None else grace
        _in_parallel(self.brokers, lambda b: b.stop(wait))

    def close(self) -> None:
        """Stops every broker and removes the directory if the cluster owns it."""
        self.stop()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def logs(self, lines: int = 30) -> str:
        """The end of every broker's log, for error messages."""
        return "\n\n".join(
            f"==== broker {b.node_id} ({b.log_path}):\n{log_tail(b.log_path, lines)}"
            for b in self.brokers
        )

    def _state(self) -> str:
        return ", ".join(
            f"{b.node_id}: {'paused' if b.paused else 'running' if b.running else 'down'}"
            for b in self.brokers
        )

    def __enter__(self) -> Self:
        """Returns the started cluster."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stops every broker and removes an owned directory."""
        self.close()

    def __repr__(self) -> str:
        """Shows the brokers and the directory."""
        return f"KafkaCluster({self.bootstrap_servers}, {self._state()}, dir={self.directory})"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _quiet_port(taken: set[int]) -> int:
    """A free loopback port below the kernel's ephemeral range, else any free port.

    A broker that is killed and restarted must get its port back. Ports the kernel hands out
    for outgoing connections (the clients reconnecting to the survivors meanwhile) come from
    the ephemeral range, so a port outside it cannot be taken by one of them while the broker
    is down.
    """
    low, _ = _ephemeral_range()
    pick = random.SystemRandom()
    for _ in range(200):
        port = pick.randrange(max(1024, low - 12000), low) if low > 2048 else free_port()
        if port in taken:
            continue
        try:
            check_port_free(port, "Kafka")
        except PortInUseError:
            continue
        return port
    return free_port()


def _existing_cluster_id(directory: Path) -> str | None:
    for meta in sorted(directory.glob("broker-*/logs/meta.properties")):
        for line in meta.read_text().splitlines():
            if line.startswith("cluster.id="):
                return line.split("=", 1)[1].strip()
    return None


def start_kafka_cluster(
    brokers: int = 3,
    *,
    ports: Sequence[int] | None = None,
    controller_ports: Sequence[int] | None = None,
    data_dir: Path | None = None,
    ready_timeout: float = 120.0,
) -> KafkaCluster:
    """Starts a KRaft cluster of `brokers` combined nodes on 127.0.0.1 and waits until it is up.

    Fetches Kafka first if the cache does not hold it. Each node's data directory
    (``<data_dir>/broker-<id>``) is formatted on first use, all with one cluster id, and reused
    as is afterwards.

    Args:
        brokers: How many nodes (each a broker and a controller voter); 3 tolerates one failure.
        ports: The nodes' client ports, in node id order; free ones when None.
        controller_ports: The nodes' controller ports; free ones when None.
        data_dir: Holds the nodes' directories; a new temporary directory, removed when the
            cluster is closed, when None.
        ready_timeout: Seconds to wait for the cluster to be up (each start of a broker, too).

    Returns:
        The running cluster.

    Raises:
        ValueError: `brokers` is below 1, or a port list has the wrong length.
        PortInUseError: A requested port is taken; nothing was started.
        ToolMissingError: java (or, when fetching, mvn) is missing.
        FetchError: Kafka could not be fetched.
        StartError: A broker exited or the cluster was not up in time; it has been stopped,
            and the message quotes every broker's log.
    """
    if brokers < 1:
        raise ValueError(f"a cluster needs at least one broker, not {brokers}")
    for given in (ports, controller_ports):
        if given is not None and len(given) != brokers:
            raise ValueError(f"{len(given)} ports given for {brokers} brokers")
    requested: dict[str, int | None] = {}
    for node in range(1, brokers + 1):
        requested[f"Kafka broker {node}"] = None if ports is None else ports[node - 1]
        requested[f"Kafka controller {node}"] = (
            None if controller_ports is None else controller_ports[node - 1]
        )
    taken = {port for port in requested.values() if port is not None}
    for role, port in requested.items():
        if port is None:
            requested[role] = port = _quiet_port(taken)
            taken.add(port)
    chosen = choose_ports(requested)
    owns = data_dir is None
    directory = Path(tempfile.mkdtemp(prefix="saga-kafka-cluster-")) if owns else data_dir
    assert directory is not None
    directory.mkdir(parents=True, exist_ok=True)
    cluster_id = _existing_cluster_id(directory) or _random_cluster_id()
    voters = ",".join(f"{node}@{LOOPBACK}:{chosen[2 * node - 1]}" for node in range(1, brokers + 1))
    nodes = [
        ClusterBroker(
            node_id=node,
            port=chosen[2 * node - 2],
            controller_port=chosen[2 * node - 1],
            voters=voters,
            cluster_id=cluster_id,
            brokers=brokers,
            data_dir=directory / f"broker-{node}",
            ready_timeout=ready_timeout,
        )
        for node in range(1, brokers + 1)
    ]
    cluster = KafkaCluster(nodes, directory, owns_directory=owns)
    try:
        cluster.start(ready_timeout)
    except BaseException:
        if owns:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return cluster


# -- the command line ------------------------------------------------------------------------

_RUN_NAME = "kafka-cluster"
_DOWN_GRACE = 30.0


class _BrokerDaemon(Daemon):
    """The pid and state files of one node of the background cluster, in one run directory."""

    def __init__(self, node_id: int) -> None:
        # A recorded pid counts only while it runs this node's configuration, not any broker's.
        config = run_dir(_RUN_NAME) / f"broker-{node_id}" / "server.properties"
        super().__init__(_RUN_NAME, expect=str(config))
        self.node_id = node_id
        self.pidfile = self.directory / f"broker-{node_id}.pid"
        self.statefile = self.directory / f"broker-{node_id}.json"


def _recorded() -> list[_BrokerDaemon]:
    directory = run_dir(_RUN_NAME)
    ids = sorted(
        int(p.stem.split("-", 1)[1])
        for p in directory.glob("broker-*.pid")
        if p.stem.split("-", 1)[1].isdigit()
    )
    return [_BrokerDaemon(node) for node in ids]


def _running() -> list[tuple[_BrokerDaemon, int, dict[str, object]]]:
    found = []
    for daemon in _recorded():
        hit = daemon.find()
        if hit is not None:
            found.append((daemon, hit[0], hit[1]))
    return found


def _up(brokers: int, port: int, controller_port: int) -> int:
    running = _running()
    if running:
        where = running[0][2].get("bootstrap_servers", "?")
        pids = ", ".join(f"{d.node_id}: pid {pid}" for d, pid, _ in running)
        print(f"The Kafka cluster is already running (brokers {pids}) at {where}.")
        return 0
    directory = run_dir(_RUN_NAME)
    formatted = sorted(p.name for p in directory.glob("broker-*") if p.is_dir())
    expected = [f"broker-{n}" for n in range(1, brokers + 1)]
    if formatted and formatted != sorted(expected):
        raise InfraError(
            f"{directory} holds the data of a cluster of {len(formatted)} brokers, not "
            f"{brokers}: start it with that many, or remove {directory} to start afresh"
        )
    ports = [port + 2 * i for i in range(brokers)]
    controller_ports = [controller_port + 2 * i for i in range(brokers)]
    if len(set(ports + controller_ports)) != 2 * brokers:
        raise InfraError(
            f"the ports {ports} and controller ports {controller_ports} overlap: node k listens "
            "on port + 2(k-1) and controller-port + 2(k-1), so pick two ports of different "
            "parity (e.g. 9092 and 9093)"
        )
    cluster = start_kafka_cluster(
        brokers, ports=ports, controller_ports=controller_ports, data_dir=directory
    )
    for broker in cluster.brokers:
        _BrokerDaemon(broker.node_id).record(
            broker.pid,
            {
                "bootstrap_servers": cluster.bootstrap_servers,
                "node_id": broker.node_id,
                "port": broker.port,
                "controller_port": broker.controller_port,
                "log": str(broker.log_path),
            },
        )
    print(
        f"A Kafka {KAFKA_VERSION} cluster of {brokers} brokers is up at "
        f"{cluster.bootstrap_servers}."
    )
    for broker in cluster.brokers:
        print(f"  broker {broker.node_id} (pid {broker.pid}): log {broker.log_path}")
    return 0


def _down() -> int:
    running = _running()
    if not running:
        for daemon in _recorded():
            daemon.forget()
        print("The Kafka cluster is not running.")
        return 0
    # All at once: a node that stops alone waits for the others' controlled shutdown.
    with concurrent.futures.ThreadPoolExecutor(len(running)) as pool:
        list(pool.map(lambda hit: stop_process(hit[1], grace=_DOWN_GRACE), running))
    for daemon in _recorded():
        daemon.forget()
    pids = ", ".join(f"{d.node_id}: pid {pid}" for d, pid, _ in running)
    print(f"The Kafka cluster (brokers {pids}) stopped.")
    return 0


def _status() -> int:
    running = _running()
    if not running:
        print("The Kafka cluster is not running.")
        return 3  # LSB's "program is not running".
    recorded = len(_recorded())
    print(
        f"The Kafka cluster is running ({len(running)} of {recorded} brokers) at "
        f"{running[0][2].get('bootstrap_servers', '?')}."
    )
    for daemon, pid, state in running:
        port = state.get("port")
        meta = fetch_metadata(port) if isinstance(port, int) else None
        answer = "NOT answering" if meta is None else f"sees brokers {sorted(meta.brokers)}"
        print(f"  broker {daemon.node_id} (pid {pid}), {answer}. Log: {state.get('log', '?')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code.

    Args:
        argv: The arguments after the program name; `sys.argv[1:]` when None.
    """
    parser = argparse.ArgumentParser(
        prog="python -m deploy.kafka_cluster",
        description="A local Kafka cluster of KRaft nodes on loopback.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the cluster in the background")
    up.add_argument("--brokers", type=int, default=3, help="how many nodes (default 3)")
    up.add_argument("--port", type=int, default=9092, help="node 1's client port (default 9092)")
    up.add_argument(
        "--controller-port", type=int, default=9093, help="node 1's controller port (9093)"
    )
    sub.add_parser("down", help="stop the background cluster")
    sub.add_parser("status", help="tell whether the background cluster runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "up":
            return _up(args.brokers, args.port, args.controller_port)
        if args.command == "down":
            return _down()
        return _status()
    except (InfraError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
