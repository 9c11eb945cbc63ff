"""`saga replay`'s text (history and timeline) and the spans it is drawn from."""

from __future__ import annotations

import pytest

from saga.cli import render
from saga.core.messages import StepStarted, StepSucceeded
from saga.views.spans import spans
from tests.views.support import hand_written, harness, run_orders

pytestmark = pytest.mark.anyio


def rows(text: str, names: list[str]) -> dict[str, str]:
    """The timeline's drawing area of each named row."""
    found = {}
    for line in text.splitlines():
        head, sep, rest = line.partition(" |")
        if sep and head.strip() in names and rest.endswith("|"):
            found[head.strip()] = rest[:-1]
    return found


async def test_replay_lists_every_event_in_order_then_draws_the_timeline() -> None:
    async with harness() as h:
        await run_orders(h)
        ok, refused = h.events("order-ok"), h.events("order-refused")

    for events in (ok, refused):
        text = render.replay(events, width=60)
        lines = text.splitlines()
        positions = []
        for e in events:
            kind = getattr(e, "type", "")
            hits = [
                i
                for i, line in enumerate(lines)
                if line.split()[:1] == [str(e.seq)] and kind in line.split()
            ]
            assert len(hits) == 1, f"seq {e.seq} {kind} not listed once"
            positions.append(hits[0])
        assert positions == sorted(positions)
        assert "time (UTC)" in text
        assert "2023-11-14" in text
        drawn = rows(text, ["location", "payment", "kitchen", "saga"])
        assert set(drawn) == {"location", "payment", "kitchen", "saga"}
        assert all(len(r) == 60 for r in drawn.values())
        assert "legend:" in text

    text = render.replay(ok)
    assert "error=[technical] RuntimeError: card network did not answer" in text
    payment = rows(text, ["payment"])["payment"]
    assert payment.lstrip().startswith("x")
    assert "." in payment
    assert payment.rstrip()[-1] == ">"
    saga_row = rows(text, ["saga"])["saga"]
    assert saga_row[0] == "*"
    assert saga_row.rstrip()[-1] == "C"

    text = render.replay(refused)
    drawn = rows(text, ["location", "payment", "kitchen", "saga"])
    assert "]" in drawn["location"]
    assert "]" in drawn["payment"]
    assert drawn["kitchen"].strip() == "x"
    assert "error=[business] StepFailed: kitchen is closed" in text
    # Virtual time stood still: every mark falls in the first column, the last one drawn wins.
    assert drawn["saga"].strip() == "K"


async def test_spans_count_attempts_waits_and_compensations() -> None:
    async with harness() as h:
        await run_orders(h, ["order-ok", "order-refused"])
        ok, refused = h.events("order-ok"), h.events("order-refused")

    sp = spans(ok)
    assert sp.status == "completed"
    by_name = {r.name: r for r in sp.rows}
    payment = by_name["payment"]
    assert [(a.attempt, a.outcome) for a in payment.attempts] == [(1, "failed"), (2, "succeeded")]
    assert [w.phase for w in payment.waits] == ["action"]
    assert payment.waits[0].end == payment.attempts[1].start
    assert payment.span("action") == (
        payment.attempts[0].start,
        payment.attempts[1].end,
        "succeeded",
    )
    assert [m.kind for m in sp.markers] == ["saga_started", "saga_completed"]

    sp = spans(refused)
    by_name = {r.name: r for r in sp.rows}
    assert [a.outcome for a in by_name["kitchen"].attempts] == ["failed"]
    assert [c.outcome for c in by_name["payment"].compensations] == ["succeeded"]
    assert [c.outcome for c in by_name["location"].compensations] == ["succeeded"]
    assert by_name["kitchen"].span("compensation") is None
    assert [m.kind for m in sp.markers] == ["saga_started", "saga_aborted", "saga_compensated"]
    assert sp.markers[1].label.startswith("aborted: step 'kitchen' failed")


def test_timeouts_stuck_compensations_and_failures_without_attempts_are_drawn() -> None:
    events = hand_written()
    sp = spans(events)
    a, b = sp.rows
    assert [x.outcome for x in a.attempts] == ["timed_out"]
    assert [x.outcome for x in a.compensations] == ["stuck"]
    assert b.attempts == []
    assert [m.kind for m in b.markers] == ["action_failed"]
    assert sp.status == "stuck"

    drawn = rows(render.replay(events, width=20), ["a", "b", "saga"])
    assert drawn["a"] == "==========?<<<<<<<<!"
    assert drawn["b"] == "          o         "
    assert drawn["saga"] == "*         A        S"


def test_events_that_do_not_fold_are_still_drawn_with_an_unknown_status() -> None:
    events = hand_written()
    del events[2]  # a gap in seq
    sp = spans(events)
    assert sp.state is None
    assert sp.status == "unknown"
    assert "status    unknown" in render.replay(events)


def test_an_attempt_in_flight_runs_to_the_last_event() -> None:
    events = [
        *hand_written()[:2],
        StepSucceeded(saga_id="s", seq=3, at=5.0, step="a", attempt=1, output={}),
        StepStarted(saga_id="s", seq=4, at=5.0, step="b", attempt=1, deadline_at=9.0),
    ]
    (b,) = [r for r in spans(events).rows if r.name == "b"]
    assert [(x.outcome, x.end) for x in b.attempts] == [("running", 5.0)]
    assert render.replay([]) == "(no events)"
