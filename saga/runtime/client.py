"""`SagaClient`: start, cancel, retry and inspect sagas from any process, through the topics.

A client needs no coordinator in its process: requests go to the requests topic, and status
is read from the compacted snapshots topic, the projection the coordinator keeps of the log.
`replay` reads a saga's events from the log itself, the source of truth.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import anyio

from saga.core.codec import ENGINE_LIMITS, decode, encode
from saga.core.messages import (
    CancelSaga,
    DecideApproval,
    EventBase,
    IfExists,
    Request,
    ResolveSaga,
    RetrySaga,
    SignalSaga,
    StartSaga,
    event_adapter,
)
from saga.core.replay import Replay, is_saga_key
from saga.core.state import SagaState, SagaStatus
from saga.errors import DecodeError, SagaExists, SagaTimeout, UnknownSaga, UsageError
from saga.runtime.gate import SealsRecords
from saga.runtime.observe import NullObserver, Observer
from saga.runtime.ports import (
    Clock,
    Headers,
    Outgoing,
    Producer,
    Record,
    SystemClock,
    Topics,
    Transport,
)

if TYPE_CHECKING:
    from saga.runtime.trust import SigningKey

__all__ = ["SagaClient", "new_saga_id"]


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
        observer: Gives each request its headers (trace context); none by default.
        local: A source of state consulted before the snapshots (a coordinator's memory of the
            sagas it owns); ``None`` for the saga it does not know.
        signer: Signs every request (`saga.runtime.trust`): required where the coordinators
            verify signatures, which then record its principal as who asked.
        actor: Who asks, when requests are not signed (recorded as an unverified claim);
            ignored with a ``signer``, whose principal is who asks.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        prefix: str = "saga",
        clock: Clock | None = None,
        partitions: int = 6,
        observer: Observer | None = None,
        local: Callable[[str], SagaState | None] | None = None,
        signer: SigningKey | None = None,
        actor: str | None = None,
    ) -> None:
        self.transport = transport
        self.signer = signer
        self.actor = signer.principal if signer is not None else actor
        self.topics = Topics(prefix)
        self.clock = clock or SystemClock()
        self.partitions = partitions
        self.observer: Observer = observer or NullObserver()
        self._local = local
        self._stack = AsyncExitStack()
        self._producer: Producer | None = None
        self._topics_ready = False
        self._tails: dict[int, _Tail] = {}

    async def _ensure_topics(self) -> None:
        # A broker that auto-creates topics would give a client's first write a one-partition
        # topic, which the coordinator cannot co-partition; create them right. Reads create
        # nothing: a mistyped prefix must not leave topics behind. Only the topics a client
        # uses: on a secured broker it may not even see the others (the coordinator makes them).
        if not self._topics_ready:
            t = self.topics
            names = [t.requests, t.log, t.snapshots]
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

    async def _send(self, message: Request, headers: Headers = ()) -> None:
        await self._ensure_topics()
        if self._producer is None:
            self._producer = await self._stack.enter_async_context(self.transport.producer())
        headers = (*self.observer.headers(message), *headers)
        record = Outgoing(self.topics.requests, message.saga_id.encode(), encode(message), headers)
        if self.signer is not None:
            # Sealed, then signed (see saga.runtime.gate): the bytes signed are those written.
            if isinstance(self.transport, SealsRecords):
                record = self.transport.seal_record(record)
            record = self.signer.sign_outgoing(record)
        await self._producer.send([record])

    async def start(
        self,
        name: str,
        input: Mapping[str, Any],
        saga_id: str | None = None,
        *,
        headers: Headers = (),
        if_exists: IfExists = "return",
    ) -> str:
        """Asks for a saga to start and returns its id.

        A client holds no definitions: a start the coordinator cannot run (no definition of
        that name, an input that does not fit it) is recorded as a saga with status
        ``rejected`` and the reason, which `status` and `wait` report. A start for an id that
        already names a saga follows ``if_exists``, the id-reuse policy: ``"return"`` keeps
        the existing saga (the request changes nothing; `wait` gives the existing saga's end),
        ``"refuse"`` refuses a request whose name or input differs from the saga's. Either way
        the coordinator records the duplicate in the saga's log (``start_ignored`` or
        ``start_refused``). A rejected saga can be started again: nothing ran.

        Args:
            name: The saga definition's name.
            input: The saga input.
            saga_id: The id (default: a new random one).
            headers: Extra headers for the request.
            if_exists: ``"return"`` or ``"refuse"`` (see above).

        Raises:
            UsageError: ``saga_id`` is not a valid id.
            SagaExists: ``if_exists="refuse"`` and the id names a saga with another name or
                input (nothing is sent). Two such starts racing are decided by the
                coordinator, which records the later one as ``start_refused``.
        """
        saga_id = saga_id or new_saga_id()
        _check_id(saga_id)
        message = StartSaga(
            message_id=new_saga_id(),
            saga_id=saga_id,
            saga_name=name,
            input=dict(input),
            at=self.clock.now(),
            if_exists=if_exists,
            by=self.actor,
        )
        if if_exists == "refuse":
            existing = await self.status(saga_id)
            if existing is not None and existing.status is not SagaStatus.REJECTED:
                asked = message.model_dump(mode="json")
                differs = [
                    what
                    for what, mine, theirs in (
                        ("name", asked["saga_name"], existing.name),
                        ("input", asked["input"], existing.input),
                    )
                    if mine != theirs
                ]
                if differs:
                    raise SagaExists(
                        f"saga {saga_id!r} exists ({existing.status.value}, {existing.name!r}) "
                        f"with another {' and '.join(differs)}: refused (if_exists='refuse'); "
                        "nothing was sent"
                    )
        await self._send(message, headers)
        return saga_id

    async def cancel(self, saga_id: str, reason: str = "cancelled by request") -> int:
        """Asks for a saga to be cancelled; honoured until its pivot starts.

        Returns:
            The saga's ``seq`` when asked (0 if it is not recorded yet: a cancel may follow
            its start closely); `wait` with ``after=`` it waits for what follows.
        """
        state = await self.status(saga_id)
        seq = state.seq if state is not None else 0
        message = CancelSaga(
            message_id=new_saga_id(),
            saga_id=saga_id,
            reason=reason,
            at=self.clock.now(),
            by=self.actor,
        )
        await self._send(message)
        return seq

    async def retry(self, saga_id: str, reason: str | None = None) -> int:
        """Asks for a stuck saga's stuck steps or compensations to run again (``reason``: why,
        for the audit trail).

        Returns:
            The saga's ``seq`` when asked: ``wait(saga_id, t, after=seq)`` waits for the
            re-driven run, not for the stuck state the saga had (a stuck saga changes only
            when a request re-drives it, so that ``seq`` is the state the retry supersedes).

        Raises:
            UnknownSaga: No coordinator has recorded a saga with that id.
        """
        seq = await self._seq(saga_id)
        message = RetrySaga(
            message_id=new_saga_id(),
            saga_id=saga_id,
            at=self.clock.now(),
            reason=reason,
            by=self.actor,
        )
        await self._send(message)
        return seq

    async def resolve(self, saga_id: str, note: str = "resolved by an operator") -> int:
        """Declares a stuck saga's stuck steps handled by hand; the saga then carries on.

        Returns:
            The saga's ``seq`` when asked (see `retry`).

        Raises:
            UnknownSaga: No coordinator has recorded a saga with that id.
        """
        seq = await self._seq(saga_id)
        at = self.clock.now()
        message = ResolveSaga(
            message_id=new_saga_id(), saga_id=saga_id, note=note, at=at, by=self.actor
        )
        await self._send(message)
        return seq

    async def signal(self, saga_id: str, name: str, data: Mapping[str, Any] | None = None) -> int:
        """Delivers the signal ``name`` (with ``data``) to a saga: the ``wait`` step waiting
        for it completes with ``data`` as its output; a signal that comes before the step
        waits is kept for it. A signal the saga cannot take (it has ended, or its step has
        finished) is recorded as ``signal_rejected``.

        A signal may follow its saga's start at once: the two reach the coordinator in the
        order they were sent (one saga's requests share a partition). One for an id that no
        saga has by then is dead-lettered (``unknown_saga``).

        Returns:
            The saga's ``seq`` when asked (0 if it is not recorded yet; see `cancel`).
        """
        state = await self.status(saga_id)
        seq = state.seq if state is not None else 0
        message = SignalSaga(
            message_id=new_saga_id(),
            saga_id=saga_id,
            name=name,
            data=dict(data or {}),
            at=self.clock.now(),
            by=self.actor,
        )
        await self._send(message)
        return seq

    async def approve(self, saga_id: str, step: str, note: str = "") -> int:
        """Approves the saga's ``approval`` step ``step`` (as this client's principal, which
        must be one of its approvers).

        Returns:
            The saga's ``seq`` when asked (see `retry`).

        Raises:
            UnknownSaga: No coordinator has recorded a saga with that id.
        """
        return await self._decide(saga_id, step, True, note)

    async def reject(self, saga_id: str, step: str, note: str = "") -> int:
        """Rejects the saga's ``approval`` step ``step``: a business failure, so the saga
        compensates.

        Returns:
            The saga's ``seq`` when asked (see `retry`).

        Raises:
            UnknownSaga: No coordinator has recorded a saga with that id.
        """
        return await self._decide(saga_id, step, False, note)

    async def _decide(self, saga_id: str, step: str, approve: bool, note: str) -> int:
        seq = await self._seq(saga_id)
        message = DecideApproval(
            message_id=new_saga_id(),
            saga_id=saga_id,
            step=step,
            approve=approve,
            note=note,
            at=self.clock.now(),
            by=self.actor,
        )
        await self._send(message)
        return seq

    async def _seq(self, saga_id: str) -> int:
        state = await self.status(saga_id)
        if state is None:
            raise UnknownSaga(
                f"no saga with id {saga_id!r} has been recorded under prefix "
                f"{self.topics.prefix!r}: check the id (saga list) and the prefix"
            )
        return state.seq

    async def _partition(self, topic: str, saga_id: str) -> int:
        count = await self.transport.partitions(topic)
        return self.transport.partition_for(saga_id.encode(), count)

    async def status(self, saga_id: str) -> SagaState | None:
        """The saga's latest committed state, or ``None`` if no coordinator has recorded it."""
        if self._local is not None and (state := self._local(saga_id)) is not None:
            return state
        partition = await self._partition(self.topics.snapshots, saga_id)
        tail = self._tails.setdefault(partition, _Tail())
        key = saga_id.encode()
        # The first question about a saga reads its partition once; later ones (a `wait`
        # polling) read only what was written since.
        start = tail.next if key in tail.latest else 0
        tail.watch(key)
        async for record in self.transport.read(self.topics.snapshots, partition, start):
            tail.see(record)
        latest = tail.latest.get(key)
        if latest is None:
            return None
        fold: Replay[Record] = Replay()
        fold.add_snapshot(latest)
        return fold.states.get(saga_id)

    async def states(self) -> AsyncIterator[SagaState]:
        """Every saga's latest state (reads the whole snapshots topic)."""
        count = await self.transport.partitions(self.topics.snapshots)
        for partition in range(count):
            fold: Replay[Record] = Replay()
            async for record in self.transport.read(self.topics.snapshots, partition):
                if is_saga_key(record.key):
                    fold.add_snapshot(record)
            for state in fold.states.values():
                yield state

    async def events(self, saga_id: str) -> list[EventBase]:
        """The saga's events from the log, in order."""
        partition = await self._partition(self.topics.log, saga_id)
        key = saga_id.encode()
        found: list[EventBase] = []
        async for record in self.transport.read(self.topics.log, partition):
            if record.key == key:
                try:
                    found.append(decode(event_adapter, record.value, ENGINE_LIMITS))
                except DecodeError:
                    continue  # only the coordinator writes the log; it never writes junk
        if not found:
            raise UnknownSaga(f"no events for saga {saga_id!r} in {self.topics.log}")
        return found

    async def wait(
        self, saga_id: str, timeout: float, *, after: int = 0, poll: float = 0.5
    ) -> SagaState:
        """Waits until the saga is completed, compensated or stuck.

        Args:
            saga_id: The saga.
            timeout: Seconds to wait at most.
            after: Only a final state with a ``seq`` past this counts: pass what `retry`,
                `resolve` or `cancel` returned to wait for what the request led to.
            poll: Seconds between reads of the snapshots.

        Raises:
            SagaTimeout: It did not end within ``timeout`` seconds.
        """
        last: SagaState | None = None
        with anyio.move_on_after(timeout):
            while True:
                last = await self.status(saga_id)
                if last is not None and last.is_final and last.seq > after:
                    return last
                await anyio.sleep(poll)
        state = last.status.value if last else "not started"
        raise SagaTimeout(f"saga {saga_id!r} did not end within {timeout}s (it is {state})")


def _check_id(saga_id: str) -> None:
    if not saga_id or len(saga_id) > 200 or saga_id.startswith("__"):
        raise UsageError(
            f"saga id {saga_id!r} is invalid: use 1 to 200 characters, not starting with '__'"
        )


class _Tail:
    """What a client has read of one snapshots partition, for the sagas it was asked about."""

    MAX_WATCHED = 10_000
    """Most sagas remembered per partition (the oldest asked about are forgotten first)."""

    def __init__(self) -> None:
        self.next = 0
        """The offset after the last record read."""
        self.latest: dict[bytes, Record | None] = {}
        """Per saga asked about, its latest snapshot record (``None``: none seen yet)."""

    def watch(self, key: bytes) -> None:
        if key not in self.latest:
            self.latest[key] = None
            while len(self.latest) > self.MAX_WATCHED:
                del self.latest[next(iter(self.latest))]

    def see(self, record: Record) -> None:
        self.next = max(self.next, record.offset + 1)
        if record.key in self.latest:
            self.latest[record.key] = record
