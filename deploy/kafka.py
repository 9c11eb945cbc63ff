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
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from types import TracebackType

from deploy._daemon import Daemon
from deploy._proc import (
    LOOPBACK,
    FetchError,
    InfraError,
    StartError,
    cache_dir,
    check_port_free,
    file_lock,
    free_port,
    kill_process,
    remove_quietly,
    require_tool,
    start_process,
    stop_process,
    wait_ready,
)

__all__ = [
    "JVM_OPTIONS",
    "KAFKA_VERSION",
    "KafkaServer",
    "fetch",
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


def _java_argv(java: str, libs: Path, log4j: Path, main: str, *args: str) -> list[str]:
    return [
        java, *JVM_OPTIONS, f"-Dlog4j.configuration=file:{log4j}",
        "-cp", f"{libs}/*", main, *args,
    ]  # fmt: skip


def _server_properties(port: int, controller_port: int, log_dirs: Path) -> str:
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{LOOPBACK}:{controller_port}",
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
            meta = _request(sock, 3, 1, 2, struct.pack(">i", 0))  # Empty topic list.
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
    except (OSError, struct.error):
        return False


class KafkaServer:
    """A running (or stopped) single-node broker and the data directory it owns.

    Use it as a context manager: leaving the block stops the broker and, if `start_kafka`
    created the data directory, removes it. `stop`, `kill` and `pause` leave the data in place,
    so `restart` brings the same broker back with its topics and committed offsets.
    """

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
        self.port = port
        self.controller_port = controller_port
        self.data_dir = data_dir
        self.ready_timeout = ready_timeout
        self._owns_data_dir = owns_data_dir
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """The bootstrap string for clients, e.g. "127.0.0.1:9092"."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The broker's stdout and stderr, appended across restarts."""
        return self.data_dir / "kafka.log"

    @property
    def pid(self) -> int:
        """The broker's pid (also its process group id).

        Raises:
            InfraError: The broker is not running.
        """
        if self._proc is None:
            raise InfraError("the Kafka broker is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the broker process exists (it may be paused)."""
        return self._proc is not None and self._proc.poll() is None

    def ping(self, timeout: float = 5.0) -> bool:
        """Tells whether the broker answers ApiVersions and Metadata requests right now.

        Args:
            timeout: Seconds to wait for each answer; a paused broker takes all of it.
        """
        return _broker_ready(self.port, timeout)

    def start(self) -> None:
        """Starts the broker on the configured ports and waits until it answers.

        Raises:
            InfraError: The broker is already running.
            PortInUseError: A port is taken by another process.
            StartError: The broker exited or was not ready in time; it is stopped again.
        """
        if self.running:
            raise InfraError(f"the Kafka broker is already running (pid {self.pid})")
        check_port_free(self.port, "Kafka broker")
        check_port_free(self.controller_port, "Kafka controller")
        libs = fetch()
        java = require_tool("java", _JAVA_HINT)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_dirs = self.data_dir / "logs"
        config = self.data_dir / "server.properties"
        log4j = self.data_dir / "log4j.properties"
        config.write_text(_server_properties(self.port, self.controller_port, log_dirs))
        log4j.write_text(_LOG4J)
        if not (log_dirs / "meta.properties").is_file():
            argv = _java_argv(
                java, libs, log4j, "kafka.tools.StorageTool",
                "format", "--ignore-formatted", "-t", _random_cluster_id(), "-c", str(config),
            )  # fmt: skip
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise StartError(f"formatting {log_dirs} failed:\n{done.stdout}{done.stderr}")
        argv = _java_argv(java, libs, log4j, "kafka.Kafka", str(config))
        self._proc = start_process(argv, self.log_path, cwd=self.data_dir)
        try:
            wait_ready(
                self._proc,
                lambda: _broker_ready(self.port),
                what=f"Kafka broker on {self.bootstrap_servers}",
                timeout=self.ready_timeout,
                log_path=self.log_path,
            )
        except BaseException:
            self.kill()
            raise

    def stop(self, grace: float = 15.0) -> None:
        """Shuts the broker down cleanly (SIGTERM), killing it after `grace` seconds.

        Args:
            grace: Seconds allowed for a controlled shutdown.
        """
        if self._proc is not None:
            stop_process(self._proc.pid, popen=self._proc, grace=grace)
            self._proc = None

    def kill(self) -> None:
        """Kills the broker with SIGKILL, as a crash would; the data stays for `restart`."""
        if self._proc is not None:
            kill_process(self._proc.pid, popen=self._proc)
            self._proc = None

    def restart(self) -> None:
        """Stops the broker if it runs, then starts it again on the same ports and data."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freezes the broker with SIGSTOP: connections stay open but nothing answers."""
        os.killpg(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Continues a paused broker with SIGCONT."""
        os.killpg(self.pid, signal.SIGCONT)

    def close(self) -> None:
        """Stops the broker and removes the data directory if `start_kafka` created it."""
        self.stop()
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> KafkaServer:
        """Returns the started server."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stops the broker and removes an owned data directory."""
        self.close()

    def __repr__(self) -> str:
        """Shows the endpoint, the pid and the data directory."""
        pid = self._proc.pid if self.running and self._proc is not None else None
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
    # Checked before anything is fetched or written so a busy port fails fast and cleanly.
    if port is not None:
        check_port_free(port, "Kafka broker")
    if controller_port is not None:
        check_port_free(controller_port, "Kafka controller")
    broker_port = port if port is not None else free_port()
    ctrl_port = controller_port if controller_port is not None else free_port()
    while ctrl_port == broker_port:
        ctrl_port = free_port()
    owns = data_dir is None
    directory = Path(tempfile.mkdtemp(prefix="saga-kafka-")) if data_dir is None else data_dir
    server = KafkaServer(
        port=broker_port,
        controller_port=ctrl_port,
        data_dir=directory,
        owns_data_dir=owns,
        ready_timeout=ready_timeout,
    )
    try:
        server.start()
    except BaseException:
        if owns:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return server


# --- command line -------------------------------------------------------------------------


def _daemon() -> Daemon:
    return Daemon("kafka", expect="kafka.Kafka")


def _cmd_up(port: int, controller_port: int) -> int:
    daemon = _daemon()
    found = daemon.find()
    if found is not None:
        pid, state = found
        print(f"Kafka is already running (pid {pid}) at {state.get('bootstrap_servers', '?')}.")
        return 0
    server = start_kafka(port, controller_port, daemon.directory / "data")
    daemon.record(
        server.pid,
        {"bootstrap_servers": server.bootstrap_servers, "port": server.port,
         "controller_port": server.controller_port, "log": str(server.log_path)},
    )  # fmt: skip
    print(f"Kafka {KAFKA_VERSION} is up (pid {server.pid}) at {server.bootstrap_servers}.")
    print(f"Log: {server.log_path}")
    return 0


def _cmd_down() -> int:
    pid = _daemon().stop(grace=20.0)
    print("Kafka is not running." if pid is None else f"Kafka (pid {pid}) stopped.")
    return 0


def _cmd_status() -> int:
    found = _daemon().find()
    if found is None:
        print("Kafka is not running.")
        return 3  # LSB's "program is not running".
    pid, state = found
    port = state.get("port")
    answers = isinstance(port, int) and _broker_ready(port)
    print(
        f"Kafka is running (pid {pid}) at {state.get('bootstrap_servers', '?')}, "
        f"{'answering' if answers else 'NOT answering'}. Log: {state.get('log', '?')}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code.

    Args:
        argv: The arguments after the program name; `sys.argv[1:]` when None.
    """
    parser = argparse.ArgumentParser(
        prog="python -m deploy.kafka", description="A single-node Kafka on loopback."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="download Kafka into the cache (once)")
    up = sub.add_parser("up", help="start a broker in the background")
    up.add_argument("--port", type=int, default=9092, help="client port (default 9092)")
    up.add_argument("--controller-port", type=int, default=9093, help="default 9093")
    sub.add_parser("down", help="stop the background broker")
    sub.add_parser("status", help="tell whether the background broker runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "fetch":
            print(f"Kafka {KAFKA_VERSION} jars: {fetch()}")
            return 0
        if args.command == "up":
            return _cmd_up(args.port, args.controller_port)
        if args.command == "down":
            return _cmd_down()
        return _cmd_status()
    except InfraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

