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
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

from saga.core.codec import Limits, decode, encode
from saga.core.decide import Decision, Input, Tick, decide, input_kind, next_due
from saga.core.messages import (
    Alert,
    Checkpoint,
    Reply,
    Snapshot,
    StartSaga,
    reply_adapter,
    request_adapter,
)
from saga.core.replay import Replay, checkpoint_key
from saga.core.state import SagaState
from saga.errors import DecodeError, SagaError
from saga.runtime.catalog import Catalog
from saga.runtime.dlq import DeadLetter
from saga.runtime.observe import Committed, Observer
from saga.runtime.ports import Outgoing, Record, TopicPartition, Topics, Transport, TxProducer

__all__ = ["Batch", "OwnedPartition"]

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
    alerts: list[Alert] = field(default_factory=list)
    committed: list[Committed] = field(default_factory=list)
    """What to tell the observer once it commits."""
    dead: list[DeadLetter] = field(default_factory=list)
    inputs: int = 0
    events: int = 0
    commands: int = 0
    ignored: int = 0

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
    """

    def __init__(
        self,
        number: int,
        producer: TxProducer,
        stack: AsyncExitStack,
        topics: Topics,
        limits: Limits,
        observer: Observer,
    ) -> None:
        self.number = number
        self.producer = producer
        self.topics = topics
        self.limits = limits
        self.observer = observer
        self.states: dict[str, SagaState] = {}
        self.log_next = 0
        """The log offset after the last event this partition's sagas have in the log."""
        self._timers: list[tuple[float, str]] = []
        self._stack = stack

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
        """The earliest scheduled time (possibly stale: see `due`)."""
        return self._timers[0][0] if self._timers else None

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

    async def recover(self, transport: Transport) -> list[DeadLetter]:
        """Rebuilds the partition's states; returns dead letters for records it could not use.

        Only the coordinator writes the log and snapshots, so a bad record there means
        corruption or a foreign writer: it is set aside with its reason, never fatal.
        """
        fold: Replay[Record] = Replay()
        async for record in transport.read(self.topics.snapshots, self.number):
            fold.add_snapshot(record)
        start = fold.start_offset(self.number)
        async for record in transport.read(self.topics.log, self.number, start):
            fold.add_log_record(record)
        self.states = fold.states
        self.log_next = fold.log_next.get(self.number, start)
        for state in self.states.values():
            self.arm(state)
        return [DeadLetter(u.record, u.reason, u.detail) for u in fold.unusable]

    def checkpoint(self) -> Outgoing:
        """The record saying that the snapshots cover the log up to `log_next`."""
        checkpoint = Checkpoint(partition=self.number, log_offset=self.log_next)
        return Outgoing(
            self.topics.snapshots,
            checkpoint_key(self.number),
            encode(checkpoint),
            partition=self.number,
        )

    # -- one batch ---------------------------------------------------------------------------

    def stage(self, records: Sequence[Record], now: float, catalog: Catalog) -> Batch:
        """Decides every record and every due timer; returns the transaction to commit."""
        batch = Batch()
        for record in records:
            batch.offsets[(record.topic, record.partition)] = record.offset + 1
            batch.inputs += 1
            self._stage_record(batch, record, now, catalog)
        for saga_id in self.due(now):
            state = batch.states.get(saga_id) or self.states[saga_id]
            definition = catalog.for_state(state)
            try:
                decision = decide(definition, state, Tick(saga_id, now), now)
            except SagaError as exc:
                log.error("saga %s: its timer could not be decided: %s", saga_id, exc)
                continue
            self._stage_decision(batch, decision)
            batch.committed.append(Committed(state, decision, "timer", None, (), now))
        if batch.empty:
            return batch
        t = self.topics
        for state in batch.states.values():
            snap = Snapshot(saga_id=state.saga_id, state=state.model_dump(mode="json"))
            batch.records.append(
                Outgoing(t.snapshots, state.saga_id.encode(), encode(snap), partition=self.number)
            )
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

    def _stage_record(self, batch: Batch, record: Record, now: float, catalog: Catalog) -> None:
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
        state = batch.states.get(saga_id) or self.states.get(saga_id)
        if isinstance(message, StartSaga):
            definition = catalog.for_start(message.saga_name)
        elif state is None:
            self._dead(batch, record, "unknown_saga", f"no saga with id {saga_id!r}")
            return
        else:
            definition = catalog.for_state(state)
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
        self._stage_decision(batch, decision)
        reply = message if isinstance(message, Reply) else None
        batch.committed.append(
            Committed(state, decision, input_kind(message), reply, record.headers, now)
        )

    def _stage_decision(self, batch: Batch, decision: Decision) -> None:
        state = decision.state
        if state is None:
            return
        batch.states[state.saga_id] = state
        key = state.saga_id.encode()
        t = self.topics
        for event in decision.events:
            batch.records.append(Outgoing(t.log, key, encode(event), partition=self.number))
        for command in decision.commands:
            topic, headers = t.commands(command.service), self.observer.headers(command)
            batch.records.append(Outgoing(topic, key, encode(command), headers))
        for alert in decision.alerts:
            batch.records.append(Outgoing(t.alerts, key, encode(alert)))
            batch.alerts.append(alert)
        batch.events += len(decision.events)
        batch.commands += len(decision.commands)

    def _dead(self, batch: Batch, record: Record, reason: str, detail: str) -> None:
        dead = DeadLetter(record, reason, detail)
        dead.log()
        batch.dead.append(dead)
        batch.records.append(dead.outgoing(self.topics.dlq))
