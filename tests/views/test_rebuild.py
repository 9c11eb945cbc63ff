"""`rebuild`: the log, folded again, must give the snapshots; differences are reported."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import pytest

from saga.core.codec import encode
from saga.core.messages import Snapshot
from saga.core.state import SagaStatus
from saga.runtime.ports import Outgoing, Record
from saga.testing import SagaHarness
from saga.views.rebuild import diff, parse_time, rebuild
from tests.views.support import ORDERS, append, harness, run_orders, snapshot_partition

pytestmark = pytest.mark.anyio


def log_records(h: SagaHarness) -> list[Record]:
    return h.broker.records(h.coordinator.topics.log)


async def test_a_clean_log_rebuilds_every_saga_without_a_mismatch() -> None:
    async with harness() as h:
        await run_orders(h)
        report = await rebuild(h.transport, h.coordinator.topics)
        events = sum(len(h.events(saga_id)) for saga_id in ORDERS)
        states = {saga_id: await h.status(saga_id) for saga_id in ORDERS}

    assert report.consistent
    assert report.mismatches == []
    assert report.undecodable == []
    assert report.illegal == []
    assert report.not_rebuilt == []
    assert sorted(report.states) == sorted(ORDERS)
    assert report.states == states
    assert report.events_read == events == report.records_read
    assert report.by_status == {"compensated": 1, "completed": 2}
    assert report.events_per_second > 0
    data = report.to_json()
    assert data["sagas_rebuilt"] == 3
    assert data["mismatches"] == []
    assert data["start_offsets"] == {"0": 0, "1": 0, "2": 0}


async def test_a_doctored_snapshot_is_a_mismatch_naming_the_fields() -> None:
    async with harness() as h:
        await run_orders(h)
        state = await h.status("order-ok")
        assert state is not None
        steps = dict(state.steps)
        steps["payment"] = steps["payment"].model_copy(update={"attempt": 1})
        forged = state.model_copy(update={"status": SagaStatus.COMPENSATED, "steps": steps})
        snap = Snapshot(saga_id="order-ok", state=forged.model_dump(mode="json"))
        topic = h.coordinator.topics.snapshots
        p = snapshot_partition(h, "order-ok")
        append(h, [Outgoing(topic, b"order-ok", encode(snap), partition=p)])
        report = await rebuild(h.transport, h.coordinator.topics)

    assert not report.consistent
    (mismatch,) = report.mismatches
    assert mismatch.saga_id == "order-ok"
    assert mismatch.fields == ("status", "steps.payment.attempt")
    assert mismatch.rebuilt_seq == mismatch.snapshot_seq == state.seq
    assert report.to_json()["mismatches"][0]["fields"] == ["status", "steps.payment.attempt"]


async def test_undecodable_log_records_are_listed_and_the_rest_still_rebuilds() -> None:
    async with harness() as h:
        await run_orders(h)
        log = h.coordinator.topics.log
        append(h, [Outgoing(log, b"order-ok", b"{not json", partition=0)])
        append(h, [Outgoing(log, b"order-ok", None, partition=1)])
        report = await rebuild(h.transport, h.coordinator.topics)

    assert [(b.partition, b.key) for b in report.undecodable] == [(0, "order-ok"), (1, "order-ok")]
    assert "tombstone" in report.undecodable[1].reason
    assert report.mismatches == []
    assert len(report.states) == 3
    assert report.records_read == report.events_read + 2


async def test_an_event_that_does_not_fold_is_reported_as_illegal() -> None:
    async with harness() as h:
        await run_orders(h, ["order-plain"])
        (last,) = [r for r in log_records(h) if r.key == b"order-plain"][-1:]
        # The same event again: a duplicate seq, which a correct coordinator never writes.
        append(h, [Outgoing(last.topic, last.key, last.value, partition=last.partition)])
        report = await rebuild(h.transport, h.coordinator.topics)

    (bad,) = report.illegal
    assert bad.key == "order-plain"
    assert "does not follow" in bad.reason
    assert not report.consistent


async def test_from_an_offset_sagas_continue_from_older_snapshot_versions() -> None:
    async with harness() as h:
        await run_orders(h)
        report = await rebuild(h.transport, h.coordinator.topics, from_offset=2)

    # The memory broker does not compact, so the snapshot just before the window is there.
    assert report.not_rebuilt == []
    assert report.mismatches == []
    assert report.from_snapshot >= 1
    assert report.start_offsets == {0: 2, 1: 2, 2: 2}
    assert report.events_read == sum(r.offset >= 2 for r in log_records(h))


async def test_from_an_offset_after_compaction_sagas_that_began_earlier_are_not_rebuilt() -> None:
    async with harness() as h:
        await run_orders(h)
        topic = h.coordinator.topics.snapshots
        for p, part in enumerate(h.broker.topics[topic]):  # compaction: the last per key
            last = {r.key: r for r in part}
            h.broker.topics[topic][p] = sorted(last.values(), key=lambda r: r.offset)
        report = await rebuild(h.transport, h.coordinator.topics, from_offset=2)

    started_before = {r.key.decode() for r in log_records(h) if r.offset < 2 and r.key is not None}
    assert started_before
    assert {n.saga_id for n in report.not_rebuilt} == started_before
    assert all("precede the window" in n.reason for n in report.not_rebuilt)
    assert report.mismatches == []


async def test_from_a_time_only_later_records_are_read() -> None:
    async with harness() as h:
        await run_orders(h, ["order-ok", "order-refused"])
        await anyio.sleep(0.01)
        since = time.time()
        await anyio.sleep(0.01)
        await run_orders(h, ["order-plain"])
        report = await rebuild(h.transport, h.coordinator.topics, from_time=since)
        everything = await rebuild(h.transport, h.coordinator.topics, from_time=0.0)

    assert sorted(report.states) == ["order-plain"]
    assert report.events_read == len(h.events("order-plain"))
    assert report.mismatches == []  # older sagas are out of the window, not missing
    assert everything.events_read == len(log_records(h))
    assert sorted(everything.states) == sorted(ORDERS)


def test_a_snapshot_missing_a_field_differs_in_that_field() -> None:
    from saga.core.state import SagaState

    state = SagaState(
        saga_id="s",
        name="n",
        version=1,
        status="running",
        input={},
        steps={},
        seq=1,
        started_at=1.0,
        updated_at=1.0,
    )
    other = {**state.model_dump(mode="json"), "reason": "why"}
    assert diff(state, other) == ("reason",)
    assert diff(state, {"nonsense": 1})[0].startswith("<invalid snapshot")


def test_times_without_a_zone_are_utc() -> None:
    assert parse_time("1970-01-01T00:01:40") == 100.0
    assert parse_time("1970-01-01T01:01:40+01:00") == 100.0
    assert parse_time("1970-01-01T00:01:40Z") == 100.0
    with pytest.raises(ValueError, match="Invalid isoformat"):
        parse_time("yesterday")


class LaggingLog:
    """A transport whose first read of each log partition stops at ``cut``: as if the
    coordinator wrote the rest just after the rebuild read the log, and before the snapshots."""

    def __init__(self, h: SagaHarness, cut: dict[int, int]) -> None:
        self.inner = h.transport
        self.log = h.coordinator.topics.log
        self.cut = cut
        self.seen: set[int] = set()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def read(self, topic: str, partition: int, start: int = 0) -> AsyncIterator[Record]:
        first = topic == self.log and partition not in self.seen
        if topic == self.log:
            self.seen.add(partition)
        async for record in self.inner.read(topic, partition, start):
            if first and record.offset >= self.cut.get(partition, record.offset + 1):
                return
            yield record


def compact(h: SagaHarness) -> None:
    """Keeps only the latest snapshot per key, as Kafka's log cleaner eventually does."""
    topic = h.coordinator.topics.snapshots
    for p, part in enumerate(h.broker.topics[topic]):
        last = {r.key: r for r in part}
        h.broker.topics[topic][p] = sorted(last.values(), key=lambda r: r.offset)


async def test_sagas_that_move_on_while_the_log_is_read_are_unverified_not_mismatched() -> None:
    async with harness() as h:
        await run_orders(h, ["order-ok", "order-refused"])
        await run_orders(h, ["order-plain"])
        compact(h)
        records = log_records(h)
        last_ok = max(r.offset for r in records if r.key == b"order-ok")
        (p_ok,) = {r.partition for r in records if r.key == b"order-ok"}
        (p_plain,) = {r.partition for r in records if r.key == b"order-plain"}
        cut = {p_ok: last_ok}
        cut[p_plain] = min(
            [cut.get(p_plain, 10**9)] + [r.offset for r in records if r.key == b"order-plain"]
        )
        lagging = await rebuild(LaggingLog(h, cut), h.coordinator.topics)  # type: ignore[arg-type]

    assert lagging.mismatches == []
    assert lagging.unverified == ["order-ok", "order-plain"]
    assert lagging.consistent


async def test_a_snapshot_ahead_of_a_log_that_did_not_grow_is_a_mismatch() -> None:
    async with harness() as h:
        await run_orders(h, ["order-plain"])
        state = await h.status("order-plain")
        assert state is not None
        ahead = state.model_copy(update={"seq": state.seq + 1})
        snap = Snapshot(saga_id="order-plain", state=ahead.model_dump(mode="json"))
        topic = h.coordinator.topics.snapshots
        p = snapshot_partition(h, "order-plain")
        append(h, [Outgoing(topic, b"order-plain", encode(snap), partition=p)])
        orphan = Snapshot(
            saga_id="ghost", state={**ahead.model_dump(mode="json"), "saga_id": "ghost"}
        )
        append(h, [Outgoing(topic, b"ghost", encode(orphan), partition=p)])
        report = await rebuild(h.transport, h.coordinator.topics)

    assert report.unverified == []
    assert [(m.saga_id, m.fields) for m in report.mismatches] == [
        ("ghost", ("<no events>",)),
        ("order-plain", ("seq",)),
    ]
