"""B4: the coordinator killed with ``kill -9`` under load, restarted at once as a supervisor
would; time to the first new event and to the backlog cleared; nothing lost or duplicated.

Method. The engine's processes run the 3-step saga; the load generator offers sagas open-loop
at half of B1's sustainable throughput (measured earlier in the run; standalone, estimated
first with a short closed loop at 200 in flight on the same processes). After ``before``
seconds the coordinator's process group gets SIGKILL; as soon as it is gone the log topic's end
offsets are read (they include the records of the transaction the kill left open, which the
restarted coordinator's producer aborts) and the process is started again. Offering goes on
for ``after`` seconds, then the generator waits until every saga started has ended.

Figures (all from the kill):

- ``first_event_s``: the first committed log record past those end offsets is polled: the
  restarted coordinator's first decision.
- ``backlog_cleared_s``: every saga started before that first event has completed (those are
  the sagas the outage held up: the ones in flight at the kill and those started while down).
- ``in_flight_at_kill`` and ``backlog``: how many those were.

Checks, over every saga started during B4 (warm-up excluded):

- lost: started, never completed (within the drain timeout);
- duplicated: more than one final event (``saga_completed`` etc.) in the log;
- not completed: ended otherwise (compensated, stuck);
- step runs: the participants (never restarted) count handler calls per (saga id, step) in
  memory and write them when stopped; each of the three steps of every started saga must have
  run exactly once. A command redelivered after the restart and answered from the
  participant's reply store is not a run: that is the engine's de-duplication working.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.perf.app import SAGA
from bench.perf.common import Context, engine, engine_generator, new_prefix
from bench.perf.load import Generator, wait_until

__all__ = ["run"]


async def _end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


def run(ctx: Context, *, rate: float | None = None) -> dict[str, Any]:
    """Runs B4; returns its figures and checks."""
    before, after = (4.0, 8.0) if ctx.quick else (8.0, 20.0)
    prefix = new_prefix("b4")
    with engine(ctx, prefix) as procs:

        async def main() -> dict[str, Any]:
            async with engine_generator(ctx, procs) as gen:
                offered = rate
                estimated = None
                if offered is None:
                    estimated = (await gen.closed_loop(200, 4.0))["sagas_per_s"]
                    offered = max(20.0, float(estimated) / 2)
                gen.start_times.clear()
                return await _kill_and_recover(ctx, procs, gen, offered, before, after) | {
                    "estimated_sustainable": estimated
                }

        out = anyio.run(main)
        calls = procs.calls()
    started: list[str] = out.pop("started_ids")
    steps = [s.name for s in SAGA.steps]
    missing = dupes = 0
    for saga_id in started:
        for step in steps:
            n = calls.get(f"{saga_id} {step}", 0)
            missing += n == 0
            dupes += n > 1
    out["checks"] |= {"step_runs_missing": missing, "step_runs_duplicated": dupes}
    c = out["checks"]
    out["exactly_once"] = (
        c["lost"] == 0
        and c["duplicated"] == 0
        and c["not_completed"] == 0
        and missing == 0
        and dupes == 0
    )
    return out


async def _kill_and_recover(
    ctx: Context, procs: Any, gen: Generator, rate: float, before: float, after: float
) -> dict[str, Any]:
    tracker = gen.tracker
    marks: dict[str, float] = {}

    def check() -> None:
        procs.check_alive(except_for=procs.coordinator)

    gen.check = check

    async def kill_later(_: float) -> None:
        await anyio.sleep(before)
        marks["in_flight"] = len(tracker.in_flight)
        marks["kill"] = time.monotonic()
        procs.kill_coordinator()
        marks["killed"] = time.monotonic()
        tracker.new_after = await _end_offsets(ctx.bootstrap, gen.load.tail_topic, ctx.partitions)
        procs.restart_coordinator()
        marks["restarted"] = time.monotonic()

    started = await gen.open_loop(rate, before + after, at=kill_later)
    kill = marks["kill"]
    await wait_until(lambda: tracker.first_new_at is not None, 120, "a new event", check)
    first_at = tracker.first_new_at
    assert first_at is not None
    held_up = [s for s, at in gen.start_times.items() if at < first_at]
    unfinished = await gen.drain(180)
    cleared_at = max((tracker.end_at.get(s, first_at) for s in held_up), default=first_at)
    ids = list(gen.start_times)
    outcomes = [tracker.outcome.get(s) for s in ids]
    return {
        "offered_per_s": round(rate, 1),
        "started": started,
        "in_flight_at_kill": marks["in_flight"],
        "backlog": len(held_up),
        "kill_to_gone_s": round(marks["killed"] - kill, 3),
        "kill_to_restart_s": round(marks["restarted"] - kill, 3),
        "first_event_s": round(first_at - kill, 3),
        "backlog_cleared_s": round(cleared_at - kill, 3),
        "checks": {
            "lost": unfinished,
            "duplicated": sum(1 for s in ids if tracker.ends[s] > 1),
            "not_completed": sum(1 for o in outcomes if o is not None and o != "completed"),
        },
        "started_ids": ids,
    }
