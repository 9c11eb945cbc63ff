"""A saga written by a newcomer with the public names of `saga` only, on the real broker.

A three-step trip: book a flight, then a hotel, then a car. Coordinator and participants run
in this process (``async with``) on Kafka; nothing here reaches into the engine's modules
except the Kafka transport, which is the documented way to reach a broker.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import saga
from saga.adapters.kafka import KafkaTransport

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(90)]

TRIP = saga.SagaDefinition(
    name="trip",
    description="Flight, then hotel, then car; each undone if a later one fails.",
    steps=[
        saga.Step(
            name="flight",
            service="airline",
            action="book_flight",
            compensation="cancel_flight",
            timeout=10,
            input={"traveller": "$.input.traveller", "route": "$.input.route"},
        ),
        saga.Step(
            name="hotel",
            service="hotels",
            action="reserve_room",
            compensation="cancel_room",
            depends_on=["flight"],
            timeout=10,
            retry=saga.RetryPolicy(max_attempts=2, initial_backoff=0.1),
            input={
                "traveller": "$.input.traveller",
                "city": "$.input.city",
                "arrival": "$.steps.flight.output.arrival",
            },
        ),
        saga.Step(
            name="car",
            service="cars",
            action="rent_car",
            compensation="return_car",
            depends_on=[saga.Dependency(step="hotel")],
            timeout=10,
            input={"traveller": "$.input.traveller", "city": "$.input.city", "car": "$.input.car"},
        ),
    ],
)


@dataclass
class Agency:
    """The three companies' books: what is booked and what was undone, in order."""

    booked: dict[str, str] = field(default_factory=dict)
    journal: list[str] = field(default_factory=list)
    undo_payloads: list[dict[str, Any]] = field(default_factory=list)


def participants(agency: Agency) -> list[saga.Participant]:
    airline = saga.Participant("airline")
    hotels = saga.Participant("hotels")
    cars = saga.Participant("cars")

    @airline.handler("book_flight")
    async def book_flight(payload: dict[str, Any], ctx: saga.StepContext) -> dict[str, Any]:
        code = f"FL-{ctx.saga_id[-6:]}"
        agency.booked[ctx.idempotency_key] = code
        agency.journal.append("book flight")
        return {"code": code, "arrival": "2026-05-01T10:40"}

    @airline.handler("cancel_flight")
    async def cancel_flight(payload: dict[str, Any], ctx: saga.StepContext) -> None:
        agency.undo_payloads.append(payload)
        agency.journal.append("cancel flight")

    @hotels.handler("reserve_room")
    def reserve_room(payload: dict[str, Any], ctx: saga.StepContext) -> dict[str, Any]:
        agency.journal.append("reserve room")
        return {"room": 214, "city": payload["city"], "check_in": payload["arrival"]}

    @hotels.handler("cancel_room")
    def cancel_room(payload: dict[str, Any], ctx: saga.StepContext) -> dict[str, Any]:
        agency.undo_payloads.append(payload)
        agency.journal.append("cancel room")
        return {"cancelled": True}

    @cars.handler("rent_car")
    async def rent_car(payload: dict[str, Any], ctx: saga.StepContext) -> dict[str, Any]:
        if payload["car"] == "convertible":
            raise saga.StepFailed(f"no convertible left in {payload['city']}")
        agency.journal.append("rent car")
        return {"plate": "AB-123-CD"}

    @cars.handler("return_car")
    async def return_car(payload: dict[str, Any], ctx: saga.StepContext) -> None:
        agency.journal.append("return car")

    return [airline, hotels, cars]


@dataclass
class World:
    coordinator: saga.Coordinator
    client: saga.SagaClient
    agency: Agency


@pytest.fixture
async def world(bootstrap: str) -> AsyncIterator[World]:
    prefix = f"trip-{uuid.uuid4().hex[:8]}"
    transport = KafkaTransport(bootstrap, deadline=20)
    agency = Agency()
    p1, p2, p3 = participants(agency)
    async with (
        saga.Coordinator([TRIP], transport=transport, prefix=prefix) as coordinator,
        p1.serving(transport, prefix=prefix),
        p2.serving(transport, prefix=prefix),
        p3.serving(transport, prefix=prefix),
        saga.SagaClient(transport, prefix=prefix) as client,
    ):
        yield World(coordinator, client, agency)


async def test_a_trip_is_booked(world: World) -> None:
    trip = {"traveller": "Ada", "route": "LIN-LIS", "city": "Lisbon", "car": "compact"}

    saga_id = await world.coordinator.start("trip", trip)
    state = await world.coordinator.wait(saga_id, 45)

    assert state.status is saga.SagaStatus.COMPLETED
    assert state.steps["hotel"].output == {
        "room": 214,
        "city": "Lisbon",
        "check_in": "2026-05-01T10:40",
    }
    assert state.steps["car"].output == {"plate": "AB-123-CD"}
    assert world.agency.journal == ["book flight", "reserve room", "rent car"]
    seen = await world.client.status(saga_id)  # the same state, read from another "process"
    assert seen is not None
    assert seen.status is saga.SagaStatus.COMPLETED
    assert seen.steps == state.steps


async def test_no_car_undoes_the_hotel_then_the_flight(world: World) -> None:
    trip = {"traveller": "Grace", "route": "LIN-OPO", "city": "Porto", "car": "convertible"}

    saga_id = await world.coordinator.start("trip", trip, saga_id=f"trip-grace-{uuid.uuid4().hex}")
    state = await world.coordinator.wait(saga_id, 45)

    assert state.status is saga.SagaStatus.COMPENSATED
    assert {name: step.status for name, step in state.steps.items()} == {
        "flight": saga.StepStatus.COMPENSATED,
        "hotel": saga.StepStatus.COMPENSATED,
        "car": saga.StepStatus.FAILED,
    }
    car_error = state.steps["car"].error
    assert car_error is not None
    assert car_error.business
    assert car_error.message == "no convertible left in Porto"
    assert world.agency.journal == ["book flight", "reserve room", "cancel room", "cancel flight"]
    # A compensation sees what its action was given and what it returned.
    room, flight = world.agency.undo_payloads
    assert room["input"]["city"] == "Porto"
    assert room["output"]["room"] == 214
    assert flight["output"]["code"] == f"FL-{saga_id[-6:]}"
