"""What the views' tests share: a real log made by running the sample sagas on the harness,
a hand-written log for the outcomes the sample does not reach, and the HTML page's checks."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from saga.core.messages import (
    CompensationStarted,
    ErrorInfo,
    EventBase,
    SagaAborted,
    SagaStarted,
    SagaStuck,
    StepFailedEvent,
    StepStarted,
    StepStuck,
    StepTimedOut,
)
from saga.core.state import SagaState, evolve
from saga.runtime.ports import Outgoing
from saga.testing import SagaHarness
from tests.views.sample_app import ORDER, participants

__all__ = [
    "ORDERS",
    "SVG",
    "append",
    "check_page",
    "fold",
    "hand_written",
    "harness",
    "run_orders",
    "snapshot_partition",
]

SVG = "{http://www.w3.org/2000/svg}"

ORDERS = {
    "order-ok": {"amount": 12, "flaky": True},  # payment retried once, then completed
    "order-refused": {"amount": 5, "refuse": True},  # kitchen refuses: compensated
    "order-plain": {"amount": 7},  # completed at once
}
"""Saga id -> input."""


def harness() -> SagaHarness:
    """A harness running the sample order saga and its three services."""
    return SagaHarness([ORDER], participants())


async def run_orders(h: SagaHarness, ids: list[str] | None = None) -> None:
    """Starts the given sample orders (all by default) and runs them to their end."""
    chosen = ids or list(ORDERS)
    for saga_id in chosen:
        await h.start("order", ORDERS[saga_id], saga_id)
    for saga_id in chosen:
        await h.run_until_done(saga_id)


def snapshot_partition(h: SagaHarness, saga_id: str) -> int:
    """The snapshots partition that holds the saga (the coordinator writes it with its log)."""
    topic = h.coordinator.topics.snapshots
    return h.transport.partition_for(saga_id.encode(), len(h.broker.topics[topic]))


def append(h: SagaHarness, records: list[Outgoing]) -> None:
    """Writes records straight to the in-memory broker, as a foreign writer would."""
    h.broker.append(records)


def hand_written() -> list[EventBase]:
    """A saga that times out, fails without an attempt and gets stuck compensating."""
    err = ErrorInfo(type="RuntimeError", message="down")
    return [
        SagaStarted(saga_id="s", seq=1, at=0.0, name="n", version=1, input={}, steps=["a", "b"]),
        StepStarted(saga_id="s", seq=2, at=0.0, step="a", attempt=1, deadline_at=10.0),
        StepTimedOut(saga_id="s", seq=3, at=10.0, step="a", attempt=1),
        StepFailedEvent(saga_id="s", seq=4, at=10.0, step="b", attempt=0, error=err),
        SagaAborted(saga_id="s", seq=5, at=10.0, reason="a timed out", step="a"),
        CompensationStarted(saga_id="s", seq=6, at=10.0, step="a", attempt=1, deadline_at=20.0),
        StepStuck(
            saga_id="s", seq=7, at=20.0, step="a", phase="compensation", attempt=1, error=err
        ),
        SagaStuck(saga_id="s", seq=8, at=20.0, reason="a cannot be undone"),
    ]


def fold(events: list[EventBase]) -> SagaState:
    state: SagaState | None = None
    for e in events:
        state = evolve(state, e)
    assert state is not None
    return state


def check_page(root: ET.Element, events: list[EventBase]) -> None:
    """The page draws ``events`` faithfully: rows, bars, waits, marks and the table."""
    state = fold(events)
    (svg,) = root.iter(f"{SVG}svg")
    rows = [g for g in svg.iter(f"{SVG}g") if g.get("class") == "row"]
    assert [g.get("data-step") for g in rows] == list(state.steps)
    for g in rows:
        step = state.steps[g.get("data-step", "")]
        classes = [(r.get("class") or "").split() for r in g.iter(f"{SVG}rect")]
        actions = [c for c in classes if c[:2] == ["bar", "action"]]
        undos = [c for c in classes if c[:2] == ["bar", "compensation"]]
        assert len(actions) == step.attempt
        assert len(undos) == step.compensation_attempt
        numbers = [
            r.get("data-attempt") for r in g.iter(f"{SVG}rect") if "bar" in (r.get("class") or "")
        ]
        assert numbers == [str(n) for n in range(1, step.attempt + 1)] + [
            str(n) for n in range(1, step.compensation_attempt + 1)
        ]
    marks = [
        g.get("class") for g in svg.iter(f"{SVG}g") if (g.get("class") or "").startswith("mark")
    ]
    kinds = [getattr(e, "type", "") for e in events]
    assert marks == [f"mark {k}" for k in kinds if k.startswith("saga_") or k == "cancel_rejected"]
    body = root.find("body")
    assert body is not None
    table_rows = body.findall("./table/tbody/tr")
    assert [tr[0].text for tr in table_rows] == [str(e.seq) for e in events]
    assert [tr[3].text for tr in table_rows] == kinds
    header = ET.tostring(body.find("header") or ET.Element("x"), encoding="unicode")
    assert state.saga_id in header
    assert state.name in header
    assert state.status.value in header
