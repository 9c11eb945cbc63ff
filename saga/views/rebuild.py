"""Replay as a tool: rebuild every saga's state from the log and check the snapshots against it.

The log is the source of truth and the snapshots topic is a projection of it (DESIGN section 2),
so folding the log with `evolve` must give, saga by saga, the state the coordinator recorded.
`rebuild` does that fold and reports where they differ.

From offset 0 every saga is folded from its ``saga_started``. From a later offset (or time) a
saga whose first event in the window is not its first event needs a state to start from; the
only states outside the log are the snapshots, so the fold starts from the earliest snapshot
version that the window continues: its ``seq`` is at least one below the saga's first event in
the window, and below its last, so that at least one event is checked. A compacted topic may no
longer hold such a version: that saga is reported as not rebuilt, with the reason, rather than
guessed at.

The log is read before the snapshots. Both are written in one transaction, so with a coordinator
still running a snapshot read later may be ahead of the log read earlier, and a saga may have a
snapshot but no events yet. Such a difference counts as a mismatch only if the log has not grown
with that saga since it was read; if it has, the snapshot version at the rebuilt ``seq`` is
compared where the topic still holds it, and otherwise the saga is reported as unverified.

This is the one fold that does not go through `saga.core.replay.Replay`, because it checks
what `Replay` trusts: an event whose ``seq`` is not past its saga's state is passed over by the
replay (a snapshot holds it) but is an illegal event here, reported with `evolve`'s reason; and
continuing a window needs every stored version of a snapshot, not only the latest.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
from pydantic import ValidationError

from saga.core.codec import ENGINE_LIMITS, decode
from saga.core.messages import EventBase, Snapshot, event_adapter, snapshot_adapter
from saga.core.replay import is_saga_key
from saga.core.state import SagaState, evolve
from saga.errors import DecodeError, IllegalTransition
from saga.runtime.ports import Record, Topics, Transport

__all__ = [
    "BadRecord",
    "Mismatch",
    "NotRebuilt",
    "RebuildReport",
    "diff",
    "parse_time",
    "rebuild",
]


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record that could not be used: undecodable, or an event that does not fold."""

    topic: str
    partition: int
    offset: int
    key: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A saga whose rebuilt state differs from its snapshot."""

    saga_id: str
    fields: tuple[str, ...]
    """Dotted paths of the differing fields, e.g. ``status`` or ``steps.payment.attempt``."""
    rebuilt_seq: int | None
    snapshot_seq: int | None


@dataclass(frozen=True, slots=True)
class NotRebuilt:
    """A saga whose history starts before the window and that no snapshot lets us continue."""

    saga_id: str
    first_seq: int
    """The ``seq`` of its first event in the window."""
    reason: str


@dataclass
class RebuildReport:
    """What `rebuild` found."""

    log_topic: str
    partitions: int
    start_offsets: dict[int, int | None]
    """Per log partition, the first offset read (``None``: nothing at or after the time)."""
    records_read: int = 0
    events_read: int = 0
    seconds: float = 0.0
    states: dict[str, SagaState] = field(default_factory=dict)
    """The rebuilt states, by saga id."""
    from_snapshot: int = 0
    """How many of them started from a snapshot rather than from ``saga_started``."""
    mismatches: list[Mismatch] = field(default_factory=list)
    undecodable: list[BadRecord] = field(default_factory=list)
    illegal: list[BadRecord] = field(default_factory=list)
    """Events that decode but do not follow their saga's state."""
    not_rebuilt: list[NotRebuilt] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    """Sagas that moved on while the rebuild read (a coordinator is running): their snapshot
    is ahead of the log that was read, and the compacted topic no longer holds the version
    that matches it. Run the rebuild again when they are idle."""

    @property
    def events_per_second(self) -> float:
        """Events read per second of the whole rebuild (reads of both topics included)."""
        return self.events_read / self.seconds if self.seconds > 0 else 0.0

    @property
    def by_status(self) -> dict[str, int]:
        """Rebuilt sagas per status."""
        return dict(sorted(Counter(s.status.value for s in self.states.values()).items()))

    @property
    def consistent(self) -> bool:
        """No mismatch and no illegal event: the snapshots are the log's projection."""
        return not self.mismatches and not self.illegal

    def to_json(self) -> dict[str, Any]:
        """The report as plain data (``saga rebuild --json``)."""
        return {
            "log_topic": self.log_topic,
            "partitions": self.partitions,
            "start_offsets": {str(p): o for p, o in self.start_offsets.items()},
            "records_read": self.records_read,
            "events_read": self.events_read,
            "seconds": round(self.seconds, 6),
            "events_per_second": round(self.events_per_second, 1),
            "sagas_rebuilt": len(self.states),
            "from_snapshot": self.from_snapshot,
            "by_status": self.by_status,
            "consistent": self.consistent,
            "mismatches": [{**asdict(m), "fields": list(m.fields)} for m in self.mismatches],
            "undecodable": [asdict(b) for b in self.undecodable],
            "illegal": [asdict(b) for b in self.illegal],
            "not_rebuilt": [asdict(n) for n in self.not_rebuilt],
            "unverified": self.unverified,
        }


async def rebuild(
    transport: Transport,
    topics: Topics,
    *,
    from_offset: int = 0,
    from_time: float | datetime | None = None,
) -> RebuildReport:
    """Folds the log into states and compares them with the snapshots topic.

    Args:
        transport: The broker.
        topics: The engine's topic names (the prefix).
        from_offset: First offset to read in every log partition.
        from_time: Instead of an offset: per partition, start at the first record whose
            timestamp is at or after this time (seconds since the epoch, or an aware datetime).

    Returns:
        The report; bad records are listed in it, never raised.
    """
    if from_offset < 0:
        raise ValueError(f"from_offset must be 0 or more, not {from_offset}")
    since = from_time.timestamp() if isinstance(from_time, datetime) else from_time
    began = anyio.current_time()
    count = await transport.partitions(topics.log)
    run = _Run(transport, topics, RebuildReport(topics.log, count, {}))
    # Partitions are independent (a saga lives in one), so they are read side by side: on
    # Kafka every read opens its own consumer, and waiting for each in turn dominates the time.
    async with anyio.create_task_group() as tg:
        for p in range(count):
            tg.start_soon(run.fold_partition, p, from_offset, since)
    snapshot_count = await transport.partitions(topics.snapshots)
    async with anyio.create_task_group() as tg:
        for p in range(snapshot_count):
            tg.start_soon(run.read_snapshots, p)
    report = run.report
    _continue_from_snapshots(report, run.folds, run.waiting, run.versions, run.broken)
    report.states = dict(sorted(run.folds.items()))
    # From offset 0 every saga with a snapshot must have events; from later, older ones won't.
    whole_log = from_offset == 0 and since is None
    orphans = set(run.latest) - set(run.folds) - set(run.waiting) if whole_log else set()
    report.mismatches, suspects = _compare(run.folds, run.latest, run.versions, orphans)
    if suspects:
        # A snapshot ahead of the log, or without events, is what a coordinator that wrote
        # after the log was read leaves: if the log has grown with that saga, it is unverified.
        late = await run.sagas_in_log_tail()
        report.unverified = sorted(m.saga_id for m, ok in suspects if m.saga_id in late and not ok)
        report.mismatches += [m for m, _ in suspects if m.saga_id not in late]
        report.mismatches.sort(key=lambda m: m.saga_id)
    report.start_offsets = dict(sorted(report.start_offsets.items()))
    for found in (report.undecodable, report.illegal):
        found.sort(key=lambda b: (b.topic, b.partition, b.offset))
    report.seconds = anyio.current_time() - began
    return report


class _Run:
    """One rebuild's working state, shared by the tasks that read the partitions."""

    def __init__(self, transport: Transport, topics: Topics, report: RebuildReport) -> None:
        self.transport = transport
        self.topics = topics
        self.report = report
        self.folds: dict[str, SagaState] = {}
        self.waiting: dict[str, list[EventBase]] = defaultdict(list)
        """Events of sagas that began before the window: they need a snapshot to start from."""
        self.broken: set[str] = set()
        self.latest: dict[str, dict[str, Any]] = {}
        """The latest snapshot's state per saga."""
        self.versions: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
        """Older snapshot versions by seq, kept only where a saga may need them."""
        self.log_next: dict[int, int] = {}
        """Per log partition, the offset after the last record read."""

    async def fold_partition(self, p: int, from_offset: int, since: float | None) -> None:
        report = self.report
        start: int | None = from_offset if since is None else None
        self.log_next[p] = start or 0
        async for record in self.transport.read(self.topics.log, p, start or 0):
            self.log_next[p] = record.offset + 1
            if start is None:
                if since is not None and record.timestamp < since:
                    continue
                start = record.offset
            report.records_read += 1
            event = _decode_event(record, report)
            if event is None:
                continue
            report.events_read += 1
            saga_id = event.saga_id
            if saga_id in self.broken:
                continue
            if saga_id in self.waiting or (saga_id not in self.folds and event.seq != 1):
                self.waiting[saga_id].append(event)
                continue
            try:
                self.folds[saga_id] = evolve(self.folds.get(saga_id), event)
            except IllegalTransition as exc:
                report.illegal.append(_bad(record, str(exc)))
                self.broken.add(saga_id)
        report.start_offsets[p] = start  # None: nothing at or after the time

    async def sagas_in_log_tail(self) -> set[str]:
        """The sagas with records in the log after what the fold read (keys, not decoded)."""
        found: set[str] = set()

        async def tail(p: int) -> None:
            async for record in self.transport.read(self.topics.log, p, self.log_next[p]):
                if record.key is not None:
                    found.add(record.key.decode(errors="replace"))

        async with anyio.create_task_group() as tg:
            for p in self.log_next:
                tg.start_soon(tail, p)
        return found

    def _wanted(self, saga_id: str, seq: int) -> bool:
        """Whether an older version may be needed: to start from, or to compare with."""
        waiting = self.waiting.get(saga_id)
        if waiting:  # from one below its first event in the window to its last
            return waiting[0].seq - 1 <= seq <= waiting[-1].seq
        fold = self.folds.get(saga_id)
        return fold is not None and fold.seq == seq

    async def read_snapshots(self, p: int) -> None:
        async for record in self.transport.read(self.topics.snapshots, p):
            if not is_saga_key(record.key):
                continue  # per-partition checkpoints, not sagas
            assert record.key is not None
            saga_id = record.key.decode(errors="replace")
            if record.value is None:
                self.latest.pop(saga_id, None)
                continue
            try:
                item = decode(snapshot_adapter, record.value, ENGINE_LIMITS)
            except DecodeError as exc:
                self.report.undecodable.append(_bad(record, str(exc)))
                continue
            if not isinstance(item, Snapshot):
                self.report.undecodable.append(_bad(record, "a checkpoint under a saga's key"))
                continue
            self.latest[item.saga_id] = item.state
            seq = item.state.get("seq")
            if isinstance(seq, int) and self._wanted(item.saga_id, seq):
                self.versions[item.saga_id][seq] = item.state


def _decode_event(record: Record, report: RebuildReport) -> EventBase | None:
    if record.value is None:
        report.undecodable.append(_bad(record, "empty value (a tombstone in the log)"))
        return None
    try:
        return decode(event_adapter, record.value, ENGINE_LIMITS)
    except DecodeError as exc:
        report.undecodable.append(_bad(record, str(exc)))
        return None


def _bad(record: Record, reason: str) -> BadRecord:
    key = record.key.decode(errors="replace") if record.key is not None else None
    return BadRecord(record.topic, record.partition, record.offset, key, reason)


def _continue_from_snapshots(
    report: RebuildReport,
    folds: dict[str, SagaState],
    waiting: dict[str, list[EventBase]],
    versions: dict[str, dict[int, dict[str, Any]]],
    broken: set[str],
) -> None:
    for saga_id, events in waiting.items():
        first, last = events[0].seq, events[-1].seq
        usable = sorted(s for s in versions.get(saga_id, {}) if first - 1 <= s < last)
        if not usable:
            report.not_rebuilt.append(
                NotRebuilt(
                    saga_id,
                    first,
                    f"its events before seq {first} precede the window and the snapshots hold no "
                    f"state between seq {first - 1} and {last - 1} to continue from",
                )
            )
            continue
        try:
            state = SagaState.model_validate(versions[saga_id][usable[0]])
            for e in events:
                if e.seq > state.seq:
                    state = evolve(state, e)
        except (ValidationError, IllegalTransition) as exc:
            broken.add(saga_id)
            report.not_rebuilt.append(NotRebuilt(saga_id, first, f"cannot continue: {exc}"))
            continue
        folds[saga_id] = state
        report.from_snapshot += 1


def _compare(
    folds: dict[str, SagaState],
    latest: dict[str, dict[str, Any]],
    versions: dict[str, dict[int, dict[str, Any]]],
    orphans: set[str],
) -> tuple[list[Mismatch], list[tuple[Mismatch, bool]]]:
    """Mismatches, and suspects: snapshots ahead of the log that was read, which a coordinator
    writing meanwhile explains if the log has grown since. A suspect comes with whether an
    older snapshot version at the rebuilt ``seq`` matched (then, if explained, all is well)."""
    found: list[Mismatch] = []
    suspects: list[tuple[Mismatch, bool]] = []
    for saga_id, state in sorted(folds.items()):
        snap = latest.get(saga_id)
        if snap is None:
            found.append(Mismatch(saga_id, ("<no snapshot>",), state.seq, None))
            continue
        fields = diff(state, snap)
        if not fields:
            continue
        seq = snap.get("seq")
        mismatch = Mismatch(saga_id, fields, state.seq, seq if isinstance(seq, int) else None)
        if not isinstance(seq, int) or seq < state.seq:
            found.append(mismatch)
        elif state.seq not in versions.get(saga_id, {}):
            suspects.append((mismatch, False))
        elif older := diff(state, versions[saga_id][state.seq]):
            found.append(Mismatch(saga_id, older, state.seq, state.seq))
        else:
            suspects.append((mismatch, True))
    for saga_id in sorted(orphans):
        seq = latest[saga_id].get("seq")
        mismatch = Mismatch(saga_id, ("<no events>",), None, seq if isinstance(seq, int) else None)
        suspects.append((mismatch, False))
    return found, suspects


def diff(state: SagaState, snapshot: dict[str, Any]) -> tuple[str, ...]:
    """The dotted paths of the fields where ``state`` and a snapshot's state differ."""
    try:
        other = SagaState.model_validate(snapshot).model_dump(mode="json")
    except ValidationError as exc:
        return (f"<invalid snapshot: {exc.error_count()} errors>",)
    mine = state.model_dump(mode="json")
    return tuple(_diff(mine, other, ""))


def _diff(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(a.keys() | b.keys(), key=str):
            found += _diff(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        return found
    return [] if a == b else [path or "<root>"]


def parse_time(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 time; a time without a zone is UTC.

    Raises:
        ValueError: ``text`` is not ISO 8601.
    """
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
