"""The participant's and the transport's hot path, measured end to end on a real broker.

Run: ``python -m bench.bench_hotpath [--bootstrap HOST:PORT] [--sagas 200] [--window 1]``.
A 3-step sequential saga with no-op handlers; the coordinator runs in this process, the three
participants in a child process (``serve``), so the participants' costs are their own. Prints
one JSON object: p50/p99 latency and sagas/s. ``--sleeps`` makes both processes count the
``asyncio.sleep`` calls aiokafka makes, by caller and length (to find which of its retry
back-offs a run waits on), and prints them too.

Used to measure the changes to `saga.adapters.kafka` and `saga.runtime.participant`: run it
with ``PYTHONPATH`` at a tree before and after a change, in the same session.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from typing import Any

import anyio

from saga import Coordinator, Participant, SagaDefinition, SagaStatus, Step, StepContext
from saga.adapters.kafka import KafkaTransport

SERVICES = ("s1", "s2", "s3")
DEFINITION = SagaDefinition(
    name="hot",
    steps=[
        Step(name="a", service="s1", action="do", compensation="undo"),
        Step(name="b", service="s2", action="do", compensation="undo", depends_on=["a"]),
        Step(name="c", service="s3", action="do", kind="pivot", depends_on=["b"]),
    ],
)

_SLEEPS: collections.Counter[str] = collections.Counter()


def count_sleeps() -> None:
    """Counts aiokafka's ``asyncio.sleep`` calls by caller and length (for ``--sleeps``)."""
    import aiokafka.client
    import aiokafka.consumer.fetcher
    import aiokafka.consumer.group_coordinator
    import aiokafka.producer.sender

    real = asyncio.sleep

    for module in (
        aiokafka.client,
        aiokafka.consumer.fetcher,
        aiokafka.consumer.group_coordinator,
        aiokafka.producer.sender,
    ):
        name = module.__name__.rsplit(".", 1)[-1]

        def sleep(delay: float, result: object = None, *, _name: str = name) -> Any:
            caller = sys._getframe(1)
            where = caller.f_code.co_name
            if where != "_heartbeat_routine":
                owner = caller.f_locals.get("self")
                if owner is not None:
                    where = f"{type(owner).__name__}.{where}"
                _SLEEPS[f"{_name}:{where}:{caller.f_lineno} {delay:.3g}s"] += 1
            return real(delay, result)

        module.asyncio = type(sys)("asyncio_counted")
        module.asyncio.__dict__.update(asyncio.__dict__)
        module.asyncio.sleep = sleep


def participants() -> list[Participant]:
    """The three no-op services."""
    found = []
    for service in SERVICES:
        p = Participant(service)

        @p.handler("do")
        async def do(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
            return {"ok": ctx.step}

        @p.handler("undo")
        async def undo(payload: dict[str, Any], ctx: StepContext) -> None:
            return None

        found.append(p)
    return found


async def serve(bootstrap: str, prefix: str) -> None:
    """The child process: the three participants until SIGTERM."""
    transport = KafkaTransport(bootstrap)
    async with anyio.create_task_group() as tg:
        for p in participants():
            await tg.start(
                lambda task_status, p=p: p.run(transport, prefix=prefix, task_status=task_status)
            )
        print("ready", flush=True)
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                tg.cancel_scope.cancel()
                break
    if _SLEEPS:
        print(json.dumps({"participant_sleeps": dict(_SLEEPS.most_common(12))}), flush=True)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    bootstrap: str, prefix: str, sagas: int, window: int, child: int
) -> dict[str, Any]:
    """Runs ``sagas`` sagas, ``window`` at a time, after a warm-up; returns the figures, with
    the CPU time each process spent per saga (steadier than wall time on a shared machine)."""
    coordinator = Coordinator([DEFINITION], transport=KafkaTransport(bootstrap), prefix=prefix)
    async with coordinator:
        for _ in range(3):
            warm = await coordinator.start("hot", {})
            await coordinator.wait(warm, 60)
        _SLEEPS.clear()
        limiter = anyio.Semaphore(window)
        latencies: list[float] = []

        async def one(i: int) -> None:
            async with limiter:
                t0 = time.perf_counter()
                saga_id = await coordinator.start("hot", {"i": i})
                state = await coordinator.wait(saga_id, 120)
                assert state.status is SagaStatus.COMPLETED, state.status
                latencies.append(time.perf_counter() - t0)

        t0, cpu0, child0 = time.perf_counter(), time.process_time(), cpu_seconds(child)
        async with anyio.create_task_group() as runs:
            for i in range(sagas):
                runs.start_soon(one, i)
        elapsed = time.perf_counter() - t0
        cpu, child_cpu = time.process_time() - cpu0, cpu_seconds(child) - child0
    latencies.sort()
    return {
        "sagas": sagas,
        "window": window,
        "sagas_per_s": round(sagas / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p90_ms": round(latencies[int(0.90 * (len(latencies) - 1))] * 1000, 1),
        "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 1),
        "max_ms": round(latencies[-1] * 1000, 1),
        "coordinator_cpu_ms_per_saga": round(cpu * 1000 / sagas, 3),
        "participants_cpu_ms_per_saga": round(child_cpu * 1000 / sagas, 3),
    }


async def drain(bootstrap: str, commands: int, rounds: int) -> dict[str, Any]:
    """The participant alone: ``commands`` commands for one no-op service written up front,
    then one participant started, timed until every reply is written; ``rounds`` times, each
    on fresh topics. CPU seconds per command are this process's (the participant's) alone."""
    from saga.core.codec import encode
    from saga.core.messages import Command
    from saga.runtime.ports import Outgoing, Topics

    transport = KafkaTransport(bootstrap)
    figures: list[tuple[float, float]] = []
    for _ in range(rounds):
        topics = Topics(f"drain-{uuid.uuid4().hex[:8]}")
        topic = topics.commands("s1")
        await transport.ensure_topics([topic, topics.replies, topics.dlq], 6)
        now = time.time()
        out = [
            Outgoing(
                topic,
                f"saga-{i}".encode(),
                encode(
                    Command(
                        message_id=f"m-{i}",
                        saga_id=f"saga-{i}",
                        saga_name="hot",
                        saga_version=1,
                        step="a",
                        phase="action",
                        service="s1",
                        action="do",
                        attempt=1,
                        idempotency_key=f"saga-{i}/a",
                        payload={},
                        deadline_at=now + 600,
                        at=now,
                        budget=600,
                    )
                ),
            )
            for i in range(commands)
        ]
        async with transport.producer() as producer:
            for at in range(0, commands, 500):
                await producer.send(out[at : at + 500])
        p = participants()[0]
        t0, cpu0 = time.perf_counter(), time.process_time()
        async with p.serving(transport, prefix=topics.prefix):
            while p.stats.handled < commands:  # noqa: ASYNC110 (a counter, no event)
                await anyio.sleep(0.01)
        figures.append((time.perf_counter() - t0, time.process_time() - cpu0))
    return {
        "commands": commands,
        "per_s": [round(commands / wall) for wall, _ in figures],
        "cpu_us_per_command": [round(cpu * 1e6 / commands) for _, cpu in figures],
    }


async def coordinate(bootstrap: str, prefix: str, instance_id: str | None) -> None:
    """A coordinator process (for ``recovery``): serves until killed."""
    options = {"instance_id": instance_id} if instance_id else {}
    transport = KafkaTransport(bootstrap, **options)  # type: ignore[arg-type]
    async with Coordinator([DEFINITION], transport=transport, prefix=prefix):
        print("ready", flush=True)
        await anyio.sleep_forever()


def spawn(command: list[str]) -> subprocess.Popen[str]:
    """A child process of this script that has said ``ready``."""
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_hotpath", *command],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ,
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        child.kill()
        raise SystemExit(f"{command[0]} did not start")
    return child


async def log_size(consumer: Any, partitions: list[Any]) -> int:
    """Committed records in the saga log now (its end offsets, summed)."""
    return sum((await consumer.end_offsets(partitions)).values())


async def recovery(bootstrap: str, sagas: int, instance_id: str | None) -> dict[str, Any]:
    """Starts ``sagas`` sagas, 50 a second, against a coordinator process, kills it with
    SIGKILL after 3 s, starts it again at once, and times the restart to the first new event in
    the log and to the last saga completed."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from saga.runtime.client import SagaClient

    prefix = f"rec-{uuid.uuid4().hex[:8]}"
    coordinator_args = ["coordinate", "--bootstrap", bootstrap, "--prefix", prefix]
    if instance_id:
        coordinator_args += ["--instance-id", instance_id]
    coordinator = spawn(coordinator_args)
    serving = spawn(["serve", "--bootstrap", bootstrap, "--prefix", prefix])
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await reader.start()
    log = [TopicPartition(f"{prefix}.log", p) for p in range(6)]
    try:
        async with SagaClient(KafkaTransport(bootstrap), prefix=prefix) as client:
            ids: list[str] = []

            async def keep_starting() -> None:
                for i in range(sagas):  # a steady stream, so that some are always in flight
                    ids.append(await client.start("hot", {"i": i}))
                    await anyio.sleep(0.02)

            async with anyio.create_task_group() as tg:
                tg.start_soon(keep_starting)
                await anyio.sleep(3)
                at_kill = await log_size(reader, log)
                coordinator.kill()
                coordinator.wait()
                killed = time.perf_counter()
                coordinator = spawn(coordinator_args)
                started = time.perf_counter()
                with anyio.fail_after(120):
                    while await log_size(reader, log) <= at_kill:  # noqa: ASYNC110 (the broker)
                        await anyio.sleep(0.02)
                progress = time.perf_counter()
            for saga_id in ids:
                state = await client.wait(saga_id, 120)
                assert state.status is SagaStatus.COMPLETED, state.status
            finished = time.perf_counter()
    finally:
        await reader.stop()
        for child in (coordinator, serving):
            child.kill()
            child.wait()
    return {
        "sagas": sagas,
        "events_at_kill": at_kill,
        "instance_id": instance_id,
        "process_start_s": round(started - killed, 2),
        "restart_to_first_event_s": round(progress - started, 2),
        "kill_to_first_event_s": round(progress - killed, 2),
        "kill_to_all_completed_s": round(finished - killed, 2),
    }


def main() -> None:
    """Starts a broker if none is given, the participants' process, and measures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "command",
        nargs="?",
        default="measure",
        choices=["measure", "serve", "drain", "coordinate", "recovery"],
    )
    parser.add_argument("--bootstrap")
    parser.add_argument("--prefix")
    parser.add_argument("--sagas", type=int, default=200)
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument("--sleeps", action="store_true")
    parser.add_argument("--instance-id")
    args = parser.parse_args()
    if args.sleeps:
        count_sleeps()
    if args.command == "serve":
        anyio.run(serve, args.bootstrap, args.prefix)
        return
    if args.command == "coordinate":
        anyio.run(coordinate, args.bootstrap, args.prefix, args.instance_id)
        return
    if args.command == "recovery":
        print(json.dumps(anyio.run(recovery, args.bootstrap, args.sagas, args.instance_id)))
        return
    if args.command == "drain":
        print(json.dumps(anyio.run(drain, args.bootstrap, args.sagas, args.window)))
        return
    with ExitStack() as stack:
        bootstrap = args.bootstrap
        if bootstrap is None:
            from deploy.kafka import start_kafka

            bootstrap = stack.enter_context(start_kafka()).bootstrap_servers
        prefix = f"hot-{uuid.uuid4().hex[:8]}"
        command = [
            sys.executable,
            "-m",
            "bench.bench_hotpath",
            "serve",
            "--bootstrap",
            bootstrap,
            "--prefix",
            prefix,
        ] + (["--sleeps"] if args.sleeps else [])
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=os.environ)
        try:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise SystemExit("the participants did not start")
            figures = anyio.run(measure, bootstrap, prefix, args.sagas, args.window, child.pid)
            figures["participant_pid"] = child.pid
            if _SLEEPS:
                figures["coordinator_sleeps"] = dict(_SLEEPS.most_common(12))
            print(json.dumps(figures), flush=True)
        finally:
            child.send_signal(signal.SIGTERM)
            try:
                out, _ = child.communicate(timeout=30)
                if out.strip():
                    print(out.strip(), flush=True)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


if __name__ == "__main__":
    main()
