"""The ports the runtime talks through: a broker-shaped transport and a clock.

They are deliberately Kafka-shaped (topics, partitions, offsets, consumer groups, transactions),
because the guarantees are Kafka's; `saga.adapters.kafka` implements them with aiokafka and
`saga.adapters.memory` implements them in-process, completely, for users' unit tests and fast
property tests. One contract suite (tests/contract) runs against both.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "UNSEALED_HEADER",
    "Clock",
    "Consumer",
    "Headers",
    "Outgoing",
    "Producer",
    "RebalanceListener",
    "Record",
    "SystemClock",
    "Tail",
    "TopicPartition",
    "Topics",
    "Transport",
    "TxProducer",
]

TopicPartition = tuple[str, int]
Headers = tuple[tuple[str, bytes], ...]
"""Record headers: (name, value) pairs, in order."""

UNSEALED_HEADER = "saga-unsealed-error"
"""Set on a record by a transport that could not open its sealed payload
(`saga.adapters.sealing`): its value is left as it came, and the reader sets the record aside
with this header's text as the reason. Never taken from the wire: such a transport strips it
from what it receives first."""


@dataclass(frozen=True, slots=True)
class Record:
    """A record read from a topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = ()
    timestamp: float = 0.0
    wire_value: bytes | None = None
    """The value as the broker holds it, when a transport changed it on the way in (it opened
    sealed payloads); ``None`` when ``value`` is that. Signatures are over these bytes."""

    @property
    def as_written(self) -> Record:
        """The record as its producer wrote it (``wire_value`` as its value), for checking
        its signature."""
        if self.wire_value is None:
            return self
        return Record(
            self.topic,
            self.partition,
            self.offset,
            self.key,
            self.wire_value,
            self.headers,
            self.timestamp,
        )

    def header(self, name: str) -> str | None:
        """The first header called ``name``, decoded as text (``None`` if absent)."""
        for key, value in self.headers:
            if key == name:
                return value.decode(errors="replace")
        return None


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A record to write. ``partition=None`` partitions by key; ``value=None`` is a tombstone."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers = ()
    partition: int | None = None


@dataclass(frozen=True, slots=True)
class Topics:
    """The engine's topic names under one prefix (DESIGN section 3)."""

    prefix: str = "saga"

    @property
    def requests(self) -> str:
        """Start, cancel and operator requests."""
        return f"{self.prefix}.requests"

    @property
    def replies(self) -> str:
        """Participants' replies."""
        return f"{self.prefix}.replies"

    @property
    def log(self) -> str:
        """The event log, written only by the coordinator."""
        return f"{self.prefix}.log"

    @property
    def snapshots(self) -> str:
        """Latest state per saga (compacted)."""
        return f"{self.prefix}.snapshots"

    @property
    def dlq(self) -> str:
        """Poison messages with their reason."""
        return f"{self.prefix}.dlq"

    @property
    def alerts(self) -> str:
        """Stuck sagas."""
        return f"{self.prefix}.alerts"

    @property
    def definitions(self) -> str:
        """Every published saga definition, keyed ``name@version`` (compacted;
        `saga.runtime.definitions`)."""
        return f"{self.prefix}.definitions"

    def commands(self, service: str) -> str:
        """One service's command topic."""
        return f"{self.prefix}.commands.{service}"

    @property
    def coordinator_group(self) -> str:
        """The coordinators' consumer group."""
        return f"{self.prefix}.coordinator"

    def participant_group(self, service: str) -> str:
        """One service's participants' consumer group."""
        return f"{self.prefix}.participant.{service}"


class Clock(Protocol):
    """Where time comes from; `saga.testing` substitutes virtual time."""

    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Waits ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The wall clock."""

    def now(self) -> float:
        """Seconds since the epoch."""
        return time.time()

    async def sleep(self, seconds: float) -> None:
        """Sleeps in real time."""
        import anyio

        await anyio.sleep(seconds)


class RebalanceListener(Protocol):
    """Told when a consumer group member gains or loses partitions."""

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        """Before the partitions go to another member; finish or drop work on them."""
        ...

    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        """After the partitions were given to this member."""
        ...


class Consumer(Protocol):
    """A consumer group member."""

    async def poll(self, timeout: float, max_records: int = 500) -> list[Record]:
        """Records from the assigned partitions, waiting up to ``timeout`` seconds for some."""
        ...

    def assignment(self) -> frozenset[TopicPartition]:
        """The partitions this member owns now."""
        ...

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commits the next offsets to read (outside any transaction)."""
        ...

    async def seek_to_committed(self, partitions: frozenset[TopicPartition]) -> None:
        """Rewinds to the group's committed offsets, so that uncommitted records come again."""
        ...


class Producer(Protocol):
    """An idempotent, non-transactional producer."""

    async def send(self, records: Sequence[Outgoing]) -> None:
        """Writes the records and waits until the broker acknowledged all of them."""
        ...


class TxProducer(Protocol):
    """A transactional producer, one per owned input partition."""

    async def commit(
        self,
        records: Sequence[Outgoing],
        offsets: Mapping[TopicPartition, int],
        group_id: str,
    ) -> list[int]:
        """Writes the records and commits the consumer offsets in one transaction.

        Returns:
            The offset of each record, in order.

        Raises:
            saga.errors.Fenced: A newer producer with the same transactional id exists.
            saga.errors.TransportError: The transaction was aborted; nothing was written.
        """
        ...


class Tail(Protocol):
    """A long-lived ``read_committed`` reader of some partitions of one topic, in no consumer
    group (`Transport.tail`): it follows them from given offsets for as long as it is open."""

    async def poll(self, timeout: float, max_records: int = 500) -> list[Record]:
        """The next committed records of the tailed partitions (in offset order per partition),
        waiting up to ``timeout`` seconds for some; ``[]`` if none came."""
        ...

    async def end_offsets(self) -> dict[int, int]:
        """Per tailed partition, its last stable offset now: the end that ``read_committed``
        can reach (past the last decided transaction's markers; an open transaction holds it
        back)."""
        ...

    async def positions(self) -> dict[int, int]:
        """Per tailed partition, the offset the next poll reads from: past every record
        returned and past what ``read_committed`` passes over (transaction markers, aborted
        records), so that it equals `end_offsets` once everything was read."""
        ...


class Transport(Protocol):
    """A Kafka-shaped broker."""

    async def ensure_topics(
        self, names: Sequence[str], partitions: int, compacted: Sequence[str] = ()
    ) -> None:
        """Creates the topics that are missing; existing ones are left as they are."""
        ...

    async def partitions(self, topic: str) -> int:
        """The number of partitions of ``topic``."""
        ...

    def partition_for(self, key: bytes, partitions: int) -> int:
        """The partition a keyed record goes to (the producers' partitioner)."""
        ...

    def consumer(
        self,
        group_id: str,
        topics: Sequence[str],
        listener: RebalanceListener | None = None,
    ) -> AbstractAsyncContextManager[Consumer]:
        """A ``read_committed`` group member that starts from the earliest offset."""
        ...

    def producer(self) -> AbstractAsyncContextManager[Producer]:
        """An idempotent producer."""
        ...

    def tx_producer(self, transactional_id: str) -> AbstractAsyncContextManager[TxProducer]:
        """A transactional producer; opening it fences older ones with the same id."""
        ...

    def read(self, topic: str, partition: int, start: int = 0) -> AsyncIterator[Record]:
        """Reads committed records of one partition from ``start`` to its current end."""
        ...

    def tail(self, topic: str, starts: Mapping[int, int]) -> AbstractAsyncContextManager[Tail]:
        """A `Tail` of the partitions of ``topic`` that ``starts`` names, each read from its
        offset there (an offset below what the broker still holds reads from the earliest
        it holds), until it is closed."""
        ...
