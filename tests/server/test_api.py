"""The HTTP API against the real stack: every endpoint, auth failures, and bad input answered
with problem details and nothing written to the requests topic."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import httpx
import pytest

from saga.server.problems import PROBLEM_JSON
from tests.server.app import BROKEN
from tests.server.conftest import Stack

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(120)]


def new_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def order(total: float = 20, **extra: Any) -> dict[str, Any]:
    return {"customer": "c-7", "total": total, **extra}


def assert_problem(r: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM_JSON)
    body: dict[str, Any] = r.json()
    assert body["type"] == f"/problems/{slug}"
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    assert body["instance"] == r.request.url.path
    return body


async def start(http: httpx.AsyncClient, saga_id: str, **input: Any) -> dict[str, Any]:
    r = await http.post(
        "/api/v1/sagas", json={"name": "shop_order", "input": order(**input), "saga_id": saga_id}
    )
    assert r.status_code == 202, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_openapi_document_lists_every_endpoint(stack: Stack) -> None:
    async with stack.http(None) as http:
        doc = (await http.get("/openapi.json")).json()
    paths = set(doc["paths"])
    assert {
        "/api/v1/sagas",
        "/api/v1/sagas/{saga_id}",
        "/api/v1/sagas/{saga_id}/history",
        "/api/v1/sagas/{saga_id}/signal",
        "/api/v1/sagas/{saga_id}/approve",
        "/api/v1/sagas/{saga_id}/reject",
        "/api/v1/sagas/{saga_id}/cancel",
        "/api/v1/sagas/{saga_id}/retry",
        "/api/v1/sagas/{saga_id}/resolve",
        "/api/v1/counts",
        "/api/v1/index/lag",
    } <= paths
    assert "if_exists" in doc["components"]["schemas"]["StartIn"]["properties"]
    assert not any(p.startswith("/sagas") for p in paths)  # the console's pages are not API


async def test_requests_without_a_valid_token_are_refused(stack: Stack) -> None:
    before = await stack.requests_written()
    body = {"name": "shop_order", "input": order()}
    async with stack.http(None) as http:
        r = await http.post("/api/v1/sagas", json=body)
        problem = assert_problem(r, 401, "unauthenticated")
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "token" in problem["detail"]

        r = await http.get("/api/v1/sagas", headers={"Authorization": "Bearer nope"})
        assert_problem(r, 401, "unauthenticated")
        assert 'error="invalid_token"' in r.headers["www-authenticate"]

        r = await http.get("/api/v1/sagas", headers={"Authorization": "Basic YTpi"})
        assert_problem(r, 401, "unauthenticated")
    assert await stack.requests_written() == before


async def test_a_start_runs_the_saga_and_the_history_names_the_caller(stack: Stack) -> None:
    saga_id = new_id("ok")
    async with stack.http("bob") as http:
        accepted = await start(http, saga_id)
        assert accepted["saga_id"] == saga_id
        assert accepted["by"] == "bob"
        assert accepted["status_url"] == f"/api/v1/sagas/{saga_id}"
        await stack.wait_for(saga_id, "completed")

        status = (await http.get(accepted["status_url"])).json()
        assert status["state"]["status"] == "completed"
        assert status["state"]["steps"]["charge"]["output"]["charge_id"] == f"c-{saga_id}"
        assert status["state"]["steps"]["manager"]["status"] == "skipped"
        assert status["pending_approvals"] == []

        history = (await http.get(f"/api/v1/sagas/{saga_id}/history")).json()
    types = [e["type"] for e in history["events"]]
    assert types[0] == "saga_started"
    assert types[-1] == "saga_completed"
    assert history["events"][0]["by"].startswith("bob")
    assert [e["seq"] for e in history["events"]] == sorted(e["seq"] for e in history["events"])


async def test_list_filters_and_pages(stack: Stack) -> None:
    customer = new_id("cust")
    ids = [new_id("page") for _ in range(3)]
    async with stack.http() as http:
        for saga_id in ids:
            r = await http.post(
                "/api/v1/sagas",
                json={
                    "name": "shop_order",
                    "input": {"customer": customer, "total": 5},
                    "saga_id": saga_id,
                },
            )
            assert r.status_code == 202
        for saga_id in ids:
            await stack.wait_for(saga_id, "completed")

        found = (await http.get("/api/v1/sagas", params={"input": f'customer="{customer}"'})).json()
        assert {s["saga_id"] for s in found["sagas"]} == set(ids)
        assert found["total"] == 3

        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"input": f"customer={customer}", "limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = (await http.get("/api/v1/sagas", params=params)).json()
            seen += [s["saga_id"] for s in page["sagas"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(ids)
        assert len(seen) == 3

        by_step = await http.get(
            "/api/v1/sagas",
            params={"input": f"customer={customer}", "step": "manager", "step_status": "skipped"},
        )
        assert by_step.json()["total"] == 3
        none = await http.get(
            "/api/v1/sagas", params={"input": f"customer={customer}", "status": "stuck"}
        )
        assert none.json()["sagas"] == []

        counts = (await http.get("/api/v1/counts", params={"name": "shop_order"})).json()
        assert counts["completed"] >= 3
        lag = (await http.get("/api/v1/index/lag")).json()
        assert lag["total"] >= 0
        assert lag["updated_at"] is not None

        bad = await http.get("/api/v1/sagas", params={"cursor": "garbage"})
        assert_problem(bad, 422, "invalid-query")
        bad = await http.get("/api/v1/sagas", params={"input": "no-equals-sign"})
        assert_problem(bad, 422, "invalid-request")


async def test_bad_input_is_a_problem_and_writes_nothing(stack: Stack) -> None:
    before = await stack.requests_written()
    async with stack.http() as http:
        r = await http.post(
            "/api/v1/sagas",
            content=b'{"name": "shop_order", "input": {',
            headers={"content-type": "application/json"},
        )
        assert_problem(r, 400, "malformed-json")

        r = await http.post(
            "/api/v1/sagas", json={"name": "shop_order", "input": {"customer": "", "total": -1}}
        )
        problem = assert_problem(r, 422, "invalid-input")
        locs = {tuple(e["loc"]) for e in problem["errors"]}
        assert locs == {("body", "input", "customer"), ("body", "input", "total")}

        r = await http.post("/api/v1/sagas", json={"name": "no_such_saga", "input": {}})
        assert_problem(r, 422, "unknown-saga-name")

        r = await http.post("/api/v1/sagas", json={"input": order()})
        problem = assert_problem(r, 422, "invalid-request")
        assert problem["errors"][0]["loc"] == ["body", "name"]

        r = await http.post(
            "/api/v1/sagas", json={"name": "shop_order", "input": order(), "saga_id": "__x"}
        )
        assert_problem(r, 422, "invalid-saga-id")

        unknown = new_id("nobody")
        assert_problem(await http.get(f"/api/v1/sagas/{unknown}"), 404, "unknown-saga")
        assert_problem(await http.get(f"/api/v1/sagas/{unknown}/history"), 404, "unknown-saga")
        for action in ("retry", "resolve", "cancel"):
            r = await http.post(f"/api/v1/sagas/{unknown}/{action}", json={"reason": "x"})
            assert_problem(r, 404, "unknown-saga")
        r = await http.post(f"/api/v1/sagas/{unknown}/approve", json={"step": "manager"})
        assert_problem(r, 404, "unknown-saga")
        assert_problem(await http.get("/api/v1/nothing-here"), 404, "not-found")
    assert await stack.requests_written() == before


async def test_id_reuse_policy(stack: Stack) -> None:
    saga_id = new_id("reuse")
    async with stack.http() as http:
        await start(http, saga_id)
        await stack.wait_for(saga_id, "completed")
        before = await stack.requests_written()
        r = await http.post(
            "/api/v1/sagas",
            json={
                "name": "shop_order",
                "input": order(total=99),
                "saga_id": saga_id,
                "if_exists": "refuse",
            },
        )
        assert_problem(r, 409, "saga-exists")
        assert await stack.requests_written() == before
        again = await start(http, saga_id)  # "return": the existing saga is kept
        assert again["saga_id"] == saga_id
        await stack.wait_for(saga_id, "completed")
        history = (await http.get(f"/api/v1/sagas/{saga_id}/history")).json()
    with anyio.fail_after(20):
        while "start_ignored" not in [e["type"] for e in history["events"]]:
            await anyio.sleep(0.2)
            async with stack.http() as http:
                history = (await http.get(f"/api/v1/sagas/{saga_id}/history")).json()


async def test_approve_and_reject(stack: Stack) -> None:
    approved, rejected = new_id("appr"), new_id("rej")
    async with stack.http("bob") as bob, stack.http("ann") as ann:
        await start(bob, approved, total=250)
        await start(bob, rejected, total=300)
        await stack.wait_for(approved, "running", manager="running")
        await stack.wait_for(rejected, "running", manager="running")
        status = (await bob.get(f"/api/v1/sagas/{approved}")).json()
        assert status["pending_approvals"] == ["manager"]

        r = await ann.post(f"/api/v1/sagas/{approved}/approve", json={"step": "ship"})
        assert_problem(r, 409, "not-applicable")
        r = await ann.post(
            f"/api/v1/sagas/{approved}/approve", json={"step": "manager", "note": "fine"}
        )
        assert r.status_code == 202
        assert r.json()["by"] == "ann"
        state = await stack.wait_for(approved, "completed")
        assert state.steps["manager"].output is not None
        assert state.steps["manager"].output["by"].startswith("ann")

        r = await ann.post(
            f"/api/v1/sagas/{rejected}/reject", json={"step": "manager", "note": "too much"}
        )
        assert r.status_code == 202
        state = await stack.wait_for(rejected, "compensated")
        assert state.steps["charge"].status.value == "compensated"
        error = state.steps["manager"].error
        assert error is not None
        assert "too much" in error.message


async def test_signal_and_cancel(stack: Stack) -> None:
    gift, cancelled = new_id("gift"), new_id("cancel")
    async with stack.http() as http:
        await start(http, gift, gift=True)
        await start(http, cancelled, total=500)
        await stack.wait_for(gift, "running", gift_note="running")
        r = await http.post(f"/api/v1/sagas/{gift}/signal", json={"name": "wrong"})
        assert_problem(r, 422, "unknown-signal")
        r = await http.post(
            f"/api/v1/sagas/{gift}/signal", json={"name": "gift_note", "data": {"text": "hi"}}
        )
        assert r.status_code == 202
        state = await stack.wait_for(gift, "completed")
        assert state.steps["gift_note"].output == {"text": "hi"}

        await stack.wait_for(cancelled, "running", manager="running")
        r = await http.post(f"/api/v1/sagas/{cancelled}/cancel", json={"reason": "customer"})
        assert r.status_code == 202
        await stack.wait_for(cancelled, "compensated")
        before = await stack.requests_written()
        r = await http.post(f"/api/v1/sagas/{cancelled}/cancel", json={})
        assert_problem(r, 409, "not-applicable")
        assert await stack.requests_written() == before
        history = (await http.get(f"/api/v1/sagas/{cancelled}/history")).json()
    aborted = [e for e in history["events"] if e["type"] == "saga_aborted"]
    assert aborted
    assert "customer" in aborted[0]["reason"]


async def test_retry_and_resolve_a_stuck_saga(stack: Stack) -> None:
    retried, resolved = new_id("retry"), new_id("resolve")
    BROKEN.update({retried, resolved})
    try:
        async with stack.http() as http:
            await start(http, retried)
            await start(http, resolved)
            await stack.wait_for(retried, "stuck")
            await stack.wait_for(resolved, "stuck")
            BROKEN.discard(retried)
            r = await http.post(f"/api/v1/sagas/{retried}/retry", json={"reason": "mail is back"})
            assert r.status_code == 202
            assert r.json()["seq"] > 0
            await stack.wait_for(retried, "completed")
            r = await http.post(
                f"/api/v1/sagas/{resolved}/resolve", json={"reason": "mailed by hand"}
            )
            assert r.status_code == 202
            await stack.wait_for(resolved, "completed")
            before = await stack.requests_written()
            r = await http.post(f"/api/v1/sagas/{retried}/retry", json={})
            assert_problem(r, 409, "not-applicable")
            assert await stack.requests_written() == before
            history = (await http.get(f"/api/v1/sagas/{retried}/history")).json()
    finally:
        BROKEN.difference_update({retried, resolved})
    resumed = [e for e in history["events"] if e["type"] == "saga_resumed"]
    assert resumed
    assert resumed[0]["by"].startswith("bob")


async def test_a_saga_whose_id_holds_a_slash_is_served(stack: Stack) -> None:
    # A sub-saga's id is "<parent>/<step>": every route takes it whole.
    saga_id = f"{new_id('parent')}/orders[0]"
    async with stack.http("bob") as http:
        await start(http, saga_id)
        await stack.wait_for(saga_id, "completed")
        status = await http.get(f"/api/v1/sagas/{saga_id}")
        assert status.status_code == 200, status.text
        assert status.json()["state"]["saga_id"] == saga_id
        history = (await http.get(f"/api/v1/sagas/{saga_id}/history")).json()
        assert history["saga_id"] == saga_id
        assert history["events"][-1]["type"] == "saga_completed"
        for page in (f"/sagas/{saga_id}", f"/sagas/{saga_id}/trace"):
            r = await http.get(page)
            assert r.status_code == 200, (page, r.status_code)
            assert "orders[0]" in r.text
