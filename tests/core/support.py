"""Builders and a small driver shared by the core tests.

The driver feeds `decide` its own commands back as replies, keeps the clock, and checks on
every call that the decision's state is the fold of its events (the invariant `decide`
promises), so every scenario test checks it for free.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from saga.core.decide import Decision, Input, Tick, decide, next_due
from saga.core.definition import Dependency, RetryPolicy, SagaDefinition, Step, StepKind
from saga.core.messages import (
    Alert,
    CancelSaga,
    Command,
    ErrorInfo,
    EventBase,
    Reply,
    ResolveSaga,
    RetrySaga,
    StartSaga,
)
from saga.core.state import SagaState, evolve

__all__ = [
    "NO_JITTER",
    "Driver",
    "chain",
    "fold",
    "make_step",
    "reply_to",
]

T0 = 1_000.0
"""The driver's starting clock."""

NO_JITTER = RetryPolicy(max_attempts=3, initial_backoff=1.0, multiplier=2.0, jitter=0.0)


def make_step(
    name: str,
    *,
    kind: StepKind = StepKind.COMPENSATABLE,
    after: Sequence[str | Dependency | dict[str, str]] = (),
    **fields: Any,
) -> Step:
    """A step whose service is ``svc-<name>``, with a compensation when it is compensatable."""
    fields.setdefault("service", f"svc-{name}")
    fields.setdefault("action", f"do-{name}")
    if kind is StepKind.COMPENSATABLE:
        fields.setdefault("compensation", f"undo-{name}")
    return Step(name=name, kind=kind, depends_on=tuple(after), **fields)


def chain(*names: str, kinds: Sequence[StepKind] | None = None, **fields: Any) -> SagaDefinition:
    """A chain n1 -> n2 -> ... (finish-to-start); every step gets ``fields``."""
    kinds = kinds or [StepKind.COMPENSATABLE] * len(names)
    steps = [
        make_step(n, kind=k, after=[names[i - 1]] if i else (), **fields)
        for i, (n, k) in enumerate(zip(names, kinds, strict=True))
    ]
    return SagaDefinition(name="chain", steps=tuple(steps))


def fold(events: Iterable[EventBase], state: SagaState | None = None) -> SagaState | None:
    """``evolve`` folded over ``events``."""
    for event in events:
        state = evolve(state, event)
    return state


def reply_to(
    command: Command,
    outcome: str = "ok",
    *,
    output: dict[str, Any] | None = None,
    at: float = 0.0,
    service: str | None = None,
) -> Reply:
    """A participant's reply to ``command``: ``ok``, ``business`` or ``technical``."""
    common: dict[str, Any] = {
        "message_id": f"reply/{command.message_id}",
        "saga_id": command.saga_id,
        "step": command.step,
        "phase": command.phase,
        "attempt": command.attempt,
        "service": service or command.service,
        "at": at,
    }
    if outcome == "ok":
        return Reply(ok=True, output=output if output is not None else {}, **common)
    business = outcome == "business"
    error = ErrorInfo(
        type="StepFailed" if business else "ConnectionError",
        message=f"{outcome} failure of {command.step}",
        business=business,
    )
    return Reply(ok=False, error=error, **common)


@dataclass
class Driver:
    """Runs one saga through `decide`, as the coordinator would, but by hand."""

    definition: SagaDefinition
    saga_id: str = "saga-1"
    now: float = T0
    state: SagaState | None = None
    events: list[EventBase] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    """Every command sent, in order."""
    inflight: list[Command] = field(default_factory=list)
    """The commands sent and not yet delivered: a test pops, drops or duplicates them."""
    alerts: list[Alert] = field(default_factory=list)
    last: Decision | None = None

    def send(
        self, message: Input, definition: SagaDefinition | Literal["given"] | None = "given"
    ) -> Decision:
        """Decides ``message`` at ``now`` (with ``definition``, the driver's own unless given)
        and keeps the result."""
        before = self.state
        d = self.definition if definition == "given" else definition
        decision = decide(d, self.state, message, self.now)
        again = decide(d, self.state, message, self.now)
        assert again == decision, "decide is not a pure function"
        assert self.state == before, "decide changed the state it was given"
        if decision.events:
            assert fold(decision.events, before) == decision.state
        else:
            assert decision.state == before
        self.state = decision.state
        self.events.extend(decision.events)
        self.commands.extend(decision.commands)
        self.inflight.extend(decision.commands)
        self.alerts.extend(decision.alerts)
        self.last = decision
        return decision

    # -- inputs ---------------------------------------------------------------------------

    def start(
        self,
        saga_input: dict[str, Any] | None = None,
        *,
        name: str | None = None,
        if_exists: Literal["return", "refuse"] = "return",
        definition: SagaDefinition | Literal["given"] | None = "given",
    ) -> Decision:
        """A start request; ``definition=None`` decides it as a coordinator that has no
        definition of that name would."""
        message = StartSaga(
            message_id=f"start/{self.saga_id}",
            saga_id=self.saga_id,
            saga_name=name or self.definition.name,
            input=saga_input if saga_input is not None else {"order": 7},
            at=self.now,
            if_exists=if_exists,
        )
        if definition == "given":
            return self.send(message)
        return self.send(message, definition)

    def reply(self, command: Command, outcome: str = "ok", **kw: Any) -> Decision:
        return self.send(reply_to(command, outcome, at=self.now, **kw))

    def tick(self, at: float | None = None) -> Decision:
        if at is not None:
            self.now = at
        return self.send(Tick(saga_id=self.saga_id, at=self.now))

    def tick_due(self) -> Decision:
        """Advances the clock to the next deadline or retry and ticks."""
        assert self.state is not None
        due = next_due(self.state)
        assert due is not None, "nothing is due"
        return self.tick(max(due, self.now))

    def cancel(self, reason: str = "customer changed their mind") -> Decision:
        return self.send(
            CancelSaga(
                message_id=self._request_id("cancel"),
                saga_id=self.saga_id,
                reason=reason,
                at=self.now,
            )
        )

    def retry(self) -> Decision:
        return self.send(
            RetrySaga(message_id=self._request_id("retry"), saga_id=self.saga_id, at=self.now)
        )

    def resolve(self, note: str = "fixed by hand") -> Decision:
        return self.send(
            ResolveSaga(
                message_id=self._request_id("resolve"), saga_id=self.saga_id, note=note, at=self.now
            )
        )

    def _request_id(self, kind: str) -> str:
        # A fresh id per request: a saga ignores a request id it has answered before.
        return f"{kind}/{len(self.events)}"

    # -- reading ---------------------------------------------------------------------------

    def open_command(self, step: str, phase: str = "action") -> Command:
        """The latest command for ``step`` and ``phase``."""
        found = [c for c in self.commands if c.step == step and c.phase == phase]
        assert found, f"no {phase} command for {step!r}"
        return found[-1]

    def sent(self, decision: Decision | None = None) -> list[tuple[str, str]]:
        """The (phase, step) of the commands of one decision (the last by default)."""
        decision = decision or self.last
        assert decision is not None
        return [(c.phase, c.step) for c in decision.commands]

    def trace(self) -> list[str]:
        """Successful actions and compensations, in order: ``T:a``, ``C:a``."""
        out = []
        for e in self.events:
            if e.type == "step_succeeded":  # type: ignore[attr-defined]
                out.append(f"T:{e.step}")  # type: ignore[attr-defined]
            elif e.type == "compensation_succeeded":  # type: ignore[attr-defined]
                out.append(f"C:{e.step}")  # type: ignore[attr-defined]
        return out

    def event_types(self, decision: Decision | None = None) -> list[str]:
        decision = decision or self.last
        assert decision is not None
        return [e.type for e in decision.events]  # type: ignore[attr-defined]
