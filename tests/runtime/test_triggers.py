"""The trigger relay on the memory transport, with a real coordinator and participants: events
on a service's topic start sagas, once each, whatever is redelivered, failed or fenced."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import orjson
import pytest

from saga import SagaStatus
from saga.core.codec import ENGINE_LIMITS, decode
from saga.core.messages import SagaStarted, StartIgnored, StartSaga, request_adapter
from saga.core.triggers import Subscription, Trigger
from saga.errors import UsageError
from saga.runtime.dlq import REASON_HEADER, SOURCE_HEADER
from saga.runtime.ports import Outgoing
from saga.runtime.triggers import TriggerRelay
from saga.testing import SagaHarness
from tests.runtime.test_harness import TRIP, services

pytestmark = pytest.mark.anyio

TOPIC = "travel.booked"
TRIGGER = Trigger(
    topic=TOPIC,
    when='$.event.kind == "booked"',
    saga_id="trip-{$.event.id}",
    input={"who": "$.event.who"},
)


def _relay(h: SagaHarness, trigger: Trigger = TRIGGER) -> TriggerRelay:
    return TriggerRelay(
        h.transport, [Subscription("trip", trigger)], partitions=h.partitions, clock=h.clock
    )


@asynccontextmanager
async def _running(relay: TriggerRelay) -> AsyncIterator[TriggerRelay]:
    async with anyio.create_task_group() as tg:
        await tg.start(relay.run)
        yield relay
        tg.cancel_scope.cancel()


async def _emit(h: SagaHarness, events: Sequence[Any], partition: int = 0) -> None:
    await h.transport.ensure_topics([TOPIC], 2)
    async with h.transport.producer() as producer:
        await producer.send(
            [
                Outgoing(TOPIC, b"k", e if isinstance(e, bytes) else orjson.dumps(e), (), partition)
                for e in events
            ]
        )


async def _consumed(h: SagaHarness, relay: TriggerRelay, count: int) -> None:
    # A bound against a hang, not a measure of speed.
    with anyio.fail_after(10):
        while relay.stats.records < count:
            await h.broker.wait_for_change(0.01)


def _starts(h: SagaHarness) -> list[StartSaga]:
    found = []
    for r in h.broker.records(h.coordinator.topics.requests):
        message = decode(request_adapter, r.value, ENGINE_LIMITS)
        assert isinstance(message, StartSaga)
        assert r.key == message.saga_id.encode()
        found.append(message)
    return found


def _committed(h: SagaHarness, relay: TriggerRelay) -> dict[tuple[str, int], int]:
    return dict(h.broker.groups[relay.group].committed)


async def test_events_start_sagas_with_ids_and_inputs_from_the_events() -> None:
    async with SagaHarness([TRIP], services()) as h, _running(_relay(h)) as relay:
        await _emit(
            h,
            [
                {"id": 1, "kind": "booked", "who": "ada"},
                {"id": 2, "kind": "enquired", "who": "bob"},  # the condition passes it over
                {"id": 3, "kind": "booked", "who": "cy"},
            ],
        )
        await _consumed(h, relay, 3)
        for saga_id, who in (("trip-1", "ada"), ("trip-3", "cy")):
            state = await h.run_until_done(saga_id)
            assert state.status is SagaStatus.COMPLETED
            assert state.input == {"who": who}
        assert await h.status("trip-2") is None
        assert (relay.stats.started, relay.stats.skipped) == (2, 1)
        # The source offsets were committed with the starts.
        assert _committed(h, relay)[(TOPIC, 0)] == 3
        assert sorted(s.message_id for s in _starts(h)) == [
            f"trigger:trip:{TOPIC}:0:0",
            f"trigger:trip:{TOPIC}:0:2",
        ]
        assert h.dead_letters() == []


async def test_a_redelivered_event_does_not_start_a_second_saga() -> None:
    async with SagaHarness([TRIP], services()) as h:
        async with _running(_relay(h)) as relay:
            await _emit(h, [{"id": 1, "kind": "booked", "who": "ada"}])
            await _consumed(h, relay, 1)
            assert (await h.run_until_done("trip-1")).status is SagaStatus.COMPLETED
        calls = h.calls("air")
        # Rewind the relays' group, as a relay that died before its commit was known would be.
        h.broker.groups["saga.triggers"].committed.clear()
        async with _running(_relay(h)) as again:
            await _consumed(h, again, 1)
            with anyio.fail_after(10):
                while not any(isinstance(e, StartIgnored) for e in h.events("trip-1")):
                    await h.broker.wait_for_change(0.01)
        starts = _starts(h)
        assert len(starts) == 2
        assert starts[0].message_id == starts[1].message_id  # the same request, read twice
        assert sum(isinstance(e, SagaStarted) for e in h.events("trip-1")) == 1
        assert h.calls("air") == calls


async def test_a_malformed_event_is_dead_lettered_with_its_source_and_the_next_still_starts() -> (
    None
):
    async with SagaHarness([TRIP], services()) as h, _running(_relay(h)) as relay:
        await _emit(
            h,
            [
                b"{not json",
                {"id": 5, "kind": "booked"},  # no "who": its input cannot be built
                [1, 2],
                {"id": 6, "kind": "booked", "who": "di"},
            ],
            partition=1,
        )
        await _consumed(h, relay, 4)
        assert (await h.run_until_done("trip-6")).status is SagaStatus.COMPLETED
        dead = h.dead_letters()
        assert [(d[REASON_HEADER], d[SOURCE_HEADER]) for d in dead] == [
            (b"invalid_json", f"{TOPIC}/1/0".encode()),
            (b"input_unresolved", f"{TOPIC}/1/1".encode()),
            (b"not_an_object", f"{TOPIC}/1/2".encode()),
        ]
        assert h.broker.records("saga.dlq")[0].value == b"{not json"  # the original bytes
        assert dict(relay.stats.dead_letters) == {
            "invalid_json": 1,
            "input_unresolved": 1,
            "not_an_object": 1,
        }
        assert _committed(h, relay)[(TOPIC, 1)] == 4
        assert [s.saga_id for s in _starts(h)] == ["trip-6"]


async def test_a_failed_transaction_is_retried_and_writes_each_start_once() -> None:
    async with SagaHarness([TRIP], services()) as h, _running(_relay(h)) as relay:
        h.broker.fail_next_commits = 2
        await _emit(h, [{"id": i, "kind": "booked", "who": f"w{i}"} for i in range(4)])
        await _consumed(h, relay, 4)
        assert relay.stats.failed_transactions == 2
        assert sorted(s.saga_id for s in _starts(h)) == [f"trip-{i}" for i in range(4)]
        for i in range(4):
            assert (await h.run_until_done(f"trip-{i}")).status is SagaStatus.COMPLETED


async def test_a_fenced_relay_takes_its_partition_back_and_loses_nothing() -> None:
    async with SagaHarness([TRIP], services()) as h, _running(_relay(h)) as relay:
        await _emit(h, [{"id": 1, "kind": "booked", "who": "ada"}])
        await _consumed(h, relay, 1)
        # Another producer with the relay's transactional id (a zombie's successor) fences it.
        async with h.transport.tx_producer(f"{relay.group}.{TOPIC}.0"):
            pass
        await _emit(h, [{"id": 2, "kind": "booked", "who": "bob"}])
        await _consumed(h, relay, 2)
        assert relay.stats.fenced == 1
        assert sorted(s.saga_id for s in _starts(h)) == ["trip-1", "trip-2"]
        assert (await h.run_until_done("trip-2")).status is SagaStatus.COMPLETED


async def test_start_requests_are_signed_when_the_relay_signs() -> None:
    def sign(record: Outgoing) -> Outgoing:
        return Outgoing(record.topic, record.key, record.value, (*record.headers, ("sig", b"1")))

    async with SagaHarness([TRIP], services()) as h:
        relay = TriggerRelay(
            h.transport,
            [Subscription("trip", TRIGGER)],
            partitions=h.partitions,
            clock=h.clock,
            sign=sign,
        )
        async with _running(relay):
            await _emit(h, [{"id": 1, "kind": "booked", "who": "ada"}])
            await _consumed(h, relay, 1)
        (record,) = h.broker.records("saga.requests")
        assert record.header("sig") == "1"


def test_a_trigger_that_breaks_a_rule_is_refused_when_the_relay_is_built() -> None:
    with pytest.raises(UsageError, match=r"\[trigger-condition\]"):
        TriggerRelay(None, [Subscription("trip", Trigger(topic="x", when="$.event.a >"))])  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="cannot be one of the engine's"):
        TriggerRelay(None, [Subscription("trip", Trigger(topic="saga.requests"))])  # type: ignore[arg-type]


async def test_an_event_whose_transaction_always_fails_is_set_aside_and_the_rest_start() -> None:
    def poison(records: Sequence[Outgoing]) -> str | None:
        # A start request the broker will not take (its dead letter it takes).
        bad = [r for r in records if r.topic == "saga.requests" and b'"evil"' in (r.value or b"")]
        return "evil" if bad else None

    async with SagaHarness([TRIP], services()) as h:
        relay = _relay(h)
        relay.backoff_initial = relay.backoff_cap = 0.001
        h.broker.transaction_faults.append(poison)
        async with _running(relay):
            await _emit(
                h,
                [
                    {"id": 1, "kind": "booked", "who": "ada"},
                    {"id": 2, "kind": "booked", "who": "evil"},
                    {"id": 3, "kind": "booked", "who": "cy"},
                ],
            )
            await _consumed(h, relay, 3)
        assert sorted(s.saga_id for s in _starts(h)) == ["trip-1", "trip-3"]
        (dead,) = h.dead_letters()
        assert dead[REASON_HEADER] == b"transaction_failed"
        assert dead[SOURCE_HEADER] == f"{TOPIC}/0/1".encode()
        assert _committed(h, relay)[(TOPIC, 0)] == 3
