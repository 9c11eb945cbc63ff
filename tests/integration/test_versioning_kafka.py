"""Safe versioning and the deploy gate on the real broker, through the ``saga`` command.

v1 is deployed with ``saga deploy`` and two v1 sagas are held in flight; ``saga definitions``
counts them; ``saga verify`` refuses a v2 that would change their next decision and passes
one that would not; then the coordinator restarts with only v2 in its code, and the v1 sagas
finish on v1 while a new saga runs v2. The coordinator and the participant run in this
process; the CLI runs in a worker thread (it calls `anyio.run` itself).
"""

from __future__ import annotations

import contextlib
import io
import logging
import uuid
from collections import defaultdict
from functools import partial
from typing import Any

import anyio
import orjson
import pytest

from saga import Coordinator, Participant, SagaDefinition, SagaStatus, Step, StepContext
from saga.adapters.kafka import KafkaTransport
from saga.cli import main

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(240)]

_RESERVE = Step(name="reserve", service="vshop", action="reserve", compensation="release")
_CHARGE = Step(
    name="charge", service="vshop", action="charge", compensation="refund", depends_on=["reserve"]
)
V1 = SagaDefinition(
    name="vorder",
    version=1,
    steps=[
        _RESERVE,
        _CHARGE,
        Step(name="ship", service="vshop", action="ship", kind="pivot", depends_on=["charge"]),
    ],
)
V2 = SagaDefinition(
    name="vorder",
    version=2,
    steps=[
        _RESERVE,
        _CHARGE,
        Step(
            name="check",
            service="vshop",
            action="check",
            compensation="uncheck",
            depends_on=["charge"],
        ),
        Step(name="ship", service="vshop", action="ship", kind="pivot", depends_on=["check"]),
    ],
)
"""Inserts a step before the pivot: the held sagas' next decision differs."""
V2_COMPATIBLE = SagaDefinition(
    name="vorder",
    version=2,
    description="adds a notification after everything",
    steps=[
        *V1.steps,
        Step(
            name="notify", service="vshop", action="notify", kind="retriable", depends_on=["ship"]
        ),
    ],
)
V1_CHANGED = SagaDefinition.from_dict({**V1.to_dict(), "description": "edited in place"})

# What ``saga ... --app tests.integration.test_versioning_kafka:APP_*`` loads.
APP_V1 = [V1]
APP_V2 = [V2]
APP_COMPATIBLE = [V2_COMPATIBLE]
APP_CHANGED = [V1_CHANGED]
MODULE = __name__


class Shop:
    """The participant; ``charge`` of a ``held-`` saga waits until released."""

    def __init__(self) -> None:
        self.calls: dict[str, list[str]] = defaultdict(list)
        self.release = anyio.Event()
        self.charging = 0
        self.all_held = anyio.Event()
        """Set once two held sagas are charging."""
        self.participant = Participant("vshop")
        for action in ("reserve", "release", "refund", "check", "uncheck", "ship", "notify"):
            self.participant.handler(action)(partial(self._plain, action))
        self.participant.handler("charge")(self._charge)

    async def _plain(self, action: str, payload: dict[str, Any], ctx: StepContext) -> None:
        self.calls[ctx.saga_id].append(action)

    async def _charge(self, payload: dict[str, Any], ctx: StepContext) -> None:
        self.calls[ctx.saga_id].append("charge")
        if ctx.saga_id.startswith("held"):
            self.charging += 1
            if self.charging == 2:
                self.all_held.set()
            await self.release.wait()


async def _saga(bootstrap: str, prefix: str, *args: str) -> tuple[int, str, str]:
    """Runs ``saga ARGS`` against the broker and prefix: exit status, stdout, stderr."""
    argv = [*args, "--prefix", prefix, "--bootstrap-servers", bootstrap]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out: list[str] = []
    err: list[str] = []

    def run() -> int:
        o, e = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            code = main(argv)
        out.append(o.getvalue())
        err.append(e.getvalue())
        return code

    try:
        code = await anyio.to_thread.run_sync(run)
    finally:
        # `main` configures the root logger (it is a process's entry point): put pytest's back.
        root.handlers[:] = handlers
        root.setLevel(level)
    return code, out[0], err[0]


async def test_deploy_definitions_verify_and_v1_sagas_finish_on_v1(bootstrap: str) -> None:
    prefix = f"versions-{uuid.uuid4().hex[:8]}"
    saga = partial(_saga, bootstrap, prefix)
    app = f"{MODULE}:APP_"

    code, out, _ = await saga("deploy", "--app", app + "V1")
    assert code == 0
    assert out.startswith(f"published      vorder@1 ({V1.digest})")
    code, out, _ = await saga("deploy", "--app", app + "V1")
    assert (code, out.split("\n")[0]) == (0, f"already there  vorder@1 ({V1.digest})")
    code, out, err = await saga("deploy", "--app", app + "CHANGED")
    assert code == 1
    assert "version 1" in err
    assert V1.digest in err
    assert V1_CHANGED.digest in err

    transport = KafkaTransport(bootstrap, deadline=20)
    shop = Shop()
    held = [f"held-{n}-{prefix}" for n in (1, 2)]
    async with anyio.create_task_group() as tg:
        await tg.start(partial(shop.participant.run, transport, prefix=prefix))
        async with Coordinator([V1], transport=transport, prefix=prefix) as first:
            for saga_id in held:
                await first.start("vorder", {"n": 1}, saga_id=saga_id)
            with anyio.fail_after(60):
                await shop.all_held.wait()

            code, out, _ = await saga("definitions", "--json")
            assert code == 0
            rows = orjson.loads(out)["definitions"]
            assert [(r["name"], r["version"], r["digest"], r["in_flight"]) for r in rows] == [
                ("vorder", 1, V1.digest, 2)
            ]

            code, out, err = await saga("verify", "--app", app + "V2", "--json")
            assert code == 1
            report = orjson.loads(out)
            assert report["checked"] == 2
            assert report["diverged"] == 2
            for item in report["sagas"]:
                assert item["in_flight"]
                assert {d["step"] for d in item["divergences"]} & {"check", "ship"}
            code, out, _ = await saga("verify", "--app", app + "COMPATIBLE")
            assert code == 0, out
            assert out.strip().endswith("2 sagas replayed (2 in flight): 0 diverge")

        # v1 leaves the code: the coordinator runs v2 only, the topic still has v1.
        code, out, _ = await saga("deploy", "--app", app + "V2")
        assert (code, out.split("\n")[0]) == (0, f"published      vorder@2 ({V2.digest})")
        async with Coordinator([V2], transport=transport, prefix=prefix) as second:
            shop.release.set()
            done = {saga_id: await second.wait(saga_id, 60) for saga_id in held}
            fresh = await second.start("vorder", {"n": 2}, saga_id=f"fresh-{prefix}")
            late = await second.wait(fresh, 60)
        tg.cancel_scope.cancel()

    for saga_id, state in done.items():
        assert state.status is SagaStatus.COMPLETED
        assert (state.version, state.digest) == (1, V1.digest)
        assert shop.calls[saga_id] == ["reserve", "charge", "ship"]
    assert (late.status, late.version) == (SagaStatus.COMPLETED, 2)
    assert shop.calls[fresh] == ["reserve", "charge", "check", "ship"]

    code, out, _ = await saga("definitions", "--json")
    rows = orjson.loads(out)["definitions"]
    assert [(r["version"], r["in_flight"]) for r in rows] == [(1, 0), (2, 0)]
    # Finished sagas are replayed too (a sample): v2 would have run them differently.
    code, out, _ = await saga("verify", "--app", app + "V2", "--sample", "5")
    assert code == 1
    assert "finished" in out
