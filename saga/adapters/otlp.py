"""OTLP/protobuf encoding of finished spans, written by hand for speed.

The OpenTelemetry exporter builds one protobuf object per span, attribute and value in Python
(`opentelemetry.exporter.otlp.proto.common`), about 50 µs per span on this project's spans; the
export thread that does it competes for the GIL with the event loop, so at saturation it costs
throughput. This module writes the same ``ExportTraceServiceRequest`` bytes directly, and keeps
the encoded form of recent attribute pairs (a saga's id, name and step recur in each of its
spans), so a span costs a few microseconds.

It reads spans by duck typing (the attributes of an SDK ``ReadableSpan``: ``context``,
``parent``, ``name``, ``kind``, ``start_time``, ``end_time``, ``attributes``, ``events``,
``links``, ``status``, ``resource``, ``instrumentation_scope``) and imports no OpenTelemetry
module, so that `saga.adapters.tracing` stays the one module that does. The output is
message-for-message what ``encode_spans(spans)`` gives (a test parses both and compares them).

Wire format (opentelemetry-proto, ``trace/v1/trace.proto``), as used here: a request holds
ResourceSpans (1); those hold a Resource (1: attributes 1) and ScopeSpans (2) and a schema URL
(3); ScopeSpans hold an InstrumentationScope (1: name 1, version 2, attributes 3), Spans (2) and
a schema URL (3). A Span: trace id 1, span id 2, trace state 3, parent span id 4, name 5, kind 6,
start 7 and end 8 (fixed64), attributes 9, dropped attributes 10, events 11 (time 1, name 2,
attributes 3, dropped 4), dropped events 12, links 13 (trace id 1, span id 2, trace state 3,
attributes 4, dropped 5, flags 6), dropped links 14, status 15 (message 2, code 3), flags 16
(fixed32). A KeyValue: key 1, AnyValue 2 (string 1, bool 2, int 3, double 4, array 5, kvlist 6,
bytes 7).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["encode_spans"]

_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_CACHE_LIMIT = 1 << 16
_kv_cache: dict[tuple[str, object, type], bytes] = {}
_pack_d = struct.Struct("<d").pack
_pack_q = struct.Struct("<Q").pack
_pack_i = struct.Struct("<I").pack
_SMALL = [bytes((n,)) for n in range(128)]


def _varint(n: int) -> bytes:
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, the payload's length, the payload."""
    return tag + _varint(len(payload)) + payload


def _text(tag: bytes, text: str | None) -> bytes:
    """A string field, left out when empty (proto3's default)."""
    return _field(tag, text.encode()) if text else b""


def _any(value: Any) -> bytes:
    """An AnyValue message's body."""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Mapping):
        pairs = b"".join(_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items())
        return _field(b"\x32", pairs)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any(v)) for v in value))
    if value is None:
        return b""
    raise TypeError(f"an attribute value of type {type(value).__name__} cannot be encoded")


def _key_value(key: str, value: Any) -> bytes:
    return _field(b"\x0a", key.encode()) + _field(b"\x12", _any(value))


def _framed(key: str, value: Any) -> bytes:
    """One KeyValue's body, with its length first."""
    body = _key_value(key, value)
    return _varint(len(body)) + body


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    """Repeated KeyValue fields; pairs of plain values are cached in their encoded form."""
    if not attributes:
        return b""
    out: list[bytes] = []
    get = _kv_cache.get
    for key, value in attributes.items():
        kind = type(value)
        if kind is str or kind is int or kind is bool:
            found = get((key, value, kind))
            if found is None:
                found = _framed(key, value)
                if len(_kv_cache) >= _CACHE_LIMIT:
                    _kv_cache.clear()  # a bound, not an LRU: pairs recur within a saga's spans
                _kv_cache[(key, value, kind)] = found
        else:
            found = _framed(key, value)
        out += (tag, found)
    return b"".join(out)


def _dropped(tag: bytes, count: int) -> bytes:
    return tag + _varint(count) if count else b""


def _trace_state(state: Any) -> bytes:
    if not state:
        return b""
    return _text(b"\x1a", ",".join(f"{k}={v}" for k, v in state.items()))


def _span(span: Any) -> bytes:
    context = span.context
    parent = span.parent
    parts = [
        b"\x0a\x10",
        context.trace_id.to_bytes(16, "big"),
        b"\x12\x08",
        context.span_id.to_bytes(8, "big"),
        _trace_state(context.trace_state),
    ]
    if parent is not None:
        parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    parts += (
        _text(b"\x2a", span.name),
        b"\x30",
        _SMALL[span.kind.value + 1],  # the API's INTERNAL is 0; OTLP's is 1
        b"\x39",
        _pack_q(span.start_time or 0),
        b"\x41",
        _pack_q(span.end_time or 0),
        _attributes(b"\x4a", span.attributes),
        _dropped(b"\x50", span.dropped_attributes),
    )
    for event in span.events:
        body = b"\x09" + _pack_q(event.timestamp or 0) + _text(b"\x12", event.name)
        body += _attributes(b"\x1a", event.attributes)
        body += _dropped(b"\x20", getattr(event, "dropped_attributes", 0))
        parts.append(_field(b"\x5a", body))
    parts.append(_dropped(b"\x60", span.dropped_events))
    for link in span.links:
        linked = link.context
        body = b"\x0a\x10" + linked.trace_id.to_bytes(16, "big")
        body += b"\x12\x08" + linked.span_id.to_bytes(8, "big")
        body += _attributes(b"\x22", link.attributes)
        body += _dropped(b"\x28", getattr(link, "dropped_attributes", 0))
        flags = _HAS_IS_REMOTE | (_IS_REMOTE if linked.is_remote else 0)
        body += b"\x35" + _pack_i(flags)
        parts.append(_field(b"\x6a", body))
    parts.append(_dropped(b"\x70", span.dropped_links))
    status = span.status
    if status is not None:
        code = status.status_code.value
        body = _text(b"\x12", status.description) + (b"\x18" + _varint(code) if code else b"")
        parts.append(_field(b"\x7a", body))
    flags = _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)
    parts += (b"\x85\x01", _pack_i(flags))
    return b"".join(parts)


def _scope(scope: Any) -> bytes:
    if scope is None:
        return b""
    body = _text(b"\x0a", scope.name) + _text(b"\x12", scope.version)
    return body + _attributes(b"\x1a", scope.attributes)


def encode_spans(spans: Iterable[Any]) -> bytes:
    """The serialized ``ExportTraceServiceRequest`` of ``spans``, grouped by resource and by
    instrumentation scope in the order they first appear."""
    groups: dict[int, tuple[Any, dict[int, tuple[Any, list[bytes]]]]] = {}
    for span in spans:
        resource = span.resource
        scopes = groups.get(id(resource))
        if scopes is None:
            scopes = groups[id(resource)] = (resource, {})
        scope = span.instrumentation_scope or None
        encoded = scopes[1].get(id(scope))
        if encoded is None:
            encoded = scopes[1][id(scope)] = (scope, [])
        encoded[1].append(_span(span))
    out = []
    for resource, by_scope in groups.values():
        body = _field(b"\x0a", _attributes(b"\x0a", resource.attributes))
        for scope, spans_of in by_scope.values():
            inner = _field(b"\x0a", _scope(scope))
            inner += b"".join([b"\x12" + _varint(len(s)) + s for s in spans_of])
            inner += _text(b"\x1a", scope.schema_url if scope is not None else None)
            body += _field(b"\x12", inner)
        body += _text(b"\x1a", resource.schema_url)
        out.append(_field(b"\x0a", body))
    return b"".join(out)
