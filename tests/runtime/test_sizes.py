"""No single saga wedges its partition: sizes are checked before a commit, failing batches split.

On the memory broker with Kafka's default record limit (`MemoryBroker.max_message_bytes`), so
that a record too large fails its transaction as it would on a real broker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from saga import Participant, SagaDefinition, SagaStatus, Step, StepContext
from saga.core.messages import StepFailedEvent
from saga.runtime.ports import Outgoing
from saga.testing import SagaHarness

pytestmark = pytest.mark.anyio

KAFKA_DEFAULT = 1_048_588  # message.max.bytes

ORDER = SagaDefinition(
    name="order",
    steps=[
        Step(name="reserve", service="shop", action="reserve", compensation="release"),
        Step(name="charge", service="shop", action="charge", kind="pivot", depends_on=["reserve"]),
    ],
)


def shop() -> Participant:
    p = Participant("shop")

    @p.handler("reserve")
    async def reserve(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"echo": payload.get("blob", "")}  # a large input comes back as a large output

    @p.handler("release")
    async def release(payload: dict[str, Any], ctx: StepContext) -> None:
        return None

    @p.handler("charge")
    async def charge(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"ok": True}

    return p


SHOP = shop()


def harness() -> SagaHarness:
    h = SagaHarness([ORDER], [SHOP], partitions=1)  # one partition: every saga shares it
    h.broker.max_message_bytes = KAFKA_DEFAULT
    return h


async def test_an_output_too_large_to_keep_fails_its_step_and_the_others_go_on() -> None:
    async with harness() as h:
        big = await h.start("order", {"blob": "x" * 600_000})  # the snapshot would be ~1.2 MB
        small = await h.start("order", {"blob": "y"})
        assert (await h.run_until_done(small)).status is SagaStatus.COMPLETED
        state = await h.run_until_done(big)
        assert state.status is SagaStatus.COMPENSATED
        failed = [e for e in h.events(big) if isinstance(e, StepFailedEvent)]
        assert [(e.step, e.error.type, e.error.business) for e in failed] == [
            ("reserve", "OutputTooLarge", True)
        ]
        assert "over" in failed[0].error.message
        assert h.coordinator.stats.failed_transactions == 0
        assert h.calls("shop").count("charge") == 1  # the small saga's only


async def test_a_start_whose_state_cannot_be_stored_is_set_aside_with_a_reason() -> None:
    async with harness() as h:
        # Under the request limit (1 MiB), over what one record of its state may be.
        huge = await h.start("order", {"blob": "z" * 1_010_000})
        small = await h.start("order", {"blob": "y"})
        assert (await h.run_until_done(small)).status is SagaStatus.COMPLETED
        assert h.events(huge) == []
        reasons = [d["saga.dlq.reason"] for d in h.dead_letters()]
        assert reasons == [b"too_large"]
        assert h.coordinator.stats.failed_transactions == 0


async def test_a_batch_whose_transaction_keeps_failing_is_split_until_the_input_is_found() -> None:
    def poisoned(records: Sequence[Outgoing]) -> str | None:
        # Whatever the engine writes about this saga (its dead letter aside), the broker
        # refuses the transaction, as it would refuse a record it cannot take.
        if any(b"refused-by-the-broker" in (r.value or b"") for r in records if r.topic != dlq):
            return "a record the broker refuses"
        return None

    dlq = "saga.dlq"
    async with harness() as h:
        h.broker.transaction_faults.append(poisoned)
        ids = [await h.start("order", {"blob": f"ok-{n}"}) for n in range(3)]
        bad = await h.start("order", {"blob": "refused-by-the-broker"})
        ids += [await h.start("order", {"blob": f"ok-{n}"}) for n in range(3, 6)]
        for saga_id in ids:
            assert (await h.run_until_done(saga_id)).status is SagaStatus.COMPLETED
        assert h.events(bad) == []
        dead = h.dead_letters()
        assert [d["saga.dlq.reason"] for d in dead] == [b"transaction_failed"]
        assert b"kept failing" in dead[0]["saga.dlq.detail"]
        # Halving 7 inputs to 1, two tries a size, then set aside: a handful, not forever.
        assert 2 <= h.coordinator.stats.failed_transactions <= 10
