"""Fault knobs: make a service fail on purpose, for the demo and the integration tests.

A fault is named by ``"<step>.<action>"`` (``"payment.charge"``, ``"payment.refund"``,
``"cook.start_cooking"``) and read from two places, the order winning over the environment:

- the saga input's ``faults`` object, which every step's input template passes on (a
  compensation finds it in the step's input, under ``"input"``);
- the environment variable ``SAGA_FAULTS``, the same JSON, applied to every order.

An item of a fan-out is named after its item (``"dishes[1].prepare_dish"``: the second dish
only), or else after its step (``"dishes.prepare_dish"``: every dish).

The faults:

``fail``
    A business failure (`saga.StepFailed`): not retried, the saga compensates.
``error:N``
    A technical failure on the first N attempts, then success: the retry policy at work.
``always_error``
    A technical failure on every attempt; on a compensation it makes the saga stuck.
``delay:S``
    Waits S seconds before acting. A service that is still waiting when the step's deadline
    passes gives up without acting (nobody waits for its answer any more), so a delay longer
    than the step's timeout makes every attempt time out.
``crash_after``
    Applies the side effect, then kills the process (exit status 17) before the participant can
    reply or commit: the command is redelivered to the restarted process, which must not apply
    the effect twice. Only the first delivery of a command crashes (the service's database
    remembers), so the restarted service replies with the effect it stored.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from saga import StepContext, StepFailed
from saga.core.definition import split_item
from services.db import ServiceDB

__all__ = ["CRASH_EXIT_STATUS", "Fault", "InjectedError", "fault_for"]

log = logging.getLogger("services.faults")

CRASH_EXIT_STATUS = 17
"""The exit status of a process killed by ``crash_after``."""

GRACE = 0.5
"""Seconds a delayed handler waits past its deadline before giving up: long enough for the
coordinator to have noticed the deadline, so the late reply is certainly stale."""

Kind = Literal["none", "fail", "error", "always_error", "delay", "crash_after"]

_SPEC = re.compile(r"^(fail|always_error|crash_after|error:\d+|delay:\d+(\.\d+)?)$")


class InjectedError(RuntimeError):
    """A technical failure injected on purpose (retried per the step's policy)."""


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected fault, or none.

    Attributes:
        kind: What to do.
        amount: N for ``error:N``, S for ``delay:S``.
        name: The ``"<step>.<action>"`` it was found under.
    """

    kind: Kind = "none"
    amount: float = 0.0
    name: str = ""

    @classmethod
    def parse(cls, spec: str, name: str = "") -> Fault:
        """Reads one fault spec such as ``"error:2"``.

        Raises:
            ValueError: The spec is not one of the known faults.
        """
        spec = spec.strip()
        if not _SPEC.match(spec):
            raise ValueError(
                f"fault {name!r}: {spec!r} is not a fault; use fail, error:N, always_error, "
                "delay:S or crash_after"
            )
        kind, _, amount = spec.partition(":")
        return cls(kind, float(amount or 0), name)  # type: ignore[arg-type]

    def before(self, ctx: StepContext) -> None:
        """Applies the faults that strike before the side effect.

        Raises:
            StepFailed: For ``fail``.
            InjectedError: For ``always_error``, ``error:N`` within its first N attempts, and
                a ``delay`` that outlived the step's deadline.
        """
        where = f"{ctx.saga_id}/{ctx.step} ({ctx.phase} attempt {ctx.attempt})"
        if self.kind == "fail":
            raise StepFailed(f"{self.name}: refused on purpose", {"fault": self.name})
        if self.kind == "always_error" or (self.kind == "error" and ctx.attempt <= self.amount):
            raise InjectedError(f"{self.name}: injected technical failure at {where}")
        if self.kind == "delay":
            # Sleep in the handler's worker thread; wake up shortly after the deadline at the
            # latest, since a longer sleep would only hold up the participant's next batch.
            left = max(0.0, ctx.deadline_at - time.time())
            time.sleep(min(self.amount, left + GRACE))
            if time.time() > ctx.deadline_at:
                raise InjectedError(f"{self.name}: too slow, the deadline passed at {where}")

    def after(self, ctx: StepContext, db: ServiceDB) -> None:
        """Applies ``crash_after`` once the side effect is committed: exits the process the
        first time this command is handled."""
        if self.kind != "crash_after":
            return
        if db.mark_crashed(ctx.idempotency_key, time.time()):
            log.warning("%s: crashing on purpose after %s", db.service, ctx.idempotency_key)
            sys.stderr.flush()
            os._exit(CRASH_EXIT_STATUS)  # no cleanup, no reply, no offset commit: a real crash


def fault_for(payload: Mapping[str, Any], ctx: StepContext, action: str) -> Fault:
    """The fault configured for this step and action, or ``Fault()`` for none.

    A malformed fault is a business failure of the step: the order itself is wrong, and
    retrying it cannot help.
    """
    name = f"{ctx.step}.{action}"
    spec = _order_faults(payload).get(name) or _env_faults().get(name)
    base = split_item(ctx.step)[0]
    if not spec and base != ctx.step:
        name = f"{base}.{action}"
        spec = _order_faults(payload).get(name) or _env_faults().get(name)
    if not spec:
        return Fault()
    try:
        return Fault.parse(str(spec), name)
    except ValueError as exc:
        raise StepFailed(str(exc)) from None


def _order_faults(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    faults = payload.get("faults")
    if faults is None and isinstance(payload.get("input"), Mapping):
        faults = payload["input"].get("faults")  # a compensation: {"input": ..., "output": ...}
    return faults if isinstance(faults, Mapping) else {}


def _env_faults() -> Mapping[str, Any]:
    raw = os.environ.get("SAGA_FAULTS")
    if not raw:
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        log.warning("SAGA_FAULTS is not JSON; ignored: %r", raw)
        return {}
    return value if isinstance(value, Mapping) else {}
