"""What replay, timeline, watch and graph show of the primitives: timers as waits, skipped
steps marked with their reason, fan-out items as rows under their step, signals, approvals
and sub-sagas as marks; read from a real log made on the harness (`primitives_app`)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from saga.cli import render
from saga.core import graph
from saga.core.definition import Approval, SagaDefinition, Step
from saga.core.messages import EventBase, StepScheduled, StepStarted
from saga.core.state import StepStatus
from saga.views import watch
from saga.views.spans import spans
from saga.views.timeline import page
from tests.views.primitives_app import ORDER, primitives_log
from tests.views.support import SVG, fold

pytestmark = pytest.mark.anyio


def upto(events: list[EventBase], last: int) -> list[EventBase]:
    return events[: last + 1]


async def test_the_spans_place_items_under_their_step_and_mark_each_primitive() -> None:
    events = await primitives_log()
    sp = spans(events)
    assert sp.status == "completed"
    assert [r.name for r in sp.rows] == [
        "pay",
        "manager",
        "kitchen",
        "dishes",
        "dishes[0]",
        "dishes[1]",
        "extra",
        "deliver",
        "receipt",
    ]
    rows = {r.name: r for r in sp.rows}
    assert [r.item_of for r in sp.rows if r.item_of] == ["dishes", "dishes"]
    assert [len(rows[f"dishes[{i}]"].attempts) for i in (0, 1)] == [1, 1]
    assert rows["extra"].skipped is not None
    assert "$.input.total > 1000" in rows["extra"].skipped
    assert rows["extra"].attempts == []
    (timer,) = rows["deliver"].waits
    assert (timer.kind, timer.end - timer.start) == ("timer", pytest.approx(120, abs=0.1))
    assert rows["deliver"].attempts[0].start == timer.end  # it started when the timer fired
    marks = {name: [m.kind for m in r.markers] for name, r in rows.items() if r.markers}
    assert marks == {
        "manager": ["approval_reminded", "approved"],
        "kitchen": ["signal_taken"],
        "dishes": ["step_expanded"],
        "extra": ["step_skipped"],
        "receipt": ["sub_saga"],
    }
    assert rows["manager"].markers[0].label == "reminded ann"
    assert rows["manager"].markers[1].label.startswith("approved by ann")
    signal = next(m for m in sp.markers if m.kind == "signal_received")
    assert signal.label.startswith("signal kitchen_confirmed (by chef")


async def test_replay_words_every_new_event() -> None:
    events = await primitives_log()
    text = render.replay(events, width=60)
    lines = {line.split()[3]: line for line in text.splitlines() if line[:4].strip().isdigit()}
    skipped = lines["step_skipped"]
    # The whole explanation, not cut at 60 characters as other values are.
    assert "reason=condition '$.input.total > 1000 and $.input.tier == \"gold\"' is" in skipped
    assert "..." not in skipped
    assert "reminded ann" in lines["approval_reminded"]
    assert "signal kitchen_confirmed" in lines["signal_received"]
    assert "by=chef" in lines["signal_received"]
    assert "approved by ann" in text
    assert "took signal kitchen_confirmed" in text
    assert "started sub-saga o-1/receipt" in text
    assert "count=2" in lines["step_expanded"]
    assert re.search(r"due_at=\d\d:\d\d:\d\d\.\d{3}", lines["step_scheduled"])

    drawn = {}
    for line in text.splitlines():
        head, sep, rest = line.partition(" |")
        if sep and rest.endswith("|"):
            drawn[head.rstrip()] = rest[:-1]
    assert "~" in drawn["deliver"]  # the timer
    assert "-" in drawn["extra"]
    assert "=" not in drawn["extra"]
    assert "  [0]" in drawn
    assert "  [1]" in drawn
    assert "s" in drawn["kitchen"]
    assert "@" in drawn["manager"]
    assert "+" in drawn["dishes"]
    assert "&" in drawn["receipt"]
    assert "s" in drawn["saga"]  # the signal's mark
    assert "~ timer" in text  # and the legend says so


async def test_the_page_shades_timers_indents_items_and_strikes_skips() -> None:
    events = await primitives_log()
    root = ET.fromstring(page(events))
    rows = {g.get("data-step"): g for g in root.iter(f"{SVG}g") if "row" in (g.get("class") or "")}
    assert rows["dishes[0]"].get("class") == "row item"
    assert rows["extra"].get("class") == "row skipped"
    title = rows["extra"].find(f"{SVG}text/{SVG}title")
    assert title is not None
    assert "skipped: condition" in (title.text or "")
    timers = [
        r for r in rows["deliver"].iter(f"{SVG}rect") if r.get("class") == "wait timer action"
    ]
    assert len(timers) == 1
    points = {c.get("class") for g in rows.values() for c in g.iter(f"{SVG}circle")}
    assert {"point approved", "point signal_taken", "point step_skipped"} <= points
    marks = {g.get("class") for g in root.iter(f"{SVG}g") if (g.get("class") or "")[:4] == "mark"}
    assert "mark signal_received" in marks


async def test_watch_counts_a_fan_out_by_its_items_and_shows_timers() -> None:
    events = await primitives_log()
    first_item = next(
        i for i, e in enumerate(events) if isinstance(e, StepStarted) and e.step == "dishes[0]"
    )
    state = fold(upto(events, first_item))
    assert state.steps["dishes"].status is StepStatus.RUNNING
    assert "dishes[1/2]" in watch._current(state)
    assert "dishes[0]" not in watch._current(state)
    # pay, manager, kitchen and the skipped extra of 7 steps: 4/7, whatever the 2 items add.
    assert watch.percent(state) == 4 * 100 // 7
    scheduled = next(i for i, e in enumerate(events) if isinstance(e, StepScheduled))
    state = fold(upto(events, scheduled))
    assert re.fullmatch(r"deliver@\d\d:\d\d:\d\d", watch._current(state))
    assert watch.percent(state) == 5 * 100 // 7  # dishes done, with its items
    assert watch.percent(fold(events)) == 100


def test_the_graph_names_each_step_s_work() -> None:
    for text in (graph.dot(ORDER), graph.mermaid(ORDER), graph.text(ORDER)):
        for needle in (
            "bank.charge / refund",
            "approval by ann (timeout 3600s)",
            "remind after 60s",
            "wait signal kitchen_confirmed (timeout 3600s)",
            "for_each $.input.dishes (max 10)",
            "delay 120s",
            "saga receipt",
        ):
            assert needle in text, (needle, text)
    dot = graph.dot(ORDER)
    assert 'when $.input.total > 1000 and $.input.tier == \\"gold\\"' in dot
    node = re.compile(
        r'^    "[\w.-]+" \[label="(?:[^"\\]|\\.)*", shape=\w+(, style="[a-z,]+")?'
        r"(, peripheries=2)?\];$"
    )
    nodes = [line for line in dot.splitlines() if "[label=" in line and "->" not in line]
    assert len(nodes) == len(ORDER.steps)
    assert all(node.match(line) for line in nodes), nodes
    assert 'style="dashed"' in next(n for n in nodes if n.startswith('    "kitchen"'))
    assert "peripheries=2" in next(n for n in nodes if n.startswith('    "receipt"'))
    assert "shape=box3d" in next(n for n in nodes if n.startswith('    "dishes"'))
    mermaid = graph.mermaid(ORDER)
    assert "#quot;gold#quot;" in mermaid
    assert "#gt;" in mermaid
    text = graph.text(ORDER)
    assert "  deliver (compensatable)  after dishes\n      post.ship / recall\n" in text


def test_the_graph_of_a_retriable_approval_keeps_both_styles() -> None:
    d = SagaDefinition(
        name="loan",
        steps=[
            Step(name="grant", service="bank", action="grant", kind="pivot"),
            Step(
                name="sign",
                approval=Approval(escalate_after=10, escalate_to=("boss",)),
                kind="retriable",
                depends_on=["grant"],
                start_at="$.input.at",
            ),
        ],
    )
    dot = graph.dot(d)
    assert 'style="rounded,dashed"' in dot
    assert "approval by the policy" in dot
    assert "escalate to boss after 10s" in dot
    assert "start_at $.input.at" in graph.text(d)
