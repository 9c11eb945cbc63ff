"""`Participant`: a service's side of its sagas.

Theory of operation
-------------------
A participant is what a service *is*: its name, its handlers, its reply store. It is declared
once, usually at module level, where no broker exists yet; where and how it runs (the
transport, the topic prefix, the observer, the clock) is given to `Participant.run` or
`Participant.serving`, and nothing about the participant changes after it is built.

While it runs, a participant is a member of the consumer group
``<prefix>.participant.<service>`` on the service's command topic. For each polled batch it
handles the commands of different sagas concurrently and the commands of one saga in order,
sends every reply, and only then commits the batch's offsets. A crash before the commit
redelivers the batch, so handling is at-least-once, and `ReplyStore` makes it effectively-once:

- Before running a handler the participant looks up the command's idempotency key. A stored
  outcome is replied again without running the handler.
- Successes and business failures are stored under the key (they are final for the step).
  Technical failures are stored under the key and the attempt: a retry (a new attempt) runs
  the handler again, but a redelivery of the attempt that failed replays its failure, since the
  coordinator may have given up on the step after it and would never undo a late effect.
- A compensation stores a marker for its step's action, so an action that arrives after its own
  compensation (a late retry) is refused instead of taking effect that nobody will undo.

Calling a handler (its context, interceptors, worker threads for plain functions, and the
classification of its outcome) is `saga.runtime.handlers`. The handler receives the idempotency
key in its context, to pass on to side effects outside
Kafka (a payment provider's idempotency header, a unique column): that closes the window
between a side effect and the store's write.

Interceptors (`Participant.intercept`) wrap every handler call, inside the classification of
its outcome: a `StepFailed` an interceptor raises is a business failure, any other exception a
technical one, exactly as if the handler had raised it.

A broker that cannot be reached is waited for, at start-up as while serving: every retriable
`TransportError` (``TransportError.retriable``) is retried with a capped exponential backoff,
and records of a batch not committed come again after a rewind to the committed offsets.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskStatus
from pydantic import BaseModel

from saga.core.codec import COMMAND_LIMITS, Limits, decode, encode
from saga.core.messages import Command, ErrorInfo, Reply, command_adapter
from saga.errors import DecodeError, TransportError, UsageError
from saga.runtime.dlq import DeadLetter
from saga.runtime.handlers import (
    CallNext,
    Handler,
    HandlerResult,
    Interception,
    Interceptor,
    Registered,
    StepContext,
    invoke,
)
from saga.runtime.observe import NullObserver, Observer
from saga.runtime.ports import (
    Clock,
    Consumer,
    Outgoing,
    Producer,
    Record,
    SystemClock,
    TopicPartition,
    Topics,
    Transport,
)
from saga.runtime.stores import MemoryReplyStore, ReplyStore

__all__ = [
    "CallNext",
    "Handler",
    "HandlerResult",
    "Interception",
    "Interceptor",
    "Participant",
    "ParticipantStats",
    "StepContext",
]

log = logging.getLogger("saga.participant")


@dataclass
class ParticipantStats:
    """Counters of what this participant did since it was built (across its runs)."""

    handled: int = 0
    replayed: int = 0
    business_failures: int = 0
    technical_failures: int = 0
    dead_letters: dict[str, int] = field(default_factory=lambda: defaultdict(int))


@dataclass(frozen=True, slots=True)
class _Deployment:
    """Where and how one `Participant.run` serves."""

    transport: Transport
    topics: Topics
    partitions: int
    observer: Observer
    clock: Clock
    limiter: anyio.CapacityLimiter


class _Backoff:
    """Capped exponential waits between attempts to reach the broker."""

    initial = 0.1
    cap = 5.0

    def __init__(self) -> None:
        self.delay = self.initial

    def reset(self) -> None:
        self.delay = self.initial

    async def wait(self, service: str, what: str, exc: TransportError) -> None:
        log.warning("%s: %s: %s; retrying in %.1fs", service, what, exc, self.delay)
        await anyio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.cap)


class Participant:
    """A service's handlers for saga actions and compensations.

    Example::

        payment = Participant("payment")

        @payment.handler("charge")
        async def charge(payload: dict, ctx: StepContext) -> dict:
            return {"charge_id": await psp.charge(payload["amount"], key=ctx.idempotency_key)}

        await payment.run(KafkaTransport("127.0.0.1:9092"))   # or: async with payment.serving(...)

    Args:
        service: The service name used in definitions (``Step.service``).
        store: Where outcomes are kept for deduplication (memory by default; use
            `saga.runtime.stores.SQLiteReplyStore` to survive restarts).
        concurrency: Most commands handled at once (across sagas) by one run.
        limits: Decoding bounds for incoming commands (`saga.core.codec.COMMAND_LIMITS` by
            default: commands are built by the coordinator from input it accepted, and nest
            it deeper than the foreign bound allows).
    """

    def __init__(
        self,
        service: str,
        *,
        store: ReplyStore | None = None,
        concurrency: int = 64,
        limits: Limits = COMMAND_LIMITS,
    ) -> None:
        if concurrency < 1:
            raise UsageError(f"participant {service!r}: concurrency must be at least 1")
        self.service = service
        self.store: ReplyStore = store or MemoryReplyStore()
        self.concurrency = concurrency
        self.limits = limits
        self.stats = ParticipantStats()
        self._handlers: dict[str, Registered] = {}
        self._interceptors: list[Interception] = []

    def handler(
        self, action: str, *, input_model: type[BaseModel] | None = None
    ) -> Callable[[Handler], Handler]:
        """Registers the decorated function for an action or compensation name.

        The function takes ``(payload, ctx)`` and returns the output (a dict, a pydantic model,
        or ``None`` for no output). It may be ``async`` or a plain function; plain functions run
        in a worker thread so that blocking calls do not stall other sagas. Raise
        `saga.StepFailed` for a business failure; any other exception is a technical failure.

        Raises:
            UsageError: A handler for ``action`` is registered already.
        """

        def register(fn: Handler) -> Handler:
            if action in self._handlers:
                raise UsageError(
                    f"service {self.service!r}: handler for {action!r} registered twice"
                )
            self._handlers[action] = Registered.of(fn, input_model)
            return fn

        return register

    def intercept(self, fn: Interceptor) -> Interception:
        """Wraps every handler call of this participant in ``fn``.

        ``fn`` is ``async def fn(payload, ctx, call_next) -> result``; it calls
        ``await call_next(payload, ctx)`` to go on (or not, to short-circuit) and returns the
        handler's result. It runs after the input model is validated and within the step's
        deadline; what it raises is classified like the handler's own exceptions (`StepFailed`:
        a business failure; anything else: a technical one). A plain handler still runs in a
        worker thread: the interceptors run in the event loop around it.

        Order: the interceptor registered last is the outermost (it is called first).

        Returns:
            The registration: ``.remove()`` it, or use it as a context manager.
        """
        handle = Interception(self._interceptors, fn)
        self._interceptors.append(handle)
        return handle

    @property
    def actions(self) -> frozenset[str]:
        """The action and compensation names this participant handles."""
        return frozenset(self._handlers)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(
        self,
        transport: Transport,
        *,
        prefix: str = "saga",
        partitions: int = 6,
        observer: Observer | None = None,
        clock: Clock | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serves on ``transport`` until cancelled.

        Work in hand is finished and committed before it returns. A broker that cannot be
        reached, at start-up or later, is waited for; only an error that retrying cannot help
        (``TransportError.retriable`` false) ends the run.

        Args:
            transport: The broker.
            prefix: Topic name prefix (the coordinators' ``prefix``).
            partitions: Partition count if this participant creates its command topic.
            observer: Told of every command handled (tracing, metrics), and gives the replies
                their headers; none by default.
            clock: Time source (`saga.testing` passes a virtual clock).
            task_status: Set once the participant has joined its group (for
                ``TaskGroup.start``).
        """
        d = _Deployment(
            transport=transport,
            topics=Topics(prefix),
            partitions=partitions,
            observer=observer or NullObserver(),
            clock=clock or SystemClock(),
            limiter=anyio.CapacityLimiter(self.concurrency),
        )
        topic = d.topics.commands(self.service)
        group = d.topics.participant_group(self.service)
        backoff = _Backoff()
        started = False
        while True:
            try:
                await transport.ensure_topics([topic, d.topics.dlq], partitions)
                async with transport.consumer(group, [topic]) as consumer:
                    if not started:
                        started = True
                        task_status.started()
                    await self._consume(consumer, d, backoff)
            except TransportError as exc:
                if not exc.retriable:
                    raise
                await backoff.wait(self.service, "could not start serving", exc)

    @asynccontextmanager
    async def serving(
        self,
        transport: Transport,
        *,
        prefix: str = "saga",
        partitions: int = 6,
        observer: Observer | None = None,
        clock: Clock | None = None,
    ) -> AsyncIterator[Participant]:
        """Serves in the background while the block runs (see `run` for the arguments).

        The block starts once the participant has joined its group; on exit, work in hand is
        finished and committed.
        """
        run = partial(
            self.run,
            transport,
            prefix=prefix,
            partitions=partitions,
            observer=observer,
            clock=clock,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(run)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()

    async def _consume(self, consumer: Consumer, d: _Deployment, backoff: _Backoff) -> None:
        rewind: frozenset[TopicPartition] = frozenset()
        while True:
            try:
                if rewind:
                    await consumer.seek_to_committed(rewind)
                    rewind = frozenset()
                async with d.transport.producer() as producer:
                    await self._serve(consumer, producer, d, backoff)
            except TransportError as exc:
                if not exc.retriable:
                    raise
                # The broker is away. Whatever of the batch in hand was not committed comes
                # again after a rewind; the reply store turns the handlers' second run into a
                # replay of the stored outcome.
                rewind = consumer.assignment()
                await backoff.wait(self.service, "the broker is away", exc)

    async def _serve(
        self, consumer: Consumer, producer: Producer, d: _Deployment, backoff: _Backoff
    ) -> None:
        while True:
            records = await consumer.poll(0.5, 500)
            if not records:
                continue
            # Shielded: a batch in hand is finished, replied to and committed even when
            # shutdown is requested, so that a graceful stop leaves nothing half done.
            with anyio.CancelScope(shield=True):
                await self._handle_batch(records, producer, d)
                offsets: dict[TopicPartition, int] = {}
                for r in records:
                    offsets[(r.topic, r.partition)] = r.offset + 1
                await consumer.commit(offsets)
            backoff.reset()

    # -- handling ----------------------------------------------------------------------------

    async def _handle_batch(
        self, records: list[Record], producer: Producer, d: _Deployment
    ) -> None:
        by_saga: dict[bytes | None, list[Record]] = defaultdict(list)
        for r in records:
            by_saga[r.key].append(r)

        failures: list[TransportError] = []

        async def run_group(group: list[Record]) -> None:
            for r in group:
                if failures:
                    return  # the broker is away: the rest comes again after the rewind
                async with d.limiter:
                    out, dead = await self._handle_record(r, d)
                # Sent before the next command of the same saga runs, so replies keep order.
                try:
                    await producer.send([out])
                except TransportError as exc:
                    failures.append(exc)
                    return
                if dead is not None:  # counted once written: a resend would count twice
                    dead.log()
                    self.stats.dead_letters[dead.reason] += 1
                    d.observer.dead_lettered(dead.source_topic, dead.reason)

        async with anyio.create_task_group() as tg:
            for group in by_saga.values():
                tg.start_soon(run_group, group)
        if failures:
            # One plain error, not an ExceptionGroup, so that `run` rewinds and rides it out.
            raise failures[0]

    async def _handle_record(
        self, record: Record, d: _Deployment
    ) -> tuple[Outgoing, DeadLetter | None]:
        """The record to send for ``record``: its reply, or its dead letter (also returned)."""
        try:
            command = decode(command_adapter, record.value, self.limits)
        except DecodeError as exc:
            return self._dead(DeadLetter(record, exc.reason, exc.detail), d)
        if command.service != self.service:
            detail = f"command for service {command.service!r} on {self.service!r}'s topic"
            return self._dead(DeadLetter(record, "wrong_service", detail), d)
        registered = self._handlers.get(command.action)
        if registered is None:
            detail = f"service {self.service!r} has no handler for {command.action!r}"
            return self._dead(DeadLetter(record, "unknown_action", detail), d)
        with d.observer.handling(self.service, command, record.headers) as handling:
            reply, replayed = await self._reply_for(command, registered, d)
            handling.outcome(reply.ok, reply.error, replayed)
            headers = d.observer.headers(reply)  # inside: it may carry the handling's context
        return Outgoing(d.topics.replies, command.saga_id.encode(), encode(reply), headers), None

    @staticmethod
    def _dead(dead: DeadLetter, d: _Deployment) -> tuple[Outgoing, DeadLetter]:
        return dead.outgoing(d.topics.dlq), dead

    async def _reply_for(
        self, command: Command, registered: Registered, d: _Deployment
    ) -> tuple[Reply, bool]:
        """The reply to ``command``, and whether it is a stored one replayed."""
        key = command.idempotency_key
        tried = _tried(key, command.attempt)
        stored = await self.store.get(key) or await self.store.get(tried)
        if stored is not None:
            self.stats.replayed += 1
            ok, output, error = stored
            return self._reply(command, ok, output, error, d), True
        undone = _undone(command.saga_id, command.step)
        if command.phase == "action" and await self.store.get(undone) is not None:
            error = ErrorInfo(
                type="StepFailed",
                business=True,
                message="the step was compensated before this attempt arrived; not run",
            )
            return self._reply(command, False, None, error, d), False
        ctx = StepContext(
            saga_id=command.saga_id,
            saga_name=command.saga_name,
            step=command.step,
            phase=command.phase,
            action=command.action,
            attempt=command.attempt,
            idempotency_key=key,
            deadline_at=command.deadline_at,
        )
        self.stats.handled += 1
        budget = command.deadline_at - d.clock.now()
        outcome = await invoke(registered, self._interceptors, command.payload, ctx, budget)
        ok, output, error = outcome
        if error is not None:
            if error.business:
                self.stats.business_failures += 1
            else:
                self.stats.technical_failures += 1
        if ok or (error is not None and error.business):
            await self.store.put(key, ok, output, error)
        else:
            # A technical failure is not final for the step (a later attempt runs the handler
            # again), but it is for this attempt: the coordinator may have given up on the step
            # after it, so a redelivery of the same attempt must not take effect unseen.
            await self.store.put(tried, ok, output, error)
        if ok and command.phase == "compensation":
            await self.store.put(undone, True, None, None)
        return self._reply(command, ok, output, error, d), False

    def _reply(
        self,
        command: Command,
        ok: bool,
        output: dict[str, Any] | None,
        error: ErrorInfo | None,
        d: _Deployment,
    ) -> Reply:
        return Reply(
            message_id=f"{command.message_id}/reply",
            saga_id=command.saga_id,
            step=command.step,
            phase=command.phase,
            attempt=command.attempt,
            service=self.service,
            ok=ok,
            output=output if ok else None,
            error=error,
            at=d.clock.now(),
        )


def _tried(key: str, attempt: int) -> str:
    return f"{key}#attempt-{attempt}"


def _undone(saga_id: str, step: str) -> str:
    return f"{saga_id}/{step}#compensated"
