"""What every message on the wire and in the log shares: the base model, the schema version,
and the small types the messages are made of (`saga.core.messages` gathers them all)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "SCHEMA_VERSION",
    "UNVERIFIED",
    "ErrorInfo",
    "IfExists",
    "JsonObject",
    "ParentRef",
    "Phase",
    "WireMessage",
    "unset",
]

SCHEMA_VERSION = 1
"""The schema version written by this release. Readers accept every version they know."""

Phase = Literal["action", "compensation"]
"""Whether a command or reply concerns a step's action or its compensation."""

JsonObject = dict[str, Any]

UNVERIFIED = " (unverified)"
"""Appended by the coordinator to a request's claimed ``by`` when requests are not signed
(`saga.runtime.gate`): the audit trail then says it is a claim."""

IfExists = Literal["return", "refuse"]
"""The id-reuse policy of a start request for an id that already names a saga (`StartSaga`)."""


def unset(value: object) -> bool:
    """Whether an optional field added after release 1 is left out of a record."""
    # Optional fields added after release 1 are left out of a record that does not use them,
    # so that such a record is byte for byte what an older release wrote.
    return value is None


class WireMessage(BaseModel):
    """A frozen, strict message with its schema version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    """Schema version of this message."""


class ParentRef(WireMessage):
    """The step of another saga that started this one (a sub-saga), at one attempt: where the
    child's outcome is replied to."""

    saga_id: str
    step: str
    attempt: int


class ErrorInfo(WireMessage):
    """What went wrong in a step, as reported by a participant or the coordinator."""

    type: str
    """Exception type name, ``StepFailed`` for business failures, ``Timeout`` for deadlines.

    The participant also reports, without an exception of that name: ``OutputInvalid`` (the
    handler's output is not a JSON object: not a dict, or holding a NaN, bytes, an object, a key
    that is not a string; business) and ``OutputTooLarge`` (the reply would exceed the
    participant's ``max_reply_bytes``; business), both permanent: running again would return
    the same; ``Expired`` (the command was older than its budget when the participant took it,
    so the handler did not run; technical) and ``Redelivered`` (the command came again and
    again without its handler ever finishing, its process dying each time, so it was
    dead-lettered instead of run once more; technical)."""
    message: str
    """Human-readable reason."""
    business: bool = False
    """True for a business failure (not retried)."""
    details: JsonObject = Field(default_factory=dict)
    """Structured data the participant attached."""
