"""`Replay`: the one way to rebuild saga states from stored records.

Theory of operation
-------------------
A saga's state is a fold of its events (`saga.core.state.evolve`). The coordinator writes the
log and, in the same transaction, a snapshot of every saga it changed plus one checkpoint per
partition: "every event of this log partition before offset N is covered by the snapshots". So
the states of a partition are rebuilt in two passes over stored records:

1. the snapshots topic, from its start: the latest snapshot of each saga wins, a tombstone
   removes the saga, and the latest checkpoint gives the log offset to continue from;
2. the log partition, from that offset: each event newer than its saga's state is folded in;
   an event the state already holds (``seq`` not past it) is passed over.

A view that starts from the beginning of the log simply skips step 1. Whoever feeds the fold
does the reading (the coordinator on recovery, ``saga watch``, the demo, clients); the fold is
pure and owns every rule about the records: how checkpoints are keyed, what a tombstone means,
which events are already covered, and which records cannot be used (they are returned with a
reason, never raised, so that one bad record cannot stop a rebuild).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from pydantic import ValidationError

from saga.core.codec import ENGINE_LIMITS, Limits, decode
from saga.core.messages import Checkpoint, EventBase, event_adapter, snapshot_adapter
from saga.core.state import SagaState, evolve
from saga.errors import DecodeError, IllegalTransition

__all__ = [
    "CHECKPOINT_PREFIX",
    "Folded",
    "Replay",
    "StoredRecord",
    "Unusable",
    "checkpoint_key",
    "is_saga_key",
]

CHECKPOINT_PREFIX = b"__checkpoint__."
"""Keys of the snapshots topic that start with ``__`` are the engine's, never a saga's (saga
ids may not start with ``__``); checkpoints are keyed by this prefix and the partition."""


def checkpoint_key(partition: int) -> bytes:
    """The snapshots-topic key of a partition's checkpoint."""
    return CHECKPOINT_PREFIX + str(partition).encode()


def is_saga_key(key: bytes | None) -> bool:
    """Whether a snapshots-topic key is a saga's (not a checkpoint or other engine record)."""
    return key is not None and not key.startswith(b"__")


class StoredRecord(Protocol):
    """What the fold needs of a record read from a topic (`saga.runtime.ports.Record` fits)."""

    @property
    def topic(self) -> str:
        """The topic it was read from."""
        ...

    @property
    def partition(self) -> int:
        """Its partition."""
        ...

    @property
    def offset(self) -> int:
        """Its offset."""
        ...

    @property
    def key(self) -> bytes | None:
        """Its key (the saga id for the engine's records)."""
        ...

    @property
    def value(self) -> bytes | None:
        """Its value; ``None`` is a tombstone."""
        ...


R = TypeVar("R", bound=StoredRecord)


@dataclass(frozen=True, slots=True)
class Unusable(Generic[R]):
    """A stored record the fold could not use, with a dead-letter reason and a detail."""

    record: R
    reason: str
    """``bad_snapshot`` or ``bad_log_record``."""
    detail: str


@dataclass(frozen=True, slots=True)
class Folded:
    """An event that was folded in, and the state it produced."""

    event: EventBase
    state: SagaState


@dataclass
class Replay(Generic[R]):
    """A fold over snapshot and log records, fed one record at a time.

    Args:
        limits: Decoding bounds: the engine's own, by default (see `saga.core.codec`), since
            every record the fold reads was written by the engine.
    """

    limits: Limits = ENGINE_LIMITS
    states: dict[str, SagaState] = field(default_factory=dict)
    """The rebuilt state of every saga seen, by saga id."""
    checkpoints: dict[int, int] = field(default_factory=dict)
    """Per log partition, the offset its latest checkpoint says the snapshots cover up to."""
    partition_counts: dict[int, int] = field(default_factory=dict)
    """Per log partition, the topics' partition count its latest checkpoint was written under
    (checkpoints of older releases record none)."""
    log_next: dict[int, int] = field(default_factory=dict)
    """Per log partition, the offset after the last log record fed."""
    unusable: list[Unusable[R]] = field(default_factory=list)
    """Records that could not be used, in the order they were fed."""

    def start_offset(self, partition: int) -> int:
        """Where to read the log partition from: its checkpoint, or 0 without one."""
        return self.checkpoints.get(partition, 0)

    def add_snapshot(self, record: R) -> None:
        """Feeds one record of the snapshots topic (records of one partition in offset order)."""
        if record.value is None:
            if is_saga_key(record.key):
                assert record.key is not None
                self.states.pop(record.key.decode(errors="replace"), None)
            return
        try:
            item = decode(snapshot_adapter, record.value, self.limits)
            if isinstance(item, Checkpoint):
                self.checkpoints[item.partition] = item.log_offset
                if item.partitions is not None:
                    self.partition_counts[item.partition] = item.partitions
                return
            if record.key != item.saga_id.encode():
                raise DecodeError("wrong_key", f"key {record.key!r} is not the saga id")
            self.states[item.saga_id] = SagaState.model_validate(item.state)
        except (DecodeError, ValidationError) as exc:
            self.unusable.append(Unusable(record, "bad_snapshot", str(exc)))

    def add_log_record(self, record: R) -> Folded | None:
        """Feeds one log record; returns what it folded, or ``None`` if it was passed over
        (already covered by a snapshot) or could not be used (see `unusable`)."""
        self.log_next[record.partition] = record.offset + 1
        try:
            event = decode(event_adapter, record.value, self.limits)
        except DecodeError as exc:
            self.unusable.append(Unusable(record, "bad_log_record", str(exc)))
            return None
        return self._fold(event, record)

    def add_event(self, event: EventBase) -> Folded | None:
        """Folds an event already decoded; ``None`` if covered or illegal (not recorded)."""
        return self._fold(event, None)

    def _fold(self, event: EventBase, record: R | None) -> Folded | None:
        state = self.states.get(event.saga_id)
        if state is not None and event.seq <= state.seq:
            return None  # the snapshot already holds it
        try:
            new = evolve(state, event)
        except IllegalTransition as exc:
            if record is not None:
                self.unusable.append(Unusable(record, "bad_log_record", str(exc)))
            return None
        self.states[event.saga_id] = new
        return Folded(event, new)
