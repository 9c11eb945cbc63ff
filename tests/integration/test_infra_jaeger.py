"""The session Jaeger accepts OTLP/HTTP spans from the OpenTelemetry SDK and serves them back."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from deploy.jaeger import JaegerServer


def _get_trace(query_url: str, trace_id: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{query_url}/api/traces/{trace_id}", timeout=5) as resp:
            body: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # Not stored yet.
            return None
        raise
    traces = body.get("data") or []
    return traces[0] if traces else None


def test_span_sent_over_otlp_http_is_queryable(jaeger: JaegerServer) -> None:
    service = f"infra-test-{uuid.uuid4().hex[:8]}"
    exporter = OTLPSpanExporter(endpoint=f"{jaeger.otlp_http_endpoint}/v1/traces", timeout=10)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        with provider.get_tracer("tests.infra").start_as_current_span("infra-check") as span:
            span.set_attribute("saga.test", True)
            trace_id = format(span.get_span_context().trace_id, "032x")
        assert provider.force_flush(10_000)
    finally:
        provider.shutdown()

    deadline = time.monotonic() + 30
    trace = _get_trace(jaeger.query_url, trace_id)
    while trace is None and time.monotonic() < deadline:
        time.sleep(0.3)
        trace = _get_trace(jaeger.query_url, trace_id)

    assert trace is not None, f"trace {trace_id} never reached Jaeger ({jaeger.log_path})"
    assert [s["operationName"] for s in trace["spans"]] == ["infra-check"]
    process = trace["processes"][trace["spans"][0]["processID"]]
    assert process["serviceName"] == service
