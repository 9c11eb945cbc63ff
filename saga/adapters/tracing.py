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
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import orjson
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

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
from saga.runtime.traceids import command_span_id, root_span_id, trace_id_for

__all__ = ["DeterministicIds", "OpenTelemetryObserver"]

_forced: contextvars.ContextVar[tuple[int | None, int | None]] = contextvars.ContextVar(
    "saga_forced_ids", default=(None, None)
)
_propagator = TraceContextTextMapPropagator()
_TRACE_HEADERS = frozenset(_propagator.fields)
_ENDINGS = {SagaCompleted: "completed", SagaCompensated: "compensated", SagaStuck: "stuck"}


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


@contextmanager
def _ids(trace_id: int | None, span_id: int | None) -> Iterator[None]:
    token = _forced.set((trace_id, span_id))
    try:
        yield
    finally:
        _forced.reset(token)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _remote(trace_id: int, span_id: int) -> otel_context.Context:
    parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(1))
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


def _link_to(headers: Headers) -> list[Link]:
    """A link to the span that the ``traceparent`` among ``headers`` names, if any."""
    carrier = {k: v.decode(errors="replace") for k, v in headers if k in _TRACE_HEADERS}
    if not carrier:
        return []
    ctx = trace.get_current_span(_propagator.extract(carrier)).get_span_context()
    return [Link(ctx)] if ctx.is_valid else []


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


class _Waiting:
    """What this process saw of a step that waits (a signal or a decision) since it began,
    kept until the step ends: its kind and its reminders."""

    __slots__ = ("kind", "reminders")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.reminders: list[ApprovalReminded] = []


class _SpanHandling:
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
        self.span.set_attribute("saga.outcome", kind)
        self.span.set_attribute("saga.replayed", replayed)
        if error is not None:
            self.span.set_attribute("saga.error.type", error.type)
            shown = safely(self.redactor, error)
            self.span.set_attribute("saga.error.message", shown[:500])
            if not error.business:
                self.span.set_status(Status(StatusCode.ERROR, shown[:200]))
        self.record(kind, time.monotonic() - self.started)


class OpenTelemetryObserver:
    """The observer port on OpenTelemetry (see the module docstring for what it records).

    Args:
        tracer_provider: Where spans go. Give it `DeterministicIds` as its id generator, as
            `from_env` does, or compensation links and command spans will not line up.
        meter_provider: Where metrics go.
        record_payloads: Put saga inputs and step outputs on spans (off by default: they may
            hold personal data).
        redactor: What stands for an error's message in spans (`saga.runtime.redaction`);
            by default the one ``SAGA_REDACT`` chooses, `redact` when it is unset.

    Raises:
        UsageError: ``redactor`` is not given and ``SAGA_REDACT`` names no redactor.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider,
        *,
        record_payloads: bool = False,
        redactor: Redactor | None = None,
    ) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.record_payloads = record_payloads
        self.redactor: Redactor = redactor if redactor is not None else redactor_from_env()
        self.tracer = tracer_provider.get_tracer("saga")
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
        Jaeger takes traces only), ``OTEL_SDK_DISABLED``; and ``SAGA_TRACE_PAYLOADS`` and
        ``SAGA_REDACT``."""
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        disabled = os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true"
        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name}
        )
        tracer_provider = TracerProvider(resource=resource, id_generator=DeterministicIds())
        if not disabled and os.environ.get("OTEL_TRACES_EXPORTER", "otlp") == "otlp":
            tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        metric_readers = list(readers)
        if not disabled and os.environ.get("OTEL_METRICS_EXPORTER", "none") == "otlp":
            metric_readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        meter_provider = SdkMeterProvider(resource=resource, metric_readers=metric_readers)
        payloads = os.environ.get("SAGA_TRACE_PAYLOADS", "") in ("1", "true")
        return cls(tracer_provider, meter_provider, record_payloads=payloads)

    def shutdown(self) -> None:
        """Flushes and stops the exporters."""
        self.tracer_provider.shutdown()
        shutdown = getattr(self.meter_provider, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def _observe_in_flight(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        return [Observation(sum(count() for count in self._in_flight))]

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
            span = command_span_id(message.saga_id, message.step, message.phase, message.attempt)
            return _inject(_remote(trace_id_for(message.saga_id), span))
        if isinstance(message, StartSaga) and message.parent is not None:
            # A sub-saga's start: the child's root span links to its parent's trace.
            parent = message.parent.saga_id
            return _inject(_remote(trace_id_for(parent), root_span_id(parent)))
        return _inject()

    @contextmanager
    def handling(self, service: str, command: Command, headers: Headers) -> Iterator[Handling]:
        """A consumer span for one command, current while the handler runs.

        Its parent is the command's send span, derived from the command itself, so ``headers``
        are not needed to find it.
        """
        trace_id = trace_id_for(command.saga_id)
        parent = _remote(
            trace_id, command_span_id(command.saga_id, command.step, command.phase, command.attempt)
        )
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
        labels = {"service": service, "action": command.action}

        def record(outcome: str, seconds: float) -> None:
            self._handled.add(1, {**labels, "outcome": outcome})
            self._handle_duration.record(seconds, {**labels, "outcome": outcome})

        name = _unit_name(f"handle {service} {command.action}", command.step)
        with self.tracer.start_as_current_span(
            name, context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        ) as span:
            yield _SpanHandling(span, time.monotonic(), record, self.redactor)

    # -- spans for one decision ------------------------------------------------------------

    def _decision(self, item: Committed, committed_at: float) -> None:
        state = item.decision.state
        assert state is not None
        saga_id = state.saga_id
        trace_id = trace_id_for(saga_id)
        root = _remote(trace_id, root_span_id(saga_id))
        base = {"saga.id": saga_id, "saga.name": state.name}
        start, end = _ns(item.decided_at), _ns(max(committed_at, item.decided_at))
        events = item.decision.events
        for event in events:
            if isinstance(event, SagaStarted):
                self._root(event, trace_id, base, item.headers)
        name = f"decide {item.input_kind}"
        if item.reply is not None:
            name += f" {item.reply.step}.{item.reply.phase}"
        span = self.tracer.start_span(
            name,
            context=root,
            kind=SpanKind.INTERNAL,
            attributes={
                **base,
                "saga.input": item.input_kind,
                "saga.status": state.status.value,
                "saga.events": [e.type for e in events],
            },
            links=_link_to(item.headers),
            start_time=start,
        )
        scrub = self._scrubber(state, events)
        for event in events:
            span.add_event(event.type, self._event_attributes(event, scrub), _ns(event.at))
        if item.decision.alerts:
            span.set_status(Status(StatusCode.ERROR, "saga stuck"))
        span.end(end)
        for command in item.decision.commands:
            self._send(command, state.steps[command.step].attempt, root, base, start, end)
        for event in events:
            self._metrics_and_marks(event, state, root, base, scrub)
        self._primitives(item, state, root, base, scrub, (start, end))

    def _root(
        self, event: SagaStarted, trace_id: int, base: dict[str, Any], headers: Headers
    ) -> None:
        attributes: dict[str, Any] = {**base, "saga.version": event.version}
        if self.record_payloads:
            attributes["saga.input_payload"] = orjson.dumps(event.input).decode()[:4000]
        with _ids(trace_id, root_span_id(event.saga_id)):
            span = self.tracer.start_span(
                f"saga {event.name}",
                context=otel_context.Context(),  # a root: no parent, whatever is current
                kind=SpanKind.SERVER,
                attributes=attributes,
                links=_link_to(headers),
                start_time=_ns(event.at),
            )
        span.end(_ns(event.at))
        self._started.add(1, {"saga": event.name})

    def _send(
        self,
        command: Command,
        action_attempt: int,
        root: otel_context.Context,
        base: dict[str, Any],
        start: int,
        end: int,
    ) -> None:
        saga_id = command.saga_id
        links = []
        if command.phase == "compensation":
            forward = command_span_id(saga_id, command.step, "action", max(1, action_attempt))
            links.append(
                Link(
                    SpanContext(trace_id_for(saga_id), forward, True, TraceFlags(1)),
                    {"saga.link": "compensates"},
                )
            )
        verb = "compensate" if command.phase == "compensation" else "send"
        span_id = command_span_id(saga_id, command.step, command.phase, command.attempt)
        with _ids(None, span_id):
            span = self.tracer.start_span(
                _unit_name(f"{verb} {command.service} {command.action}", command.step),
                context=root,
                kind=SpanKind.PRODUCER,
                attributes={
                    **base,
                    "saga.step": command.step,
                    **_item_attributes(command.step),
                    "saga.phase": command.phase,
                    "saga.attempt": command.attempt,
                    "messaging.system": "kafka",
                    "messaging.operation.type": "send",
                },
                links=links,
                start_time=start,
            )
        span.end(end)

    def _metrics_and_marks(
        self,
        event: EventBase,
        state: Any,
        root: otel_context.Context,
        base: dict[str, Any],
        scrub: Callable[[str], str],
    ) -> None:
        labels = {"saga": state.name}
        if isinstance(event, StepRetryScheduled | CompensationRetryScheduled):
            phase = "action" if isinstance(event, StepRetryScheduled) else "compensation"
            self._retries.add(1, {**labels, "step": _step_label(event.step), "phase": phase})
            span = self.tracer.start_span(
                f"backoff {event.step}",
                context=root,
                attributes={
                    **base,
                    "saga.step": event.step,
                    "saga.phase": phase,
                    "saga.attempt": event.attempt,
                    "saga.error.type": event.error.type,
                    "saga.error.message": safely(self.redactor, event.error)[:500],
                },
                start_time=_ns(event.at),
            )
            span.end(_ns(event.retry_at))
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
            span = self.tracer.start_span(
                f"saga {status}",
                context=root,
                attributes={
                    **base,
                    "saga.status": status,
                    "saga.reason": scrub(state.reason or ""),
                },
                start_time=_ns(state.started_at),
            )
            if status == "stuck":
                span.set_status(Status(StatusCode.ERROR, scrub(state.reason or "") or "stuck"))
            span.end(_ns(event.at))

    # -- the steps that wait, branch, fan out or start sagas ---------------------------------

    def _primitives(
        self,
        item: Committed,
        state: SagaState,
        root: otel_context.Context,
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
                span = self.tracer.start_span(
                    f"timer {event.step}",
                    context=root,
                    attributes={**attributes, "saga.due_at": event.due_at},
                    start_time=_ns(event.at),
                )
                span.end(_ns(max(event.due_at, event.at)))
            elif isinstance(event, StepSkipped):
                span = self.tracer.start_span(
                    f"skip {event.step}",
                    context=root,
                    attributes={**attributes, "saga.reason": scrub(event.reason)},
                    start_time=_ns(event.at),
                )
                span.end(_ns(event.at))
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
        root: otel_context.Context,
        attributes: dict[str, Any],
        window: tuple[int, int],
    ) -> None:
        """A sub-saga step's start: a producer span naming the child, linked to its trace."""
        name = request.saga_name if request is not None else "?"
        link = Link(
            SpanContext(trace_id_for(child), root_span_id(child), True, TraceFlags(1)),
            {"saga.link": "child"},
        )
        span = self.tracer.start_span(
            f"start saga {name}",
            context=root,
            kind=SpanKind.PRODUCER,
            attributes={
                **attributes,
                "saga.attempt": event.attempt,
                "saga.child.id": child,
                "saga.child.name": name,
            },
            links=[link],
            start_time=window[0],
        )
        span.end(window[1])

    def _step_ended(
        self,
        item: Committed,
        event: StepSucceeded | StepFailedEvent | StepStuck,
        state: SagaState,
        root: otel_context.Context,
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
        span = self.tracer.start_span(
            f"{waiting.kind} {event.step}",
            context=root,
            attributes=attributes,
            start_time=_ns(step.started_at),
        )
        for reminder in waiting.reminders:
            what = "approval_escalated" if reminder.escalated else "approval_reminded"
            span.add_event(what, {"recipients": reminder.recipients}, _ns(reminder.at))
        if isinstance(event, StepStuck):
            span.set_status(Status(StatusCode.ERROR, scrub(event.error.type)))
        span.end(_ns(event.at))

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
        root: otel_context.Context,
        attributes: dict[str, Any],
    ) -> None:
        """A ``for_each`` step's span, from its expansion to its end, with its items' count."""
        assert step.started_at is not None
        items = [n for n in state.steps if split_item(n)[0] == event.step and n != event.step]
        done = sum(state.steps[n].status is StepStatus.SUCCEEDED for n in items)
        span = self.tracer.start_span(
            f"for_each {event.step}",
            context=root,
            attributes={
                **attributes,
                "saga.items": len(items),
                "saga.items.succeeded": done,
                "saga.outcome": _OUTCOMES[type(event)],
            },
            start_time=_ns(step.started_at),
        )
        span.end(_ns(event.at))

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
        found = {k: v for k, v in event.model_dump(include=set(_ATTRIBUTES)).items() if v}
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
