"""What `deploy.kafka` and `deploy.jaeger` share: a local server's lifecycle and command line.

A `LocalServer` owns one `Child` process and the directory holding its configuration and log.
`start` checks its ports, lets the subclass fetch, build and configure, starts the process and
polls the subclass's `ping` until the server answers; `stop`, `kill`, `pause` and `restart`
leave the directory in place so the server comes back on the same data. `launch` picks free
ports and a temporary directory for the `start_*` functions. `ServerCli` is the
`fetch|build / up / down / status` command line behind `make kafka-up` and `make jaeger-up`;
its daemons are found again through `deploy._daemon`.
"""

from __future__ import annotations

import abc
import argparse
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Generic, NamedTuple, Self, TypeVar

from deploy._daemon import Daemon
from deploy._proc import Child, InfraError, check_port_free, free_port

__all__ = ["LocalServer", "ServerCli", "UpOption", "choose_ports", "launch"]


class LocalServer(abc.ABC):
    """A running (or stopped) local server and the directory it owns.

    Use it as a context manager: leaving the block stops the server and, if it was created with
    `owns_directory`, removes the directory.
    """

    TITLE: ClassVar[str]
    """The server in messages, e.g. "the Kafka broker"."""
    LOG_NAME: ClassVar[str]
    """The log file's name inside the directory, e.g. "kafka.log"."""
    STOP_GRACE: ClassVar[float]
    """Seconds `stop` allows for a clean shutdown by default."""

    def __init__(self, *, directory: Path, owns_directory: bool, ready_timeout: float) -> None:
        """Describes a server; `start` runs it.

        Args:
            directory: Holds the server's configuration, log file and data.
            owns_directory: Whether `close` removes `directory`.
            ready_timeout: Seconds each start may take before `StartError`.
        """
        self.directory = directory
        self.ready_timeout = ready_timeout
        self._owns_directory = owns_directory
        self._child: Child | None = None

    @abc.abstractmethod
    def ports(self) -> dict[str, int]:
        """Returns the ports the server listens on, keyed by role (as `check_port_free` says)."""

    @abc.abstractmethod
    def ping(self) -> bool:
        """Tells whether the server answers right now; never raises."""

    @property
    @abc.abstractmethod
    def label(self) -> str:
        """The server and its main endpoint, for start-up errors."""

    @abc.abstractmethod
    def _prepare(self) -> list[str]:
        """Fetches or builds the server, writes its configuration into the directory (creating
        it) and returns the command line to run."""

    @property
    def log_path(self) -> Path:
        """The server's stdout and stderr, appended across restarts."""
        return self.directory / self.LOG_NAME

    @property
    def pid(self) -> int:
        """The server's pid (also its process group id).

        Raises:
            InfraError: The server is not running.
        """
        return self._running_child().pid

    @property
    def running(self) -> bool:
        """Whether the server process exists (it may be paused)."""
        return self._child is not None and self._child.alive

    def start(self) -> None:
        """Starts the server on its configured ports and waits until it answers.

        Raises:
            InfraError: The server is already running.
            PortInUseError: A port is taken by another process.
            ToolMissingError: A program needed to fetch, build or run it is missing.
            FetchError: The server could not be fetched or built.
            StartError: The server exited or was not ready in time; it is stopped again.
        """
        if self.running:
            raise InfraError(f"{self.TITLE} is already running (pid {self.pid})")
        for what, port in self.ports().items():
            check_port_free(port, what)
        child = Child(self.TITLE, self._prepare(), self.log_path, cwd=self.directory)
        child.start()
        self._child = child
        try:
            child.wait_ready(self.ping, what=self.label, timeout=self.ready_timeout)
        except BaseException:
            self.kill()
            raise

    def stop(self, grace: float | None = None) -> None:
        """Shuts the server down cleanly (SIGTERM), killing it after `grace` seconds.

        Args:
            grace: Seconds allowed for a clean shutdown; `STOP_GRACE` when None.
        """
        if self._child is not None:
            self._child.stop(self.STOP_GRACE if grace is None else grace)
            self._child = None

    def kill(self) -> None:
        """Kills the server with SIGKILL, as a crash would; the directory stays for `restart`."""
        if self._child is not None:
            self._child.kill()
            self._child = None

    def restart(self) -> None:
        """Stops the server if it runs, then starts it again on the same ports and data."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freezes the server with SIGSTOP: connections stay open but nothing answers.

        Raises:
            InfraError: The server is not running.
        """
        self._running_child().pause()

    def resume(self) -> None:
        """Continues a paused server with SIGCONT.

        Raises:
            InfraError: The server is not running.
        """
        self._running_child().resume()

    def _running_child(self) -> Child:
        if self._child is None:
            raise InfraError(f"{self.TITLE} is not running")
        return self._child

    def close(self) -> None:
        """Stops the server and removes the directory if the server owns it."""
        self.stop()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        """Returns the started server."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stops the server and removes an owned directory."""
        self.close()

    def _shown_pid(self) -> int | None:
        return self.pid if self.running else None


S = TypeVar("S", bound=LocalServer)


def choose_ports(requested: Mapping[str, int | None]) -> list[int]:
    """Checks the requested ports and picks distinct free ones for the others.

    Args:
        requested: Role (as `check_port_free` names it) to port, None for any free port.

    Returns:
        The ports in the order of `requested`.

    Raises:
        PortInUseError: A requested port is taken.
    """
    # Checked before anything is fetched or written so a busy port fails fast and cleanly.
    for what, wanted in requested.items():
        if wanted is not None:
            check_port_free(wanted, what)
    taken = {port for port in requested.values() if port is not None}
    chosen: list[int] = []
    for wanted in requested.values():
        port = wanted
        while port is None or (wanted is None and port in taken):
            port = free_port()
        taken.add(port)
        chosen.append(port)
    return chosen


def launch(
    requested: Mapping[str, int | None],
    directory: Path | None,
    temp_prefix: str,
    make: Callable[[list[int], Path, bool], S],
) -> S:
    """Creates a server on the chosen ports and directory, and starts it.

    Args:
        requested: Role to port, None for any free port (see `choose_ports`).
        directory: The server's directory; a new temporary one, owned by the server, when None.
        temp_prefix: The temporary directory's name prefix.
        make: Builds the server from the ports, the directory and whether it owns it.

    Returns:
        The running server.

    Raises:
        PortInUseError: A requested port is taken; nothing was started.
        InfraError: Any failure of `LocalServer.start`; a temporary directory is removed again.
    """
    ports = choose_ports(requested)
    owns = directory is None
    path = Path(tempfile.mkdtemp(prefix=temp_prefix)) if directory is None else directory
    server = make(ports, path, owns)
    try:
        server.start()
    except BaseException:
        if owns:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return server


class UpOption(NamedTuple):
    """An integer option of ``up``, e.g. ``--port 9092``.

    Attributes:
        flag: The option, e.g. "--port".
        default: Its value when not given.
        help: Its line in ``--help``.
    """

    flag: str
    default: int
    help: str


class ServerCli(abc.ABC, Generic[S]):
    """The ``python -m deploy.<server>`` command line: prepare, ``up``, ``down``, ``status``.

    ``up`` starts the server as a daemon and records it with `Daemon`, ``down`` stops the
    recorded daemon, ``status`` reports it (exit code 3 when it is not running). Errors of the
    infrastructure end in one ``error:`` line and exit code 1.
    """

    NAME: ClassVar[str]
    """The server in messages and the run directory, e.g. "Kafka"."""
    EXPECT: ClassVar[str]
    """A string the daemon's command line contains, e.g. "kafka.Kafka"."""
    DESCRIPTION: ClassVar[str]
    """The ``--help`` description."""
    PREPARE: ClassVar[tuple[str, str]]
    """The fetch or build subcommand and its help, e.g. ("fetch", "download Kafka ...")."""
    UP_OPTIONS: ClassVar[tuple[UpOption, ...]]
    """The port options of ``up``, in the order `start` takes them."""
    DOWN_GRACE: ClassVar[float]
    """Seconds ``down`` allows for a clean shutdown."""

    @abc.abstractmethod
    def prepare(self) -> str:
        """Fetches or builds the server; returns the line to print."""

    @abc.abstractmethod
    def start(self, ports: Sequence[int], run_dir: Path) -> S:
        """Starts the daemon.

        Args:
            ports: The values of `UP_OPTIONS`, in order.
            run_dir: The daemon's run directory, to keep its data under.
        """

    @abc.abstractmethod
    def state(self, server: S) -> dict[str, object]:
        """Returns the started daemon's endpoints to record (the log is added)."""

    @abc.abstractmethod
    def started(self, server: S) -> list[str]:
        """Returns the lines printed once the daemon is up."""

    @abc.abstractmethod
    def where(self, state: Mapping[str, object]) -> str:
        """Returns what follows "(pid N)" in "already running", from the recorded state."""

    @abc.abstractmethod
    def status(self, state: Mapping[str, object]) -> str:
        """Returns what follows "(pid N)" in ``status``, from the recorded state."""

    def main(self, argv: list[str] | None = None) -> int:
        """Runs the command line; returns the exit code.

        Args:
            argv: The arguments after the program name; `sys.argv[1:]` when None.
        """
        name = self.NAME
        parser = argparse.ArgumentParser(
            prog=f"python -m deploy.{name.lower()}", description=self.DESCRIPTION
        )
        sub = parser.add_subparsers(dest="command", required=True)
        sub.add_parser(self.PREPARE[0], help=self.PREPARE[1])
        up = sub.add_parser("up", help=f"start {name} in the background")
        dests = [
            up.add_argument(opt.flag, type=int, default=opt.default, help=opt.help).dest
            for opt in self.UP_OPTIONS
        ]
        sub.add_parser("down", help=f"stop the background {name}")
        sub.add_parser("status", help=f"tell whether the background {name} runs")
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        daemon = Daemon(name.lower(), expect=self.EXPECT)
        try:
            if args.command == self.PREPARE[0]:
                print(self.prepare())
                return 0
            if args.command == "up":
                return self._up(daemon, [getattr(args, dest) for dest in dests])
            if args.command == "down":
                pid = daemon.stop(grace=self.DOWN_GRACE)
                print(f"{name} is not running." if pid is None else f"{name} (pid {pid}) stopped.")
                return 0
            return self._status(daemon)
        except InfraError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    def _up(self, daemon: Daemon, ports: list[int]) -> int:
        found = daemon.find()
        if found is not None:
            pid, state = found
            print(f"{self.NAME} is already running (pid {pid}){self.where(state)}.")
            return 0
        server = self.start(ports, daemon.directory)
        daemon.record(server.pid, {**self.state(server), "log": str(server.log_path)})
        for line in self.started(server):
            print(line)
        return 0

    def _status(self, daemon: Daemon) -> int:
        found = daemon.find()
        if found is None:
            print(f"{self.NAME} is not running.")
            return 3  # LSB's "program is not running".
        pid, state = found
        print(
            f"{self.NAME} is running (pid {pid}){self.status(state)}. Log: {state.get('log', '?')}"
        )
        return 0
