"""Throughput of the pure core: decisions per second and replay (evolve) events per second.

Run: ``python -m bench.bench_core``. No broker needed; prints one JSON object.
"""

from __future__ import annotations

import json
import time
from typing import Any

from saga.core.codec import decode, encode
from saga.core.decide import decide
from saga.core.definition import SagaDefinition, Step
from saga.core.messages import Reply, StartSaga, event_adapter
from saga.core.state import SagaState, evolve

DEFINITION = SagaDefinition(
    name="bench",
    steps=[
        Step(name="a", service="s1", action="do", compensation="undo"),
        Step(name="b", service="s2", action="do", compensation="undo", depends_on=["a"]),
        Step(name="c", service="s3", action="do", compensation="undo", depends_on=["a"]),
        Step(name="d", service="s4", action="do", kind="pivot", depends_on=["b", "c"]),
    ],
)


def run_saga(i: int) -> tuple[SagaState, list[Any], int]:
    """Drives one saga to completion through decide; returns state, events, decisions."""
    now = 1_700_000_000.0
    start = StartSaga(
        message_id=f"m{i}", saga_id=f"s{i}", saga_name="bench", input={"n": i}, at=now
    )
    d = decide(DEFINITION, None, start, now)
    state, events, decisions, pending = d.state, list(d.events), 1, list(d.commands)
    while pending:
        c = pending.pop(0)
        reply = Reply(
            message_id=c.message_id + "/r",
            saga_id=c.saga_id,
            step=c.step,
            phase=c.phase,
            attempt=c.attempt,
            service=c.service,
            ok=True,
            output={"x": 1},
            at=now,
        )
        d = decide(DEFINITION, state, reply, now)
        state, decisions = d.state, decisions + 1
        events += d.events
        pending += d.commands
    assert state is not None
    assert state.status.value == "completed"
    return state, events, decisions


def main() -> None:
    """Measures and prints the figures."""
    n = 2000
    t0 = time.perf_counter()
    all_events: list[Any] = []
    decisions = 0
    for i in range(n):
        _, events, k = run_saga(i)
        all_events += events
        decisions += k
    decide_s = time.perf_counter() - t0

    encoded = [encode(e) for e in all_events]
    t0 = time.perf_counter()
    decoded = [decode(event_adapter, b) for b in encoded]
    decode_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    states: dict[str, SagaState] = {}
    for e in decoded:
        states[e.saga_id] = evolve(states.get(e.saga_id), e)
    evolve_s = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "sagas": n,
                "decisions": decisions,
                "events": len(all_events),
                "decisions_per_s": round(decisions / decide_s),
                "sagas_per_s_core_only": round(n / decide_s),
                "decode_events_per_s": round(len(encoded) / decode_s),
                "evolve_events_per_s": round(len(decoded) / evolve_s),
            }
        )
    )


if __name__ == "__main__":
    main()
