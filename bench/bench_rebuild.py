"""B5 and B6 without a broker: how fast a partition's states are rebuilt from stored records, and
how much memory a parked saga's state takes.

B5 (rebuild speed) times the coordinator's recovery fold end to end on records held in memory:
the unseal check of `saga.runtime.partition` (``_opened``), decoding (`saga.core.codec`) and
`saga.core.replay.Replay.add_log_record` (`evolve`), over a log of a realistic mix of sagas
(3-step sequential and 4-step fan-out sagas, some retrying a step, some compensating), their
events interleaved as a coordinator with many sagas in flight writes them. The events are made
by the core's own `decide`. It also times decoding alone, folding alone, and the snapshot pass
(`Replay.add_snapshot`), and can write a cProfile of the fold.

B6 (memory per parked saga) holds ``--parked`` sagas waiting on a ``wait`` step after their
first step succeeded, in a dict as `saga.runtime.partition.OwnedPartition.states` does, and
measures with tracemalloc what they take: built live by `decide`, rebuilt from their log
records and rebuilt from their snapshots (the three ways a coordinator comes to hold a state).
It also counts what the partition keeps per saga besides the state (its timer entries).

Run: ``python -m bench.bench_rebuild [--events N] [--parked N] [--profile FILE]``; prints one
JSON object. No broker needed.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import heapq
import json
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from saga.core.codec import ENGINE_LIMITS, decode, encode
from saga.core.decide import Decision, Tick, decide, next_due
from saga.core.definition import RetryPolicy, SagaDefinition, Step
from saga.core.messages import (
    Command,
    ErrorInfo,
    EventBase,
    Reply,
    Snapshot,
    StartSaga,
    event_adapter,
)
from saga.core.replay import Replay
from saga.core.state import SagaState, SagaStatus
from saga.runtime.partition import _opened
from saga.runtime.ports import Record

NOW = 1_764_000_000.0

ORDER = SagaDefinition(
    name="order",
    steps=[
        Step(
            name="payment",
            service="payment",
            action="charge",
            compensation="refund",
            input={"amount": "$.input.total", "customer": "$.input.customer"},
            retry=RetryPolicy(max_attempts=3, initial_backoff=0.2),
        ),
        Step(
            name="restaurant",
            service="restaurant",
            action="accept",
            compensation="cancel",
            depends_on=["payment"],
        ),
        Step(
            name="notify",
            service="notification",
            action="notify_customer",
            compensation="retract",
            depends_on=["restaurant"],
        ),
    ],
)
"""The 3-step sequential saga of the engine benchmarks."""

FANOUT = SagaDefinition(
    name="fanout",
    steps=[
        Step(name="reserve", service="stock", action="reserve", compensation="release"),
        Step(
            name="charge",
            service="payment",
            action="charge",
            compensation="refund",
            depends_on=["reserve"],
        ),
        Step(
            name="label",
            service="shipping",
            action="label",
            compensation="void",
            depends_on=["reserve"],
        ),
        Step(
            name="ship",
            service="shipping",
            action="ship",
            kind="pivot",
            depends_on=["charge", "label"],
        ),
    ],
)
"""A 4-step saga: two steps in parallel after the first, then a pivot."""

PARKED = SagaDefinition(
    name="parked",
    steps=[
        Step(
            name="payment",
            service="payment",
            action="charge",
            compensation="refund",
            input={"amount": "$.input.total", "customer": "$.input.customer"},
        ),
        Step(name="confirm", wait="confirmed", timeout=86_400.0, depends_on=["payment"]),
        Step(
            name="ship",
            service="shipping",
            action="ship",
            compensation="void",
            depends_on=["confirm"],
        ),
    ],
)
"""A saga that parks: after its payment it waits (a day at most) for a ``confirmed`` signal."""

DEFINITIONS = {d.name: d for d in (ORDER, FANOUT, PARKED)}


def order_input(i: int) -> dict[str, Any]:
    """A start input of a realistic size (a customer, a total, a few lines)."""
    return {
        "customer": f"cust-{i % 9973:05d}",
        "total": 12.5 + (i % 40),
        "currency": "EUR",
        "lines": [{"sku": f"sku-{(i + k) % 500:04d}", "qty": 1 + k} for k in range(3)],
    }


def output_for(command: Command) -> dict[str, Any]:
    """What a participant replies: a small object with an id."""
    return {"id": f"{command.step}-{command.saga_id}", "ok": True}


def _reply(command: Command, now: float, *, ok: bool = True, business: bool = False) -> Reply:
    return Reply(
        message_id=command.message_id + "/r",
        saga_id=command.saga_id,
        step=command.step,
        phase=command.phase,
        attempt=command.attempt,
        service=command.service,
        ok=ok,
        output=output_for(command) if ok else None,
        error=None if ok else ErrorInfo(type="Refused", message="no", business=business),
        at=now,
    )


def drive(
    definition: SagaDefinition,
    saga_id: str,
    i: int,
    fail: Callable[[Command], str | None] = lambda c: None,
    until: Callable[[SagaState], bool] = lambda s: s.is_final,
) -> tuple[SagaState, list[EventBase]]:
    """Runs one saga through `decide` until ``until`` holds; ``fail`` says which replies fail
    (``"technical"`` or ``"business"``). Timers fire for retries."""
    now = NOW + i * 0.001
    start = StartSaga(
        message_id=f"m-{saga_id}",
        saga_id=saga_id,
        saga_name=definition.name,
        input=order_input(i),
        at=now,
    )
    d: Decision = decide(definition, None, start, now)
    assert d.state is not None
    state, events, pending = d.state, list(d.events), list(d.commands)
    while pending and not until(state):
        command = pending.pop(0)
        now += 0.004
        how = fail(command)
        reply = _reply(command, now, ok=how is None, business=how == "business")
        d = decide(definition, state, reply, now)
        assert d.state is not None
        state = d.state
        events += d.events
        pending += d.commands
        if not pending and not until(state) and (due := next_due(state)) is not None:
            now = max(now, due)
            d = decide(definition, state, Tick(saga_id, now), now)
            assert d.state is not None
            state = d.state
            events += d.events
            pending += d.commands
    return state, events


def _technical_once(step: str) -> Callable[[Command], str | None]:
    def fail(command: Command) -> str | None:
        return "technical" if command.step == step and command.attempt == 1 else None

    return fail


def _business(step: str) -> Callable[[Command], str | None]:
    def fail(command: Command) -> str | None:
        if command.step == step and command.phase == "action":
            return "business"
        return None

    return fail


def saga_events(i: int) -> list[EventBase]:
    """The events of saga ``i`` of the mix: 45% 3-step, 35% 4-step, 10% retrying, 10%
    compensating."""
    kind = i % 20
    saga_id = f"{'order' if kind < 9 else 'fanout'}-{i:08d}"
    if kind < 9:
        _, events = drive(ORDER, saga_id, i)
    elif kind < 16:
        _, events = drive(FANOUT, saga_id, i)
    elif kind < 18:
        _, events = drive(ORDER, saga_id, i, _technical_once("restaurant"))
    else:
        _, events = drive(FANOUT, saga_id, i, _business("label"))
    return events


def make_log(total: int, distinct: int = 2000, in_flight: int = 500) -> list[Record]:
    """A log partition of about ``total`` event records: ``distinct`` sagas made by `decide`,
    repeated under new ids until the size is reached, their events interleaved in groups of
    ``in_flight`` sagas (as a coordinator running that many at once writes them)."""
    pool = [[encode(e) for e in saga_events(i)] for i in range(distinct)]
    per_saga = sum(len(p) for p in pool) / len(pool)
    sagas = max(1, round(total / per_saga))
    values: list[tuple[bytes, bytes]] = []
    for first in range(0, sagas, in_flight):
        group = []
        for n in range(first, min(first + in_flight, sagas)):
            template = pool[n % distinct]
            old = _saga_id_of(template[0])
            new = old if n < distinct else old[:-8] + f"{n:08d}".encode()
            group.append([(new, v.replace(b'"' + old + b'"', b'"' + new + b'"')) for v in template])
        values += _interleave(group)
    headers = (("traceparent", b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01"),)
    return [
        Record("saga.log", 0, offset, key, value, headers)
        for offset, (key, value) in enumerate(values)
    ]


def _saga_id_of(value: bytes) -> bytes:
    obj = json.loads(value)
    return str(obj["saga_id"]).encode()


def _interleave(groups: list[list[tuple[bytes, bytes]]]) -> Iterator[tuple[bytes, bytes]]:
    """Round robin over the sagas' event lists, each list kept in order."""
    cursors = [iter(g) for g in groups]
    while cursors:
        alive = []
        for cursor in cursors:
            item = next(cursor, None)
            if item is not None:
                yield item
                alive.append(cursor)
        cursors = alive


@dataclass
class Timed:
    """A measured rate."""

    seconds: float
    count: int

    @property
    def per_s(self) -> int:
        """Items per second."""
        return round(self.count / self.seconds) if self.seconds else 0


def _best(runs: int, body: Callable[[], int]) -> Timed:
    """The fastest of ``runs`` runs of ``body`` (which returns how many items it did)."""
    best: Timed | None = None
    for _ in range(runs):
        gc.collect()
        t0 = time.perf_counter()
        count = body()
        timed = Timed(time.perf_counter() - t0, count)
        if best is None or timed.seconds < best.seconds:
            best = timed
    assert best is not None
    return best


def recover(records: Iterable[Record]) -> Replay[Record]:
    """The coordinator's log pass of recovery (`OwnedPartition.recover`), records in memory."""
    fold: Replay[Record] = Replay()
    for record in records:
        fold.add_log_record(_opened(record))
    return fold


PART = 200_000
"""At most this many records for the timings of decoding and folding alone."""


def measure_rebuild(events: int, runs: int, profile: str | None) -> dict[str, Any]:
    """B5: the recovery fold's rate, and its parts."""
    log = make_log(events)
    fold = recover(log)
    assert not fold.unusable, fold.unusable[:3]
    finished = sum(s.is_final for s in fold.states.values())
    end_to_end = _best(runs, lambda: len(recover(log).log_next) and len(log))
    # The parts are timed on a prefix of the log (a valid log too), to hold fewer events.
    part = log[:PART]
    decoded: list[EventBase] = []

    def decode_all() -> int:
        decoded.clear()
        decoded.extend(decode(event_adapter, r.value, ENGINE_LIMITS) for r in part)
        return len(decoded)

    decoding = _best(runs, decode_all)

    def fold_all() -> int:
        replay: Replay[Record] = Replay()
        for event in decoded:
            replay.add_event(event)
        return len(decoded)

    folding = _best(runs, fold_all)
    snapshots = [
        Record(
            "saga.snapshots",
            0,
            n,
            saga_id.encode(),
            encode(Snapshot(saga_id=saga_id, state=state.model_dump(mode="json"))),
        )
        for n, (saga_id, state) in enumerate(fold.states.items())
        if n < PART // 10
    ]

    def snapshot_pass() -> int:
        replay: Replay[Record] = Replay()
        for record in snapshots:
            replay.add_snapshot(record)
        assert not replay.unusable
        return len(snapshots)

    snapshot_rate = _best(runs, snapshot_pass)
    if profile:
        cProfile.runctx("recover(log)", globals(), {"log": log, "recover": recover}, profile)
    return {
        "events": len(log),
        "sagas": len(fold.states),
        "finished": finished,
        "mean_event_bytes": round(sum(len(r.value or b"") for r in log) / len(log)),
        "rebuild_events_per_s": end_to_end.per_s,
        "rebuild_seconds": round(end_to_end.seconds, 3),
        "decode_events_per_s": decoding.per_s,
        "fold_events_per_s": folding.per_s,
        "snapshots_per_s": snapshot_rate.per_s,
        "mean_snapshot_bytes": round(sum(len(r.value or b"") for r in snapshots) / len(snapshots)),
    }


def parked_events(n: int) -> list[EventBase]:
    """The events of parked saga ``n``: started, payment succeeded, waiting on ``confirm``."""
    _, events = drive(PARKED, f"parked-{n:08d}", n, until=_parked)
    return events


def _parked(state: SagaState) -> bool:
    return state.steps["confirm"].status.value == "running"


def _held(build: Callable[[], dict[str, SagaState]]) -> tuple[int, dict[str, SagaState]]:
    """Bytes still allocated after ``build`` returned, with what it built held."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    held = build()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before, held


def measure_parked(count: int) -> dict[str, Any]:
    """B6: bytes per parked saga state held in a dict, three ways, and the timer entries."""

    def live() -> dict[str, SagaState]:
        states: dict[str, SagaState] = {}
        for n in range(count):
            state, _ = drive(PARKED, f"parked-{n:08d}", n, until=_parked)
            states[state.saga_id] = state
        return states

    live_bytes, states = _held(live)
    assert all(_parked(s) and s.status is SagaStatus.RUNNING for s in states.values())
    log = [
        Record("saga.log", 0, offset, e.saga_id.encode(), encode(e))
        for offset, e in enumerate(e for n in range(count) for e in parked_events(n))
    ]
    snaps = [
        Record(
            "saga.snapshots",
            0,
            n,
            s.saga_id.encode(),
            encode(Snapshot(saga_id=s.saga_id, state=s.model_dump(mode="json"))),
        )
        for n, s in enumerate(states.values())
    ]
    expected = {k: v.model_dump() for k, v in states.items()}
    del states
    from_log_bytes, from_log = _held(lambda: recover(log).states)
    assert {k: v.model_dump() for k, v in from_log.items()} == expected
    del from_log

    def from_snapshots() -> dict[str, SagaState]:
        fold: Replay[Record] = Replay()
        for record in snaps:
            fold.add_snapshot(record)
        return fold.states

    from_snap_bytes, from_snap = _held(from_snapshots)
    assert {k: v.model_dump() for k, v in from_snap.items()} == expected

    # What `OwnedPartition` keeps besides the state: one timer entry per `arm` (every batch that
    # changed the saga pushes one; stale ones leave only when they come due).
    def timers() -> dict[str, SagaState]:
        heap: list[tuple[float, str]] = []
        for state in from_snap.values():
            for _ in range(2):  # armed after the start and after the payment's reply
                due = next_due(state)
                assert due is not None
                heapq.heappush(heap, (due, state.saga_id))
        return {"heap": heap}  # type: ignore[dict-item]

    timer_bytes, _ = _held(timers)
    one = next(iter(from_snap.values()))
    return {
        "parked": count,
        "bytes_per_parked_live": round(live_bytes / count),
        "bytes_per_parked_from_log": round(from_log_bytes / count),
        "bytes_per_parked_from_snapshots": round(from_snap_bytes / count),
        "timer_bytes_per_parked": round(timer_bytes / count),
        "snapshot_bytes": len(snaps[0].value or b""),
        "steps_per_saga": len(one.steps),
    }


def main(argv: list[str] | None = None) -> None:
    """Measures and prints the figures."""
    parser = argparse.ArgumentParser(prog="bench.bench_rebuild", description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000, help="log size (B5)")
    parser.add_argument("--parked", type=int, default=20_000, help="parked sagas (B6)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs; the best is kept")
    parser.add_argument("--profile", help="write a cProfile of one recovery fold here")
    args = parser.parse_args(argv)
    figures: dict[str, Any] = {"python": sys.version.split()[0]}
    if args.events:
        figures |= measure_rebuild(args.events, args.runs, args.profile)
    if args.parked:
        figures |= measure_parked(args.parked)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
