"""`watch`: tails the log through the transport port and shows each saga's progress."""

from __future__ import annotations

import io

import anyio
import orjson
import pytest

from saga.views.watch import watch
from tests.views.support import ORDERS, harness, run_orders

pytestmark = pytest.mark.anyio


class _Output(io.StringIO):
    """Standard output for the watcher, telling when it first wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.written = anyio.Event()

    def write(self, text: str) -> int:
        self.written.set()
        return super().write(text)


FINAL = {"order-ok": "completed", "order-refused": "compensated", "order-plain": "completed"}


async def test_from_the_start_it_prints_every_update_and_the_final_statuses() -> None:
    async with harness() as h:
        await run_orders(h)
        events = sum(len(h.events(s)) for s in ORDERS)
        out = io.StringIO()
        progress = await watch(
            h.transport,
            h.coordinator.topics,
            out=out,
            from_start=True,
            until_idle=0.2,
            interval=0.05,
        )

    lines = out.getvalue().splitlines()
    assert len(lines) == events + 1  # one per event, then the totals
    for saga_id, status in FINAL.items():
        last = [line for line in lines if f"  {saga_id}  " in line][-1]
        assert f"{status}" in last.split()
        assert "100%" in last.split()
    assert lines[-1].startswith("totals  running 0  compensating 0  completed 2  compensated 1")
    assert {s: p.status.value for s, p in progress.states.items()} == FINAL
    assert progress.finished == 3
    assert progress.events == events


async def test_from_the_end_it_shows_only_what_happens_while_it_watches() -> None:
    async with harness() as h:
        await run_orders(h, ["order-plain"])
        out = _Output()
        async with anyio.create_task_group() as tg:

            async def watching() -> None:
                # Until both sagas ended, not until idle: a pause between events on a busy
                # machine must not end the watch early.
                progress = await watch(
                    h.transport,
                    h.coordinator.topics,
                    out=out,
                    until=lambda p: p.finished >= 2,
                    interval=0.05,
                )
                assert progress.finished == 2
                assert progress.states["order-plain"].status.value == "completed"  # from snapshots

            tg.start_soon(watching)
            with anyio.fail_after(10):  # the new sagas start once it has caught up
                await out.written.wait()
            await run_orders(h, ["order-ok", "order-refused"])

    lines = out.getvalue().splitlines()
    assert lines[0] == "watching saga.log from its end: 0 sagas in progress"
    assert not any("order-plain" in line for line in lines[1:-1])
    assert "compensated" in [line for line in lines if "order-refused" in line][-1].split()
    assert "completed" in [line for line in lines if "order-ok" in line][-1].split()
    assert lines[-1].startswith("totals  running 0  compensating 0  completed 2  compensated 1")


async def test_json_prints_one_object_per_folded_event() -> None:
    async with harness() as h:
        await run_orders(h)
        out = io.StringIO()
        await watch(
            h.transport,
            h.coordinator.topics,
            out=out,
            from_start=True,
            until_idle=0.1,
            interval=0.05,
            as_json=True,
        )
        events = {s: h.events(s) for s in ORDERS}

    updates = [orjson.loads(line) for line in out.getvalue().splitlines()]
    for saga_id, seen in events.items():
        mine = [u for u in updates if u["saga_id"] == saga_id]
        assert [u["seq"] for u in mine] == [e.seq for e in seen]
        assert [u["event"] for u in mine] == [getattr(e, "type", None) for e in seen]
        assert mine[-1]["status"] == FINAL[saga_id]
        assert mine[-1]["percent"] == 100
        assert all(0 <= u["percent"] <= 100 for u in mine)


async def test_on_a_terminal_it_redraws_a_frame_in_place() -> None:
    async with harness() as h:
        await h.start("order", ORDERS["order-ok"], "order-ok")
        await anyio.sleep(0.1)  # payment is waiting for its retry: the saga is in progress
        out = io.StringIO()
        await watch(
            h.transport,
            h.coordinator.topics,
            out=out,
            until_idle=0.1,
            interval=0.05,
            tty=True,
            limit=0,
        )

    text = out.getvalue()
    assert text.startswith("saga watch  saga.log  1 active")
    assert "... and 1 more" in text  # limit 0: no rows
    assert text.rstrip().splitlines()[-2].startswith("totals  running 1")


async def test_the_frame_shows_a_bar_per_active_saga_and_redraws_over_the_last_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # lines are cut to the terminal's width
    async with harness() as h:
        await h.start("order", ORDERS["order-ok"], "order-ok")
        out = io.StringIO()
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: watch(
                    h.transport,
                    h.coordinator.topics,
                    out=out,
                    from_start=True,
                    until=lambda p: p.finished >= 1,
                    interval=0.05,
                    tty=True,
                )
            )
            await anyio.sleep(0.1)
            await h.run_until_done("order-ok")

    text = out.getvalue()
    assert "order-ok" in text
    assert "[" in text
    assert "payment" in text
    assert "\x1b[" in text
    assert "A\x1b[J" in text
    assert (
        text.rstrip().splitlines()[-2].startswith("totals  running 0  compensating 0  completed 1")
    )
