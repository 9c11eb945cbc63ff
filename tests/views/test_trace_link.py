"""`saga.views.jaeger.trace_link`: the one trace page that ``saga status``, ``saga trace`` and
the demo print, the console's unless a Jaeger UI is configured."""

from __future__ import annotations

import pytest

from saga.runtime.traceids import trace_id_for
from saga.views.jaeger import (
    CONSOLE_URL_ENV,
    DEFAULT_CONSOLE_URL,
    JAEGER_UI_ENV,
    console_trace_url,
    trace_link,
    trace_url,
)

SAGA = "order-0007-abc"
TRACE = f"{trace_id_for(SAGA):032x}"


@pytest.fixture(autouse=True)
def nothing_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(JAEGER_UI_ENV, raising=False)
    monkeypatch.delenv(CONSOLE_URL_ENV, raising=False)


def test_without_a_jaeger_ui_it_is_the_consoles_trace_page() -> None:
    assert DEFAULT_CONSOLE_URL == "http://127.0.0.1:8080"
    assert trace_link(SAGA) == f"http://127.0.0.1:8080/sagas/{SAGA}/trace"
    assert trace_link(SAGA, console="http://c.example:9000/") == (
        f"http://c.example:9000/sagas/{SAGA}/trace"
    )


def test_the_console_comes_from_the_environment_at_each_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CONSOLE_URL_ENV, "https://ops.example/")
    assert trace_link(SAGA) == f"https://ops.example/sagas/{SAGA}/trace"
    assert trace_link(SAGA, console="http://given:1") == f"http://given:1/sagas/{SAGA}/trace"


def test_a_jaeger_ui_wins_over_the_console(monkeypatch: pytest.MonkeyPatch) -> None:
    assert trace_link(SAGA, ui="http://ui.example/") == f"http://ui.example/trace/{TRACE}"
    monkeypatch.setenv(CONSOLE_URL_ENV, "https://ops.example")
    monkeypatch.setenv(JAEGER_UI_ENV, "http://jaeger.example:16686")
    assert trace_link(SAGA) == f"http://jaeger.example:16686/trace/{TRACE}"
    assert trace_link(SAGA) == trace_url(SAGA, "http://jaeger.example:16686")
    # A blank variable is no UI.
    monkeypatch.setenv(JAEGER_UI_ENV, "  ")
    assert trace_link(SAGA) == f"https://ops.example/sagas/{SAGA}/trace"


def test_a_sub_saga_id_is_one_path_segment() -> None:
    child = "party-0900-ab/orders[1]"
    assert console_trace_url(child) == (
        "http://127.0.0.1:8080/sagas/party-0900-ab%2Forders%5B1%5D/trace"
    )
