"""What every peer's runner shares: the plan, its processes, and the phases of a measurement.

A `PeerRun` owns one temporary directory and every process started for one peer; leaving its
`with` block (normally, on an error or on Ctrl-C) stops them all and removes the directory.
Each phase (latency with one in flight, then one run per in-flight level) is a load-generator
process of its own in the peers' venv; a phase that fails, hangs past its bound or finds the
peer's server gone is reported as collapsed with the reason, and the next phase still runs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.peers.install import Installed, peers_home
from bench.peers.loadgen import SETTLE_S
from deploy._proc import Child, StartError, log_tail, stop_all

__all__ = ["REPO_ROOT", "PeerRun", "Plan"]

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The project's root: the load generators import `bench.peers` from here."""

# Beyond the window and the per-workflow timeout, a phase process gets this long for its own
# start-up (imports, connecting, the peer's warm-up) before it counts as hung.
_PHASE_SLACK_S = 60.0


@dataclass(frozen=True)
class Plan:
    """The sizes of one run, the same for every system."""

    levels: tuple[int, ...] = (50, 500, 2000)
    """In-flight levels for throughput."""
    seconds: float = 15.0
    """Measured window per level."""
    latency_n: int = 200
    """Measured sequential workflows for latency."""
    warmup: int = 20
    """Unmeasured sequential workflows before the latency run."""
    timeout: float = 30.0
    """Seconds allowed per workflow before it counts as an error."""


class PeerRun:
    """The processes and scratch directory of one peer's measurement."""

    def __init__(self, name: str, installed: Installed) -> None:
        """Creates the scratch directory; nothing runs yet.

        Args:
            name: The peer, for directory and log names.
            installed: Where the peers' venv and binaries are.
        """
        self.name = name
        self.installed = installed
        self.workdir = Path(tempfile.mkdtemp(prefix=f"saga-peers-{name}-"))
        # Logs outlive the scratch directory, so a collapsed phase can be looked into; each
        # run replaces the previous run's logs of the same peer.
        self.logs = peers_home() / "logs" / name
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True)
        self.children: list[Child] = []

    def __enter__(self) -> PeerRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stops every process started here and removes the scratch directory."""
        stop_all(self.children, grace=10.0)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def env(self) -> dict[str, str]:
        """The environment for processes in the peers' venv: `bench.peers` importable."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT)
        env["PYTHONUNBUFFERED"] = "1"
        # The project's venv must not leak into the peers' interpreter.
        env.pop("VIRTUAL_ENV", None)
        return env

    def spawn(
        self,
        role: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        """Starts a process whose output goes to `<cache>/peers/logs/<peer>/<role>.log`.

        `close` stops it.

        Args:
            role: What the process is ("server", "worker", "latency"...).
            argv: The program and its arguments.
            env: The environment; `env()` when None.
            cwd: The working directory; the repository root when None.
        """
        child = Child(
            f"{self.name} {role}",
            argv,
            self.logs / f"{role}.log",
            env=self.env() if env is None else env,
            cwd=REPO_ROOT if cwd is None else cwd,
        )
        self.children.append(child)
        child.start()
        return child

    def python(self, role: str, module: str, *args: str) -> Child:
        """Starts `python -m module args...` in the peers' venv (see `spawn`)."""
        return self.spawn(role, [str(self.installed.python), "-m", module, *args])

    def wait_until(
        self, what: str, ready: Callable[[], bool], deadline_s: float, *watch: Child
    ) -> None:
        """Polls `ready` until it holds, failing early if a watched process exits.

        Raises:
            StartError: The deadline passed or a watched process exited; quotes its log.
        """
        deadline = time.monotonic() + deadline_s
        while not ready():
            for child in watch:
                if not child.alive:
                    raise StartError(
                        f"{child.name} exited (status {child.poll()}) before {what}:\n"
                        + child.tail()
                    )
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {c.name}\n{c.tail(15)}" for c in watch)
                raise StartError(f"{what} did not happen within {deadline_s:g} s\n{logs}")
            time.sleep(0.2)

    def phase(
        self,
        role: str,
        module: str,
        args: Sequence[str],
        bound_s: float,
        servers: Sequence[Child],
    ) -> dict[str, Any]:
        """Runs one load-generator process and returns its figures, or why there are none.

        Args:
            role: The phase's name ("latency", "level-500"), for the log file.
            module: The workload module.
            args: Its `load` arguments (without `--out`).
            bound_s: Seconds after which the process counts as hung and is stopped.
            servers: The peer's long-running processes; a phase finding one gone collapses.

        Returns:
            The figures the load generator wrote, or {"collapsed": reason}.
        """
        for server in servers:
            if not server.alive:
                return {"collapsed": f"{server.name} is no longer running: {server.tail(5)}"}
        out = self.workdir / f"{role}.json"
        child = self.python(role, module, "load", *args, "--out", str(out))
        code = child.wait(bound_s + _PHASE_SLACK_S)
        if code is None:
            child.stop(grace=5.0)
            return {
                "collapsed": f"load generator still running after {bound_s + _PHASE_SLACK_S:g} s"
            }
        if code != 0 or not out.exists():
            return {"collapsed": f"load generator exited with status {code}: {_last_line(child)}"}
        result: dict[str, Any] = json.loads(out.read_text())
        return result

    def measure(
        self,
        module: str,
        connection: Sequence[str],
        plan: Plan,
        servers: Sequence[Child],
        per_phase: Callable[[str], Sequence[str]] = lambda role: (),
    ) -> dict[str, Any]:
        """Runs the latency phase and every level; returns `latency_1` and `throughput`.

        Args:
            module: The workload module.
            connection: Arguments telling the load generator where the peer is.
            plan: The run's sizes.
            servers: The peer's long-running processes (see `phase`).
            per_phase: Extra arguments for a phase, given its role.
        """
        common = [*connection, "--timeout", f"{plan.timeout:g}"]
        latency_args = [
            *common,
            "--mode",
            "latency",
            "--n",
            str(plan.latency_n),
            "--warmup",
            str(plan.warmup),
            *per_phase("latency"),
        ]
        print(f"  {self.name}: latency, {plan.latency_n} sequential", flush=True)
        # One second per sequential workflow on average is far beyond any peer's latency; a
        # phase slower than that is hung, not slow (each workflow is bounded by the timeout).
        bound = float(plan.latency_n + plan.warmup) + 2 * plan.timeout + SETTLE_S
        latency = self.phase("latency", module, latency_args, bound, servers)
        throughput: dict[str, Any] = {}
        for level in plan.levels:
            role = f"level-{level}"
            print(f"  {self.name}: {level} in flight for {plan.seconds:g} s", flush=True)
            level_args = [
                *common,
                "--mode",
                "level",
                "--in-flight",
                str(level),
                "--seconds",
                f"{plan.seconds:g}",
                *per_phase(role),
            ]
            bound = plan.seconds + 2 * plan.timeout + SETTLE_S
            throughput[str(level)] = self.phase(role, module, level_args, bound, servers)
        return {"latency_1": latency, "throughput": throughput}


def _last_line(child: Child) -> str:
    lines = [line for line in log_tail(child.log_path, 20).splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"
