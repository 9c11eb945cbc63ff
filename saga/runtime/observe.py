"""The observer port: what the runtime tells tracing, metrics and logs, and when.

The coordinator reports each decision only after its transaction committed, never while it
rebuilds state from the log, so a restart produces no duplicate spans and no double counts.
The participant reports each command it handles. `NullObserver` does nothing;
`saga.adapters.tracing.OpenTelemetryObserver` exports spans and metrics over OTLP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol

from saga.core.decide import Decision
from saga.core.ids import command_span_id, trace_id_for, traceparent
from saga.core.messages import Command, ErrorInfo, Reply
from saga.core.state import SagaState

__all__ = ["Committed", "Handling", "NullObserver", "Observer", "command_traceparent"]


@dataclass(frozen=True, slots=True)
class Committed:
    """One input's decision, as committed to the log."""

    before: SagaState | None
    decision: Decision
    input_kind: str
    """``start``, ``cancel``, ``retry``, ``resolve``, ``reply`` or ``timer``."""
    reply: Reply | None
    trace_parent: str | None
    """The ``traceparent`` header of the input record, if any."""
    decided_at: float


class Handling(Protocol):
    """The participant's view of one command being handled."""

    def outcome(self, ok: bool, error: ErrorInfo | None, replayed: bool) -> None:
        """Records how the command ended."""
        ...

    def traceparent(self) -> str | None:
        """The ``traceparent`` to send with the reply."""
        ...


class Observer(Protocol):
    """Receives the runtime's reports."""

    def committed(self, items: Sequence[Committed], committed_at: float) -> None:
        """A coordinator transaction committed these decisions."""
        ...

    def dead_lettered(self, topic: str, reason: str) -> None:
        """A record of ``topic`` went to the dead-letter topic."""
        ...

    def handling(self, service: str, command: Command) -> AbstractContextManager[Handling]:
        """Wraps a participant's handling of ``command``."""
        ...

    def watch_in_flight(self, count: Callable[[], int]) -> None:
        """Registers how to count the sagas in flight in this process."""
        ...


def command_traceparent(command: Command) -> str:
    """The ``traceparent`` a command carries: its send span, in its saga's trace."""
    span = command_span_id(command.saga_id, command.step, command.phase, command.attempt)
    return traceparent(trace_id_for(command.saga_id), span)


class _NullHandling:
    def outcome(self, ok: bool, error: ErrorInfo | None, replayed: bool) -> None:
        return None

    def traceparent(self) -> str | None:
        return None


class NullObserver:
    """Observes nothing."""

    def committed(self, items: Sequence[Committed], committed_at: float) -> None:
        """Does nothing."""

    def dead_lettered(self, topic: str, reason: str) -> None:
        """Does nothing."""

    @contextmanager
    def handling(self, service: str, command: Command) -> Iterator[Handling]:
        """Does nothing."""
        yield _NullHandling()

    def watch_in_flight(self, count: Callable[[], int]) -> None:
        """Does nothing."""
