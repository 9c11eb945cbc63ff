"""The workload: a 3-step sequential saga with no-op handlers, a participant per service, and a
saga that parks on a ``wait`` step (for the memory benchmark).

Each participant counts its handler calls per saga (`CALLS`), so that a recovery benchmark can
check that every step ran exactly once per saga, as the service saw it (the engine's own
de-duplication by idempotency key included: a redelivered command answered from the reply
store is not a call).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from saga import Participant, SagaDefinition, Step, StepContext

__all__ = [
    "CALLS",
    "PARKED",
    "PARK_SIGNAL",
    "SAGA",
    "SERVICES",
    "participant_for",
    "participants",
    "sagas",
]

SERVICES = ("s1", "s2", "s3")
"""One service per step."""

SAGA = SagaDefinition(
    name="perf",
    steps=[
        Step(name="a", service="s1", action="do", compensation="undo"),
        Step(name="b", service="s2", action="do", compensation="undo", depends_on=["a"]),
        Step(name="c", service="s3", action="do", compensation="undo", depends_on=["b"]),
    ],
)
"""The benchmark saga: three sequential no-op steps, each on its own service."""

PARK_SIGNAL = "go"

PARKED = SagaDefinition(
    name="perf_parked",
    steps=[Step(name="park", wait=PARK_SIGNAL, timeout=86_400.0)],
)
"""A saga that starts and then waits for a signal that never comes: it stays in flight."""

sagas = [SAGA, PARKED]
"""What the benchmark coordinator runs."""

CALLS: Counter[tuple[str, str]] = Counter()
"""(saga id, step) -> handler calls of the ``do`` action in this process."""


def _make(service: str) -> Participant:
    p = Participant(service)

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> None:
        CALLS[(ctx.saga_id, ctx.step)] += 1

    @p.handler("undo")
    async def undo(payload: dict[str, Any], ctx: StepContext) -> None:
        return None

    return p


_PARTICIPANTS = {service: _make(service) for service in SERVICES}


def participant_for(service: str) -> Participant:
    """The participant serving ``service``."""
    return _PARTICIPANTS[service]


def participants() -> list[Participant]:
    """Every service's participant."""
    return list(_PARTICIPANTS.values())
