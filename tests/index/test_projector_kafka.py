"""The projector on the real broker: real sagas, indexed live, rebuilt, resumed, sealed,
followed through one tail per topic.

A coordinator and the views' sample services run in this process on Kafka under a fresh prefix
(as in tests/views/test_cli_kafka.py); the index is checked against what the engine itself
answers from Kafka (`SagaClient.status` from the snapshots, `SagaClient.events` from the log).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

import saga
from saga.adapters.kafka import KafkaTransport
from saga.adapters.sealing import SealedTransport, load_data_keys, new_data_key_file
from saga.errors import TransportError
from saga.index import Projector, SagaQuery, SqliteSagaIndex, rebuild_index, run_projector
from saga.runtime.ports import Outgoing, Record, Tail, Topics, Transport
from tests.index.support import ORDERS, engine, run_orders

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(240)]


async def until_indexed(projector: Projector, index: SqliteSagaIndex, ids: list[str]) -> None:
    """Waits (on `Projector.changed`) until the index holds every saga final."""
    with anyio.fail_after(60):
        generation = 0
        while True:
            rows = [index.get(i) for i in ids]
            if all(r is not None and r.state.is_final for r in rows):
                return
            generation = await projector.changed(generation, timeout=5)


async def test_the_index_follows_real_sagas_rebuilds_and_resumes(
    bootstrap: str, tmp_path: Path
) -> None:
    prefix = f"index-{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix)
    transport = KafkaTransport(bootstrap, deadline=20)
    index = SqliteSagaIndex(tmp_path / "live.sqlite3", prefix=prefix)
    async with engine(transport, prefix) as coordinator, anyio.create_task_group() as tg:
        projector: Projector = await tg.start(run_projector, transport, prefix, index)
        ok, refused, plain = await run_orders(coordinator, prefix, ["ok", "refused", "plain"])
        await until_indexed(projector, index, [ok, refused, plain])

        async with saga.SagaClient(transport, prefix=prefix) as client:
            for saga_id in (ok, refused, plain):
                row = index.get(saga_id)
                assert row is not None
                assert row.state == await client.status(saga_id)
                events = await client.events(saga_id)
                history = index.history(saga_id)
                assert [h.event for h in history] == [e.model_dump(mode="json") for e in events]
                assert [h.type for h in history] == [e.type for e in events]
        assert index.get(ok).state.steps["payment"].attempt == 2  # type: ignore[union-attr]
        assert index.counts() == {"compensated": 1, "completed": 2}
        compensated = index.query(SagaQuery(step="kitchen", step_status="failed"))
        assert [r.state.saga_id for r in compensated.rows] == [refused]
        by_customer = index.query(SagaQuery(input={"customer": "c-1"}))
        assert {r.state.saga_id for r in by_customer.rows} == {ok, plain}
        assert by_customer.total == 2

        # A malformed record in the log: counted and reported, the projector goes on.
        async with transport.producer() as producer:
            await producer.send([Outgoing(topics.log, b"junk", b"{not json", partition=0)])
        (late,) = await run_orders(coordinator, prefix, ["plain"])
        await until_indexed(projector, index, [late])
        with anyio.fail_after(30):
            while index.info().bad == 0:
                await projector.changed(projector.generation, timeout=2)
        info = index.info()
        assert info.bad == 1
        (bad,) = info.recent_bad
        assert (bad.topic, bad.partition, bad.key) == (topics.log, 0, "junk")
        assert "undecodable event" in bad.reason
        await projector.catch_up()
        assert index.lag().total == 0
        assert index.lag().behind.keys() == {0, 1}
        tg.cancel_scope.cancel()

    sagas = [ok, refused, plain, late]
    live = {s: index.get(s) for s in sagas}
    histories = {s: index.history(s) for s in sagas}
    positions = index.positions()
    index.close()

    # A rebuild from scratch gives the same states and histories, and the same bad record.
    with SqliteSagaIndex(tmp_path / "rebuilt.sqlite3", prefix=prefix) as rebuilt:
        stats = await rebuild_index(transport, rebuilt)
        assert stats.sagas == 4
        assert stats.bad == 1
        for s in sagas:
            again = rebuilt.get(s)
            assert again is not None
            assert again.state == live[s].state  # type: ignore[union-attr]
            assert list(rebuilt.history(s)) == list(histories[s])
        assert rebuilt.query(SagaQuery()).total == 4
        assert rebuilt.positions() == positions

    # Reopened, the projector resumes from its stored offsets: nothing to read again...
    with SqliteSagaIndex(tmp_path / "live.sqlite3", prefix=prefix) as index:
        resumed = Projector(transport, index)
        assert (await resumed.catch_up()).records == 0
        # ...and only what is new after another saga.
        async with engine(transport, prefix) as coordinator:
            (newer,) = await run_orders(coordinator, prefix, ["ok"])
        stats = await resumed.catch_up()
        assert 0 < stats.records < sum(len(h) for h in histories.values())
        assert stats.sagas == 1
        assert index.get(newer).state.status is saga.SagaStatus.COMPLETED  # type: ignore[union-attr]
        assert index.lag().total == 0


async def test_a_sealed_log_is_opened_with_the_keys(bootstrap: str, tmp_path: Path) -> None:
    keys, other = tmp_path / "keys.json", tmp_path / "other.json"
    new_data_key_file(keys)
    new_data_key_file(other, key_id="elsewhere")
    plain = KafkaTransport(bootstrap, deadline=20)
    sealed = SealedTransport(KafkaTransport(bootstrap, deadline=20), load_data_keys(keys))
    prefix = f"index-seal-{uuid.uuid4().hex[:8]}"
    async with engine(sealed, prefix) as coordinator:
        ok, refused = await run_orders(coordinator, prefix, ["ok", "refused"])

    with SqliteSagaIndex(tmp_path / "keys.sqlite3", prefix=prefix) as index:
        stats = await rebuild_index(plain, index, codec=load_data_keys(keys))
        assert stats.bad == 0
        assert index.get(ok).state.input == ORDERS["ok"]  # type: ignore[union-attr]
        found = index.query(SagaQuery(input={"customer": "c-2"}))
        assert [r.state.saga_id for r in found.rows] == [refused]
        history = index.history(ok)
        assert history[0].event["input"] == ORDERS["ok"]

    # Without the keys: the states and statuses are there, the inputs are sealed.
    with SqliteSagaIndex(tmp_path / "none.sqlite3", prefix=prefix) as index:
        await rebuild_index(plain, index)
        row = index.get(ok)
        assert row is not None
        assert row.state.status is saga.SagaStatus.COMPLETED
        assert "$sealed" in row.state.input
        assert index.query(SagaQuery(input={"customer": "c-2"})).total == 0

    # With keys that do not open them: used as they are, and each such record reported.
    with SqliteSagaIndex(tmp_path / "wrong.sqlite3", prefix=prefix) as index:
        stats = await rebuild_index(plain, index, codec=load_data_keys(other))
        assert stats.bad > 0
        assert index.counts() == {"compensated": 1, "completed": 1}
        reasons = {b.reason.split(" (")[0] for b in index.info().recent_bad}
        assert reasons == {"sealed fields not opened"}


class Outage:
    """The real transport, except that its tails fail (as in a broker outage) while ``down``:
    opening one, and every call on an open one."""

    def __init__(self, inner: KafkaTransport) -> None:
        self.inner = inner
        self.down = False
        self.failed = 0
        self.opened = 0
        self.failing = anyio.Event()
        """Set once tails have failed a few times: the projector met the outage."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _check(self, what: str) -> None:
        if self.down:
            self.failed += 1
            if self.failed >= 3:
                self.failing.set()
            raise TransportError(f"{what} failed: the broker is away")

    @asynccontextmanager
    async def tail(self, topic: str, starts: Mapping[int, int]) -> AsyncIterator[Tail]:
        self._check(f"opening a tail of {topic}")
        async with self.inner.tail(topic, starts) as tail:
            self.opened += 1
            yield _FailingTail(tail, self)


class _FailingTail:
    def __init__(self, inner: Tail, outage: Outage) -> None:
        self.inner = inner
        self.outage = outage

    async def poll(self, timeout: float, max_records: int = 500) -> list[Record]:
        self.outage._check("poll")
        return await self.inner.poll(timeout, max_records)

    async def end_offsets(self) -> dict[int, int]:
        self.outage._check("end offsets")
        return await self.inner.end_offsets()

    async def positions(self) -> dict[int, int]:
        self.outage._check("positions")
        return await self.inner.positions()


async def test_a_broker_outage_does_not_stop_the_projector(bootstrap: str, tmp_path: Path) -> None:
    prefix = f"index-out-{uuid.uuid4().hex[:8]}"
    transport = KafkaTransport(bootstrap, deadline=20)
    flaky = Outage(transport)
    index = SqliteSagaIndex(tmp_path / "i.sqlite3", prefix=prefix)
    async with engine(transport, prefix) as coordinator, anyio.create_task_group() as tg:
        (first,) = await run_orders(coordinator, prefix, ["plain"])
        projector: Projector = await tg.start(
            functools.partial(run_projector, flaky, prefix, index, interval=0.05)
        )
        assert index.get(first) is not None
        flaky.down = True
        (second,) = await run_orders(coordinator, prefix, ["refused"])
        with anyio.fail_after(30):
            await flaky.failing.wait()
        assert index.get(second) is None
        flaky.down = False
        await until_indexed(projector, index, [second])
        assert flaky.opened > 2  # the tails were opened again after the outage
        assert projector.stats.tails == flaky.opened
        tg.cancel_scope.cancel()
    index.close()


class CountingTails:
    """The real transport, counting the tails opened and the partition reads made."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.tails = 0
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def tail(self, topic: str, starts: Mapping[int, int]) -> Any:
        self.tails += 1
        return self.inner.tail(topic, starts)

    def read(self, topic: str, partition: int, start: int = 0) -> AsyncIterator[Record]:
        self.reads += 1
        return self.inner.read(topic, partition, start)


async def test_sagas_are_indexed_as_they_complete_without_a_pass_or_a_new_consumer(
    bootstrap: str, tmp_path: Path
) -> None:
    """Live lag in passes, not seconds: with a pass only every ten minutes, sagas that complete
    are indexed within no pass at all, through the two tails opened at the start."""
    prefix = f"index-live-{uuid.uuid4().hex[:8]}"
    transport = KafkaTransport(bootstrap, deadline=20)
    counting = CountingTails(transport)
    index = SqliteSagaIndex(tmp_path / "i.sqlite3", prefix=prefix)
    async with engine(transport, prefix) as coordinator, anyio.create_task_group() as tg:
        projector: Projector = await tg.start(
            functools.partial(run_projector, counting, prefix, index, interval=600)
        )
        assert projector.stats.passes == 1
        for _ in range(3):
            ids = await run_orders(coordinator, prefix, ["ok", "refused", "plain"])
            await until_indexed(projector, index, ids)
            lag = index.lag()  # as of the first pass: the ends it saw, all passed by now
            assert lag.total == 0
        assert projector.stats.passes == 1  # no pass since the first: the followers did it
        assert counting.tails == 2  # one per topic, never reopened
        assert projector.stats.tails == 2
        assert counting.reads == 0
        # A pass now sees the true ends, and nothing is behind them.
        await projector.catch_up()
        assert index.lag().total == 0
        ends = index.lag().behind.keys()
        assert ends == {0, 1}
        assert index.counts() == {"completed": 6, "compensated": 3}
        tg.cancel_scope.cancel()
    index.close()
