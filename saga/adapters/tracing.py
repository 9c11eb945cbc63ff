"""OpenTelemetry traces and metrics for the runtime. The only module that imports opentelemetry.

Traces. Each saga is one trace (its id derived from the saga id, `saga.runtime.traceids`):

- ``saga <name>``: the root, recorded when the saga starts, linked to the trace of the request
  that started it (a client starting forty sagas in one request keeps forty traces);
- ``decide <input>``: every committed decision (a start, a reply, a timer, an operator
  request), with the events it appended as span events;
- ``send <service> <action>``: every command, a producer span whose id is derived from the
  saga, step, phase and attempt, so the command's ``traceparent`` header is known before the
  span exists; ``compensate`` sends carry a link to the forward step's send span;
- ``backoff <step>``: the wait before a retry, from the failure to the retry time;
- ``timer <step>``: a step's durable timer (``delay``, ``start_at``), from the moment it was
  scheduled to its due time (made when it is set, so a restart cannot lose it; a timer that a
  compensation cancels still ends at its due time, and its ``skip`` span says when it was
  cancelled);
- ``wait <step>`` and ``approval <step>``: a step waiting for its signal or for a decision, from
  its start to its end (made when it ends), with the signal and its sender, or who decided
  (``saga.approval.by``, ``saga.approval.decision``), as attributes, and the approval's
  reminders and escalations as span events (those a coordinator saw before a restart are
  counted in ``saga.approval.reminders`` but have no event);
- ``start saga <name>``: a sub-saga step starting its child, linked to the child's root span
  (the child's root links back to the parent's through the start request's headers);
- ``for_each <step>``: a fan-out step, from its expansion to its end; each item's command spans
  are named with the item (``send kitchen cook dishes[1]``);
- ``skip <step>``: a step that will not run (its condition was false, or its timer was
  cancelled), with the reason;
- ``handle <service> <action>``: the participant's work, a consumer span under the send span,
  with the user's own spans nested inside;
- ``saga <outcome>``: from start to end, once the saga is completed, compensated or stuck.

Spans are made after the coordinator's transaction commits, never while it rebuilds state, so
a restart adds no duplicates. Attributes come from an allowlist (ids, names, attempts, error
types); payloads are added only with ``record_payloads=True`` (``SAGA_TRACE_PAYLOADS=1``; off
by default).

Error messages carry personal data in practice, so wherever an error's text would go (the
``saga.error.message`` attribute, a span status, the ``error.message`` of a span event, and the
saga's ``reason``, which quotes step errors), the observer's redactor writes what stands for it
(`saga.runtime.redaction`): by default the type and the message's length. The error type is
always kept. ``redactor=keep_message`` (or ``SAGA_REDACT=none``) puts messages back.

Cost. Every span of the coordinator describes something that already happened (its start, end,
parent and id are known when the transaction commits), so it is built as a finished
``ReadableSpan`` and handed straight to the tracer provider's span processors: no sampler, no
live span, no attribute validation or lock per attribute (the values are ours and already of
the exported types). The handling span is a small recording span of this module
(`_HandlingSpan`), current while the handler runs so that the user's spans nest under it, and
finished the same way. Trace headers are formatted from the derived ids, not through a
propagator. `from_env` exports with `OtlpSpanExporter`, which writes the OTLP protobuf bytes
itself (`saga.adapters.otlp`, a few µs per span instead of ~50 µs for the stock encoder) in a
`BatchSpanProcessor` sized for saturation (big, rare exports; ``OTEL_BSP_*`` still override),
and skips metrics entirely when no metric reader is configured. The export thread competes
for the GIL with the event loop, so its CPU counts as much as the loop's own: measure both
(`bench.bench_tracing`).

Sampling. Every saga is traced by default. ``sample=0.1`` (``SAGA_TRACE_SAMPLE=0.1``) traces
one saga in ten, chosen by its trace id (the rule of OpenTelemetry's ``TraceIdRatioBased``:
the low 64 bits of the id below ratio times 2**64), and the id is derived from the saga id, so every
process with the same setting picks the same sagas: a sampled saga is traced entirely, in the
coordinator and in every service, and the others not at all (their headers carry an unsampled
``traceparent``, so other instrumented consumers skip them too). Give every process the same
ratio. Metrics count every saga, sampled or not.

Why not opentelemetry-instrumentation-aiokafka: it makes one span per send at send time and
injects its own context. Our sends are transactional, so a span at send time would describe
records that an aborted transaction never published, and the injected context would differ from
the deterministic one the compensation links rely on. Context still travels in the standard
W3C ``traceparent`` Kafka header, so other instrumented consumers join the same traces.

Metrics (OTLP, when ``OTEL_METRICS_EXPORTER=otlp``): ``saga.sagas.started``,
``saga.sagas.ended`` (by status), ``saga.sagas.in_flight``, ``saga.saga.duration``,
``saga.step.duration`` (by step and outcome), ``saga.step.retries``, ``saga.dead_letters``
(by topic and reason), ``saga.participant.handled`` and ``saga.participant.duration``.
"""

from __future__ import annotations

import contextvars
import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import orjson
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import (
    CallbackOptions,
    Meter,
    MeterProvider,
    NoOpMeterProvider,
    Observation,
)
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes, AttributeValue

from saga.adapters import otlp
from saga.core.definition import split_item
from saga.core.messages import (
    ApprovalReminded,
    Command,
    CompensationRetryScheduled,
    ErrorInfo,
    EventBase,
    SagaCompensated,
    SagaCompleted,
    SagaStarted,
    SagaStuck,
    SignalReceived,
    StartSaga,
    StepEvent,
    StepFailedEvent,
    StepRetryScheduled,
    StepScheduled,
    StepSkipped,
    StepStarted,
    StepStuck,
    StepSucceeded,
    StepTimedOut,
)
from saga.core.state import SagaState, StepState, StepStatus
from saga.runtime.observe import Committed, Handling, Outbound
from saga.runtime.ports import Headers
from saga.runtime.redaction import Redactor, redactor_from_env, safely
from saga.runtime.traceids import command_span_id, root_span_id, trace_id_for, traceparent

__all__ = ["DeterministicIds", "OpenTelemetryObserver", "OtlpSpanExporter", "sample_from_env"]

_forced: contextvars.ContextVar[tuple[int | None, int | None]] = contextvars.ContextVar(
    "saga_forced_ids", default=(None, None)
)
_propagator = TraceContextTextMapPropagator()
_TRACE_HEADERS = frozenset(_propagator.fields)
_ENDINGS = {SagaCompleted: "completed", SagaCompensated: "compensated", SagaStuck: "stuck"}
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)
_UNSET = Status(StatusCode.UNSET)
_SCOPE = InstrumentationScope("saga")
_ALL = 1 << 64


class DeterministicIds(IdGenerator):
    """Random ids, except where the engine asks for a derived one (`saga.runtime.traceids`)."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()

    def generate_span_id(self) -> int:
        """The forced span id if one is set, else a random one."""
        return _forced.get()[1] or self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        """The forced trace id if one is set, else a random one."""
        return _forced.get()[0] or self._random.generate_trace_id()


class OtlpSpanExporter(OTLPSpanExporter):
    """The OTLP/HTTP protobuf exporter (same settings, endpoint, TLS, headers, compression and
    retries), with the request encoded by `saga.adapters.otlp` instead of the stock encoder:
    the same bytes for a few µs per span instead of ~50 µs."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Encodes ``spans`` and posts them (falls back to the stock path if the SDK's HTTP
        client is not where this version keeps it)."""
        client = getattr(self, "_client", None)
        if client is None or getattr(self, "_shutdown", True):
            return super().export(spans)
        try:
            data = otlp.encode_spans(spans)
        except (TypeError, ValueError, AttributeError):
            return super().export(spans)  # a span this encoder does not know: the stock one
        result = client.export(data)
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE


def sample_from_env() -> float:
    """The sampling ratio ``SAGA_TRACE_SAMPLE`` sets (1.0, every saga, when unset).

    Raises:
        ValueError: It is not a number from 0 to 1.
    """
    raw = os.environ.get("SAGA_TRACE_SAMPLE", "").strip()
    if not raw:
        return 1.0
    ratio = float(raw)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"SAGA_TRACE_SAMPLE={raw!r}: give a ratio from 0 to 1, such as 0.1")
    return ratio


def _batch_processor(exporter: OtlpSpanExporter) -> BatchSpanProcessor:
    """Batch span processor settings for saturation, where not set by ``OTEL_BSP_*``: a queue
    that holds a few seconds of spans at thousands of sagas per second, and big exports (one
    HTTP request per 2,048 spans) so the export thread wakes rarely."""
    queue = None if os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE") else 65_536
    batch = None if os.environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") else 2_048
    return BatchSpanProcessor(exporter, max_queue_size=queue, max_export_batch_size=batch)


@contextmanager
def _ids(trace_id: int | None, span_id: int | None) -> Iterator[None]:
    token = _forced.set((trace_id, span_id))
    try:
        yield
    finally:
        _forced.reset(token)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _header(trace_id: int, span_id: int, sampled: bool) -> Headers:
    value = traceparent(trace_id, span_id)
    return (("traceparent", (value if sampled else value[:-2] + "00").encode()),)


def _link_to(headers: Headers) -> tuple[Link, ...]:
    """A link to the span that the ``traceparent`` among ``headers`` names, if any."""
    found = [(k, v) for k, v in headers if k in _TRACE_HEADERS]
    if not found:
        return ()
    if len(found) == 1 and found[0][0] == "traceparent":
        # The common case, parsed here: a propagator would build two contexts to say it.
        parts = found[0][1].split(b"-")
        if len(parts) == 4 and parts[0] == b"00" and len(parts[1]) == 32 and len(parts[2]) == 16:
            try:
                trace_id, span_id = int(parts[1], 16), int(parts[2], 16)
                flags = int(parts[3][:2], 16)
            except ValueError:
                return ()
            if trace_id and span_id:
                return (Link(SpanContext(trace_id, span_id, True, TraceFlags(flags))),)
            return ()
    carrier = {k: v.decode(errors="replace") for k, v in found}
    ctx = trace.get_current_span(_propagator.extract(carrier)).get_span_context()
    return (Link(ctx),) if ctx.is_valid else ()


def _inject(context: otel_context.Context | None = None) -> Headers:
    """The W3C trace headers of ``context`` (the current one by default)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context)
    return tuple((k, v.encode()) for k, v in carrier.items())


def _unit_name(base: str, step: str) -> str:
    """A span name for one step's work: ``base``, with the item for a fan-out's item
    (``send kitchen cook dishes[1]``), so that items are told apart in a trace."""
    return f"{base} {step}" if split_item(step)[1] is not None else base


def _step_label(step: str) -> str:
    """A step's name as a metric label: an item counts under its step (``dishes[1]`` is
    ``dishes``), so a fan-out over a thousand items makes one series, not a thousand."""
    return split_item(step)[0]


def _clean(value: object) -> AttributeValue | None:
    """A user's attribute value as OpenTelemetry accepts it (sequences become tuples), or
    ``None`` for what it does not."""
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        items = tuple(value)
        kinds = {type(v) for v in items}
        if len(kinds) <= 1 and kinds <= {str, bool, int, float}:
            return items
    return None


class _Waiting:
    """What this process saw of a step that waits (a signal or a decision) since it began,
    kept until the step ends: its kind and its reminders."""

    __slots__ = ("kind", "reminders")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.reminders: list[ApprovalReminded] = []


class _HandlingSpan(trace.Span):
    """The ``handle`` span: recording, current while the handler runs (the user's spans nest
    under it and may add attributes and events to it), and handed to the span processors as a
    finished ``ReadableSpan`` when it ends, without the SDK's per-span machinery."""

    def __init__(
        self,
        observer: OpenTelemetryObserver,
        name: str,
        context: SpanContext,
        parent: SpanContext,
        attributes: dict[str, Any],
    ) -> None:
        self._observer = observer
        self._name = name
        self._context = context
        self._parent = parent
        self._attributes = attributes
        self._events: list[Event] = []
        self._links: list[Link] = []
        self._status = _UNSET
        self._start = time.time_ns()
        self._ended = False

    def end(self, end_time: int | None = None) -> None:
        """Ends the span and hands it to the span processors (once)."""
        if self._ended:
            return
        self._ended = True
        self._observer._finish(
            ReadableSpan(
                name=self._name,
                context=self._context,
                parent=self._parent,
                resource=self._observer._resource,
                attributes=self._attributes,
                events=tuple(self._events),
                links=tuple(self._links),
                kind=SpanKind.CONSUMER,
                status=self._status,
                start_time=self._start,
                end_time=end_time or time.time_ns(),
                instrumentation_scope=_SCOPE,
            )
        )

    def get_span_context(self) -> SpanContext:
        """The span's context (its parent is the command's send span)."""
        return self._context

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        """Sets attributes (values OpenTelemetry does not accept are left out)."""
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        """Sets one attribute (left out if OpenTelemetry does not accept its value)."""
        cleaned = _clean(value)
        if not self._ended and cleaned is not None:
            self._attributes[key] = cleaned

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        """Adds a span event."""
        if not self._ended:
            found = {k: c for k, v in (attributes or {}).items() if (c := _clean(v)) is not None}
            self._events.append(Event(name, found, timestamp or time.time_ns()))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        """Adds a link."""
        if not self._ended and context.is_valid:
            self._links.append(Link(context, attributes))

    def update_name(self, name: str) -> None:
        """Renames the span."""
        if not self._ended:
            self._name = name

    def is_recording(self) -> bool:
        """Whether it still records (until it ends)."""
        return not self._ended

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """Sets the status (OK is final, as in the SDK)."""
        if self._ended or self._status.status_code is StatusCode.OK:
            return
        self._status = status if isinstance(status, Status) else Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """Records an exception as a span event, as the SDK does."""
        kind, module = type(exception), type(exception).__module__
        shown = kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
        found: dict[str, AttributeValue] = {
            "exception.type": shown,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        found.update(attributes or {})
        self.add_event("exception", found, timestamp)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        """Ends the span; an exception escaping the handling (never a handler's own error,
        which the participant turns into an outcome) sets an error status with its type only,
        since its message may hold personal data."""
        if exc_val is not None:
            self.set_status(Status(StatusCode.ERROR, type(exc_val).__name__))
        self.end()


class _SpanHandling:
    __slots__ = ("record", "redactor", "span", "started")

    def __init__(
        self,
        span: trace.Span,
        started: float,
        record: Callable[..., None],
        redactor: Redactor,
    ) -> None:
        self.span = span
        self.started = started
        self.record = record
        self.redactor = redactor

    def outcome(self, ok: bool, error: ErrorInfo | None, replayed: bool) -> None:
        kind = "ok" if ok else ("business" if error and error.business else "technical")
        span = self.span
        if span.is_recording():
            span.set_attribute("saga.outcome", kind)
            span.set_attribute("saga.replayed", replayed)
            if error is not None:
                span.set_attribute("saga.error.type", error.type)
                shown = safely(self.redactor, error)
                span.set_attribute("saga.error.message", shown[:500])
                if not error.business:
                    span.set_status(Status(StatusCode.ERROR, shown[:200]))
        self.record(kind, time.monotonic() - self.started)


class OpenTelemetryObserver:
    """The observer port on OpenTelemetry (see the module docstring for what it records).

    Args:
        tracer_provider: Where spans go: to its span processors, as finished spans. Give it
            `DeterministicIds` as its id generator, as `from_env` does, if you make spans of
            your own with derived ids.
        meter_provider: Where metrics go.
        record_payloads: Put saga inputs and step outputs on spans (off by default: they may
            hold personal data).
        redactor: What stands for an error's message in spans (`saga.runtime.redaction`);
            by default the one ``SAGA_REDACT`` chooses, `redact` when it is unset.
        sample: The share of sagas traced, chosen by trace id alike in every process (1.0:
            every saga; 0.0: none, and no span work is done at all).

    Raises:
        UsageError: ``redactor`` is not given and ``SAGA_REDACT`` names no redactor.
        ValueError: ``sample`` is not from 0 to 1.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider,
        *,
        record_payloads: bool = False,
        redactor: Redactor | None = None,
        sample: float = 1.0,
    ) -> None:
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"sample={sample!r}: give a ratio from 0 to 1")
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.record_payloads = record_payloads
        self.redactor: Redactor = redactor if redactor is not None else redactor_from_env()
        self.sample = sample
        # TraceIdRatioBased's bound: the low 64 bits of a sampled trace id are below it.
        self._bound = _ALL if sample >= 1.0 else round(sample * _ALL)
        self.tracer = tracer_provider.get_tracer("saga")
        # Finished spans go straight to the provider's processors (see "Cost" above); the
        # provider keeps them in this attribute since the SDK's first releases.
        self._processor = tracer_provider._active_span_processor
        self._resource = tracer_provider.resource
        self._new_span_id = tracer_provider.id_generator.generate_span_id
        meter: Meter = meter_provider.get_meter("saga")
        self._started = meter.create_counter("saga.sagas.started", description="Sagas started")
        self._ended = meter.create_counter("saga.sagas.ended", description="Sagas ended, by status")
        self._retries = meter.create_counter("saga.step.retries", description="Retries scheduled")
        self._dead = meter.create_counter("saga.dead_letters", description="Dead-lettered records")
        self._saga_duration = meter.create_histogram("saga.saga.duration", unit="s")
        self._step_duration = meter.create_histogram("saga.step.duration", unit="s")
        self._handled = meter.create_counter("saga.participant.handled")
        self._handle_duration = meter.create_histogram("saga.participant.duration", unit="s")
        self._in_flight: list[Callable[[], int]] = []
        # Waiting steps begun in this process, by saga id and step; a step's span is made when
        # it ends (its end is not known before), from the state's start time, so after a
        # restart only what this cache adds (the reminders' times) is missing.
        self._waiting: dict[tuple[str, str], _Waiting] = {}
        meter.create_observable_gauge(
            "saga.sagas.in_flight", callbacks=[self._observe_in_flight], description="Sagas running"
        )

    @classmethod
    def from_env(
        cls, service_name: str, *, readers: Iterable[MetricReader] = ()
    ) -> OpenTelemetryObserver:
        """Configured by the standard variables: ``OTEL_SERVICE_NAME``,
        ``OTEL_EXPORTER_OTLP_ENDPOINT`` (default http://localhost:4318), ``OTEL_TRACES_EXPORTER``
        (``otlp`` or ``none``), ``OTEL_METRICS_EXPORTER`` (``none`` unless set to ``otlp``:
        Jaeger takes traces only), ``OTEL_SDK_DISABLED``, ``OTEL_BSP_*``; and
        ``SAGA_TRACE_PAYLOADS``, ``SAGA_TRACE_SAMPLE`` and ``SAGA_REDACT``.

        Raises:
            ValueError: ``SAGA_TRACE_SAMPLE`` is not a ratio from 0 to 1.
        """
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        disabled = os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true"
        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name}
        )
        tracer_provider = TracerProvider(resource=resource, id_generator=DeterministicIds())
        exporting = not disabled and os.environ.get("OTEL_TRACES_EXPORTER", "otlp") == "otlp"
        if exporting:
            tracer_provider.add_span_processor(_batch_processor(OtlpSpanExporter()))
        metric_readers = list(readers)
        if not disabled and os.environ.get("OTEL_METRICS_EXPORTER", "none") == "otlp":
            metric_readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        # With no reader, an SDK meter would still aggregate every measurement for nobody.
        meter_provider: MeterProvider = (
            SdkMeterProvider(resource=resource, metric_readers=metric_readers)
            if metric_readers
            else NoOpMeterProvider()
        )
        payloads = os.environ.get("SAGA_TRACE_PAYLOADS", "") in ("1", "true")
        sample = sample_from_env() if exporting else 0.0
        return cls(tracer_provider, meter_provider, record_payloads=payloads, sample=sample)

    def shutdown(self) -> None:
        """Flushes and stops the exporters."""
        self.tracer_provider.shutdown()
        shutdown = getattr(self.meter_provider, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def sampled(self, saga_id: str) -> bool:
        """Whether the saga is traced (the same answer in every process with this ratio)."""
        return self._sampled(trace_id_for(saga_id))

    def _sampled(self, trace_id: int) -> bool:
        return (trace_id & 0xFFFF_FFFF_FFFF_FFFF) < self._bound

    def _observe_in_flight(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        return [Observation(sum(count() for count in self._in_flight))]

    def _finish(self, span: ReadableSpan) -> None:
        self._processor.on_end(span)

    def _span(
        self,
        name: str,
        root: SpanContext,
        attributes: dict[str, Any],
        start: int,
        end: int,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        span_id: int | None = None,
        links: Sequence[Link] = (),
        events: Sequence[Event] = (),
        status: Status = _UNSET,
    ) -> None:
        """Hands one finished span under the saga's root span to the span processors."""
        context = SpanContext(root.trace_id, span_id or self._new_span_id(), False, _SAMPLED)
        self._processor.on_end(
            ReadableSpan(
                name=name,
                context=context,
                parent=root,
                resource=self._resource,
                attributes=attributes,
                events=events,
                links=links,
                kind=kind,
                status=status,
                start_time=start,
                end_time=end,
                instrumentation_scope=_SCOPE,
            )
        )

    # -- the observer port -------------------------------------------------------------------

    def watch_in_flight(self, count: Callable[[], int]) -> None:
        """Registers how to count this process's sagas in flight."""
        self._in_flight.append(count)

    def dead_lettered(self, topic: str, reason: str) -> None:
        """Counts a dead letter."""
        self._dead.add(1, {"topic": topic, "reason": reason})

    def committed(self, items: Sequence[Committed], committed_at: float) -> None:
        """Spans and metrics for the decisions of one committed transaction."""
        for item in items:
            if item.decision.state is not None:
                self._decision(item, committed_at)

    def headers(self, message: Outbound) -> Headers:
        """Trace context for an outgoing message.

        A command carries its own send span (its id is derived, so it is known before the span
        is exported); a reply or a request carries the current span: the handling span for a
        reply, and for a request whatever span the caller is in, to which the saga then links.
        """
        if isinstance(message, Command):
            trace_id = trace_id_for(message.saga_id)
            span = command_span_id(message.saga_id, message.step, message.phase, message.attempt)
            return _header(trace_id, span, self._sampled(trace_id))
        if isinstance(message, StartSaga) and message.parent is not None:
            # A sub-saga's start: the child's root span links to its parent's trace.
            parent = message.parent.saga_id
            trace_id = trace_id_for(parent)
            return _header(trace_id, root_span_id(parent), self._sampled(trace_id))
        current = trace.get_current_span().get_span_context()
        if not current.is_valid:
            return ()
        if not current.trace_state:
            return _header(current.trace_id, current.span_id, current.trace_flags.sampled)
        return _inject()

    @contextmanager
    def handling(self, service: str, command: Command, headers: Headers) -> Iterator[Handling]:
        """A consumer span for one command, current while the handler runs.

        Its parent is the command's send span, derived from the command itself, so ``headers``
        are not needed to find it.
        """
        labels = {"service": service, "action": command.action}

        def record(outcome: str, seconds: float) -> None:
            self._handled.add(1, {**labels, "outcome": outcome})
            self._handle_duration.record(seconds, {**labels, "outcome": outcome})

        trace_id = trace_id_for(command.saga_id)
        send = command_span_id(command.saga_id, command.step, command.phase, command.attempt)
        if not self._sampled(trace_id):
            # Unsampled: the handler's own spans see an unsampled parent and record nothing.
            quiet = trace.NonRecordingSpan(SpanContext(trace_id, send, True, _UNSAMPLED))
            with trace.use_span(quiet):
                yield _SpanHandling(quiet, time.monotonic(), record, self.redactor)
            return
        attributes: dict[str, Any] = {
            "saga.id": command.saga_id,
            "saga.name": command.saga_name,
            "saga.step": command.step,
            "saga.phase": command.phase,
            "saga.attempt": command.attempt,
            "saga.idempotency_key": command.idempotency_key,
            **_item_attributes(command.step),
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
        }
        if self.record_payloads:
            attributes["saga.payload"] = orjson.dumps(command.payload).decode()[:4000]
        span = _HandlingSpan(
            self,
            _unit_name(f"handle {service} {command.action}", command.step),
            SpanContext(trace_id, self._new_span_id(), False, _SAMPLED),
            SpanContext(trace_id, send, True, _SAMPLED),
            attributes,
        )
        with (
            trace.use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ),
            span,
        ):
            yield _SpanHandling(span, time.monotonic(), record, self.redactor)

    # -- spans for one decision ------------------------------------------------------------

    def _decision(self, item: Committed, committed_at: float) -> None:
        state = item.decision.state
        assert state is not None
        saga_id = state.saga_id
        events = item.decision.events
        labels = {"saga": state.name}
        trace_id = trace_id_for(saga_id)
        if not self._sampled(trace_id):
            for event in events:
                self._metrics(event, state, labels)
            return
        root = SpanContext(trace_id, root_span_id(saga_id), True, _SAMPLED)
        base = {"saga.id": saga_id, "saga.name": state.name}
        start, end = _ns(item.decided_at), _ns(max(committed_at, item.decided_at))
        for event in events:
            if isinstance(event, SagaStarted):
                self._root(event, root, base, item.headers)
        name = f"decide {item.input_kind}"
        if item.reply is not None:
            name += f" {item.reply.step}.{item.reply.phase}"
        scrub = self._scrubber(state, events)
        self._span(
            name,
            root,
            {
                **base,
                "saga.input": item.input_kind,
                "saga.status": state.status.value,
                "saga.events": tuple([e.type for e in events]),
            },
            start,
            end,
            links=_link_to(item.headers),
            events=[Event(e.type, self._event_attributes(e, scrub), _ns(e.at)) for e in events],
            status=Status(StatusCode.ERROR, "saga stuck") if item.decision.alerts else _UNSET,
        )
        for command in item.decision.commands:
            self._send(command, state.steps[command.step].attempt, root, base, start, end)
        for event in events:
            self._metrics(event, state, labels)
            self._marks(event, state, root, base, scrub)
        self._primitives(item, state, root, base, scrub, (start, end))

    def _root(
        self, event: SagaStarted, root: SpanContext, base: dict[str, Any], headers: Headers
    ) -> None:
        attributes: dict[str, Any] = {**base, "saga.version": event.version}
        if self.record_payloads:
            attributes["saga.input_payload"] = orjson.dumps(event.input).decode()[:4000]
        at = _ns(event.at)
        self._processor.on_end(
            ReadableSpan(
                name=f"saga {event.name}",
                context=SpanContext(root.trace_id, root.span_id, False, _SAMPLED),
                parent=None,  # a root: no parent
                resource=self._resource,
                attributes=attributes,
                links=_link_to(headers),
                kind=SpanKind.SERVER,
                status=_UNSET,
                start_time=at,
                end_time=at,
                instrumentation_scope=_SCOPE,
            )
        )

    def _send(
        self,
        command: Command,
        action_attempt: int,
        root: SpanContext,
        base: dict[str, Any],
        start: int,
        end: int,
    ) -> None:
        saga_id = command.saga_id
        links: tuple[Link, ...] = ()
        if command.phase == "compensation":
            forward = command_span_id(saga_id, command.step, "action", max(1, action_attempt))
            context = SpanContext(root.trace_id, forward, True, _SAMPLED)
            links = (Link(context, {"saga.link": "compensates"}),)
        verb = "compensate" if command.phase == "compensation" else "send"
        self._span(
            _unit_name(f"{verb} {command.service} {command.action}", command.step),
            root,
            {
                **base,
                "saga.step": command.step,
                **_item_attributes(command.step),
                "saga.phase": command.phase,
                "saga.attempt": command.attempt,
                "messaging.system": "kafka",
                "messaging.operation.type": "send",
            },
            start,
            end,
            kind=SpanKind.PRODUCER,
            span_id=command_span_id(saga_id, command.step, command.phase, command.attempt),
            links=links,
        )

    def _metrics(self, event: EventBase, state: Any, labels: dict[str, str]) -> None:
        """The metrics of one event (counted for every saga, traced or not)."""
        if isinstance(event, SagaStarted):
            self._started.add(1, labels)
        elif isinstance(event, StepRetryScheduled | CompensationRetryScheduled):
            phase = "action" if isinstance(event, StepRetryScheduled) else "compensation"
            self._retries.add(1, {**labels, "step": _step_label(event.step), "phase": phase})
        elif isinstance(event, StepSucceeded | StepFailedEvent | StepTimedOut):
            started = state.steps[event.step].started_at
            if started is not None:
                outcome = (
                    "succeeded"
                    if isinstance(event, StepSucceeded)
                    else "failed"
                    if isinstance(event, StepFailedEvent)
                    else "timed_out"
                )
                self._step_duration.record(
                    event.at - started,
                    {**labels, "step": _step_label(event.step), "outcome": outcome},
                )
        elif type(event) in _ENDINGS:
            status = _ENDINGS[type(event)]
            self._ended.add(1, {**labels, "status": status})
            self._saga_duration.record(event.at - state.started_at, {**labels, "status": status})

    def _marks(
        self,
        event: EventBase,
        state: Any,
        root: SpanContext,
        base: dict[str, Any],
        scrub: Callable[[str], str],
    ) -> None:
        """The ``backoff`` and ``saga <outcome>`` spans of one event."""
        if isinstance(event, StepRetryScheduled | CompensationRetryScheduled):
            phase = "action" if isinstance(event, StepRetryScheduled) else "compensation"
            self._span(
                f"backoff {event.step}",
                root,
                {
                    **base,
                    "saga.step": event.step,
                    "saga.phase": phase,
                    "saga.attempt": event.attempt,
                    "saga.error.type": event.error.type,
                    "saga.error.message": safely(self.redactor, event.error)[:500],
                },
                _ns(event.at),
                _ns(event.retry_at),
            )
        elif type(event) in _ENDINGS:
            status = _ENDINGS[type(event)]
            reason = scrub(state.reason or "")
            self._span(
                f"saga {status}",
                root,
                {**base, "saga.status": status, "saga.reason": reason},
                _ns(state.started_at),
                _ns(event.at),
                status=Status(StatusCode.ERROR, reason or "stuck") if status == "stuck" else _UNSET,
            )

    # -- the steps that wait, branch, fan out or start sagas ---------------------------------

    def _primitives(
        self,
        item: Committed,
        state: SagaState,
        root: SpanContext,
        base: dict[str, Any],
        scrub: Callable[[str], str],
        window: tuple[int, int],
    ) -> None:
        """Spans for timers, skipped steps, sub-saga starts, and (when they end) waiting and
        fan-out steps, from one committed decision."""
        decision = item.decision
        commanded = {c.step for c in decision.commands}
        children = {r.saga_id: r for r in decision.requests if isinstance(r, StartSaga)}
        asked = {s for a in decision.alerts if a.kind == "approval" for s in a.steps}
        signals = {e.name: e for e in decision.events if isinstance(e, SignalReceived)}
        for event in decision.events:
            if not isinstance(event, StepEvent):
                continue
            key = (state.saga_id, event.step)
            attributes = {**base, "saga.step": event.step, **_item_attributes(event.step)}
            if isinstance(event, StepScheduled):
                # Made now, ending at its due time (as a backoff is): a timer a day away is seen
                # while it runs, and a restart cannot lose when it was set.
                self._span(
                    f"timer {event.step}",
                    root,
                    {**attributes, "saga.due_at": event.due_at},
                    _ns(event.at),
                    _ns(max(event.due_at, event.at)),
                )
            elif isinstance(event, StepSkipped):
                at = _ns(event.at)
                attributes["saga.reason"] = scrub(event.reason)
                self._span(f"skip {event.step}", root, attributes, at, at)
            elif isinstance(event, StepStarted) and event.child is not None:
                self._child(event, event.child, children.get(event.child), root, attributes, window)
            elif isinstance(event, StepStarted) and event.step not in commanded:
                approval = event.step in asked or event.wake_at is not None
                self._waiting[key] = _Waiting("approval" if approval else "wait")
            elif isinstance(event, ApprovalReminded):
                waiting = self._waiting.get(key)
                if waiting is not None:
                    waiting.reminders.append(event)
            elif isinstance(event, StepSucceeded | StepFailedEvent | StepStuck):
                self._step_ended(item, event, state, root, attributes, scrub, signals)
        if state.is_final:
            for done in [k for k in self._waiting if k[0] == state.saga_id]:
                del self._waiting[done]

    def _child(
        self,
        event: StepStarted,
        child: str,
        request: StartSaga | None,
        root: SpanContext,
        attributes: dict[str, Any],
        window: tuple[int, int],
    ) -> None:
        """A sub-saga step's start: a producer span naming the child, linked to its trace."""
        name = request.saga_name if request is not None else "?"
        link = Link(
            SpanContext(trace_id_for(child), root_span_id(child), True, _SAMPLED),
            {"saga.link": "child"},
        )
        self._span(
            f"start saga {name}",
            root,
            {
                **attributes,
                "saga.attempt": event.attempt,
                "saga.child.id": child,
                "saga.child.name": name,
            },
            window[0],
            window[1],
            kind=SpanKind.PRODUCER,
            links=(link,),
        )

    def _step_ended(
        self,
        item: Committed,
        event: StepSucceeded | StepFailedEvent | StepStuck,
        state: SagaState,
        root: SpanContext,
        attributes: dict[str, Any],
        scrub: Callable[[str], str],
        signals: dict[str, SignalReceived],
    ) -> None:
        """The span of a waiting or fan-out step that has just ended, if it is one."""
        step = state.steps.get(event.step)
        prior = item.before.steps.get(event.step) if item.before is not None else None
        if step is None or step.started_at is None:
            return
        if isinstance(event, StepStuck) and event.phase != "action":
            return
        if _expanded(state, event):
            self._fan_out(event, step, state, root, attributes)
            return
        waiting = self._waiting.pop((state.saga_id, event.step), None)
        if waiting is None:
            if not _waited(item, event, prior):
                return
            waiting = _Waiting(_kind_of(event, prior))
        attributes = {**attributes, "saga.attempt": event.attempt}
        attributes["saga.outcome"] = _OUTCOMES[type(event)]
        if waiting.kind == "approval":
            attributes["saga.approval.reminders"] = step.reminders
            decided = self._decided(event)
            attributes.update(decided)
        elif isinstance(event, StepSucceeded) and event.signal is not None:
            attributes["saga.signal"] = event.signal
            received = signals.get(event.signal)
            if received is not None and received.by:
                attributes["saga.signal.by"] = received.by
        if isinstance(event, StepFailedEvent | StepStuck):
            attributes["saga.error.type"] = event.error.type
            attributes["saga.error.message"] = safely(self.redactor, event.error)[:500]
        marks = [
            Event(
                "approval_escalated" if reminder.escalated else "approval_reminded",
                {"recipients": tuple(reminder.recipients)},
                _ns(reminder.at),
            )
            for reminder in waiting.reminders
        ]
        self._span(
            f"{waiting.kind} {event.step}",
            root,
            attributes,
            _ns(step.started_at),
            _ns(event.at),
            events=marks,
            status=(
                Status(StatusCode.ERROR, scrub(event.error.type))
                if isinstance(event, StepStuck)
                else _UNSET
            ),
        )

    def _decided(self, event: StepSucceeded | StepFailedEvent | StepStuck) -> dict[str, Any]:
        """Who decided an approval step, and how (``approved``, ``rejected``, ``timed out``,
        ``abandoned``); the note only with ``record_payloads``, as it is free text."""
        found: dict[str, Any] = {}
        if isinstance(event, StepSucceeded):
            found["saga.approval.decision"] = "approved"
            by, note = event.output.get("by"), event.output.get("note")
        else:
            error = event.error
            decision = {"Rejected": "rejected", "Timeout": "timed out", "Abandoned": "abandoned"}
            found["saga.approval.decision"] = decision.get(error.type, error.type)
            by, note = None, None
            if error.type == "Rejected" and error.message.startswith("rejected by "):
                # The core writes "rejected by <principal>: <note>"; the principal is kept.
                by = error.message.removeprefix("rejected by ").partition(": ")[0]
        if isinstance(by, str) and by:
            found["saga.approval.by"] = by
        if self.record_payloads and isinstance(note, str) and note:
            found["saga.approval.note"] = note[:500]
        return found

    def _fan_out(
        self,
        event: StepSucceeded | StepFailedEvent | StepStuck,
        step: StepState,
        state: SagaState,
        root: SpanContext,
        attributes: dict[str, Any],
    ) -> None:
        """A ``for_each`` step's span, from its expansion to its end, with its items' count."""
        assert step.started_at is not None
        items = [n for n in state.steps if split_item(n)[0] == event.step and n != event.step]
        done = sum(state.steps[n].status is StepStatus.SUCCEEDED for n in items)
        self._span(
            f"for_each {event.step}",
            root,
            {
                **attributes,
                "saga.items": len(items),
                "saga.items.succeeded": done,
                "saga.outcome": _OUTCOMES[type(event)],
            },
            _ns(step.started_at),
            _ns(event.at),
        )

    # -- error text --------------------------------------------------------------------------

    def _scrubber(self, state: Any, events: Sequence[EventBase]) -> Callable[[str], str]:
        """Replaces, in a text, every step error's message by what the redactor shows for it.

        A saga's ``reason`` quotes step errors verbatim (``step 'pay' failed: <message>``, and
        every stuck step's message), so it is scrubbed of every error this decision and the
        state know, longest first; the rest of it (step names, an operator's reason) stays.
        """
        errors: dict[str, str] = {}
        known = [e.error for e in events if isinstance(e, _WITH_ERROR)]
        known += [s.error for s in state.steps.values() if s.error is not None]
        if not known:
            return _unchanged  # the common case: nothing to scrub
        for error in known:
            if error.message and error.message not in errors:
                errors[error.message] = safely(self.redactor, error)
        ordered = sorted(errors.items(), key=lambda item: -len(item[0]))

        def scrub(text: str) -> str:
            for message, shown in ordered:
                if message != shown:
                    text = text.replace(message, shown)
            return text

        return scrub

    def _event_attributes(self, event: EventBase, scrub: Callable[[str], str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name in _fields_of(type(event)):
            value = getattr(event, name)
            if value:
                found[name] = tuple(value) if isinstance(value, list) else value
        if isinstance(found.get("reason"), str):
            found["reason"] = scrub(found["reason"])
        if isinstance(event, _WITH_ERROR):
            found["error.type"] = event.error.type
            found["error.message"] = safely(self.redactor, event.error)[:500]
        return found


_ATTRIBUTES = frozenset(
    {
        "step",
        "attempt",
        "reason",
        "retry_at",
        "deadline_at",
        "phase",
        "due_at",
        "wake_at",
        "next_at",
        "count",
        "child",
        "signal",
        "name",
        "escalated",
        "recipients",
        "compensating",
        "by",
    }
)
"""The event fields a span event carries (names, times and principals; no payloads: those
may hold personal data)."""
_OUTCOMES: dict[type[EventBase], str] = {
    StepSucceeded: "succeeded",
    StepFailedEvent: "failed",
    StepStuck: "stuck",
}


_FIELDS: dict[type[EventBase], tuple[str, ...]] = {}


def _fields_of(kind: type[EventBase]) -> tuple[str, ...]:
    """The fields of an event class that a span event carries, in their declared order (the
    order ``model_dump`` gives), found once per class."""
    found = _FIELDS.get(kind)
    if found is None:
        found = _FIELDS[kind] = tuple(f for f in kind.model_fields if f in _ATTRIBUTES)
    return found


def _unchanged(text: str) -> str:
    return text


def _item_attributes(step: str) -> dict[str, Any]:
    """``saga.item``: the index of a fan-out's item (nothing for a step's own name)."""
    index = split_item(step)[1]
    return {} if index is None else {"saga.item": index}


def _expanded(state: SagaState, event: StepEvent) -> bool:
    """Whether ``event``'s step is a fan-out (its items are steps of the state)."""
    return any(split_item(name)[0] == event.step and name != event.step for name in state.steps)


def _waited(
    item: Committed, event: StepSucceeded | StepFailedEvent | StepStuck, prior: StepState | None
) -> bool:
    """Whether ``event`` ends a step that waited for a signal or a decision, when this process
    did not see it begin: it was running with no child, and no reply of its own ended it (a
    command step ends by its reply, or by a technical timeout, never otherwise)."""
    if prior is None or prior.status is not StepStatus.RUNNING or prior.child is not None:
        return False
    reply = item.reply
    if reply is not None and reply.step == event.step and reply.phase == "action":
        return False
    return not isinstance(event, StepStuck) or event.error.business


def _kind_of(event: StepSucceeded | StepFailedEvent | StepStuck, prior: StepState | None) -> str:
    """``wait`` or ``approval``, read from how the step ended (`saga.core.primitives` writes
    an approval's output and errors so; a wait's success names its signal)."""
    if isinstance(event, StepSucceeded):
        return "wait" if event.signal is not None or "approved" not in event.output else "approval"
    error = event.error
    if error.type == "Rejected" or error.message.startswith("no decision"):
        return "approval"
    if prior is not None and (prior.reminders or prior.wake_at is not None):
        return "approval"
    return "wait"


_WITH_ERROR = (StepRetryScheduled, StepFailedEvent, StepStuck, CompensationRetryScheduled)
