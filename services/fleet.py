"""Runs the coordinator and the five services as separate processes, and keeps them running.

A `Fleet` starts ``python -m saga coordinator --app services.app:sagas`` and one
``python -m saga participant --app services.<service>:participant`` per service, all under one
topic prefix and one data directory, each with its own log file and ``OTEL_SERVICE_NAME``. A
supervisor thread restarts any process that exits while the fleet is up, as an orchestrator
would: a participant that crashed after a side effect comes back, gets the command redelivered,
and must not apply it twice. `Fleet.stop` asks every process to stop (SIGTERM, which the
``saga`` command answers by finishing its batch in hand) and kills what is left after a grace
period; it runs on exit from the ``with`` block whatever the reason.

`Fleet.start_console` adds the operators' console (``saga serve``: the HTTP API, the web console
and ``/metrics``) as one more process, acting as ``operator``: unauthenticated and unsigned on
the plain broker (``--no-auth --as operator``), and on the secured one connected and signing as
``operator``, for callers who present the bearer token it makes (`Console.token`). It is not
restarted when it exits (a port taken meanwhile would make that a loop), and stops with the rest.

`wait_ready` sends a canary order through the whole saga: when it completes, the coordinator and
every service on the happy path are members of their consumer groups and serving.

The order's own event topics (`services.app.order_topics`: ``order-placed``, which starts
sagas, and the outcome topics) are created before the coordinator starts: its trigger relay
subscribes to ``order-placed`` at once, and a consumer learns of a topic made later only at its
next metadata refresh.

Without a `services.secure.SecureSetup` the processes run unsigned (``SAGA_UNSIGNED=1``, which
the ``saga`` command requires to be explicit) on a plain broker. With one, each process
connects and signs as its own principal (the coordinator as ``coordinator``, each service as
itself), payloads are sealed if the setup seals them, and `Fleet.client` gives a client that
signs as ``client``.
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import orjson

from deploy._proc import LOOPBACK, Child, check_port_free, stop_all
from deploy.tls import write_private
from saga import Coordinator, SagaClient, SagaStatus, SagaTimeout, TransportError
from saga.adapters.kafka import KafkaTransport
from services.app import order_topics, sagas_for
from services.orders import make_order, submit
from services.secure import CLIENT, MANAGER, OPERATOR, TRUST_ENV, SecureSetup
from services.secure import COORDINATOR as COORDINATOR_PRINCIPAL

__all__ = [
    "CONSOLE",
    "CONSOLE_PRINCIPAL",
    "COORDINATOR",
    "PARTICIPANTS",
    "Console",
    "Fleet",
    "ManagedProcess",
    "ProcessExited",
]

COORDINATOR = "saga-coordinator"
"""The coordinator's process name (and its ``OTEL_SERVICE_NAME``)."""

CONSOLE = "saga-console"
"""The console's process name (and its ``OTEL_SERVICE_NAME``)."""

CONSOLE_PRINCIPAL = OPERATOR
"""Whom the console acts as: the operator may cancel, retry and resolve any saga, and decide
any approval (it is the escalation's target, `services.app.ESCALATE_TO`)."""

PARTICIPANTS = ("location", "payment", "restaurant", "rider", "notification")
"""The services, each served by ``services.<name>:participant``."""

_ROOT = Path(__file__).resolve().parent.parent
_EVENT_PARTITIONS = 6


class ProcessExited(RuntimeError):
    """A process of the fleet exited while it was expected to come up."""


class ManagedProcess(Child):
    """One process of the fleet and its history.

    Attributes:
        exit_codes: The status of every exit the supervisor saw, oldest first.
    """

    def __init__(self, name: str, argv: list[str], log_path: Path, env: Mapping[str, str]) -> None:
        """Describes the process; `Fleet` starts it.

        Args:
            name: ``saga-coordinator`` or the service name.
            argv: The command line.
            log_path: Where its stdout and stderr go (appended across restarts).
            env: Its environment.
        """
        super().__init__(name, argv, log_path, env=env, cwd=_ROOT, banner=True)
        self.exit_codes: list[int] = []

    @property
    def restarts(self) -> int:
        """How often the supervisor brought it back."""
        return len(self.exit_codes)


@dataclass(frozen=True)
class Console:
    """The fleet's console process and how to reach it.

    Attributes:
        url: Its address (``http://127.0.0.1:<port>``, no trailing slash).
        principal: Whom its requests act as.
        token: The bearer token to sign in with (secured fleets), or None when it takes
            anyone (``--no-auth``).
        db: Its saga index file.
        process: The ``saga serve`` process.
    """

    url: str
    principal: str
    token: str | None
    db: Path
    process: ManagedProcess

    @property
    def tokens_file(self) -> Path | None:
        """The tokens file it reads (the token's hash and the principal), or None."""
        return self.db.with_name("console-tokens") if self.token is not None else None

    @property
    def token_file(self) -> Path | None:
        """The file holding `token` (0600), or None."""
        return self.db.with_name("console-token") if self.token is not None else None

    def get(self, path: str, *, timeout: float = 5.0) -> Any:
        """GETs ``path`` (e.g. ``/api/v1/counts``) with the token, and parses the JSON answer.

        Raises:
            OSError: It did not answer, or answered with an error status
                (`urllib.error.HTTPError`).
        """
        request = urllib.request.Request(self.url + path, headers={"Accept": "application/json"})
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return orjson.loads(response.read())

    def answers(self) -> bool:
        """Whether its API answers an authenticated request (never raises)."""
        try:
            self.get("/api/v1/counts", timeout=2.0)
        except (OSError, ValueError):
            return False
        return True

    def wait_answering(self, timeout: float = 60.0) -> None:
        """Waits until its API answers.

        Raises:
            deploy._proc.StartError: It exited first, or did not answer in time; the message
                quotes its log.
        """
        self.process.wait_ready(self.answers, what="the console", timeout=timeout)


class Fleet:
    """The coordinator and the services, as processes, under one prefix and data directory.

    Args:
        bootstrap: Kafka address.
        prefix: Topic prefix shared by every process.
        data_dir: ``SAGA_SERVICES_DATA`` of the services (their SQLite files).
        log_dir: Where the processes' logs go (default: ``<data_dir>/logs``).
        env: Extra environment for every process (``SAGA_STEP_TIMEOUT``, ``SAGA_FAULTS``,
            ``OTEL_*``...).
        supervise: Restart processes that exit while the fleet is up.
        grace: Seconds `stop` waits after SIGTERM before it kills.
        secure: The secured deployment to run as (its prefix must be ``prefix``); None runs
            unsigned on a plain broker.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        prefix: str,
        data_dir: Path,
        log_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        supervise: bool = True,
        grace: float = 10.0,
        secure: SecureSetup | None = None,
    ) -> None:
        if secure is not None and secure.prefix != prefix:
            raise ValueError(f"the secure setup is for prefix {secure.prefix!r}, not {prefix!r}")
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.data_dir = data_dir
        self.log_dir = log_dir or data_dir / "logs"
        self.extra_env = dict(env or {})
        self.supervise = supervise
        self.grace = grace
        self.secure = secure
        self.processes: dict[str, ManagedProcess] = {}
        """The supervised processes: the coordinator and the services."""
        self.console: Console | None = None
        """The console, once `start_console` started it."""
        self.ready_after: float | None = None
        """Seconds the canary order took, once `wait_ready` succeeded."""
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Fleet:
        """Starts the fleet and returns it."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stops every process, whatever ended the block."""
        self.stop()

    def start(self) -> None:
        """Starts the coordinator and every participant (they come up in the background)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        anyio.run(self._ensure_event_topics)
        try:
            self._spawn(COORDINATOR, ["coordinator", "--app", "services.app:sagas"])
            for service in PARTICIPANTS:
                self._spawn(service, ["participant", "--app", f"services.{service}:participant"])
        except BaseException:
            self.stop()
            raise
        if self.supervise:
            self._supervisor = threading.Thread(
                target=self._watch, name=f"fleet-{self.prefix}", daemon=True
            )
            self._supervisor.start()

    def stop(self) -> None:
        """Stops every process: SIGTERM, then SIGKILL after the grace period. Idempotent."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        with self._lock:
            console = [self.console.process] if self.console is not None else []
            stop_all([*self.processes.values(), *console], self.grace)

    def kill(self, name: str) -> None:
        """Kills one process at once (SIGKILL); the supervisor restarts it.

        Args:
            name: ``saga-coordinator`` or the service name.
        """
        with self._lock:
            self.processes[name].kill()

    def start_console(
        self, port: int, *, app: str = "services.app:sagas", jaeger_ui: str | None = None
    ) -> Console:
        """Starts the console (``saga serve``) on ``127.0.0.1:<port>``; it comes up in the
        background (`Console.wait_answering`). Call it once the saga topics exist
        (`ensure_topics`): on a secured broker the operator may not create them.

        Its index is ``<data_dir>/console.sqlite3``. On a secured fleet a fresh bearer token is
        made for the operator (its hash in ``<data_dir>/console-tokens``, the token itself in
        ``<data_dir>/console-token``, both 0600).

        Args:
            port: The port.
            app: The definitions whose input models check starts.
            jaeger_ui: A Jaeger UI its trace pages link out to.

        Raises:
            deploy._proc.PortInUseError: Something listens on the port already.
        """
        check_port_free(port, "the console")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        db = self.data_dir / "console.sqlite3"
        args = ["serve", "--app", app, "--host", LOOPBACK, "--port", str(port), "--db", str(db)]
        if jaeger_ui:
            args += ["--jaeger-ui", jaeger_ui]
        token = None
        if self.secure is None:
            # Unsigned, as the rest of the fleet: anyone who reaches 127.0.0.1 acts as the
            # operator (local development).
            args += ["--no-auth", "--as", CONSOLE_PRINCIPAL]
        else:
            from saga.server.auth import hash_token

            token = secrets.token_urlsafe(24)
            write_private(db.with_name("console-token"), f"{token}\n".encode())
            line = f"{hash_token(token)} {CONSOLE_PRINCIPAL}\n"
            write_private(db.with_name("console-tokens"), line.encode())
            args += ["--tokens", str(db.with_name("console-tokens"))]
        log_path = self.log_dir / f"{CONSOLE}.log"
        proc = ManagedProcess(CONSOLE, self._argv(args), log_path, self._env(CONSOLE))
        console = Console(f"http://{LOOPBACK}:{port}", CONSOLE_PRINCIPAL, token, db, proc)
        with self._lock:
            self.console = console
            proc.start()
        return console

    # -- processes ---------------------------------------------------------------------------

    def _principal(self, name: str) -> str:
        """The principal a process of the fleet connects and signs as."""
        if name == COORDINATOR:
            return COORDINATOR_PRINCIPAL
        if name == CONSOLE:
            return CONSOLE_PRINCIPAL
        return name

    def _env(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "SAGA_KAFKA_BOOTSTRAP": self.bootstrap,
                "SAGA_PREFIX": self.prefix,
                "SAGA_SERVICES_DATA": str(self.data_dir),
                "SAGA_LOG_LEVEL": env.get("SAGA_LOG_LEVEL", "info"),
                "OTEL_SERVICE_NAME": name,
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        for variable in TRUST_ENV:
            # Only the setup decides: a stray SAGA_UNSIGNED=1 beside keys is refused.
            env.pop(variable, None)
        if self.secure is None:
            # Unsigned operation must be explicit: the saga command refuses to guess it.
            env["SAGA_UNSIGNED"] = "1"
        else:
            env.update(self.secure.env(self._principal(name)))
        # Static membership: a process restarted under its name takes its partitions back at
        # once instead of after the group's session timeout.
        env["SAGA_INSTANCE_ID"] = name
        # The services must import from this checkout, wherever the caller runs from.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
        return env

    def _argv(self, args: list[str]) -> list[str]:
        return [
            sys.executable,
            "-m",
            "saga",
            *args,
            "--prefix",
            self.prefix,
            "--bootstrap-servers",
            self.bootstrap,
        ]

    def _spawn(self, name: str, args: list[str]) -> None:
        proc = self.processes.get(name) or ManagedProcess(
            name, self._argv(args), self.log_dir / f"{name}.log", self._env(name)
        )
        self.processes[name] = proc
        proc.start()

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            with self._lock:
                if self._stopping.is_set():
                    return
                for proc in self.processes.values():
                    code = proc.poll()
                    if code is not None:
                        proc.exit_codes.append(code)
                        proc.start()

    def check_alive(self) -> None:
        """Raises if a process exited and is not being restarted.

        Raises:
            ProcessExited: With the end of its log.
        """
        for proc in self.processes.values():
            code = proc.poll()
            if code is not None and not self.supervise:
                raise ProcessExited(
                    f"{proc.name} exited with status {code}; its log ({proc.log_path}) ends:\n"
                    f"{proc.tail(30)}"
                )

    # -- readiness ---------------------------------------------------------------------------

    @property
    def topics(self) -> tuple[str, str, str]:
        """The order's event topics under the fleet's prefix: placed, completed, cancelled."""
        return order_topics(self.prefix).all()

    def client(self, *, deadline: float = 20.0) -> SagaClient:
        """A client on the fleet's prefix: signing as ``client`` on the setup's secured
        transport, or unsigned on the plain broker.

        Args:
            deadline: The transport's deadline.
        """
        if self.secure is not None:
            return self.secure.client(CLIENT, deadline=deadline)
        return SagaClient(KafkaTransport(self.bootstrap, deadline=deadline), prefix=self.prefix)

    def manager(self, *, deadline: float = 20.0) -> SagaClient:
        """A client that decides approvals as ``manager`` (`services.app.APPROVERS`): signing
        as it on the secured broker, else claiming to be it (unsigned, the coordinator records
        the claim as unverified and checks it against the step's approvers).

        Args:
            deadline: The transport's deadline.
        """
        return self._person(MANAGER, deadline)

    def operator(self, *, deadline: float = 20.0) -> SagaClient:
        """A client acting as ``operator``, to whom approvals are escalated
        (`services.app.ESCALATE_TO`), signing or claiming as `manager` does.

        Args:
            deadline: The transport's deadline.
        """
        return self._person(OPERATOR, deadline)

    def _person(self, principal: str, deadline: float) -> SagaClient:
        if self.secure is not None:
            return self.secure.client(principal, deadline=deadline)
        transport = KafkaTransport(self.bootstrap, deadline=deadline)
        return SagaClient(transport, prefix=self.prefix, actor=principal)

    async def _ensure_event_topics(self) -> None:
        """Creates the order's event topics, as the coordinator's principal when secured (it
        may create them; the client may only use them)."""
        if self.secure is not None:
            transport = self.secure.transport(COORDINATOR_PRINCIPAL)
        else:
            transport = KafkaTransport(self.bootstrap, deadline=30)
        await transport.ensure_topics(list(self.topics), _EVENT_PARTITIONS)

    async def ensure_topics(self, client: SagaClient) -> None:
        """Creates the saga topics as the coordinator does, if they are missing.

        Called before anything is sent or read: on a broker that auto-creates topics, a
        client's first request (or a status read) would otherwise create the requests or
        snapshots topic with the broker's default of one partition, and the coordinator would
        then refuse to run (its inputs and log must have equal partition counts). On a secured
        broker only the coordinator's principal may create them, so they are created as it.
        """
        transport = client.transport
        if self.secure is not None:
            transport = self.secure.transport(COORDINATOR_PRINCIPAL)
        definitions = sagas_for(self.prefix)  # this process's SAGA_PREFIX may be another
        await Coordinator(definitions, transport=transport, prefix=self.prefix).ensure_topics()

    async def wait_ready(self, client: SagaClient, timeout: float = 90.0) -> float:
        """Sends canary orders until one completes; returns the seconds it took.

        A canary that does not complete (a service joined its group after the step's retries
        ran out) is followed by another, until ``timeout``.

        Raises:
            TimeoutError: Nothing completed in time; the message quotes the coordinator's log.
        """
        started = time.monotonic()
        await self.ensure_topics(client)
        with anyio.move_on_after(timeout):
            while True:
                self.check_alive()
                order = make_order(0)
                order["order_id"] = f"canary-{uuid.uuid4().hex[:12]}"
                (saga_id,) = await submit(client, [order])
                try:
                    state = await client.wait(saga_id, timeout=60, poll=0.2)
                except (SagaTimeout, TransportError):
                    continue
                if state.status is SagaStatus.COMPLETED:
                    self.ready_after = time.monotonic() - started
                    return self.ready_after
        raise TimeoutError(
            f"the fleet under prefix {self.prefix!r} did not complete a canary order within "
            f"{timeout:.0f}s; the coordinator's log ({self.processes[COORDINATOR].log_path}) "
            f"ends:\n{self.processes[COORDINATOR].tail(30)}"
        )
