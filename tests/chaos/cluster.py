"""Real coordinator and participant processes of `tests.chaos.app`, and ways to hurt them.

A `Cluster` runs ``python -m saga coordinator|participant --app tests.chaos.app:...`` processes
under one topic prefix and one work directory (the ledger, the reply stores, one log file per
process). Each `Proc` can be killed (SIGKILL), stopped (SIGTERM), paused (SIGSTOP) and resumed.
A supervisor thread notices exits: participants are restarted at once, as an orchestrator
would; coordinators are left to the test, which times their recovery. An exit the test did not
cause (neither a kill nor a participant's planned crash, `tests.chaos.app.CRASH_EXIT`) is
recorded in `Cluster.unexpected_exits` with the end of the process's log, for the test to fail
on. Leaving the ``with`` block stops every process whatever happened; an ``atexit`` hook kills
what a crashed test run left behind.

Without a `services.secure.SecureSetup` the processes run unsigned (``SAGA_UNSIGNED=1``, as the
``saga`` command requires to be told). With one, every coordinator connects and signs as
``coordinator`` and every participant as its service; `Cluster.transport` and `Cluster.client`
give the test matching readers and clients.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import orjson
import pytest

from deploy._proc import Child, stop_all
from deploy.kafka_secure import ADMIN
from saga import SagaClient, SagaState, TransportError
from saga.adapters.kafka import KafkaTransport
from saga.runtime.ports import Topics, Transport
from services.secure import CLIENT, COORDINATOR, TRUST_ENV, SecureSetup
from tests.chaos.app import CRASH_EXIT, SERVICES, Ledger

__all__ = [
    "TOLERATE_LEAKED_KAFKA_CLIENTS",
    "Cluster",
    "Proc",
    "Recovery",
    "ensure_topics",
    "eventually",
    "wait_until_final",
]

ROOT = Path(__file__).resolve().parents[2]

TOLERATE_LEAKED_KAFKA_CLIENTS = [
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <(function (AIOKafka|StreamWriter|_SelectorTransport)"
        "|socket.socket):pytest.PytestUnraisableExceptionWarning"
    ),
    pytest.mark.filterwarnings("ignore:unclosed:ResourceWarning"),
]
"""Marks for the tests that take the broker away under the test process's own clients.

The Kafka adapter does not always close an aiokafka client whose start or stop is cut short
by its deadline while the broker is gone; the garbage collector then reports the unclosed
client, its connections and sockets. That is a resource leak in the engine, not a lost message,
and these tests are about the latter: they tolerate exactly these warnings and no others.
"""

_RECOVERED = re.compile(r"partition (\d+): recovered (\d+) sagas in ([0-9.]+)s")


@dataclass(frozen=True)
class Recovery:
    """One ``partition p: recovered n sagas in s`` line of a coordinator's log."""

    proc: str
    partition: int
    sagas: int
    seconds: float
    """The rebuild from snapshots and log, as the coordinator measured it."""
    at: float
    """When it was logged (seconds since the epoch)."""


class Proc(Child):
    """One engine process: its command line, its log, and what happened to it.

    Attributes:
        role: ``coordinator`` or ``participant``.
        restart: Whether the supervisor restarts it when it exits.
        starts: When each run started (seconds since the epoch), oldest first.
        exits: The status of every exit the supervisor saw, oldest first.
        crashes: Planned crashes (exit status `CRASH_EXIT`) seen so far.
    """

    def __init__(
        self, name: str, role: str, argv: list[str], env: dict[str, str], log_path: Path,
        restart: bool,
    ) -> None:  # fmt: skip
        """Describes the process; `start` runs it.

        Args:
            name: The process's name in the cluster (and its ``OTEL_SERVICE_NAME``).
            role: ``coordinator`` or ``participant``.
            argv: The command line.
            env: Its environment.
            log_path: Where its stdout and stderr go (appended across restarts).
            restart: Whether the supervisor restarts it when it exits.
        """
        super().__init__(name, argv, log_path, env=env, cwd=ROOT, banner=True)
        self.role = role
        self.restart = restart
        self.starts: list[float] = []
        self.exits: list[int] = []
        self.crashes = 0
        self._expect_exit = False
        self._stopped = False
        self._lock = threading.RLock()

    def start(self) -> None:
        """Starts (or restarts) the process; does nothing while it runs."""
        with self._lock:
            if self.alive:
                return
            self._expect_exit = False
            self._stopped = False
            self.starts.append(time.time())
            super().start()

    def kill(self, *, hold: bool = False) -> None:
        """SIGKILL, as a crash would.

        Args:
            hold: Keep a participant down until `start`; without it the supervisor restarts a
                participant at once. A coordinator always stays down until `start`.
        """
        with self._lock:
            if self.alive:
                self._expect_exit = True
                self._stopped = hold or not self.restart
                super().kill()

    def terminate(self, grace: float = 20.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``grace``); it stays down.

        Args:
            grace: Seconds allowed for a clean shutdown.

        Returns:
            The exit status, or None when it had to be killed or was not running.
        """
        with self._lock:
            if not self.alive:
                return None
            self._expect_exit = True
            self._stopped = True
            self.request_stop()
        # Waited for outside the lock, so that a long shutdown does not block the supervisor.
        code = self.wait(grace)
        if code is None:
            super().kill()
        return code

    def lines(self) -> Iterator[dict[str, Any]]:
        """The JSON log lines written so far (other lines are skipped)."""
        try:
            text = self.log_path.read_bytes()
        except OSError:
            return
        for raw in text.splitlines():
            if raw.startswith(b"{"):
                try:
                    line = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(line, dict):
                    line["_proc"] = self.name
                    yield line

    def joined(self) -> bool:
        """Whether the process's consumer joined its group since its latest start."""
        since = self.starts[-1] if self.starts else 0.0
        return any(
            "Joined group" in str(line.get("msg", ""))
            and datetime.fromisoformat(str(line["ts"])).timestamp() >= since
            for line in self.lines()
        )

    def recoveries(self) -> list[Recovery]:
        """The partitions this process recovered, from its log."""
        found = []
        for line in self.lines():
            match = _RECOVERED.search(str(line.get("msg", "")))
            if match:
                at = datetime.fromisoformat(str(line["ts"])).timestamp()
                p, n, s = match.groups()
                found.append(Recovery(self.name, int(p), int(n), float(s), at))
        return found


_LIVE: weakref.WeakSet[Cluster] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for cluster in list(_LIVE):
        cluster.close(grace=0.0)


class Cluster:
    """Engine processes on one prefix, with a supervisor.

    Args:
        bootstrap: Kafka address.
        prefix: Topic prefix of every process.
        workdir: Holds the ledger, the reply stores and the logs.
        partitions: Partitions of the engine's topics.
        step_timeout: ``CHAOS_STEP_TIMEOUT`` of the processes.
        env: More environment for every process.
        secure: The secured deployment of ``prefix`` to run as; None runs unsigned.
    """

    def __init__(
        self,
        bootstrap: str,
        prefix: str,
        workdir: Path,
        *,
        partitions: int = 4,
        step_timeout: float = 5.0,
        env: Mapping[str, str] | None = None,
        secure: SecureSetup | None = None,
    ) -> None:
        if secure is not None and secure.prefix != prefix:
            raise ValueError(f"the secure setup is for prefix {secure.prefix!r}, not {prefix!r}")
        self.bootstrap = bootstrap
        self.secure = secure
        self.prefix = prefix
        self.workdir = workdir
        self.partitions = partitions
        self.step_timeout = step_timeout
        self.extra_env = dict(env or {})
        self.procs: dict[str, Proc] = {}
        self.unexpected_exits: list[str] = []
        self.ledger_path = workdir / "ledger.db"
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "logs").mkdir(exist_ok=True)
        self.ledger = Ledger(self.ledger_path)
        self._closing = threading.Event()
        self.broker_down = threading.Event()
        """Set by a test while it has the broker down: participants that exit meanwhile are
        restarted once it is cleared, as an orchestrator backing off would, rather than into a
        broker they cannot reach."""
        self._held: list[Proc] = []
        self._supervisor = threading.Thread(
            target=self._watch, name=f"cluster-{prefix}", daemon=True
        )
        self._supervisor.start()
        _LIVE.add(self)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- processes ---------------------------------------------------------------------------

    def _env(self, name: str, principal: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "CHAOS_LEDGER": str(self.ledger_path),
                "CHAOS_STEP_TIMEOUT": str(self.step_timeout),
                "CHAOS_PARTITIONS": str(self.partitions),
                "OTEL_SDK_DISABLED": "true",
                "OTEL_TRACES_EXPORTER": "none",
                "OTEL_SERVICE_NAME": name,
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        for variable in TRUST_ENV:
            env.pop(variable, None)  # only the setup decides how a process is trusted
        if self.secure is None:
            env["SAGA_UNSIGNED"] = "1"
        else:
            env.update(self.secure.env(principal))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return env

    def transport(self, principal: str = ADMIN, *, deadline: float = 15.0) -> Transport:
        """A transport for the test's own readers and writers: as ``principal`` (``admin``,
        who reads everything, by default) on the secured broker, else a plain one."""
        if self.secure is None:
            return KafkaTransport(self.bootstrap, deadline=deadline)
        return self.secure.transport(principal, deadline=deadline)

    def client(self, *, deadline: float = 15.0) -> SagaClient:
        """A client on the prefix: signing as ``client`` when secured, else unsigned."""
        if self.secure is None:
            return SagaClient(self.transport(deadline=deadline), prefix=self.prefix)
        return self.secure.client(CLIENT, deadline=deadline)

    def _spawn(
        self, name: str, role: str, app: str, restart: bool, extra: list[str], principal: str
    ) -> Proc:
        if name in self.procs:
            raise ValueError(f"a process called {name!r} exists already")
        argv = [sys.executable, "-m", "saga", role, "--app", app, *extra]
        argv += ["--prefix", self.prefix, "--bootstrap-servers", self.bootstrap]
        argv += ["--log-level", "info"]
        env = self._env(name, principal)
        proc = Proc(name, role, argv, env, self.workdir / "logs" / f"{name}.log", restart)
        self.procs[name] = proc
        proc.start()
        return proc

    def coordinator(self, name: str = "coordinator-1") -> Proc:
        """Starts a coordinator process (not restarted when it exits)."""
        extra = ["--partitions", str(self.partitions)]
        return self._spawn(name, "coordinator", "tests.chaos.app:sagas", False, extra, COORDINATOR)

    def participant(self, service: str, name: str | None = None) -> Proc:
        """Starts a participant process of ``service`` (restarted whenever it exits)."""
        app = f"tests.chaos.app:{service}"
        return self._spawn(name or service, "participant", app, True, [], service)

    def participants(self) -> list[Proc]:
        """Starts one participant per service."""
        return [self.participant(s) for s in SERVICES]

    def coordinators(self) -> list[Proc]:
        """The coordinator processes, running or not."""
        return [p for p in self.procs.values() if p.role == "coordinator"]

    def _watch(self) -> None:
        while not self._closing.wait(0.1):
            for proc in list(self.procs.values()):
                with proc._lock:
                    if proc.popen is None or proc._stopped or self._closing.is_set():
                        continue
                    code = proc.popen.poll()
                    if code is None:
                        continue
                    proc.exits.append(code)
                    if code == CRASH_EXIT and proc.role == "participant":
                        proc.crashes += 1
                    elif not proc._expect_exit:
                        self.unexpected_exits.append(
                            f"{proc.name} exited by itself with status {code}; its log "
                            f"({proc.log_path}) ends:\n{proc.tail()}"
                        )
                    if proc.restart and not self.broker_down.is_set():
                        proc.start()
                    else:
                        proc._stopped = True
                        if proc.restart:
                            self._held.append(proc)
            if self._held and not self.broker_down.is_set():
                for proc in self._held:
                    proc.start()
                self._held.clear()

    def close(self, grace: float = 10.0) -> None:
        """Stops every process (SIGTERM, then SIGKILL after ``grace``). Idempotent.

        Args:
            grace: Seconds allowed for a clean shutdown.
        """
        self._closing.set()
        running = [p for p in self.procs.values() if p.alive]
        for proc in running:
            proc._expect_exit = True
            proc._stopped = True
        stop_all(running, grace)
        _LIVE.discard(self)

    # -- observations ------------------------------------------------------------------------

    def recoveries(self) -> list[Recovery]:
        """Every partition recovery logged by every coordinator, oldest first."""
        found = [r for p in self.coordinators() for r in p.recoveries()]
        return sorted(found, key=lambda r: r.at)

    def check(self) -> None:
        """Fails if a process exited by itself (not killed by the test, not a planned crash)."""
        assert not self.unexpected_exits, "\n\n".join(self.unexpected_exits)

    def logs(self, role: str | None = None) -> str:
        """The tails of every process's log, for a failure message."""
        return "\n\n".join(
            f"==== {p.name} ({p.log_path})\n{p.tail(25)}"
            for p in self.procs.values()
            if role is None or p.role == role
        )


async def ensure_topics(transport: Transport, prefix: str, partitions: int) -> None:
    """Creates the engine's and the services' topics before any process or client uses them."""
    t = Topics(prefix)
    names = [t.requests, t.replies, t.log, t.dlq, t.alerts] + [t.commands(s) for s in SERVICES]
    await transport.ensure_topics(names, partitions)
    await transport.ensure_topics([t.snapshots], partitions, compacted=[t.snapshots])


async def wait_until_final(
    client: SagaClient,
    saga_ids: list[str],
    timeout: float,
    *,
    poll: float = 1.0,
    check: Callable[[], None] | None = None,
) -> dict[str, SagaState]:
    """Polls the snapshots until every saga is final, or ``timeout`` passes.

    Returns:
        The latest state of every saga that has one (final or not): the caller asserts.
    """
    wanted = set(saga_ids)
    latest: dict[str, SagaState] = {}
    with anyio.move_on_after(timeout):
        while True:
            if check is not None:
                check()
            try:
                async for state in client.states():
                    if state.saga_id in wanted:
                        latest[state.saga_id] = state
            except TransportError:
                await anyio.sleep(poll)
                continue
            done = [s for s in wanted if s in latest and latest[s].is_final]
            if len(done) == len(wanted):
                return latest
            await anyio.sleep(poll)
    return latest


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Waits until ``condition()`` holds, checking a few times a second.

    Raises:
        TimeoutError: It did not hold within ``timeout`` seconds (the message says ``what``).
    """
    with anyio.move_on_after(timeout):
        while True:
            if condition():
                return
            await anyio.sleep(0.2)
    raise TimeoutError(f"not within {timeout:.0f}s: {what}")
