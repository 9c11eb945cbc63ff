"""Commands in flight at a participant: polling on while handlers run, each saga's commands in
order, offsets committed only as far as everything before them finished, a graceful stop.

Theory of operation
-------------------
`InFlight.serve` runs these side by side until it is cancelled:

- The *poller* takes records from the consumer and puts each in its saga's *lane*, so polling
  goes on while handlers run: a slow handler holds up its own saga, not the service. It stops
  taking records while ``max_in_flight`` of them are unfinished (back pressure, so memory stays
  bounded).
- The *lanes*, one per record key (a command's key is its saga id) while the key has records
  in hand, hold their records in the order polled, which is offset order (a saga's commands
  share a partition). A lane with records is, at any time, in exactly one place: the *ready*
  queue, a worker's hands, or the sender's; so the records of one lane are handled, and
  replied to, one after the other, in order, and the next one is taken only once the reply to
  the one before it is written.
- The *workers*, a fixed pool of ``concurrency`` tasks (the participant's), take the
  lane at the head of the ready queue and handle its first record (`Handle`: decide what to
  write); so at most ``workers`` records are handled at once, of different sagas. A worker
  hands what to write to the sender and takes the next lane; an idle worker waits to be woken
  by the next lane that becomes ready. (A task and a capacity limiter per record used to cost
  more than a no-op handler.)
- The *sender* writes what the workers handed it, all of it in one `Send` (while one write is
  under way, what is handed meanwhile goes in the next), then finishes those records and puts
  each lane that has more records at the back of the ready queue: saga by saga, round robin.
  Writing is not a worker's job, so a slow write does not hold a handler's place.
- The *committer* commits what may be committed as soon as a record finishes (a task of its
  own, so that a commit neither waits for a poll to time out nor holds one up), and then at
  most once per ``commit_interval``: what finishes meanwhile goes in the next commit. Commits
  are off the replies' path (a reply is written before its offset is committed), and under
  load one commit per reply was the participant's largest cost (an OffsetCommit request each);
  what finished but was not committed yet when a process dies comes again, and is replayed
  from the reply store, as it always could.

Offsets. The records of one partition finish out of order, so each partition has a
`PartitionOffsets`, and the committed offset moves past a record only once that record and
every record taken before it in the partition have finished: it is the lowest unfinished
offset, or one past the highest taken when none is unfinished (offsets need not be dense:
transaction markers and compaction leave gaps). A crash then redelivers exactly the records not
known to be finished, plus finished ones behind an unfinished one, which the reply store
replays. A partition the consumer no longer owns (a rebalance) is forgotten: what is still in
flight for it finishes, but is committed by nobody here, and its next owner starts from the
committed offset.

Stopping. The workers and the sender run in a task group shielded from the caller's
cancellation. When `serve` is cancelled, the poller and the committer stop, the workers and the
sender get ``grace`` seconds to finish the work in hand (every record already polled), they
are cancelled then (a handler cut off this way has no outcome: no reply, no commit, and its
record comes again to the partition's next owner), and what finished is committed. A poll,
commit, handling or write that fails with a `TransportError` (the broker is away) stops
everything the same way, except that no record is handled or written after it (the handlers
already running finish, within the grace period, and what they lead to is dropped) and
nothing more is committed; `serve` then raises that error, and the caller rewinds to the
committed offsets and tries again: whatever was not committed comes again, and the reply store
replays what had finished.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import anyio
from anyio.abc import TaskStatus

from saga.errors import TransportError
from saga.runtime.ports import Clock, Consumer, Outgoing, Record, TopicPartition

__all__ = ["Handle", "Handled", "InFlight", "PartitionOffsets", "Send", "Taken"]

log = logging.getLogger("saga.participant")


@dataclass(frozen=True, slots=True)
class Taken:
    """A record as the participant took it from the consumer."""

    record: Record
    received: float
    """When it was polled, on the event loop's clock (`anyio.current_time`): what budgets
    count from, since that clock only moves forward."""
    received_at: float
    """When it was polled, on the participant's clock (seconds since the epoch)."""


Handled: TypeAlias = tuple[Sequence[Outgoing], Callable[[], object] | None]
"""What handling one record leads to: the records to write, and what to call once they are
written (``None``: nothing)."""

Handle: TypeAlias = Callable[[Taken], Awaitable[Handled]]
"""Handles one record: decides what to write for it, without writing it.

It may raise `TransportError` (the broker is away): the record stays unfinished."""

Send: TypeAlias = Callable[[Sequence[Outgoing]], Awaitable[None]]
"""Writes records; returns once they are written. It may raise `TransportError`."""


class PartitionOffsets:
    """The offsets of one partition taken and not yet finished, and how far to commit."""

    def __init__(self) -> None:
        # offset -> copies in hand: a rebalance that keeps the partition may rewind the
        # consumer, and a record can then be taken again while its first copy still runs.
        self._open: dict[int, int] = {}
        self._heap: list[int] = []  # the open offsets, lowest first (finished ones linger)
        self._end: int | None = None  # one past the highest offset taken

    def take(self, offset: int) -> None:
        """Notes ``offset`` as taken and unfinished."""
        if offset not in self._open:
            heapq.heappush(self._heap, offset)
        self._open[offset] = self._open.get(offset, 0) + 1
        self._end = offset + 1 if self._end is None else max(self._end, offset + 1)

    def finish(self, offset: int) -> None:
        """Notes one copy of ``offset`` as finished."""
        left = self._open[offset] - 1
        if left:
            self._open[offset] = left
        else:
            del self._open[offset]

    def commit_point(self) -> int | None:
        """The offset to commit: the lowest unfinished one, else one past the highest taken
        (``None`` before anything was taken)."""
        while self._heap and self._heap[0] not in self._open:
            heapq.heappop(self._heap)
        return self._heap[0] if self._heap else self._end


class _Lane:
    """One key's records in hand, oldest first (see the module docstring)."""

    __slots__ = ("key", "records")

    def __init__(self, key: bytes | None) -> None:
        self.key = key
        self.records: deque[tuple[Taken, PartitionOffsets]] = deque()


class InFlight:
    """One serving session of a participant's consumer (see the module docstring).

    Args:
        consumer: The group member to poll and commit.
        clock: The participant's clock (for `Taken.received_at`).
        handle: What to do with each record.
        send: Writes what handling the records led to.
        concurrency: Most records handled at once (each of a different key): the number of
            worker tasks.
        grace: Seconds the work in hand may take to finish once stopping.
        max_in_flight: Most records taken and not finished; polling pauses at this many.
        on_commit: Called after each commit that moved an offset (the broker is reachable).
        commit_interval: Least seconds between two commits (0: one after another).
    """

    def __init__(
        self,
        consumer: Consumer,
        clock: Clock,
        handle: Handle,
        send: Send,
        *,
        concurrency: int,
        grace: float,
        max_in_flight: int,
        on_commit: Callable[[], object],
        commit_interval: float = 0.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self._consumer = consumer
        self._clock = clock
        self._handle = handle
        self._send = send
        self._concurrency = concurrency
        self._grace = grace
        self._max_in_flight = max_in_flight
        self._on_commit = on_commit
        self._commit_interval = commit_interval
        self._partitions: dict[TopicPartition, PartitionOffsets] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._lanes: dict[bytes | None, _Lane] = {}
        self._ready: deque[_Lane] = deque()  # lanes with records that nobody holds
        self._idle: list[anyio.Event] = []  # set one to wake a worker waiting for a lane
        self._outbox: list[tuple[_Lane, Handled]] = []  # handled, for the sender to write
        self._sender_idle: anyio.Event | None = None  # set to wake the sender
        self._failure: TransportError | None = None
        self._stopping = anyio.Event()
        self._changed = anyio.Event()
        self._finished = False  # a record finished since the committer last looked
        self.unfinished = 0
        """Records taken and neither finished nor given up."""

    async def serve(self) -> None:
        """Polls and handles until cancelled; then finishes the work in hand within the grace
        period and commits what finished.

        Raises:
            TransportError: Polling, committing, a handling or a write failed on the broker;
                what was committed before stays committed, the rest comes again after a rewind.
        """
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self._hold)
                tg.start_soon(self._committer)
                try:
                    await self._poll()
                except TransportError as exc:
                    self._fail(exc)  # raised plain below, not in the task group's group
                finally:
                    self._stopping.set()
                    tg.cancel_scope.cancel()  # the committer; the workers are shielded
        finally:
            with anyio.CancelScope(shield=True):
                await self._final_commit()
        if self._failure is not None:
            raise self._failure

    # -- the poller --------------------------------------------------------------------------

    async def _poll(self) -> None:
        while self._failure is None:
            room = self._max_in_flight - self.unfinished
            if room <= 0:
                with anyio.move_on_after(0.5):
                    await self._wait_for_change()
                continue
            records = await self._consumer.poll(0.5, min(500, room))
            if self._failure is not None:
                return  # nobody would handle them: they come again after the rewind
            self._forget_revoked()  # the poll is where a rebalance takes effect
            received, received_at = anyio.current_time(), self._clock.now()
            for record in records:
                self._take(Taken(record, received, received_at))

    def _take(self, taken: Taken) -> None:
        record = taken.record
        tp = (record.topic, record.partition)
        offsets = self._partitions.get(tp)
        if offsets is None:
            offsets = self._partitions[tp] = PartitionOffsets()
        offsets.take(record.offset)
        self.unfinished += 1
        lane = self._lanes.get(record.key)
        if lane is None:
            lane = self._lanes[record.key] = _Lane(record.key)
            lane.records.append((taken, offsets))
            self._ready_lane(lane)
        else:  # held, queued or being written: it is looked at again once it is free
            lane.records.append((taken, offsets))

    # -- the committer -----------------------------------------------------------------------

    async def _committer(self) -> None:
        while self._failure is None:
            if not self._finished:
                await self._wait_for_change()
                continue
            self._finished = False
            try:
                await self._commit()
            except TransportError as exc:
                self._fail(exc)
            if self._commit_interval:
                await anyio.sleep(self._commit_interval)

    def _forget_revoked(self) -> None:
        owned = self._consumer.assignment()
        for tp in [tp for tp in self._partitions if tp not in owned]:
            del self._partitions[tp]
            self._committed.pop(tp, None)

    async def _commit(self) -> None:
        self._forget_revoked()  # a commit for a partition owned no more would fail
        due: dict[TopicPartition, int] = {}
        for tp, offsets in self._partitions.items():
            point = offsets.commit_point()
            # Never backwards: a rewound partition's point can drop below what was committed.
            if point is not None and point > self._committed.get(tp, -1):
                due[tp] = point
        if due:
            await self._consumer.commit(due)
            # Only what is still tracked: a partition may have been forgotten meanwhile.
            self._committed.update({tp: o for tp, o in due.items() if tp in self._partitions})
            self._on_commit()

    async def _final_commit(self) -> None:
        if self._failure is not None:
            # The broker is away: a commit would wait out its deadline before the caller can
            # back off. What finished comes again after the rewind, and is replayed.
            return
        try:
            await self._commit()
        except TransportError as exc:
            # Nothing lost: what is not committed comes again, and the reply store replays it.
            log.warning("could not commit the last finished commands: %s", exc)

    # -- the workers and the sender ----------------------------------------------------------

    async def _hold(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # Shielded: the caller's cancellation stops the poller; the work in hand gets its grace.
        with anyio.CancelScope(shield=True):
            try:
                async with anyio.create_task_group() as tg:
                    for _ in range(self._concurrency):
                        tg.start_soon(self._work)
                    tg.start_soon(self._write)
                    task_status.started()
                    await self._stopping.wait()
                    with anyio.move_on_after(self._grace):
                        while self.unfinished:
                            await self._wait_for_change()
                    tg.cancel_scope.cancel()
            finally:
                # What is left was not handled or not written (the grace period ended, or the
                # broker went away): it stays open in its partition, so it is not committed
                # and comes again.
                for lane in list(self._lanes.values()):
                    self._give_up(lane)
                self._ready.clear()
                self._outbox.clear()

    async def _work(self) -> None:
        ready, idle = self._ready, self._idle
        while True:
            if not ready:
                woken = anyio.Event()
                idle.append(woken)
                await woken.wait()
                continue
            lane = ready.popleft()
            try:
                handled = await self._handle(lane.records[0][0])
            except TransportError as exc:
                self._fail(exc)
                self._give_up(lane)
                continue
            if self._failure is not None:
                self._give_up(lane)  # nothing is written after a failure
                continue
            self._outbox.append((lane, handled))
            sender, self._sender_idle = self._sender_idle, None
            if sender is not None:
                sender.set()

    async def _write(self) -> None:
        while True:
            if not self._outbox:
                self._sender_idle = woken = anyio.Event()
                await woken.wait()
                continue
            batch, self._outbox = self._outbox, []
            written = self._failure is None
            if written:
                records = [r for _, (out, _) in batch for r in out]
                try:
                    await self._send(records)
                except TransportError as exc:
                    self._fail(exc)
                    written = False
            if not written:
                for lane, _ in batch:
                    self._give_up(lane)
                continue
            for lane, (_, then) in batch:
                if then is not None:
                    then()
                taken, offsets = lane.records.popleft()
                offsets.finish(taken.record.offset)
                self.unfinished -= 1
                if self._failure is not None:
                    self._give_up(lane)
                elif lane.records:
                    self._ready_lane(lane)  # at the back: the sagas take turns
                else:
                    del self._lanes[lane.key]
            self._finished = True
            self._notify()

    def _ready_lane(self, lane: _Lane) -> None:
        self._ready.append(lane)
        if self._idle:
            self._idle.pop().set()  # the most recently idle: its stack is the warmest

    def _give_up(self, lane: _Lane) -> None:
        """Drops ``lane``'s records unfinished: they stay open in their partitions."""
        self.unfinished -= len(lane.records)
        lane.records.clear()
        if self._lanes.get(lane.key) is lane:
            del self._lanes[lane.key]
        self._notify()

    def _fail(self, exc: TransportError) -> None:
        if self._failure is None:
            self._failure = exc
        # What nobody holds is dropped now; what a worker or the sender holds, once it is back.
        while self._ready:
            self._give_up(self._ready.popleft())
        outbox, self._outbox = self._outbox, []
        for lane, _ in outbox:
            self._give_up(lane)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _wait_for_change(self) -> None:
        await self._changed.wait()
