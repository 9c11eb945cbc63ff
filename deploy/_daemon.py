"""Background servers for `make kafka-up` / `make jaeger-up`, found again by later commands.

`up` starts a server and records its pid and endpoints under `<cache>/run/<name>/`; `down`
and `status` read them back. A pid file is trusted only while that pid is alive, not a zombie,
and still runs the expected program, so a pid reused after a reboot is never signalled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from deploy._proc import is_alive, remove_quietly, run_dir, stop_process

__all__ = ["Daemon"]


def _cmdline(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None  # No procfs (macOS): the liveness test is all we have.
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Daemon:
    """The pid and state files of one background server."""

    def __init__(self, name: str, expect: str) -> None:
        """Locates the files of a daemon.

        Args:
            name: The server's name, "kafka" or "jaeger"; names the run directory.
            expect: A string the server's command line contains, e.g. "kafka.Kafka".
        """
        self.directory = run_dir(name)
        self.pidfile = self.directory / f"{name}.pid"
        self.statefile = self.directory / f"{name}.json"
        self._expect = expect

    def find(self) -> tuple[int, dict[str, object]] | None:
        """Returns the running daemon's pid and recorded state, removing stale files.

        Returns:
            (pid, state) when the daemon runs, else None.
        """
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        cmdline = _cmdline(pid)
        if not is_alive(pid) or (cmdline is not None and self._expect not in cmdline):
            self.forget()
            return None
        try:
            state = json.loads(self.statefile.read_text())
        except (OSError, ValueError):
            state = {}
        return pid, state if isinstance(state, dict) else {}

    def record(self, pid: int, state: Mapping[str, object]) -> None:
        """Records a started daemon.

        Args:
            pid: The daemon's pid (and process group id).
            state: Its endpoints and log path, JSON-serialisable, shown by `status`.
        """
        _write_atomically(self.statefile, json.dumps(state, indent=2) + "\n")
        _write_atomically(self.pidfile, f"{pid}\n")

    def stop(self, grace: float) -> int | None:
        """Stops the daemon if it runs (SIGTERM, then SIGKILL after `grace` seconds).

        Args:
            grace: Seconds allowed for a clean shutdown.

        Returns:
            The pid that was stopped, or None when nothing ran.
        """
        found = self.find()
        if found is None:
            return None
        pid = found[0]
        stop_process(pid, grace=grace)
        self.forget()
        return pid

    def forget(self) -> None:
        """Removes the pid and state files."""
        remove_quietly(self.pidfile)
        remove_quietly(self.statefile)
