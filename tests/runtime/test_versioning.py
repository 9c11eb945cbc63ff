"""Safe versioning on the memory transport: a saga finishes on the definition it started on.

v1 sagas are held in flight, the coordinator is restarted with only v2 in its code, and the v1
sagas finish on v1 (from the definitions topic) while new sagas run v2. Different content
under a published name and version is refused, by `DefinitionStore.publish` and by a
coordinator's start.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from saga import Coordinator, Participant, SagaDefinition, SagaStatus, Step, StepContext
from saga.adapters.memory import MemoryBroker, MemoryTransport
from saga.core.state import SagaState
from saga.errors import DefinitionError
from saga.runtime.catalog import Catalog
from saga.runtime.definitions import DefinitionStore
from saga.runtime.ports import Outgoing, Topics

pytestmark = pytest.mark.anyio

PARTITIONS = 3
T = Topics("saga")


class Total(BaseModel):
    """A Python-only model: the topic's copy of a definition has none."""

    total: int


def _v1() -> SagaDefinition:
    return SagaDefinition(
        name="order",
        version=1,
        input_model=Total,
        steps=[
            Step(name="reserve", service="shop", action="reserve", compensation="release"),
            Step(
                name="charge",
                service="shop",
                action="charge",
                compensation="refund",
                depends_on=["reserve"],
            ),
            Step(name="ship", service="shop", action="ship", kind="pivot", depends_on=["charge"]),
        ],
    )


V1 = _v1()
V2 = SagaDefinition(
    name="order",
    version=2,
    steps=[
        Step(name="reserve", service="shop", action="reserve", compensation="release"),
        Step(
            name="charge",
            service="shop",
            action="charge",
            compensation="refund",
            depends_on=["reserve"],
        ),
        # New, before the pivot: a v1 saga decided on v2 would start it (and crash).
        Step(
            name="check",
            service="shop",
            action="check",
            compensation="uncheck",
            depends_on=["charge"],
        ),
        Step(name="ship", service="shop", action="ship", kind="pivot", depends_on=["check"]),
    ],
)


class Shop:
    """A participant whose ``charge`` waits until released, recording every call."""

    def __init__(self) -> None:
        self.calls: dict[str, list[str]] = defaultdict(list)
        self.release = anyio.Event()
        self.charging = 0
        self.all_held = anyio.Event()
        """Set once two held sagas are charging."""
        self.participant = Participant("shop")
        for action in ("reserve", "release", "refund", "check", "uncheck", "ship"):
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


async def test_v1_sagas_finish_on_v1_after_v1_left_the_code() -> None:
    transport = MemoryTransport(MemoryBroker(default_partitions=PARTITIONS))
    shop = Shop()
    held = ["held-1", "held-2"]
    async with anyio.create_task_group() as tg:
        await tg.start(partial(shop.participant.run, transport, partitions=PARTITIONS))
        async with Coordinator([V1], transport=transport, partitions=PARTITIONS) as first:
            for saga_id in held:
                await first.start("order", {"total": 3}, saga_id=saga_id)
            with anyio.fail_after(10):
                await shop.all_held.wait()
        # Only v2 is in the code now; v1 is in the definitions topic.
        async with Coordinator([V2], transport=transport, partitions=PARTITIONS) as second:
            topic_copy = second.catalog.by_digest(V1.digest)
            assert topic_copy is not None
            assert topic_copy.input_model is None  # not serialisable: the copy has none
            assert second.catalog.for_start("order") is V2
            shop.release.set()
            done = {saga_id: await second.wait(saga_id, 10) for saga_id in held}
            fresh = await second.start("order", {"total": 5}, saga_id="fresh")
            late = await second.wait(fresh, 10)
        tg.cancel_scope.cancel()
    for saga_id, state in done.items():
        assert state.status is SagaStatus.COMPLETED
        assert (state.version, state.digest) == (1, V1.digest)
        assert sorted(state.steps) == ["charge", "reserve", "ship"]
        assert shop.calls[saga_id] == ["reserve", "charge", "ship"]
    assert late.status is SagaStatus.COMPLETED
    assert (late.version, late.digest) == (2, V2.digest)
    assert shop.calls["fresh"] == ["reserve", "charge", "check", "ship"]
    assert transport.broker.records(T.dlq) == []


async def test_a_saga_whose_definition_is_known_nowhere_is_not_run_on_the_latest() -> None:
    transport = MemoryTransport(MemoryBroker(default_partitions=PARTITIONS))
    shop = Shop()
    held = ["held-1", "held-2"]
    async with anyio.create_task_group() as tg:
        await tg.start(partial(shop.participant.run, transport, partitions=PARTITIONS))
        async with Coordinator([V1], transport=transport, partitions=PARTITIONS) as first:
            for saga_id in held:
                await first.start("order", {"total": 3}, saga_id=saga_id)
            with anyio.fail_after(10):
                await shop.all_held.wait()
        # v1 is forgotten: neither in the code nor in the definitions topic.
        transport.broker.topics[T.definitions] = [[]]
        async with Coordinator([V2], transport=transport, partitions=PARTITIONS) as second:
            shop.release.set()
            with anyio.fail_after(10):
                while len(transport.broker.records(T.dlq)) < len(held):
                    await transport.broker.wait_for_change(0.1)
            states = [await second.status(saga_id) for saga_id in held]
        tg.cancel_scope.cancel()
    for saga_id, state in zip(held, states, strict=True):
        assert state is not None
        assert (state.status, state.digest) == (SagaStatus.RUNNING, V1.digest)
        assert state.steps["charge"].status.value == "running"  # its reply was set aside
        assert shop.calls[saga_id] == ["reserve", "charge"]  # v2's check never ran
    letters = [dict(r.headers) for r in transport.broker.records(T.dlq)]
    assert {h["saga.dlq.source"].split(b"/")[0] for h in letters} == {T.replies.encode()}
    assert {h["saga.dlq.reason"] for h in letters} == {b"undecidable"}
    for detail in (h["saga.dlq.detail"].decode() for h in letters):
        assert V1.digest in detail
        assert "deploy it with `saga deploy`" in detail


async def test_different_content_under_a_published_version_is_refused() -> None:
    transport = MemoryTransport()
    store = DefinitionStore(transport, T)
    first = await store.publish([V1])
    assert [d.digest for d in first.new] == [V1.digest]
    again = await store.publish([_v1()])  # the same content again: nothing written
    assert (again.new, [d.digest for d in again.existing]) == ([], [V1.digest])
    assert len(transport.broker.records(T.definitions)) == 1
    changed = SagaDefinition.from_dict({**V1.to_dict(), "description": "changed"})
    with pytest.raises(DefinitionError) as caught:
        await store.publish([changed])
    (problem,) = caught.value.problems
    assert "saga 'order', version 1" in problem
    assert V1.digest in problem
    assert changed.digest in problem
    assert len(transport.broker.records(T.definitions)) == 1
    # A coordinator with that content refuses to start, with the same message.
    with pytest.raises(DefinitionError) as refused:
        async with Coordinator([changed], transport=transport, partitions=PARTITIONS):
            pass
    assert list(refused.value.problems) == [problem]


async def test_a_loaded_definition_keeps_its_published_digest_and_bad_records_are_reported() -> (
    None
):
    transport = MemoryTransport()
    store = DefinitionStore(transport, T)
    await store.publish([V1, V2])
    async with transport.producer() as producer:
        await producer.send([Outgoing(T.definitions, b"junk@1", b"{not json")])
    published = {p.key: p for p in await store.read()}
    assert set(published) == {"order@1", "order@2"}
    assert published["order@1"].digest == V1.digest
    assert published["order@1"].models == ("input_model",)
    # The model's schema is part of the digest: the copy without it hashes differently.
    assert published["order@1"].definition.digest != V1.digest
    assert published["order@2"].definition.digest == V2.digest
    assert len(store.problems) == 1
    assert store.problems[0].startswith(f"{T.definitions}/0@2: not a definition record")
    assert [d.name for d in await store.load()] == ["order", "order"]


def _state(digest: str | None, version: int = 1) -> SagaState:
    return SagaState(
        saga_id="s-1",
        name="order",
        version=version,
        status=SagaStatus.RUNNING,
        input={},
        steps={},
        seq=3,
        started_at=0.0,
        updated_at=0.0,
        digest=digest,
    )


def test_the_catalog_finds_a_saga_by_digest_and_never_runs_an_unknown_one_on_the_latest() -> None:
    copy = SagaDefinition.from_dict(V1.to_dict())
    catalog = Catalog([V2], {V1.digest: copy})
    assert catalog.for_state(_state(V1.digest)) is copy
    assert catalog.for_state(_state(V2.digest, 2)) is V2
    assert catalog.for_start("order") is V2  # a version only in the topic never starts
    unknown = _state("0123456789abcdef")
    assert catalog.for_state(unknown) is None
    why = catalog.missing(unknown)
    assert why is not None
    assert "0123456789abcdef" in why
    assert "deploy it with `saga deploy`" in why
    # Sagas from before digests keep today's fallback: their version, else the latest.
    assert catalog.for_state(_state(None, 1)) is copy
    assert catalog.for_state(_state(None, 7)) is V2
    assert catalog.missing(_state(None, 7)) is None
    # Its own definitions take precedence over the topic's copies (they have the models).
    both = Catalog([V1, V2], {V1.digest: copy})
    assert both.for_state(_state(V1.digest)) is V1
    assert {d.digest for d in both.all()} == {V1.digest, V2.digest}
