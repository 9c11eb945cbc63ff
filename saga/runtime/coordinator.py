"""The coordinator: the asynchronous shell around `saga.core.decide`.

Theory of operation
-------------------
Coordinators form one consumer group over the requests and replies topics. Both are keyed by
saga id and have as many partitions as the log, so the member that owns partition p of the
inputs owns everything about the sagas of partition p (DESIGN section 3).

For each owned partition the coordinator holds the sagas' states in memory and one
transactional producer (transactional id ``<prefix>.coordinator.<p>``). One loop polls a batch,
runs `decide` on each record and on every due timer, and commits the outcome in **one
transaction per partition**: the events to the log, the commands to the services, the snapshots
of changed sagas, dead letters, alerts, and the consumed offsets. Either all of it happens or
none of it; state in memory changes only after the commit succeeds.

On assignment of partition p the coordinator first opens the producer (which fences a previous
owner and aborts its open transaction) and then rebuilds state: the snapshots of p, then the
log of p from the last checkpoint on. Timers are not kept anywhere else: they are deadlines and
retry times inside the state, so recovery re-arms them. On a failed transaction the partition's
offsets are rewound and the producer reopened; on being fenced, the partition is dropped and
re-acquired from the log if the group still assigns it here.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskStatus
from pydantic import TypeAdapter, ValidationError

from saga.core.codec import DEFAULT_LIMITS, Limits, decode, encode
from saga.core.decide import Decision, Input, Tick, decide, next_due
from saga.core.definition import SagaDefinition
from saga.core.messages import (
    Alert,
    Checkpoint,
    Reply,
    Snapshot,
    StartSaga,
    event_adapter,
    request_adapter,
)
from saga.core.state import SagaState, evolve
from saga.errors import (
    DecodeError,
    Fenced,
    IllegalTransition,
    SagaTimeout,
    TransportError,
    UnknownSaga,
)
from saga.runtime.client import SagaClient
from saga.runtime.observe import Committed, NullObserver, Observer, command_traceparent
from saga.runtime.ports import (
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

__all__ = ["AlertHook", "Coordinator", "CoordinatorStats", "dead_letter"]

log = logging.getLogger("saga.coordinator")

AlertHook = Callable[[Alert], Awaitable[None]]
"""Called after an alert is committed; exceptions are logged and do not stop the coordinator."""

_reply_adapter: TypeAdapter[Reply] = TypeAdapter(Reply)
_snapshot_adapter: TypeAdapter[Snapshot | Checkpoint] = TypeAdapter(Snapshot | Checkpoint)


@dataclass
class CoordinatorStats:
    """Counters of what this coordinator did since it started (a projection for metrics)."""

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


@dataclass
class _Partition:
    number: int
    producer: TxProducer
    stack: AsyncExitStack
    states: dict[str, SagaState] = field(default_factory=dict)
    timers: list[tuple[float, str]] = field(default_factory=list)
    log_next: int = 0

    def arm(self, state: SagaState) -> None:
        due = next_due(state)
        if due is not None:
            heapq.heappush(self.timers, (due, state.saga_id))

    def due(self, now: float) -> list[str]:
        found: list[str] = []
        while self.timers and self.timers[0][0] <= now:
            _, saga_id = heapq.heappop(self.timers)
            state = self.states.get(saga_id)
            # Entries are not removed when a reply beats its deadline; check the state instead.
            real = next_due(state) if state else None
            if real is not None and real <= now and saga_id not in found:
                found.append(saga_id)
        return found


DLQ_MAX_VALUE = 512 * 1024
"""Largest value copied whole into a dead letter; larger ones keep their head and a digest."""


def dead_letter(record: Record, dlq_topic: str, reason: str, detail: str) -> Outgoing:
    """The dead-letter record for ``record``: its raw bytes, with the reason in headers.

    A value too large for the producer (a ``too_large`` poison message is larger than a request
    may be) is cut to its first `DLQ_MAX_VALUE` bytes, with its full size and SHA-256 in the
    headers; the original stays readable at its source offset for the topic's retention.
    """
    value = record.value or b""
    headers = [
        ("saga.dlq.reason", reason.encode()),
        ("saga.dlq.detail", detail.encode()[:2000]),
        ("saga.dlq.source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
    ]
    if len(value) > DLQ_MAX_VALUE:
        headers.append(("saga.dlq.truncated_from", str(len(value)).encode()))
        headers.append(("saga.dlq.sha256", hashlib.sha256(value).hexdigest().encode()))
        value = value[:DLQ_MAX_VALUE]
    return Outgoing(dlq_topic, record.key, value, (*headers, *record.headers))


class Coordinator:
    """Runs sagas: decides, records events, sends commands, keeps time, compensates.

    Use as an async context manager to serve in the background, or ``await run()`` to serve
    until cancelled. `start`, `status`, `wait`, `cancel` and `retry` work in either case.

    Args:
        definitions: The sagas this coordinator can run (several versions of one name may be
            given; new sagas use the highest version, running ones keep theirs).
        transport: The broker.
        prefix: Topic name prefix.
        partitions: Partition count used when creating the topics.
        clock: Time source (`saga.testing` passes a virtual clock).
        alert_hooks: Called for each stuck saga after its alert is committed.
        batch_size: Most records handled in one poll (and so in one transaction per partition).
        limits: Decoding bounds for incoming messages.
        observer: Told of every committed decision (tracing, metrics); none by default.
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
    ) -> None:
        self.transport = transport
        self.topics = Topics(prefix)
        self.partition_count = partitions
        self.clock = clock or SystemClock()
        self.alert_hooks = list(alert_hooks)
        self.batch_size = batch_size
        self.limits = limits
        self.stats = CoordinatorStats()
        self.observer: Observer = observer or NullObserver()
        self.observer.watch_in_flight(self._in_flight)
        self._versions: dict[tuple[str, int], SagaDefinition] = {}
        self._latest: dict[str, SagaDefinition] = {}
        for d in definitions:
            self._versions[(d.name, d.version)] = d
            if d.name not in self._latest or d.version > self._latest[d.name].version:
                self._latest[d.name] = d
        self._parts: dict[int, _Partition] = {}
        self._lost: set[int] = set()
        self._lock = anyio.Lock()
        self._waiters: dict[str, anyio.Event] = {}
        self._client = SagaClient(transport, prefix=prefix, clock=self.clock, partitions=partitions)
        self._stack = AsyncExitStack()
        self._assigned = anyio.Event()
        self._owned_inputs: frozenset[TopicPartition] = frozenset()

    def _in_flight(self) -> int:
        return sum(
            not s.is_final for part in list(self._parts.values()) for s in part.states.values()
        )

    @property
    def definitions(self) -> Mapping[str, SagaDefinition]:
        """The latest definition of each saga name."""
        return self._latest

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
        """Creates the engine's topics and every service's command topic, if missing."""
        t = self.topics
        services = sorted({s.service for d in self._versions.values() for s in d.steps})
        names = [t.requests, t.replies, t.log, t.snapshots, t.dlq, t.alerts]
        names += [t.commands(s) for s in services]
        await self.transport.ensure_topics(names, self.partition_count, compacted=[t.snapshots])
        counts = {n: await self.transport.partitions(n) for n in (t.requests, t.replies, t.log)}
        if len(set(counts.values())) != 1:
            raise TransportError(
                f"requests, replies and log must have equal partition counts, found {counts}: "
                "recreate the topics or add partitions so that they match"
            )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serves until cancelled: polls inputs, decides, commits, fires timers."""
        await self.ensure_topics()
        t = self.topics
        async with self.transport.consumer(
            t.coordinator_group, [t.requests, t.replies], listener=self
        ) as consumer:
            task_status.started()
            try:
                while True:
                    records = await consumer.poll(self._poll_timeout(), self.batch_size)
                    async with self._lock:
                        await self._reacquire_lost(consumer)
                        await self._process_batch(records, consumer)
            finally:
                with anyio.CancelScope(shield=True):
                    await self._drop_all()

    def _poll_timeout(self) -> float:
        now = self.clock.now()
        soonest = min((p.timers[0][0] for p in self._parts.values() if p.timers), default=None)
        if soonest is None:
            return 0.5
        return min(0.5, max(0.0, soonest - now))

    # -- rebalancing -------------------------------------------------------------------------

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        """Drops the sagas and producers of revoked partitions."""
        async with self._lock:
            for topic, p in partitions:
                if topic == self.topics.requests and p in self._parts:
                    await self._drop(p)

    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        """Fences the previous owner and rebuilds state for newly assigned partitions."""
        async with self._lock:
            self._owned_inputs = partitions
            for topic, p in sorted(partitions):
                if topic == self.topics.requests and p not in self._parts:
                    await self._acquire(p)
            self._assigned.set()

    async def _reacquire_lost(self, consumer: Consumer) -> None:
        assignment = consumer.assignment()
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
                        await self._drop(p)
                        self._lost.add(p)

    async def _acquire(self, p: int) -> None:
        started = self.clock.now()
        stack = AsyncExitStack()
        try:
            producer = await stack.enter_async_context(
                self.transport.tx_producer(f"{self.topics.prefix}.coordinator.{p}")
            )
            part = _Partition(p, producer, stack)
            poison = await self._recover(part)
            if poison:
                # Dead-lettered once: the checkpoint written with them moves recovery past them.
                checkpoint = Checkpoint(partition=p, log_offset=part.log_next)
                await producer.commit(
                    [*poison, self._checkpoint_record(checkpoint)],
                    {},
                    self.topics.coordinator_group,
                )
                self._count_dead(
                    [
                        (
                            (_header(r, "saga.dlq.source") or "?").rsplit("/", 2)[0],
                            _header(r, "saga.dlq.reason") or "?",
                        )
                        for r in poison
                    ]
                )
        except Exception as exc:  # any failure: the partition is taken over again later
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
        )

    async def _recover(self, part: _Partition) -> list[Outgoing]:
        """Rebuilds the partition's states; returns dead letters for records it could not use.

        Only this coordinator writes the log and snapshots, so a bad record there means
        corruption or a foreign writer: it is set aside with its reason, never fatal.
        """
        t = self.topics
        poison: list[Outgoing] = []
        checkpoint = 0
        async for record in self.transport.read(t.snapshots, part.number):
            if record.value is None:
                if record.key is not None:
                    part.states.pop(record.key.decode(), None)
                continue
            try:
                item = decode(_snapshot_adapter, record.value)
                if isinstance(item, Checkpoint):
                    checkpoint = item.log_offset
                else:
                    part.states[item.saga_id] = SagaState.model_validate(item.state)
            except (DecodeError, ValidationError) as exc:
                poison.append(self._dead(record, "bad_snapshot", str(exc)))
        part.log_next = checkpoint
        async for record in self.transport.read(t.log, part.number, checkpoint):
            part.log_next = record.offset + 1
            try:
                event = decode(event_adapter, record.value)
                state = part.states.get(event.saga_id)
                if state is not None and event.seq <= state.seq:
                    continue  # already in the snapshot
                part.states[event.saga_id] = evolve(state, event)
            except (DecodeError, IllegalTransition) as exc:
                poison.append(self._dead(record, "bad_log_record", str(exc)))
        for state in part.states.values():
            part.arm(state)
        return poison

    def _checkpoint_record(self, checkpoint: Checkpoint) -> Outgoing:
        key = f"__checkpoint__.{checkpoint.partition}".encode()
        return Outgoing(
            self.topics.snapshots, key, encode(checkpoint), partition=checkpoint.partition
        )

    async def _drop(self, p: int) -> None:
        part = self._parts.pop(p, None)
        if part is not None:
            await part.stack.aclose()

    async def _drop_all(self) -> None:
        for p in list(self._parts):
            await self._drop(p)

    # -- processing --------------------------------------------------------------------------

    async def _process_batch(self, records: list[Record], consumer: Consumer) -> None:
        now = self.clock.now()
        by_partition: dict[int, list[Record]] = defaultdict(list)
        for record in records:
            by_partition[record.partition].append(record)
        work = {p for p in by_partition if p in self._parts}
        work |= {n for n, part in self._parts.items() if part.timers and part.timers[0][0] <= now}
        if not work:
            return
        async with anyio.create_task_group() as tg:
            for p in sorted(work):
                tg.start_soon(self._process_partition, p, by_partition.get(p, []), now, consumer)

    async def _process_partition(
        self, p: int, records: list[Record], now: float, consumer: Consumer
    ) -> None:
        part = self._parts[p]
        staged: dict[str, SagaState] = {}
        out: list[Outgoing] = []
        offsets: dict[TopicPartition, int] = {}
        alerts: list[Alert] = []
        seen: list[Committed] = []
        dead: list[tuple[str, str]] = []
        for record in records:
            offsets[(record.topic, record.partition)] = record.offset + 1
            self.stats.records += 1
            before = self._current(part, staged, record)
            result = self._decide_record(part, staged, record, now)
            if isinstance(result, Outgoing):
                out.append(result)
                dead.append((record.topic, _header(result, "saga.dlq.reason") or "?"))
            elif result is not None:
                decision, message = result
                self._stage(part, staged, decision, out, alerts)
                reply = message if isinstance(message, Reply) else None
                kind = "reply" if reply else getattr(message, "type", "request")
                trace_parent = _header(record, "traceparent")
                seen.append(Committed(before, decision, kind, reply, trace_parent, now))
        for saga_id in part.due(now):
            state = staged.get(saga_id) or part.states[saga_id]
            decision = decide(self._definition_for(state), state, Tick(saga_id, now), now)
            self._stage(part, staged, decision, out, alerts)
            seen.append(Committed(state, decision, "timer", None, None, now))
        if not out and not offsets:
            return
        for state in staged.values():
            snap = Snapshot(saga_id=state.saga_id, state=state.model_dump(mode="json"))
            out.append(
                Outgoing(self.topics.snapshots, state.saga_id.encode(), encode(snap), partition=p)
            )
        out.append(self._checkpoint_record(Checkpoint(partition=p, log_offset=part.log_next)))
        try:
            written = await part.producer.commit(out, offsets, self.topics.coordinator_group)
        except Fenced:
            self.stats.fenced += 1
            log.warning("partition %d: fenced by a newer coordinator; dropping it", p)
            await self._drop(p)
            self._lost.add(p)
            return
        except TransportError as exc:
            self.stats.failed_transactions += 1
            log.warning("partition %d: transaction failed (%s); rewinding and retrying", p, exc)
            await self._drop(p)
            await consumer.seek_to_committed(frozenset(offsets))
            self._lost.add(p)
            return
        self.stats.transactions += 1
        self.observer.committed(seen, self.clock.now())
        self._count_dead(dead)
        log_offsets = [o for r, o in zip(out, written, strict=True) if r.topic == self.topics.log]
        if log_offsets:
            part.log_next = max(log_offsets) + 1
        for saga_id, state in staged.items():
            part.states[saga_id] = state
            part.arm(state)
            if state.is_final and (waiter := self._waiters.pop(saga_id, None)):
                waiter.set()
        for alert in alerts:
            await self._run_alert_hooks(alert)

    def _decide_record(
        self, part: _Partition, staged: dict[str, SagaState], record: Record, now: float
    ) -> tuple[Decision, Input] | Outgoing | None:
        t = self.topics
        try:
            message: Input
            if record.topic == t.requests:
                message = decode(request_adapter, record.value, self.limits)
            else:
                message = decode(_reply_adapter, record.value, self.limits)
        except DecodeError as exc:
            return self._dead(record, exc.reason, exc.detail)
        saga_id = message.saga_id
        if record.key != saga_id.encode():
            return self._dead(record, "wrong_key", f"key {record.key!r} is not the saga id")
        state = staged.get(saga_id) or part.states.get(saga_id)
        if isinstance(message, StartSaga):
            definition = self._latest.get(message.saga_name)
        else:
            definition = self._definition_for(state) if state else None
            if state is None:
                return self._dead(record, "unknown_saga", f"no saga with id {saga_id!r}")
        trace_parent = _header(record, "traceparent")
        decision = decide(definition, state, message, now, trace_parent=trace_parent)
        if decision.rejected:
            return self._dead(record, "rejected", decision.rejected)
        if decision.ignored:
            self.stats.ignored += 1
            log.debug(
                "ignored %s/%d/%d: %s",
                record.topic,
                record.partition,
                record.offset,
                decision.ignored,
            )
            return None
        return decision, message

    def _count_dead(self, dead: list[tuple[str, str]]) -> None:
        """Counts dead letters once their transaction committed (a retried batch counts once)."""
        for topic, reason in dead:
            self.stats.dead_letters[reason] += 1
            self.observer.dead_lettered(topic, reason)

    def _dead(self, record: Record, reason: str, detail: str) -> Outgoing:
        log.warning(
            "dead-lettered %s/%d/%d: %s: %s",
            record.topic,
            record.partition,
            record.offset,
            reason,
            detail,
        )
        return dead_letter(record, self.topics.dlq, reason, detail)

    def _current(
        self, part: _Partition, staged: dict[str, SagaState], record: Record
    ) -> SagaState | None:
        saga_id = record.key.decode(errors="replace") if record.key else ""
        return staged.get(saga_id) or part.states.get(saga_id)

    def _stage(
        self,
        part: _Partition,
        staged: dict[str, SagaState],
        decision: Decision,
        out: list[Outgoing],
        alerts: list[Alert],
    ) -> None:
        state = decision.state
        if state is None:
            return
        staged[state.saga_id] = state
        key = state.saga_id.encode()
        for event in decision.events:
            out.append(Outgoing(self.topics.log, key, encode(event), partition=part.number))
        for command in decision.commands:
            trace = (("traceparent", command_traceparent(command).encode()),)
            out.append(Outgoing(self.topics.commands(command.service), key, encode(command), trace))
        for alert in decision.alerts:
            out.append(Outgoing(self.topics.alerts, key, encode(alert)))
            alerts.append(alert)
        self.stats.events += len(decision.events)
        self.stats.commands += len(decision.commands)

    def _definition_for(self, state: SagaState) -> SagaDefinition:
        found = self._versions.get((state.name, state.version)) or self._latest.get(state.name)
        if found is None:
            raise UnknownSaga(
                f"saga {state.saga_id!r} runs {state.name!r} v{state.version}, which this "
                "coordinator was not given: add the definition and restart"
            )
        return found

    async def _run_alert_hooks(self, alert: Alert) -> None:
        log.error(
            "saga %s (%s) is stuck: %s",
            alert.saga_id,
            alert.saga_name,
            alert.reason,
            extra={"saga_id": alert.saga_id, "saga_name": alert.saga_name, "reason": alert.reason},
        )
        for hook in self.alert_hooks:
            try:
                await hook(alert)
            except Exception:
                log.exception("alert hook %r failed for saga %s", hook, alert.saga_id)

    # -- the client side ---------------------------------------------------------------------

    async def start(
        self,
        name: str,
        input: Mapping[str, Any],
        saga_id: str | None = None,
        *,
        headers: tuple[tuple[str, bytes], ...] = (),
    ) -> str:
        """Starts a saga and returns its id (a new random id unless one is given).

        Raises:
            UnknownSaga: This coordinator has no definition called ``name``.
            pydantic.ValidationError: The input does not fit the definition's input model.
        """
        definition = self._latest.get(name)
        if definition is None:
            raise UnknownSaga(f"no saga definition named {name!r}; known: {sorted(self._latest)}")
        if definition.input_model is not None:
            definition.input_model.model_validate(input)
        return await self._client.start(name, input, saga_id, headers=headers)

    async def cancel(self, saga_id: str, reason: str = "cancelled by request") -> None:
        """Asks for the saga to be cancelled (compensated), honoured until its pivot starts."""
        await self._client.cancel(saga_id, reason)

    async def retry(self, saga_id: str) -> None:
        """Re-drives a stuck saga: its stuck steps or compensations run again."""
        await self._client.retry(saga_id)

    async def resolve(self, saga_id: str, note: str = "resolved by an operator") -> None:
        """Declares a stuck saga's stuck steps handled by hand; the saga then carries on."""
        await self._client.resolve(saga_id, note)

    async def status(self, saga_id: str) -> SagaState | None:
        """The saga's latest committed state (from memory if owned here, else the snapshots)."""
        for part in self._parts.values():
            if saga_id in part.states:
                return part.states[saga_id]
        return await self._client.status(saga_id)

    async def wait(self, saga_id: str, timeout: float) -> SagaState:
        """Waits until the saga ends (completed, compensated or stuck) and returns its state.

        Raises:
            SagaTimeout: It did not end within ``timeout`` seconds.
        """
        with anyio.move_on_after(timeout):
            while True:
                state = await self._local_status(saga_id)
                if state is not None and state.is_final:
                    return state
                if state is None and self._owns(saga_id) is False:
                    remaining = max(0.1, timeout)
                    return await self._client.wait(saga_id, remaining)
                event = self._waiters.setdefault(saga_id, anyio.Event())
                with anyio.move_on_after(0.5):
                    await event.wait()
        state = await self.status(saga_id)
        where = state.status.value if state else "not started"
        raise SagaTimeout(f"saga {saga_id!r} did not end within {timeout}s (it is {where})")

    async def _local_status(self, saga_id: str) -> SagaState | None:
        for part in self._parts.values():
            if saga_id in part.states:
                return part.states[saga_id]
        return None

    def _owns(self, saga_id: str) -> bool | None:
        """Whether this coordinator owns the saga's partition (None: not known yet)."""
        if not self._assigned.is_set():
            return None
        p = self.transport.partition_for(saga_id.encode(), self.partition_count)
        return (self.topics.requests, p) in self._owned_inputs


def _header(record: Record | Outgoing, name: str) -> str | None:
    for key, value in record.headers:
        if key == name:
            return value.decode(errors="replace")
    return None
