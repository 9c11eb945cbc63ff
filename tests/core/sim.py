"""A simulated network for the pure core: it delivers decide()'s commands back as replies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from saga.core.decide import Decision, Input, Tick, decide, next_due
from saga.core.definition import SagaDefinition
from saga.core.messages import (
    CancelSaga,
    Command,
    CompensationStarted,
    CompensationSucceeded,
    ErrorInfo,
    EventBase,
    Reply,
    StartSaga,
    StepStarted,
    StepSucceeded,
)
from saga.core.state import SagaState, evolve


@dataclass
class Sim:
    """One saga, its in-flight commands, its events, and the history of everything it did."""

    d: SagaDefinition
    saga_id: str = "s1"
    now: float = 1_000.0
    state: SagaState | None = None
    inflight: list[Command] = field(default_factory=list)
    events: list[EventBase] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    def feed(self, message: Input) -> Decision:
        decision = decide(self.d, self.state, message, self.now)
        # The decision's state is exactly the fold of its events over the previous state.
        folded = self.state
        for event in decision.events:
            folded = evolve(folded, event)
        assert folded == decision.state
        self.state = decision.state
        self.events += decision.events
        self.inflight += decision.commands
        self.decisions.append(decision)
        return decision

    def start(self, data: dict[str, Any] | None = None) -> Decision:
        return self.feed(
            StartSaga(
                message_id="m",
                saga_id=self.saga_id,
                saga_name=self.d.name,
                input=data or {},
                at=self.now,
            )
        )

    def reply(
        self,
        command: Command,
        ok: bool = True,
        *,
        business: bool = False,
        error: str = "Boom",
        output: dict[str, Any] | None = None,
    ) -> Decision:
        info = (
            None
            if ok
            else ErrorInfo(
                type="StepFailed" if business else error, message="injected", business=business
            )
        )
        return self.feed(
            Reply(
                message_id=command.message_id + "/r",
                saga_id=self.saga_id,
                step=command.step,
                phase=command.phase,
                attempt=command.attempt,
                service=command.service,
                ok=ok,
                output=(output or {"by": command.step}) if ok else None,
                error=info,
                at=self.now,
            )
        )

    def take(self, step: str, phase: str = "action") -> Command:
        for c in self.inflight:
            if c.step == step and c.phase == phase:
                self.inflight.remove(c)
                return c
        raise AssertionError(f"no {phase} command in flight for {step}: {self.inflight}")

    def tick(self) -> Decision:
        assert self.state is not None
        due = next_due(self.state)
        assert due is not None, "nothing is due"
        self.now = max(self.now, due)
        return self.feed(Tick(self.saga_id, self.now))

    def cancel(self) -> Decision:
        return self.feed(CancelSaga(message_id="c", saga_id=self.saga_id, at=self.now))

    def run_happy(self, limit: int = 200) -> None:
        """Replies ok to everything in flight, ticking when nothing is, until the saga ends."""
        for _ in range(limit):
            assert self.state is not None
            if self.state.is_final:
                return
            if self.inflight:
                self.reply(self.inflight.pop(0))
            else:
                self.tick()
        raise AssertionError("the saga did not end")

    def history(self) -> list[tuple[str, str]]:
        """("T", step) for each action success and ("C", step) for each compensation success."""
        out = []
        for e in self.events:
            if isinstance(e, StepSucceeded):
                out.append(("T", e.step))
            elif isinstance(e, CompensationSucceeded):
                out.append(("C", e.step))
        return out

    def commands_sent(self) -> list[tuple[str, str, int]]:
        sent = []
        for e in self.events:
            if isinstance(e, StepStarted):
                sent.append(("action", e.step, e.attempt))
            elif isinstance(e, CompensationStarted):
                sent.append(("compensation", e.step, e.attempt))
        return sent
