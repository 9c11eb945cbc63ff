"""An event-sourced saga engine for Python microservices, on Kafka, traced with OpenTelemetry.

Declare a saga with `SagaDefinition`, `Step` and `RetryPolicy`; run it with a `Coordinator`;
serve its steps with a `Participant` in each service. `saga.testing` runs all of it in-process
for unit tests. See README.md for a tour.
"""

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
    SagaTimeout,
    StepFailed,
    TransportError,
    UnknownSaga,
)
from saga.runtime.client import SagaClient
from saga.runtime.coordinator import Coordinator
from saga.runtime.participant import Participant, StepContext
from saga.runtime.stores import MemoryReplyStore, SQLiteReplyStore

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
    "SagaState",
    "SagaStatus",
    "SagaTimeout",
    "Step",
    "StepContext",
    "StepFailed",
    "StepKind",
    "StepState",
    "StepStatus",
    "TransportError",
    "UnknownSaga",
]
