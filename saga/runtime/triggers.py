"""`TriggerRelay`: turns the events of services' own topics into saga start requests.

Theory of operation
-------------------
The relays form one consumer group, ``<prefix>.triggers``, over every topic a saga's trigger
(`saga.core.triggers.Trigger`) subscribes to. For each source partition it owns, a relay holds a
transactional producer (transactional id ``<prefix>.triggers.<topic>.<partition>``), opened when
the partition is assigned, which fences a previous owner, and closed when it is revoked.

Each polled batch becomes **one transaction per source partition**: the start requests to the
requests topic (keyed by saga id, signed when the relay signs), the dead letters of the events
that cannot start their saga (with the source topic, partition and offset), and the source
offsets. So an event is either started from and consumed, or neither; and since the saga id and
the request's message id are derived from the event, a start that is read again (the relay died
after its commit reached the broker but before it knew) is the same request, which the
coordinator keeps once.

Failures. A transaction that fails rewinds its partition to the committed offset and tries
again after a capped backoff; one that keeps failing with the same events is split down to one
event, and one event whose transaction still fails is dead-lettered alone
(`saga.runtime.splitting.Trouble`), so that nothing stops the rest. A fenced producer means
another relay owns the partition now: it is dropped, and taken again if the group still assigns
it here. A broker that cannot be reached is waited for; only an error retrying cannot help
(``TransportError.retriable`` false, such as `saga.errors.Unauthorized`) ends the run.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus

from saga.core.codec import DEFAULT_LIMITS, Limits, encode
from saga.core.definition import SagaDefinition
from saga.core.messages import StartSaga
from saga.core.triggers import Refused, Subscription, Trigger, problems, start_for
from saga.errors import Fenced, TransportError, Unauthorized, UsageError
from saga.runtime.dlq import DeadLetter
from saga.runtime.observe import NullObserver, Observer
from saga.runtime.ports import (
    UNSEALED_HEADER,
    Clock,
    Consumer,
    Outgoing,
    Record,
    SystemClock,
    TopicPartition,
    Topics,
    Transport,
    TxProducer,
)
from saga.runtime.splitting import Trouble

__all__ = ["RelayStats", "TriggerRelay", "subscriptions"]

log = logging.getLogger("saga.triggers")

Sign = Callable[[Outgoing], Outgoing]
"""Seals and signs a record (`saga.runtime.gate.CoordinatorGate.sign`)."""


def subscriptions(definitions: Iterable[SagaDefinition]) -> list[Subscription]:
    """The triggers of the latest version of each saga name among ``definitions``.

    Older versions' triggers are not consumed: a new saga always starts on the latest version.
    """
    latest: dict[str, SagaDefinition] = {}
    for d in definitions:
        if d.name not in latest or d.version > latest[d.name].version:
            latest[d.name] = d
    found: list[Subscription] = []
    for name in sorted(latest):
        found += [Subscription(name, t) for t in latest[name].triggers]
    return found


@dataclass
class RelayStats:
    """What this relay committed since it started (counted after each commit)."""

    records: int = 0
    """Source events consumed."""
    started: int = 0
    """Start requests written."""
    skipped: int = 0
    """Events a trigger's condition passed over (or tombstones)."""
    dead_letters: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    transactions: int = 0
    failed_transactions: int = 0
    fenced: int = 0


@dataclass
class _Staged:
    records: list[Outgoing] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    started: int = 0
    skipped: int = 0


class TriggerRelay:
    """Starts sagas from the events on their trigger topics (see the module docstring).

    Run it next to the coordinators (a coordinator is meant to start one), as many as you
    like: the group shares the source partitions among them.

    Args:
        transport: The broker.
        subscribed: The triggers to serve (`subscriptions` of the definitions).
        prefix: The engine's topic prefix.
        partitions: Partition count if the relay creates the requests or dead-letter topic
            (it must match the coordinators').
        clock: Time source for the requests' ``at``.
        sign: Seals and signs each start request; required where the coordinators verify
            requests (give the coordinator's ``gate.sign``: its principal may start any saga).
        observer: Gives each request its headers (trace context), and is told of dead letters.
        batch_size: Most records polled at once.
        limits: The bounds the coordinators read requests with (an event whose start would
            break them is dead-lettered here, with its source offset).
        max_record_bytes: Largest start request written (like the coordinator's); a larger one
            is dead-lettered (``too_large``).

    Raises:
        UsageError: A trigger breaks a rule (`saga.core.triggers.problems`).
    """

    poll_timeout = 0.5
    backoff_initial = 0.1
    backoff_cap = 5.0

    def __init__(
        self,
        transport: Transport,
        subscribed: Iterable[Subscription],
        *,
        prefix: str = "saga",
        partitions: int = 6,
        clock: Clock | None = None,
        sign: Sign | None = None,
        observer: Observer | None = None,
        batch_size: int = 500,
        limits: Limits = DEFAULT_LIMITS,
        max_record_bytes: int = 1_000_000,
    ) -> None:
        self.transport = transport
        self.topics = Topics(prefix)
        self.partitions = partitions
        self.clock = clock or SystemClock()
        self.sign = sign
        self.observer: Observer = observer or NullObserver()
        self.batch_size = batch_size
        self.limits = limits
        self.max_record_bytes = max_record_bytes
        self.stats = RelayStats()
        self._by_topic: dict[str, list[Subscription]] = defaultdict(list)
        by_saga: dict[str, list[Trigger]] = defaultdict(list)
        for s in subscribed:
            self._by_topic[s.trigger.topic].append(s)
            by_saga[s.saga].append(s.trigger)
        found = [m for saga, ts in by_saga.items() for m in problems(saga, ts, (), ())]
        engine = [t for t in self._by_topic if t.startswith(f"{prefix}.")]
        found += [
            f"trigger on {t!r}: a trigger topic cannot be one of the engine's" for t in engine
        ]
        if found:
            raise UsageError("; ".join(found))
        self._producers: dict[TopicPartition, tuple[TxProducer, AsyncExitStack]] = {}
        self._lost: dict[TopicPartition, float] = {}
        """Partitions to take (back) once their producer can be opened, and from when on."""
        self._trouble: dict[TopicPartition, Trouble] = {}
        self._delay: dict[TopicPartition, float] = {}
        self._lock = anyio.Lock()

    @property
    def group(self) -> str:
        """The relays' consumer group."""
        return f"{self.topics.prefix}.triggers"

    @property
    def sources(self) -> list[str]:
        """The topics consumed."""
        return sorted(self._by_topic)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serves until cancelled (with nothing subscribed, it only waits)."""
        if not self._by_topic:
            task_status.started()
            await anyio.sleep_forever()
        t = self.topics
        started = False
        delay = self.backoff_initial
        while True:
            try:
                await self.transport.ensure_topics([t.requests, t.dlq], self.partitions)
                async with self.transport.consumer(self.group, self.sources, self) as consumer:
                    if not started:
                        started = True
                        task_status.started()
                    delay = self.backoff_initial
                    await self._consume(consumer)
            except TransportError as exc:
                if not exc.retriable:
                    raise
                log.warning("trigger relay: the broker is away (%s); retrying in %.1fs", exc, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, self.backoff_cap)
            finally:
                with anyio.CancelScope(shield=True):
                    for tp in list(self._producers):
                        await self._drop(tp)
                    self._lost.clear()

    async def _consume(self, consumer: Consumer) -> None:
        while True:
            # A partition to take back is not kept waiting for records of the others.
            timeout = self.poll_timeout
            if self._lost:
                soonest = min(self._lost.values()) - anyio.current_time()
                timeout = min(timeout, max(0.0, soonest))
            records = await consumer.poll(timeout, self.batch_size)
            async with self._lock:
                await self._reacquire_lost(consumer)
                by_tp: dict[TopicPartition, list[Record]] = defaultdict(list)
                for r in records:
                    by_tp[(r.topic, r.partition)].append(r)
                for tp in sorted(by_tp):
                    if tp in self._producers:  # else lost: read again once taken back
                        await self._relay(tp, by_tp[tp], consumer)

    # -- rebalancing -------------------------------------------------------------------------

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        """Closes the producers of revoked partitions."""
        async with self._lock:
            for tp in partitions:
                self._lost.pop(tp, None)
                await self._drop(tp)

    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        """Opens a producer for each newly assigned partition, fencing its previous owner."""
        async with self._lock:
            for tp in sorted(partitions):
                if tp not in self._producers:
                    await self._acquire(tp)

    async def _acquire(self, tp: TopicPartition) -> bool:
        stack = AsyncExitStack()
        tid = f"{self.group}.{tp[0]}.{tp[1]}"
        try:
            producer = await stack.enter_async_context(self.transport.tx_producer(tid))
        except TransportError as exc:
            await stack.aclose()
            if isinstance(exc, Unauthorized):
                raise  # no retry can help
            delay = self._lose(tp, wait=True)
            log.warning(
                "trigger relay: could not take %s/%d (%s); trying again in %.1fs", *tp, exc, delay
            )
            return False
        self._producers[tp] = (producer, stack)
        return True

    async def _drop(self, tp: TopicPartition) -> None:
        entry = self._producers.pop(tp, None)
        if entry is not None:
            await entry[1].aclose()

    async def _reacquire_lost(self, consumer: Consumer) -> None:
        assignment = consumer.assignment()
        now = anyio.current_time()
        for tp, due in sorted(self._lost.items()):
            if due > now:
                continue
            del self._lost[tp]
            if tp not in assignment or tp in self._producers:
                continue
            if await self._acquire(tp):
                # Records of tp polled while it was lost were passed over: read them again.
                try:
                    await consumer.seek_to_committed(frozenset({tp}))
                except TransportError:
                    await self._drop(tp)
                    self._lose(tp, wait=True)

    def _lose(self, tp: TopicPartition, *, wait: bool) -> float:
        """Marks ``tp`` to be taken back, after a backoff that grows while it keeps failing;
        returns the backoff."""
        delay = self._delay.get(tp, self.backoff_initial) if wait else 0.0
        if wait:
            self._delay[tp] = min(delay * 2, self.backoff_cap)
        self._lost[tp] = anyio.current_time() + delay
        return delay

    # -- one partition's batch ---------------------------------------------------------------

    async def _relay(self, tp: TopicPartition, records: list[Record], consumer: Consumer) -> None:
        producer = self._producers[tp][0]
        trouble = self._trouble.get(tp)
        rest: list[Record] = []
        if trouble is not None and len(records) > trouble.limit:
            records, rest = records[: trouble.limit], records[trouble.limit :]
        if trouble is not None and trouble.exhausted:
            records, rest = records[:1], records[1:] + rest
            detail = f"its transactions kept failing: {trouble.error}"
            staged = _Staged(dead=[DeadLetter(records[0], "transaction_failed", detail)])
            staged.records = [staged.dead[0].outgoing(self.topics.dlq)]
        else:
            staged = self._stage(records)
        offsets = {tp: records[-1].offset + 1}
        try:
            await producer.commit(staged.records, offsets, self.group)
        except Fenced:
            self.stats.fenced += 1
            log.warning("trigger relay: %s/%d was taken over by another relay; dropping it", *tp)
            await self._drop(tp)
            self._lose(tp, wait=False)
            return
        except Unauthorized:
            raise  # the broker refuses this principal a right: no retry can help
        except TransportError as exc:
            # Whatever else (retriable or not: a record the broker will not take), the batch is
            # tried again, split, and its event at fault set aside in the end.
            self.stats.failed_transactions += 1
            self._trouble.setdefault(tp, Trouble(records + rest)).failed(len(records), exc)
            # A producer whose transaction failed may be unusable: start afresh, from the
            # committed offset.
            await self._drop(tp)
            delay = self._lose(tp, wait=True)
            log.warning(
                "trigger relay: transaction for %s/%d failed (%s); retrying in %.1fs",
                *tp,
                exc,
                delay,
            )
            return
        self._delay.pop(tp, None)
        if trouble is not None and trouble.passed(offsets):
            del self._trouble[tp]
        if rest:
            try:  # the records left out come again, in small batches while in trouble
                await consumer.seek_to_committed(frozenset({tp}))
            except TransportError:
                await self._drop(tp)
                self._lose(tp, wait=True)
        self._count(records, staged)

    def _stage(self, records: Sequence[Record]) -> _Staged:
        staged = _Staged()
        now = self.clock.now()
        for r in records:
            if (why := r.header(UNSEALED_HEADER)) is not None:
                self._dead(staged, DeadLetter(r, "unsealable", why))
                continue
            for sub in self._by_topic.get(r.topic, ()):
                found = start_for(
                    sub.trigger,
                    sub.saga,
                    r.topic,
                    r.partition,
                    r.offset,
                    r.value,
                    now,
                    key=r.key,
                    timestamp=r.timestamp,
                    limits=self.limits,
                )
                if isinstance(found, StartSaga):
                    out = self._request(found)
                    if (size := _size(out)) > self.max_record_bytes:
                        detail = f"saga {sub.saga!r}: the start request would be {size} bytes"
                        self._dead(staged, DeadLetter(r, "too_large", detail))
                        continue
                    staged.records.append(out)
                    staged.started += 1
                elif isinstance(found, Refused):
                    detail = f"saga {sub.saga!r}: {found.detail}"
                    self._dead(staged, DeadLetter(r, found.reason, detail))
                else:
                    staged.skipped += 1
                    log.debug(
                        "trigger of %s skipped %s/%d/%d: %s",
                        sub.saga,
                        r.topic,
                        r.partition,
                        r.offset,
                        found.detail,
                    )
        return staged

    def _request(self, start: StartSaga) -> Outgoing:
        headers = self.observer.headers(start)
        out = Outgoing(self.topics.requests, start.saga_id.encode(), encode(start), headers)
        return self.sign(out) if self.sign is not None else out

    def _dead(self, staged: _Staged, dead: DeadLetter) -> None:
        staged.dead.append(dead)
        staged.records.append(dead.outgoing(self.topics.dlq))

    def _count(self, records: Sequence[Record], staged: _Staged) -> None:
        s = self.stats
        s.transactions += 1
        s.records += len(records)
        s.started += staged.started
        s.skipped += staged.skipped
        for d in staged.dead:  # counted and logged once written: a retry would count twice
            d.log()
            s.dead_letters[d.reason] += 1
            self.observer.dead_lettered(d.source_topic, d.reason)


def _size(record: Outgoing) -> int:
    headers = sum(len(k) + len(v) for k, v in record.headers)
    return len(record.key or b"") + len(record.value or b"") + headers
