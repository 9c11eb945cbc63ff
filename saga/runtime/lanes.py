"""Pipelining: each owned partition commits on its own while the coordinator keeps polling.

A Kafka transaction costs several round trips to the broker (AddPartitions, Produce,
AddOffsets, TxnOffsetCommit, EndTxn). A loop that polls, commits one transaction per partition
and waits for all of them before it polls again leaves the broker and the coordinator idle for
most of each round. Instead, every owned partition has a `Lane`: the poll loop appends what it
polled to the lane's pending records and goes on polling; the lane's worker takes everything
pending (up to a batch), stages it and commits it, and takes what arrived meanwhile as its next
transaction. Under load a transaction thus carries whatever arrived during the previous one
(group commit); at light load a record waits for at most the one transaction in progress on its
partition.

What does not change: one partition has at most one transaction in flight, its inputs are
staged in the order they were polled, and its state in memory changes only after its commit.
Pending records are not consumed until their transaction commits their offsets, so dropping
them (a revoked or lost partition) loses nothing: the partition's next owner, or this one after
it took the partition over again, reads them from the committed offsets.

The poll loop stops polling while more than ``max_pending`` records wait in all lanes
together: memory stays bounded when the broker is slower than the input.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import anyio

from saga.runtime.ports import Record

__all__ = ["Lane", "Lanes"]


class Lane:
    """One partition's pending inputs, and the lock held while its transaction is staged and
    committed (a revocation waits for it)."""

    def __init__(self) -> None:
        self.pending: deque[Record] = deque()
        self.lock = anyio.Lock()
        self.busy = False
        """Whether a worker is draining the lane (the poll loop starts one only if not)."""


class Lanes:
    """The lanes of the owned partitions, with a bound on the records pending in all of them.

    Args:
        max_pending: The poll loop waits (`room`) while more records than this are pending.
    """

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self._lanes: dict[int, Lane] = {}
        self._pending = 0
        self._room = anyio.Event()
        self._room.set()

    def __getitem__(self, partition: int) -> Lane:
        lane = self._lanes.get(partition)
        if lane is None:
            lane = self._lanes[partition] = Lane()
        return lane

    @property
    def pending(self) -> int:
        """Records pending in all lanes."""
        return self._pending

    def add(self, partition: int, records: Iterable[Record]) -> None:
        """Appends polled records to the partition's lane."""
        lane = self[partition]
        before = len(lane.pending)
        lane.pending.extend(records)
        self._changed(len(lane.pending) - before)

    def take(self, partition: int, limit: int) -> list[Record]:
        """Removes and returns up to ``limit`` of the partition's oldest pending records."""
        pending = self[partition].pending
        taken = [pending.popleft() for _ in range(min(limit, len(pending)))]
        self._changed(-len(taken))
        return taken

    def put_back(self, partition: int, records: list[Record]) -> None:
        """Returns taken records to the front of the lane, in their order."""
        self[partition].pending.extendleft(reversed(records))
        self._changed(len(records))

    def clear(self, partition: int) -> None:
        """Forgets the partition's pending records (it was dropped: they are read again from
        the committed offsets by whoever owns it next)."""
        lane = self._lanes.get(partition)
        if lane is not None:
            dropped = len(lane.pending)
            lane.pending.clear()
            self._changed(-dropped)

    async def room(self) -> None:
        """Waits until fewer than ``max_pending`` records are pending."""
        await self._room.wait()

    def _changed(self, delta: int) -> None:
        self._pending += delta
        if self._pending >= self.max_pending:
            if self._room.is_set():
                self._room = anyio.Event()
        elif not self._room.is_set():
            self._room.set()
