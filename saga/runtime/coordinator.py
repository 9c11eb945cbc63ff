"""The coordinator: the asynchronous shell around `saga.core.decide`.

Theory of operation
-------------------
Coordinators form one consumer group over the requests and replies topics. Both are keyed by
saga id and have as many partitions as the log, so the member that owns partition p of the
inputs owns everything about the sagas of partition p (DESIGN section 3).

One loop polls and hands each owned partition (`saga.runtime.partition`) its records; each
partition stages what it was handed, with the timers due now, into **one transaction of its
own**: the events to the log, the commands to the services, the snapshots of changed sagas,
dead letters, alerts, and the consumed offsets. Either all of it happens or none of it; state
in memory changes only after the commit succeeds. Partitions commit independently and the loop
polls on while they do, so what arrives during a partition's transaction joins its next one
(`saga.runtime.lanes`).

On assignment of partition p the coordinator first opens the partition's producer (which
fences a previous owner and aborts its open transaction) and then rebuilds state from the
snapshots and the log. On a failed transaction the partition's offsets are rewound and the
partition is taken over again; on being fenced, it is dropped and re-acquired from the log if
the group still assigns it here. Nothing about one saga stops the loop: the partition
dead-letters what it cannot use (see `saga.runtime.partition`).

The coordinator is also a client (`start`, `cancel`, `retry`, `resolve`, `status`, `wait`):
requests go through the requests topic like anyone's, and status is read from memory when the
saga's partition is owned here.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup, TaskStatus

from saga.core.codec import DEFAULT_LIMITS, Limits
from saga.core.definition import SagaDefinition
from saga.core.messages import Alert
from saga.core.replay import Replay, is_saga_key
from saga.core.state import SagaState
from saga.errors import Fenced, TopologyChanged, TransportError, Unauthorized
from saga.runtime.catalog import Catalog
from saga.runtime.client import SagaClient
from saga.runtime.definitions import DefinitionStore, published_digests
from saga.runtime.dlq import DeadLetter
from saga.runtime.facade import CoordinatorFacade
from saga.runtime.gate import CoordinatorGate
from saga.runtime.lanes import Lanes
from saga.runtime.observe import NullObserver, Observer
from saga.runtime.partition import Batch, OwnedPartition
from saga.runtime.ports import (
    Clock,
    Consumer,
    Record,
    SystemClock,
    TopicPartition,
    Topics,
    Transport,
)
from saga.runtime.retention import Retention
from saga.runtime.splitting import Trouble
from saga.runtime.triggers import TriggerRelay, subscriptions
from saga.runtime.trust import Trust

__all__ = ["AlertHook", "Coordinator", "CoordinatorStats"]

log = logging.getLogger("saga.coordinator")

AlertHook = Callable[[Alert], Awaitable[None]]
"""Called after an alert is committed; exceptions are logged and do not stop the coordinator."""


@dataclass
class CoordinatorStats:
    """Counters of what this coordinator committed since it started (a projection for metrics).

    Counted after each commit, so a batch retried after a failed transaction counts once.
    """

    records: int = 0
    events: int = 0
    commands: int = 0
    transactions: int = 0
    dead_letters: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    ignored: int = 0
    failed_transactions: int = 0
    fenced: int = 0
    recoveries: int = 0
    last_recovery_seconds: float = 0.0
    held: int = 0
    """Sagas whose state is in memory (after the latest commit)."""
    evicted: int = 0
    """Finished sagas that left memory (their snapshots stay)."""
    tombstoned: int = 0
    """Finished sagas whose snapshots were tombstoned."""


class Coordinator(CoordinatorFacade):
    """Runs sagas: decides, records events, sends commands, keeps time, compensates.

    Use as an async context manager to serve in the background, or ``await run()`` to serve
    until cancelled. `start`, `status`, `wait`, `cancel`, `retry` and `resolve` work in either
    case.

    Args:
        definitions: The sagas this coordinator can run. Several versions of one name may be
            given: new sagas use the highest. They are published to the definitions topic on
            start (`saga.runtime.definitions`; a different content under a published name and
            version refuses the start), and a running saga is decided with the exact
            definition it started on, from here or from that topic (see
            `saga.runtime.catalog.Catalog`).
        transport: The broker.
        prefix: Topic name prefix.
        partitions: Partition count used when creating the topics.
        clock: Time source (`saga.testing` passes a virtual clock).
        alert_hooks: Called with each alert after it is committed: a stuck saga, a request the
            policy denied, a signed message from a principal that may not send it.
        batch_size: Most records handled in one poll (and so in one transaction per partition).
        limits: Decoding bounds for incoming messages.
        observer: Told of every committed decision (tracing, metrics), and gives outgoing
            messages their headers; none by default.
        evict_after: Seconds a finished saga stays in memory after it ended (its snapshot
            stays, so `status` still answers); see `saga.runtime.retention`.
        tombstone_after: Seconds after it ended that a finished saga's snapshot is tombstoned
            (its history stays in the log); ``None``: never.
        max_record_bytes: Largest record a transaction may hold; keep it below the producer's
            ``max_request_size`` and the broker's ``message.max.bytes`` (both 1 MiB by default).
            A step output too large to keep fails the step (``OutputTooLarge``, a business
            failure); any other decision that cannot be written leaves the saga stuck.
        trust: This coordinator's signing key, the keyring and the authorization policy
            (`saga.runtime.trust.Trust`): commands are signed, replies and requests verified
            and authorized (`saga.runtime.gate`). ``None``, or `Trust.unsigned`, checks
            nothing, and the coordinator says so loudly when it starts.
    """

    def __init__(
        self,
        definitions: Iterable[SagaDefinition],
        *,
        transport: Transport,
        prefix: str = "saga",
        partitions: int = 6,
        clock: Clock | None = None,
        alert_hooks: Sequence[AlertHook] = (),
        batch_size: int = 500,
        limits: Limits = DEFAULT_LIMITS,
        observer: Observer | None = None,
        evict_after: float = 300.0,
        tombstone_after: float | None = 7 * 86_400.0,
        max_record_bytes: int = 1_000_000,
        trust: Trust | None = None,
    ) -> None:
        self.transport = transport
        self.gate = CoordinatorGate(trust, transport)
        self.max_record_bytes = max_record_bytes
        self.retention = Retention(evict_after, tombstone_after)
        self.topics = Topics(prefix)
        self.partition_count = partitions
        self.clock = clock or SystemClock()
        self.alert_hooks = list(alert_hooks)
        self.batch_size = batch_size
        self.limits = limits
        self.stats = CoordinatorStats()
        self.observer: Observer = observer or NullObserver()
        self.observer.watch_in_flight(self._in_flight)
        self.catalog = Catalog(definitions)
        self.definition_store = DefinitionStore(transport, self.topics, clock=self.clock)
        # Built here, not in `run`: a trigger that breaks a rule fails the construction.
        self._relay = TriggerRelay(
            transport,
            subscriptions(self.catalog.all()),
            prefix=prefix,
            partitions=partitions,
            clock=self.clock,
            sign=self.gate.sign,
            observer=self.observer,
            limits=limits,
            max_record_bytes=max_record_bytes,
        )
        self._parts: dict[int, OwnedPartition] = {}
        self._trouble: dict[int, Trouble] = {}
        self._lost: set[int] = set()
        self._lock = anyio.Lock()
        # Polling pauses while this many records wait for their partitions' transactions.
        self._lanes = Lanes(max_pending=4 * batch_size)
        self._client = SagaClient(
            transport,
            prefix=prefix,
            clock=self.clock,
            partitions=partitions,
            observer=self.observer,
            local=self.local_status,
            signer=trust.signer if trust is not None else None,
        )
        self._stack = AsyncExitStack()
        self._serve_facade()

    def _in_flight(self) -> int:
        return sum(part.states.unfinished() for part in list(self._parts.values()))

    @property
    def definitions(self) -> Mapping[str, SagaDefinition]:
        """The latest definition of each saga name."""
        return self.catalog.latest

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Coordinator:
        tg = await self._stack.enter_async_context(anyio.create_task_group())
        self._stack.push_async_callback(self._client.aclose)
        self._stack.callback(tg.cancel_scope.cancel)
        try:
            await tg.start(self.run)
        except BaseException:
            await self._stack.aclose()  # the task group too, or it masks the real error
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def ensure_topics(self) -> None:
        """Creates the engine's topics and every service's command topic, if missing, and
        checks that their partition count is the one the sagas were recorded under.

        Raises:
            TransportError: Requests, replies and log have different partition counts.
            TopologyChanged: A checkpoint was written under another partition count than the
                topics have now. The first checkpoint found decides here, before anything is
                consumed; each partition's own is checked again when it is recovered.
        """
        t = self.topics
        names = [t.requests, t.replies, t.log, t.snapshots, t.dlq, t.alerts]
        names += [t.commands(s) for s in self.catalog.services()]
        names += sorted({o.topic for d in self.catalog.all() for o in d.outcomes})
        await self.transport.ensure_topics(names, self.partition_count, compacted=[t.snapshots])
        await self.definition_store.ensure_topic()
        counts = {n: await self.transport.partitions(n) for n in (t.requests, t.replies, t.log)}
        if len(set(counts.values())) != 1:
            raise TransportError(
                f"requests, replies and log must have equal partition counts, found {counts}: "
                "recreate the topics, or (while they hold no sagas) add partitions so that they "
                "match"
            )
        current = counts[t.log]
        for p in range(await self.transport.partitions(t.snapshots)):
            fold: Replay[Record] = Replay()
            async for record in self.transport.read(t.snapshots, p):
                if not is_saga_key(record.key):
                    fold.add_snapshot(record)
            for where, recorded in fold.partition_counts.items():
                if recorded != current:
                    raise TopologyChanged(recorded, current, partition=where, prefix=t.prefix)
            if fold.partition_counts:
                return  # checkpoints are written under one count: the first found is enough

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serves until cancelled: polls inputs, decides, commits, fires timers."""
        self.gate.start_up(self.catalog.all())
        await self.ensure_topics()
        # Versioning: publish our definitions (a conflict refuses the start) and learn every
        # version ever published, so that each saga finishes on the one it started on.
        own = self.catalog.all()
        await self.definition_store.publish(own, by="coordinator")
        self.catalog = Catalog(own, published_digests(await self.definition_store.read()))
        async with anyio.create_task_group() as tg:
            if self._relay.sources:  # sagas started by the events of other services' topics
                await tg.start(self._relay.run)
            await self._serve(task_status)

    async def _serve(self, task_status: TaskStatus[None]) -> None:
        """The loop: polls requests and replies and hands them to the partitions' lanes, which
        decide and commit on their own (`saga.runtime.lanes`); starts lanes whose timers are
        due."""
        t = self.topics
        async with self.transport.consumer(
            t.coordinator_group, [t.requests, t.replies], listener=self
        ) as consumer:
            task_status.started()
            try:
                async with anyio.create_task_group() as lanes:
                    while True:
                        await self._lanes.room()
                        records = await consumer.poll(self._poll_timeout(), self.batch_size)
                        async with self._lock:
                            again = await self._reacquire_lost(consumer)
                        # Records of a partition just taken over again come again after the seek.
                        self._dispatch(
                            [r for r in records if r.partition not in again], lanes, consumer
                        )
            finally:
                with anyio.CancelScope(shield=True):
                    for p in list(self._parts):
                        await self._drop(p)

    def next_timer(self) -> float | None:
        """The earliest time a saga owned here is due (a deadline, a retry, a timer)."""
        return min(
            (due for p in self._parts.values() if (due := p.next_timer()) is not None),
            default=None,
        )

    def _poll_timeout(self) -> float:
        soonest = self.next_timer()
        if soonest is None:
            return 0.5
        return min(0.5, max(0.0, soonest - self.clock.now()))

    # -- rebalancing -------------------------------------------------------------------------

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        """Drops the sagas and producers of revoked partitions."""
        async with self._lock:
            for topic, p in partitions:
                if topic == self.topics.requests and p in self._parts:
                    async with self._lanes[p].lock:  # its transaction in progress ends first
                        await self._drop(p)

    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        """Fences the previous owner and rebuilds state for newly assigned partitions."""
        async with self._lock:
            self._owned_inputs = partitions
            # Concurrently: each is a producer to open (fencing) and a partition to read, and
            # a restarted coordinator's first progress waits for the slowest, not their sum.
            refused: list[Unauthorized] = []

            async def acquire(p: int) -> None:
                try:
                    await self._acquire(p)
                except Unauthorized as exc:  # raised as itself, not in an exception group
                    refused.append(exc)

            async with anyio.create_task_group() as tg:
                for topic, p in sorted(partitions):
                    if topic == self.topics.requests and p not in self._parts:
                        tg.start_soon(acquire, p)
            if refused:
                raise refused[0]
            self._assigned.set()

    async def _reacquire_lost(self, consumer: Consumer) -> set[int]:
        """Takes lost partitions over again while they are assigned here; returns those taken
        (the consumer reads them again from their committed offsets)."""
        assignment = consumer.assignment()
        taken: set[int] = set()
        for p in sorted(self._lost):
            self._lost.discard(p)
            if (self.topics.requests, p) in assignment and p not in self._parts:
                await self._acquire(p)
                if p in self._parts:
                    # Records of p polled while it was lost were passed over: read them again.
                    inputs = frozenset({(self.topics.requests, p), (self.topics.replies, p)})
                    try:
                        await consumer.seek_to_committed(inputs)
                    except TransportError:
                        await self._lose(p)
                    else:
                        taken.add(p)
        return taken

    async def _acquire(self, p: int) -> None:
        started = self.clock.now()
        stack = AsyncExitStack()
        try:
            producer = await stack.enter_async_context(
                self.transport.tx_producer(f"{self.topics.prefix}.coordinator.{p}")
            )
            part = OwnedPartition(
                p,
                producer,
                stack,
                self.topics,
                self.limits,
                self.observer,
                self.retention,
                self.max_record_bytes,
                self.gate,
            )
            dead = await part.recover(self.transport, self.clock.now())
            if dead:
                # Dead-lettered once: the checkpoint written with them moves recovery past them.
                for d in dead:
                    d.log()
                records = [d.outgoing(self.topics.dlq) for d in dead]
                await producer.commit(
                    [*records, part.checkpoint()], {}, self.topics.coordinator_group
                )
                self._count_dead(dead)
        except Unauthorized:
            await stack.aclose()
            raise  # the broker refuses this principal a right: no retry can help
        except Exception as exc:
            # Whatever else failed (the broker, a fence, a bug in a record), the partition is
            # taken over again on the next loop iteration; retriable or not, giving up would
            # strand every saga of the partition.
            await stack.aclose()
            log.warning("partition %d: could not take it over (%s); will try again", p, exc)
            self._lost.add(p)
            return
        self._parts[p] = part
        self.stats.recoveries += 1
        self.stats.last_recovery_seconds = self.clock.now() - started
        log.info(
            "partition %d: recovered %d sagas in %.3fs",
            p,
            len(part.states),
            self.stats.last_recovery_seconds,
            extra={"partition": p},
        )

    async def _drop(self, p: int) -> None:
        self._lanes.clear(p)
        part = self._parts.pop(p, None)
        if part is not None:
            await part.close()

    # -- processing --------------------------------------------------------------------------

    def _dispatch(self, records: list[Record], lanes: TaskGroup, consumer: Consumer) -> None:
        """Appends the polled records to their partitions' lanes and starts a worker for each
        lane with work (pending records or a timer due) that has none."""
        by_partition: dict[int, list[Record]] = defaultdict(list)
        for record in records:
            if record.partition in self._parts:  # others were lost: they are read again
                by_partition[record.partition].append(record)
        for p, polled in by_partition.items():
            self._lanes.add(p, polled)
        now = self.clock.now()
        for p, part in self._parts.items():
            lane = self._lanes[p]
            if lane.busy:
                continue  # it takes the new records when its transaction is done
            if lane.pending or ((due := part.next_timer()) is not None and due <= now):
                lane.busy = True
                lanes.start_soon(self._drain, p, consumer)

    async def _drain(self, p: int, consumer: Consumer) -> None:
        """One lane's worker: commits transactions of its pending records and due timers until
        none are left (records that arrive meanwhile join the next transaction)."""
        lane = self._lanes[p]
        try:
            while True:
                async with lane.lock:
                    part = self._parts.get(p)
                    if part is None:
                        return
                    trouble = self._trouble.get(p)
                    records = self._lanes.take(p, trouble.limit if trouble else self.batch_size)
                    now = self.clock.now()
                    due = part.next_timer()
                    if not records and (due is None or due > now):
                        return
                    committed = await self._process_partition(part, records, now, consumer)
                    if not records and not committed:
                        return  # timers that led to nothing: the poll loop looks again
        finally:
            lane.busy = False

    async def _process_partition(
        self, part: OwnedPartition, records: list[Record], now: float, consumer: Consumer
    ) -> bool:
        """Stages and commits one transaction of ``part``; whether one was committed."""
        p = part.number
        trouble = self._trouble.get(p)
        batch: Batch | None
        if trouble is not None and trouble.exhausted and records:
            batch = part.set_aside(records[0], f"its transactions kept failing: {trouble.error}")
            self._lanes.put_back(p, records[1:])
        else:
            batch = await self._stage(part, records, now, consumer)
        if batch is None:
            return False
        if batch.empty:
            self._count_retention(batch)  # evictions change only memory: nothing to commit
            return False
        try:
            written = await part.producer.commit(
                batch.records, batch.offsets, self.topics.coordinator_group
            )
        except Fenced:
            self.stats.fenced += 1
            log.warning("partition %d: fenced by a newer coordinator; dropping it", p)
            await self._lose(p, consumer)
            return False
        except TransportError as exc:
            self.stats.failed_transactions += 1
            log.warning("partition %d: transaction failed (%s); rewinding and retrying", p, exc)
            self._trouble.setdefault(p, Trouble(records)).failed(len(records), exc)
            await self._lose(p, consumer)
            return False
        part.apply(batch, written)
        if trouble is not None and trouble.passed(batch.offsets):
            del self._trouble[p]
        self._count(batch)
        self.observer.committed(batch.committed, self.clock.now())
        for saga_id, state in batch.states.items():
            if state.is_final:
                self._wake(saga_id)
        for alert in batch.alerts:
            await self._run_alert_hooks(alert)
        return True

    async def _lose(self, p: int, consumer: Consumer | None = None) -> None:
        """Drops the partition; the poll loop takes it over again while it is assigned here.

        With ``consumer``, also rewinds its inputs to the committed offsets now, so that the
        poll loop is woken by them (this batch and everything pending after it come again)
        instead of waiting out its poll. aiokafka passes over records fetched before a seek.
        """
        await self._drop(p)
        self._lost.add(p)
        if consumer is not None:
            inputs = frozenset({(self.topics.requests, p), (self.topics.replies, p)})
            with contextlib.suppress(TransportError):  # taking it over again rewinds too
                await consumer.seek_to_committed(inputs)

    async def _stage(
        self, part: OwnedPartition, records: list[Record], now: float, consumer: Consumer
    ) -> Batch | None:
        """The partition's transaction for ``records`` and its timers (``None``: the partition
        was dropped, its sagas could not be reloaded)."""
        requests = self.topics.requests
        evicted = {
            key
            for r in records
            if r.topic == requests
            and r.key is not None
            and (key := r.key.decode(errors="replace")) in part.retained.evicted
        }
        if evicted:
            try:
                await part.reload(self.transport, evicted)
            except TransportError as exc:
                log.warning("partition %d: could not reload sagas (%s); retrying", part.number, exc)
                await self._lose(part.number, consumer)
                return None
        return part.stage(records, now, self.catalog)

    def _count(self, batch: Batch) -> None:
        s = self.stats
        s.transactions += 1
        s.records += batch.inputs
        s.events += batch.events
        s.commands += batch.commands
        s.ignored += batch.ignored
        self._count_retention(batch)
        self._count_dead(batch.dead)

    def _count_retention(self, batch: Batch) -> None:
        self.stats.evicted += batch.evicted
        self.stats.tombstoned += batch.tombstoned
        self.stats.held = sum(len(part.states) for part in self._parts.values())

    def _count_dead(self, dead: Iterable[DeadLetter]) -> None:
        for d in dead:
            self.stats.dead_letters[d.reason] += 1
            self.observer.dead_lettered(d.source_topic, d.reason)

    async def _run_alert_hooks(self, alert: Alert) -> None:
        # A stuck saga's reason quotes its steps' error messages, which carry users' data in
        # practice: the log names the steps, `saga status` and the alerts topic give the rest.
        # A refusal's reason names principals and rules only.
        reason = alert.reason if alert.kind != "stuck" else f"steps {alert.steps}"
        log.error(
            "saga %s (%s): %s: %s",
            alert.saga_id,
            alert.saga_name,
            alert.kind,
            reason,
            extra={"saga_id": alert.saga_id, "saga_name": alert.saga_name, "kind": alert.kind},
        )
        for hook in self.alert_hooks:
            try:
                await hook(alert)
            except Exception:
                log.exception("alert hook %r failed for saga %s", hook, alert.saga_id)

    def local_status(self, saga_id: str) -> SagaState | None:
        """The saga's state if its partition is owned here (no I/O)."""
        for part in self._parts.values():
            if (state := part.states.get(saga_id)) is not None:
                return state
        return None
