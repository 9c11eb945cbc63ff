"""An event-sourced saga engine for Python microservices, on Kafka, traced with OpenTelemetry.

Declare a saga with `SagaDefinition`, `Step` and `RetryPolicy`; run it with a `Coordinator`;
serve its steps with a `Participant` in each service. `saga.testing` runs all of it in-process
for unit tests. See README.md for a tour.
"""

import importlib
from typing import TYPE_CHECKING, Any

from saga.core.definition import (
    Dependency,
    DependencyType,
    RetryPolicy,
    SagaDefinition,
    Step,
    StepKind,
)
from saga.core.state import SagaState, SagaStatus, StepState, StepStatus
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
    from saga.runtime.client import SagaClient
    from saga.runtime.coordinator import Coordinator
    from saga.runtime.participant import Participant, StepContext
    from saga.runtime.stores import MemoryReplyStore, SQLiteReplyStore

# The runtime's names load on first use (PEP 562), so that importing the pure core, or a
# definitions module, does not import anyio and the runtime with it.
_RUNTIME = {
    "SagaClient": "saga.runtime.client",
    "Coordinator": "saga.runtime.coordinator",
    "Participant": "saga.runtime.participant",
    "StepContext": "saga.runtime.participant",
    "MemoryReplyStore": "saga.runtime.stores",
    "SQLiteReplyStore": "saga.runtime.stores",
}


def __getattr__(name: str) -> Any:
    module = _RUNTIME.get(name)
    if module is None:
        raise AttributeError(f"module 'saga' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


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
