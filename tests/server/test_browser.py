"""The console in a real headless Chromium (Debian's ``chromium``, driven by Playwright): the
list and its filters, a compensated saga's timeline and trace, approving a pending approval,
retrying a stuck saga. Every page is screenshotted into the test's folder and copied to
``tests/server/screenshots/``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.server.app import BROKEN
from tests.server.conftest import Stack

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(180)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One Chromium for the module's tests."""
    assert await anyio.Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: `make deps` installs it"
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def page(browser: Browser, stack: Stack) -> AsyncIterator[Page]:
    """A fresh page, signed in as bob through the sign-in form."""
    context = await browser.new_context(viewport={"width": 1360, "height": 900})
    p = await context.new_page()
    p.set_default_timeout(30_000)
    await p.goto(f"{stack.url}/")
    await expect(p).to_have_url(f"{stack.url}/login?next=%2F")
    await p.fill("input[name=token]", stack.tokens["bob"])
    await p.click("button[type=submit]")
    await expect(p.locator(".principal")).to_have_text("bob")
    try:
        yield p
    finally:
        await context.close()


async def start(stack: Stack, tag: str, **input: Any) -> str:
    saga_id = f"{tag}-{uuid.uuid4().hex[:6]}"
    async with stack.http() as http:
        r = await http.post(
            "/api/v1/sagas",
            json={
                "name": "shop_order",
                "saga_id": saga_id,
                "input": {"customer": "c-7", "total": 20, **input},
            },
        )
        assert r.status_code == 202, r.text
    return saga_id


async def wait_for_trace(stack: Stack, saga_id: str) -> None:
    """Until Jaeger has the compensations' spans (spans are exported in batches)."""
    from saga.runtime.traceids import trace_id_for

    url = f"{stack.jaeger.query_url}/api/traces/{trace_id_for(saga_id):032x}"
    with anyio.fail_after(60):
        async with httpx.AsyncClient() as http:
            while True:
                r = await http.get(url)
                if r.status_code == 200:
                    spans = r.json()["data"][0]["spans"]
                    names = [s["operationName"] for s in spans]
                    if any(n.startswith("compensate") for n in names):
                        return
                await anyio.sleep(0.5)


async def test_list_filter_and_a_compensated_saga(page: Page, stack: Stack, shots: Any) -> None:
    done = await start(stack, "done")
    failed = await start(stack, "failed", fail=True)
    await stack.wait_for(done, "completed")
    await stack.wait_for(failed, "compensated")

    await page.goto(f"{stack.url}/")
    await expect(page.locator(f"tr[data-saga='{failed}']")).to_be_visible()
    await expect(page.locator(".count.status-compensated .n")).not_to_have_text("0")
    await shots(page, "01-list")

    await page.select_option("select[name=status]", "compensated")
    await page.click("form.filters button[type=submit]")
    await expect(page).to_have_url(
        f"{stack.url}/?name=&status=compensated&step=&step_status=&input=&saga_id_prefix="
    )
    statuses = await page.locator("table.sagas tbody .pill").all_text_contents()
    assert statuses
    assert set(statuses) == {"compensated"}
    await expect(page.locator(f"tr[data-saga='{done}']")).to_have_count(0)
    await shots(page, "02-list-compensated")

    await page.click(f"tr[data-saga='{failed}'] a")
    await expect(page.locator("#saga-status")).to_have_text("compensated")
    # The DAG: the failed step red, the undone one compensated, the rest never ran.
    await expect(page.locator("svg.dag g.node.failed[data-step='charge']")).to_have_count(1)
    await expect(page.locator("svg.dag g.node.compensated[data-step='reserve']")).to_have_count(1)
    await expect(page.locator("svg.dag g.node.pending[data-step='ship']")).to_have_count(1)
    history = page.locator("table.history tr.ev")
    types = await history.evaluate_all("rows => rows.map(r => r.dataset.type)")
    assert "compensation_succeeded" in types
    assert types[-1] == "saga_compensated"
    await expect(page.locator("table.history .error").first).to_contain_text("StepFailed")
    # The timeline (saga.views.timeline, in a frame) draws the compensation's attempt.
    timeline = page.frame_locator("#timeline")
    await expect(timeline.locator("rect.compensation").first).to_be_attached()
    await shots(page, "03-saga-compensated")

    await wait_for_trace(stack, failed)
    await page.click("text=Trace waterfall")
    await expect(page.locator(".wf-row").first).to_be_visible()
    undo = page.locator("a.undoes").first
    await expect(undo).to_contain_text("undoes")
    target = await undo.get_attribute("href")
    assert target is not None
    assert await page.locator(target).count() == 1
    await expect(page.locator(".wf-row.comp")).not_to_have_count(0)
    jaeger_link = page.locator("a:has-text('Open in Jaeger')")
    assert (await jaeger_link.get_attribute("href") or "").startswith(
        "http://jaeger.example/trace/"
    )
    await shots(page, "04-trace-compensated")


async def test_approve_a_pending_approval(page: Page, stack: Stack, shots: Any) -> None:
    saga_id = await start(stack, "big", total=250)
    await stack.wait_for(saga_id, "running", manager="running")
    await page.goto(f"{stack.url}/login?next=/sagas/{saga_id}")
    await page.fill("input[name=token]", stack.tokens["ann"])
    await page.click("button[type=submit]")
    await expect(page.locator(".principal")).to_have_text("ann")
    await expect(page.locator("[data-approval='manager']")).to_be_visible()
    await expect(page.locator("svg.dag g.node.running[data-step='manager']")).to_have_count(1)
    await shots(page, "05-saga-pending-approval")

    await page.click("[data-action='approve-manager']")
    dialog = page.locator("dialog#confirm")
    await expect(dialog).to_be_visible()
    await expect(dialog.locator("#confirm-text")).to_contain_text("Approve step manager")
    await page.fill("#confirm-reason", "looks right")
    await shots(page, "06-approve-dialog")
    await page.click("#confirm-ok")
    await expect(page.locator(".flash.good")).to_contain_text("approve of manager sent")
    # Live: the page updates itself (server-sent events) when the saga completes.
    await expect(page.locator("#saga-status")).to_have_text("completed", timeout=30_000)
    await expect(page.locator("[data-approval]")).to_have_count(0)
    await expect(page.locator("table.history .actor").last).to_contain_text("ann")
    await shots(page, "07-saga-approved")


async def test_retry_a_stuck_saga(page: Page, stack: Stack, shots: Any) -> None:
    saga_id = f"stuck-{uuid.uuid4().hex[:6]}"
    BROKEN.add(saga_id)
    try:
        await start_with_id(stack, saga_id)
        await stack.wait_for(saga_id, "stuck")
        await page.goto(f"{stack.url}/?status=stuck")
        await expect(page.locator(f"tr[data-saga='{saga_id}']")).to_be_visible()
        await page.click(f"tr[data-saga='{saga_id}'] a")
        await expect(page.locator("#saga-status")).to_have_text("stuck")
        await expect(page.locator("svg.dag g.node.stuck[data-step='notify']")).to_have_count(1)
        await expect(page.locator("table.steps .error").first).to_contain_text("RuntimeError")
        await shots(page, "08-saga-stuck")

        BROKEN.discard(saga_id)
        await page.click("[data-action='retry']")
        await page.fill("#confirm-reason", "mail server is back")
        await page.click("#confirm-ok")
        await expect(page.locator("#saga-status")).to_have_text("completed", timeout=30_000)
        await expect(page.locator("tr.ev[data-type='saga_resumed'] .actor")).to_contain_text("bob")
        await shots(page, "09-saga-retried")
    finally:
        BROKEN.discard(saga_id)


async def start_with_id(stack: Stack, saga_id: str) -> None:
    async with stack.http() as http:
        r = await http.post(
            "/api/v1/sagas",
            json={"name": "shop_order", "saga_id": saga_id, "input": {"customer": "c", "total": 9}},
        )
        assert r.status_code == 202, r.text
