"""On the real broker: what the engine accepts it keeps, and no saga wedges its partition.

Reproduced before the fixes: a 600 KB input echoed back as a step's output made the saga's
snapshot ~1.2 MB; every transaction of its partition failed on the broker's record limit and
was retried without end, and every other saga of the partition stopped.
"""

from __future__ import annotations

import uuid

import pytest

from saga import SagaStatus
from saga.adapters.kafka import KafkaTransport
from saga.core.codec import DEFAULT_LIMITS
from saga.core.messages import StepFailedEvent
from saga.runtime.client import SagaClient
from saga.runtime.coordinator import Coordinator
from tests.runtime.test_accepted_survives import nested
from tests.runtime.test_sizes import ORDER, SHOP

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(120)]


async def test_an_oversized_output_fails_its_saga_and_the_partition_goes_on(bootstrap: str) -> None:
    prefix = f"large-{uuid.uuid4().hex[:8]}"
    transport = KafkaTransport(bootstrap, deadline=20)
    async with (
        Coordinator([ORDER], transport=transport, prefix=prefix, partitions=1) as coordinator,
        SHOP.serving(transport, prefix=prefix, partitions=1),
        SagaClient(transport, prefix=prefix, partitions=1) as client,
    ):
        big = await coordinator.start("order", {"blob": "x" * 600_000})
        small = await coordinator.start("order", {"blob": "y"})  # the same (only) partition
        assert (await coordinator.wait(small, 60)).status is SagaStatus.COMPLETED
        assert (await coordinator.wait(big, 60)).status is SagaStatus.COMPENSATED
        events = await client.events(big)
        failed = [e for e in events if isinstance(e, StepFailedEvent)]
        assert [(e.step, e.error.type) for e in failed] == [("reserve", "OutputTooLarge")]
        assert coordinator.stats.failed_transactions == 0


async def test_an_input_at_the_depth_limit_survives_a_coordinator_restart(bootstrap: str) -> None:
    # Reproduced before the fix: the snapshot nested the input deeper than the decoder's bound,
    # so status crashed, and after a restart the snapshot was dead-lettered and the saga gone.
    prefix = f"deep-{uuid.uuid4().hex[:8]}"
    transport = KafkaTransport(bootstrap, deadline=20)
    deepest = nested(DEFAULT_LIMITS.max_depth - 2)  # under "deep": the input is 31 levels
    async with SHOP.serving(transport, prefix=prefix, partitions=1):
        async with Coordinator([ORDER], transport=transport, prefix=prefix, partitions=1) as c:
            saga_id = await c.start("order", {"blob": "d", "deep": deepest})
            before = await c.wait(saga_id, 60)
        assert before.status is SagaStatus.COMPLETED
        async with (
            Coordinator([ORDER], transport=transport, prefix=prefix, partitions=1) as again,
            SagaClient(transport, prefix=prefix, partitions=1) as client,
        ):
            assert await client.status(saga_id) == before
            assert await again.wait(saga_id, 60) == before
            assert again.stats.dead_letters == {}
