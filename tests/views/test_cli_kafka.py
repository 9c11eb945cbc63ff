"""The views' CLI commands on the real broker, checked against the log they read.

A coordinator and the sample services run in this process on Kafka under a fresh prefix; the
CLI runs in a worker thread (it calls `anyio.run` itself) and its standard output is captured.
"""

from __future__ import annotations

import logging
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import orjson
import pytest

import saga
from saga.adapters.kafka import KafkaTransport
from saga.cli import main
from saga.core.messages import EventBase
from tests.views.sample_app import ORDER, participants
from tests.views.support import check_page

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(240)]


@dataclass
class Run:
    """Two sagas that ended on the broker, and how to reach them."""

    bootstrap: str
    prefix: str
    ok: str
    refused: str
    events: dict[str, list[EventBase]]


@pytest.fixture
async def run(bootstrap: str) -> AsyncIterator[Run]:
    prefix = f"views-{uuid.uuid4().hex[:8]}"
    transport = KafkaTransport(bootstrap, deadline=20)
    geo, pay, kitchen = participants()
    async with (
        saga.Coordinator([ORDER], transport=transport, prefix=prefix) as coordinator,
        geo.serving(transport, prefix=prefix),
        pay.serving(transport, prefix=prefix),
        kitchen.serving(transport, prefix=prefix),
        saga.SagaClient(transport, prefix=prefix) as client,
    ):
        ok = await coordinator.start("order", {"amount": 12, "flaky": True}, f"ok-{prefix}")
        refused = await coordinator.start("order", {"amount": 5, "refuse": True})
        assert (await coordinator.wait(ok, 60)).status is saga.SagaStatus.COMPLETED
        assert (await coordinator.wait(refused, 60)).status is saga.SagaStatus.COMPENSATED
        events = {s: await client.events(s) for s in (ok, refused)}
        yield Run(bootstrap, prefix, ok, refused, events)


async def cli(capsys: pytest.CaptureFixture[str], r: Run, *args: str) -> tuple[int, str, str]:
    """Runs ``saga ARGS`` against the run's broker and prefix: exit status, stdout, stderr."""
    capsys.readouterr()
    argv = [*args, "--prefix", r.prefix, "--bootstrap-servers", r.bootstrap]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code = await anyio.to_thread.run_sync(main, argv)
    finally:
        # `main` replaces the root logger's handlers (it is a process's entry point): put
        # pytest's back, and drop the one bound to this test's captured stderr.
        root.handlers[:] = handlers
        root.setLevel(level)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_replay_status_rebuild_timeline_graph_and_watch(
    run: Run, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ok_events = run.events[run.ok]

    code, out, _ = await cli(capsys, run, "replay", run.ok, "--json")
    assert code == 0
    assert orjson.loads(out) == [e.model_dump(mode="json") for e in ok_events]

    code, out, _ = await cli(capsys, run, "replay", run.ok)
    assert code == 0
    kinds = [getattr(e, "type", "") for e in ok_events]
    listed = [line.split()[3] for line in out.splitlines() if line[:4].strip().isdigit()]
    assert listed == kinds
    assert "step_retry_scheduled" in kinds
    payment = next(line for line in out.splitlines() if line.startswith("payment  |"))
    assert "x" in payment
    assert payment.rstrip("|").rstrip()[-1] == ">"

    code, out, _ = await cli(capsys, run, "status", run.ok, "--json")
    assert code == 0
    status = orjson.loads(out)
    assert status["status"] == "completed"
    assert status["seq"] == ok_events[-1].seq
    assert status["steps"]["payment"]["attempt"] == 2

    code, out, _ = await cli(capsys, run, "rebuild", "--json")
    report = orjson.loads(out)
    assert code == 0, report
    assert report["consistent"] is True
    assert report["mismatches"] == []
    assert report["undecodable"] == []
    assert report["sagas_rebuilt"] == 2
    assert report["by_status"] == {"compensated": 1, "completed": 1}
    assert report["events_read"] == sum(len(e) for e in run.events.values())
    assert report["partitions"] == 6

    code, out, _ = await cli(capsys, run, "rebuild")
    assert code == 0
    assert "consistent: 0 mismatches" in out

    target = tmp_path / "refused.html"
    code, out, _ = await cli(capsys, run, "timeline", run.refused, "--out", str(target))
    assert code == 0
    assert out.strip() == f"wrote {target} ({len(run.events[run.refused])} events)"
    check_page(ET.fromstring(target.read_text(encoding="utf-8")), run.events[run.refused])

    code, out, _ = await cli(capsys, run, "graph", "order", "--app", "tests.views.sample_app:sagas")
    assert code == 0
    assert all(step in out for step in ("location", "payment", "kitchen"))
    code, out, _ = await cli(
        capsys, run, "graph", "order", "--app", "tests.views.sample_app:sagas", "--json"
    )
    assert orjson.loads(out)["name"] == "order"

    code, out, _ = await cli(
        capsys, run, "watch", "--from-start", "--until-idle", "1", "--json", "--interval", "0.2"
    )
    assert code == 0
    updates = [orjson.loads(line) for line in out.splitlines()]
    for saga_id, events in run.events.items():
        mine = [u for u in updates if u["saga_id"] == saga_id]
        assert [u["seq"] for u in mine] == [e.seq for e in events]
    assert {u["saga_id"]: u["status"] for u in updates} == {
        run.ok: "completed",
        run.refused: "compensated",
    }

    code, out, err = await cli(capsys, run, "replay", "no-such-saga")
    assert code == 1
    assert "no events for saga 'no-such-saga'" in err


async def test_a_signal_for_no_saga_is_refused_before_it_is_sent(
    run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await cli(capsys, run, "signal", f"nobody-{run.prefix}", "cooked")
    assert code == 1
    assert "a signal for it would be dead-lettered" in err
    assert out == ""
