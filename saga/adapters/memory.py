"""An in-process broker that implements the transport port completely.

It keeps Kafka's semantics that the engine relies on: partitioned, append-only topics; keyed
partitioning; consumer groups with committed offsets and a range assignor (so co-partitioned
topics stay together); ``read_committed`` visibility (a transaction's records appear atomically
at commit, with its offsets); and fencing of an older transactional producer by a newer one.
It is used by `saga.testing` and by fast tests; it is not a way around Kafka for the engine's
own integration tests.

Faults can be injected with `MemoryBroker.fail_next_commits` (the next transactions abort) and
`MemoryBroker.append_filters` (records lost on their way in).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from saga.errors import Fenced, TransportError
from saga.runtime.ports import Outgoing, RebalanceListener, Record, TopicPartition

__all__ = ["MemoryBroker", "MemoryTransport"]


@dataclass
class _Group:
    members: list[_MemoryConsumer] = field(default_factory=list)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    generation: int = 0


class MemoryBroker:
    """The broker's whole state: topics, groups, transactional epochs."""

    def __init__(
        self, default_partitions: int = 3, *, max_message_bytes: int | None = None
    ) -> None:
        self.default_partitions = default_partitions
        self.max_message_bytes = max_message_bytes
        """Like Kafka's ``message.max.bytes``: a larger record fails its send or transaction
        (``None``: no limit)."""
        self.topics: dict[str, list[list[Record]]] = {}
        self.compacted: set[str] = set()
        self.groups: dict[str, _Group] = {}
        self.epochs: dict[str, int] = {}
        self.fail_next_commits = 0
        """Fault injection: this many upcoming transactions abort with a TransportError."""
        self.append_filters: list[Callable[[Outgoing], bool]] = []
        """Fault injection: a record that any of these returns false for is lost on its way in
        (not written, offset -1); add one to lose messages, remove it to stop."""
        self.transaction_faults: list[Callable[[Sequence[Outgoing]], str | None]] = []
        """Fault injection: a transaction for whose records any of these returns a reason is
        aborted with a TransportError giving it."""
        self._changed = anyio.Event()

    # -- topics ------------------------------------------------------------------------------

    def check_sizes(self, records: Sequence[Outgoing]) -> None:
        """Refuses a write holding a record over `max_message_bytes`, as Kafka does.

        Raises:
            TransportError: Not retriable: the same write would fail again.
        """
        if self.max_message_bytes is None:
            return
        for r in records:
            size = len(r.key or b"") + len(r.value or b"")
            if size > self.max_message_bytes:
                error = TransportError(
                    f"record too large for {r.topic}: {size} bytes, the broker takes "
                    f"{self.max_message_bytes}"
                )
                error.retriable = False
                raise error

    def ensure(self, topic: str, partitions: int | None = None) -> list[list[Record]]:
        """The partitions of ``topic``, created on first use."""
        if topic not in self.topics:
            self.topics[topic] = [[] for _ in range(partitions or self.default_partitions)]
        return self.topics[topic]

    def append(self, records: Sequence[Outgoing]) -> list[int]:
        """Appends records atomically and wakes readers; returns their offsets.

        A record refused by one of `append_filters` is not written; its offset is -1.
        """
        offsets = []
        now = time.time()
        filters = list(self.append_filters)
        for r in records:
            if not all(keep(r) for keep in filters):
                offsets.append(-1)
                continue
            parts = self.ensure(r.topic)
            p = r.partition if r.partition is not None else _partition(r.key, len(parts))
            log = parts[p]
            offsets.append(len(log))
            log.append(Record(r.topic, p, len(log), r.key, r.value, r.headers, now))
        self._notify()
        return offsets

    def records(self, topic: str, partition: int | None = None) -> list[Record]:
        """Every record of a topic (or one partition), in offset order per partition."""
        parts = self.topics.get(topic, [])
        chosen = parts if partition is None else [parts[partition]]
        return [r for log in chosen for r in log]

    def wake(self) -> None:
        """Wakes whoever waits for a change (pollers, `wait_for_change`) without writing: for a
        virtual clock that moved, so that pollers look at their timers again."""
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for_change(self, timeout: float) -> None:
        """Returns when anything is appended or assignments change, or after ``timeout``."""
        with anyio.move_on_after(timeout):
            await self._changed.wait()

    # -- groups ------------------------------------------------------------------------------

    def _rebalance(self, group: _Group) -> None:
        group.generation += 1
        members = sorted(group.members, key=lambda m: m.member_id)
        plan: dict[int, set[TopicPartition]] = {id(m): set() for m in members}
        topics = sorted({t for m in members for t in m.topics})
        for topic in topics:
            subscribers = [m for m in members if topic in m.topics]
            n = len(self.ensure(topic))
            for p in range(n):  # range assignor: partition p of every topic to the same member
                plan[id(subscribers[p * len(subscribers) // n])].add((topic, p))
        for m in members:
            m.target = frozenset(plan[id(m)])
        self._notify()


def _partition(key: bytes | None, partitions: int) -> int:
    return zlib.crc32(key or b"") % partitions


class _MemoryConsumer:
    _next_id = 0

    def __init__(
        self,
        broker: MemoryBroker,
        group_id: str,
        topics: Sequence[str],
        listener: RebalanceListener | None,
    ) -> None:
        _MemoryConsumer._next_id += 1
        self.member_id = f"{group_id}-{_MemoryConsumer._next_id:06d}"
        self.broker = broker
        self.group = broker.groups.setdefault(group_id, _Group())
        self.topics = tuple(topics)
        self.listener = listener
        self.target: frozenset[TopicPartition] = frozenset()
        self.owned: frozenset[TopicPartition] = frozenset()
        self.positions: dict[TopicPartition, int] = {}

    async def _sync(self) -> None:
        if self.target == self.owned:
            return
        target = self.target
        if self.listener is not None and self.owned:
            await self.listener.on_revoked(self.owned)
        self.owned = target
        self.positions = {tp: self.group.committed.get(tp, 0) for tp in target}
        if self.listener is not None:
            await self.listener.on_assigned(target)

    async def poll(self, timeout: float, max_records: int = 500) -> list[Record]:
        deadline = anyio.current_time() + timeout
        while True:
            await self._sync()
            out: list[Record] = []
            for tp in sorted(self.owned):
                log = self.broker.ensure(tp[0])[tp[1]]
                pos = self.positions[tp]
                take = log[pos : pos + max_records - len(out)]
                out.extend(take)
                self.positions[tp] = pos + len(take)
                if len(out) >= max_records:
                    break
            remaining = deadline - anyio.current_time()
            if out or remaining <= 0:
                return out
            await self.broker.wait_for_change(remaining)

    def assignment(self) -> frozenset[TopicPartition]:
        return self.owned

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.group.committed.update(offsets)

    async def seek_to_committed(self, partitions: frozenset[TopicPartition]) -> None:
        for tp in partitions & self.owned:
            self.positions[tp] = self.group.committed.get(tp, 0)
        # A poll already waiting sees the rewound records now, as Kafka's fetcher would.
        self.broker.wake()


class _MemoryTail:
    """A group-less reader of some partitions of one topic (`MemoryTransport.tail`)."""

    def __init__(self, broker: MemoryBroker, topic: str, starts: Mapping[int, int]) -> None:
        parts = broker.ensure(topic)
        missing = sorted(p for p in starts if not 0 <= p < len(parts))
        if missing:
            error = TransportError(f"{topic} has {len(parts)} partitions, not {missing}")
            error.retriable = False
            raise error
        self.broker = broker
        self.topic = topic
        # A negative start reads from the beginning, as Kafka's earliest reset would.
        self.next = {p: max(0, o) for p, o in sorted(starts.items())}
        self._first = 0  # the partition the next poll begins with: in turns, so none starves

    async def poll(self, timeout: float, max_records: int = 500) -> list[Record]:
        deadline = anyio.current_time() + timeout
        order = list(self.next)
        while True:
            parts = self.broker.ensure(self.topic)
            out: list[Record] = []
            turn = order[self._first :] + order[: self._first]
            self._first = (self._first + 1) % max(1, len(order))
            for p in turn:
                pos = self.next[p]
                take = parts[p][pos : pos + max_records - len(out)]
                out.extend(take)
                self.next[p] = pos + len(take)
                if len(out) >= max_records:
                    break
            remaining = deadline - anyio.current_time()
            if out or remaining <= 0:
                # A checkpoint even with records at hand: a tail that always has some must
                # not keep its caller's other tasks from running.
                await anyio.lowlevel.checkpoint()
                return out
            await self.broker.wait_for_change(remaining)

    async def end_offsets(self) -> dict[int, int]:
        await anyio.lowlevel.checkpoint()
        parts = self.broker.ensure(self.topic)
        return {p: len(parts[p]) for p in self.next}

    async def positions(self) -> dict[int, int]:
        await anyio.lowlevel.checkpoint()
        return dict(self.next)


class _MemoryProducer:
    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker

    async def send(self, records: Sequence[Outgoing]) -> None:
        self.broker.check_sizes(records)
        self.broker.append(records)
        await anyio.lowlevel.checkpoint()


class _MemoryTxProducer:
    def __init__(self, broker: MemoryBroker, transactional_id: str) -> None:
        self.broker = broker
        self.tid = transactional_id
        self.epoch = broker.epochs.get(transactional_id, 0) + 1
        broker.epochs[transactional_id] = self.epoch

    async def commit(
        self,
        records: Sequence[Outgoing],
        offsets: Mapping[TopicPartition, int],
        group_id: str,
    ) -> list[int]:
        await anyio.lowlevel.checkpoint()
        if self.broker.epochs.get(self.tid) != self.epoch:
            raise Fenced(f"transactional id {self.tid!r} was taken over by a newer producer")
        if self.broker.fail_next_commits > 0:
            self.broker.fail_next_commits -= 1
            raise TransportError("injected fault: the transaction was aborted")
        for fault in self.broker.transaction_faults:
            if (reason := fault(records)) is not None:
                raise TransportError(f"injected fault: the transaction was aborted: {reason}")
        self.broker.check_sizes(records)
        result = self.broker.append(records)
        self.broker.groups.setdefault(group_id, _Group()).committed.update(offsets)
        return result


class MemoryTransport:
    """The transport port over a `MemoryBroker` (a new one unless given)."""

    def __init__(self, broker: MemoryBroker | None = None) -> None:
        self.broker = broker or MemoryBroker()

    async def ensure_topics(
        self, names: Sequence[str], partitions: int, compacted: Sequence[str] = ()
    ) -> None:
        for name in names:
            self.broker.ensure(name, partitions)
        self.broker.compacted.update(compacted)

    async def partitions(self, topic: str) -> int:
        return len(self.broker.ensure(topic))

    def partition_for(self, key: bytes, partitions: int) -> int:
        return _partition(key, partitions)

    @asynccontextmanager
    async def consumer(
        self,
        group_id: str,
        topics: Sequence[str],
        listener: RebalanceListener | None = None,
    ) -> AsyncIterator[_MemoryConsumer]:
        member = _MemoryConsumer(self.broker, group_id, topics, listener)
        member.group.members.append(member)
        self.broker._rebalance(member.group)
        try:
            yield member
        finally:
            member.group.members.remove(member)
            if member.owned and listener is not None:
                with anyio.CancelScope(shield=True):
                    await listener.on_revoked(member.owned)
            self.broker._rebalance(member.group)

    @asynccontextmanager
    async def producer(self) -> AsyncIterator[_MemoryProducer]:
        yield _MemoryProducer(self.broker)

    @asynccontextmanager
    async def tx_producer(self, transactional_id: str) -> AsyncIterator[_MemoryTxProducer]:
        yield _MemoryTxProducer(self.broker, transactional_id)

    @asynccontextmanager
    async def tail(self, topic: str, starts: Mapping[int, int]) -> AsyncIterator[_MemoryTail]:
        yield _MemoryTail(self.broker, topic, starts)

    async def read(self, topic: str, partition: int, start: int = 0) -> AsyncIterator[Record]:
        log = self.broker.ensure(topic)[partition]
        end = len(log)
        for record in log[start:end]:
            yield record
