"""Payload sealing on the real broker: a saga runs on sealed records, and what Kafka holds (read
with a plain transport, as a broker administrator or a backup would) has no plaintext of the
input or the outputs."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from saga import Coordinator, Participant, SagaDefinition, SagaStatus, Step, StepContext, StepFailed
from saga.adapters.kafka import KafkaTransport
from saga.adapters.sealing import (
    UNSEALED_ERROR_HEADER,
    SealedTransport,
    load_data_keys,
    new_data_key_file,
)
from saga.runtime.ports import Record, Topics

pytestmark = pytest.mark.anyio

MARKER = "quokka-5be1-secret"
OUT_MARKER = "tapir-08d4-secret"
PARTITIONS = 2

TRIP = SagaDefinition(
    name="trip",
    steps=[
        Step(name="book", service="hotel", action="book", compensation="cancel", timeout=20),
        Step(
            name="fly",
            service="airline",
            action="fly",
            depends_on=["book"],
            kind="pivot",
            timeout=20,
        ),
    ],
)


def services(seen: list[tuple[str, dict[str, Any]]]) -> list[Participant]:
    hotel, airline = Participant("hotel"), Participant("airline")

    @hotel.handler("book")
    async def book(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        seen.append(("book", payload))
        return {"room": OUT_MARKER}

    @hotel.handler("cancel")
    async def cancel(payload: dict[str, Any], ctx: StepContext) -> None:
        seen.append(("cancel", payload))

    @airline.handler("fly")
    async def fly(payload: dict[str, Any], ctx: StepContext) -> None:
        seen.append(("fly", payload))
        if payload.get("grounded"):
            raise StepFailed("no flights")

    return [hotel, airline]


async def everything(transport: KafkaTransport | SealedTransport, topics: Topics) -> list[Record]:
    found: list[Record] = []
    names = [topics.requests, topics.replies, topics.log, topics.snapshots]
    names += [topics.commands("hotel"), topics.commands("airline")]
    for name in names:
        for p in range(PARTITIONS):
            found += [r async for r in transport.read(name, p)]
    return found


async def test_a_sealed_saga_leaves_no_plaintext_in_kafka(bootstrap: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    new_data_key_file(keys)
    plain = KafkaTransport(bootstrap, deadline=20)
    sealed = SealedTransport(KafkaTransport(bootstrap, deadline=20), load_data_keys(keys))
    prefix = f"seal-{uuid.uuid4().hex[:10]}"
    topics = Topics(prefix)
    seen: list[tuple[str, dict[str, Any]]] = []
    hotel, airline = services(seen)
    trip = {"traveller": MARKER, "nights": 2}
    async with (
        Coordinator([TRIP], transport=sealed, prefix=prefix, partitions=PARTITIONS) as coordinator,
        hotel.serving(sealed, prefix=prefix, partitions=PARTITIONS),
        airline.serving(sealed, prefix=prefix, partitions=PARTITIONS),
    ):
        done = await coordinator.start("trip", trip)
        undone = await coordinator.start("trip", {**trip, "grounded": True})
        completed = await coordinator.wait(done, 60)
        compensated = await coordinator.wait(undone, 60)

    assert completed.status is SagaStatus.COMPLETED
    assert completed.input == trip
    assert completed.steps["book"].output == {"room": OUT_MARKER}
    assert compensated.status is SagaStatus.COMPENSATED
    assert ("cancel", {"input": {**trip, "grounded": True}, "output": {"room": OUT_MARKER}}) in seen

    raw = await everything(plain, topics)
    assert {r.topic for r in raw if b'"$sealed"' in (r.value or b"")} == {
        topics.requests,
        topics.replies,
        topics.log,
        topics.snapshots,
        topics.commands("hotel"),
        topics.commands("airline"),
    }
    leaks = [r for r in raw if MARKER.encode() in (r.value or b"")]
    leaks += [r for r in raw if OUT_MARKER.encode() in (r.value or b"")]
    assert leaks == []

    opened = await everything(sealed, topics)
    assert len(opened) == len(raw)
    assert all(r.header(UNSEALED_ERROR_HEADER) is None for r in opened)
    assert not [r for r in opened if b'"$sealed"' in (r.value or b"")]
    assert any(MARKER.encode() in (r.value or b"") for r in opened if r.topic == topics.log)
