"""Stuck sagas raise alerts, and operators finish them with the ``saga`` command.

The fragile saga has short retry policies. A retriable step that keeps failing, or a
compensation that keeps failing, makes the saga *stuck*: an `Alert` goes to ``<prefix>.alerts``
and to the coordinator's in-process alert hooks. An operator then repairs the cause (a row in the
services' ledger here) and runs ``saga retry``, or declares the step handled by hand with
``saga resolve``; ``saga cancel`` compensates a saga still running. Each ends completed or
compensated, and the ledger shows exactly the effects that the outcome implies.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from pydantic import TypeAdapter

from saga import Coordinator, SagaStatus
from saga.adapters.kafka import KafkaTransport
from saga.core.codec import decode
from saga.core.messages import Alert, CancelRejected, StepResolved
from saga.runtime.client import SagaClient
from saga.runtime.ports import Topics
from tests.chaos.app import sagas
from tests.chaos.cluster import ROOT, Cluster, ensure_topics
from tests.chaos.oracle import fold_problems, read_topic, scan_log, seq_problems
from tests.chaos.workload import canary

pytestmark = pytest.mark.kafka

PARTITIONS = 3

_alert_adapter: TypeAdapter[Alert] = TypeAdapter(Alert)


async def _saga_cli(command: str, saga_id: str, prefix: str, bootstrap: str) -> str:
    argv = [sys.executable, "-m", "saga", command, saga_id, "--prefix", prefix]
    argv += ["--bootstrap-servers", bootstrap]
    done = await anyio.run_process(argv, cwd=ROOT, check=False)
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, f"saga {command} {saga_id} exited {done.returncode}: {out}"
    return out


async def _until_compensating(coordinator: Coordinator, saga_id: str) -> None:
    """Waits until the cancel is recorded (the saga compensates once its step replies)."""
    for _ in range(600):
        state = await coordinator.status(saga_id)
        if state is not None and state.status is SagaStatus.COMPENSATING:
            return
        await anyio.sleep(0.05)
    raise AssertionError(f"saga {saga_id} was not compensating 30 s after `saga cancel`")


@pytest.mark.anyio
async def test_stuck_sagas_alert_and_operators_finish_them_from_the_cli(
    bootstrap: str,
    prefix: str,
    tmp_path: Path,
    transport: KafkaTransport,
    make_cluster: Callable[..., Cluster],
) -> None:
    await ensure_topics(transport, prefix, PARTITIONS)
    cluster = make_cluster(partitions=PARTITIONS)
    cluster.participants()
    ledger = cluster.ledger
    hooked: list[Alert] = []
    stuck_now = anyio.Event()

    async def hook(alert: Alert) -> None:
        hooked.append(alert)
        if len(hooked) >= 4:
            stuck_now.set()

    coordinator = Coordinator(
        sagas, transport=transport, prefix=prefix, partitions=PARTITIONS, alert_hooks=[hook]
    )
    async with coordinator, SagaClient(transport, prefix=prefix) as client:
        await canary(client)
        broken = {"f3": {"broken": True}}
        undo_broken = {"f2": {"business": True}, "f1": {"comp_broken": True}}
        ids = {
            "retry forward": await coordinator.start("fragile", {"plan": broken}),
            "resolve forward": await coordinator.start("fragile", {"plan": broken}),
            "retry backward": await coordinator.start("fragile", {"plan": undo_broken}),
            "resolve backward": await coordinator.start("fragile", {"plan": undo_broken}),
            "cancel": await coordinator.start("fragile", {"plan": {"f1": {"hold": 9}}}),
        }
        # Cancelled while its first step runs, before the pivot: the handler holds until the
        # cancel is recorded (within the step's 10 s timeout), however slow the CLI starts.
        cancel_out = await _saga_cli("cancel", ids["cancel"], prefix, bootstrap)
        await _until_compensating(coordinator, ids["cancel"])
        ledger.fix(ids["cancel"], "f1")
        with anyio.fail_after(60):
            await stuck_now.wait()
        # A stuck saga is final too: each is waited for past the seq it has before the CLI
        # re-drives it, or the wait could return the stuck state the request supersedes.
        after = dict.fromkeys(ids, 0)
        for name in ("retry forward", "resolve forward", "retry backward", "resolve backward"):
            state = await coordinator.status(ids[name])
            assert state is not None, name
            assert state.status is SagaStatus.STUCK, name
            after[name] = state.seq

        # The operator repairs what was broken, then re-drives or resolves from the CLI.
        ledger.fix(ids["retry forward"], "f3")
        ledger.fix(ids["retry backward"], "f1", "compensation")
        outputs = {}
        async with anyio.create_task_group() as tg:

            async def run(name: str, command: str) -> None:
                outputs[name] = await _saga_cli(command, ids[name], prefix, bootstrap)

            tg.start_soon(run, "retry forward", "retry")
            tg.start_soon(run, "resolve forward", "resolve")
            tg.start_soon(run, "retry backward", "retry")
            tg.start_soon(run, "resolve backward", "resolve")
        final = {
            name: await coordinator.wait(saga_id, 60, after=after[name])
            for name, saga_id in ids.items()
        }
        records = await read_topic(transport, Topics(prefix).alerts)
        alerts = [decode(_alert_adapter, r.value) for r in records]
    cluster.check()

    assert "retry requested" in outputs["retry forward"]
    assert "resolve requested" in outputs["resolve forward"]
    assert "cancel requested" in cancel_out
    assert {n: s.status for n, s in final.items()} == {
        "retry forward": SagaStatus.COMPLETED,
        "resolve forward": SagaStatus.COMPLETED,
        "retry backward": SagaStatus.COMPENSATED,
        "resolve backward": SagaStatus.COMPENSATED,
        "cancel": SagaStatus.COMPENSATED,
    }
    stuck = {ids[n] for n in ids if n != "cancel"}
    assert {a.saga_id for a in hooked} == stuck
    assert {a.saga_id for a in alerts} == stuck
    assert all(a.saga_name == "fragile" and a.steps for a in alerts)

    # What took place, from the services' own ledger.
    effects = ledger.effects()

    def did(name: str, step: str, phase: str = "action") -> int:
        return effects.get((ids[name], step, phase), 0)

    assert [did("retry forward", s) for s in ("f1", "f2", "f3")] == [1, 1, 1]
    assert [did("resolve forward", s) for s in ("f1", "f2", "f3")] == [1, 1, 0]  # by hand
    assert [did("retry backward", "f1"), did("retry backward", "f1", "compensation")] == [1, 1]
    assert [did("resolve backward", "f1"), did("resolve backward", "f1", "compensation")] == [
        1,
        0,  # undone by hand
    ]
    assert [did("cancel", "f1"), did("cancel", "f1", "compensation"), did("cancel", "f2")] == [
        1,
        1,
        0,
    ]
    assert not ledger.duplicates()

    scan = await scan_log(transport, prefix)
    assert not seq_problems(scan, ids.values()) + fold_problems(scan)
    resolved = [e for e in scan.events[ids["resolve forward"]] if isinstance(e, StepResolved)]
    assert [e.step for e in resolved] == ["f3"]
    assert not any(isinstance(e, CancelRejected) for e in scan.events[ids["cancel"]])
