"""``/metrics`` on the real stack: sagas by status from the index, step latency, retries, dead
letters from the DLQ topic, and the index lag, in Prometheus's text format."""

from __future__ import annotations

import re
import uuid

import anyio
import pytest

from saga.runtime.ports import Outgoing, Topics
from tests.server.app import BROKEN
from tests.server.conftest import Stack

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(120)]


def value(text: str, name: str, **labels: str) -> float | None:
    """The sample ``name`` with (at least) these labels, or ``None``."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_metrics_cover_statuses_latency_retries_dead_letters_and_lag(stack: Stack) -> None:
    ok, stuck = f"m-ok-{uuid.uuid4().hex[:6]}", f"m-stuck-{uuid.uuid4().hex[:6]}"
    BROKEN.add(stuck)
    try:
        async with stack.http() as http:
            for saga_id in (ok, stuck):
                r = await http.post(
                    "/api/v1/sagas",
                    json={
                        "name": "shop_order",
                        "saga_id": saga_id,
                        "input": {"customer": "m", "total": 3},
                    },
                )
                assert r.status_code == 202
            await stack.wait_for(ok, "completed")
            await stack.wait_for(stuck, "stuck")
            # A record the coordinator cannot decode: dead-lettered as invalid JSON.
            async with stack.transport.producer() as producer:
                await producer.send(
                    [Outgoing(Topics(stack.prefix).requests, b"junk", b"{not json")]
                )

            with anyio.fail_after(30):
                while True:
                    r = await http.get("/metrics")
                    assert r.status_code == 200
                    text = r.text
                    if value(text, "saga_dead_letters_total", reason="invalid_json"):
                        break
                    await anyio.sleep(0.3)
    finally:
        BROKEN.discard(stuck)
    assert r.headers["content-type"].startswith("text/plain")
    async with stack.http() as http:
        counts = (await http.get("/api/v1/counts")).json()
    assert value(text, "saga_index_sagas", status="completed") == counts["completed"]
    assert value(text, "saga_index_sagas", status="stuck") == counts["stuck"] >= 1
    assert value(text, "saga_index_sagas", status="rejected") == counts.get("rejected", 0)
    assert value(text, "saga_index_lag_records") is not None
    count = value(text, "saga_step_duration_seconds_count", saga="shop_order", step="charge")
    assert count is not None
    assert count >= 1
    assert value(
        text, "saga_step_duration_seconds_bucket", step="charge", outcome="succeeded", le="+Inf"
    )
    assert value(text, "saga_step_retries_total", saga="shop_order", step="notify") == 1
