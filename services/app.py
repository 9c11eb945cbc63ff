"""The pasta order saga and a party's catering of such orders, as the coordinator runs them.

::

    approval? ─────────────┐
    location ──────────────┴► payment ─► restaurant ─┬─► kitchen? ─► dishes[i] ─┬─► cook ─► notify
        │                                            └─(SS)─► rider ────────────┘  (pivot,
        └───────────────────────────────────────────────────► rider                 timer)

- ``approval`` (only when the order's ``amount`` is over `LARGE_ORDER`) asks a manager to
  approve the order, reminds them and then escalates to the operator; a rejection, or no
  decision within `APPROVAL_TIMEOUT`, cancels the order (the slot is released). For smaller
  orders the step is skipped, which counts as done for ``payment``;
- ``location`` reserves a delivery slot in the customer's zone (undo: release it);
- ``payment`` charges the customer (undo: refund);
- ``restaurant`` accepts the order (undo: cancel it);
- ``kitchen`` (only for restaurants that confirm by hand: the order's ``kitchen_confirms``)
  waits for the kitchen's ``kitchen_confirmed`` signal (`KITCHEN_SIGNAL`; ``saga signal``);
  its output is the signal's data; no confirmation within `KITCHEN_TIMEOUT` cancels the order;
- ``dishes`` prepares each dish of the order (``$.input.items``), `DISHES_PARALLEL` at a time:
  a fan-out whose items are ``dishes[0]``, ``dishes[1]``... and whose output lists what each
  returned, in order (undo: discard the dish). When the order fails, exactly the dishes that
  were prepared are discarded;
- ``rider`` is sought as soon as the restaurant has *started* on the order (start-to-start),
  and needs the slot, so it also waits for ``location`` (undo: release the rider);
- ``cook`` is the pivot: once the kitchen starts cooking, the order only goes forward. It is a
  durable timer too: it starts at the order's ``deliver_after`` (the opening of the delivery
  window, seconds since the epoch or ISO-8601; an order for now gives the present time);
- ``notify`` tells the customer, retried until it succeeds.

Orders arrive as ``order-placed`` events on a topic of their own (`OrderTopics.placed`; see
`services.orders.placed_event`), each starting one saga whose id is the order id; each saga
publishes an ``order-completed`` or ``order-cancelled`` event (compensated, or stuck while
undoing) in the transaction of its last event. The topics are named after the deployment's
prefix (``SAGA_PREFIX``, which `services.fleet.Fleet` sets for every process), outside the
engine's own ``<prefix>.`` topics: ``<prefix>-events.order-placed`` and so on (the ACLs of
`deploy.kafka_secure.engine_acls` cover ``<prefix>-events.``).

A second saga, `catering`, is a party's order: a fan-out of sub-sagas, one `catering_order`
(the pasta order's slot, payment, restaurant and dishes) per order in ``$.input.orders``,
then its pivot ``cook``, which cooks them all at once. When that fails every child order is
compensated; ``saga status`` of the catering shows the tree. `sagas` holds all three
definitions, so one coordinator runs the catering and its children.

Every step's input passes the order's ``faults`` on, so that `services.faults` can make any
step misbehave on request (one dish: ``"dishes[1].prepare_dish"``); orders always carry the
key (`services.orders.make_order`, `services.orders.make_catering`).

Step timeouts default to 5 seconds; ``SAGA_STEP_TIMEOUT`` changes them (the coordinator reads
it when it loads this module), and ``SAGA_KITCHEN_TIMEOUT``, ``SAGA_APPROVAL_TIMEOUT``,
``SAGA_APPROVAL_REMIND`` and ``SAGA_APPROVAL_ESCALATE`` the waiting steps' times. Run with
``SAGA_PREFIX=P python -m saga coordinator --prefix P --app services.app:sagas``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from saga import RetryPolicy, SagaDefinition, Step, StepKind
from saga.core.definition import Approval
from saga.core.triggers import Outcome, Trigger

__all__ = [
    "APPROVAL_TIMEOUT",
    "APPROVERS",
    "CATERING_ORDER_TIMEOUT",
    "CATERING_PARALLEL",
    "DISHES_PARALLEL",
    "ESCALATE_TO",
    "KITCHEN_SIGNAL",
    "KITCHEN_TIMEOUT",
    "LARGE_ORDER",
    "PREFIX",
    "STEP_TIMEOUT",
    "OrderTopics",
    "catering",
    "catering_order",
    "order_saga",
    "order_saga_for",
    "order_topics",
    "sagas",
    "sagas_for",
]


def _seconds(variable: str, default: float) -> float:
    return float(os.environ.get(variable) or default)


STEP_TIMEOUT = _seconds("SAGA_STEP_TIMEOUT", 5.0)
"""Seconds each attempt of a step or compensation may take."""
KITCHEN_TIMEOUT = _seconds("SAGA_KITCHEN_TIMEOUT", 300.0)
"""Seconds the kitchen has to confirm an order before it is cancelled."""
APPROVAL_TIMEOUT = _seconds("SAGA_APPROVAL_TIMEOUT", 3600.0)
"""Seconds a large order waits for a decision before it counts as rejected."""
_APPROVAL_REMIND = _seconds("SAGA_APPROVAL_REMIND", 600.0)
_APPROVAL_ESCALATE = _seconds("SAGA_APPROVAL_ESCALATE", 1800.0)

LARGE_ORDER = 60.0
"""Orders whose amount (euros, delivery included) is over this need a manager's approval."""
APPROVERS = ("manager",)
"""Who decides on large orders (principals: the signing identity when requests are signed)."""
ESCALATE_TO = ("operator",)
"""Who is told, and may decide too, when the managers have not decided in time."""
KITCHEN_SIGNAL = "kitchen_confirmed"
"""The signal a kitchen sends when it confirms an order (``saga signal ID kitchen_confirmed``)."""


@dataclass(frozen=True, slots=True)
class OrderTopics:
    """The order's own event topics under one prefix (services' topics, not the engine's).

    Attributes:
        placed: ``order-placed`` events, each of which starts a saga.
        completed: ``order-completed`` events, one per delivered order.
        cancelled: ``order-cancelled`` events, one per order undone (or stuck undoing).
    """

    placed: str
    completed: str
    cancelled: str

    def all(self) -> tuple[str, str, str]:
        """The three topics."""
        return (self.placed, self.completed, self.cancelled)


def order_topics(prefix: str) -> OrderTopics:
    """The order event topics of the deployment with topic prefix ``prefix``."""
    base = f"{prefix}-events"
    return OrderTopics(f"{base}.order-placed", f"{base}.order-completed", f"{base}.order-cancelled")


_QUICK_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=2.0)
# Compensations must end for the saga to end; a few quick tries, then an operator's turn.
_UNDO_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.2, max_backoff=2.0)
# After the pivot there is no way back: keep telling the customer until it works.
_NOTIFY_RETRY = RetryPolicy(max_attempts=8, initial_backoff=0.1, multiplier=1.5, max_backoff=1.0)

_ORDER = "$.input.order_id"
_FAULTS = "$.input.faults"

DISHES_PARALLEL = 3
"""Most dishes of one order the kitchen prepares at once (the ``dishes`` fan-out)."""
CATERING_PARALLEL = 3
"""Most orders of one catering held at once (the ``orders`` fan-out of sub-sagas)."""
CATERING_ORDER_TIMEOUT = _seconds("SAGA_CATERING_ORDER_TIMEOUT", 120.0)
"""Seconds a catering waits for one of its orders (a whole sub-saga) to be held."""


def _command(
    name: str,
    service: str,
    action: str,
    compensation: str,
    inputs: dict[str, Any],
    **fields: Any,
) -> Step:
    """A step of the order's services: quick retries, a few tries to undo, and every input
    carrying the order id and the order's ``faults`` (`services.faults`)."""
    return Step(
        name=name,
        service=service,
        action=action,
        compensation=compensation,
        timeout=STEP_TIMEOUT,
        retry=_QUICK_RETRY,
        compensation_retry=_UNDO_RETRY,
        input={"order_id": _ORDER, **inputs, "faults": _FAULTS},
        **fields,
    )


def _location() -> Step:
    inputs = {"customer": "$.input.customer", "zone": "$.input.zone"}
    return _command("location", "location", "reserve_slot", "release_slot", inputs)


def _payment(depends_on: tuple[str, ...]) -> Step:
    inputs = {"customer": "$.input.customer", "amount": "$.input.amount"}
    return _command("payment", "payment", "charge", "refund", inputs, depends_on=depends_on)


def _restaurant() -> Step:
    inputs = {"restaurant": "$.input.restaurant", "items": "$.input.items"}
    return _command("restaurant", "restaurant", "accept", "cancel", inputs, depends_on="payment")


def _dishes(depends_on: tuple[str, ...]) -> Step:
    # One item per dish of the order (`services.restaurant.prepare_dish`); a fault for one
    # dish is keyed by its item's name, "dishes[1].prepare_dish" (`services.faults`).
    return _command(
        "dishes",
        "restaurant",
        "prepare_dish",
        "discard_dish",
        {"dish": "$.item"},
        depends_on=depends_on,
        for_each="$.input.items",
        max_parallel=DISHES_PARALLEL,
    )


def order_saga_for(prefix: str) -> SagaDefinition:
    """The pasta order saga of the deployment with topic prefix ``prefix`` (its event topics
    are named after it: `order_topics`)."""
    topics = order_topics(prefix)
    return SagaDefinition(
        name="pasta_order",
        # 2: the approval, the kitchen's confirmation, the delivery window, the events.
        # 3: the dishes, prepared one by one (a fan-out).
        version=3,
        description=(
            "Order pasta: a manager's approval for large orders, slot, payment, restaurant, "
            "the kitchen's confirmation, each dish prepared, rider, cooking when the delivery "
            "window opens, notification."
        ),
        triggers=(
            Trigger(
                topic=topics.placed,
                when='$.event.type == "order-placed"',
                saga_id="$.event.order.order_id",
                input="$.event.order",
            ),
        ),
        outcomes=(
            Outcome(
                topic=topics.completed,
                on=("completed",),
                value={
                    "type": "order-completed",
                    "order_id": _ORDER,
                    "customer": "$.input.customer",
                    "amount": "$.input.amount",
                    "ticket": "$.steps.restaurant.output.ticket",
                    "rider": "$.steps.rider.output.rider",
                    "approved_by": "$.steps.approval.output.by",
                    "kitchen": "$.steps.kitchen.output",
                    "at": "$.at",
                    "seq": "$.seq",
                },
            ),
            Outcome(
                topic=topics.cancelled,
                on=("compensated", "stuck"),
                value={
                    "type": "order-cancelled",
                    "order_id": _ORDER,
                    "customer": "$.input.customer",
                    "amount": "$.input.amount",
                    # compensated: everything undone; stuck: an undo (a refund) needs an operator
                    "status": "$.status",
                    "reason": "$.reason",
                    "at": "$.at",
                    "seq": "$.seq",
                },
            ),
        ),
        steps=(
            Step(
                name="approval",
                approval=Approval(
                    approvers=APPROVERS,
                    remind_after=_APPROVAL_REMIND,
                    escalate_after=_APPROVAL_ESCALATE,
                    escalate_to=ESCALATE_TO,
                ),
                when=f"$.input.amount > {LARGE_ORDER:g}",
                timeout=APPROVAL_TIMEOUT,
            ),
            _location(),
            _payment(("location", "approval")),
            _restaurant(),
            Step(
                name="kitchen",
                wait=KITCHEN_SIGNAL,
                when="$.input.kitchen_confirms == true",
                depends_on="restaurant",
                timeout=KITCHEN_TIMEOUT,
            ),
            # After the kitchen's confirmation (skipped or not): undoing goes back through it,
            # so the dishes are discarded before the order is cancelled.
            _dishes(("kitchen",)),
            _command(
                "rider",
                "rider",
                "assign",
                "release",
                {"zone": "$.input.zone", "slot": "$.steps.location.output.slot"},
                depends_on=("restaurant:ss", "location"),
            ),
            Step(
                name="cook",
                service="restaurant",
                action="start_cooking",
                kind=StepKind.PIVOT,
                depends_on=("restaurant", "dishes", "rider"),
                start_at="$.input.deliver_after",
                timeout=STEP_TIMEOUT,
                retry=_QUICK_RETRY,
                input={
                    "order_id": _ORDER,
                    "ticket": "$.steps.restaurant.output.ticket",
                    "rider": "$.steps.rider.output.rider",
                    "faults": _FAULTS,
                },
            ),
            Step(
                name="notify",
                service="notification",
                action="notify_customer",
                kind=StepKind.RETRIABLE,
                depends_on="cook",
                timeout=STEP_TIMEOUT,
                retry=_NOTIFY_RETRY,
                input={
                    "order_id": _ORDER,
                    "customer": "$.input.customer",
                    "ticket": "$.steps.restaurant.output.ticket",
                    "rider": "$.steps.rider.output.rider",
                    "slot": "$.steps.location.output.slot",
                    "faults": _FAULTS,
                },
            ),
        ),
    )


catering_order = SagaDefinition(
    name="catering_order",
    version=1,
    description=(
        "One order of a catering, held until the party cooks: slot, payment, restaurant, each "
        "dish prepared. No pivot of its own, so its catering can still undo it."
    ),
    steps=(_location(), _payment(("location",)), _restaurant(), _dishes(("restaurant",))),
)
"""One order of a `catering`, run as its sub-saga: the pasta order's steps up to the kitchen.

It is not ``pasta_order`` itself because a saga past its pivot cannot be compensated (the
engine refuses, `saga.core.subsagas`): a catering whose own pivot fails must be able to undo
every order it holds, so the cooking is the catering's pivot, not each order's."""


catering = SagaDefinition(
    name="catering",
    version=1,
    description=(
        "A party's catering: each of its orders held as a sub-saga (catering_order, "
        f"{CATERING_PARALLEL} at a time), then the restaurant cooks them all (the pivot)."
    ),
    steps=(
        Step(
            name="orders",
            saga=catering_order.name,
            for_each="$.input.orders",
            max_parallel=CATERING_PARALLEL,
            timeout=CATERING_ORDER_TIMEOUT,
            input="$.item",
        ),
        Step(
            name="cook",
            service="restaurant",
            action="cook_party",
            kind=StepKind.PIVOT,
            depends_on="orders",
            timeout=STEP_TIMEOUT,
            retry=_QUICK_RETRY,
            input={
                "party_id": "$.input.party_id",
                "orders": "$.input.orders",
                "faults": _FAULTS,
            },
        ),
    ),
)
"""A party's catering: a fan-out of sub-sagas, one `catering_order` per order in
``$.input.orders`` (child ids ``<catering>/orders[i]``), then the ``cook`` pivot, which starts
cooking every order of the party at once (`services.restaurant.cook_party`). A failing
``cook`` compensates ``orders``, that is every child: each order's dishes are discarded, its
restaurant order cancelled, its charge refunded and its slot released. Make one with
`services.orders.make_catering`."""


def sagas_for(prefix: str) -> list[SagaDefinition]:
    """The sagas of the deployment with topic prefix ``prefix``."""
    return [order_saga_for(prefix), catering_order, catering]


PREFIX = os.environ.get("SAGA_PREFIX") or "saga"
"""The deployment's topic prefix, as `services.fleet.Fleet` gives it to every process."""

order_saga = order_saga_for(PREFIX)
"""The pasta order saga of this process's deployment (``SAGA_PREFIX``)."""

sagas = sagas_for(PREFIX)
"""What ``saga coordinator --app services.app:sagas`` runs."""
