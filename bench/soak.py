"""Soak: as many sagas as the time allows through one coordinator, its RSS, and its recovery.

Run: ``python -m bench.soak [--minutes 10] [--short-minutes 2] [--window 200]
[--evict-after 30] [--tombstone-after 60]``.

Each run starts a throwaway Kafka broker (`deploy.kafka.start_kafka`) and creates the engine's
topics itself, the snapshots topic with settings under which compaction can happen within the
run: Kafka compacts only closed segments, and a segment closes after ``segment.ms`` (7 days by
default), so with the defaults nothing would ever be compacted during a soak and a recovery
would read every snapshot version ever written. Here segments roll every ``--segment-ms``,
any dirty segment is cleanable (``min.cleanable.dirty.ratio`` 0.01) and tombstones are dropped
``--delete-retention-ms`` after they were compacted.

The coordinator (`bench.soak_app`, with the retention settings given) and the four no-op
participants run as two processes of their own; this process drives: it keeps ``--window``
sagas in flight for ``--minutes``, learns of their ends by tailing the log topic, and every
``--sample-every`` seconds records the coordinator's RSS (VmRSS from /proc), the sagas
completed so far and the coordinator's retention counters. At the end it kills the
coordinator with SIGKILL while the window is in flight, counts what is in the snapshots topic
(what a recovery reads), sends ``--backlog`` more starts while the coordinator is down, restarts
it after ``--down`` seconds and measures the time from the restart to the coordinator's
``recovered`` log lines, to its first new event in the log and to the backlog cleared.

A short run (``--short-minutes``, 0 to skip) comes first, then the long one, each on its own
broker, so that the recovery after few and after many sagas ever run can be compared. Writes
``--out`` (bench/results/soak.json) and ``--plot`` (bench/soak.png) and prints a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import orjson

from deploy._proc import Child, stop_all

ROOT = Path(__file__).resolve().parent.parent
SAGA_NAME = "bench"
FINAL_TYPES = {"saga_completed": "completed", "saga_compensated": "compensated"}
STUCK_TYPE = "saga_stuck"
FLAT_WITHIN = 0.20
"""The RSS target: after eviction starts, within 20% of the RSS at eviction start."""
SIMILAR_RATIO = 1.5
SIMILAR_SECONDS = 1.0
"""Recovery after many sagas counts as similar to after few: at most 1.5 times, or 1 s more."""


# -- processes and observations ----------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    """The resident set size of a process in MB (VmRSS of /proc/<pid>/status), or None."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class Recovered:
    """One ``partition N: recovered K sagas in S s`` line of the coordinator's log."""

    partition: int
    sagas: int
    seconds: float
    at: float


class LogWatcher:
    """Reads the coordinator's log file incrementally: its stats lines and recoveries."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._rest = b""
        self.stats: dict[str, Any] = {}
        self.recovered: list[Recovered] = []
        self.joined: list[float] = []
        self.warnings: list[str] = []
        self.config: dict[str, Any] = {}
        self.errors: list[str] = []

    def read(self) -> None:
        """Takes in the lines written since the last call."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        self._offset += len(data)
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        for raw in lines:
            if raw.startswith(b"{"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    line = orjson.loads(raw)
                    if isinstance(line, dict):
                        self._take(line)

    def _take(self, line: dict[str, Any]) -> None:
        if "soak_stats" in line:
            self.stats = line["soak_stats"]
        elif "soak_config" in line:
            self.config = line["soak_config"]
        elif "soak_warning" in line:
            self.warnings.append(str(line["soak_warning"]))
        elif "msg" in line:
            msg = str(line["msg"])
            at = datetime.fromisoformat(str(line["ts"])).timestamp()
            if msg.startswith("partition ") and " recovered " in msg:
                # "partition %d: recovered %d sagas in %.3fs"
                words = msg.replace(":", "").split()
                self.recovered.append(
                    Recovered(int(words[1]), int(words[3]), float(words[6].rstrip("s")), at)
                )
            elif "Joined group" in msg:
                self.joined.append(at)
            elif line.get("level") in ("error", "critical") and str(
                line.get("logger", "")
            ).startswith("saga"):
                self.errors.append(msg)


def engine_process(
    role: str, args: argparse.Namespace, bootstrap: str, prefix: str, logs: Path
) -> Child:
    """A `bench.soak_app` process (not started)."""
    argv = [sys.executable, "-m", "bench.soak_app", role, "--bootstrap", bootstrap]
    argv += ["--prefix", prefix, "--partitions", str(args.partitions)]
    if role == "coordinator":
        argv += ["--evict-after", str(args.evict_after), "--stats-every", "2"]
        argv += ["--tombstone-after", str(args.tombstone_after)]
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "OTEL_SDK_DISABLED": "true"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return Child(role, argv, logs / f"{role}.log", env=env, cwd=ROOT, banner=True)


# -- topics ----------------------------------------------------------------------------------


def snapshot_topic_config(args: argparse.Namespace) -> dict[str, str]:
    """The snapshots topic's settings: compacted, and compactable within the run."""
    return {
        "cleanup.policy": "compact",
        "segment.ms": str(args.segment_ms),
        "min.cleanable.dirty.ratio": "0.01",
        "min.compaction.lag.ms": "0",
        "delete.retention.ms": str(args.delete_retention_ms),
    }


async def create_topics(bootstrap: str, prefix: str, args: argparse.Namespace) -> None:
    """Creates the engine's topics before any process runs (the coordinator keeps them)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from bench.bench_engine import DEFINITION
    from saga.runtime.ports import Topics

    t = Topics(prefix)
    plain = [t.requests, t.replies, t.log, t.dlq, t.alerts]
    plain += [t.commands(s) for s in sorted(DEFINITION.services)]
    topics = [NewTopic(n, args.partitions, 1) for n in plain]
    config = snapshot_topic_config(args)
    topics.append(NewTopic(t.snapshots, args.partitions, 1, topic_configs=config))
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(topics)
        wanted = [topic.name for topic in topics]
        with anyio.fail_after(60):
            # Polling the broker, which offers nothing to wait on, until every partition has a
            # leader: clients started before would log NotLeaderForPartition while they retry.
            while not await _leaders_elected(admin, wanted):  # noqa: ASYNC110
                await anyio.sleep(0.2)
    finally:
        await admin.close()


async def _leaders_elected(admin: Any, names: list[str]) -> bool:
    if not set(names) <= set(await admin.list_topics()):
        return False
    described = await admin.describe_topics(names)
    return all(
        t.get("error_code", 0) == 0
        and t["partitions"]
        and all(p.get("error_code", 0) == 0 and p.get("leader", -1) >= 0 for p in t["partitions"])
        for t in described
    )


async def read_topic(
    bootstrap: str, topic: str, partitions: int, *, count: bool = True
) -> dict[str, int]:
    """Reads a whole topic as a reader from the beginning would: what is there, not written.

    With ``count`` false, only the offsets written (the end offsets) are looked up.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    records = tombstones = 0
    keys: set[bytes] = set()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        if not count:
            return {"offsets_written": sum(ends.values())}
        remaining = {tp for tp in tps if ends[tp] > starts[tp]}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=500, max_records=5000)
            for tp, msgs in batch.items():
                for m in msgs:
                    if m.offset < ends[tp]:
                        records += 1
                        tombstones += m.value is None
                        if m.key is not None:
                            keys.add(m.key)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    return {
        "offsets_written": sum(ends.values()),
        "records_present": records,
        "tombstones_present": tombstones,
        "keys_present": len(keys),
    }


# -- the driver --------------------------------------------------------------------------------


@dataclass
class Tracker:
    """The sagas in flight and the ends seen in the log."""

    window: int
    in_flight: dict[str, tuple[float, bool]] = field(default_factory=dict)
    """saga id -> (start time, whether it holds a slot of the window)."""
    ended: dict[str, int] = field(default_factory=lambda: {"completed": 0, "compensated": 0})
    stuck: int = 0
    events: int = 0
    last_event_at: float = 0.0
    latencies: list[float] = field(default_factory=list)
    slots: anyio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.slots = anyio.Semaphore(self.window)

    @property
    def finished(self) -> int:
        """Sagas completed or compensated so far."""
        return sum(self.ended.values())

    def on_event(self, key: bytes | None, value: bytes | None, now: float) -> None:
        """Takes in one record of the log."""
        self.events += 1
        self.last_event_at = now
        if key is None or value is None or b'"saga_' not in value:
            return
        kind = orjson.loads(value).get("type")
        if kind in FINAL_TYPES:
            self.ended[FINAL_TYPES[kind]] += 1
        elif kind == STUCK_TYPE:
            self.stuck += 1
        else:
            return
        entry = self.in_flight.pop(key.decode(), None)
        if entry is not None:
            started, holds_slot = entry
            self.latencies.append(time.monotonic() - started)
            if holds_slot:
                self.slots.release()


async def tail_log(bootstrap: str, topic: str, partitions: int, tracker: Tracker) -> None:
    """Follows the log topic (committed events only) until cancelled."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            now = time.time()
            for msgs in batch.values():
                for m in msgs:
                    tracker.on_event(m.key, m.value, now)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await consumer.stop()


async def wait_for(condition: Any, timeout: float, what: str, check: Any = None) -> float:
    """Waits until ``condition()``; returns the wall time it held. Raises after ``timeout``."""
    with anyio.move_on_after(timeout):
        while not condition():
            if check is not None:
                check()
            await anyio.sleep(0.02)
        return time.time()
    raise TimeoutError(f"not within {timeout:.0f}s: {what}")


def quantile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank below) of ``values``, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


async def drive(
    args: argparse.Namespace,
    minutes: float,
    bootstrap: str,
    prefix: str,
    coordinator: Child,
    participants: Child,
    broker_pid: int,
) -> dict[str, Any]:
    """Runs the soak and the kill and restart; returns the run's figures."""
    from saga import SagaClient
    from saga.adapters.kafka import KafkaTransport
    from saga.runtime.client import new_saga_id
    from saga.runtime.ports import Topics

    topics = Topics(prefix)
    watcher = LogWatcher(coordinator.log_path)
    tracker = Tracker(args.window)
    samples: list[dict[str, Any]] = []
    phase = "warm-up"
    t0 = time.monotonic()

    def check_alive() -> None:
        for child in (coordinator, participants):
            if phase != "down" or child is participants:
                code = child.poll()
                if code is not None:
                    raise RuntimeError(
                        f"{child.name} exited with status {code}; its log ({child.log_path}) "
                        f"ends:\n{log_tail(child.log_path)}"
                    )

    started_at = 0.0  # wall time of the coordinator's latest start by this function

    def sample() -> dict[str, Any]:
        watcher.read()
        # Counters from the running coordinator only, not the last ones of a killed one.
        alive = coordinator.alive and phase != "down"
        stats = watcher.stats if alive and watcher.stats.get("at", 0) >= started_at else {}
        row = {
            "t": round(time.monotonic() - t0, 2),
            "phase": phase,
            "rss_mb": rss_mb(coordinator.pid) if coordinator.alive else None,
            "participants_rss_mb": rss_mb(participants.pid),
            "broker_rss_mb": rss_mb(broker_pid),
            "completed": tracker.finished,
            "in_flight": len(tracker.in_flight),
            "held": stats.get("held"),
            "evicted": stats.get("evicted"),
            "tombstoned": stats.get("tombstoned"),
            "states": stats.get("states"),
            "stats_at": stats.get("at"),
        }
        samples.append(row)
        return row

    async def sampler() -> None:
        while True:
            check_alive()
            sample()
            await anyio.sleep(args.sample_every)

    transport = KafkaTransport(bootstrap)
    async with (
        SagaClient(transport, prefix=prefix, partitions=args.partitions) as client,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(tail_log, bootstrap, topics.log, args.partitions, tracker)

        async def start_one(i: int, holds_slot: bool) -> None:
            saga_id = new_saga_id()
            tracker.in_flight[saga_id] = (time.monotonic(), holds_slot)
            await client.start(SAGA_NAME, {"i": i}, saga_id)

        # Warm up: group joins, producers, metadata. Not measured.
        await tracker.slots.acquire()
        await start_one(-1, True)
        await wait_for(lambda: tracker.finished >= 1, 180, "the warm-up saga", check_alive)
        warm_up_s = round(time.monotonic() - t0, 2)
        tracker.latencies.clear()
        finished_before = tracker.finished

        phase = "soak"
        t0 = time.monotonic()
        tg.start_soon(sampler)
        deadline = t0 + minutes * 60
        i = 0
        while (left := deadline - time.monotonic()) > 0:
            with anyio.move_on_after(left):
                await tracker.slots.acquire()
                if time.monotonic() >= deadline:
                    tracker.slots.release()
                    break
                await start_one(i, True)
                i += 1
        soak_s = time.monotonic() - t0
        finished = tracker.finished - finished_before
        latencies = list(tracker.latencies)
        last = sample()

        # Kill while the window is in flight, then look at what a recovery will read.
        in_flight_at_kill = len(tracker.in_flight)
        phase = "down"
        killed_at = time.time()
        coordinator.kill()
        snapshots = await read_topic(bootstrap, topics.snapshots, args.partitions)
        log_topic = await read_topic(bootstrap, topics.log, args.partitions, count=False)
        for j in range(args.backlog):
            await start_one(i + j, False)
        backlog = len(tracker.in_flight)
        await anyio.sleep(max(0.0, killed_at + args.down - time.time()))

        phase = "recovery"
        events_before = tracker.events
        restarted_at = started_at = time.time()
        coordinator.start()
        first_event_at = await wait_for(
            lambda: tracker.events > events_before, 300, "a new event after restart", check_alive
        )
        cleared_at = await wait_for(
            lambda: not tracker.in_flight, 600, "the backlog cleared", check_alive
        )
        await anyio.sleep(2.5)  # one more stats line of the restarted coordinator
        after = sample()
        tg.cancel_scope.cancel()

    recovered = [r for r in watcher.recovered if r.at >= restarted_at - 1]
    joined = [at for at in watcher.joined if at >= restarted_at]
    soak_samples = [s for s in samples if s["phase"] == "soak"]
    evicting = [s for s in soak_samples if (s["evicted"] or 0) > 0]
    if evicting:
        eviction_start, source = float(evicting[0]["t"]), "observed (first sample with evicted > 0)"
    else:
        done = [s for s in soak_samples if s["completed"] > finished_before]
        eviction_start = float(args.evict_after) + (float(done[0]["t"]) if done else 0.0)
        source = "expected (first completion + evict_after; no eviction counter seen)"
    rss, flat = rss_figures(samples, eviction_start, args.evict_after, args.tombstone_after)
    rss["after_restart"] = after["rss_mb"]
    return {
        "minutes": minutes,
        "prefix": prefix,
        "retention": bool(watcher.config.get("retention")),
        "coordinator_config": watcher.config,
        "coordinator_warnings": watcher.warnings,
        "warm_up_s": warm_up_s,
        "seconds": round(soak_s, 1),
        "sagas_started": i,
        "sagas_finished": finished,
        "sagas_per_s": round(finished / soak_s, 1),
        "ended": dict(tracker.ended),
        "stuck": tracker.stuck,
        "latency_p50_ms": _ms(quantile(latencies, 0.5)),
        "latency_p95_ms": _ms(quantile(latencies, 0.95)),
        "eviction_start_s": round(eviction_start, 1),
        "eviction_start_source": source,
        "tombstoning_start_s": _first(soak_samples, "tombstoned"),
        "rss_mb": rss,
        "rss_flat": flat,
        "stats_at_kill": {k: last[k] for k in ("held", "evicted", "tombstoned", "states")},
        "snapshots_at_kill": snapshots,
        "log_at_kill": log_topic,
        "recovery": {
            "in_flight_at_kill": in_flight_at_kill,
            "backlog_sagas": backlog,
            "down_s": round(restarted_at - killed_at, 2),
            "partitions_recovered": len(recovered),
            "sagas_recovered": sum(r.sagas for r in recovered),
            "rebuild_s_total": round(sum(r.seconds for r in recovered), 3),
            "rebuild_s_max": round(max((r.seconds for r in recovered), default=0.0), 3),
            "restart_to_joined_s": _s(joined[0] - restarted_at) if joined else None,
            "restart_to_recovered_s": _s(max(r.at for r in recovered) - restarted_at)
            if recovered
            else None,
            "restart_to_first_event_s": _s(first_event_at - restarted_at),
            "restart_to_backlog_cleared_s": _s(cleared_at - restarted_at),
            "stats_after": {k: after[k] for k in ("held", "evicted", "tombstoned", "states")},
        },
        "coordinator_errors": watcher.errors[:20],
        "samples": samples,
    }


def _first(rows: list[dict[str, Any]], counter: str) -> float | None:
    """The time of the first sample with ``counter`` above 0."""
    return next((float(r["t"]) for r in rows if (r.get(counter) or 0) > 0), None)


def _growth(rows: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    """How the RSS of ``rows`` (from ``t0`` on) compares with its first value."""
    values = [float(r["rss_mb"]) for r in rows]
    start = values[0]
    low, high = start * (1 - FLAT_WITHIN), start * (1 + FLAT_WITHIN)
    minutes = [(float(r["t"]) - t0) / 60 for r in rows]
    slope = statistics.linear_regression(minutes, values).slope if len(values) >= 3 else None
    return {
        "from_s": round(float(rows[0]["t"]), 1),
        "rss_at_start": start,
        "max_over_start": round(max(values) / start, 3),
        "min_over_start": round(min(values) / start, 3),
        "end_over_start": round(values[-1] / start, 3),
        "slope_mb_per_min": None if slope is None else round(slope, 2),
        "holds": low <= min(values) and max(values) <= high,
    }


def rss_figures(
    samples: list[dict[str, Any]], eviction_start: float, evict_after: float, tombstone_after: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The coordinator's RSS over the soak, and whether it stays within 20%.

    ``holds`` is the target as stated, against the RSS at eviction start. Two more views:
    ``steady``, from the time retention reached its steady state (eviction start plus
    ``tombstone_after - evict_after``: from then on the ids kept for tombstoning stop growing
    too), and ``second_half``, the second half of the soak.
    """
    soak = [r for r in samples if r["phase"] == "soak" and r["rss_mb"]]
    rss: dict[str, Any] = {
        "first": soak[0]["rss_mb"] if soak else None,
        "max": max((r["rss_mb"] for r in soak), default=None),
        "end": soak[-1]["rss_mb"] if soak else None,
    }
    after = [r for r in soak if float(r["t"]) >= eviction_start]
    if not after:
        return rss, {"evaluated": False}
    values = [float(r["rss_mb"]) for r in after]
    rss.update(
        at_eviction_start=values[0], max_after_eviction=max(values), min_after_eviction=min(values)
    )
    held = [r["held"] for r in after if r.get("held") is not None]
    flat: dict[str, Any] = {"evaluated": True, **_growth(after, eviction_start)}
    flat["held_min_max_after_eviction"] = [min(held), max(held)] if held else None
    lag = (float(tombstone_after) - evict_after) if str(tombstone_after) != "none" else 0.0
    steady = [r for r in after if float(r["t"]) >= eviction_start + lag]
    if len(steady) >= 3:
        flat["steady"] = _growth(steady, float(steady[0]["t"]))
        rss["at_steady_start"] = steady[0]["rss_mb"]
    half = float(soak[-1]["t"]) / 2
    second = [r for r in after if float(r["t"]) >= half]
    if len(second) >= 3:
        flat["second_half"] = _growth(second, float(second[0]["t"]))
    return rss, flat


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _s(seconds: float) -> float:
    return round(seconds, 3)


def log_tail(path: Path, lines: int = 30) -> str:
    """The end of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


def one_run(args: argparse.Namespace, minutes: float, label: str) -> dict[str, Any]:
    """One soak on a broker of its own; returns its figures."""
    from deploy.kafka import start_kafka

    workdir = Path(tempfile.mkdtemp(prefix=f"saga-soak-{label}-"))
    prefix = f"soak-{label}-{uuid.uuid4().hex[:6]}"
    ok = False
    load_before = os.getloadavg()
    try:
        with start_kafka(data_dir=workdir / "kafka") as kafka:
            bootstrap = kafka.bootstrap_servers
            anyio.run(create_topics, bootstrap, prefix, args)
            coordinator = engine_process("coordinator", args, bootstrap, prefix, workdir)
            participants = engine_process("participants", args, bootstrap, prefix, workdir)
            try:
                participants.start()
                coordinator.start()
                result = anyio.run(
                    drive, args, minutes, bootstrap, prefix, coordinator, participants, kafka.pid
                )
            finally:
                stop_all([coordinator, participants], 10.0)
        ok = True
        load = {"before": [round(x, 2) for x in load_before]}
        load["after"] = [round(x, 2) for x in os.getloadavg()]
        return {"label": label, "load_average": load, **result}
    finally:
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"soak {label}: logs kept in {workdir}", file=sys.stderr)


# -- the report --------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """The machine and versions the figures come from."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
    java = ""
    with contextlib.suppress(OSError):
        done = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False)
        java = (done.stderr or done.stdout).splitlines()[0] if (done.stderr or done.stdout) else ""
    commit = ""
    with contextlib.suppress(OSError):
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False, cwd=ROOT,
        )  # fmt: skip
        commit = done.stdout.strip()
    from deploy.kafka import KAFKA_VERSION

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "cpu": model,
        "os": platform.platform(),
        "python": platform.python_version(),
        "java": java,
        "kafka": KAFKA_VERSION,
        "aiokafka": version("aiokafka"),
        "saga_engine": version("saga-engine"),
        "matplotlib": version("matplotlib"),
        "commit": commit,
    }


def targets(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Whether the targets hold: RSS flat after eviction starts; recovery independent of history."""
    long = runs.get("long")
    out: dict[str, Any] = {}
    if long is not None:
        flat = long["rss_flat"]
        out["rss_flat_within_20pct"] = flat.get("holds")
        out["rss_flat_within_20pct_from_steady_state"] = flat.get("steady", {}).get("holds")
        out["rss_flat_within_20pct_second_half"] = flat.get("second_half", {}).get("holds")
    short = runs.get("short")
    if long is not None and short is not None:
        compared = {}
        for key in ("restart_to_first_event_s", "restart_to_backlog_cleared_s", "rebuild_s_total"):
            a, b = short["recovery"][key], long["recovery"][key]
            if a is None or b is None:
                continue
            similar = b <= max(a * SIMILAR_RATIO, a + SIMILAR_SECONDS)
            compared[key] = {"short": a, "long": b, "similar": similar}
        out["recovery"] = compared
        out["recovery_similar"] = all(c["similar"] for c in compared.values())
        out["sagas_ever_run"] = {"short": short["sagas_started"], "long": long["sagas_started"]}
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    """RSS over time and sagas completed, with eviction start marked; the short run beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    main = runs.get("long") or next(iter(runs.values()))
    fig, (ax_rss, ax_done) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True, dpi=110)
    o = results["options"]
    fig.suptitle(
        f"Soak: one coordinator, {o['window']} sagas in flight, evict_after {o['evict_after']:g} s,"
        f" tombstone_after {o['tombstone_after']} s",
        fontsize=11,
    )

    def minutes(rows: list[dict[str, Any]]) -> list[float]:
        return [float(r["t"]) / 60 for r in rows]

    for label, run in runs.items():
        rows = [r for r in run["samples"] if r["phase"] == "soak" and r["rss_mb"]]
        style: dict[str, Any] = {"color": "tab:blue", "lw": 1.8}
        if run is not main:
            style = {"color": "tab:gray", "ls": "--", "lw": 1.2}
        ax_rss.plot(minutes(rows), [r["rss_mb"] for r in rows], label=f"coordinator RSS ({label}"
                    f" run, {run['minutes']:g} min)", **style)  # fmt: skip
        after = [r for r in run["samples"] if r["phase"] == "recovery" and r["rss_mb"]]
        if run is main and after:
            ax_rss.plot(minutes(after), [r["rss_mb"] for r in after], "o", color="tab:red",
                        ms=4, label="after kill -9 and restart")  # fmt: skip
    evict = float(main["eviction_start_s"]) / 60
    start_rss = main["rss_mb"].get("at_eviction_start")
    end_t = max(float(r["t"]) for r in main["samples"]) / 60
    if start_rss:
        ax_rss.fill_between(
            [evict, end_t], start_rss * (1 - FLAT_WITHIN), start_rss * (1 + FLAT_WITHIN),
            color="tab:green", alpha=0.12, label="±20% of RSS at eviction start",
        )  # fmt: skip
    steady = main["rss_flat"].get("steady")
    if steady:
        t_steady = float(steady["from_s"]) / 60
        for k in (1 - FLAT_WITHIN, 1 + FLAT_WITHIN):
            ax_rss.hlines(
                steady["rss_at_start"] * k, t_steady, end_t, colors="tab:olive", linestyles="--",
                lw=1, label="±20% of RSS once retention is steady" if k > 1 else None,
            )  # fmt: skip
    top = max((r["rss_mb"] or 0) for run in runs.values() for r in run["samples"])
    ax_rss.set_ylim(0, top * 1.35)
    ax_rss.set_ylabel("coordinator RSS (MB)")
    ax_rss.grid(alpha=0.3)

    rows = [r for r in main["samples"] if r["phase"] in ("soak", "down", "recovery")]
    ax_done.plot(minutes(rows), [r["completed"] for r in rows], color="tab:orange",
                 label="sagas completed")  # fmt: skip
    ax_done.set_ylabel("sagas completed")
    ax_done.set_xlabel("minutes since the soak started")
    ax_done.grid(alpha=0.3)
    held = [r["held"] for r in rows if r["held"] is not None]
    if held:
        ax_held = ax_done.twinx()
        # NaN while the coordinator is down breaks the line there.
        values = [float("nan") if r["held"] is None else r["held"] for r in rows]
        ax_held.plot(minutes(rows), values, color="tab:purple", lw=1, label="sagas held in memory")
        ax_held.set_ylabel("sagas held in memory")
        ax_held.set_ylim(0, max(held) * 1.3 + 1)
        ax_held.legend(loc="lower right", fontsize=8)
    kill = [float(r["t"]) / 60 for r in main["samples"] if r["phase"] == "down"]
    for ax in (ax_rss, ax_done):
        ax.axvline(evict, color="tab:green", ls=":", lw=1.5,
                   label=f"eviction starts ({evict * 60:.0f} s)")  # fmt: skip
        if main.get("tombstoning_start_s") is not None:
            t_tomb = float(main["tombstoning_start_s"])
            ax.axvline(t_tomb / 60, color="tab:brown", ls=":", lw=1.2,
                       label=f"tombstoning starts ({t_tomb:.0f} s)")  # fmt: skip
        if kill:
            ax.axvline(kill[0], color="tab:red", ls=":", lw=1.2, label="kill -9, restart")
    ax_rss.legend(loc="upper left", fontsize=8, ncol=2)
    ax_done.legend(loc="upper left", fontsize=8)
    rec = main["recovery"]
    fig.text(
        0.5, 0.01,
        f"{main['label']} run: {main['sagas_finished']:,} sagas, {main['sagas_per_s']}/s. "
        f"After kill -9 ({rec['down_s']:.0f} s down): restart → first event "
        f"{rec['restart_to_first_event_s']:.2f} s, → backlog of {rec['backlog_sagas']} cleared "
        f"{rec['restart_to_backlog_cleared_s']:.2f} s ({rec['sagas_recovered']:,} sagas "
        "recovered)",
        ha="center", va="bottom", fontsize=8.5,
    )  # fmt: skip
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def summary(results: dict[str, Any]) -> Iterator[str]:
    """The figures, one line each, for the terminal."""
    for label, run in results["runs"].items():
        rec, rss = run["recovery"], run["rss_mb"]
        yield (
            f"{label}: {run['minutes']:g} min, {run['sagas_finished']} sagas "
            f"({run['sagas_per_s']}/s, p50 {run['latency_p50_ms']} ms), retention "
            f"{run['retention']}, eviction from {run['eviction_start_s']} s; RSS MB at eviction "
            f"start {rss.get('at_eviction_start')}, end {rss['end']}, max {rss['max']} "
            f"(flat: {run['rss_flat']}); snapshots at kill {run['snapshots_at_kill']}; "
            f"recovered {rec['sagas_recovered']} sagas in {rec['rebuild_s_total']} s, restart to "
            f"first event {rec['restart_to_first_event_s']} s, to backlog of "
            f"{rec['backlog_sagas']} cleared {rec['restart_to_backlog_cleared_s']} s"
        )
    yield f"targets: {json.dumps(results['targets'])}"


def replot(args: argparse.Namespace) -> None:
    """Recomputes the RSS figures and targets from the samples in ``--out``; redraws the plot."""
    results = json.loads(args.out.read_text())
    o = results["options"]
    for run in results["runs"].values():
        rss, run["rss_flat"] = rss_figures(
            run["samples"], run["eviction_start_s"], o["evict_after"], o["tombstone_after"]
        )
        run["rss_mb"] = {**rss, "after_restart": run["rss_mb"].get("after_restart")}
        run["tombstoning_start_s"] = _first(
            [r for r in run["samples"] if r["phase"] == "soak"], "tombstoned"
        )
    results["targets"] = targets(results["runs"])
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.plot)
    for line in summary(results):
        print(line)


def main(argv: list[str] | None = None) -> None:
    """Parses the arguments, runs the short and the long soak, writes the figures and plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="the long run")
    parser.add_argument("--short-minutes", type=float, default=2.0, help="0: no short run")
    parser.add_argument("--window", type=int, default=200, help="sagas in flight")
    parser.add_argument("--evict-after", type=float, default=30.0)
    parser.add_argument("--tombstone-after", default="60", help="seconds, or none")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--sample-every", type=float, default=3.0, help="seconds")
    parser.add_argument("--backlog", type=int, default=None, help="starts sent while down "
                        "(default: --window)")  # fmt: skip
    parser.add_argument(
        "--down", type=float, default=12.0,
        help="seconds between the kill and the restart (default 12: past the 10 s session "
        "timeout, so the restart does not wait for the dead member to expire)",
    )  # fmt: skip
    parser.add_argument("--segment-ms", type=int, default=20_000)
    parser.add_argument("--delete-retention-ms", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "soak.png")
    parser.add_argument("--keep", action="store_true", help="keep the logs and broker data")
    parser.add_argument(
        "--replot", action="store_true",
        help="run nothing: recompute the RSS figures and targets from the samples in --out, "
        "rewrite it and redraw --plot",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.replot:
        replot(args)
        return
    # aiokafka logs what it retries (NotLeaderForPartition while a new topic's leaders settle,
    # at ERROR level); a real failure of the driver's clients raises. The engine processes log
    # theirs in their own files.
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    if args.backlog is None:
        args.backlog = args.window
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "options": {
            "minutes": args.minutes,
            "short_minutes": args.short_minutes,
            "window": args.window,
            "evict_after": args.evict_after,
            "tombstone_after": args.tombstone_after,
            "partitions": args.partitions,
            "sample_every": args.sample_every,
            "backlog": args.backlog,
            "down": args.down,
            "snapshot_topic": snapshot_topic_config(args),
        },
        "runs": {},
    }
    plan = [("short", args.short_minutes)] if args.short_minutes > 0 else []
    plan.append(("long", args.minutes))
    for label, minutes in plan:
        print(f"soak {label}: {minutes:g} min...", file=sys.stderr, flush=True)
        results["runs"][label] = one_run(args, minutes, label)
    results["targets"] = targets(results["runs"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.plot)
    for line in summary(results):
        print(line, flush=True)


if __name__ == "__main__":
    main()
