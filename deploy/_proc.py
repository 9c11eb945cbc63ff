"""Process plumbing shared by `deploy.kafka` and `deploy.jaeger`.

Every server runs in its own session (process group), with stdout and stderr appended to a log
file, so that stopping it reaches any child it forks and a failure can quote the log. Readiness
is a probe polled against a deadline; if the process exits first, the error quotes its log.
The daemons of `make kafka-up` and `make jaeger-up` are tracked by `deploy._daemon`.
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

__all__ = [
    "LOOPBACK",
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
    "kill_process",
    "log_tail",
    "port_accepts",
    "remove_quietly",
    "require_tool",
    "run_dir",
    "start_process",
    "stop_process",
    "wait_ready",
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


def start_process(
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Starts a server in a new session with its output appended to a log file.

    Args:
        argv: The program and its arguments.
        log_path: The file receiving stdout and stderr; appended to, so a restart keeps the
            earlier run's lines.
        env: The environment; the current one when None.
        cwd: The working directory; the current one when None.

    Returns:
        The started process; its pid is also its process group id.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            # A new session makes the pid a process group id: stopping the group reaches any
            # child, and Ctrl-C in the terminal that ran `make kafka-up` does not reach it.
            start_new_session=True,
        )


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


def wait_ready(
    proc: subprocess.Popen[bytes],
    probe: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    log_path: Path,
    interval: float = 0.2,
) -> None:
    """Polls `probe` until it returns True, the process exits, or the deadline passes.

    The process is left running on failure; the caller decides whether to stop it.

    Args:
        proc: The started server.
        probe: Returns True once the server answers; must not raise.
        what: The server's name, for the messages.
        timeout: Seconds before giving up.
        log_path: The server's log, quoted in the error.
        interval: Seconds between probes.

    Raises:
        StartError: The process exited, or the deadline passed first.
    """
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise StartError(
                f"{what} exited with code {code} during start-up. "
                f"Last lines of {log_path}:\n{log_tail(log_path)}"
            )
        if probe():
            return
        if time.monotonic() >= deadline:
            raise StartError(
                f"{what} did not become ready within {timeout:.0f} s. "
                f"Last lines of {log_path}:\n{log_tail(log_path)}"
            )
        time.sleep(interval)


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


def _wait_exit(pid: int, popen: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    if popen is not None:
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout
    while is_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def stop_process(
    pid: int, *, popen: subprocess.Popen[bytes] | None = None, grace: float = 15.0
) -> None:
    """Stops a server's process group: SIGTERM, then SIGKILL after a grace period.

    Args:
        pid: The server's pid, which is also its process group id.
        popen: The Popen object when this process started the server, so it is reaped.
        grace: Seconds allowed for a clean shutdown before SIGKILL.
    """
    _signal_group(pid, signal.SIGTERM)
    # A stopped (SIGSTOP) process cannot act on SIGTERM until it is continued.
    _signal_group(pid, signal.SIGCONT)
    if not _wait_exit(pid, popen, grace):
        kill_process(pid, popen=popen)


def kill_process(pid: int, *, popen: subprocess.Popen[bytes] | None = None) -> None:
    """Kills a server's process group with SIGKILL and waits for it to go.

    Args:
        pid: The server's pid, which is also its process group id.
        popen: The Popen object when this process started the server, so it is reaped.
    """
    _signal_group(pid, signal.SIGKILL)
    _wait_exit(pid, popen, 10.0)


def remove_quietly(path: Path) -> None:
    """Removes a file, ignoring its absence.

    Args:
        path: The file.
    """
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
