"""`saga timeline`'s HTML page: well-formed, self-contained, one row per step, a bar per attempt."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from saga.views.timeline import page, write_page
from tests.views.support import SVG, check_page, hand_written, harness, run_orders

pytestmark = pytest.mark.anyio


async def test_the_page_draws_each_saga_of_a_real_log(tmp_path: Path) -> None:
    async with harness() as h:
        await run_orders(h)
        logs = {saga_id: h.events(saga_id) for saga_id in ("order-ok", "order-refused")}

    for saga_id, events in logs.items():
        path = write_page(events, tmp_path / f"{saga_id}.html")
        text = path.read_text(encoding="utf-8")
        assert text.startswith("<!DOCTYPE html>")
        for needle in ("<script", "src=", "href=", "@import", "url(http"):
            assert needle not in text  # nothing fetched, nothing run
        check_page(ET.fromstring(text), events)

    ok = ET.fromstring(page(logs["order-ok"]))
    waits = [r for r in ok.iter(f"{SVG}rect") if (r.get("class") or "").split()[:1] == ["wait"]]
    assert [w.get("class") for w in waits] == ["wait action"]  # payment's retry, hatched
    refused = ET.fromstring(page(logs["order-refused"]))
    outcomes = {
        (r.get("class") or "")
        for r in refused.iter(f"{SVG}rect")
        if (r.get("class") or "").startswith("bar")
    }
    assert outcomes == {"bar action succeeded", "bar action failed", "bar compensation succeeded"}


def test_timeouts_and_stuck_compensations_have_their_own_bars() -> None:
    events = hand_written()
    root = ET.fromstring(page(events))
    check_page(root, events)
    bars = [
        r.get("class") for r in root.iter(f"{SVG}rect") if (r.get("class") or "").startswith("bar")
    ]
    assert bars == ["bar action timed_out", "bar compensation stuck"]
    points = [c.get("class") for c in root.iter(f"{SVG}circle")]
    assert points == ["point action_failed"]  # b failed before any attempt


def test_text_from_participants_is_escaped_and_kept_well_formed() -> None:
    events = hand_written()
    events[7] = events[7].model_copy(update={"reason": "<b>&\x07</b>"})
    text = page(events)
    assert "&lt;b&gt;&amp;?&lt;/b&gt;" in text
    ET.fromstring(text)
