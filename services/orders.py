"""Order entry: makes pasta orders and starts one ``pasta_order`` saga per order (and
catering orders, one ``catering`` saga per party).

Every order is started with ``saga_id = order_id``, so starting the same order twice starts one
saga, and every service can find an order by the saga id. Orders always carry a ``faults``
object (empty unless a failure is asked for): the step input templates read
``$.input.faults``, and a missing path would fail the step. They also always carry
``deliver_after`` (when the delivery window opens: the ``cook`` step's timer; now, unless
asked otherwise) and ``kitchen_confirms`` (whether the restaurant's kitchen confirms the order
by hand with the ``kitchen_confirmed`` signal; no, unless asked).

Two ways in: `submit` asks the engine directly (`SagaClient.start`); `place` publishes
``order-placed`` events (`placed_event`) to the order topic, as an ordering front end would,
and the saga's trigger starts one saga per event (`services.app.order_topics`). A party's
catering (`make_catering`, `submit_catering`) holds several orders, each a sub-saga of it.

Command line::

    python -m services.orders --count 20 --fail-rate 0.2 [--events] [--prefix P]
        [--bootstrap-servers B]

prints the ids of the sagas it started (or the orders it placed, with ``--events``), one per
line.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import orjson

from saga import SagaClient, StepContext, TransportError
from saga.runtime.ports import Outgoing, Transport
from services.app import LARGE_ORDER, order_topics

__all__ = [
    "CATERING_NAME",
    "CUSTOMERS",
    "LARGE_ORDER",
    "MENU",
    "RECOVERABLE_FAULTS",
    "SAGA_NAME",
    "main",
    "make_catering",
    "make_order",
    "order_id_of",
    "place",
    "placed_event",
    "submit",
    "submit_catering",
]

SAGA_NAME = "pasta_order"
"""The saga every order starts (`services.app.order_saga`)."""
CATERING_NAME = "catering"
"""The saga every party's catering starts (`services.app.catering`)."""

MENU: dict[str, float] = {
    "spaghetti alla carbonara": 13.5,
    "cacio e pepe": 12.0,
    "bucatini all'amatriciana": 13.0,
    "penne all'arrabbiata": 10.5,
    "trofie al pesto": 12.5,
    "tagliatelle al ragù": 14.0,
    "linguine alle vongole": 16.5,
    "pappardelle ai funghi porcini": 15.5,
    "risotto alla milanese": 14.5,
    "lasagne alla bolognese": 13.5,
}
"""Dishes and their prices in euros."""

RESTAURANTS = ("Trattoria Da Gino", "Osteria del Ponte", "La Pasta di Nonna Rosa", "Sugo")
CUSTOMERS = ("Anna", "Bruno", "Carla", "Dario", "Emma", "Fabio", "Gaia", "Ivo", "Lia", "Nico")
"""Customers' first names (orders also carry a customer number)."""
_ZONES = ("navigli", "brera", "isola", "porta-romana", "citta-studi")
_DELIVERY_FEE = 2.9

RECOVERABLE_FAULTS: tuple[dict[str, str], ...] = (
    {"payment.charge": "fail"},  # card declined: compensated
    {"restaurant.accept": "fail"},  # the kitchen refuses: compensated
    {"rider.assign": "error:1"},  # a flaky rider app: retried, completed
    {"notify.notify_customer": "error:2"},  # SMS gateway hiccup after the pivot: completed
    {"cook.start_cooking": "fail"},  # the pivot fails: compensated
)
"""Faults for ``--fail-rate``: each ends in ``completed`` or ``compensated``."""


def make_order(
    i: int,
    fault: Mapping[str, str] | None = None,
    *,
    large: bool = False,
    kitchen_confirms: bool = False,
    deliver_after: float | None = None,
) -> dict[str, Any]:
    """A realistic order, the same dishes for the same ``i``, with a fresh order id.

    Args:
        i: The order's number; it picks the customer, zone, restaurant and dishes.
        fault: Faults for `services.faults`, keyed ``"<step>.<action>"``.
        large: A party's order, over `LARGE_ORDER` (a manager approves it); otherwise the
            order stays at or under it (no approval).
        kitchen_confirms: Whether the kitchen confirms the order by hand (the saga then waits
            for its ``kitchen_confirmed`` signal).
        deliver_after: When the delivery window opens (seconds since the epoch); default now.
    """
    rng = random.Random(i)
    dishes = rng.sample(sorted(MENU), k=rng.randint(2, 3) if large else rng.randint(1, 3))
    quantities = {d: rng.randint(3, 4) if large else rng.randint(1, 2) for d in dishes}
    while not large and _amount(quantities) > LARGE_ORDER:
        # A small order: fewer portions of the dearest dish until it fits.
        dearest = max((d for d in quantities if quantities[d] > 1), key=MENU.__getitem__)
        quantities[dearest] -= 1
    items = [{"dish": d, "quantity": q, "price": MENU[d]} for d, q in quantities.items()]
    when = time.time() if deliver_after is None else deliver_after
    return {
        "order_id": f"order-{i:04d}-{uuid.uuid4().hex[:8]}",
        "customer": f"{rng.choice(CUSTOMERS)} #{1000 + rng.randrange(9000)}",
        "zone": rng.choice(_ZONES),
        "restaurant": rng.choice(RESTAURANTS),
        "items": items,
        "amount": _amount(quantities),
        "kitchen_confirms": kitchen_confirms,
        "deliver_after": datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds"),
        "faults": dict(fault or {}),
    }


def make_catering(
    i: int,
    orders: int = 3,
    fault: Mapping[str, str] | None = None,
    order_faults: Mapping[int, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """A party's catering: ``orders`` orders (`make_order`, numbered from ``i``), each to be
    held by a sub-saga of its own, with a fresh party id.

    Args:
        i: The party's number; its orders are numbers ``i`` to ``i + orders - 1``.
        orders: How many orders the party holds.
        fault: Faults for the catering's own steps (``{"cook.cook_party": "fail"}``).
        order_faults: Faults for some of its orders, by position (``{1: {"payment.charge":
            "fail"}}``).
    """
    held = [make_order(i + n, (order_faults or {}).get(n)) for n in range(orders)]
    return {
        "party_id": f"party-{i:04d}-{uuid.uuid4().hex[:8]}",
        "customer": held[0]["customer"] if held else "",
        "orders": held,
        "amount": round(sum(o["amount"] for o in held), 2),
        "faults": dict(fault or {}),
    }


async def submit_catering(client: SagaClient, parties: Iterable[Mapping[str, Any]]) -> list[str]:
    """Starts one ``catering`` saga per party, with the party id as the saga id; returns the
    ids (its orders' sub-sagas are ``<party id>/orders[i]``)."""
    started: list[str] = []
    for party in parties:
        saga_id = str(party["party_id"])
        started.append(await client.start(CATERING_NAME, party, saga_id=saga_id))
    return started


def _amount(quantities: Mapping[str, int]) -> float:
    return round(sum(q * MENU[d] for d, q in quantities.items()) + _DELIVERY_FEE, 2)


def placed_event(order: Mapping[str, Any]) -> dict[str, Any]:
    """The ``order-placed`` event of an order, as the ordering front end publishes it (the
    saga's trigger reads ``$.event.order``)."""
    return {"type": "order-placed", "placed_at": time.time(), "order": dict(order)}


async def place(transport: Transport, topic: str, orders: Iterable[Mapping[str, Any]]) -> list[str]:
    """Publishes one ``order-placed`` event per order to ``topic`` (keyed by order id);
    returns the order ids, which are the ids of the sagas they start."""
    records = [
        Outgoing(topic, str(o["order_id"]).encode(), orjson.dumps(placed_event(o))) for o in orders
    ]
    async with transport.producer() as producer:
        await producer.send(records)
    return [r.key.decode() for r in records if r.key is not None]


async def submit(client: SagaClient, orders: Iterable[Mapping[str, Any]]) -> list[str]:
    """Starts one saga per order, with the order id as the saga id; returns the ids."""
    started: list[str] = []
    for order in orders:
        started.append(await client.start(SAGA_NAME, order, saga_id=str(order["order_id"])))
    return started


def order_id_of(payload: Mapping[str, Any], ctx: StepContext) -> str:
    """The order a command is about: from an action's input, a compensation's ``input``, or
    else the saga id (which is the order id)."""
    source = payload.get("input") if ctx.phase == "compensation" else payload
    if isinstance(source, Mapping) and source.get("order_id"):
        return str(source["order_id"])
    return ctx.saga_id


def _orders(count: int, fail_rate: float, seed: int | None) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        make_order(i, rng.choice(RECOVERABLE_FAULTS) if rng.random() < fail_rate else None)
        for i in range(count)
    ]


async def _main(args: argparse.Namespace) -> None:
    from saga.adapters.kafka import KafkaTransport

    orders = _orders(args.count, args.fail_rate, args.seed)
    transport = KafkaTransport(args.bootstrap_servers)
    if args.events:
        for order_id in await place(transport, order_topics(args.prefix).placed, orders):
            print(order_id, flush=True)
        return
    async with SagaClient(transport, prefix=args.prefix) as client:
        for saga_id in await submit(client, orders):
            print(saga_id, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m services.orders``."""
    parser = argparse.ArgumentParser(prog="python -m services.orders", description=__doc__)
    parser.add_argument("--count", type=int, default=10, help="orders to start")
    parser.add_argument(
        "--fail-rate", type=float, default=0.0, help="share of orders given a fault (0 to 1)"
    )
    parser.add_argument("--seed", type=int, help="seed for choosing the faulty orders")
    parser.add_argument(
        "--events", action="store_true", help="publish order-placed events instead of starting"
    )
    parser.add_argument(
        "--bootstrap-servers", default=os.environ.get("SAGA_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    )
    parser.add_argument("--prefix", default=os.environ.get("SAGA_PREFIX", "saga"))
    args = parser.parse_args(argv)
    if not 0 <= args.fail_rate <= 1:
        parser.error("--fail-rate must be between 0 and 1")
    try:
        anyio.run(_main, args)
    except (OSError, TimeoutError, TransportError) as exc:
        print(f"orders: cannot reach Kafka at {args.bootstrap_servers}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
