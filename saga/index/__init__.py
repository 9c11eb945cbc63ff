"""The indexed saga store: a projection of saga states that answers the CLI, the API and the
console without scanning Kafka.

`saga.index.port` is the interface (`SagaIndex` for readers, `IndexWriter` for the projector),
`saga.index.sqlite` the default adapter (`SqliteSagaIndex`), `saga.index.projector` what
keeps it up to date (`Projector`, `run_projector`, `rebuild_index`) and `saga.index.query`
what a query means (`matches`, the reference the adapters agree with).
"""

from __future__ import annotations

from saga.index.port import (
    BadRecord,
    Change,
    HistoryEntry,
    IndexLag,
    IndexWriter,
    Page,
    SagaIndex,
    SagaQuery,
    SagaRow,
)
from saga.index.projector import Projector, ProjectorStats, rebuild_index, run_projector
from saga.index.query import CursorError, matches
from saga.index.sqlite import IndexInfo, SqliteSagaIndex

__all__ = [
    "BadRecord",
    "Change",
    "CursorError",
    "HistoryEntry",
    "IndexInfo",
    "IndexLag",
    "IndexWriter",
    "Page",
    "Projector",
    "ProjectorStats",
    "SagaIndex",
    "SagaQuery",
    "SagaRow",
    "SqliteSagaIndex",
    "matches",
    "rebuild_index",
    "run_projector",
]
