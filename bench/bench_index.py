"""The saga index: list/search latency on 100,000 indexed sagas, and catch-up from a real log.

Run: ``python -m bench.bench_index [--bootstrap HOST:PORT] [--sagas 100000] [--log-sagas 2000]
[--repeat 200]``. Without ``--bootstrap`` it starts a throwaway broker with `deploy`.

Two parts, in one run:

1. **Queries.** ``--sagas`` states (5 steps, an input of customer, region and total, statuses
   mixed as a production day would have them, updates spread over a week) are written to a
   fresh SQLite index through the adapter's own `write` (the rate is reported), then each
   query the CLI and the console make is timed ``--repeat`` times with varied parameters:
   p50 and p99 in milliseconds. Every query counts its total too, as a page does.
2. **Catch-up.** ``--log-sagas`` real sagas run on the broker (a coordinator and four
   services in this process), then the index is rebuilt from the topics (`rebuild_index`):
   sagas/s and records/s of the catch-up; and the live lag seen while the sagas ran, as
   the time from a saga's completion to the projector indexing it. Two live projectors run
   side by side on the same sagas, into two indexes: the projector as it is (one tail per
   topic, kept open) and, as the baseline, the same projector over `PerPassTransport`, which
   reads the way the projector did before tails: a consumer per partition per pass
   (`Transport.read`), a pass every ``interval``.

Writes bench/results/index.json and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from saga import Coordinator, Participant, SagaDefinition, SagaStatus, Step, StepContext
from saga.adapters.kafka import KafkaTransport
from saga.core.state import SagaState, StepState, StepStatus
from saga.index import (
    Change,
    Projector,
    SagaQuery,
    SagaRow,
    SqliteSagaIndex,
    rebuild_index,
    run_projector,
)
from saga.index.projector import DEFAULT_INTERVAL
from saga.runtime.ports import Record, Transport

RESULTS = Path(__file__).resolve().parent / "results" / "index.json"
STEPS = ("payment", "restaurant", "rider", "cook", "notify")
CUSTOMERS = 1000
REGIONS = ("north", "south", "east", "west", "centre", "harbour", "hill", "old", "new", "park")
WEEK = 7 * 24 * 3600.0
NOW = 1_780_000_000.0

STATUS_MIX = (
    (SagaStatus.COMPLETED, 0.80),
    (SagaStatus.COMPENSATED, 0.10),
    (SagaStatus.RUNNING, 0.05),
    (SagaStatus.STUCK, 0.03),
    (SagaStatus.COMPENSATING, 0.02),
)

_STEPS_FOR = {
    SagaStatus.COMPLETED: [StepStatus.SUCCEEDED] * 5,
    SagaStatus.COMPENSATED: [StepStatus.COMPENSATED, StepStatus.FAILED] + [StepStatus.PENDING] * 3,
    SagaStatus.RUNNING: [StepStatus.SUCCEEDED, StepStatus.RUNNING] + [StepStatus.PENDING] * 3,
    SagaStatus.STUCK: [StepStatus.SUCCEEDED, StepStatus.STUCK] + [StepStatus.PENDING] * 3,
    SagaStatus.COMPENSATING: [StepStatus.COMPENSATING, StepStatus.FAILED]
    + [StepStatus.PENDING] * 3,
}


def synthetic(i: int, rng: random.Random) -> SagaState:
    """One saga state as the coordinator would have written it."""
    status = rng.choices([s for s, _ in STATUS_MIX], [w for _, w in STATUS_MIX])[0]
    started = NOW - rng.random() * WEEK
    steps = {
        n: StepState(status=s, attempt=1 if s is not StepStatus.PENDING else 0)
        for n, s in zip(STEPS, _STEPS_FOR[status], strict=True)
    }
    return SagaState(
        saga_id=f"order-{i:07d}-{rng.getrandbits(32):08x}",
        name=rng.choice(("order", "order", "order", "catering")),
        version=rng.choice((1, 2, 2, 3)),
        status=status,
        input={
            "customer": f"c-{rng.randrange(CUSTOMERS)}",
            "region": rng.choice(REGIONS),
            "total": round(rng.uniform(5, 120), 2),
            "items": [{"dish": "pasta", "qty": rng.randint(1, 3)}],
        },
        steps=steps,
        seq=rng.randint(6, 14),
        started_at=started,
        updated_at=started + rng.uniform(0.5, 30),
    )


def fill(index: SqliteSagaIndex, count: int, seed: int = 7) -> tuple[list[str], float]:
    """Writes ``count`` synthetic sagas in batches of 2,000; returns their ids and rows/s."""
    rng = random.Random(seed)
    ids: list[str] = []
    seconds = 0.0
    for start in range(0, count, 2000):
        states = [synthetic(i, rng) for i in range(start, min(count, start + 2000))]
        rows = {s.saga_id: SagaRow(s, i % 6, i) for i, s in enumerate(states, start)}
        ids += rows
        t0 = time.perf_counter()
        index.write(Change(rows=rows, at=NOW))
        seconds += time.perf_counter() - t0
    index.analyze()
    return ids, count / seconds


def timed(run: Callable[[int], Any], repeat: int) -> dict[str, float]:
    """p50 and p99 (ms) of ``run(i)`` over ``repeat`` calls."""
    run(0)  # warm: the statement cache and the pages read first
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        run(i)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {
        "p50_ms": round(statistics.median(times), 3),
        "p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))], 3),
        "max_ms": round(times[-1], 3),
    }


def queries(path: Path, ids: list[str], repeat: int) -> dict[str, dict[str, Any]]:
    """Times each query through a read-only connection, as another process would read."""
    index = SqliteSagaIndex(path, readonly=True)
    rng = random.Random(11)
    cursors: list[str] = []
    page = index.query(SagaQuery(limit=50))
    while page.next_cursor is not None and len(cursors) < 100:
        cursors.append(page.next_cursor)
        page = index.query(SagaQuery(limit=50, cursor=page.next_cursor))

    def q(**kw: Any) -> Callable[[int], Any]:
        return lambda i: index.query(SagaQuery(**kw))

    cases: dict[str, Callable[[int], Any]] = {
        "list: first page (50), no filter": q(limit=50),
        "list: page by cursor (pages 2-101)": lambda i: index.query(
            SagaQuery(limit=50, cursor=cursors[i % len(cursors)])
        ),
        "list: status=stuck": q(status=["stuck"]),
        "list: name=order, status=running": q(name="order", status=["running"]),
        "list: name=catering, version=3": q(name="catering", version=3),
        "search: input customer=c-N": lambda i: index.query(
            SagaQuery(input={"customer": f"c-{rng.randrange(CUSTOMERS)}"})
        ),
        "search: input customer + region": lambda i: index.query(
            SagaQuery(input={"customer": f"c-{rng.randrange(CUSTOMERS)}", "region": "north"})
        ),
        "search: input region + status=compensated": lambda i: index.query(
            SagaQuery(input={"region": rng.choice(REGIONS)}, status=["compensated"])
        ),
        "search: step rider=stuck": q(step="rider", step_status="stuck"),
        "search: started in a 1 h window": lambda i: index.query(
            SagaQuery(started_after=(t := NOW - rng.random() * WEEK), started_before=t + 3600)
        ),
        "search: saga id prefix": lambda i: index.query(
            SagaQuery(saga_id_prefix=f"order-{rng.randrange(len(ids) // 100):05d}")
        ),
        "get: one saga by id": lambda i: index.get(ids[rng.randrange(len(ids))]),
        "counts by status": lambda i: index.counts(),
    }
    found = {}
    for name, run in cases.items():
        result = run(0)
        found[name] = {
            **timed(run, repeat),
            "matched": result.total if hasattr(result, "total") else None,
        }
    index.close()
    return found


BENCH = SagaDefinition(
    name="bench",
    steps=[
        Step(name="a", service="s1", action="do", compensation="undo"),
        Step(name="b", service="s2", action="do", compensation="undo", depends_on=["a"]),
        Step(name="c", service="s3", action="do", compensation="undo", depends_on=["a"]),
        Step(name="d", service="s4", action="do", kind="pivot", depends_on=["b", "c"]),
    ],
)


def services() -> list[Participant]:
    found = []
    for service in ("s1", "s2", "s3", "s4"):
        p = Participant(service)

        @p.handler("do")
        async def do(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
            return {"ok": ctx.step}

        @p.handler("undo")
        async def undo(payload: dict[str, Any], ctx: StepContext) -> None:
            return None

        found.append(p)
    return found


class PerPassTransport:
    """The baseline: a transport whose tails read the way the projector did before it kept
    tails open. Each poll is a pass: after ``interval`` (the projector's pause between passes),
    every partition is read from the tail's position to its end with `Transport.read`, which
    opens a consumer per partition, all at once; its end offsets are where the last pass ended
    (what the projector knew of the ends then)."""

    def __init__(self, inner: Transport, interval: float = DEFAULT_INTERVAL) -> None:
        self.inner = inner
        self.interval = interval
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @asynccontextmanager
    async def tail(self, topic: str, starts: Mapping[int, int]) -> AsyncIterator[_PerPassTail]:
        yield _PerPassTail(self, topic, starts)


class _PerPassTail:
    def __init__(self, owner: PerPassTransport, topic: str, starts: Mapping[int, int]) -> None:
        self.owner = owner
        self.topic = topic
        self.next = dict(starts)
        self.first = True

    async def poll(self, timeout: float, max_records: int = 500) -> list[Record]:
        if not self.first:
            await anyio.sleep(self.owner.interval)
        self.first = False
        found: dict[int, list[Record]] = {}

        async def read(p: int) -> None:
            self.owner.reads += 1
            found[p] = [r async for r in self.owner.inner.read(self.topic, p, self.next[p])]

        async with anyio.create_task_group() as tg:
            for p in self.next:
                tg.start_soon(read, p)
        for p, records in found.items():
            if records:
                self.next[p] = records[-1].offset + 1
        return [r for p in sorted(found) for r in found[p]]

    async def end_offsets(self) -> dict[int, int]:
        return dict(self.next)

    async def positions(self) -> dict[int, int]:
        return dict(self.next)


def _percentiles(lags: list[float]) -> tuple[float, float]:
    lags = sorted(lags)
    p99 = lags[min(len(lags) - 1, int(0.99 * len(lags)))]
    return round(statistics.median(lags) * 1000, 1), round(p99 * 1000, 1)


async def catch_up(bootstrap: str, sagas: int, window: int, workdir: Path) -> dict[str, Any]:
    """Runs ``sagas`` real sagas with two live projectors (tails, and the per-pass baseline),
    then rebuilds the index from Kafka."""
    prefix = f"bench-index-{uuid.uuid4().hex[:8]}"
    transport = KafkaTransport(bootstrap)
    baseline = PerPassTransport(transport)
    live = SqliteSagaIndex(workdir / "live.sqlite3", prefix=prefix)
    per_pass = SqliteSagaIndex(workdir / "per-pass.sqlite3", prefix=prefix)
    lags: dict[str, list[float]] = {"tails": [], "per_pass": []}
    async with (
        Coordinator([BENCH], transport=transport, prefix=prefix) as coordinator,
        anyio.create_task_group() as tg,
    ):
        for p in services():
            await tg.start(functools.partial(p.run, transport, prefix=prefix))
        warm = await coordinator.start("bench", {"customer": "warm"})
        await coordinator.wait(warm, 60)
        projector: Projector = await tg.start(run_projector, transport, prefix, live)
        before: Projector = await tg.start(run_projector, baseline, prefix, per_pass)
        passes_before = (projector.stats.passes, before.stats.passes)
        limiter = anyio.Semaphore(window)

        async def indexed(
            saga_id: str, done: float, p: Projector, index: SqliteSagaIndex, into: list[float]
        ) -> None:
            with anyio.fail_after(60):
                while (row := index.get(saga_id)) is None or not row.state.is_final:
                    await p.changed(p.generation, timeout=1)
            into.append(time.perf_counter() - done)

        async def one(i: int) -> None:
            async with limiter:
                saga_id = await coordinator.start("bench", {"customer": f"c-{i % 100}"})
                state = await coordinator.wait(saga_id, 120)
                assert state.status is SagaStatus.COMPLETED
            done = time.perf_counter()
            async with anyio.create_task_group() as both:
                both.start_soon(indexed, saga_id, done, projector, live, lags["tails"])
                both.start_soon(indexed, saga_id, done, before, per_pass, lags["per_pass"])

        t0 = time.perf_counter()
        async with anyio.create_task_group() as runs:
            for i in range(sagas):
                runs.start_soon(one, i)
        produced = time.perf_counter() - t0
        tails_opened = projector.stats.tails
        passes = (
            projector.stats.passes - passes_before[0],
            before.stats.passes - passes_before[1],
        )
        tg.cancel_scope.cancel()
    live.close()
    per_pass.close()
    index = SqliteSagaIndex(workdir / "rebuilt.sqlite3", prefix=prefix)
    stats = await rebuild_index(transport, index)
    info = index.info()
    # A pass that finds nothing new, with the tails open (what `run` makes every interval),
    # and one that opens its tails first (a lone `catch_up`, as `saga index serve` starts).
    idle = Projector(transport, index)
    alone = []
    for _ in range(3):
        t0 = time.perf_counter()
        await idle.catch_up()
        alone.append(time.perf_counter() - t0)
    following = []
    async with idle:
        for _ in range(10):
            t0 = time.perf_counter()
            await idle.catch_up()
            following.append(time.perf_counter() - t0)
    index.close()
    p50, p99 = _percentiles(lags["tails"])
    base50, base99 = _percentiles(lags["per_pass"])
    return {
        "sagas": stats.sagas,
        "log_and_snapshot_records": stats.records,
        "events": info.events,
        "bad_records": info.bad,
        "seconds": round(stats.seconds, 3),
        "sagas_per_s": round(stats.sagas_per_second, 1),
        "records_per_s": round(stats.records_per_second, 1),
        "producing_sagas_per_s": round(sagas / produced, 1),
        "live_lag_p50_ms": p50,
        "live_lag_p99_ms": p99,
        "per_pass_live_lag_p50_ms": base50,
        "per_pass_live_lag_p99_ms": base99,
        "live_tails_opened": tails_opened,
        "live_passes": passes[0],
        "per_pass_passes": passes[1],
        "per_pass_partition_reads": baseline.reads,
        "idle_pass_ms": round(statistics.median(following) * 1000, 1),
        "idle_pass_opening_tails_ms": round(statistics.median(alone) * 1000, 1),
    }


def main() -> None:
    """Parses arguments, runs both parts, writes bench/results/index.json, prints a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap")
    parser.add_argument("--sagas", type=int, default=100_000, help="sagas indexed for queries")
    parser.add_argument("--log-sagas", type=int, default=2000, help="real sagas for catch-up")
    parser.add_argument("--window", type=int, default=50, help="real sagas in flight")
    parser.add_argument("--repeat", type=int, default=200, help="timings per query")
    args = parser.parse_args()
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        path = workdir / "queries.sqlite3"
        with SqliteSagaIndex(path, prefix="bench") as index:
            ids, write_rate = fill(index, args.sagas)
        size_mb = sum(p.stat().st_size for p in workdir.glob("queries.sqlite3*")) / 2**20
        timings = queries(path, ids, args.repeat)
        bootstrap = args.bootstrap
        if bootstrap is None:
            from deploy.kafka import start_kafka

            bootstrap = stack.enter_context(start_kafka()).bootstrap_servers
        log = anyio.run(catch_up, bootstrap, args.log_sagas, args.window, workdir)
    result = {
        "indexed_sagas": args.sagas,
        "repeat": args.repeat,
        "index_write_rows_per_s": round(write_rate, 1),
        "index_file_mb": round(size_mb, 1),
        "queries": timings,
        "catch_up": log,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saga index: {args.sagas:,} sagas ({size_mb:.0f} MB), {args.repeat} timings each")
    print(f"{'query':<44} {'p50 ms':>8} {'p99 ms':>8} {'matched':>8}")
    for name, t in timings.items():
        matched = "" if t["matched"] is None else f"{t['matched']:,}"
        print(f"{name:<44} {t['p50_ms']:>8.2f} {t['p99_ms']:>8.2f} {matched:>8}")
    print(f"writes: {write_rate:,.0f} rows/s (batches of 2,000, one transaction each)")
    print(
        f"catch-up from a real log: {log['sagas']:,} sagas, {log['log_and_snapshot_records']:,} "
        f"records in {log['seconds']:.2f} s = {log['sagas_per_s']:,.0f} sagas/s, "
        f"{log['records_per_s']:,.0f} records/s"
    )
    print(
        f"live lag (completion -> indexed) while {log['producing_sagas_per_s']:.0f} sagas/s ran: "
        f"p50 {log['live_lag_p50_ms']:.0f} ms, p99 {log['live_lag_p99_ms']:.0f} ms with "
        f"{log['live_tails_opened']} tails kept open ({log['live_passes']} passes); "
        f"per-pass reads beside it: p50 {log['per_pass_live_lag_p50_ms']:.0f} ms, "
        f"p99 {log['per_pass_live_lag_p99_ms']:.0f} ms ({log['per_pass_partition_reads']:,} "
        "partition reads)"
    )
    print(
        f"a pass that finds nothing new: {log['idle_pass_ms']:.1f} ms with the tails open, "
        f"{log['idle_pass_opening_tails_ms']:.0f} ms opening them"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
