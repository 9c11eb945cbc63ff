"""`Participant`: a service's side of its sagas.

Theory of operation
-------------------
A participant is what a service *is*: its name, its handlers, its reply store. It is declared
once, usually at module level, where no broker exists yet; where and how it runs (the
transport, the topic prefix, the observer, the clock) is given to `Participant.run` or
`Participant.serving`, and nothing about the participant changes after it is built.

While it runs, a participant is a member of the consumer group
``<prefix>.participant.<service>`` on the service's command topic. It polls on while handlers
run, handles the commands of different sagas concurrently and the commands of one saga in
order, and commits each partition's offset as far as every command before it was replied to
(`saga.runtime.inflight`): a slow or hung handler holds up its own saga, not the service. A
crash redelivers what was not committed, so handling is at-least-once, and `ReplyStore` makes
it effectively-once:

- Before running a handler the participant looks up the command's idempotency key. A stored
  outcome is replied again without running the handler.
- An action's success or business failure is stored under the key (final for the step), and
  so is a compensation's success. Other failures are stored under the key and the attempt: a
  retry (a new attempt) runs the handler again, but a redelivery of the attempt that failed
  replays its failure, since the coordinator may have given up on the step after it and would
  never undo a late effect. A compensation's business failure is of this kind too: the
  compensation keeps one key across operator retries, and the operator's retry of a stuck
  compensation must run it again.
- A compensation stores a marker for its step's action, so an action that arrives after its own
  compensation (a late retry) is refused instead of taking effect that nobody will undo.

Time. A command carries a budget, its step's timeout in seconds, and the participant counts it
from when it took the command, on its own clocks: a participant whose clock disagrees with the
coordinator's does not lose its budget to the difference. A command is answered ``Expired``
without running when, by the time its handler would start, its budget is spent waiting in the
participant (behind its saga's earlier commands, or for a free slot), or when it is older than
its budget by the participant's own measure of lag: its clock at taking the command, less the
command's ``at`` (the coordinator's clock when it issued it), exceeds the budget by more than
``clock_skew``, the disagreement between clocks tolerated (the participant cannot tell lag from
skew; 30 s by default). A command that sat in its topic while the service was down is thus
refused rather than run with no time left, after the saga has moved on or given up. Commands
written before budgets existed count ``deadline_at - at``, the same span. (A participant of an
earlier release refuses a command that carries a budget, as a field it does not know: upgrade
participants before coordinators.)

Failures no handler should cause. An output that is not JSON or too large to send
(``OutputInvalid``, ``OutputTooLarge``: permanent business failures, stored like any), and a
handler raising ``KeyboardInterrupt``, ``SystemExit`` or a ``CancelledError`` of its own (a
technical failure of the attempt), are replied to instead of killing the participant before its
commit, which would redeliver the command to the same fate (`saga.runtime.handlers`). What is
left is a handler that kills its process outright: each start of a handler that has no outcome
yet is counted in the reply store before it runs (the count must outlive the process), and
after ``max_deliveries`` starts the next delivery is dead-lettered (reason ``redelivered``) and
answered ``Redelivered`` (technical), so that the saga moves on: it retries as a new attempt,
with a fresh count, or exhausts its policy. These rules, in the order they apply, are
`saga.runtime.outcomes`.

Calling a handler (its context, interceptors, the worker pool for plain functions, and the
classification of its outcome) is `saga.runtime.handlers`. The handler receives the idempotency
key in its context, to pass on to side effects outside Kafka (a payment provider's idempotency
header, a unique column): that closes the window between a side effect and the store's write.

Interceptors (`Participant.intercept`) wrap every handler call, inside the classification of
its outcome: a `StepFailed` an interceptor raises is a business failure, any other exception a
technical one, exactly as if the handler had raised it.

Stopping. On cancellation the participant stops polling, gives the work in hand ``grace``
seconds to finish, then cancels what still runs (a plain handler's thread is abandoned: its
late result is dropped, and the coordinator's deadline governs), commits what finished, and
leaves the group.

A broker that cannot be reached is waited for, at start-up as while serving: every retriable
`TransportError` (``TransportError.retriable``) is retried with a capped exponential backoff,
and records not committed come again after a rewind to the committed offsets.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import anyio
from anyio.abc import TaskStatus
from pydantic import BaseModel

from saga.core.codec import COMMAND_LIMITS, Limits, decode
from saga.core.messages import command_adapter
from saga.errors import DecodeError, TransportError, UsageError
from saga.runtime.dlq import DeadLetter
from saga.runtime.gate import ParticipantGate, Refusal
from saga.runtime.handlers import (
    CallNext,
    Handler,
    HandlerResult,
    Interception,
    Interceptor,
    Registered,
    StepContext,
)
from saga.runtime.inflight import Handled, InFlight, Taken
from saga.runtime.observe import NullObserver, Observer
from saga.runtime.outcomes import Outcomes, ParticipantStats, Rules
from saga.runtime.ports import Clock, Consumer, Outgoing, SystemClock, Topics, Transport
from saga.runtime.stores import MemoryReplyStore, ReplyStore
from saga.runtime.trust import Trust

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

COMMIT_INTERVAL = 0.05
"""Least seconds between two offset commits of a participant (`saga.runtime.inflight`): under
load, what finishes meanwhile is committed together (20 commits a second at most, instead of
one per reply written)."""


@dataclass(frozen=True, slots=True)
class _Deployment:
    """Where and how one `Participant.run` serves."""

    transport: Transport
    topics: Topics
    partitions: int
    observer: Observer
    clock: Clock
    outcomes: Outcomes
    gate: ParticipantGate


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
        concurrency: Most commands handled at once (across sagas) by one run: the size of
            its fixed pool of worker tasks, which take the sagas with commands in hand in
            turn (`saga.runtime.inflight`). A command's budget runs while it waits for one.
        limits: Decoding bounds for incoming commands (`saga.core.codec.COMMAND_LIMITS` by
            default: commands are built by the coordinator from input it accepted, and nest
            it deeper than the foreign bound allows).
        workers: Threads for plain (sync) handlers, per run; a plain handler waits for one.
        grace: Seconds the work in hand may take to finish when the run is stopped.
        max_deliveries: Most starts of a handler for one command (idempotency key and
            attempt) that never reached an outcome; the next delivery is dead-lettered.
        max_reply_bytes: Largest reply sent, headers included (900 KiB: under Kafka's default
            ``max.message.bytes`` of 1 MiB, with room to spare); a larger output is answered
            ``OutputTooLarge``.
        clock_skew: Seconds by which this participant's clock may disagree with the
            coordinator's before a command's age counts against its budget (see the module
            docstring).
    """

    def __init__(
        self,
        service: str,
        *,
        store: ReplyStore | None = None,
        concurrency: int = 64,
        limits: Limits = COMMAND_LIMITS,
        workers: int = 32,
        grace: float = 10.0,
        max_deliveries: int = 5,
        max_reply_bytes: int = 900 * 1024,
        clock_skew: float = 30.0,
    ) -> None:
        for name, value, least in [
            ("concurrency", concurrency, 1),
            ("workers", workers, 1),
            ("max_deliveries", max_deliveries, 1),
            ("max_reply_bytes", max_reply_bytes, 1024),
            ("grace", grace, 0),
            ("clock_skew", clock_skew, 0),
        ]:
            if value < least:
                raise UsageError(f"participant {service!r}: {name} must be at least {least}")
        self.service = service
        self.store: ReplyStore = store or MemoryReplyStore()
        self.concurrency = concurrency
        self.limits = limits
        self.workers = workers
        self.grace = grace
        self.max_deliveries = max_deliveries
        self.max_reply_bytes = max_reply_bytes
        self.clock_skew = clock_skew
        self.stats = ParticipantStats()
        self._handlers: dict[str, Registered] = {}
        self._interceptors: list[Interception] = []

    def handler(
        self, action: str, *, input_model: type[BaseModel] | None = None
    ) -> Callable[[Handler], Handler]:
        """Registers the decorated function for an action or compensation name.

        The function takes ``(payload, ctx)`` and returns the output (a dict, a pydantic model,
        or ``None`` for no output), which must be JSON (``OutputInvalid`` otherwise). It may
        be ``async`` or a plain function; plain functions run in a worker thread (of
        ``workers``) so that blocking calls do not stall other sagas. Raise `saga.StepFailed`
        for a business failure; any other exception is a technical failure.

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
        trust: Trust | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serves on ``transport`` until cancelled.

        Work in hand is finished (within ``grace`` seconds) and committed before it returns.
        A broker that cannot be reached, at start-up or later, is waited for; only an error that
        retrying cannot help (``TransportError.retriable`` false) ends the run.

        Args:
            transport: The broker.
            prefix: Topic name prefix (the coordinators' ``prefix``).
            partitions: Partition count if this participant creates its command topic.
            observer: Told of every command handled (tracing, metrics), and gives the replies
                their headers; none by default.
            clock: Time source (`saga.testing` passes a virtual clock).
            trust: This service's signing key, the keyring and the policy
                (`saga.runtime.trust.Trust`): commands run only if a coordinator signed them,
                and replies are signed (`saga.runtime.gate`). ``None`` checks nothing.
            task_status: Set once the participant has joined its group (for
                ``TaskGroup.start``).

        Raises:
            saga.runtime.trust.TrustError: ``trust`` signs as a principal that does not answer
                for this service in the policy, or lacks the keyring or the policy.
        """
        observer, clock = observer or NullObserver(), clock or SystemClock()
        if trust is not None:
            trust.check_role("participant", self.service)
        rules = Rules(self.service, self.max_deliveries, self.max_reply_bytes, self.clock_skew)
        d = _Deployment(
            transport=transport,
            topics=Topics(prefix),
            partitions=partitions,
            observer=observer,
            clock=clock,
            outcomes=Outcomes(
                rules,
                self.store,
                self.stats,
                self._interceptors,
                anyio.CapacityLimiter(self.workers),
                clock,
                observer,
            ),
            gate=ParticipantGate(trust, transport),
        )
        d.gate.start_up(self.service)
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
        trust: Trust | None = None,
    ) -> AsyncIterator[Participant]:
        """Serves in the background while the block runs (see `run` for the arguments).

        The block starts once the participant has joined its group; on exit, work in hand is
        finished (within ``grace`` seconds) and committed.
        """
        run = partial(
            self.run,
            transport,
            prefix=prefix,
            partitions=partitions,
            observer=observer,
            clock=clock,
            trust=trust,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(run)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()

    async def _consume(self, consumer: Consumer, d: _Deployment, backoff: _Backoff) -> None:
        rewind = False
        while True:
            try:
                if rewind:
                    await consumer.seek_to_committed(consumer.assignment())
                    rewind = False
                async with d.transport.producer() as producer:
                    flight = InFlight(
                        consumer,
                        d.clock,
                        partial(self._handle, d=d),
                        producer.send,
                        # A fixed pool of this many worker tasks: no task or limiter per command.
                        concurrency=self.concurrency,
                        grace=self.grace,
                        # Polling pauses at this many: memory stays bounded behind a hung saga.
                        max_in_flight=8 * self.concurrency,
                        on_commit=backoff.reset,
                        commit_interval=COMMIT_INTERVAL,
                    )
                    await flight.serve()
            except TransportError as exc:
                if not exc.retriable:
                    raise
                # The broker is away. Whatever was not committed comes again after a rewind;
                # the reply store turns the handlers' second run into a replay of the stored
                # outcome.
                rewind = True
                await backoff.wait(self.service, "the broker is away", exc)

    # -- handling ----------------------------------------------------------------------------

    async def _handle(self, taken: Taken, *, d: _Deployment) -> Handled:
        out, dead = await self._handle_record(taken, d)
        # Counted once written (`InFlight` calls it then): a resend would count twice.
        return out, None if dead is None else partial(self._dead_lettered, dead, d)

    def _dead_lettered(self, dead: DeadLetter, d: _Deployment) -> None:
        dead.log()
        self.stats.dead_letters[dead.reason] += 1
        d.observer.dead_lettered(dead.source_topic, dead.reason)

    async def _handle_record(
        self, taken: Taken, d: _Deployment
    ) -> tuple[list[Outgoing], DeadLetter | None]:
        """The records to send for ``taken``: its reply, its dead letter, or both; and the dead
        letter, if any."""
        record = taken.record
        sender = d.gate.sender(record)  # before decoding: nothing unsigned is parsed further
        if isinstance(sender, Refusal):
            return self._dead(DeadLetter(record, sender.reason, sender.detail), d)
        if (refusal := d.gate.command(sender)) is not None:
            return self._dead(DeadLetter(record, refusal.reason, refusal.detail), d)
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
            outcome, replayed, dead = await d.outcomes.decide(command, registered, taken)
            fitted = d.outcomes.fit(command, outcome)
            if fitted is None:
                detail = "even a cut-down reply is larger than max_reply_bytes"
                return self._dead(DeadLetter(record, "reply_too_large", detail), d)
            reply, value, headers = fitted
            handling.outcome(reply.ok, reply.error, replayed)
        out = [d.gate.sign(Outgoing(d.topics.replies, command.saga_id.encode(), value, headers))]
        if dead is not None:
            out.append(dead.outgoing(d.topics.dlq))
        return out, dead

    @staticmethod
    def _dead(dead: DeadLetter, d: _Deployment) -> tuple[list[Outgoing], DeadLetter]:
        return [dead.outgoing(d.topics.dlq)], dead
