"""What a participant replies to one command: a stored outcome, a refusal, or its handler's.

`Outcomes` applies the participant's rules (see `saga.runtime.participant` for why each rule
exists), in this order, to a decoded command:

1. An outcome stored under the idempotency key, or under the key and the attempt, is replayed.
2. An action whose step was compensated already is refused (a business failure, not stored:
   the marker is what refuses it).
3. A command too late to run is answered ``Expired`` (stored under the key and the attempt).
4. A command whose handler was started ``max_deliveries`` times without ever reaching an
   outcome is answered ``Redelivered`` and dead-lettered (stored under the key and the
   attempt). The start is counted in the store before the handler runs, so the count outlives
   a process that the handler kills.
5. Otherwise the handler runs (`saga.runtime.handlers.invoke`), and its outcome is stored:
   under the key when it is final for the step (any success; an action's business failure),
   else under the key and the attempt.

`Outcomes.fit` then makes the reply fit what the participant may send.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import anyio

from saga.core.codec import encode
from saga.core.messages import Command, ErrorInfo, Reply
from saga.runtime.dlq import DeadLetter
from saga.runtime.handlers import Interception, Outcome, Registered, StepContext, invoke, smaller
from saga.runtime.inflight import Taken
from saga.runtime.observe import Observer
from saga.runtime.ports import Clock, Headers
from saga.runtime.stores import ReplyStore

__all__ = ["Outcomes", "ParticipantStats", "Rules"]


@dataclass
class ParticipantStats:
    """Counters of what this participant did since it was built (across its runs)."""

    handled: int = 0
    replayed: int = 0
    business_failures: int = 0
    technical_failures: int = 0
    expired: int = 0
    dead_letters: dict[str, int] = field(default_factory=lambda: defaultdict(int))


@dataclass(frozen=True, slots=True)
class Rules:
    """The participant's settings that outcomes depend on (see `saga.Participant`)."""

    service: str
    max_deliveries: int
    max_reply_bytes: int
    clock_skew: float


@dataclass(frozen=True, slots=True)
class Outcomes:
    """The outcomes of one participant's run."""

    rules: Rules
    store: ReplyStore
    stats: ParticipantStats
    interceptors: list[Interception]
    """The participant's own list: interceptors added or removed while it runs count."""
    workers: anyio.CapacityLimiter
    clock: Clock
    observer: Observer

    async def decide(
        self, command: Command, registered: Registered, taken: Taken
    ) -> tuple[Outcome, bool, DeadLetter | None]:
        """The outcome to reply to ``command`` with, whether it is a stored one replayed, and the
        dead letter to write as well, if any."""
        store, stats = self.store, self.stats
        key = command.idempotency_key
        tried = f"{key}#attempt-{command.attempt}"
        stored = await store.get(key) or await store.get(tried)
        if stored is not None:
            stats.replayed += 1
            return stored, True, None
        undone = f"{command.saga_id}/{command.step}#compensated"
        if command.phase == "action" and await store.get(undone) is not None:
            message = "the step was compensated before this attempt arrived; not run"
            refused = ErrorInfo(type="StepFailed", business=True, message=message)
            return (False, None, refused), False, None
        # Budgets written before budgets existed: the same span, on the coordinator's clock.
        budget = command.budget if command.budget is not None else command.deadline_at - command.at
        late = self._lateness(command, budget, taken)
        if late is not None:
            stats.expired += 1
            outcome: Outcome = (False, None, ErrorInfo(type="Expired", message=late))
            await store.put(tried, *outcome)
            return outcome, False, None
        # Counted before the handler runs: a handler that kills its process leaves the count.
        starts = await store.increment(f"{tried}#starts")
        if starts > self.rules.max_deliveries:
            detail = (
                f"{key} attempt {command.attempt}: the handler started {starts - 1} times and "
                "never finished (its process died each time, or it was cut off); not run again"
            )
            outcome = (False, None, ErrorInfo(type="Redelivered", message=detail))
            await store.put(tried, *outcome)
            return outcome, False, DeadLetter(taken.record, "redelivered", detail)
        ctx = StepContext(
            saga_id=command.saga_id,
            saga_name=command.saga_name,
            step=command.step,
            phase=command.phase,
            action=command.action,
            attempt=command.attempt,
            idempotency_key=key,
            deadline_at=taken.received_at + budget,
        )
        stats.handled += 1
        outcome = await invoke(
            registered,
            self.interceptors,
            command.payload,
            ctx,
            taken.received + budget - anyio.current_time(),
            workers=self.workers,
            max_output_bytes=self.rules.max_reply_bytes,
        )
        ok, output, error = outcome
        if error is not None:
            if error.business:
                stats.business_failures += 1
            else:
                stats.technical_failures += 1
        if ok or (error is not None and error.business and command.phase == "action"):
            await store.put(key, ok, output, error)
        else:
            # Not final for the step (a later attempt runs the handler again), but final for
            # this attempt: the coordinator may have given up on the step after it, so a
            # redelivery of the same attempt must not take effect unseen. A compensation's
            # business failure too: an operator's retry keeps the key and must run it again.
            await store.put(tried, ok, output, error)
        if ok and command.phase == "compensation":
            await store.put(undone, True, None, None)
        return outcome, False, None

    def _lateness(self, command: Command, budget: float, taken: Taken) -> str | None:
        """Why ``command`` is too late to run, if it is."""
        age = taken.received_at - command.at
        skew = self.rules.clock_skew
        if age > budget + skew:
            return (
                f"the command was {age:.1f}s old when taken, past its budget of {budget:g}s "
                f"(with {skew:g}s allowed for clocks that disagree); not run"
            )
        waited = anyio.current_time() - taken.received
        if waited >= budget:
            return f"the command waited {waited:.1f}s in the participant, its whole budget; not run"
        return None

    def fit(self, command: Command, outcome: Outcome) -> tuple[Reply, bytes, Headers] | None:
        """The reply for ``outcome``, encoded, with its headers: cut down (`smaller`) until it
        fits ``max_reply_bytes``, since a record the broker refuses would be retried forever;
        ``None`` if it never fits (a saga id of half a megabyte).

        Called inside the observer's ``handling``, so that the headers may carry its context.
        """
        for _ in range(3):
            reply = self.reply(command, outcome)
            value, headers = encode(reply), self.observer.headers(reply)
            size = len(value) + len(command.saga_id) + sum(len(k) + len(v) for k, v in headers)
            if size <= self.rules.max_reply_bytes:
                return reply, value, headers
            outcome = smaller(outcome)
        return None

    def reply(self, command: Command, outcome: Outcome) -> Reply:
        """The reply to ``command`` that carries ``outcome``."""
        ok, output, error = outcome
        return Reply(
            message_id=f"{command.message_id}/reply",
            saga_id=command.saga_id,
            step=command.step,
            phase=command.phase,
            attempt=command.attempt,
            service=self.rules.service,
            ok=ok,
            output=output if ok else None,
            error=error,
            at=self.clock.now(),
        )
