"""One owned partition: its sagas and timers, its recovery, and the transaction of one batch.

Theory of operation
-------------------
The coordinator that owns partition p of the inputs owns partition p of the log and of the
snapshots (DESIGN section 3). `OwnedPartition` holds what that means in memory: the states of
p's sagas, a heap of their next due times, the offset the log continues at, and the one
transactional producer (transactional id ``<prefix>.coordinator.<p>``) whose opening fenced the
previous owner.

`OwnedPartition.recover` rebuilds the states with the core's one fold (`saga.core.replay`):
the snapshots of p, then the log of p from the checkpoint on.

`OwnedPartition.stage` turns one polled batch (and the timers due now) into a `Batch`: the
transaction's records (events to the log, commands to the services, snapshots of the changed
sagas, one checkpoint, dead letters, alerts), the input offsets to commit with it, and the
staged states. Nothing in memory changes until `OwnedPartition.apply` is called after the
commit succeeded; a failed commit leaves the partition as it was, to be re-read.

Nothing one saga does can stop the partition: an input that cannot be decoded, that names an
unknown saga, or whose decision fails is dead-lettered with its reason, in the same
transaction, and the rest of the batch goes on.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import orjson

from saga.core.codec import Limits, decode, encode
from saga.core.decide import Decision, Input, Tick, decide, deny, give_up, input_kind, next_due
from saga.core.definition import SagaDefinition
from saga.core.messages import (
    Alert,
    Checkpoint,
    DecideApproval,
    ErrorInfo,
    Reply,
    Request,
    SignalSaga,
    StartSaga,
    reply_adapter,
    request_adapter,
)
from saga.core.replay import Replay, checkpoint_key
from saga.core.state import SagaState
from saga.errors import ConfigurationError, DecodeError, SagaError, TopologyChanged
from saga.runtime.catalog import Catalog
from saga.runtime.dlq import DeadLetter
from saga.runtime.gate import CoordinatorGate, Refusal
from saga.runtime.held import HeldStates
from saga.runtime.observe import Committed, Observer
from saga.runtime.ports import (
    UNSEALED_HEADER,
    Outgoing,
    Record,
    TopicPartition,
    Topics,
    Transport,
    TxProducer,
)
from saga.runtime.retention import Retained, Retention

__all__ = ["Batch", "OwnedPartition", "snapshot_value"]

log = logging.getLogger("saga.coordinator")


@dataclass
class Batch:
    """One transaction of one partition, staged and not yet committed."""

    records: list[Outgoing] = field(default_factory=list)
    """What the transaction writes, in order."""
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    """The input offsets it commits."""
    states: dict[str, SagaState] = field(default_factory=dict)
    """The sagas it changes, as they will be once it commits."""
    snapshots: dict[str, Outgoing] = field(default_factory=dict)
    """The latest snapshot of each saga it changes (written after the events)."""
    alerts: list[Alert] = field(default_factory=list)
    committed: list[Committed] = field(default_factory=list)
    """What to tell the observer once it commits."""
    dead: list[DeadLetter] = field(default_factory=list)
    inputs: int = 0
    events: int = 0
    commands: int = 0
    ignored: int = 0
    evicted: int = 0
    tombstoned: int = 0

    @property
    def empty(self) -> bool:
        """Whether there is nothing to commit (no input consumed, nothing decided)."""
        return not self.records and not self.offsets


class OwnedPartition:
    """The sagas of one partition this coordinator owns, and their producer.

    Args:
        number: The partition.
        producer: Its transactional producer (opening it fenced the previous owner).
        stack: Closes the producer when the partition is dropped.
        topics: The engine's topic names.
        limits: Decoding bounds for inputs.
        observer: Gives each command its headers.
        retention: How long finished sagas stay in memory and in the snapshots.
        max_record_bytes: Largest record a transaction may hold (below the producer's and the
            broker's limits): a decision that needs a larger one is not written as it is.
        gate: Checks who sent each input, and signs the commands.
    """

    def __init__(
        self,
        number: int,
        producer: TxProducer,
        stack: AsyncExitStack,
        topics: Topics,
        limits: Limits,
        observer: Observer,
        retention: Retention,
        max_record_bytes: int,
        gate: CoordinatorGate,
    ) -> None:
        self.number = number
        self.gate = gate
        self.producer = producer
        self.topics = topics
        self.limits = limits
        self.observer = observer
        self.max_record_bytes = max_record_bytes
        self.states = HeldStates()
        """The partition's sagas (idle unfinished ones held packed: `saga.runtime.held`)."""
        self.retained = Retained(retention)
        self.log_next = 0
        """The log offset after the last event this partition's sagas have in the log."""
        self._timers: list[tuple[float, str]] = []
        self._stack = stack
        self._partition_for: Callable[[bytes, int], int] = lambda key, count: self.number

    async def close(self) -> None:
        """Closes the producer."""
        await self._stack.aclose()

    # -- time --------------------------------------------------------------------------------

    def arm(self, state: SagaState) -> None:
        """Schedules the saga's next deadline or retry, if it has one."""
        due = next_due(state)
        if due is not None:
            heapq.heappush(self._timers, (due, state.saga_id))

    def next_timer(self) -> float | None:
        """The earliest scheduled time (possibly stale: see `due`): a saga's deadline or retry,
        a finished saga's eviction or tombstone, or an idle saga's packing."""
        times = [self._timers[0][0]] if self._timers else []
        if (retention := self.retained.next_due()) is not None:
            times.append(retention)
        if (park := self.states.next_park()) is not None:
            times.append(park)
        return min(times, default=None)

    def due(self, now: float) -> list[str]:
        """The sagas with a deadline or retry due at ``now``, each once."""
        found: list[str] = []
        while self._timers and self._timers[0][0] <= now:
            _, saga_id = heapq.heappop(self._timers)
            state = self.states.get(saga_id)
            # Entries are not removed when a reply beats its deadline; check the state instead.
            real = next_due(state) if state else None
            if real is not None and real <= now and saga_id not in found:
                found.append(saga_id)
        return found

    # -- recovery ----------------------------------------------------------------------------

    partition_count: int | None = None
    """The topics' partition count, read by `recover` and recorded in every `checkpoint`."""

    async def recover(self, transport: Transport, now: float) -> list[DeadLetter]:
        """Rebuilds the partition's states; returns dead letters for records it could not use.

        Only the coordinator writes the log and snapshots, so a bad record there means
        corruption or a foreign writer: it is set aside with its reason, never fatal.

        Raises:
            TopologyChanged: The partition's checkpoint was written under another partition
                count than the topics have now; nothing is rebuilt (or consumed).
        """
        fold: Replay[Record] = Replay()
        async for record in transport.read(self.topics.snapshots, self.number):
            fold.add_snapshot(_opened(record))
        recorded = fold.partition_counts.get(self.number)
        self.partition_count = await transport.partitions(self.topics.log)
        self._partition_for = transport.partition_for
        if recorded is not None and recorded != self.partition_count:
            raise TopologyChanged(
                recorded, self.partition_count, partition=self.number, prefix=self.topics.prefix
            )
        start = fold.start_offset(self.number)
        async for record in transport.read(self.topics.log, self.number, start):
            fold.add_log_record(_opened(record))
        self.states = HeldStates(fold.states)
        self.log_next = fold.log_next.get(self.number, start)
        for state in fold.states.values():
            self.arm(state)
            self.retained.track(state)
        # Finished sagas past their time in memory leave it now, not at the next batch: memory
        # after a restart is what it was before, not every saga whose snapshot still stands.
        self.retained.evict(now, self.states)
        return [DeadLetter(u.record, u.reason, u.detail) for u in fold.unusable]

    async def reload(self, transport: Transport, saga_ids: set[str]) -> None:
        """Brings evicted sagas back into memory from their snapshots (a request came for
        them). Reads the partition's snapshots: rare, so a scan is cheaper than an index."""
        wanted = {i.encode() for i in saga_ids}
        fold: Replay[Record] = Replay()
        async for record in transport.read(self.topics.snapshots, self.number):
            if record.key in wanted:
                fold.add_snapshot(record)
        for saga_id, state in fold.states.items():
            self.states[saga_id] = state
            self.retained.restore(state)

    def checkpoint(self) -> Outgoing:
        """The record saying that the snapshots cover the log up to `log_next`."""
        checkpoint = Checkpoint(
            partition=self.number, log_offset=self.log_next, partitions=self.partition_count
        )
        return Outgoing(
            self.topics.snapshots,
            checkpoint_key(self.number),
            encode(checkpoint),
            partition=self.number,
        )

    # -- one batch ---------------------------------------------------------------------------

    def stage(self, records: Sequence[Record], now: float, catalog: Catalog) -> Batch:
        """Decides every record and every due timer; returns the transaction to commit."""
        self.states.park(now)
        batch = Batch()
        for saga_id in self.retained.tombstones(now):
            batch.records.append(
                Outgoing(self.topics.snapshots, saga_id.encode(), None, partition=self.number)
            )
            batch.tombstoned += 1
        for record in records:
            batch.offsets[(record.topic, record.partition)] = record.offset + 1
            batch.inputs += 1
            self._stage_record(batch, record, now, catalog)
        for saga_id in self.due(now):
            state = batch.states.get(saga_id) or self.states[saga_id]
            definition = catalog.for_state(state)
            if definition is None:
                log.error(
                    "saga %s: its timer cannot be decided: %s", saga_id, catalog.missing(state)
                )
                continue
            try:
                decision = decide(definition, state, Tick(saga_id, now), now)
            except SagaError as exc:
                log.error("saga %s: its timer could not be decided: %s", saga_id, exc)
                continue
            if (problem := self._stage_decision(batch, decision)) is not None:
                reason = f"its next decision cannot be written: {problem}"
                found = give_up(definition, state, reason, now) if definition else None
                if found is None or self._stage_decision(batch, found) is not None:
                    log.error("saga %s: %s", saga_id, reason)
                    continue
                decision = found
            batch.committed.append(Committed(state, decision, "timer", None, (), now))
        # Last, so that a request decided above found its saga in memory (memory only: on a
        # failed commit the partition is recovered anew anyway).
        batch.evicted = self.retained.evict(now, self.states, keep=batch.states)
        if batch.empty:
            return batch
        batch.records += batch.snapshots.values()
        batch.records.append(self.checkpoint())
        return batch

    def set_aside(self, record: Record, detail: str) -> Batch:
        """A transaction that only dead-letters ``record`` (reason ``transaction_failed``) and
        moves past it: for an input whose transactions keep failing whatever else they hold."""
        batch = Batch(inputs=1)
        batch.offsets[(record.topic, record.partition)] = record.offset + 1
        self._dead(batch, record, "transaction_failed", detail)
        batch.records.append(self.checkpoint())
        return batch

    def apply(self, batch: Batch, written: Sequence[int]) -> None:
        """Makes a committed batch the partition's state (``written``: the records' offsets)."""
        ours = self.topics.log
        log_offsets = [o for r, o in zip(batch.records, written, strict=True) if r.topic == ours]
        if log_offsets:
            self.log_next = max(log_offsets) + 1
        for saga_id, state in batch.states.items():
            self.states[saga_id] = state
            self.arm(state)
            self.retained.track(state)

    def _stage_record(self, batch: Batch, record: Record, now: float, catalog: Catalog) -> None:
        sender = self.gate.sender(record)  # before decoding: nothing unsigned is parsed further
        if isinstance(sender, Refusal):
            self._dead(batch, record, sender.reason, sender.detail)
            return
        try:
            message: Input
            if record.topic == self.topics.requests:
                message = decode(request_adapter, record.value, self.limits)
            else:
                message = decode(reply_adapter, record.value, self.limits)
        except DecodeError as exc:
            self._dead(batch, record, exc.reason, exc.detail)
            return
        saga_id = message.saga_id
        if record.key != saga_id.encode():
            self._dead(batch, record, "wrong_key", f"key {record.key!r} is not the saga id")
            return
        if (
            self.partition_count
            and (home := self._partition_for(record.key, self.partition_count)) != record.partition
        ):
            # Its saga lives on another partition (a foreign partitioner, or a signed record
            # copied to another partition: the partition is not signed).
            detail = f"saga {saga_id!r} belongs on partition {home}, not {record.partition}"
            self._dead(batch, record, "wrong_partition", detail)
            return
        state = batch.states.get(saga_id) or self.states.get(saga_id)
        if isinstance(message, StartSaga):
            definition = catalog.for_start(message.saga_name)
        elif state is None and saga_id in self.retained.evicted:
            # Ended and out of memory (a request for it reloads it first): a late reply.
            batch.ignored += 1
            return
        elif state is None:
            self._dead(batch, record, "unknown_saga", f"no saga with id {saga_id!r}")
            return
        else:
            definition = catalog.for_state(state)
            if definition is None and (why := catalog.missing(state)) is not None:
                self._dead(batch, record, "undecidable", why)
                return
        if isinstance(message, Reply):
            refusal = self.gate.reply(message, sender, definition)
            if refusal is not None:
                assert state is not None  # replies reach here only for a known saga
                self._refuse_reply(batch, record, state, refusal, now)
                return
        elif not isinstance(message, Tick):
            message, refusal = self.gate.request(
                message, sender, state.name if state else None, now, _step_of(message, definition)
            )
            if refusal is not None:
                self._refuse_request(batch, record, state, message, refusal, now)
                return
        try:
            decision = decide(definition, state, message, now)
        except SagaError as exc:
            # A definition that does not fit the saga's history (a version that was not kept):
            # this saga's input is set aside, the partition goes on.
            self._dead(batch, record, "undecidable", f"{type(exc).__name__}: {exc}")
            return
        if decision.rejected:
            self._dead(batch, record, "rejected", decision.rejected)
            return
        if decision.ignored:
            batch.ignored += 1
            log.debug(
                "ignored %s/%d/%d: %s",
                record.topic,
                record.partition,
                record.offset,
                decision.ignored,
            )
            return
        if (problem := self._stage_decision(batch, decision)) is not None:
            found = self._when_too_large(batch, record, message, state, definition, now, problem)
            if found is None:
                return
            decision = found
        reply = message if isinstance(message, Reply) else None
        batch.committed.append(
            Committed(state, decision, input_kind(message), reply, record.headers, now)
        )

    def _refuse_reply(
        self, batch: Batch, record: Record, state: SagaState, refusal: Refusal, now: float
    ) -> None:
        """A validly signed reply from a principal that does not answer for its step: dead
        letter and alert (someone holds a service's key and uses it for another's steps)."""
        self._dead(batch, record, refusal.reason, refusal.detail)
        alert = Alert(
            saga_id=state.saga_id,
            saga_name=state.name,
            reason=refusal.detail,
            steps=[],
            at=now,
            kind="forbidden",
        )
        batch.records.append(Outgoing(self.topics.alerts, state.saga_id.encode(), encode(alert)))
        batch.alerts.append(alert)

    def _refuse_request(
        self,
        batch: Batch,
        record: Record,
        state: SagaState | None,
        message: Request,
        refusal: Refusal,
        now: float,
    ) -> None:
        """A request refused at the gate: dead letter, and, when its signer is known (a denial
        by the policy), the denial in the saga's log with an alert."""
        self._dead(batch, record, refusal.reason, refusal.detail)
        if refusal.reason != "forbidden" or message.by is None:
            return  # unauthenticated: no one to record, and anyone could fill the log
        decision = deny(state, message, message.by, refusal.detail, now)
        if decision.state is not None and self._stage_decision(batch, decision) is None:
            batch.committed.append(
                Committed(state, decision, input_kind(message), None, record.headers, now)
            )

    def _stage_decision(self, batch: Batch, decision: Decision) -> str | None:
        """Stages the decision's records; or, if one of them is larger than a record may be,
        stages nothing and says which."""
        state = decision.state
        if state is None:
            return None
        key = state.saga_id.encode()
        t, n = self.topics, self.number
        records = [Outgoing(t.log, key, encode(e), partition=n) for e in decision.events]
        for command in decision.commands:
            topic, headers = t.commands(command.service), self.observer.headers(command)
            records.append(self.gate.sign(Outgoing(topic, key, encode(command), headers)))
        records += [Outgoing(t.alerts, key, encode(alert)) for alert in decision.alerts]
        # The outbox: what the saga publishes as it ends is in the transaction of its end.
        records += [Outgoing(o.topic, o.key, o.value) for o in decision.outcomes]
        # Sub-sagas: a child's start or compensation, and a child's answer to its parent.
        for request in decision.requests:
            out = Outgoing(
                t.requests,
                request.saga_id.encode(),
                encode(request),
                self.observer.headers(request),
            )
            records.append(self.gate.sign(out))
        for reply in decision.replies:
            out = Outgoing(t.replies, reply.saga_id.encode(), encode(reply))
            records.append(self.gate.sign(out))
        snapshot = Outgoing(t.snapshots, key, snapshot_value(state), partition=n)
        for r in (*records, snapshot):
            if (size := _size(r)) > self.max_record_bytes:
                return f"a record for {r.topic} would be {size} bytes, over {self.max_record_bytes}"
        batch.states[state.saga_id] = state
        batch.snapshots[state.saga_id] = snapshot
        batch.records += records
        batch.alerts += decision.alerts
        batch.events += len(decision.events)
        batch.commands += len(decision.commands)
        return None

    def _when_too_large(
        self,
        batch: Batch,
        record: Record,
        message: Input,
        state: SagaState | None,
        definition: SagaDefinition | None,
        now: float,
        problem: str,
    ) -> Decision | None:
        """What a decision whose records cannot be written turns into, for that saga alone."""
        if isinstance(message, Reply) and message.ok and definition is not None:
            # An output too large to keep: the step failed for good, by the saga's rules.
            text = f"the output cannot be kept: {problem}"
            error = ErrorInfo(type="OutputTooLarge", business=True, message=text)
            failed = message.model_copy(update={"ok": False, "output": None, "error": error})
            decision = decide(definition, state, failed, now)
            if decision.state is not None and self._stage_decision(batch, decision) is None:
                return decision
        if state is not None and definition is not None:
            reason = f"its next decision cannot be written: {problem}"
            stuck = give_up(definition, state, reason, now)
            if stuck is not None and self._stage_decision(batch, stuck) is None:
                return stuck
        self._dead(batch, record, "too_large", f"what it leads to cannot be written: {problem}")
        return None

    def _dead(self, batch: Batch, record: Record, reason: str, detail: str) -> None:
        dead = DeadLetter(record, reason, detail)
        dead.log()
        batch.dead.append(dead)
        batch.records.append(dead.outgoing(self.topics.dlq))


_SNAPSHOT_HEAD = b'{"v":1,"type":"snapshot","saga_id":'


def snapshot_value(state: SagaState) -> bytes:
    """The record value of the saga's `Snapshot`: the bytes ``encode(Snapshot(saga_id=...,
    state=state.model_dump(mode="json")))`` gives, serialised once instead of dumped to data,
    validated again and serialised (a third of the cost, on every transaction's hot path)."""
    body = state.__pydantic_serializer__.to_json(state)
    return b"".join((_SNAPSHOT_HEAD, orjson.dumps(state.saga_id), b',"state":', body, b"}"))


def _step_of(message: Request, definition: SagaDefinition | None) -> str | None:
    """The step a signal or an approval decision is for, as the policy names steps."""
    if isinstance(message, DecideApproval):
        return message.step
    if isinstance(message, SignalSaga) and definition is not None:
        waiting = definition.waits_for(message.name)
        return waiting.name if waiting is not None else None
    return None


def _opened(record: Record) -> Record:
    """``record`` of the log or the snapshots, if its sealed payloads could be opened.

    Raises:
        ConfigurationError: They could not (a payload key is missing, or the record was
            changed): setting it aside would lose the saga, so the partition is not taken
            until the keys are put right.
    """
    if (why := record.header(UNSEALED_HEADER)) is not None:
        raise ConfigurationError(
            f"{record.topic}/{record.partition}@{record.offset} cannot be opened ({why}): put "
            "the payload key it names back into SAGA_PAYLOAD_KEYS (keep old keys after a "
            "rotation until no record needs them)"
        )
    return record


def _size(record: Outgoing) -> int:
    """Roughly what the broker counts of a record: key, value and headers."""
    headers = sum(len(k) + len(v) for k, v in record.headers)
    return len(record.key or b"") + len(record.value or b"") + headers
