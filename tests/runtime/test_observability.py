"""Metrics and spans from the OpenTelemetry observer, checked against what actually ran."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from saga import Participant, RetryPolicy, SagaDefinition, SagaStatus, Step, StepContext, StepFailed
from saga.adapters.tracing import DeterministicIds, OpenTelemetryObserver
from saga.runtime.ports import Outgoing
from saga.runtime.traceids import trace_id_for
from saga.testing import SagaHarness

pytestmark = pytest.mark.anyio

SHOP = SagaDefinition(
    name="shop",
    steps=[
        Step(
            name="pay",
            service="bank",
            action="charge",
            compensation="refund",
            retry=RetryPolicy(max_attempts=3, initial_backoff=1, jitter=0),
        ),
        Step(name="ship", service="post", action="ship", kind="pivot", depends_on=["pay"]),
    ],
)


def shop_services() -> list[Participant]:
    bank, post = Participant("bank"), Participant("post")

    @bank.handler("charge")
    async def charge(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"id": "c"}

    @bank.handler("refund")
    async def refund(payload: dict[str, Any], ctx: StepContext) -> None:
        return None

    @post.handler("ship")
    async def ship(payload: dict[str, Any], ctx: StepContext) -> None:
        if payload.get("nowhere"):
            raise StepFailed("no such address")

    return [bank, post]


def observed() -> tuple[SagaHarness, InMemorySpanExporter, InMemoryMetricReader]:
    spans, metrics = InMemorySpanExporter(), InMemoryMetricReader()
    tracer = TracerProvider(id_generator=DeterministicIds())
    tracer.add_span_processor(SimpleSpanProcessor(spans))
    observer = OpenTelemetryObserver(tracer, MeterProvider(metric_readers=[metrics]))
    return SagaHarness([SHOP], shop_services(), observer=observer), spans, metrics


def points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    found: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for p in metric.data.data_points:
                    value = getattr(p, "value", None)
                    if value is None:
                        value = p.count  # a histogram: how many were recorded
                    found.setdefault(metric.name, []).append((dict(p.attributes or {}), value))
    return found


async def test_metrics_count_what_ran() -> None:
    harness, spans, metrics = observed()
    async with harness as h:
        h.fail("bank", "charge", times=1)
        ok_1 = await h.start("shop", {})
        ok_2 = await h.start("shop", {})
        undone = await h.start("shop", {"nowhere": True})
        h.broker.append([Outgoing(h.coordinator.topics.replies, b"x", b"junk", partition=0)])
        outcomes = Counter([(await h.run_until_done(s)).status for s in (ok_1, ok_2, undone)])
    assert outcomes == {SagaStatus.COMPLETED: 2, SagaStatus.COMPENSATED: 1}
    got = points(metrics)
    assert sum(v for _, v in got["saga.sagas.started"]) == 3
    ended = {a["status"]: v for a, v in got["saga.sagas.ended"]}
    assert ended == {"completed": 2, "compensated": 1}
    assert sum(v for _, v in got["saga.step.retries"]) == 1
    assert {a["reason"]: v for a, v in got["saga.dead_letters"]} == {"invalid_json": 1}
    durations = {(a["step"], a["outcome"]): v for a, v in got["saga.step.duration"]}
    assert durations == {("pay", "succeeded"): 3, ("ship", "succeeded"): 2, ("ship", "failed"): 1}
    assert sum(v for _, v in got["saga.saga.duration"]) == 3
    assert [v for _, v in got["saga.sagas.in_flight"]] == [0]
    handled = Counter()
    for attributes, value in got["saga.participant.handled"]:
        handled[(attributes["action"], attributes["outcome"])] += value
    assert handled == {
        ("charge", "technical"): 1,
        ("charge", "ok"): 3,
        ("ship", "ok"): 2,
        ("ship", "business"): 1,
        ("refund", "ok"): 1,
    }
    traces = {s.context.trace_id for s in spans.get_finished_spans()}
    assert traces == {trace_id_for(s) for s in (ok_1, ok_2, undone)}


async def test_a_coordinator_restart_adds_no_spans() -> None:
    harness, spans, _ = observed()
    async with harness as h:
        saga_id = await h.start("shop", {})
        await h.run_until_done(saga_id)
        before = sorted((s.name, s.context.span_id) for s in spans.get_finished_spans())
        await h.restart_coordinator()  # same observer; rebuilds from snapshots and the log
        state = await h.status(saga_id)
        assert state is not None
        assert state.status is SagaStatus.COMPLETED
        after = sorted((s.name, s.context.span_id) for s in spans.get_finished_spans())
    assert after == before
    assert len({span_id for _, span_id in before}) == len(before)  # no duplicate span ids
