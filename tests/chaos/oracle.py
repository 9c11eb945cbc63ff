"""Checks that do not trust the engine: the log read back from Kafka, and the services' ledger.

`scan_log` reads ``<prefix>.log`` partition by partition, ``read_committed`` (through
`Transport.read`), and decodes every record itself. The checks then hold the engine to its
guarantees:

- `seq_problems`: every saga's events are numbered 1..n, without gap or duplicate, starting
  with ``SagaStarted`` (nothing acknowledged was lost, nothing was written twice).
- `fold_problems`: the events fold through `saga.core.state.evolve` (every transition legal),
  and at most one of them ends the saga (it ends once).
- `chain_trace_problems`: the chain saga's trace is T1..Tn or T1..Tj Cj..C1 (Garcia-Molina and
  Salem): successful actions in order, then the compensations in reverse, never compensating a
  step that did not run, completed with every step done and nothing undone.
- `ledger_problems`: what the services' ledger says took place agrees with the outcome:
  completed means every effect once and no undo; compensated means a net effect of zero.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from saga.core.codec import decode
from saga.core.messages import (
    CompensationResolved,
    CompensationStarted,
    CompensationSucceeded,
    EventBase,
    SagaCompensated,
    SagaCompleted,
    SagaStarted,
    StepResolved,
    StepSucceeded,
    StepTimedOut,
    event_adapter,
)
from saga.core.state import SagaState, SagaStatus, evolve
from saga.errors import DecodeError, IllegalTransition
from saga.runtime.ports import Record, Topics, Transport
from tests.chaos.app import CHAIN_STEPS, COMPENSATABLE

__all__ = [
    "LogScan",
    "chain_trace_problems",
    "expected_outcome",
    "fold_problems",
    "ledger_problems",
    "read_topic",
    "scan_log",
    "seq_problems",
]


@dataclass
class LogScan:
    """The log as read back from the broker."""

    events: dict[str, list[EventBase]] = field(default_factory=lambda: defaultdict(list))
    """Each saga's events in log order."""
    undecodable: list[str] = field(default_factory=list)
    records: int = 0

    def final(self) -> dict[str, SagaStatus]:
        """Each saga's status after folding its events (sagas that do not fold are left out)."""
        found: dict[str, SagaStatus] = {}
        for saga_id, events in self.events.items():
            try:
                found[saga_id] = _fold(events).status
            except IllegalTransition:
                continue
        return found


async def read_topic(transport: Transport, topic: str) -> list[Record]:
    """Every committed record of a topic, partition by partition."""
    found: list[Record] = []
    for partition in range(await transport.partitions(topic)):
        async for record in transport.read(topic, partition):
            found.append(record)
    return found


async def scan_log(transport: Transport, prefix: str) -> LogScan:
    """Reads and decodes the whole log of ``prefix``."""
    scan = LogScan()
    for record in await read_topic(transport, Topics(prefix).log):
        scan.records += 1
        try:
            event = decode(event_adapter, record.value)
        except DecodeError as exc:
            scan.undecodable.append(f"{record.partition}/{record.offset}: {exc}")
            continue
        scan.events[event.saga_id].append(event)
    return scan


def _fold(events: Sequence[EventBase]) -> SagaState:
    state: SagaState | None = None
    for event in events:
        state = evolve(state, event)
    if state is None:
        raise IllegalTransition("no events")
    return state


def seq_problems(scan: LogScan, started: Iterable[str] = ()) -> list[str]:
    """Gaps, duplicates and missing starts; ``started`` are ids a client had acknowledged."""
    problems = []
    for saga_id in started:
        if not scan.events.get(saga_id):
            problems.append(f"saga {saga_id}: acknowledged start but no SagaStarted in the log")
    for saga_id, events in scan.events.items():
        seqs = [e.seq for e in events]
        if seqs != list(range(1, len(seqs) + 1)):
            problems.append(f"saga {saga_id}: event seqs {seqs} are not 1..{len(seqs)}")
        if not isinstance(events[0], SagaStarted):
            problems.append(f"saga {saga_id}: first event is {events[0].type}")
    return problems


def fold_problems(scan: LogScan) -> list[str]:
    """Illegal transitions, and sagas that ended more than once."""
    problems = []
    for saga_id, events in scan.events.items():
        try:
            _fold(events)
        except IllegalTransition as exc:
            problems.append(f"saga {saga_id}: illegal trace: {exc}")
        ends = [e for e in events if isinstance(e, SagaCompleted | SagaCompensated)]
        if len(ends) > 1:
            problems.append(f"saga {saga_id}: ended {len(ends)} times")
    return problems


def chain_trace_problems(saga_id: str, events: Sequence[EventBase]) -> list[str]:
    """The chain saga's trace against T1..Tn | T1..Tj Cj..C1."""
    where = f"saga {saga_id}"
    problems: list[str] = []
    done = [
        (i, e.step) for i, e in enumerate(events) if isinstance(e, StepSucceeded | StepResolved)
    ]
    undone = [
        (i, e.step)
        for i, e in enumerate(events)
        if isinstance(e, CompensationSucceeded | CompensationResolved)
    ]
    timed_out = {e.step for e in events if isinstance(e, StepTimedOut)}
    started_undo = [i for i, e in enumerate(events) if isinstance(e, CompensationStarted)]
    actions = [s for _, s in done]
    if actions != list(CHAIN_STEPS[: len(actions)]):
        problems.append(f"{where}: actions {actions} are not a prefix of {list(CHAIN_STEPS)}")
    if done and started_undo and min(started_undo) < max(i for i, _ in done):
        problems.append(f"{where}: a compensation started before the last action succeeded")
    ran = [s for s in COMPENSATABLE if s in actions or s in timed_out]
    undo = [s for _, s in undone]
    for i in started_undo:
        step = events[i].step  # type: ignore[attr-defined]
        if step not in ran:
            problems.append(f"{where}: compensates {step!r}, which never ran")
    if undo != list(reversed(ran))[: len(undo)]:
        problems.append(f"{where}: compensations {undo} are not the reverse of {ran}")
    try:
        status = _fold(events).status
    except IllegalTransition:
        status = None  # reported by fold_problems
    if status is SagaStatus.COMPLETED and (actions != list(CHAIN_STEPS) or undo):
        problems.append(f"{where}: completed with actions {actions} and compensations {undo}")
    if status is SagaStatus.COMPENSATED:
        if undo != list(reversed(ran)):
            problems.append(f"{where}: compensated {undo}, but {ran} ran")
        if "p" in actions:
            problems.append(f"{where}: compensated after its pivot succeeded")
    return problems


def expected_outcome(saga_input: Mapping[str, object]) -> SagaStatus:
    """What a chain saga must end as, given its planned faults."""
    plan = saga_input.get("plan") or {}
    assert isinstance(plan, Mapping)
    failing = [s for s in ("a", "b", "c", "p") if (plan.get(s) or {}).get("business")]
    return SagaStatus.COMPENSATED if failing else SagaStatus.COMPLETED


def ledger_problems(
    saga_id: str,
    status: SagaStatus,
    effects: Mapping[tuple[str, str, str], int],
    steps: Sequence[str] = CHAIN_STEPS,
    compensatable: Sequence[str] = COMPENSATABLE,
) -> list[str]:
    """The ledger's effects of one saga against its final status."""
    where = f"saga {saga_id}"
    problems = []
    act = {s: effects.get((saga_id, s, "action"), 0) for s in steps}
    undo = {s: effects.get((saga_id, s, "compensation"), 0) for s in steps}
    for s in steps:
        if act[s] > 1 or undo[s] > 1:
            problems.append(f"{where}: step {s} took effect {act[s]} times, undone {undo[s]}")
    if status is SagaStatus.COMPLETED:
        missing = [s for s in steps if act[s] != 1]
        if missing or any(undo.values()):
            problems.append(f"{where}: completed, but effects {act} and undos {undo}")
    elif status is SagaStatus.COMPENSATED:
        net = {s: act[s] - undo[s] for s in steps if act[s] - undo[s]}
        if net:
            problems.append(f"{where}: compensated, but the net effects are {net}")
        beyond = [s for s in steps if s not in compensatable and act[s]]
        if beyond:
            problems.append(f"{where}: compensated, but {beyond} (past the pivot) took effect")
    return problems
