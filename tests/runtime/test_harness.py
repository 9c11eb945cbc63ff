"""The coordinator and participants, for real, on the memory transport with virtual time."""

from __future__ import annotations

from typing import Any

import pytest

from saga import (
    Participant,
    RetryPolicy,
    SagaDefinition,
    SagaStatus,
    Step,
    StepContext,
    StepFailed,
    StepStatus,
)
from saga.core.messages import StepRetryScheduled, StepStarted
from saga.testing import SagaHarness

pytestmark = pytest.mark.anyio

TRIP = SagaDefinition(
    name="trip",
    steps=[
        Step(name="flight", service="air", action="book", compensation="unbook", timeout=30),
        Step(
            name="hotel",
            service="stay",
            action="book",
            compensation="unbook",
            depends_on=["flight"],
            retry=RetryPolicy(max_attempts=3, initial_backoff=60, max_backoff=600, jitter=0),
            timeout=30,
        ),
        Step(name="pay", service="bank", action="capture", kind="pivot", depends_on=["hotel"]),
        Step(
            name="mail",
            service="mail",
            action="send",
            kind="retriable",
            depends_on=["pay"],
            retry=RetryPolicy(max_attempts=4, initial_backoff=1),
        ),
    ],
)


def services() -> list[Participant]:
    air, stay, bank, mail = (Participant(s) for s in ("air", "stay", "bank", "mail"))
    for p in (air, stay):

        @p.handler("book")
        async def book(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
            return {"ref": f"{ctx.step}-{payload['who']}"}

        @p.handler("unbook")
        def unbook(payload: dict[str, Any], ctx: StepContext) -> None:
            assert payload["output"] is None or payload["output"]["ref"].startswith(ctx.step)

    @bank.handler("capture")
    async def capture(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        if payload.get("broke"):
            raise StepFailed("insufficient funds")
        return {"captured": True}

    @mail.handler("send")
    async def send(payload: dict[str, Any], ctx: StepContext) -> None:
        return None

    return [air, stay, bank, mail]


async def test_happy_path_completes_and_records_outputs() -> None:
    async with SagaHarness([TRIP], services()) as h:
        saga_id = await h.start("trip", {"who": "ada"})
        state = await h.run_until_done(saga_id)
    assert state.status is SagaStatus.COMPLETED
    assert state.steps["hotel"].output == {"ref": "hotel-ada"}
    assert state.percent_complete() == 100


async def test_pivot_business_failure_compensates_in_reverse_order() -> None:
    async with SagaHarness([TRIP], services()) as h:
        saga_id = await h.start("trip", {"who": "bo", "broke": True})
        state = await h.run_until_done(saga_id)
        assert state.status is SagaStatus.COMPENSATED
        assert h.calls("air") == ["book", "unbook"]
        assert h.calls("stay") == ["book", "unbook"]
        kinds = [(e.type, getattr(e, "step", None)) for e in h.events(saga_id)]
    undo = [s for t, s in kinds if t == "compensation_succeeded"]
    assert undo == ["hotel", "flight"]
    assert state.steps["pay"].status is StepStatus.FAILED


async def test_backoff_of_a_minute_takes_no_real_time() -> None:
    async with SagaHarness([TRIP], services()) as h:
        h.fail("stay", "book", times=2)
        start = h.clock.now()
        saga_id = await h.start("trip", {"who": "cy"})
        state = await h.run_until_done(saga_id)
        retries = [e for e in h.events(saga_id) if isinstance(e, StepRetryScheduled)]
    assert state.status is SagaStatus.COMPLETED
    assert state.steps["hotel"].attempt == 3
    assert [r.retry_at - r.at for r in retries] == [60.0, 120.0]
    assert h.clock.now() - start >= 180


async def test_lost_command_times_out_and_is_retried() -> None:
    async with SagaHarness([TRIP], services()) as h:
        h.drop_commands("stay", 1)
        saga_id = await h.start("trip", {"who": "di"})
        state = await h.run_until_done(saga_id)
        started = [
            e.attempt for e in h.events(saga_id) if isinstance(e, StepStarted) and e.step == "hotel"
        ]
    assert state.status is SagaStatus.COMPLETED
    assert started == [1, 2]


async def test_exhausted_retriable_step_is_stuck_with_alert_and_can_be_retried() -> None:
    async with SagaHarness([TRIP], services()) as h:
        h.fail("mail", "send")
        saga_id = await h.start("trip", {"who": "ed"})
        state = await h.run_until_done(saga_id)
        assert state.status is SagaStatus.STUCK
        assert [a.saga_id for a in h.alerts] == [saga_id]
        assert h.alerts[0].steps == ["mail"]
        h.fail("mail", "send", times=0)
        seq = await h.retry(saga_id)
        assert seq == state.seq
        state = await h.run_until_done(saga_id, after=seq)
    assert state.status is SagaStatus.COMPLETED
    assert state.steps["mail"].attempt == 5


async def test_duplicate_start_runs_once() -> None:
    async with SagaHarness([TRIP], services()) as h:
        await h.start("trip", {"who": "fi"}, saga_id="same")
        await h.start("trip", {"who": "fi"}, saga_id="same")
        state = await h.run_until_done("same")
        assert state.status is SagaStatus.COMPLETED
        assert h.calls("air") == ["book"]
        # The second start changed nothing, and the log says so (id-reuse policy "return").
        kinds = [e.type for e in h.events("same")]
        assert kinds.count("saga_started") == 1
        assert kinds.count("start_ignored") == 1
        assert h.coordinator.stats.ignored == 0


async def test_poison_requests_go_to_the_dead_letter_topic_and_the_partition_flows() -> None:
    from saga.runtime.ports import Outgoing

    async with SagaHarness([TRIP], services()) as h:
        topic = h.coordinator.topics.requests
        h.broker.append(
            [
                Outgoing(topic, b"k", b"{not json", partition=0),
                Outgoing(topic, b"k", b"\xff\xfe", partition=0),
                Outgoing(topic, b"k", b'{"v": 99, "type": "start"}', partition=0),
                Outgoing(topic, b"k", b'{"v": 1, "type": "start", "bogus": 1}', partition=0),
            ]
        )
        saga_id = await h.start("trip", {"who": "gu"})
        state = await h.run_until_done(saga_id)
        reasons = sorted(d["saga.dlq.reason"].decode() for d in h.dead_letters())
    assert state.status is SagaStatus.COMPLETED
    assert reasons == ["invalid_json", "invalid_message", "invalid_utf8", "unknown_schema_version"]


async def test_coordinator_restart_resumes_from_snapshots_and_log() -> None:
    async with SagaHarness([TRIP], services()) as h:
        h.fail("stay", "book", times=1)
        saga_id = await h.start("trip", {"who": "ha"})
        for _ in range(200):  # until the hotel's retry is scheduled (60 virtual seconds away)
            state = await h.status(saga_id)
            if state and state.steps["hotel"].status is StepStatus.RETRYING:
                break
            await h.broker.wait_for_change(0.02)
        await h.restart_coordinator()
        recovered = await h.status(saga_id)
        assert recovered is not None
        assert recovered.steps["hotel"].status is StepStatus.RETRYING
        state = await h.run_until_done(saga_id)
        assert h.calls("air") == ["book"]
    assert state.status is SagaStatus.COMPLETED
