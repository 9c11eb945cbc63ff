"""The pasta order saga, as the coordinator runs it.

::

    approval? ─────────────────┐
    location ──────────────────┴► payment ─► restaurant ─┬─► kitchen? ─────┬─► cook ─► notify
        │                                                └─(SS)─► rider ───┘ (pivot,  (retriable)
        └────────────────────────────────────────────────────────► rider      timer)

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

The dishes are a list in the input (``$.input.items``): a per-dish fan-out (a step that
prepares each dish, between ``kitchen`` and ``cook``; the pivot itself cannot fan out) slots in
without changing the other steps.

Every step's input passes the order's ``faults`` on, so that `services.faults` can make any
step misbehave on request; orders always carry the key (`services.orders.make_order`).

Step timeouts default to 5 seconds; ``SAGA_STEP_TIMEOUT`` changes them (the coordinator reads
it when it loads this module), and ``SAGA_KITCHEN_TIMEOUT``, ``SAGA_APPROVAL_TIMEOUT``,
``SAGA_APPROVAL_REMIND`` and ``SAGA_APPROVAL_ESCALATE`` the waiting steps' times. Run with
``SAGA_PREFIX=P python -m saga coordinator --prefix P --app services.app:sagas``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from saga import RetryPolicy, SagaDefinition, Step, StepKind
from saga.core.definition import Approval
from saga.core.triggers import Outcome, Trigger

__all__ = [
    "APPROVAL_TIMEOUT",
    "APPROVERS",
    "ESCALATE_TO",
    "KITCHEN_SIGNAL",
    "KITCHEN_TIMEOUT",
    "LARGE_ORDER",
    "PREFIX",
    "STEP_TIMEOUT",
    "OrderTopics",
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


def order_saga_for(prefix: str) -> SagaDefinition:
    """The pasta order saga of the deployment with topic prefix ``prefix`` (its event topics
    are named after it: `order_topics`)."""
    topics = order_topics(prefix)
    return SagaDefinition(
        name="pasta_order",
        # 2: the approval, the kitchen's confirmation, the delivery window, the events.
        version=2,
        description=(
            "Order pasta: a manager's approval for large orders, slot, payment, restaurant, "
            "the kitchen's confirmation, rider, cooking when the delivery window opens, "
            "notification."
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
            Step(
                name="location",
                service="location",
                action="reserve_slot",
                compensation="release_slot",
                timeout=STEP_TIMEOUT,
                retry=_QUICK_RETRY,
                compensation_retry=_UNDO_RETRY,
                input={
                    "order_id": _ORDER,
                    "customer": "$.input.customer",
                    "zone": "$.input.zone",
                    "faults": _FAULTS,
                },
            ),
            Step(
                name="payment",
                service="payment",
                action="charge",
                compensation="refund",
                depends_on=("location", "approval"),
                timeout=STEP_TIMEOUT,
                retry=_QUICK_RETRY,
                compensation_retry=_UNDO_RETRY,
                input={
                    "order_id": _ORDER,
                    "customer": "$.input.customer",
                    "amount": "$.input.amount",
                    "faults": _FAULTS,
                },
            ),
            Step(
                name="restaurant",
                service="restaurant",
                action="accept",
                compensation="cancel",
                depends_on="payment",
                timeout=STEP_TIMEOUT,
                retry=_QUICK_RETRY,
                compensation_retry=_UNDO_RETRY,
                input={
                    "order_id": _ORDER,
                    "restaurant": "$.input.restaurant",
                    "items": "$.input.items",
                    "faults": _FAULTS,
                },
            ),
            Step(
                name="kitchen",
                wait=KITCHEN_SIGNAL,
                when="$.input.kitchen_confirms == true",
                depends_on="restaurant",
                timeout=KITCHEN_TIMEOUT,
            ),
            Step(
                name="rider",
                service="rider",
                action="assign",
                compensation="release",
                depends_on=("restaurant:ss", "location"),
                timeout=STEP_TIMEOUT,
                retry=_QUICK_RETRY,
                compensation_retry=_UNDO_RETRY,
                input={
                    "order_id": _ORDER,
                    "zone": "$.input.zone",
                    "slot": "$.steps.location.output.slot",
                    "faults": _FAULTS,
                },
            ),
            Step(
                name="cook",
                service="restaurant",
                action="start_cooking",
                kind=StepKind.PIVOT,
                depends_on=("restaurant", "kitchen", "rider"),
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


def sagas_for(prefix: str) -> list[SagaDefinition]:
    """The sagas of the deployment with topic prefix ``prefix``."""
    return [order_saga_for(prefix)]


PREFIX = os.environ.get("SAGA_PREFIX") or "saga"
"""The deployment's topic prefix, as `services.fleet.Fleet` gives it to every process."""

order_saga = order_saga_for(PREFIX)
"""The pasta order saga of this process's deployment (``SAGA_PREFIX``)."""

sagas = sagas_for(PREFIX)
"""What ``saga coordinator --app services.app:sagas`` runs."""
