"""Trace and span ids derived from a saga's identity, so that tracing needs no stored state.

One saga is one trace whose id is a hash of the saga id: it survives coordinator restarts and
long waits, and every process computes it alike. A command's span id is a hash of the saga id,
step, phase and attempt, so its ``traceparent`` can be written with the command before the span
is exported, and a compensation can link to the forward step it undoes. These are plain
functions of no tracing library, so log lines and views can compute the same ids; they live in
the runtime, not the core, because no decision of the core depends on trace context.

The ids are cached (a saga's trace id and its commands' span ids are asked for by the
coordinator, for the headers and again for the spans, and by the participant): a hash costs
more than a lookup, and a saga's ids are all asked for within its lifetime.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

__all__ = ["command_span_id", "root_span_id", "span_id_for", "trace_id_for", "traceparent"]


def _hash(text: str, size: int) -> int:
    value = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=size).digest(), "big")
    return value or 1  # zero is the invalid id in W3C trace context


@lru_cache(maxsize=16_384)
def trace_id_for(saga_id: str) -> int:
    """The 128-bit trace id of the saga's trace."""
    return _hash(f"saga-trace:{saga_id}", 16)


def span_id_for(saga_id: str, *parts: object) -> int:
    """A 64-bit span id for a named event of the saga."""
    return _hash("/".join([saga_id, *map(str, parts)]), 8)


@lru_cache(maxsize=16_384)
def root_span_id(saga_id: str) -> int:
    """The span id of the saga's root span."""
    return span_id_for(saga_id, "root")


@lru_cache(maxsize=65_536)
def command_span_id(saga_id: str, step: str, phase: str, attempt: int) -> int:
    """The span id of the span that sent one command (and parents its handling)."""
    return span_id_for(saga_id, step, phase, attempt)


def traceparent(trace_id: int, span_id: int) -> str:
    """A W3C ``traceparent`` header value (sampled)."""
    return f"00-{trace_id:032x}-{span_id:016x}-01"
