"""The load generator: starts sagas with a bounded number in flight (closed loop) or at a rate
(open loop), and measures start → completed latency by tailing a topic.

It runs in the benchmark's driver process, apart from the engine's processes. A saga's latency
is from just before its start request is handed to the producer to the moment this process
polls the record that says it ended: for the engine, the ``saga_completed`` event in the log
topic (read_committed, so only once the coordinator's transaction committed it); for the raw
reference, its ``done`` record. Tailing costs the coordinator nothing (one more reader of the
log); it costs this process the decoding of every log record (8 per saga for the 3-step saga),
which competes for the same two cores and is the harness's main bias at high rates: the JSON of
a record is only parsed when the bytes contain ``"saga_`` (the saga-level event types), and a
non-JSON value (another codec) falls back to the core's codec.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.perf.raw import CLIENT_TUNING, RawTopics
from saga.runtime.signing import SigningKey

__all__ = [
    "EngineLoad",
    "Load",
    "RawLoad",
    "Tracker",
    "quantile",
    "summary",
]

FINAL_TYPES = {
    "saga_completed": "completed",
    "saga_compensated": "compensated",
    "saga_stuck": "stuck",
    "saga_rejected": "rejected",
}
TAIL_FETCH_WAIT_MS = 10
"""The tail's fetch wait: its share of the measured latency when a fetch is idle."""


def quantile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of ``values``, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


@dataclass
class Tracker:
    """What the load generator knows: sagas in flight, ends seen, events seen."""

    in_flight: dict[str, float] = field(default_factory=dict)
    """saga id -> monotonic time its start was sent."""
    ends: Counter[str] = field(default_factory=Counter)
    """saga id -> final events seen for it (2 or more: a duplicate)."""
    outcome: dict[str, str] = field(default_factory=dict)
    """saga id -> completed, compensated, stuck or rejected (the first seen)."""
    done: list[tuple[float, float, str]] = field(default_factory=list)
    """(end time, latency, outcome) of each saga that ended while tracked."""
    end_at: dict[str, float] = field(default_factory=dict)
    """saga id -> monotonic time its first final event was polled."""
    events: int = 0
    last_event_at: float = 0.0
    """Monotonic time of the latest record polled."""
    slots: anyio.Semaphore | None = None
    new_after: dict[int, int] | None = None
    """partition -> offset: a committed record at or past it is new (see `first_new_at`)."""
    first_new_at: float | None = None
    """Monotonic time the first record past `new_after` was polled."""

    def seen(self, partition: int, offset: int, now: float) -> None:
        """Notes a record's position, for `first_new_at`."""
        if (
            self.first_new_at is None
            and self.new_after is not None
            and offset >= self.new_after.get(partition, 0)
        ):
            self.first_new_at = now

    def ended(self, saga_id: str, kind: str, now: float) -> None:
        """Takes in one saga's end."""
        self.ends[saga_id] += 1
        if self.ends[saga_id] > 1:
            return
        self.outcome[saga_id] = kind
        self.end_at[saga_id] = now
        started = self.in_flight.pop(saga_id, None)
        if started is not None:
            self.done.append((now, now - started, kind))
            if self.slots is not None:
                self.slots.release()


class Load:
    """A workload the generator drives: how to start one saga and how to tail its ends."""

    tail_topic: str
    partitions: int

    async def open(self) -> None:
        """Connects what `start` needs."""

    async def close(self) -> None:
        """Closes it."""

    async def start(self, saga_id: str, i: int) -> None:
        """Sends one start request."""
        raise NotImplementedError

    def new_id(self, i: int) -> str:
        """The id of the ``i``-th saga."""
        raise NotImplementedError

    def final(self, key: bytes | None, value: bytes | None) -> tuple[str, str] | None:
        """(saga id, outcome) when the record says a saga ended, else None."""
        raise NotImplementedError


class EngineLoad(Load):
    """The engine's 3-step saga, started with `saga.SagaClient.start`, ends from the log."""

    def __init__(
        self,
        bootstrap: str,
        prefix: str,
        *,
        partitions: int = 6,
        name: str = "perf",
        signer: SigningKey | None = None,
    ) -> None:
        from saga.runtime.ports import Topics

        self.bootstrap = bootstrap
        self.prefix = prefix
        self.name = name
        self.signer = signer
        self.partitions = partitions
        self.tail_topic = Topics(prefix).log
        self._client: Any = None
        self._run = time.time_ns()

    async def open(self) -> None:
        """Opens the client (one idempotent producer, kept open)."""
        from saga import SagaClient
        from saga.adapters.kafka import KafkaTransport

        self._client = SagaClient(
            KafkaTransport(self.bootstrap),
            prefix=self.prefix,
            partitions=self.partitions,
            signer=self.signer,
        )

    async def close(self) -> None:
        """Closes the client."""
        if self._client is not None:
            await self._client.aclose()

    def new_id(self, i: int) -> str:
        """A fresh random id (the client's own scheme)."""
        from saga.runtime.client import new_saga_id

        return new_saga_id()

    async def start(self, saga_id: str, i: int) -> None:
        """`SagaClient.start` of the benchmark saga."""
        await self._client.start(self.name, {"i": i}, saga_id)

    def final(self, key: bytes | None, value: bytes | None) -> tuple[str, str] | None:
        """A saga-level final event of the log."""
        if key is None or value is None:
            return None
        if value[:1] == b"{":
            if b'"saga_' not in value:
                return None
            kind = orjson.loads(value).get("type")
        else:
            kind = _decoded_type(value)
        outcome = FINAL_TYPES.get(str(kind))
        return None if outcome is None else (key.decode(), outcome)


def _decoded_type(value: bytes) -> str | None:
    from saga.core.codec import ENGINE_LIMITS, decode
    from saga.core.messages import event_adapter
    from saga.errors import DecodeError

    try:
        return str(decode(event_adapter, value, ENGINE_LIMITS).type)
    except DecodeError:
        return None


class RawLoad(Load):
    """The raw reference: a request record per saga, ends from the ``done`` topic."""

    def __init__(self, bootstrap: str, prefix: str, *, partitions: int = 6) -> None:
        self.bootstrap = bootstrap
        self.topics = RawTopics(prefix)
        self.partitions = partitions
        self.tail_topic = self.topics.done
        self._producer: AIOKafkaProducer | None = None

    async def open(self) -> None:
        """Starts an idempotent producer (acks=all), as the engine's client has."""
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            enable_idempotence=True,
            acks="all",
            linger_ms=2,
            **CLIENT_TUNING,
        )
        await self._producer.start()

    async def close(self) -> None:
        """Stops the producer."""
        if self._producer is not None:
            await self._producer.stop()

    def new_id(self, i: int) -> str:
        """A unique id in this run."""
        return f"r{time.time_ns():x}-{i}"

    async def start(self, saga_id: str, i: int) -> None:
        """Sends the request to partition ``i mod partitions`` and waits for its ack."""
        assert self._producer is not None
        future = await self._producer.send(
            self.topics.requests, b"0", key=saga_id.encode(), partition=i % self.partitions
        )
        await future

    def final(self, key: bytes | None, value: bytes | None) -> tuple[str, str] | None:
        """Every record of the done topic."""
        return None if key is None else (key.decode(), "completed")


async def tail(bootstrap: str, load: Load, tracker: Tracker, ready: anyio.Event) -> None:
    """Follows ``load.tail_topic`` from its current end (committed records only) until
    cancelled; sets ``ready`` once positioned."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        fetch_max_wait_ms=TAIL_FETCH_WAIT_MS,
        max_partition_fetch_bytes=4 * 1048576,
        **CLIENT_TUNING,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(load.tail_topic, p) for p in range(load.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)  # resolves the end now, not at the first fetch
        ready.set()
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            now = time.monotonic()
            for tp, msgs in batch.items():
                tracker.events += len(msgs)
                if msgs:
                    tracker.last_event_at = now
                    tracker.seen(tp.partition, msgs[-1].offset, now)
                for m in msgs:
                    found = load.final(m.key, m.value)
                    if found is not None:
                        tracker.ended(found[0], found[1], now)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await consumer.stop()


def summary(
    tracker: Tracker, t0: float, t1: float, *, started: int, unfinished: int
) -> dict[str, Any]:
    """The figures of the window [t0, t1): completions per second, latency quantiles of the
    sagas that ended in it, and the errors: other outcomes, and ``unfinished`` (not ended
    when the drain after the level gave up)."""
    inside = [(lat, kind) for at, lat, kind in tracker.done if t0 <= at < t1]
    completed = [lat for lat, kind in inside if kind == "completed"]
    errors = sum(1 for _, _, kind in tracker.done if kind != "completed") + unfinished
    seconds = t1 - t0
    return {
        "seconds": round(seconds, 2),
        "started": started,
        "completed": len(completed),
        "errors": errors,
        "unfinished": unfinished,
        "duplicates": sum(1 for n in tracker.ends.values() if n > 1),
        "sagas_per_s": round(len(completed) / seconds, 1) if seconds > 0 else None,
        "p50_ms": _ms(quantile(completed, 0.5)),
        "p90_ms": _ms(quantile(completed, 0.9)),
        "p99_ms": _ms(quantile(completed, 0.99)),
        "max_ms": _ms(max(completed, default=None)),
    }


Check = Callable[[], None]


async def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, check: Check | None = None
) -> float:
    """Waits until ``condition()``; returns the monotonic time it held.

    Raises:
        TimeoutError: Not within ``timeout`` seconds.
    """
    with anyio.move_on_after(timeout):
        while not condition():
            if check is not None:
                check()
            await anyio.sleep(0.01)
        return time.monotonic()
    raise TimeoutError(f"not within {timeout:.0f}s: {what}")


class Generator:
    """Drives one `Load` with its tail running; use as an async context manager.

    Args:
        bootstrap: The broker.
        load: The workload.
        check: Called while waiting (raises if a process of the system under test died).
    """

    def __init__(self, bootstrap: str, load: Load, check: Check | None = None) -> None:
        self.bootstrap = bootstrap
        self.load = load
        self.check = check
        self.tracker = Tracker()
        self.start_times: dict[str, float] = {}
        """Every saga started (in order) -> monotonic time its start was sent."""
        self._count = 0
        self._tg: Any = None

    async def __aenter__(self) -> Generator:
        await self.load.open()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        ready = anyio.Event()
        self._tg.start_soon(tail, self.bootstrap, self.load, self.tracker, ready)
        await ready.wait()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        await self.load.close()

    async def start_one(self) -> str:
        """Starts one saga and tracks it; returns its id."""
        i = self._count
        self._count += 1
        saga_id = self.load.new_id(i)
        self.tracker.in_flight[saga_id] = self.start_times[saga_id] = time.monotonic()
        await self.load.start(saga_id, i)
        return saga_id

    def _ended(self, saga_id: str) -> bool:
        return saga_id not in self.tracker.in_flight

    async def warm_up(self, timeout: float = 120.0, count: int = 3) -> float:
        """Sends sagas one at a time until ``count`` completed in a row; returns the seconds
        it took (group joins, producers, metadata: not what is measured)."""
        t0 = time.monotonic()
        ok = 0
        with anyio.fail_after(timeout):
            while ok < count:
                saga_id = await self.start_one()
                ended = functools.partial(self._ended, saga_id)
                await wait_until(ended, timeout, "warm-up", self.check)
                ok = ok + 1 if self.tracker.outcome.get(saga_id) == "completed" else 0
        self.tracker.done.clear()
        return time.monotonic() - t0

    async def drain(self, timeout: float) -> int:
        """Waits for the sagas in flight to end; returns how many did not."""
        with anyio.move_on_after(timeout):
            while self.tracker.in_flight:
                if self.check is not None:
                    self.check()
                await anyio.sleep(0.02)
        return len(self.tracker.in_flight)

    async def closed_loop(
        self,
        in_flight: int,
        seconds: float,
        *,
        settle: float = 1.0,
        max_settle: float = 30.0,
        drain: float = 120.0,
    ) -> dict[str, Any]:
        """Keeps ``in_flight`` sagas running, then drains; returns the figures of the measured
        window: ``seconds``, or three times the median latency of the settling phase when that
        is longer (at most ``4 * seconds``).

        The window opens once the pipeline has turned over: at least ``settle`` seconds and
        ``in_flight`` completions after the level began (at most ``max_settle`` seconds).
        Without that a window shorter than the latency at a level beyond saturation would see
        only the first wave, or nothing at all.
        """
        tracker = self.tracker
        tracker.done.clear()
        tracker.slots = slots = anyio.Semaphore(in_flight)
        started = 0
        t_start = time.monotonic()
        t0: float | None = None
        t1 = float("inf")
        cpu0 = time.process_time()
        async with anyio.create_task_group() as tg:
            while (now := time.monotonic()) < t1:
                if t0 is None:
                    turned = len(tracker.done) >= in_flight and now - t_start >= settle
                    if turned or now - t_start >= max_settle:
                        # At least 3 latencies long, so that a system that completes its
                        # sagas in waves is not counted as 0 or 1 wave by chance.
                        latency = quantile([lat for _, lat, _ in tracker.done], 0.5) or 0.0
                        window = min(max(seconds, 3 * latency), 4 * seconds)
                        t0, t1 = now, now + window
                        continue
                with anyio.move_on_after(min(t1 - now, 0.05)):
                    await slots.acquire()
                    tg.start_soon(self.start_one)
                    started += 1
        t_end = time.monotonic()
        cpu = time.process_time() - cpu0
        unfinished = await self.drain(drain)
        tracker.slots = None
        assert t0 is not None
        out = summary(tracker, t0, min(t1, t_end), started=started, unfinished=unfinished)
        out["in_flight"] = in_flight
        out["settle_s"] = round(t0 - t_start, 2)
        out["loadgen_cpu_share"] = round(cpu / (t_end - t_start), 3)
        tracker.in_flight.clear()
        return out

    async def open_loop(
        self,
        rate: float,
        seconds: float,
        *,
        at: Callable[[float], Coroutine[Any, Any, None]] | None = None,
    ) -> int:
        """Starts sagas at ``rate`` per second for ``seconds`` (in ticks of 10 ms, each start
        its own task, so a slow send does not slow the offered rate); ``at(elapsed)`` is
        awaited in its own task at the start. Returns how many were started."""
        started = 0
        t0 = time.monotonic()
        async with anyio.create_task_group() as tg:
            if at is not None:
                tg.start_soon(at, 0.0)
            while (elapsed := time.monotonic() - t0) < seconds:
                due = int(elapsed * rate) + 1
                while started < due:
                    tg.start_soon(self.start_one)
                    started += 1
                await anyio.sleep(0.01)
        return started


async def run_closed(
    bootstrap: str,
    load: Load,
    levels: list[int],
    seconds: float,
    check: Check | None = None,
) -> dict[str, Any]:
    """Warms up, then runs each in-flight level in turn on the same processes."""
    async with Generator(bootstrap, load, check) as gen:
        warm = await gen.warm_up()
        out: dict[str, Any] = {"warm_up_s": round(warm, 2), "levels": {}}
        for level in levels:
            out["levels"][str(level)] = await gen.closed_loop(level, seconds)
        return out
