"""One trace per saga in a real Jaeger, across the coordinator and every service process.

The pasta-order services run as separate processes exporting over OTLP to the session's Jaeger.
For a completed and a compensated order, the trace read back from Jaeger's query API must hold
spans from the coordinator and from every service that took part, no span whose parent is
missing, and compensation spans linked to the forward spans they undo.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

from deploy.jaeger import JaegerServer
from saga import SagaClient, SagaStatus
from saga.adapters.kafka import KafkaTransport
from saga.runtime.traceids import trace_id_for
from services.fleet import COORDINATOR, Fleet
from services.orders import make_order
from tests.integration.support import STEP_TIMEOUT, Services

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def traced_fleet(
    bootstrap: str, jaeger: JaegerServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    env = {
        "SAGA_STEP_TIMEOUT": str(STEP_TIMEOUT),
        "OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.otlp_http_endpoint,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # export spans within 0.2 s, not the default 5 s
        "SAGA_FAULTS": "",
    }
    data_dir = tmp_path_factory.mktemp("traced")
    prefix = f"trace-{uuid.uuid4().hex[:10]}"
    with Fleet(bootstrap=bootstrap, prefix=prefix, data_dir=data_dir, env=env) as running:
        yield running


@pytest.fixture
async def traced(traced_fleet: Fleet) -> AsyncIterator[Services]:
    transport = KafkaTransport(traced_fleet.bootstrap, deadline=20)
    async with SagaClient(transport, prefix=traced_fleet.prefix) as client:
        if traced_fleet.ready_after is None:
            await traced_fleet.wait_ready(client, timeout=60)
        yield Services(traced_fleet, client)


def fetch(jaeger: JaegerServer, saga_id: str) -> dict[str, Any] | None:
    url = f"{jaeger.query_url}/api/traces/{trace_id_for(saga_id):032x}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            data = json.load(response)["data"]
    except urllib.error.HTTPError:
        return None
    return data[0] if data else None


async def trace_with(jaeger: JaegerServer, saga_id: str, services: set[str]) -> dict[str, Any]:
    """The saga's trace once spans from every expected service arrived (batched exports)."""
    found: dict[str, Any] | None = None
    with anyio.move_on_after(30):
        while True:
            found = await anyio.to_thread.run_sync(fetch, jaeger, saga_id)
            if found is not None and services <= names(found):
                # Every decision's spans are exported after its commit; give the last ones time.
                await anyio.sleep(1)
                return await anyio.to_thread.run_sync(fetch, jaeger, saga_id) or found
            await anyio.sleep(0.3)
    seen = names(found) if found else set()
    raise AssertionError(f"trace of {saga_id} has services {sorted(seen)}, wanted {services}")


def names(trace: dict[str, Any]) -> set[str]:
    return {p["serviceName"] for p in trace["processes"].values()}


def check_structure(trace: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spans = {s["spanID"]: s for s in trace["spans"]}
    roots = [s for s in spans.values() if not s["references"]]
    assert [r["operationName"] for r in roots] == ["saga pasta_order"]
    for span in spans.values():
        for ref in span["references"]:
            if ref["refType"] == "CHILD_OF":
                assert ref["spanID"] in spans, f"orphan: {span['operationName']}"
    return spans


async def test_completed_saga_is_one_trace_across_every_service(
    traced: Services, jaeger: JaegerServer
) -> None:
    order = make_order(1)
    state = await traced.run(order)
    assert state.status is SagaStatus.COMPLETED
    everyone = {COORDINATOR, "location", "payment", "restaurant", "rider", "notification"}
    trace = await trace_with(jaeger, state.saga_id, everyone)
    spans = check_structure(trace)
    operations = [s["operationName"] for s in spans.values()]
    for step_action in (
        "location reserve_slot",
        "payment charge",
        "restaurant accept",
        "rider assign",
        "restaurant start_cooking",
        "notification notify_customer",
    ):
        assert f"send {step_action}" in operations
        assert f"handle {step_action}" in operations
    assert "saga completed" in operations
    assert not [o for o in operations if o.startswith("compensate")]


async def test_compensations_are_linked_to_the_steps_they_undo(
    traced: Services, jaeger: JaegerServer
) -> None:
    order = make_order(2, {"cook.start_cooking": "fail"})
    state = await traced.run(order)
    assert state.status is SagaStatus.COMPENSATED
    took_part = {COORDINATOR, "location", "payment", "restaurant", "rider"}
    trace = await trace_with(jaeger, state.saga_id, took_part)
    spans = check_structure(trace)
    compensations = [s for s in spans.values() if s["operationName"].startswith("compensate")]
    undone = set()
    for span in compensations:
        links = [r["spanID"] for r in span["references"] if r["refType"] == "FOLLOWS_FROM"]
        assert len(links) == 1, span["operationName"]
        forward = spans[links[0]]  # the linked span is in the same trace
        assert forward["operationName"].startswith("send ")
        undone.add(forward["operationName"].split(" ", 1)[1])
    dishes = {f"restaurant prepare_dish dishes[{i}]" for i in range(len(order["items"]))}
    assert undone == {
        "location reserve_slot",
        "payment charge",
        "restaurant accept",
        "rider assign",
        *dishes,  # each dish of the fan-out is undone on its own, linked to its own send
    }
    assert "saga compensated" in {s["operationName"] for s in spans.values()}
    handled = {
        s["operationName"] for s in spans.values() if s["operationName"].startswith("handle")
    }
    assert {
        "handle payment refund",
        "handle restaurant cancel",
        "handle rider release",
        "handle location release_slot",
    } <= handled
