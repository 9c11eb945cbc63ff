"""The saga's trace for the console: Jaeger's query API read through `saga.views.jaeger`
(the same client and the same placement as ``saga trace``), laid out for an HTML waterfall.

Each row carries its bar as percentages of the trace's duration, its depth under the root,
and, for a compensation, the span it undoes (its ``FOLLOWS_FROM`` link, as the tracing
adapter records it) so that the page can link the two rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio

from saga.runtime.traceids import trace_id_for
from saga.views.jaeger import TraceSpan, fetch_trace, trace_millis, waterfall_rows

__all__ = ["SpanRow", "TraceView", "load_trace"]

_SCALE = 10_000
"""Columns of `waterfall_rows`' axis: fine enough for percentages with two decimals."""


@dataclass(frozen=True, slots=True)
class SpanRow:
    """One span on the page's waterfall."""

    span: TraceSpan
    depth: int
    left: float
    """Percent of the axis before the bar starts."""
    width: float
    """Percent of the axis the bar takes."""
    undoes: TraceSpan | None
    """For a compensation: the span of the step it undoes (when it is in the trace)."""
    undone_by: tuple[TraceSpan, ...]
    """The compensations that undo this span."""

    @property
    def is_compensation(self) -> bool:
        """Whether the span is a compensation's."""
        return self.span.name.startswith("compensate")

    @property
    def millis(self) -> float:
        """The span's duration in milliseconds."""
        return self.span.duration_us / 1000


@dataclass(frozen=True, slots=True)
class TraceView:
    """A saga's trace, ready to draw, or why there is none."""

    saga_id: str
    trace_id: str
    rows: tuple[SpanRow, ...]
    millis: float
    services: tuple[str, ...]
    problem: str | None = None
    """Why the trace could not be shown (Jaeger unreachable, no trace yet)."""


async def load_trace(saga_id: str, jaeger_url: str, timeout: float = 5.0) -> TraceView:
    """The saga's trace from the Jaeger query API at ``jaeger_url`` (never raises: a trace
    that cannot be read comes back with its ``problem``)."""
    trace_id = f"{trace_id_for(saga_id):032x}"
    try:
        spans = await anyio.to_thread.run_sync(lambda: fetch_trace(saga_id, jaeger_url, timeout))
    except LookupError:
        return TraceView(
            saga_id,
            trace_id,
            (),
            0.0,
            (),
            f"Jaeger at {jaeger_url} has no trace {trace_id} for this saga yet (spans are "
            "exported in batches: try again in a few seconds), or tracing is off",
        )
    except OSError as exc:
        return TraceView(
            saga_id, trace_id, (), 0.0, (), f"Jaeger's query API at {jaeger_url}: {exc}"
        )
    placed = waterfall_rows(spans, _SCALE)
    by_id = {s.span_id: s for s in spans}
    undone: dict[str, list[TraceSpan]] = {}
    for r in placed:
        if r.undoes is not None and r.span.links and r.span.links[0] in by_id:
            undone.setdefault(r.span.links[0], []).append(r.span)
    rows = tuple(
        SpanRow(
            span=r.span,
            depth=r.depth,
            left=100 * r.left / _SCALE,
            width=max(0.15, 100 * r.size / _SCALE),
            undoes=by_id.get(r.span.links[0]) if r.undoes is not None and r.span.links else None,
            undone_by=tuple(undone.get(r.span.span_id, ())),
        )
        for r in placed
    )
    services = tuple(sorted({s.service for s in spans}))
    return TraceView(saga_id, trace_id, rows, trace_millis(spans), services)
