"""Every error the engine raises, under one root.

The tree::

    SagaError
    ├── DefinitionError          a saga definition breaks a rule (names the step and the rule)
    ├── IllegalTransition        an event does not apply to the state it was given
    ├── DecodeError              bytes that are not a valid message (goes to the dead-letter topic)
    ├── UnknownSaga              no definition or no state for the name or id asked for
    ├── SagaExists               a start under ``if_exists="refuse"`` for an id that exists
    │                            with another name or input
    ├── TopologyChanged          the topics' partition count is not the one the sagas were
    │                            recorded under: the coordinator refuses to run
    ├── SagaTimeout              `Coordinator.wait` ran out of time
    ├── UsageError               the engine was called wrongly (also a ValueError): an invalid
    │                            saga id, a handler registered twice, a missing transport
    ├── ConfigurationError       a setting cannot be used (also a ValueError): Kafka TLS/SASL,
    │                            keys, keyring, policy; named, with what to do
    ├── TransportError           the broker could not be reached or refused a write
    │   ├── Fenced               a newer coordinator owns the partition; state must be re-read
    │   ├── Unauthorized         the broker refused the credentials or a right (not retriable)
    │   └── ConnectionFailed     no connection could be set up; the likely cause named
    └── StepFailed               raised by a participant's handler: a business failure

Retriability is data: `TransportError.retriable` says whether trying again may help, and the
loops that retry (the coordinator taking over a partition, a participant riding out an outage)
read it rather than guessing from the exception's type.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ConfigurationError",
    "ConnectionFailed",
    "DecodeError",
    "DefinitionError",
    "Fenced",
    "IllegalTransition",
    "SagaError",
    "SagaExists",
    "SagaTimeout",
    "StepFailed",
    "TopologyChanged",
    "TransportError",
    "Unauthorized",
    "UnknownSaga",
    "UsageError",
]


class SagaError(Exception):
    """The root of every error the engine raises."""


class DefinitionError(SagaError):
    """A saga definition breaks one or more rules.

    Attributes:
        problems: One line per broken rule, each naming the saga, the step and the rule.
    """

    def __init__(self, saga: str, problems: Sequence[str]) -> None:
        self.saga = saga
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"saga definition {saga!r} is invalid:\n{lines}")


class IllegalTransition(SagaError):
    """An event that is not legal in the state it was applied to; the state is unchanged."""


class DecodeError(SagaError):
    """Bytes that could not be decoded into a message.

    Attributes:
        reason: A short, stable reason code (``invalid_json``, ``too_large``, ...), used as the
            dead-letter reason and as a metric label.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class UnknownSaga(SagaError):
    """No definition with that name, or no saga with that id."""


class SagaExists(SagaError):
    """A start with ``if_exists="refuse"`` for an id that already names a saga with another
    name or input; nothing was written. (When two such starts race, the coordinator decides and
    records the loser as a ``StartRefused`` event of the saga.)"""


class TopologyChanged(SagaError):
    """The topics have another partition count than the one the sagas were recorded under.

    A saga's records are placed by the hash of its id modulo the partition count, so with
    another count its requests and replies arrive on a partition that does not hold it:
    in-flight replies would be dead-lettered, succeeded steps compensated and finished ids
    started a second time. The coordinator refuses to run instead.

    Attributes:
        recorded: The count a checkpoint was written under.
        current: The topics' count now.
        partition: The partition whose checkpoint recorded ``recorded``.
        prefix: The topic prefix.
    """

    def __init__(self, recorded: int, current: int, *, partition: int, prefix: str) -> None:
        self.recorded = recorded
        self.current = current
        self.partition = partition
        self.prefix = prefix
        super().__init__(
            f"the topics under prefix {prefix!r} have {current} partitions, but the checkpoint "
            f"of partition {partition} was written with {recorded} partitions: sagas would move "
            "to other partitions (in-flight replies dead-lettered, succeeded steps compensated, "
            "finished ids started again), so the coordinator will not run. A count cannot be "
            "changed in place: let every saga end, stop the coordinators and move to a new "
            f"prefix created with the new count (saga coordinator --prefix NEW --partitions "
            f"{current}); see the README, 'Limits stated plainly'"
        )


class SagaTimeout(SagaError):
    """A wait for a saga to finish ran out of time; the saga itself goes on."""


class UsageError(SagaError, ValueError):
    """The engine was called wrongly; the message says what to change."""


class TransportError(SagaError):
    """The broker could not be reached, or refused a write.

    Attributes:
        retriable: Whether trying the same operation again may succeed.
    """

    retriable: bool = True


class Fenced(TransportError):
    """Another coordinator took over a partition; this one must drop it and re-read the log."""

    retriable = False


class StepFailed(SagaError):
    """Raised by a participant's handler to report a business failure.

    A business failure is final for the step: it is not retried, and the saga compensates
    the steps that completed before it. Any other exception is a technical failure and is
    retried according to the step's retry policy.

    Attributes:
        reason: Why the step failed, in words an operator can act on.
        details: Optional structured data, returned to the coordinator with the failure.
    """

    def __init__(self, reason: str, details: dict[str, object] | None = None) -> None:
        self.reason = reason
        self.details = dict(details or {})
        super().__init__(reason)


class ConfigurationError(SagaError, ValueError):
    """Settings a process was started with cannot be used (Kafka's TLS and SASL, the signing
    key, the keyring, the policy, the payload keys): the message names the setting (its field
    and environment variable) and what to do, and never contains a secret."""


class Unauthorized(TransportError):
    """The broker refused this client's principal: its credentials (SASL authentication
    failed), or a right on a resource (an ACL is missing). Retrying the same operation with the
    same settings cannot help, so loops that retry `TransportError` stop on this one."""

    retriable = False


class ConnectionFailed(TransportError):
    """No connection to the broker could be set up; the message says the likely cause (the
    broker is unreachable, its certificate is not trusted, the port speaks another security
    protocol) and the setting to look at. ``retriable`` is false where the settings must
    change (an untrusted certificate), true where the broker may still come (unreachable)."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable
