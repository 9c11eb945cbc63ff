"""Error text stays out of spans and WARNING logs unless the redactor lets it in."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from saga import Participant, RetryPolicy, SagaDefinition, SagaStatus, Step, StepContext
from saga.adapters.tracing import DeterministicIds, OpenTelemetryObserver
from saga.core.messages import ErrorInfo
from saga.errors import UsageError
from saga.runtime.redaction import (
    Redactor,
    keep_message,
    redact,
    redact_exception,
    redactor_from_env,
    safely,
)
from saga.testing import SagaHarness

pytestmark = pytest.mark.anyio

SECRET = "card 4111111111111111 declined for alice@example.com"

CHECKOUT = SagaDefinition(
    name="checkout",
    steps=[
        Step(
            name="reserve",
            service="stock",
            action="reserve",
            compensation="release",
        ),
        Step(
            name="pay",
            service="bank",
            action="charge",
            compensation="refund",
            depends_on=["reserve"],
            retry=RetryPolicy(max_attempts=2, initial_backoff=1, jitter=0),
        ),
    ],
)


def services() -> list[Participant]:
    stock, bank = Participant("stock"), Participant("bank")

    @stock.handler("reserve")
    async def reserve(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"held": 1}

    @stock.handler("release")
    async def release(payload: dict[str, Any], ctx: StepContext) -> None:
        return None

    @bank.handler("charge")
    async def charge(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        raise ValueError(SECRET)

    @bank.handler("refund")
    async def refund(payload: dict[str, Any], ctx: StepContext) -> None:
        return None

    return [stock, bank]


def span_texts(spans: tuple[ReadableSpan, ...]) -> Iterator[str]:
    """Every string a span exports: attributes, status, events and their attributes."""
    for span in spans:
        yield span.name
        yield span.status.description or ""
        yield from (str(v) for v in (span.attributes or {}).values())
        for event in span.events:
            yield event.name
            yield from (str(v) for v in (event.attributes or {}).values())


async def run_failing_saga(
    caplog: pytest.LogCaptureFixture, redactor: Redactor | None
) -> tuple[tuple[ReadableSpan, ...], list[logging.LogRecord], ErrorInfo | None]:
    spans = InMemorySpanExporter()
    tracer = TracerProvider(id_generator=DeterministicIds())
    tracer.add_span_processor(SimpleSpanProcessor(spans))
    observer = OpenTelemetryObserver(tracer, MeterProvider(), redactor=redactor)
    with caplog.at_level(logging.DEBUG, logger="saga.participant"):
        async with SagaHarness([CHECKOUT], services(), observer=observer) as h:
            saga_id = await h.start("checkout", {"customer": "alice"})
            state = await h.run_until_done(saga_id)
    assert state.status is SagaStatus.COMPENSATED
    warnings = [
        r for r in caplog.records if r.name == "saga.participant" and r.levelno == logging.WARNING
    ]
    return spans.get_finished_spans(), warnings, state.steps["pay"].error


async def test_spans_and_warnings_hold_the_type_but_not_the_message(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SAGA_REDACT", raising=False)
    spans, warnings, error = await run_failing_saga(caplog, None)

    texts = list(span_texts(spans))
    assert not [t for t in texts if "4111" in t or "alice@example.com" in t]
    payloads = {"saga.payload", "saga.input_payload"}  # record_payloads is off by default
    assert not [s for s in spans if payloads & set(s.attributes or {})]
    summary = f"ValueError (message redacted, {len(SECRET)} chars)"
    assert summary in texts  # the handling span's and the backoff span's error attribute
    assert any(summary in t and "'pay'" in t for t in texts)  # the saga's reason, scrubbed
    handled = [s for s in spans if s.name == "handle bank charge"]
    assert len(handled) == 2  # two attempts
    assert all(s.attributes and s.attributes["saga.error.type"] == "ValueError" for s in handled)
    assert all(s.status.description == summary for s in handled)

    assert len(warnings) == 2
    assert all("4111" not in r.getMessage() for r in warnings)
    assert all("ValueError (message redacted" in r.getMessage() for r in warnings)
    # DEBUG keeps the full text, and so does the reply: it is the saga's own data.
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "4111" in r.getMessage()]
    assert len(debug) == 2
    assert error is not None
    assert error.message == SECRET


async def test_keep_message_lets_the_text_in(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGA_REDACT", "none")  # process-wide: the WARNING log follows it
    spans, warnings, _ = await run_failing_saga(caplog, keep_message)

    texts = list(span_texts(spans))
    assert f"ValueError: {SECRET}" in texts
    assert any(f"step 'pay' failed: ValueError: {SECRET}" in t for t in texts)
    assert len(warnings) == 2
    assert all(SECRET in r.getMessage() for r in warnings)


async def test_the_environment_chooses_the_observers_redactor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAGA_REDACT", "none")
    tracer = TracerProvider(id_generator=DeterministicIds())
    assert OpenTelemetryObserver(tracer, MeterProvider()).redactor is keep_message
    given = OpenTelemetryObserver(tracer, MeterProvider(), redactor=redact)
    assert given.redactor is redact  # the object's choice wins over the environment


def test_redactors() -> None:
    error = ErrorInfo(type="ValueError", message=SECRET)
    assert redact(error) == f"ValueError (message redacted, {len(SECRET)} chars)"
    assert redact(ErrorInfo(type="Timeout", message="")) == "Timeout (no message)"
    assert keep_message(error) == f"ValueError: {SECRET}"
    assert keep_message(ErrorInfo(type="X", message="y" * 2000)) == "X: " + "y" * 500


def test_redactor_from_env() -> None:
    assert redactor_from_env({}) is redact
    assert redactor_from_env({"SAGA_REDACT": "default"}) is redact
    assert redactor_from_env({"SAGA_REDACT": "NONE"}) is keep_message
    with pytest.raises(UsageError, match=r"SAGA_REDACT='some'.*'default'.*'none'"):
        redactor_from_env({"SAGA_REDACT": "some"})


def test_a_failing_redactor_falls_back_to_redact(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(error: ErrorInfo) -> str:
        raise RuntimeError("oops")

    error = ErrorInfo(type="KeyError", message=SECRET)
    assert safely(broken, error) == redact(error)
    monkeypatch.setenv("SAGA_REDACT", "bogus")  # the failure path never raises on it
    assert (
        redact_exception(KeyError(SECRET))
        == f"KeyError (message redacted, {len(SECRET) + 2} chars)"
    )
    assert redact_exception(KeyError("x"), keep_message) == "KeyError: 'x'"
