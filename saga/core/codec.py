"""Bytes to messages and back, with the bounds that keep a poison message from hurting anyone.

Decoding is strict and bounded: at most `Limits.max_bytes` bytes, at most `Limits.max_depth`
levels of nesting, a known schema version, no unknown fields. Foreign input is read with
`DEFAULT_LIMITS`, what the engine wrote itself with the wider `ENGINE_LIMITS`. Every failure is
a `DecodeError` with a short reason code, which the runtime records on the dead-letter topic
with the raw bytes.
Encoding uses pydantic's serializer, which writes JSON bytes directly (no intermediate dict).

Decoding is on the recovery path (a rebuild decodes every record of a partition's log), so its
checks are cheap first: the depth is bounded by the count of opening brackets, taken in C, and
the tree is walked only when that count does not already prove the bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar, cast

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from saga.core.messages import SCHEMA_VERSION
from saga.errors import DecodeError

__all__ = ["COMMAND_LIMITS", "DEFAULT_LIMITS", "ENGINE_LIMITS", "Limits", "decode", "encode"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a decoder accepts."""

    max_bytes: int = 1_048_576
    """Largest message, in bytes (1 MiB, Kafka's default ``max.message.bytes``)."""
    max_depth: int = 32
    """Deepest nesting of objects and arrays."""


DEFAULT_LIMITS = Limits()
"""The bounds on foreign input: requests, replies, and the commands a participant receives."""

ENGINE_LIMITS = Limits(max_bytes=64 * 1_048_576, max_depth=2 * DEFAULT_LIMITS.max_depth)
"""The bounds on what the engine wrote itself (the log and snapshots), read back by the
coordinator, clients and views; a participant reads commands, which the coordinator builds from
accepted input, with this depth and the foreign size bound (`COMMAND_LIMITS`).

The engine nests what it accepted deeper when it stores it: a snapshot holds the state, which
holds the input (two levels more) and each step's output (four more); a command's payload is a
template over them. So these bounds are twice the foreign depth, which any accepted input fits
once stored, and a size bound that only guards against garbage (the broker's own limit on a
record is what really bounds it).
"""

COMMAND_LIMITS = Limits(max_bytes=DEFAULT_LIMITS.max_bytes, max_depth=ENGINE_LIMITS.max_depth)
"""The bounds a participant reads commands with (see `ENGINE_LIMITS`)."""

_KNOWN_VERSIONS = frozenset({SCHEMA_VERSION})


def encode(message: BaseModel) -> bytes:
    """Serialises a message to compact JSON bytes."""
    return message.__pydantic_serializer__.to_json(message)


def decode(adapter: TypeAdapter[T], data: bytes | None, limits: Limits = DEFAULT_LIMITS) -> T:
    """Decodes and validates one message.

    Raises:
        DecodeError: With reason ``empty``, ``too_large``, ``invalid_utf8``, ``invalid_json``,
            ``too_deep``, ``not_an_object``, ``unknown_schema_version`` or ``invalid_message``.
    """
    if not data:
        raise DecodeError("empty", "the message has no value")
    if len(data) > limits.max_bytes:
        raise DecodeError("too_large", f"{len(data)} bytes, the limit is {limits.max_bytes}")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise DecodeError("invalid_utf8", str(uexc)) from None
        if "depth limit" in str(exc):  # orjson stops at 1024 levels, far past ours
            raise DecodeError("too_deep", f"nesting deeper than {limits.max_depth}") from None
        raise DecodeError("invalid_json", str(exc)) from None
    if not isinstance(obj, dict):
        raise DecodeError("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    # Each level of nesting opens with a bracket; counting them (strings included, so never
    # fewer than the depth) is far cheaper than the walk, which only a deep message needs.
    brackets = data.count(b"{") + data.count(b"[")
    if brackets > limits.max_depth and _depth(obj, limits.max_depth) > limits.max_depth:
        raise DecodeError("too_deep", f"nesting deeper than {limits.max_depth}")
    version = obj.get("v")
    if type(version) is not int or version not in _KNOWN_VERSIONS:  # a bool is not a version
        raise DecodeError(
            "unknown_schema_version",
            f"schema version {version!r}; this release reads {sorted(_KNOWN_VERSIONS)}",
        )
    try:
        # The adapter's validator itself: `TypeAdapter.validate_python` only adds argument checks.
        return cast(T, adapter.validator.validate_python(obj))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise DecodeError("invalid_message", f"{where}: {first['msg']}") from None


def _depth(root: Any, limit: int) -> int:
    """Nesting depth of a JSON value, stopping early once past ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        value, level = stack.pop()
        if level > deepest:
            deepest = level
            if deepest > limit:
                return deepest
        if isinstance(value, dict):
            stack.extend((v, level + 1) for v in value.values() if isinstance(v, dict | list))
        elif isinstance(value, list):
            stack.extend((v, level + 1) for v in value if isinstance(v, dict | list))
    return deepest
