"""The observer port: what the runtime tells tracing, metrics and logs, and when.

The coordinator reports each decision only after its transaction committed, never while it
rebuilds state from the log, so a restart produces no duplicate spans and no double counts.
The participant reports each command it handles.

The observer is also the one place where context crosses the wire, in both directions: every
outgoing message (a client's request, a coordinator's command, a participant's reply) takes its
headers from `Observer.headers`, and every incoming record's headers are handed to the observer
with what it reports (`Committed.headers`, `Observer.handling`). The coordinator, the
participant and the client never read or write a trace header themselves, and the pure core
never sees one.

`NullObserver` does nothing and adds no headers;
`saga.adapters.tracing.OpenTelemetryObserver` exports spans and metrics over OTLP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol

from saga.core.decide import Decision, InputKind
from saga.core.messages import Command, ErrorInfo, Reply, Request
from saga.core.state import SagaState
from saga.runtime.ports import Headers

__all__ = ["Committed", "Handling", "NullObserver", "Observer", "Outbound"]

Outbound = Command | Reply | Request
"""A message the runtime sends: a request (client), a command (coordinator), a reply
(participant)."""


@dataclass(frozen=True, slots=True)
class Committed:
    """One input's decision, as committed to the log."""

    before: SagaState | None
    decision: Decision
    input_kind: InputKind
    """``start``, ``cancel``, ``retry``, ``resolve``, ``reply`` or ``timer``."""
    reply: Reply | None
    headers: Headers
    """The headers of the input record (none for a timer)."""
    decided_at: float


class Handling(Protocol):
    """The participant's view of one command being handled."""

    def outcome(self, ok: bool, error: ErrorInfo | None, replayed: bool) -> None:
        """Records how the command ended."""
        ...


class Observer(Protocol):
    """Receives the runtime's reports, and gives outgoing messages their headers."""

    def committed(self, items: Sequence[Committed], committed_at: float) -> None:
        """A coordinator transaction committed these decisions."""
        ...

    def dead_lettered(self, topic: str, reason: str) -> None:
        """A record of ``topic`` went to the dead-letter topic."""
        ...

    def handling(
        self, service: str, command: Command, headers: Headers
    ) -> AbstractContextManager[Handling]:
        """Wraps a participant's handling of ``command``, which arrived with ``headers``."""
        ...

    def headers(self, message: Outbound) -> Headers:
        """The headers to send with ``message``.

        The participant asks for a reply's headers inside `handling`, so that they can carry
        the handling's context.
        """
        ...

    def watch_in_flight(self, count: Callable[[], int]) -> None:
        """Registers how to count the sagas in flight in this process."""
        ...


class _NullHandling:
    def outcome(self, ok: bool, error: ErrorInfo | None, replayed: bool) -> None:
        return None


class NullObserver:
    """Observes nothing and adds no headers."""

    def committed(self, items: Sequence[Committed], committed_at: float) -> None:
        """Does nothing."""

    def dead_lettered(self, topic: str, reason: str) -> None:
        """Does nothing."""

    @contextmanager
    def handling(self, service: str, command: Command, headers: Headers) -> Iterator[Handling]:
        """Does nothing."""
        yield _NullHandling()

    def headers(self, message: Outbound) -> Headers:
        """No headers."""
        return ()

    def watch_in_flight(self, count: Callable[[], int]) -> None:
        """Does nothing."""
