"""Whatever `start` accepts survives a coordinator restart with the same state.

Decoding bounds (`saga.core.codec.Limits`) are for foreign input. What the engine writes itself
nests what it accepted deeper (a snapshot holds the state, which holds the input and each
step's output), so it is read back with the engine's own, wider bounds: a saga accepted at the
edge of the limits must not become unreadable once it is stored.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saga import Participant, SagaDefinition, Step, StepContext
from saga.core.codec import DEFAULT_LIMITS
from saga.runtime.client import SagaClient
from saga.testing import SagaHarness

pytestmark = pytest.mark.anyio

ECHO = SagaDefinition(
    name="echo",
    steps=[
        Step(name="first", service="echo", action="echo", compensation="forget"),
        Step(name="last", service="echo", action="echo", kind="pivot", depends_on=["first"]),
    ],
)


def echo() -> Participant:
    p = Participant("echo")

    @p.handler("echo")
    async def run(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return payload  # stored in the state, the output sits four levels below a snapshot

    @p.handler("forget")
    async def forget(payload: dict[str, Any], ctx: StepContext) -> None:
        return None

    return p


ECHO_SERVICE = echo()


def nested(depth: int) -> dict[str, Any]:
    """An object of exactly ``depth`` levels."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


async def _roundtrip(h: SagaHarness, saga_input: dict[str, Any]) -> None:
    saga_id = await h.start("echo", saga_input)
    before = await h.run_until_done(saga_id)
    await h.restart_coordinator()
    after = await h.status(saga_id)
    assert after == before
    # A client reads the same state from the snapshots, and the log from the start.
    async with SagaClient(h.transport, partitions=3) as client:
        assert await client.status(saga_id) == before
        assert len(await client.events(saga_id)) == before.seq


async def test_an_input_at_the_depth_limit_survives_a_restart() -> None:
    # The request itself is one level: its input may be max_depth - 1 deep.
    deepest = nested(DEFAULT_LIMITS.max_depth - 1)
    async with SagaHarness([ECHO], [ECHO_SERVICE]) as h:
        await _roundtrip(h, deepest)
        assert h.dead_letters() == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    saga_input=st.dictionaries(st.text(max_size=5), json_values, max_size=4),
    depth=st.integers(1, DEFAULT_LIMITS.max_depth - 2),
)
def test_whatever_start_accepts_survives_a_restart(saga_input: dict[str, Any], depth: int) -> None:
    async def run() -> None:
        async with SagaHarness([ECHO], [ECHO_SERVICE]) as h:
            await _roundtrip(h, {**saga_input, "deep": nested(depth)})
            assert h.dead_letters() == []

    anyio.run(run)
