"""An event-sourced saga engine for Python microservices, on Kafka, traced with OpenTelemetry.

Declare a saga with `SagaDefinition`, `Step` and `RetryPolicy`; run it with a `Coordinator`;
serve its steps with a `Participant` in each service. `saga.testing` runs all of it in-process
for unit tests. See README.md for a tour.
"""

import importlib
from typing import TYPE_CHECKING, Any

from saga.errors import (
    DecodeError,
    DefinitionError,
    Fenced,
    IllegalTransition,
    SagaError,
    SagaExists,
    SagaTimeout,
    StepFailed,
    TopologyChanged,
    TransportError,
    UnknownSaga,
    UsageError,
)

if TYPE_CHECKING:
    from saga.core.definition import (
        Dependency,
        DependencyType,
        RetryPolicy,
        SagaDefinition,
        Step,
        StepKind,
    )
    from saga.core.state import SagaState, SagaStatus, StepState, StepStatus
    from saga.runtime.client import SagaClient
    from saga.runtime.coordinator import Coordinator
    from saga.runtime.participant import Participant, StepContext
    from saga.runtime.stores import MemoryReplyStore, SQLiteReplyStore

# Every name but the errors loads on first use (PEP 562). Importing any `saga.*` module runs
# this file first, so what it imported eagerly every process paid for: the pydantic models of
# the core (half a second of a command's start on a loaded machine) for `saga --help` or a
# command that never touches a definition, and the runtime (anyio) for the pure core.
_LAZY = {
    "Dependency": "saga.core.definition",
    "DependencyType": "saga.core.definition",
    "RetryPolicy": "saga.core.definition",
    "SagaDefinition": "saga.core.definition",
    "Step": "saga.core.definition",
    "StepKind": "saga.core.definition",
    "SagaState": "saga.core.state",
    "SagaStatus": "saga.core.state",
    "StepState": "saga.core.state",
    "StepStatus": "saga.core.state",
    "SagaClient": "saga.runtime.client",
    "Coordinator": "saga.runtime.coordinator",
    "Participant": "saga.runtime.participant",
    "StepContext": "saga.runtime.participant",
    "MemoryReplyStore": "saga.runtime.stores",
    "SQLiteReplyStore": "saga.runtime.stores",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'saga' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Coordinator",
    "DecodeError",
    "DefinitionError",
    "Dependency",
    "DependencyType",
    "Fenced",
    "IllegalTransition",
    "MemoryReplyStore",
    "Participant",
    "RetryPolicy",
    "SQLiteReplyStore",
    "SagaClient",
    "SagaDefinition",
    "SagaError",
    "SagaExists",
    "SagaState",
    "SagaStatus",
    "SagaTimeout",
    "Step",
    "StepContext",
    "StepFailed",
    "StepKind",
    "StepState",
    "StepStatus",
    "TopologyChanged",
    "TransportError",
    "UnknownSaga",
    "UsageError",
]
