"""How long a finished saga stays in a coordinator's memory, and in the snapshots topic.

A coordinator needs a saga's state while the saga can still change. Once a saga has ended for
good (completed, compensated; not stuck, which waits for an operator) its state is needed only
to answer the rare request about it (a duplicate start, a late cancel), and to answer `status`.
So, by a `Retention` policy:

- ``evict_after`` seconds after it ended, a finished saga leaves memory. Its snapshot stays in
  the snapshots topic, so `status` still answers (from the topic), and the coordinator keeps
  only its id and end time: a late reply for it is ignored, and a request for it reloads its
  state from the snapshots first.
- ``tombstone_after`` seconds after it ended, its snapshot is tombstoned (a null value under
  its key: compaction then removes it), and the coordinator forgets it. Its history stays in
  the log for the log's retention, for `saga replay` and `saga rebuild`; a start with the same
  id after that begins a new saga.

Memory then holds the sagas in flight, the stuck ones, and the finished ones of the last
``evict_after`` seconds in full, plus an id and a time for those of the last
``tombstone_after`` seconds; and the snapshots topic, which recovery reads, holds the sagas of
the last ``tombstone_after`` seconds rather than every saga that ever ran.
"""

from __future__ import annotations

import heapq
from collections.abc import Container, MutableMapping
from dataclasses import dataclass

from saga.core.state import SagaState, SagaStatus
from saga.errors import UsageError

__all__ = ["Retained", "Retention"]

_ENDED_FOR_GOOD = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED})


@dataclass(frozen=True, slots=True)
class Retention:
    """How long finished sagas are kept (see the module docstring).

    Attributes:
        evict_after: Seconds a finished saga stays in memory after it ended.
        tombstone_after: Seconds after it ended that its snapshot is tombstoned; ``None``: never.
    """

    evict_after: float = 300.0
    tombstone_after: float | None = 7 * 86_400.0

    def __post_init__(self) -> None:
        if not self.evict_after >= 0:
            raise UsageError(f"evict_after must be 0 or more seconds, not {self.evict_after}")
        if self.tombstone_after is not None and not self.tombstone_after >= self.evict_after:
            raise UsageError(
                f"tombstone_after ({self.tombstone_after}) must not be shorter than evict_after "
                f"({self.evict_after}): a saga's snapshot must outlive its state in memory"
            )


class Retained:
    """One partition's finished sagas: when each leaves memory, and when its snapshot goes.

    Args:
        policy: The retention policy.
    """

    def __init__(self, policy: Retention) -> None:
        self.policy = policy
        self.evicted: dict[str, float] = {}
        """Sagas out of memory whose snapshot still stands: id -> when it ended."""
        self._to_evict: list[tuple[float, str]] = []
        self._to_tombstone: list[tuple[float, str]] = []

    def track(self, state: SagaState) -> None:
        """Notes a saga that has just ended for good (other states are ignored)."""
        if state.status in _ENDED_FOR_GOOD and state.finished_at is not None:
            heapq.heappush(self._to_evict, (state.finished_at, state.saga_id))

    def next_due(self) -> float | None:
        """When the next eviction or tombstone is due (possibly stale), if any."""
        due = [f + self.policy.evict_after for f, _ in self._to_evict[:1]]
        if self.policy.tombstone_after is not None:
            due += [f + self.policy.tombstone_after for f, _ in self._to_tombstone[:1]]
        return min(due, default=None)

    def evict(
        self,
        now: float,
        states: MutableMapping[str, SagaState],
        keep: Container[str] = (),
    ) -> int:
        """Moves the finished sagas due out of ``states``, except those in ``keep`` (changed by
        a transaction not yet committed); returns how many left."""
        gone = 0
        limit = now - self.policy.evict_after
        while self._to_evict and self._to_evict[0][0] <= limit:
            finished_at, saga_id = heapq.heappop(self._to_evict)
            state = states.get(saga_id)
            # A saga re-driven or reloaded since has a newer entry; this one is stale.
            if state is None or state.finished_at != finished_at:
                continue
            if state.status not in _ENDED_FOR_GOOD:
                continue
            if saga_id in keep:
                heapq.heappush(self._to_evict, (finished_at, saga_id))  # next time
                break
            del states[saga_id]
            self.evicted[saga_id] = finished_at
            gone += 1
            if self.policy.tombstone_after is not None:
                heapq.heappush(self._to_tombstone, (finished_at, saga_id))
        return gone

    def tombstones(self, now: float) -> list[str]:
        """The evicted sagas whose snapshots are due to be tombstoned now; forgets them."""
        if self.policy.tombstone_after is None:
            return []
        found: list[str] = []
        limit = now - self.policy.tombstone_after
        while self._to_tombstone and self._to_tombstone[0][0] <= limit:
            finished_at, saga_id = heapq.heappop(self._to_tombstone)
            if self.evicted.get(saga_id) == finished_at:
                del self.evicted[saga_id]
                found.append(saga_id)
        return found

    def restore(self, state: SagaState) -> None:
        """A saga reloaded into memory from its snapshot: it is no longer evicted."""
        self.evicted.pop(state.saga_id, None)
        self.track(state)
