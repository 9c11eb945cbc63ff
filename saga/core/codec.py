"""Bytes to messages and back, with the bounds that keep a poison message from hurting anyone.

Decoding is strict and bounded: at most `Limits.max_bytes` bytes, at most `Limits.max_depth`
levels of nesting, a known schema version, no unknown fields. Every failure is a `DecodeError`
with a short reason code, which the runtime records on the dead-letter topic with the raw bytes.
Encoding uses pydantic's serializer, which writes JSON bytes directly (no intermediate dict).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from saga.core.messages import SCHEMA_VERSION
from saga.errors import DecodeError

__all__ = ["DEFAULT_LIMITS", "Limits", "decode", "encode"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a decoder accepts."""

    max_bytes: int = 1_048_576
    """Largest message, in bytes (1 MiB, Kafka's default ``max.message.bytes``)."""
    max_depth: int = 32
    """Deepest nesting of objects and arrays."""


DEFAULT_LIMITS = Limits()

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
    depth = _depth(obj, limits.max_depth)
    if depth > limits.max_depth:
        raise DecodeError("too_deep", f"nesting deeper than {limits.max_depth}")
    version = obj.get("v")
    if type(version) is not int or version not in _KNOWN_VERSIONS:  # a bool is not a version
        raise DecodeError(
            "unknown_schema_version",
            f"schema version {version!r}; this release reads {sorted(_KNOWN_VERSIONS)}",
        )
    try:
        return adapter.validate_python(obj)
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
