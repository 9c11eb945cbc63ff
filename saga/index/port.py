"""The saga index's port: what the CLI, the HTTP API and the console ask of an indexed store.

The index is a projection: it tails the snapshots and log topics into an embedded database and
can be dropped and rebuilt from Kafka at any time (`saga index rebuild`). Kafka stays the only
source of truth; the index answers queries that would otherwise scan whole partitions.

An adapter (SQLite by default, `saga.index.sqlite`) implements `SagaIndex`; the projector that
feeds it (`saga.index.projector`) is the same for every adapter.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from saga.core.state import SagaState

__all__ = [
    "BadRecord",
    "Change",
    "HistoryEntry",
    "IndexLag",
    "IndexWriter",
    "Page",
    "SagaIndex",
    "SagaQuery",
    "SagaRow",
]


@dataclass(frozen=True)
class SagaQuery:
    """A filter over indexed sagas; every field set narrows the result (AND).

    ``input`` matches top-level keys of the saga's input by equality of their JSON values
    (``{"customer": "c-7"}``). ``step`` with ``step_status`` matches sagas whose step has that
    status; ``step`` alone, sagas that have that step; ``step_status`` alone, sagas with any
    step in that status (`saga.index.query.matches` says it in code). Times are epoch
    seconds, inclusive. Results are ordered by ``updated_at`` descending, then saga id (also
    descending); ``cursor`` is the opaque value of `Page.next_cursor` from the previous page.
    """

    name: str | None = None
    status: Sequence[str] = ()
    version: int | None = None
    step: str | None = None
    step_status: str | None = None
    started_after: float | None = None
    started_before: float | None = None
    updated_after: float | None = None
    updated_before: float | None = None
    input: Mapping[str, Any] = field(default_factory=dict)
    saga_id_prefix: str | None = None
    limit: int = 50
    cursor: str | None = None


@dataclass(frozen=True)
class SagaRow:
    """One saga as the index holds it: its latest state and where it came from."""

    state: SagaState
    partition: int
    offset: int
    """Offset of the log record that produced this state (or of the snapshot)."""


@dataclass(frozen=True)
class Page:
    """One page of a query: the rows, the total that matched, and the cursor of the next."""

    rows: Sequence[SagaRow]
    total: int
    next_cursor: str | None


@dataclass(frozen=True)
class HistoryEntry:
    """One recorded event of a saga, as the log holds it (decoded, sealed fields opened)."""

    seq: int
    type: str
    at: float
    partition: int
    offset: int
    event: Mapping[str, Any]
    """The event's JSON form (`EventBase.model_dump(mode="json")`), incl. ``by`` and reasons."""


@dataclass(frozen=True)
class IndexLag:
    """How far the index is behind the log, per partition and in all."""

    behind: Mapping[int, int]
    """Log records not yet indexed, by partition."""
    updated_at: float | None
    """When the index last applied a record (epoch seconds); ``None`` before the first."""
    looked_at: float | None = None
    """When the projector last finished reading every partition to its end (epoch seconds;
    ``None``: never). Unlike ``updated_at`` it moves while nothing happens: how old it is says
    whether a projector is running."""

    @property
    def total(self) -> int:
        """Records behind, all partitions together."""
        return sum(self.behind.values())


class SagaIndex(Protocol):
    """An indexed saga store (SQLite by default)."""

    def query(self, query: SagaQuery) -> Page:
        """Sagas matching ``query``, newest update first."""
        ...

    def get(self, saga_id: str) -> SagaRow | None:
        """The saga's latest indexed state, or ``None`` if the index has never seen it."""
        ...

    def history(self, saga_id: str) -> Sequence[HistoryEntry]:
        """The saga's events in order (empty if unknown)."""
        ...

    def counts(self, name: str | None = None) -> Mapping[str, int]:
        """Sagas by status (of one saga name, or of all)."""
        ...

    def lag(self) -> IndexLag:
        """How far behind the log the index is (as of the projector's last look at the end
        offsets)."""
        ...

    @property
    def generation(self) -> int:
        """A number that grows each time the index applies a change: the console's live updates
        wait for it to move (`saga.index.projector.Projector.changed`)."""
        ...


# -- the writer's side: what the projector asks of an adapter ----------------------------------


@dataclass(frozen=True)
class BadRecord:
    """A record the projector could not use (undecodable, an event that does not fold, a
    sealed value that would not open): counted and kept for ``saga index status``, never
    raised."""

    topic: str
    partition: int
    offset: int
    key: str | None
    reason: str


@dataclass
class Change:
    """What one batch of records changes, written by `IndexWriter.write` in one transaction."""

    rows: dict[str, SagaRow] = field(default_factory=dict)
    """New latest states, by saga id (each newer than what the index holds)."""
    events: list[tuple[str, HistoryEntry]] = field(default_factory=list)
    """Events to record, with their saga id; an event already recorded is passed over."""
    bad: list[BadRecord] = field(default_factory=list)
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    """Per (topic, partition), the next offset to read: the projector resumes from here."""
    log_ends: dict[int, int] = field(default_factory=dict)
    """Per log partition, the end offset last seen (what the lag is measured against)."""
    at: float | None = None
    """When the projector made the change (epoch seconds): `IndexLag.updated_at` if it
    changes anything."""
    caught_up: bool = False
    """It ends a pass that read every partition to its end: ``at`` is the last look."""

    @property
    def empty(self) -> bool:
        """Whether it changes no row, event or bad record (offsets and ends may still move)."""
        return not self.rows and not self.events and not self.bad


class IndexWriter(Protocol):
    """The adapter as the projector sees it: one writer, in one process."""

    prefix: str
    """The topic prefix the index projects."""

    def positions(self) -> dict[tuple[str, int], int]:
        """Per (topic, partition), the next offset to read (none yet: absent)."""
        ...

    def load(self, saga_ids: Collection[str]) -> dict[str, SagaState]:
        """The indexed states of those sagas that the index holds."""
        ...

    def write(self, change: Change) -> int:
        """Applies ``change`` in one transaction; returns the new `SagaIndex.generation`."""
        ...

    def reset(self) -> None:
        """Drops everything: the next projection starts from the beginning of the topics."""
        ...
