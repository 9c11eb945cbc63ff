"""A single-node Apache Kafka (KRaft) on loopback, fetched from Maven Central.

`fetch` resolves the broker's runtime classpath with Maven from `deploy/kafka/pom.xml` into
`<cache>/kafka/<version>/libs`. A marker holding the pom's hash is written only after the jars
are complete and moved into place, so an interrupted download is redone and a finished one is
never repeated. `start_kafka` writes `server.properties` into a data directory, formats the
storage the first time, starts `kafka.Kafka` and waits until the broker answers ApiVersions and
Metadata requests with itself registered. The returned `KafkaServer` can stop, kill, pause and
restart the broker on the same data, which the chaos tests need.

Command line (used by `make kafka-up` / `make kafka-down`):

    python -m deploy.kafka fetch
    python -m deploy.kafka up [--port 9092] [--controller-port 9093]
    python -m deploy.kafka down
    python -m deploy.kafka status

`up --secure` (and `down --secure`, `status --secure`) and `grant` are those of the secured broker
in `deploy.kafka_secure` (`make kafka-up SECURE=1`).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from deploy._proc import (
    LOOPBACK,
    FetchError,
    StartError,
    cache_dir,
    file_lock,
    remove_quietly,
    require_tool,
)
from deploy._server import LocalServer, ServerCli, UpOption, launch

__all__ = [
    "BENCH_JVM_OPTIONS",
    "JVM_OPTIONS",
    "KAFKA_VERSION",
    "KafkaServer",
    "fetch",
    "jvm_options",
    "kafka_home",
    "main",
    "start_kafka",
]

KAFKA_VERSION = "3.9.2"
"""The broker version; it must match `deploy/kafka/pom.xml`."""

_POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
_MAIN_JAR = f"kafka_2.13-{KAFKA_VERSION}.jar"
_JAVA_HINT = "Install a JDK 17 or newer (e.g. `apt-get install openjdk-17-jdk-headless`)."
_MVN_HINT = "Install Apache Maven 3.6 or newer (e.g. `apt-get install maven`)."

# The machine running the tests has two cores and runs pytest, the services and Jaeger beside
# the broker. A bounded heap and the serial collector keep the broker near 300-400 MB RSS and
# stop the JVM from spawning a parallel GC thread per core; C1-only compilation (tiered level 1)
# makes start-up markedly cheaper in CPU, and a test broker never runs long enough to profit
# from C2.
JVM_OPTIONS = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)

_LOG4J = """\
# Written by deploy/kafka.py. The broker's stdout is the log file next to this one.
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.log.LogCleaner=WARN
log4j.logger.org.apache.kafka.storage.internals.log=WARN
log4j.logger.kafka.log.UnifiedLog=WARN
log4j.logger.org.apache.kafka.common.utils.AppInfoParser=WARN
log4j.logger.org.apache.kafka.controller.AclControlManager=WARN
"""

_logger = logging.getLogger("deploy.kafka")


def kafka_home() -> Path:
    """Returns `<cache>/kafka/<version>`, where `fetch` puts the broker's jars."""
    return cache_dir() / "kafka" / KAFKA_VERSION


def _fingerprint() -> str:
    return hashlib.sha256(_POM.read_bytes()).hexdigest()


def fetch() -> Path:
    """Downloads the broker's jars into the cache unless a complete copy is already there.

    Returns:
        The directory holding the jars, for a `-cp '<dir>/*'` classpath.

    Raises:
        ToolMissingError: `mvn` or `java` is not on PATH (only checked when downloading).
        FetchError: Maven failed or produced no broker jar.
    """
    home = kafka_home()
    libs = home / "libs"
    marker = home / "complete"
    with file_lock(home / ".lock"):
        expected = _fingerprint()
        if libs.is_dir() and marker.is_file() and marker.read_text().strip() == expected:
            return libs
        require_tool("java", _JAVA_HINT)
        mvn = require_tool("mvn", _MVN_HINT)
        _logger.info("Fetching Kafka %s from Maven Central into %s", KAFKA_VERSION, libs)
        remove_quietly(marker)
        staging = Path(tempfile.mkdtemp(prefix="libs-", dir=home))
        try:
            argv = [
                mvn, "-q", "-B", "-f", str(_POM), "dependency:copy-dependencies",
                "-DincludeScope=runtime", f"-DoutputDirectory={staging}",
            ]  # fmt: skip
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
                raise FetchError(f"Maven could not fetch Kafka {KAFKA_VERSION}:\n{tail}")
            if not (staging / _MAIN_JAR).is_file():
                raise FetchError(f"Maven finished but {_MAIN_JAR} is missing from {staging}")
            shutil.rmtree(libs, ignore_errors=True)
            os.replace(staging, libs)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        # Written last: its presence means the jars above are complete.
        marker.write_text(expected + "\n")
        return libs


BENCH_JVM_OPTIONS = (
    "-Xms1g",
    "-Xmx1g",
    "-XX:+UseParallelGC",
    "-XX:ParallelGCThreads=1",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)
"""For benchmarks (`SAGA_KAFKA_JVM_OPTIONS`): the full JIT (C2) and a larger heap, as a broker
that runs for a while would be configured; start-up costs more CPU."""


def jvm_options() -> tuple[str, ...]:
    """The broker JVM's options: `SAGA_KAFKA_JVM_OPTIONS` (space-separated) when set, else
    `JVM_OPTIONS`."""
    given = os.environ.get("SAGA_KAFKA_JVM_OPTIONS", "").split()
    return tuple(given) if given else JVM_OPTIONS


def _java_argv(java: str, libs: Path, log4j: Path, main: str, *args: str) -> list[str]:
    return [
        java, *jvm_options(), f"-Dlog4j.configuration=file:{log4j}",
        "-cp", f"{libs}/*", main, *args,
    ]  # fmt: skip


def _server_properties(
    port: int,
    controller_port: int,
    log_dirs: Path,
    *,
    node_id: int = 1,
    voters: str | None = None,
    overrides: Mapping[str, str] | None = None,
) -> str:
    """The text of server.properties: a single node unless `voters` names a controller quorum
    (``id@host:port,...``) and `overrides` replaces the single node's replication settings."""
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": voters or f"{node_id}@{LOOPBACK}:{controller_port}",
        "listeners": f"PLAINTEXT://{LOOPBACK}:{port},CONTROLLER://{LOOPBACK}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(log_dirs),
        "num.partitions": "1",
        # One node: internal topics cannot be replicated, and fewer partitions make the first
        # consumer group and the first transaction start faster.
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "3",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "3",
        "group.initial.rebalance.delay.ms": "0",
        # After a SIGKILL the restarted broker cannot register until the controller expires
        # the dead incarnation's session (9 s by default); chaos tests kill and restart often.
        "broker.heartbeat.interval.ms": "500",
        "broker.session.timeout.ms": "3000",
        # Thread pools sized for a two-core machine rather than a production host.
        "num.network.threads": "2",
        "num.io.threads": "4",
        "background.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
        **(overrides or {}),
    }
    lines = ["# Written by deploy/kafka.py on every start; edits are overwritten."]
    lines += [f"{key}={value}" for key, value in props.items()]
    return "\n".join(lines) + "\n"


def _random_cluster_id() -> str:
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka's own generator avoids these: they look like flags.
            return text


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return bytes(buf)


def _request(sock: socket.socket, api_key: int, version: int, corr: int, body: bytes) -> bytes:
    client = b"saga-deploy"
    message = struct.pack(">hhih", api_key, version, corr, len(client)) + client + body
    sock.sendall(struct.pack(">i", len(message)) + message)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    payload = _recv_exact(sock, size)
    if struct.unpack_from(">i", payload)[0] != corr:
        raise ConnectionError("correlation id mismatch")
    return payload[4:]


def _broker_ready(port: int, timeout: float = 5.0) -> bool:
    """Sends ApiVersions v0 and Metadata v1; ready once a broker and a controller are listed.

    A raw request keeps this module free of third-party imports and of event loops, so it is
    safe to call from a pytest fixture while the anyio plugin owns a loop.
    """
    try:
        with socket.create_connection((LOOPBACK, port), timeout=min(timeout, 2.0)) as sock:
            sock.settimeout(timeout)
            api_versions = _request(sock, 18, 0, 1, b"")
            if struct.unpack_from(">h", api_versions)[0] != 0:
                return False
            return _metadata_ready(_request(sock, 3, 1, 2, struct.pack(">i", 0)))
    except (OSError, struct.error):
        return False


def _metadata_ready(meta: bytes) -> bool:
    """Reads a Metadata v1 response body: True once a broker and a controller are listed.

    Raises:
        struct.error: The response is truncated.
    """
    (brokers,) = struct.unpack_from(">i", meta)
    offset = 4
    for _ in range(brokers):
        offset += 4  # node_id
        (host_len,) = struct.unpack_from(">h", meta, offset)
        offset += 2 + host_len + 4  # host, port
        (rack_len,) = struct.unpack_from(">h", meta, offset)
        offset += 2 + max(rack_len, 0)
    (controller,) = struct.unpack_from(">i", meta, offset)
    return bool(brokers >= 1 and controller >= 0)


_PORT_ROLES = ("Kafka broker", "Kafka controller")


class KafkaServer(LocalServer):
    """A running (or stopped) single-node broker and the data directory it owns.

    Use it as a context manager: leaving the block stops the broker and, if `start_kafka`
    created the data directory, removes it. `stop`, `kill` and `pause` leave the data in place,
    so `restart` brings the same broker back with its topics and committed offsets.
    """

    TITLE = "the Kafka broker"
    LOG_NAME = "kafka.log"
    STOP_GRACE = 15.0

    def __init__(
        self,
        *,
        port: int,
        controller_port: int,
        data_dir: Path,
        owns_data_dir: bool,
        ready_timeout: float,
    ) -> None:
        """Describes a broker; `start_kafka` creates and starts it.

        Args:
            port: The PLAINTEXT listener port on 127.0.0.1.
            controller_port: The KRaft controller listener port on 127.0.0.1.
            data_dir: Holds server.properties, log4j.properties, kafka.log and the log dirs.
            owns_data_dir: Whether leaving the context manager removes `data_dir`.
            ready_timeout: Seconds each start may take before `StartError`.
        """
        super().__init__(
            directory=data_dir, owns_directory=owns_data_dir, ready_timeout=ready_timeout
        )
        self.port = port
        self.controller_port = controller_port

    @property
    def data_dir(self) -> Path:
        """Holds server.properties, log4j.properties, kafka.log and the log dirs."""
        return self.directory

    @property
    def bootstrap_servers(self) -> str:
        """The bootstrap string for clients, e.g. "127.0.0.1:9092"."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def label(self) -> str:
        """The broker and its address, for start-up errors."""
        return f"Kafka broker on {self.bootstrap_servers}"

    def ports(self) -> dict[str, int]:
        """Returns the client and controller ports, keyed by role."""
        return dict(zip(_PORT_ROLES, (self.port, self.controller_port), strict=True))

    def ping(self, timeout: float = 5.0) -> bool:
        """Tells whether the broker answers ApiVersions and Metadata requests right now.

        Args:
            timeout: Seconds to wait for each answer; a paused broker takes all of it.
        """
        return _broker_ready(self.port, timeout)

    def _config(self, log_dirs: Path) -> str:
        """The text of server.properties; the brokers of a cluster (`deploy.kafka_cluster`)
        override it."""
        return _server_properties(self.port, self.controller_port, log_dirs)

    def _cluster_id(self) -> str:
        """The cluster id the data directory is formatted with, the first time only."""
        return _random_cluster_id()

    def _format_options(self) -> list[str]:
        """Extra options of the storage format, the first time only; the secured broker
        (`deploy.kafka_secure`) adds its SCRAM credentials here."""
        return []

    def _prepare(self) -> list[str]:
        libs = fetch()
        java = require_tool("java", _JAVA_HINT)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_dirs = self.data_dir / "logs"
        config = self.data_dir / "server.properties"
        log4j = self.data_dir / "log4j.properties"
        config.write_text(self._config(log_dirs))
        log4j.write_text(_LOG4J)
        if not (log_dirs / "meta.properties").is_file():
            argv = _java_argv(
                java, libs, log4j, "kafka.tools.StorageTool",
                "format", "--ignore-formatted", "-t", self._cluster_id(), "-c", str(config),
                *self._format_options(),
            )  # fmt: skip
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise StartError(f"formatting {log_dirs} failed:\n{done.stdout}{done.stderr}")
        return _java_argv(java, libs, log4j, "kafka.Kafka", str(config))

    def __repr__(self) -> str:
        """Shows the endpoint, the pid and the data directory."""
        pid = self._shown_pid()
        return f"KafkaServer({self.bootstrap_servers}, pid={pid}, data_dir={self.data_dir})"


def start_kafka(
    port: int | None = None,
    controller_port: int | None = None,
    data_dir: Path | None = None,
    *,
    ready_timeout: float = 60.0,
) -> KafkaServer:
    """Starts a single-node KRaft broker on 127.0.0.1 and waits until it answers.

    Fetches Kafka first if the cache does not hold it. The data directory is formatted on
    first use and reused as is afterwards.

    Args:
        port: The client (PLAINTEXT) port; a free one when None.
        controller_port: The KRaft controller port; a free one when None.
        data_dir: Where the broker keeps its configuration, log file and data; a new temporary
            directory, removed when the server is closed, when None.
        ready_timeout: Seconds to wait for the broker to answer.

    Returns:
        The running broker.

    Raises:
        PortInUseError: A requested port is taken; nothing was started.
        ToolMissingError: java (or, when fetching, mvn) is missing.
        FetchError: Kafka could not be fetched.
        StartError: The broker exited or did not answer in time; it has been stopped.
    """
    return launch(
        dict(zip(_PORT_ROLES, (port, controller_port), strict=True)),
        data_dir,
        "saga-kafka-",
        lambda ports, directory, owns: KafkaServer(
            port=ports[0],
            controller_port=ports[1],
            data_dir=directory,
            owns_data_dir=owns,
            ready_timeout=ready_timeout,
        ),
    )


class _Cli(ServerCli[KafkaServer]):
    NAME = "Kafka"
    EXPECT = "kafka.Kafka"
    DESCRIPTION = "A single-node Kafka on loopback."
    PREPARE = ("fetch", "download Kafka into the cache (once)")
    UP_OPTIONS = (
        UpOption("--port", 9092, "client port (default 9092)"),
        UpOption("--controller-port", 9093, "default 9093"),
    )
    DOWN_GRACE = 20.0

    def prepare(self) -> str:
        return f"Kafka {KAFKA_VERSION} jars: {fetch()}"

    def start(self, ports: Sequence[int], run_dir: Path) -> KafkaServer:
        return start_kafka(ports[0], ports[1], run_dir / "data")

    def state(self, server: KafkaServer) -> dict[str, object]:
        return {
            "bootstrap_servers": server.bootstrap_servers,
            "port": server.port,
            "controller_port": server.controller_port,
        }

    def started(self, server: KafkaServer) -> list[str]:
        return [
            f"Kafka {KAFKA_VERSION} is up (pid {server.pid}) at {server.bootstrap_servers}.",
            f"Log: {server.log_path}",
        ]

    def where(self, state: Mapping[str, object]) -> str:
        return f" at {state.get('bootstrap_servers', '?')}"

    def status(self, state: Mapping[str, object]) -> str:
        port = state.get("port")
        answers = isinstance(port, int) and _broker_ready(port)
        return f"{self.where(state)}, {'answering' if answers else 'NOT answering'}"


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code.

    Args:
        argv: The arguments after the program name; `sys.argv[1:]` when None.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if "--secure" in args or args[:1] == ["grant"]:
        # Imported here: deploy.kafka_secure builds on this module.
        from deploy import kafka_secure

        return kafka_secure.main([a for a in args if a != "--secure"])
    return _Cli().main(args)


if __name__ == "__main__":
    sys.exit(main())
