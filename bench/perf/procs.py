"""Spawning the benchmark's processes: the throwaway broker and Jaeger, the engine's
coordinator and participants, and the raw aiokafka reference's two roles.

Every process is a `deploy._proc.Child` (its own session, its output appended to a log file in
the run's work directory), stopped with SIGTERM and then SIGKILL by whoever started it; `Engine`
and `Raw` are context managers that stop theirs whatever ends the block.

Participants run one process per service by default (``split=True``), as the issue's baseline
did: each service is its own deployment with its own consumer group, event loop and producer,
so no service's handler time or polling delays another's. ``split=False`` runs the three in one
process (fewer processes competing for two cores; the scheduling cost of the split shows as
the difference).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from bench.perf.app import SERVICES
from bench.perf.signing import COORDINATOR, PARTICIPANTS, Signing
from deploy._proc import Child, stop_all

__all__ = [
    "ROOT",
    "Engine",
    "Raw",
    "Servers",
    "base_env",
    "rss_kib",
    "servers",
]

ROOT = Path(__file__).resolve().parent.parent.parent
GRACE = 10.0
"""Seconds a process gets to stop after SIGTERM before it is killed."""


def rss_kib(pid: int) -> int | None:
    """The resident set size of a process in KiB (VmRSS of /proc/<pid>/status), or None."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a benchmark process: this checkout importable, unbuffered output,
    unsigned (`SAGA_UNSIGNED=1`) unless ``extra`` brings signing settings, and no tracing
    unless ``extra`` asks for it."""
    env = dict(os.environ)
    for variable in ("SAGA_SIGNING_KEY", "SAGA_KEYRING", "SAGA_POLICY", "SAGA_UNSIGNED"):
        env.pop(variable, None)  # only the benchmark's own settings count
    env.update({"PYTHONUNBUFFERED": "1", "OTEL_SDK_DISABLED": "true", "SAGA_UNSIGNED": "1"})
    env.update(extra or {})
    if "SAGA_SIGNING_KEY" in env:
        env.pop("SAGA_UNSIGNED", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@dataclass
class Servers:
    """The throwaway broker (and Jaeger, when asked for) of one benchmark run."""

    bootstrap: str
    broker_pid: int
    otlp_http: str | None = None
    jaeger_query: str | None = None
    """Jaeger's query API base URL, e.g. http://127.0.0.1:16686."""


@contextlib.contextmanager
def servers(workdir: Path, *, jaeger: bool = False) -> Iterator[Servers]:
    """Starts a broker with `deploy.kafka.start_kafka` (and Jaeger with
    `deploy.jaeger.start_jaeger`) for the block, and stops them after it."""
    from deploy.kafka import BENCH_JVM_OPTIONS, start_kafka

    with contextlib.ExitStack() as stack:
        # The tests' broker is tuned for a cheap start (C1 only, a small heap); a benchmark's
        # runs long enough for the full JIT, as a real broker would.
        jvm = os.environ.get("SAGA_KAFKA_JVM_OPTIONS") or " ".join(BENCH_JVM_OPTIONS)
        stack.enter_context(_env("SAGA_KAFKA_JVM_OPTIONS", jvm))
        kafka = stack.enter_context(start_kafka(data_dir=workdir / "kafka"))
        otlp = query = None
        if jaeger:
            from deploy.jaeger import start_jaeger

            server = stack.enter_context(start_jaeger(work_dir=workdir / "jaeger"))
            otlp, query = server.otlp_http_endpoint, server.query_url
        yield Servers(kafka.bootstrap_servers, kafka.pid, otlp, query)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Sets an environment variable for the block."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@dataclass
class _Group:
    """Processes started and stopped together."""

    workdir: Path
    children: list[Child] = field(default_factory=list)

    def check_alive(self, *, except_for: Child | None = None) -> None:
        """Raises if a process exited (``except_for`` may be down on purpose).

        Raises:
            RuntimeError: With the end of its log.
        """
        for child in self.children:
            if child is except_for:
                continue
            code = child.poll()
            if code is not None:
                raise RuntimeError(
                    f"{child.name} exited with status {code}; its log ({child.log_path}) "
                    f"ends:\n{child.tail(30)}"
                )

    def stop(self) -> None:
        """Stops every process (SIGTERM, SIGKILL after the grace period)."""
        stop_all(self.children, GRACE)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Engine(_Group):
    """The engine's coordinator and participant processes (`bench.perf.roles`), started.

    Args:
        bootstrap: The broker.
        prefix: The topic prefix of this run.
        workdir: Where the logs and the participants' call counts go.
        split: One process per service (default) or one for all three.
        tracing: OpenTelemetry on, exporting to ``otlp`` (OTLP over HTTP).
        otlp: The OTLP endpoint when tracing.
        env: More environment for every process.
        partitions: The topics' partition count.
        participants: Start the participants too (the rebuild benchmark needs none).
        signing: Sign and verify as `bench.perf.signing` sets up; None runs unsigned.
    """

    def __init__(
        self,
        bootstrap: str,
        prefix: str,
        workdir: Path,
        *,
        split: bool = True,
        tracing: bool = False,
        otlp: str | None = None,
        env: Mapping[str, str] | None = None,
        partitions: int = 6,
        participants: bool = True,
        signing: Signing | None = None,
    ) -> None:
        super().__init__(workdir)
        self.prefix = prefix
        extra = dict(env or {})
        if tracing:
            if otlp is None:
                raise ValueError("tracing needs an OTLP endpoint")
            extra.update({"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": otlp})
            extra.update({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "none"})
        common = ["--bootstrap", bootstrap, "--prefix", prefix, "--partitions", str(partitions)]
        common += ["--tracing"] if tracing else []
        groups = [[s] for s in SERVICES] if split else [list(SERVICES)]
        groups = groups if participants else []
        self.calls_files: list[Path] = []
        self.participants: list[Child] = []
        for services in groups:
            name = "participant-" + "+".join(services)
            calls = workdir / f"{prefix}.{name}.calls.json"
            self.calls_files.append(calls)
            argv = [sys.executable, "-m", "bench.perf.roles", "participant", *common]
            argv += ["--services", ",".join(services), "--calls-out", str(calls)]
            principal = services[0] if len(services) == 1 else PARTICIPANTS
            trust = signing.env(principal) if signing is not None else {}
            env_p = base_env({**extra, **trust, "OTEL_SERVICE_NAME": "+".join(services)})
            log = workdir / f"{prefix}.{name}.log"
            self.participants.append(Child(name, argv, log, env=env_p, cwd=ROOT, banner=True))
        # Static membership, as a supervised deployment would run it: the restarted
        # coordinator (B4) takes its partitions back without waiting out its old session.
        argv = [sys.executable, "-m", "bench.perf.roles", "coordinator", *common]
        argv += ["--instance-id", "perf-coordinator"]
        trust = signing.env(COORDINATOR) if signing is not None else {}
        env_c = base_env({**extra, **trust, "OTEL_SERVICE_NAME": "perf-coordinator"})
        log = workdir / f"{prefix}.coordinator.log"
        self.coordinator = Child("coordinator", argv, log, env=env_c, cwd=ROOT, banner=True)
        self.children = [*self.participants, self.coordinator]
        try:
            for child in self.children:
                child.start()
        except BaseException:
            self.stop()
            raise

    def kill_coordinator(self) -> None:
        """``kill -9`` of the coordinator's process group; returns once it is gone."""
        self.coordinator.send_signal(signal.SIGKILL)
        self.coordinator.wait(10.0)

    def restart_coordinator(self) -> None:
        """Starts the coordinator again, as a supervisor would."""
        self.coordinator.start()

    def calls(self) -> dict[str, int]:
        """Stops the participants and returns their handler calls, ``"saga_id step" -> n``.

        Raises:
            RuntimeError: A participant did not write its counts (it was killed, or failed).
        """
        stop_all(self.participants, GRACE)
        found: dict[str, int] = {}
        for path in self.calls_files:
            if not path.exists():
                raise RuntimeError(f"{path} was not written; see the participants' logs")
            found.update(json.loads(path.read_text()))
        return found


class Raw(_Group):
    """The raw aiokafka reference's processes (`bench.perf.raw`): a coordinator-like one and
    participant-like ones, one per service or one for all, mirroring `Engine`'s topology.

    Args:
        bootstrap: The broker.
        prefix: The topic prefix of this run (`bench.perf.raw.RawTopics`).
        workdir: Where the logs go.
        split: One participant-like process per service, or one for all three.
        plain_replies: Participant-like processes reply without transactions.
    """

    def __init__(
        self,
        bootstrap: str,
        prefix: str,
        workdir: Path,
        *,
        split: bool = True,
        plain_replies: bool = False,
    ) -> None:
        super().__init__(workdir)
        self.prefix = prefix
        common = ["--bootstrap", bootstrap, "--prefix", prefix]
        groups = [[s] for s in SERVICES] if split else [list(SERVICES)]
        env = base_env()
        for services in groups:
            name = "raw-participant-" + "+".join(services)
            argv = [sys.executable, "-m", "bench.perf.raw", "participant", *common]
            argv += ["--services", ",".join(services)]
            argv += ["--plain-replies"] if plain_replies else []
            log = workdir / f"{prefix}.{name}.log"
            self.children.append(Child(name, argv, log, env=env, cwd=ROOT, banner=True))
        argv = [sys.executable, "-m", "bench.perf.raw", "coordinator", *common]
        log = workdir / f"{prefix}.raw-coordinator.log"
        self.children.append(Child("raw-coordinator", argv, log, env=env, cwd=ROOT, banner=True))
        try:
            for child in self.children:
                child.start()
        except BaseException:
            self.stop()
            raise
