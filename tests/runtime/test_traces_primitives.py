"""The trace of the steps that wait, branch, fan out and start sagas, checked on the spans the
OpenTelemetry observer exports while the harness runs them under virtual time."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from saga import SagaStatus
from saga.adapters.tracing import DeterministicIds, OpenTelemetryObserver
from saga.runtime.traceids import root_span_id, trace_id_for
from saga.testing import SagaHarness
from tests.views.primitives_app import ORDER, RECEIPT, services

pytestmark = pytest.mark.anyio


def observer(spans: InMemorySpanExporter) -> OpenTelemetryObserver:
    tracer = TracerProvider(id_generator=DeterministicIds())
    tracer.add_span_processor(SimpleSpanProcessor(spans))
    return OpenTelemetryObserver(tracer, MeterProvider())


def named(spans: InMemorySpanExporter, name: str, saga_id: str) -> ReadableSpan:
    found = [
        s
        for s in spans.get_finished_spans()
        if s.name == name and s.context.trace_id == trace_id_for(saga_id)
    ]
    assert len(found) == 1, f"{name!r}: {len(found)} spans"
    return found[0]


def seconds(span: ReadableSpan) -> float:
    assert span.start_time is not None
    assert span.end_time is not None
    return (span.end_time - span.start_time) / 1e9


async def test_each_primitive_has_a_span_of_its_own() -> None:
    spans = InMemorySpanExporter()
    async with SagaHarness([ORDER, RECEIPT], services(), observer=observer(spans)) as h:
        saga_id = await h.start("order", {"total": 50, "dishes": ["soup", "pasta"]})
        await h.run_until_waiting(saga_id, "manager")
        h.clock.advance(61)  # past the reminder
        await h.run_until(saga_id, lambda s: s.steps["manager"].reminders == 1, "reminded")
        await h.approve(saga_id, "manager", "fine", by="ann")
        await h.run_until_waiting(saga_id, "kitchen")
        await h.signal(saga_id, "kitchen_confirmed", {"eta": 5}, by="chef")
        state = await h.run_until_done(saga_id)
    assert state.status is SagaStatus.COMPLETED

    approval = named(spans, "approval manager", saga_id)
    attributes = dict(approval.attributes or {})
    assert attributes["saga.approval.decision"] == "approved"
    assert str(attributes["saga.approval.by"]).startswith("ann")
    assert attributes["saga.approval.reminders"] == 1
    assert "saga.approval.note" not in attributes  # free text: only with record_payloads
    assert [e.name for e in approval.events] == ["approval_reminded"]
    assert seconds(approval) >= 61

    wait = named(spans, "wait kitchen", saga_id)
    attributes = dict(wait.attributes or {})
    assert attributes["saga.signal"] == "kitchen_confirmed"
    assert str(attributes["saga.signal.by"]).startswith("chef")
    assert attributes["saga.outcome"] == "succeeded"

    timer = named(spans, "timer deliver", saga_id)
    assert seconds(timer) == pytest.approx(120)
    started = named(spans, "send post ship", saga_id)
    assert started.start_time is not None
    assert timer.end_time is not None
    assert started.start_time >= timer.end_time  # the command went once the timer was due

    skipped = named(spans, "skip extra", saga_id)
    assert "$.input.total > 1000" in str((skipped.attributes or {})["saga.reason"])

    for index in (0, 1):
        send = named(spans, f"send kitchen cook dishes[{index}]", saga_id)
        assert (send.attributes or {})["saga.item"] == index
        handle = named(spans, f"handle kitchen cook dishes[{index}]", saga_id)
        assert handle.parent is not None
        assert handle.parent.span_id == send.context.span_id
    fan_out = dict(named(spans, "for_each dishes", saga_id).attributes or {})
    assert (fan_out["saga.items"], fan_out["saga.items.succeeded"]) == (2, 2)

    child_id = f"{saga_id}/receipt"
    start = named(spans, "start saga receipt", saga_id)
    assert (start.attributes or {})["saga.child.id"] == child_id
    assert [(link.context.trace_id, link.context.span_id) for link in start.links] == [
        (trace_id_for(child_id), root_span_id(child_id))
    ]
    child_root = named(spans, "saga receipt", child_id)
    assert [(link.context.trace_id, link.context.span_id) for link in child_root.links] == [
        (trace_id_for(saga_id), root_span_id(saga_id))
    ]


async def test_a_rejection_and_an_early_signal_after_a_restart() -> None:
    spans = InMemorySpanExporter()
    async with SagaHarness([ORDER, RECEIPT], services(), observer=observer(spans)) as h:
        saga_id = await h.start("order", {"total": 50, "dishes": []})
        await h.run_until_waiting(saga_id, "manager")
        # A new process, with a new observer: it did not see the approval begin.
        h.observer = observer(spans)
        await h.restart_coordinator()
        await h.reject(saga_id, "manager", "too dear", by="ann")
        state = await h.run_until_done(saga_id)
    assert state.status is SagaStatus.COMPENSATED
    approval = dict(named(spans, "approval manager", saga_id).attributes or {})
    assert approval["saga.approval.decision"] == "rejected"
    assert str(approval["saga.approval.by"]).startswith("ann")
    assert approval["saga.error.type"] == "Rejected"
    assert "too dear" not in str(approval)  # the note is free text, redacted by default

    spans.clear()
    async with SagaHarness([ORDER, RECEIPT], services(), observer=observer(spans)) as h:
        saga_id = await h.start("order", {"total": 50, "dishes": []})
        await h.run_until_waiting(saga_id, "manager")
        await h.signal(saga_id, "kitchen_confirmed", {"eta": 1}, by="chef")  # kept for later
        await h.approve(saga_id, "manager", by="ann")
        state = await h.run_until_done(saga_id)
    assert state.status is SagaStatus.COMPLETED
    wait = named(spans, "wait kitchen", saga_id)
    assert (wait.attributes or {})["saga.signal"] == "kitchen_confirmed"
    assert seconds(wait) == 0  # it took the kept signal as it started
    assert [s.name for s in spans.get_finished_spans() if s.name.startswith("for_each")] == []
