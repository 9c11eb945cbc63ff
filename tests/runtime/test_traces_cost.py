"""The cheap paths of the tracing observer keep what the stock ones gave: the hand-written OTLP
encoding gives the stock encoder's message, the handling span nests the user's spans, and head
sampling traces a saga entirely or not at all, alike in every process."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, Status, StatusCode
from opentelemetry.trace.span import TraceState

from saga import Participant, SagaDefinition, SagaStatus, Step, StepContext, StepFailed
from saga.adapters import otlp
from saga.adapters.tracing import DeterministicIds, OpenTelemetryObserver, sample_from_env
from saga.runtime.traceids import trace_id_for
from saga.testing import SagaHarness
from tests.views.primitives_app import ORDER, RECEIPT, services

pytestmark = pytest.mark.anyio


def observer(spans: InMemorySpanExporter, sample: float = 1.0) -> OpenTelemetryObserver:
    tracer = TracerProvider(
        id_generator=DeterministicIds(), resource=Resource.create({"service.name": "t"})
    )
    tracer.add_span_processor(SimpleSpanProcessor(spans))
    return OpenTelemetryObserver(tracer, MeterProvider(), sample=sample)


async def test_the_hand_encoding_is_the_stock_encoders_message() -> None:
    spans = InMemorySpanExporter()
    watched = observer(spans)
    async with SagaHarness([ORDER, RECEIPT], services(), observer=watched) as h:
        saga_id = await h.start("order", {"total": 50, "dishes": ["soup", "pasta"]})
        await h.run_until_waiting(saga_id, "manager")
        h.clock.advance(61)
        await h.run_until(saga_id, lambda s: s.steps["manager"].reminders == 1, "reminded")
        await h.reject(saga_id, "manager", "too dear", by="ann")
        state = await h.run_until_done(saga_id)
    assert state.status is SagaStatus.COMPENSATED
    tracer = watched.tracer_provider.get_tracer("user", "1.0", schema_url="https://s")
    with tracer.start_as_current_span("mine", attributes={"f": 1.5, "n": -3, "l": [1, 2]}) as s:
        s.add_event("seen", {"x": "y", "b": [True, False]})
        s.add_link(s.get_span_context(), {"k": "v"})
        s.set_status(Status(StatusCode.ERROR, "bad"))
    context = trace.SpanContext(1, 2, True, trace.TraceFlags(1), TraceState([("a", "b")]))
    with tracer.start_as_current_span(
        "stated",
        context=trace.set_span_in_context(trace.NonRecordingSpan(context)),
        links=[Link(context)],
    ):
        pass
    finished = list(spans.get_finished_spans())
    kinds = {s.kind for s in finished}
    assert len(kinds) >= 4  # server, internal, producer, consumer
    assert any(s.events for s in finished)
    assert any(s.links for s in finished)
    stock = encode_spans(finished)
    mine = ExportTraceServiceRequest.FromString(otlp.encode_spans(finished))
    assert mine == stock
    assert len(mine.resource_spans[0].scope_spans[0].spans) >= 10  # the saga's own


async def test_a_handlers_own_spans_nest_under_the_handling_span() -> None:
    spans = InMemorySpanExporter()
    watched = observer(spans)
    bank = Participant("bank")
    inner = watched.tracer_provider.get_tracer("handler")

    @bank.handler("charge")
    async def charge(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        trace.get_current_span().set_attribute("shop.basket", 3)
        with inner.start_as_current_span("charge card"):
            pass
        if payload.get("fail"):
            raise StepFailed("card declined")
        return {}

    shop = SagaDefinition(
        name="shop", steps=[Step(name="pay", service="bank", action="charge", kind="pivot")]
    )
    async with SagaHarness([shop], [bank], observer=watched) as h:
        ok = await h.start("shop", {})
        failed = await h.start("shop", {"fail": True})
        assert (await h.run_until_done(ok)).status is SagaStatus.COMPLETED
        assert (await h.run_until_done(failed)).status is SagaStatus.COMPENSATED
    finished = spans.get_finished_spans()
    for saga_id, outcome in ((ok, "ok"), (failed, "business")):
        mine = [s for s in finished if s.context.trace_id == trace_id_for(saga_id)]
        (handle,) = [s for s in mine if s.name == "handle bank charge"]
        (send,) = [s for s in mine if s.name == "send bank charge"]
        (card,) = [s for s in mine if s.name == "charge card"]
        assert handle.parent is not None
        assert handle.parent.span_id == send.context.span_id
        assert card.parent is not None
        assert card.parent.span_id == handle.context.span_id
        attributes = dict(handle.attributes or {})
        assert attributes["shop.basket"] == 3
        assert attributes["saga.outcome"] == outcome
        assert handle.start_time is not None
        assert handle.end_time is not None
        assert handle.start_time <= handle.end_time


async def test_head_sampling_traces_a_saga_entirely_or_not_at_all() -> None:
    spans = InMemorySpanExporter()
    coordinator, services_side = observer(spans, 0.5), observer(spans, 0.5)
    harness = SagaHarness([ORDER, RECEIPT], services(), observer=coordinator)
    async with harness as h:
        started = [await h.start("order", {"total": 5000, "dishes": []}) for _ in range(24)]
        for saga_id in started:
            await h.run_until_waiting(saga_id, "manager")
    by_trace: dict[int, int] = {}
    for span in spans.get_finished_spans():
        by_trace[span.context.trace_id] = by_trace.get(span.context.trace_id, 0) + 1
    traced = {s for s in started if coordinator.sampled(s)}
    assert 0 < len(traced) < len(started)  # 24 sagas at one half: both kinds, surely
    assert {s for s in started if services_side.sampled(s)} == traced  # alike in every process
    assert set(by_trace) == {trace_id_for(s) for s in traced}
    counts = {by_trace[trace_id_for(s)] for s in traced}
    assert len(counts) == 1  # every traced saga has all its spans: the same number
    assert min(counts) >= 4


def test_the_sample_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_TRACE_SAMPLE", "0.25")
    assert sample_from_env() == 0.25
    monkeypatch.setenv("SAGA_TRACE_SAMPLE", "2")
    with pytest.raises(ValueError, match="SAGA_TRACE_SAMPLE"):
        sample_from_env()
    monkeypatch.delenv("SAGA_TRACE_SAMPLE")
    assert sample_from_env() == 1.0
