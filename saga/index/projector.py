"""The projector: tails a prefix's snapshots and log topics into a saga index.

Theory of operation
-------------------
The projector joins no consumer group (like ``saga watch``: it needs every partition and no
share of anyone's work). It keeps one `Tail` per topic open (`Transport.tail`: one consumer on
Kafka, assigned every partition of the topic and started from the positions the index stored),
and a follower task per tail applies each batch the tail returns (up to ``batch`` records) to
the index as soon as it lands, in one transaction together with the tail's positions after it.
So it resumes where the last committed batch stopped, and a record is applied at most once per
position; applying one again (a replay after a crash between Kafka and SQLite, or a rebuild over
rows) changes nothing either, because a state replaces the indexed one only if its ``seq`` is
greater, and an event is recorded once per ``(saga id, seq)``. The positions are the tail's,
not the last record's plus one: on Kafka they move past transaction markers and aborted
records, so that a caught-up index is at the log's end exactly.

The states come from both topics, whichever is further: a snapshot replaces the indexed state
if its ``seq`` is greater, and a log event newer than the indexed state is folded into it
(`saga.core.state.evolve`); older ones are history only. Following both side by side is safe
for that reason: a saga whose first events were deleted from the log by retention still gets
its state from its snapshot, and events after the snapshot are folded in. Every event also goes
into the history. A snapshot tombstone (the coordinator's retention dropping a finished saga)
does not delete the saga from the index: the index is where finished sagas stay visible.

A record that cannot be used (undecodable, an event that does not follow its saga's state, a
sealed value the codec could not open) is recorded as a `BadRecord` and passed over: it is
counted and shown by ``saga index status``, and never stops the projector. A sealed record
that could not be opened is still used (its state, sealed fields and all): its status is worth
having.

Passes and lag: a *pass* (`Projector.catch_up`) asks the tails for their end offsets (the last
stable offsets: what ``read_committed`` can reach), stores the log's as the ends the lag is
measured against, and waits until the followers' positions reach them; then it records the
look (``looked_at``). While running, a pass is made every ``interval``: it costs two offset
requests and, when idle, one small write; the records themselves never wait for it. So the lag
is the true distance to the log's end as of the last look, and a catch-up counts it down from
its first look.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from anyio.abc import TaskStatus
from pydantic import ValidationError

from saga.core.codec import ENGINE_LIMITS, decode
from saga.core.messages import (
    Checkpoint,
    EventBase,
    SagaRejected,
    SagaStarted,
    event_adapter,
    snapshot_adapter,
)
from saga.core.replay import is_saga_key
from saga.core.state import SagaState, evolve
from saga.errors import ConfigurationError, DecodeError, IllegalTransition, TransportError
from saga.index.port import BadRecord, Change, HistoryEntry, IndexWriter, SagaRow
from saga.runtime.ports import (
    UNSEALED_HEADER,
    Clock,
    Record,
    SystemClock,
    Tail,
    Topics,
    Transport,
)

if TYPE_CHECKING:
    from saga.adapters.sealing import PayloadCodec

__all__ = ["Projection", "Projector", "ProjectorStats", "rebuild_index", "run_projector"]

log = logging.getLogger("saga.index")

DEFAULT_INTERVAL = 0.25
"""Seconds between passes (looks at the log's end) once caught up: how fresh the lag and the
last look are. Records do not wait for it: each batch is applied as it arrives."""

FOLLOW_WAIT = 0.1
"""Seconds a follower's poll waits for records, at most, before it looks at its tail's
positions again (they move past transaction markers without a record to show for it)."""

DEFAULT_BATCH = 2000
"""Records per transaction."""


@dataclass
class ProjectorStats:
    """What a projector has done since it started."""

    passes: int = 0
    records: int = 0
    """Records read, of both topics."""
    events: int = 0
    """Log events recorded."""
    sagas: int = 0
    """Sagas added to the index (rows created, not changed)."""
    rows_written: int = 0
    bad: int = 0
    """Records that could not be used."""
    seconds: float = 0.0
    """Time spent in passes."""
    tails: int = 0
    """Tails opened (one per topic each time the projector opens them): 2 for a projector that
    ran without losing the broker; more after reopening them."""

    @property
    def sagas_per_second(self) -> float:
        """Sagas indexed per second of passes."""
        return self.sagas / self.seconds if self.seconds > 0 else 0.0

    @property
    def records_per_second(self) -> float:
        """Records read per second of passes."""
        return self.records / self.seconds if self.seconds > 0 else 0.0


class Projection:
    """The projector's synchronous half: records in, a `Change` out (no I/O but the index's
    own reads of states it does not hold in memory).

    Args:
        index: Where the states that are not cached are loaded from.
        topics: The prefix's topic names.
        cache: How many states to keep in memory (the active sagas are folded without a read).
    """

    def __init__(self, index: IndexWriter, topics: Topics, cache: int = 20_000) -> None:
        self.index = index
        self.topics = topics
        self.cache_size = cache
        self._cache: OrderedDict[str, SagaState] = OrderedDict()
        self.created = 0
        """Sagas this projection added to the index (new rows, not changes)."""

    def _states(self, saga_ids: set[str]) -> dict[str, SagaState]:
        found = {i: self._cache[i] for i in saga_ids if i in self._cache}
        missing = saga_ids - found.keys()
        if missing:
            found |= self.index.load(missing)
        return found

    def _remember(self, state: SagaState) -> None:
        self._cache[state.saga_id] = state
        self._cache.move_to_end(state.saga_id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def snapshots(self, records: Sequence[Record], at: float) -> Change:
        """The change a batch of snapshot records makes (in offset order per partition)."""
        change = Change(at=at)
        latest: dict[str, tuple[Record, dict[str, Any]]] = {}
        if records:
            last = records[-1]
            change.positions[(last.topic, last.partition)] = last.offset + 1
        # Only the last record of each key counts (the topic is compacted for that reason): a
        # catch-up decodes one snapshot per saga and batch, not one per transaction.
        for record in {r.key: r for r in records}.values():
            if record.value is None:
                continue  # a tombstone: retention, not the saga's end (see the module doc)
            try:
                item = decode(snapshot_adapter, record.value, ENGINE_LIMITS)
            except DecodeError as exc:
                change.bad.append(_bad(record, f"undecodable snapshot: {exc}"))
                continue
            if isinstance(item, Checkpoint):
                continue  # the log's ends come from the broker (`Tail.end_offsets`)
            if not is_saga_key(record.key) or record.key != item.saga_id.encode():
                change.bad.append(_bad(record, f"a snapshot of {item.saga_id!r} under this key"))
                continue
            _unsealed(record, change)
            latest[item.saga_id] = (record, item.state)
        indexed = self._states(set(latest))
        for saga_id, (record, raw) in latest.items():
            seq = raw.get("seq")
            old = indexed.get(saga_id)
            if old is not None and isinstance(seq, int) and seq <= old.seq:
                continue
            try:
                state = SagaState.model_validate(raw)
            except ValidationError as exc:
                change.bad.append(_bad(record, f"a snapshot that is not a saga state: {exc}"))
                continue
            self._remember(state)
            if old is None:
                self.created += 1
            change.rows[saga_id] = SagaRow(state, record.partition, record.offset)
        return change

    def log(self, records: Sequence[Record], at: float) -> Change:
        """The change a batch of log records makes (in offset order per partition)."""
        change = Change(at=at)
        decoded: list[tuple[Record, EventBase]] = []
        event: EventBase
        for record in records:
            change.positions[(record.topic, record.partition)] = record.offset + 1
            try:
                if record.value is None:
                    raise DecodeError("empty", "empty value (a tombstone in the log)")
                event = decode(event_adapter, record.value, ENGINE_LIMITS)
            except DecodeError as exc:
                change.bad.append(_bad(record, f"undecodable event: {exc}"))
                continue
            if record.key != event.saga_id.encode():
                change.bad.append(_bad(record, f"an event of {event.saga_id!r} under this key"))
                continue
            _unsealed(record, change)
            decoded.append((record, event))
        states = self._states({e.saga_id for _, e in decoded})
        for record, event in decoded:
            change.events.append(
                (
                    event.saga_id,
                    HistoryEntry(
                        event.seq,
                        event.type,
                        event.at,
                        record.partition,
                        record.offset,
                        orjson.loads(record.value or b"{}"),
                    ),
                )
            )
            state = states.get(event.saga_id)
            if state is not None and event.seq <= state.seq:
                continue  # its snapshot holds it already
            if state is None and not isinstance(event, SagaStarted | SagaRejected):
                continue  # its start is gone from the log (retention): its snapshot will do
            try:
                new = evolve(state, event)
            except IllegalTransition as exc:
                change.bad.append(_bad(record, str(exc)))
                continue
            if state is None:
                self.created += 1
            states[event.saga_id] = new
            self._remember(new)
            change.rows[event.saga_id] = SagaRow(new, record.partition, record.offset)
        return change


def _unsealed(record: Record, change: Change) -> None:
    reason = record.header(UNSEALED_HEADER)
    if reason is not None:
        change.bad.append(_bad(record, f"sealed fields not opened ({reason}); used as they are"))


def _bad(record: Record, reason: str) -> BadRecord:
    key = record.key.decode(errors="replace") if record.key is not None else None
    return BadRecord(record.topic, record.partition, record.offset, key, reason[:2000])


class Projector:
    """Keeps an index up to date with one prefix's topics (see the module docstring).

    `run` follows the topics until cancelled. `catch_up` makes one pass; outside `run` it opens
    the tails for the pass only, unless the projector is entered (``async with projector:``),
    which keeps them open, and their followers applying, until it is left.

    Args:
        transport: The broker; give it already sealing (`saga.adapters.sealing.SealedTransport`)
            or pass ``codec``.
        index: The index to write; its ``prefix`` names the topics.
        codec: Opens sealed payloads (`saga.adapters.sealing.PayloadCodec`); ``None``: the
            records are indexed as the transport delivers them.
        interval: Seconds between passes once caught up.
        batch: Records per transaction, at most.
        clock: Where ``updated_at`` and the last look's time come from.
    """

    def __init__(
        self,
        transport: Transport,
        index: IndexWriter,
        *,
        codec: PayloadCodec | None = None,
        interval: float = DEFAULT_INTERVAL,
        batch: int = DEFAULT_BATCH,
        clock: Clock | None = None,
    ) -> None:
        if codec is not None:
            from saga.adapters.sealing import SealedTransport

            transport = SealedTransport(transport, codec)
        self.transport = transport
        self.index = index
        self.topics = Topics(index.prefix)
        self.interval = interval
        self.batch = max(1, batch)
        self.clock = clock or SystemClock()
        self.stats = ProjectorStats()
        self.projection = Projection(index, self.topics)
        self._positions: dict[tuple[str, int], int] | None = None
        self._generation: int | None = None
        self._changed = anyio.Event()
        self._advanced = anyio.Event()  # set (and renewed) whenever the positions move
        self._writing = anyio.Lock()  # one writer: the projection's cache, then the index
        self._opening = anyio.Lock()
        self._tails: dict[str, Tail] | None = None  # while the tails are open
        self._entered: list[AbstractAsyncContextManager[None]] = []

    @property
    def generation(self) -> int:
        """The index's generation as this projector last wrote it (0 before it started)."""
        return self._generation or 0

    async def changed(self, after: int, timeout: float | None = None) -> int:
        """Waits until the generation is past ``after`` (or ``timeout`` seconds passed) and
        returns it: the console's live updates wait on this. It moves as soon as a batch that
        changed something was applied."""
        with anyio.move_on_after(timeout):
            while self.generation <= after:
                await self._changed.wait()
        return self.generation

    async def __aenter__(self) -> Projector:
        """Opens the tails and starts following them (the index is applied to as records
        come) until the projector is left."""
        following = self._following()
        await following.__aenter__()
        self._entered.append(following)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Stops following and closes the tails."""
        return await self._entered.pop().__aexit__(kind, exc, tb)

    async def _write(self, change: Change) -> None:
        """Writes ``change`` (the caller holds ``_writing``)."""
        generation = await anyio.to_thread.run_sync(self.index.write, change)
        assert self._positions is not None
        if change.positions:
            self._positions.update(change.positions)
            self._advanced.set()
            self._advanced = anyio.Event()
        self.stats.bad += len(change.bad)
        self.stats.events += len(change.events)
        self.stats.rows_written += len(change.rows)
        self.stats.sagas = self.projection.created
        if generation != self._generation:
            self._generation = generation
            self._changed.set()
            self._changed = anyio.Event()

    async def _load(self) -> None:
        if self._positions is None:
            self._positions = await anyio.to_thread.run_sync(self.index.positions)
            self._generation = await anyio.to_thread.run_sync(self.index.write, Change())

    @asynccontextmanager
    async def _following(self) -> AsyncIterator[None]:
        """The tails open and their followers running, for as long as it is held (held already,
        by `run` or ``async with``: nothing more is opened). A follower's failure cancels the
        holder and is raised from here."""
        await self._opening.acquire()
        if self._tails is not None:
            self._opening.release()
            yield
            return
        held = False
        try:
            await self._load()
            assert self._positions is not None
            async with AsyncExitStack() as stack:
                tails: dict[str, Tail] = {}
                for topic in (self.topics.snapshots, self.topics.log):
                    count = await self.transport.partitions(topic)
                    starts = {p: self._positions.get((topic, p), 0) for p in range(count)}
                    tails[topic] = await stack.enter_async_context(
                        self.transport.tail(topic, starts)
                    )
                    self.stats.tails += 1
                async with anyio.create_task_group() as tg:
                    for topic, tail in tails.items():
                        tg.start_soon(self._follow, topic, tail)
                    self._tails = tails
                    self._opening.release()
                    held = True
                    try:
                        yield
                    finally:
                        self._tails = None
                        self._advanced.set()  # a pass waiting on these tails: they are gone
                        self._advanced = anyio.Event()
                        tg.cancel_scope.cancel()
        finally:
            if not held:
                self._opening.release()

    async def _follow(self, topic: str, tail: Tail) -> None:
        """Applies each batch ``tail`` returns, with the tail's positions after it."""
        project = self.projection.log if topic == self.topics.log else self.projection.snapshots
        wait = min(self.interval, FOLLOW_WAIT)
        while True:
            records = await tail.poll(wait, self.batch)
            at = await tail.positions()
            assert self._positions is not None
            moved = {(topic, p): o for p, o in at.items() if self._positions.get((topic, p)) != o}
            if not records and not moved:
                continue
            # One batch at a time, of either topic: the projection's cache and the index's
            # writer are not for two threads at once.
            async with self._writing:
                if records:
                    self.stats.records += len(records)
                    change = await anyio.to_thread.run_sync(project, records, self.clock.now())
                else:
                    change = Change()  # only markers passed over: the positions move anyway
                change.positions.update(moved)
                await self._write(change)

    def _reached(self, ends: dict[str, dict[int, int]]) -> bool:
        assert self._positions is not None
        return all(
            self._positions.get((topic, p), 0) >= end
            for topic, partitions in ends.items()
            for p, end in partitions.items()
        )

    async def catch_up(self) -> ProjectorStats:
        """One pass: the end offsets of every partition of the snapshots and the log, as of
        now, reached and applied (and the log's recorded as the ends the lag is measured
        against). Returns the running totals."""
        began = anyio.current_time()
        async with self._following():
            tails = self._tails
            assert tails is not None
            ends = {topic: await tail.end_offsets() for topic, tail in tails.items()}
            log_ends = ends[self.topics.log]
            if not self._reached(ends):
                # The lag, at once: during a long catch-up it counts down from here.
                async with self._writing:
                    await self._write(Change(log_ends=log_ends))
                while not self._reached(ends):
                    await self._advanced.wait()
                    if self._tails is not tails:
                        # Held by `run`, whose tails closed: the broker failed, or it stopped.
                        raise TransportError("saga index: the tails closed during a pass")
            async with self._writing:
                await self._write(Change(log_ends=log_ends, at=self.clock.now(), caught_up=True))
        self.stats.passes += 1
        self.stats.seconds += anyio.current_time() - began
        return self.stats

    async def run(self, *, task_status: TaskStatus[Projector] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follows the topics forever, with a pass every ``interval``; reports started (with
        itself) once the first pass has caught up.

        When the broker fails (an outage: `TransportError` with ``retriable``, from a tail or a
        pass) the tails are closed and opened again, every few seconds at most, so that a
        broker restart does not stop the process the projector runs in (``saga serve``); the
        index just falls behind, and its last look ages. Any other error propagates, as does
        any error before the first pass caught up.
        """
        started = False
        pause = self.interval
        while True:
            try:
                async with self._following():
                    while True:
                        await self.catch_up()
                        if not started:
                            task_status.started(self)
                            started = True
                        pause = self.interval
                        await anyio.sleep(self.interval)
            except Exception as exc:  # the followers' task group wraps what they raise
                if not started or not _retriable(exc):
                    raise
                pause = min(max(pause * 2, 0.5), 5.0)
                log.warning(
                    "saga index: the broker failed (%s); opening the tails again in %.1f s",
                    exc,
                    pause,
                )
            await anyio.sleep(pause)


def _retriable(exc: BaseException) -> bool:
    """Whether ``exc`` is a retriable `TransportError`, or a group of nothing but those."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_retriable(e) for e in exc.exceptions)
    return isinstance(exc, TransportError) and exc.retriable


async def run_projector(
    transport: Transport,
    prefix: str,
    index: IndexWriter,
    *,
    codec: PayloadCodec | None = None,
    interval: float = DEFAULT_INTERVAL,
    task_status: TaskStatus[Projector] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Runs a `Projector` until cancelled: ``projector = await tg.start(run_projector, ...)``
    returns once the index has caught up with the log, with the projector (for `changed`).

    Raises:
        ConfigurationError: ``index`` projects another prefix.
    """
    if index.prefix != prefix:
        raise ConfigurationError(f"the saga index projects prefix {index.prefix!r}, not {prefix!r}")
    projector = Projector(transport, index, codec=codec, interval=interval)
    await projector.run(task_status=task_status)


async def rebuild_index(
    transport: Transport,
    index: IndexWriter,
    *,
    codec: PayloadCodec | None = None,
    batch: int = DEFAULT_BATCH,
) -> ProjectorStats:
    """Drops the index and projects the topics again from their beginning (one pass)."""
    await anyio.to_thread.run_sync(index.reset)
    projector = Projector(transport, index, codec=codec, batch=batch)
    return await projector.catch_up()
