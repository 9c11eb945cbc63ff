"""`SagaClient`: start, cancel, retry and inspect sagas from any process, through the topics.

A client needs no coordinator in its process: requests go to the requests topic, and status
is read from the compacted snapshots topic, the projection the coordinator keeps of the log.
`replay` reads a saga's events from the log itself, the source of truth.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from typing import Any

import anyio
from pydantic import TypeAdapter

from saga.core.codec import decode, encode
from saga.core.messages import (
    CancelSaga,
    EventBase,
    ResolveSaga,
    RetrySaga,
    Snapshot,
    StartSaga,
    event_adapter,
)
from saga.core.state import SagaState, SagaStatus
from saga.errors import DecodeError, SagaTimeout, UnknownSaga
from saga.runtime.ports import Clock, Outgoing, Producer, SystemClock, Topics, Transport

__all__ = ["SagaClient", "new_saga_id"]

_snapshot_adapter: TypeAdapter[Snapshot] = TypeAdapter(Snapshot)


def new_saga_id() -> str:
    """A fresh, random saga id."""
    return uuid.uuid4().hex


class SagaClient:
    """Talks to the coordinators through Kafka topics.

    Use it as an async context manager (it holds a producer open), or call `aclose`.

    Args:
        transport: The broker.
        prefix: Topic name prefix.
        clock: Time source for request timestamps.
        partitions: Partition count if the client has to create the engine's topics (it must
            match the coordinators' ``partitions``).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        prefix: str = "saga",
        clock: Clock | None = None,
        partitions: int = 6,
    ) -> None:
        self.transport = transport
        self.topics = Topics(prefix)
        self.clock = clock or SystemClock()
        self.partitions = partitions
        self._stack = AsyncExitStack()
        self._producer: Producer | None = None
        self._topics_ready = False

    async def _ensure_topics(self) -> None:
        # A broker that auto-creates topics would give a client's first write a one-partition
        # topic, which the coordinator cannot co-partition; create them right. Reads create
        # nothing: a mistyped prefix must not leave topics behind.
        if not self._topics_ready:
            t = self.topics
            names = [t.requests, t.replies, t.log, t.snapshots, t.dlq, t.alerts]
            await self.transport.ensure_topics(names, self.partitions, compacted=[t.snapshots])
            self._topics_ready = True

    async def __aenter__(self) -> SagaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the producer."""
        self._producer = None
        await self._stack.aclose()

    async def _send(
        self,
        saga_id: str,
        message: StartSaga | CancelSaga | RetrySaga | ResolveSaga,
        headers: tuple[tuple[str, bytes], ...] = (),
    ) -> None:
        await self._ensure_topics()
        if self._producer is None:
            self._producer = await self._stack.enter_async_context(self.transport.producer())
        record = Outgoing(self.topics.requests, saga_id.encode(), encode(message), headers)
        await self._producer.send([record])

    async def start(
        self,
        name: str,
        input: Mapping[str, Any],
        saga_id: str | None = None,
        *,
        headers: tuple[tuple[str, bytes], ...] = (),
    ) -> str:
        """Asks for a saga to start and returns its id. Starting an existing id does nothing."""
        saga_id = saga_id or new_saga_id()
        _check_id(saga_id)
        message = StartSaga(
            message_id=new_saga_id(),
            saga_id=saga_id,
            saga_name=name,
            input=dict(input),
            at=self.clock.now(),
        )
        await self._send(saga_id, message, headers)
        return saga_id

    async def cancel(self, saga_id: str, reason: str = "cancelled by request") -> None:
        """Asks for a saga to be cancelled; honoured until its pivot starts."""
        message = CancelSaga(
            message_id=new_saga_id(), saga_id=saga_id, reason=reason, at=self.clock.now()
        )
        await self._send(saga_id, message)

    async def retry(self, saga_id: str) -> None:
        """Asks for a stuck saga's stuck steps or compensations to run again."""
        message = RetrySaga(message_id=new_saga_id(), saga_id=saga_id, at=self.clock.now())
        await self._send(saga_id, message)

    async def resolve(self, saga_id: str, note: str = "resolved by an operator") -> None:
        """Declares a stuck saga's stuck steps handled by hand; the saga then carries on."""
        message = ResolveSaga(
            message_id=new_saga_id(), saga_id=saga_id, note=note, at=self.clock.now()
        )
        await self._send(saga_id, message)

    async def _partition(self, topic: str, saga_id: str) -> int:
        count = await self.transport.partitions(topic)
        return self.transport.partition_for(saga_id.encode(), count)

    async def status(self, saga_id: str) -> SagaState | None:
        """The saga's latest committed state, or ``None`` if no coordinator has recorded it."""
        partition = await self._partition(self.topics.snapshots, saga_id)
        key = saga_id.encode()
        found: SagaState | None = None
        async for record in self.transport.read(self.topics.snapshots, partition):
            if record.key == key:
                found = _state_from(record.value) if record.value else None
        return found

    async def states(self) -> AsyncIterator[SagaState]:
        """Every saga's latest state (reads the whole snapshots topic)."""
        count = await self.transport.partitions(self.topics.snapshots)
        for partition in range(count):
            latest: dict[bytes, bytes | None] = {}
            async for record in self.transport.read(self.topics.snapshots, partition):
                if record.key is not None and not record.key.startswith(b"__"):
                    latest[record.key] = record.value
            for value in latest.values():
                if value:
                    yield _state_from(value)

    async def events(self, saga_id: str) -> list[EventBase]:
        """The saga's events from the log, in order."""
        partition = await self._partition(self.topics.log, saga_id)
        key = saga_id.encode()
        found: list[EventBase] = []
        async for record in self.transport.read(self.topics.log, partition):
            if record.key == key:
                try:
                    found.append(decode(event_adapter, record.value))
                except DecodeError:
                    continue  # only the coordinator writes the log; it never writes junk
        if not found:
            raise UnknownSaga(f"no events for saga {saga_id!r} in {self.topics.log}")
        return found

    async def wait(self, saga_id: str, timeout: float, *, poll: float = 0.5) -> SagaState:
        """Waits until the saga is completed, compensated or stuck.

        Raises:
            SagaTimeout: It did not end within ``timeout`` seconds.
        """
        last: SagaState | None = None
        with anyio.move_on_after(timeout):
            while True:
                last = await self.status(saga_id)
                if last is not None and last.status in _ENDED:
                    return last
                await anyio.sleep(poll)
        state = last.status.value if last else "not started"
        raise SagaTimeout(f"saga {saga_id!r} did not end within {timeout}s (it is {state})")


_ENDED = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.STUCK})


def _state_from(value: bytes) -> SagaState:
    snapshot = decode(_snapshot_adapter, value)
    return SagaState.model_validate(snapshot.state)


def _check_id(saga_id: str) -> None:
    if not saga_id or len(saga_id) > 200 or saga_id.startswith("__"):
        raise ValueError(
            f"saga id {saga_id!r} is invalid: use 1 to 200 characters, not starting with '__'"
        )
