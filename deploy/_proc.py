"""Process plumbing shared by the local servers, the demo fleet and the chaos supervisor.

A `Child` runs in its own session (process group), with stdout and stderr appended to a log
file, so that stopping it reaches any child it forks and a failure can quote the log. It stops
with SIGTERM, then SIGKILL after a grace period; `stop_all` does that for many at once.
Readiness is a probe polled against a deadline; if the process exits first, the error quotes
its log. `deploy._server` builds the Kafka and Jaeger servers on it; the daemons of
`make kafka-up` and `make jaeger-up` are tracked by `deploy._daemon`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

__all__ = [
    "LOOPBACK",
    "Child",
    "FetchError",
    "InfraError",
    "PortInUseError",
    "StartError",
    "ToolMissingError",
    "cache_dir",
    "check_port_free",
    "file_lock",
    "free_port",
    "is_alive",
    "log_tail",
    "port_accepts",
    "remove_quietly",
    "require_tool",
    "run_dir",
    "stop_all",
    "stop_process",
]

LOOPBACK = "127.0.0.1"
"""Every server binds here only: the local stack must never be reachable from the network."""


class InfraError(Exception):
    """Root of the errors raised while fetching, building, starting or stopping a server."""


class ToolMissingError(InfraError):
    """A required program (java, mvn, go) is not on PATH."""


class PortInUseError(InfraError):
    """A requested port on the loopback interface is already taken."""

    def __init__(self, port: int, what: str) -> None:
        """Builds the message from the port and the server that wanted it.

        Args:
            port: The busy TCP port.
            what: The server and role that wanted the port, e.g. "Kafka broker".
        """
        super().__init__(
            f"{what} cannot listen on {LOOPBACK}:{port}: port {port} is already in use by "
            f"another process. Stop that process or choose another port."
        )
        self.port = port


class FetchError(InfraError):
    """Downloading Kafka or building Jaeger failed."""


class StartError(InfraError):
    """A server exited during start-up or did not become ready before its deadline."""


def cache_dir() -> Path:
    """Returns the project's cache directory, creating it if needed.

    Returns:
        `$XDG_CACHE_HOME/saga-engine` when that variable holds an absolute path (the XDG spec
        says to ignore relative ones), else `~/.cache/saga-engine`.
    """
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    path = root / "saga-engine"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_dir(name: str) -> Path:
    """Returns the directory holding a daemon's data, log, pid and state files.

    Args:
        name: The server's name, "kafka" or "jaeger".

    Returns:
        `<cache>/run/<name>`, created if needed.
    """
    path = cache_dir() / "run" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive advisory lock on `path` for the duration of the block.

    Two fetches or builds running at once (two terminals, parallel test runs) then take turns
    instead of writing the same cache entry.

    Args:
        path: The lock file, created if needed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def require_tool(name: str, hint: str) -> str:
    """Finds a program on PATH or fails with one clear message.

    Args:
        name: The program, e.g. "java".
        hint: What to install, e.g. "Install a JDK 17 or newer.".

    Returns:
        The program's absolute path.

    Raises:
        ToolMissingError: The program is not on PATH.
    """
    found = shutil.which(name)
    if found is None:
        raise ToolMissingError(f"`{name}` was not found on PATH. {hint}")
    return found


def free_port() -> int:
    """Returns a TCP port on the loopback interface that is free right now.

    Another process may take it before the caller binds it; the window is short and the
    server's start-up then fails with a clear error rather than hanging.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def check_port_free(port: int, what: str) -> None:
    """Fails when a listener already holds `port` on the loopback interface.

    SO_REUSEADDR is set as the JVM and Go set it, so a port left in TIME_WAIT by a server
    that just stopped counts as free, as it will for them.

    Args:
        port: The TCP port to test.
        what: The server and role that wants the port, for the message.

    Raises:
        PortInUseError: Something is listening on the port (on 127.0.0.1 or on all interfaces).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise PortInUseError(port, what) from None
            raise


def port_accepts(port: int, timeout: float = 0.5) -> bool:
    """Tells whether a TCP connection to the loopback port succeeds.

    Args:
        port: The TCP port.
        timeout: Seconds to wait for the connection.
    """
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(log_path: Path, lines: int = 40) -> str:
    """Returns the last lines of a log file, or a note when it cannot be read.

    Args:
        log_path: The log file.
        lines: How many lines to return at most.
    """
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(log {log_path} unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def is_alive(pid: int) -> bool:
    """Tells whether a process exists and is not a zombie.

    Args:
        pid: The process id.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # No procfs (macOS): the signal test is all we have.
    # The state follows the parenthesised command name, which may itself contain spaces.
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def stop_process(pid: int, *, grace: float = 15.0) -> None:
    """Stops a process group that another process started: SIGTERM, then SIGKILL after `grace`.

    For a daemon known only by its pid file; a `Child` of this process stops itself.

    Args:
        pid: The process's pid, which is also its process group id.
        grace: Seconds allowed for a clean shutdown before SIGKILL.
    """
    _signal_group(pid, signal.SIGTERM)
    # A stopped (SIGSTOP) process cannot act on SIGTERM until it is continued.
    _signal_group(pid, signal.SIGCONT)
    if not _wait_gone(pid, grace):
        _signal_group(pid, signal.SIGKILL)
        _wait_gone(pid, 10.0)


class Child:
    """A child process in a session of its own, its stdout and stderr appended to a log file.

    The session makes the pid a process group id, so every signal reaches any process the child
    forks, and Ctrl-C in the parent's terminal does not reach the child: the parent stops its
    children in order instead of all of them dying at once. `start` may be called again after
    the process exited; the log keeps every run's lines. Signals are only sent while the process
    has not been reaped, so a recycled pid is never hit.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        banner: bool = False,
    ) -> None:
        """Describes the process; `start` runs it.

        Args:
            name: What the process is, for messages and the banner.
            argv: The program and its arguments.
            log_path: The file receiving stdout and stderr, appended to.
            env: The environment; the current one when None.
            cwd: The working directory; the current one when None.
            banner: Whether each start first writes a ``--- HH:MM:SS starting <name>`` line to
                the log, so the runs of a restarted process can be told apart.
        """
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = None if env is None else dict(env)
        self.cwd = cwd
        self.banner = banner
        self.popen: subprocess.Popen[bytes] | None = None
        """The latest run; None until the first `start`."""

    @property
    def pid(self) -> int:
        """The latest run's pid (also its process group id).

        Raises:
            InfraError: The process was never started.
        """
        if self.popen is None:
            raise InfraError(f"{self.name} was never started")
        return self.popen.pid

    @property
    def alive(self) -> bool:
        """Whether the process exists (it may be paused)."""
        return self.popen is not None and self.popen.poll() is None

    def poll(self) -> int | None:
        """Returns the exit status of the latest run, or None while it runs or before a start."""
        return None if self.popen is None else self.popen.poll()

    def start(self) -> None:
        """Starts the process.

        Raises:
            InfraError: It is running already.
        """
        if self.alive:
            raise InfraError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            if self.banner:
                log.write(f"--- {time.strftime('%H:%M:%S')} starting {self.name}\n".encode())
                log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )

    def send_signal(self, sig: signal.Signals) -> None:
        """Sends `sig` to the process group if the process still runs.

        Args:
            sig: The signal.
        """
        if self.alive:
            _signal_group(self.pid, sig)

    def request_stop(self) -> None:
        """Sends SIGTERM without waiting; `stop` and `stop_all` wait and kill."""
        self.send_signal(signal.SIGTERM)
        # A paused (SIGSTOP) process cannot act on SIGTERM until it is continued.
        self.send_signal(signal.SIGCONT)

    def wait(self, timeout: float) -> int | None:
        """Waits for the process to exit.

        Args:
            timeout: Seconds to wait at most.

        Returns:
            Its exit status, or None when it still runs (or was never started).
        """
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """Kills the process group with SIGKILL, as a crash would, and waits for it to go."""
        self._kill()

    def _kill(self) -> None:
        # Separate from `kill`, which subclasses extend with bookkeeping that `stop` must not do.
        self.send_signal(signal.SIGKILL)
        self.wait(10.0)

    def stop(self, grace: float) -> int | None:
        """Stops the process: SIGTERM, then SIGKILL after `grace` seconds.

        Args:
            grace: Seconds allowed for a clean shutdown.

        Returns:
            Its exit status when it exited within `grace`; None when it had to be killed or was
            not running.
        """
        if not self.alive:
            return None
        self.request_stop()
        code = self.wait(grace)
        if code is None:
            self._kill()
        return code

    def pause(self) -> None:
        """Freezes the process group with SIGSTOP: its sockets stay open but nothing answers."""
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Continues a paused process group with SIGCONT."""
        self.send_signal(signal.SIGCONT)

    def tail(self, lines: int = 40) -> str:
        """Returns the end of the log, for error messages.

        Args:
            lines: How many lines to return at most.
        """
        return log_tail(self.log_path, lines)

    def wait_ready(
        self, probe: Callable[[], bool], *, what: str, timeout: float, interval: float = 0.2
    ) -> None:
        """Polls `probe` until it returns True, the process exits, or the deadline passes.

        The process is left running on failure; the caller decides whether to stop it.

        Args:
            probe: Returns True once the process answers; must not raise.
            what: What answers, for the messages.
            timeout: Seconds before giving up.
            interval: Seconds between probes.

        Raises:
            StartError: The process exited, or the deadline passed first; the message quotes
                the end of the log.
        """
        deadline = time.monotonic() + timeout
        while True:
            code = self.poll()
            if code is not None:
                raise StartError(
                    f"{what} exited with code {code} during start-up. "
                    f"Last lines of {self.log_path}:\n{self.tail()}"
                )
            if probe():
                return
            if time.monotonic() >= deadline:
                raise StartError(
                    f"{what} did not become ready within {timeout:.0f} s. "
                    f"Last lines of {self.log_path}:\n{self.tail()}"
                )
            time.sleep(interval)

    def __repr__(self) -> str:
        """Shows the name and the pid of a running process."""
        return f"{type(self).__name__}({self.name!r}, pid={self.pid if self.alive else None})"


def stop_all(children: Iterable[Child], grace: float) -> None:
    """Stops several processes at once: SIGTERM to all, then SIGKILL to those left after `grace`.

    One shared grace period, so stopping many processes takes `grace` and not a multiple.

    Args:
        children: The processes; those not running are skipped.
        grace: Seconds allowed for a clean shutdown.
    """
    running = [child for child in children if child.alive]
    for child in running:
        child.request_stop()
    deadline = time.monotonic() + grace
    for child in running:
        if child.wait(max(0.0, deadline - time.monotonic())) is None:
            child._kill()


def remove_quietly(path: Path) -> None:
    """Removes a file, ignoring its absence.

    Args:
        path: The file.
    """
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
