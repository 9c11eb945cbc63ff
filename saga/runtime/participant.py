"""`Participant`: a service's side of its sagas.

Theory of operation
-------------------
A participant is a member of the consumer group ``<prefix>.participant.<service>`` on the
service's command topic. For each polled batch it handles the commands of different sagas
concurrently and the commands of one saga in order, sends every reply, and only then commits
the batch's offsets. A crash before the commit redelivers the batch, so handling is
at-least-once, and `ReplyStore` makes it effectively-once:

- Before running a handler the participant looks up the command's idempotency key. A stored
  outcome is replied again without running the handler.
- Successes and business failures are stored (they are final); technical failures are not, so
  a retry runs the handler again.
- A compensation stores a marker for its step's action, so an action that arrives after its own
  compensation (a late retry) is refused instead of taking effect that nobody will undo.

The handler receives the idempotency key in its context, to pass on to side effects outside
Kafka (a payment provider's idempotency header, a unique column): that closes the window
between a side effect and the store's write.
"""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import anyio
from anyio.abc import TaskStatus
from pydantic import BaseModel, TypeAdapter, ValidationError

from saga.core.codec import DEFAULT_LIMITS, Limits, decode, encode
from saga.core.messages import Command, ErrorInfo, Reply
from saga.errors import DecodeError, StepFailed, TransportError
from saga.runtime.coordinator import dead_letter
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

__all__ = ["Handler", "Participant", "ParticipantStats", "StepContext"]

log = logging.getLogger("saga.participant")

_command_adapter: TypeAdapter[Command] = TypeAdapter(Command)


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a handler knows about the command it is running."""

    saga_id: str
    saga_name: str
    step: str
    phase: str
    """``action`` or ``compensation``."""
    attempt: int
    idempotency_key: str
    """Stable across retries of this step and phase: pass it to side effects."""
    deadline_at: float
    """When the coordinator stops waiting for this attempt (seconds since the epoch)."""
    trace_parent: str | None = None


HandlerResult: TypeAlias = dict[str, Any] | BaseModel | None
Handler: TypeAlias = Callable[
    [dict[str, Any], StepContext], Awaitable[HandlerResult] | HandlerResult
]


@dataclass
class _Registered:
    fn: Handler
    input_model: type[BaseModel] | None
    is_async: bool


@dataclass
class ParticipantStats:
    """Counters of what this participant did since it started."""

    handled: int = 0
    replayed: int = 0
    business_failures: int = 0
    technical_failures: int = 0
    dead_letters: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Participant:
    """A service's handlers for saga actions and compensations.

    Example::

        payment = Participant("payment")

        @payment.handler("charge")
        async def charge(payload: dict, ctx: StepContext) -> dict:
            return {"charge_id": await psp.charge(payload["amount"], key=ctx.idempotency_key)}

    Args:
        service: The service name used in definitions (``Step.service``).
        transport: The broker; may also be given later to `run`.
        prefix: Topic name prefix.
        store: Where outcomes are kept for deduplication (memory by default; use
            `saga.runtime.stores.SQLiteReplyStore` to survive restarts).
        concurrency: Most commands handled at once (across sagas).
        partitions: Partition count if this participant creates its command topic.
        observer: Told of every command handled (tracing, metrics); none by default.
        clock: Time source.
        limits: Decoding bounds for incoming commands.
    """

    def __init__(
        self,
        service: str,
        *,
        transport: Transport | None = None,
        prefix: str = "saga",
        store: ReplyStore | None = None,
        concurrency: int = 64,
        partitions: int = 6,
        clock: Clock | None = None,
        limits: Limits = DEFAULT_LIMITS,
        observer: Observer | None = None,
    ) -> None:
        self.service = service
        self.transport = transport
        self.topics = Topics(prefix)
        self.store = store or MemoryReplyStore()
        self.clock = clock or SystemClock()
        self.limits = limits
        self.partitions = partitions
        self.observer: Observer = observer or NullObserver()
        self.stats = ParticipantStats()
        self._handlers: dict[str, _Registered] = {}
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._stack = AsyncExitStack()

    def handler(
        self, action: str, *, input_model: type[BaseModel] | None = None
    ) -> Callable[[Handler], Handler]:
        """Registers the decorated function for an action or compensation name.

        The function takes ``(payload, ctx)`` and returns the output (a dict, a pydantic model,
        or ``None`` for no output). It may be ``async`` or a plain function; plain functions run
        in a worker thread so that blocking calls do not stall other sagas. Raise
        `saga.StepFailed` for a business failure; any other exception is a technical failure.
        """

        def register(fn: Handler) -> Handler:
            if action in self._handlers:
                raise ValueError(
                    f"service {self.service!r}: handler for {action!r} registered twice"
                )
            self._handlers[action] = _Registered(fn, input_model, inspect.iscoroutinefunction(fn))
            return fn

        return register

    @property
    def actions(self) -> frozenset[str]:
        """The action and compensation names this participant handles."""
        return frozenset(self._handlers)

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Participant:
        tg = await self._stack.enter_async_context(anyio.create_task_group())
        self._stack.callback(tg.cancel_scope.cancel)
        try:
            await tg.start(self.run)
        except BaseException:
            await self._stack.aclose()  # the task group too, or it masks the real error
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def run(
        self,
        transport: Transport | None = None,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serves until cancelled. Work in hand is finished and committed before it returns."""
        transport = transport or self.transport
        if transport is None:
            raise ValueError(f"participant {self.service!r} has no transport to run on")
        topic = self.topics.commands(self.service)
        await transport.ensure_topics([topic, self.topics.dlq], self.partitions)
        group = self.topics.participant_group(self.service)
        async with transport.consumer(group, [topic]) as consumer:
            task_status.started()
            rewind: frozenset[TopicPartition] = frozenset()
            delay = 0.1
            while True:
                try:
                    if rewind:
                        await consumer.seek_to_committed(rewind)
                        rewind = frozenset()
                    async with transport.producer() as producer:
                        await self._serve(consumer, producer)
                except TransportError as exc:
                    # The broker is away. Whatever of the batch in hand was not committed
                    # comes again after a rewind; the reply store turns the handlers' second
                    # run into a replay of the stored outcome.
                    rewind = consumer.assignment()
                    log.warning("%s: %s; retrying in %.1fs", self.service, exc, delay)
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    async def _serve(self, consumer: Consumer, producer: Producer) -> None:
        while True:
            records = await consumer.poll(0.5, 500)
            if not records:
                continue
            # Shielded: a batch in hand is finished, replied to and committed even when
            # shutdown is requested, so that a graceful stop leaves nothing half done.
            with anyio.CancelScope(shield=True):
                await self._handle_batch(records, producer)
                offsets: dict[TopicPartition, int] = {}
                for r in records:
                    offsets[(r.topic, r.partition)] = r.offset + 1
                await consumer.commit(offsets)

    # -- handling ----------------------------------------------------------------------------

    async def _handle_batch(self, records: list[Record], producer: Producer) -> None:
        by_saga: dict[bytes | None, list[Record]] = defaultdict(list)
        for r in records:
            by_saga[r.key].append(r)

        failures: list[TransportError] = []

        async def run_group(group: list[Record]) -> None:
            for r in group:
                if failures:
                    return  # the broker is away: the rest comes again after the rewind
                async with self._limiter:
                    reply = await self._handle_record(r)
                # Sent before the next command of the same saga runs, so replies keep order.
                try:
                    await producer.send([reply])
                except TransportError as exc:
                    failures.append(exc)
                    return

        async with anyio.create_task_group() as tg:
            for group in by_saga.values():
                tg.start_soon(run_group, group)
        if failures:
            # One plain error, not an ExceptionGroup, so that `run` rewinds and rides it out.
            raise failures[0]

    async def _handle_record(self, record: Record) -> Outgoing:
        try:
            command = decode(_command_adapter, record.value, self.limits)
        except DecodeError as exc:
            return self._dead(record, exc.reason, exc.detail)
        if command.service != self.service:
            return self._dead(
                record,
                "wrong_service",
                f"command for service {command.service!r} on {self.service!r}'s topic",
            )
        registered = self._handlers.get(command.action)
        if registered is None:
            return self._dead(
                record,
                "unknown_action",
                f"service {self.service!r} has no handler for {command.action!r}",
            )
        trace_parent = next((v.decode() for k, v in record.headers if k == "traceparent"), None)
        with self.observer.handling(self.service, command) as handling:
            reply, replayed = await self._reply_for(
                command, registered, handling.traceparent() or trace_parent
            )
            handling.outcome(reply.ok, reply.error, replayed)
            reply_parent = handling.traceparent()
        headers = (("traceparent", reply_parent.encode()),) if reply_parent else ()
        return Outgoing(self.topics.replies, command.saga_id.encode(), encode(reply), headers)

    async def _reply_for(
        self, command: Command, registered: _Registered, trace_parent: str | None
    ) -> tuple[Reply, bool]:
        """The reply to ``command``, and whether it is a stored one replayed."""
        key = command.idempotency_key
        stored = await self.store.get(key)
        if stored is not None:
            self.stats.replayed += 1
            ok, output, error = stored
            return self._reply(command, ok, output, error), True
        undone = _undone(command.saga_id, command.step)
        if command.phase == "action" and await self.store.get(undone) is not None:
            error = ErrorInfo(
                type="StepFailed",
                business=True,
                message="the step was compensated before this attempt arrived; not run",
            )
            return self._reply(command, False, None, error), False
        ctx = StepContext(
            saga_id=command.saga_id,
            saga_name=command.saga_name,
            step=command.step,
            phase=command.phase,
            attempt=command.attempt,
            idempotency_key=key,
            deadline_at=command.deadline_at,
            trace_parent=trace_parent,
        )
        ok, output, error = await self._invoke(registered, command.payload, ctx)
        if ok or (error is not None and error.business):
            await self.store.put(key, ok, output, error)
        if ok and command.phase == "compensation":
            await self.store.put(undone, True, None, None)
        return self._reply(command, ok, output, error), False

    async def _invoke(
        self, registered: _Registered, payload: dict[str, Any], ctx: StepContext
    ) -> tuple[bool, dict[str, Any] | None, ErrorInfo | None]:
        self.stats.handled += 1
        try:
            if registered.input_model is not None:
                try:
                    payload = registered.input_model.model_validate(payload).model_dump()
                except ValidationError as exc:
                    raise StepFailed(
                        f"input does not match {registered.input_model.__name__}: "
                        f"{exc.errors()[0]['msg']}"
                    ) from None
            remaining = max(0.001, ctx.deadline_at - self.clock.now())
            with anyio.fail_after(remaining):
                if registered.is_async:
                    result = await registered.fn(payload, ctx)  # type: ignore[misc]
                else:
                    result = await anyio.to_thread.run_sync(registered.fn, payload, ctx)
        except StepFailed as exc:
            self.stats.business_failures += 1
            return (
                False,
                None,
                ErrorInfo(
                    type="StepFailed",
                    message=exc.reason,
                    business=True,
                    details=_jsonable(exc.details),
                ),
            )
        except TimeoutError:
            self.stats.technical_failures += 1
            return False, None, ErrorInfo(type="Timeout", message="the handler passed the deadline")
        except Exception as exc:
            self.stats.technical_failures += 1
            log.warning(
                "%s/%s attempt %d failed: %r",
                ctx.saga_id,
                ctx.step,
                ctx.attempt,
                exc,
                extra={
                    "saga_id": ctx.saga_id,
                    "step": ctx.step,
                    "attempt": ctx.attempt,
                    "service": self.service,
                },
            )
            return False, None, ErrorInfo(type=type(exc).__name__, message=str(exc) or repr(exc))
        if isinstance(result, BaseModel):
            return True, result.model_dump(mode="json"), None
        if result is None:
            return True, {}, None
        if not isinstance(result, dict):
            return (
                False,
                None,
                ErrorInfo(
                    type="OutputInvalid",
                    message=f"handler returned {type(result).__name__}, not a dict",
                ),
            )
        return True, result, None

    def _reply(
        self, command: Command, ok: bool, output: dict[str, Any] | None, error: ErrorInfo | None
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
            at=self.clock.now(),
        )

    def _dead(self, record: Record, reason: str, detail: str) -> Outgoing:
        self.stats.dead_letters[reason] += 1
        self.observer.dead_lettered(record.topic, reason)
        log.warning(
            "dead-lettered %s/%d/%d: %s: %s",
            record.topic,
            record.partition,
            record.offset,
            reason,
            detail,
        )
        return dead_letter(record, self.topics.dlq, reason, detail)


def _undone(saga_id: str, step: str) -> str:
    return f"{saga_id}/{step}#compensated"


def _jsonable(details: dict[str, object]) -> dict[str, Any]:
    import orjson

    try:
        return dict(orjson.loads(orjson.dumps(details, default=str)))
    except TypeError:
        return {"repr": repr(details)}
