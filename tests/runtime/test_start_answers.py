"""A start always gets an answer: an unknown name or an invalid input is a `rejected` saga (not
a dead letter nobody asked about), and a start for an id that exists follows the id-reuse
policy (``if_exists``) and is recorded as an event of the existing saga."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from saga import SagaClient, SagaDefinition, SagaStatus, Step
from saga.core.codec import encode
from saga.core.messages import SagaRejected, StartIgnored, StartRefused, StartSaga
from saga.errors import SagaExists
from saga.runtime.ports import Outgoing
from saga.testing import SagaHarness
from tests.runtime.test_harness import TRIP, services

pytestmark = pytest.mark.anyio


class Who(BaseModel):
    who: str


TYPED = SagaDefinition(
    name="typed",
    steps=[Step(name="flight", service="air", action="book", compensation="unbook")],
    input_model=Who,
)


def _client(h: SagaHarness) -> SagaClient:
    return SagaClient(
        h.transport, prefix=h.coordinator.topics.prefix, clock=h.clock, partitions=h.partitions
    )


def _requests(h: SagaHarness) -> int:
    return len(h.broker.records(h.coordinator.topics.requests))


async def test_a_start_of_an_unknown_name_is_a_rejected_saga_with_its_reason() -> None:
    async with SagaHarness([TRIP], services()) as h, _client(h) as client:
        saga_id = await client.start("trpi", {"who": "ada"}, "typo-1")
        state = await h.run_until_done(saga_id)
        assert state.status is SagaStatus.REJECTED
        assert state.reason == "no saga definition named 'trpi'"
        assert (state.name, state.input) == ("trpi", {"who": "ada"})
        # Read back from the snapshots (as another process would) and by waiting.
        stored = await client.status(saga_id)
        assert stored == state
        assert (await client.wait(saga_id, 5, poll=0.01)).status is SagaStatus.REJECTED
        (event,) = h.events(saga_id)
        assert isinstance(event, SagaRejected)
        assert h.dead_letters() == []
        assert h.calls("air") == []


async def test_a_start_with_invalid_input_is_rejected_and_the_id_can_be_started_again() -> None:
    async with SagaHarness([TYPED], services()) as h, _client(h) as client:
        await client.start("typed", {"who": 7}, "t-1")
        rejected = await h.run_until_done("t-1")
        assert rejected.status is SagaStatus.REJECTED
        assert rejected.reason is not None
        assert rejected.reason.startswith("saga 'typed': input is invalid: who")
        assert h.calls("air") == []
        # Nothing ran: a valid request starts it.
        await client.start("typed", {"who": "ada"}, "t-1")
        state = await h.run_until_done("t-1", after=rejected.seq)
        assert state.status is SagaStatus.COMPLETED
        assert h.calls("air") == ["book"]
        assert [e.type for e in h.events("t-1")][:2] == ["saga_rejected", "saga_started"]
        assert h.dead_letters() == []


async def test_a_duplicate_start_keeps_the_saga_and_is_in_its_log() -> None:
    async with SagaHarness([TRIP], services()) as h:
        await h.start("trip", {"who": "fi"}, saga_id="same")
        done = await h.run_until_done("same")
        await h.start("trip", {"who": "someone else"}, saga_id="same")
        state = await h.run_until_done("same", after=done.seq)
        assert state.status is SagaStatus.COMPLETED
        assert state.input == {"who": "fi"}
        assert state.finished_at == done.finished_at
        last = h.events("same")[-1]
        assert isinstance(last, StartIgnored)
        assert last.differs == ["input"]
        assert "the existing saga is kept" in last.reason
        assert h.calls("air") == ["book"]


async def test_refuse_answers_the_caller_before_anything_is_written() -> None:
    async with SagaHarness([TRIP], services()) as h, _client(h) as client:
        await client.start("trip", {"who": "fi"}, "mine")
        done = await h.run_until_done("mine")
        written = _requests(h)
        with pytest.raises(SagaExists) as caught:
            await client.start("trip", {"who": "gu"}, "mine", if_exists="refuse")
        assert "'mine'" in str(caught.value)
        assert "another input" in str(caught.value)
        assert _requests(h) == written
        # The same request again is no conflict: it is sent, and kept as a duplicate.
        assert await client.start("trip", {"who": "fi"}, "mine", if_exists="refuse") == "mine"
        state = await h.run_until_done("mine", after=done.seq)
        last = h.events("mine")[-1]
        assert isinstance(last, StartIgnored)
        assert last.differs == []
        assert state.status is SagaStatus.COMPLETED


async def test_refuse_is_decided_by_the_coordinator_when_two_starts_race() -> None:
    async with SagaHarness([TRIP], services()) as h:
        topic = h.coordinator.topics.requests
        first, second = (
            StartSaga(
                message_id=f"m-{n}",
                saga_id="raced",
                saga_name="trip",
                input={"who": who},
                at=h.clock.now(),
                if_exists="refuse",
            )
            for n, who in ((1, "fi"), (2, "gu"))
        )
        # Both are written before the coordinator has recorded either (no client check).
        h.broker.append([Outgoing(topic, b"raced", encode(m)) for m in (first, second)])
        state = await h.run_until_done("raced")
        assert state.input == {"who": "fi"}
        refused = [e for e in h.events("raced") if isinstance(e, StartRefused)]
        assert len(refused) == 1
        assert (refused[0].message_id, refused[0].differs) == ("m-2", ["input"])
        assert "refused (if_exists='refuse')" in refused[0].reason
        assert state.status is SagaStatus.COMPLETED
        assert h.calls("air") == ["book"]


async def test_the_views_show_rejections_duplicates_and_the_digest() -> None:
    import io

    from saga.cli import render
    from saga.views.timeline import page
    from saga.views.watch import watch

    async with SagaHarness([TYPED], services()) as h, _client(h) as client:
        await client.start("typed", {"who": 7}, "v-1")
        rejected = await h.run_until_done("v-1")
        await client.start("typed", {"who": "ada"}, "v-1")
        done = await h.run_until_done("v-1", after=rejected.seq)
        await client.start("typed", {"who": "bo"}, "v-1")  # a duplicate, recorded
        state = await h.run_until_done("v-1", after=done.seq)
        events = h.events("v-1")
        text = render.status(rejected)
        assert "status    rejected" in text
        assert f"reason    {rejected.reason}" in text
        assert f"digest    {TYPED.digest}" in render.status(state)
        history = render.replay(events)
        assert "saga_rejected" in history
        assert "start_ignored" in history
        assert f"digest    {TYPED.digest}" in history
        assert "X start rejected" in history
        assert "status-completed" in page(events)
        assert TYPED.digest in page(events)
        progress = await watch(
            h.transport, h.coordinator.topics, out=io.StringIO(), from_start=True, until_idle=0.2
        )
        # Two final statuses reached (rejected, then completed); the duplicate is not a third.
        assert progress.finished == 2
        assert progress.totals()["rejected"] == 0
        assert progress.totals()["completed"] == 1
    assert render.status(state).count("digest") == 1
