"""The pasta order saga, as the coordinator runs it.

::

    location ─► payment ─► restaurant ─┬─────────────► cook ─► notify
        │                              └─(SS)─► rider ─┘ (pivot)  (retriable)
        └──────────────────────────────────────► rider

- ``location`` reserves a delivery slot in the customer's zone (undo: release it);
- ``payment`` charges the customer (undo: refund);
- ``restaurant`` accepts the order (undo: cancel it);
- ``rider`` is sought as soon as the restaurant has *started* on the order (start-to-start),
  and needs the slot, so it also waits for ``location`` (undo: release the rider);
- ``cook`` is the pivot: once the kitchen starts cooking, the order only goes forward;
- ``notify`` tells the customer, retried until it succeeds.

Every step's input passes the order's ``faults`` on, so that `services.faults` can make any
step misbehave on request; orders always carry the key (`services.orders.make_order`).

Step timeouts default to 5 seconds; ``SAGA_STEP_TIMEOUT`` changes them (the coordinator reads
it when it loads this module). Run with ``python -m saga coordinator --app services.app:sagas``.
"""

from __future__ import annotations

import os

from saga import RetryPolicy, SagaDefinition, Step, StepKind

__all__ = ["STEP_TIMEOUT", "order_saga", "sagas"]

STEP_TIMEOUT = float(os.environ.get("SAGA_STEP_TIMEOUT") or 5.0)
"""Seconds each attempt of a step or compensation may take."""

_QUICK_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=2.0)
# Compensations must end for the saga to end; a few quick tries, then an operator's turn.
_UNDO_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.2, max_backoff=2.0)
# After the pivot there is no way back: keep telling the customer until it works.
_NOTIFY_RETRY = RetryPolicy(max_attempts=8, initial_backoff=0.1, multiplier=1.5, max_backoff=1.0)

_ORDER = "$.input.order_id"
_FAULTS = "$.input.faults"

order_saga = SagaDefinition(
    name="pasta_order",
    version=1,
    description="Order pasta: slot, payment, restaurant, rider, cooking, notification.",
    steps=(
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
            depends_on="location",
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
            depends_on=("restaurant", "rider"),
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
"""The pasta order saga."""

sagas = [order_saga]
"""What ``saga coordinator --app services.app:sagas`` runs."""
