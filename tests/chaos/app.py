"""The chaos and durability tests' own services: two sagas, three participants, one ledger.

Run as real processes::

    python -m saga coordinator --app tests.chaos.app:sagas ...
    python -m saga participant --app tests.chaos.app:alpha ...   (also beta, gamma)

Every side effect goes to a SQLite **ledger** (the file named by ``CHAOS_LEDGER``), written in
one transaction and keyed by the command's idempotency key (``INSERT OR IGNORE``), as a real
service passes the key on to its payment provider. The ledger is the tests' oracle, independent
of the engine:

- ``effects``: one row per effect that took place (key, saga, step, phase).
- ``applied``: how often an effect of (saga, step, phase) took place; above 1 is a duplicate
  (the engine sent the same step with a different key, or the service ran it twice).
- ``executions``: how often a handler ran per key, deduplicated or not (redeliveries show here).
- ``voids``: compensations that found no action to undo; an action arriving after its
  compensation is refused, so that nothing takes effect that nobody will undo.
- ``crashes``: the keys whose handler killed its process on purpose (once per key).
- ``fixed``: steps an operator "repaired" (the ``broken`` fault below ends when a row is here).

What a step does is planned in the saga input, so every process agrees on it: ``input["plan"]
[step]`` may hold ``business`` (the action fails for good), ``tech`` / ``comp_tech`` (the first
n runs fail technically), ``crash`` / ``comp_crash`` (``os._exit`` right after the effect is
committed, before the reply, once per key), ``sleep`` / ``comp_sleep`` (seconds), ``hold`` /
``comp_hold`` (runs until the step is in ``fixed``, at most that many seconds), and ``broken`` /
``comp_broken`` (fails technically until the step is in ``fixed``).
"""

from __future__ import annotations

import functools
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from saga import (
    MemoryReplyStore,
    Participant,
    RetryPolicy,
    SagaDefinition,
    SQLiteReplyStore,
    Step,
    StepContext,
    StepFailed,
    StepKind,
)
from saga.core.codec import DEFAULT_LIMITS, Limits
from saga.runtime.stores import ReplyStore

__all__ = [
    "CHAIN",
    "CHAIN_STEPS",
    "COMPENSATABLE",
    "CRASH_EXIT",
    "FRAGILE",
    "SERVICES",
    "Ledger",
    "alpha",
    "beta",
    "gamma",
    "make_participant",
    "sagas",
]

CRASH_EXIT = 17
"""Exit status of a participant that crashed on purpose (the ``crash`` fault)."""

SERVICES = ("alpha", "beta", "gamma")
"""The services, each served by ``tests.chaos.app:<service>``."""

STEP_TIMEOUT = float(os.environ.get("CHAOS_STEP_TIMEOUT", "5"))
"""Seconds a step attempt may take; every process of one test must see the same value."""

# Forward and backward budgets far beyond what a test's faults can use up: the sagas of the
# chaos run must end as their planned faults say, never because a kill exhausted a policy.
_PATIENT = RetryPolicy(max_attempts=60, initial_backoff=0.2, multiplier=2.0, max_backoff=2.0)
# The fragile saga gets stuck quickly, for the operator tests.
_IMPATIENT = RetryPolicy(max_attempts=2, initial_backoff=0.1, max_backoff=0.2)

CHAIN_STEPS = ("a", "b", "c", "p", "r")
"""The chain saga's steps in order: three compensatable, the pivot, one retriable."""
COMPENSATABLE = ("a", "b", "c")

CHAIN = SagaDefinition(
    name="chain",
    description="a -> b -> c (compensatable) -> p (pivot) -> r (retriable)",
    steps=(
        Step(
            name="a",
            service="alpha",
            action="a",
            compensation="undo_a",
            retry=_PATIENT,
            compensation_retry=_PATIENT,
            timeout=STEP_TIMEOUT,
        ),
        Step(
            name="b",
            service="beta",
            action="b",
            compensation="undo_b",
            depends_on="a",
            retry=_PATIENT,
            compensation_retry=_PATIENT,
            timeout=STEP_TIMEOUT,
        ),
        Step(
            name="c",
            service="gamma",
            action="c",
            compensation="undo_c",
            depends_on="b",
            retry=_PATIENT,
            compensation_retry=_PATIENT,
            timeout=STEP_TIMEOUT,
        ),
        Step(
            name="p",
            service="alpha",
            action="p",
            kind=StepKind.PIVOT,
            depends_on="c",
            retry=_PATIENT,
            timeout=STEP_TIMEOUT,
        ),
        Step(
            name="r",
            service="beta",
            action="r",
            kind=StepKind.RETRIABLE,
            depends_on="p",
            retry=_PATIENT,
            timeout=STEP_TIMEOUT,
        ),
    ),
)

FRAGILE = SagaDefinition(
    name="fragile",
    description="f1 (compensatable) -> f2 (pivot) -> f3 (retriable), with short policies",
    steps=(
        Step(
            name="f1",
            service="alpha",
            action="f1",
            compensation="undo_f1",
            retry=_IMPATIENT,
            compensation_retry=_IMPATIENT,
            timeout=10.0,
        ),
        Step(
            name="f2",
            service="beta",
            action="f2",
            kind=StepKind.PIVOT,
            depends_on="f1",
            retry=_IMPATIENT,
            timeout=10.0,
        ),
        Step(
            name="f3",
            service="gamma",
            action="f3",
            kind=StepKind.RETRIABLE,
            depends_on="f2",
            retry=_IMPATIENT,
            timeout=10.0,
        ),
    ),
)

sagas = [CHAIN, FRAGILE]
"""What the coordinator runs."""


# -- the ledger ------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS effects (
    key TEXT PRIMARY KEY, saga_id TEXT NOT NULL, step TEXT NOT NULL, phase TEXT NOT NULL,
    service TEXT NOT NULL, pid INTEGER NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS applied (
    saga_id TEXT NOT NULL, step TEXT NOT NULL, phase TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (saga_id, step, phase));
CREATE TABLE IF NOT EXISTS executions (
    key TEXT PRIMARY KEY, saga_id TEXT NOT NULL, step TEXT NOT NULL, phase TEXT NOT NULL,
    runs INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS voids (
    saga_id TEXT NOT NULL, step TEXT NOT NULL, PRIMARY KEY (saga_id, step));
CREATE TABLE IF NOT EXISTS crashes (key TEXT PRIMARY KEY, pid INTEGER NOT NULL, at REAL);
CREATE TABLE IF NOT EXISTS fixed (
    saga_id TEXT NOT NULL, step TEXT NOT NULL, phase TEXT NOT NULL,
    PRIMARY KEY (saga_id, step, phase));
"""


class Ledger:
    """The side effects of the test services, in one SQLite file shared by every process.

    Args:
        path: The database file; created with its tables if missing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with self._tx() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=60000")
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    # -- written by the services -------------------------------------------------------------

    def count_execution(self, ctx: StepContext) -> int:
        """Counts one run of the handler for ``ctx``'s key; returns the runs so far."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO executions (key, saga_id, step, phase, runs) VALUES (?, ?, ?, ?, 1)"
                " ON CONFLICT (key) DO UPDATE SET runs = runs + 1",
                (ctx.idempotency_key, ctx.saga_id, ctx.step, ctx.phase),
            )
            (runs,) = db.execute(
                "SELECT runs FROM executions WHERE key = ?", (ctx.idempotency_key,)
            ).fetchone()
        return int(runs)

    def apply(self, ctx: StepContext, service: str) -> str:
        """Applies the effect of ``ctx`` once per key.

        Returns:
            ``applied`` (it took effect now), ``already`` (this key took effect before),
            ``void`` (a compensation with no action to undo) or ``refused`` (an action whose
            step was already compensated).
        """
        with self._tx() as db:
            if ctx.phase == "action":
                undone = db.execute(
                    "SELECT 1 FROM voids WHERE saga_id = ? AND step = ? UNION ALL "
                    "SELECT 1 FROM effects WHERE saga_id = ? AND step = ? AND phase = ?",
                    (ctx.saga_id, ctx.step, ctx.saga_id, ctx.step, "compensation"),
                ).fetchone()
                if undone:
                    return "refused"
            else:
                done = db.execute(
                    "SELECT 1 FROM effects WHERE saga_id = ? AND step = ? AND phase = 'action'",
                    (ctx.saga_id, ctx.step),
                ).fetchone()
                if not done:
                    db.execute(
                        "INSERT OR IGNORE INTO voids (saga_id, step) VALUES (?, ?)",
                        (ctx.saga_id, ctx.step),
                    )
                    return "void"
            cursor = db.execute(
                "INSERT OR IGNORE INTO effects (key, saga_id, step, phase, service, pid, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    ctx.idempotency_key,
                    ctx.saga_id,
                    ctx.step,
                    ctx.phase,
                    service,
                    os.getpid(),
                    time.time(),
                ),
            )
            if cursor.rowcount != 1:
                return "already"
            db.execute(
                "INSERT INTO applied (saga_id, step, phase, count) VALUES (?, ?, ?, 1)"
                " ON CONFLICT (saga_id, step, phase) DO UPDATE SET count = count + 1",
                (ctx.saga_id, ctx.step, ctx.phase),
            )
            return "applied"

    def claim_crash(self, key: str) -> bool:
        """True the first time it is called for ``key`` (the process then crashes)."""
        with self._tx() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO crashes (key, pid, at) VALUES (?, ?, ?)",
                (key, os.getpid(), time.time()),
            )
            return cursor.rowcount == 1

    def is_fixed(self, saga_id: str, step: str, phase: str) -> bool:
        """Whether an operator repaired the step (see the ``broken`` fault)."""
        with self._tx() as db:
            row = db.execute(
                "SELECT 1 FROM fixed WHERE saga_id = ? AND step = ? AND phase = ?",
                (saga_id, step, phase),
            ).fetchone()
        return row is not None

    # -- used by the tests -------------------------------------------------------------------

    def fix(self, saga_id: str, step: str, phase: str = "action") -> None:
        """Repairs a ``broken`` step: its next run succeeds."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO fixed (saga_id, step, phase) VALUES (?, ?, ?)",
                (saga_id, step, phase),
            )

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Runs a query (read-only use)."""
        db = self._connect()
        try:
            return [tuple(r) for r in db.execute(sql, params).fetchall()]
        finally:
            db.close()

    def effects(self) -> dict[tuple[str, str, str], int]:
        """(saga, step, phase) -> how many effects took place."""
        found: dict[tuple[str, str, str], int] = {}
        for saga_id, step, phase, count in self.rows(
            "SELECT saga_id, step, phase, COUNT(*) FROM effects GROUP BY saga_id, step, phase"
        ):
            found[(saga_id, step, phase)] = int(count)
        return found

    def duplicates(self) -> list[tuple[str, str, str, int]]:
        """Effects of one (saga, step, phase) that took place more than once."""
        rows = self.rows("SELECT saga_id, step, phase, count FROM applied WHERE count > 1")
        rows += self.rows(
            "SELECT saga_id, step, phase, COUNT(*) FROM effects GROUP BY saga_id, step, phase"
            " HAVING COUNT(*) > 1"
        )
        return [(str(s), str(t), str(p), int(c)) for s, t, p, c in rows]

    def executions(self, saga_id: str | None = None) -> dict[str, int]:
        """Key -> handler runs (of one saga, or all)."""
        if saga_id is None:
            rows = self.rows("SELECT key, runs FROM executions")
        else:
            rows = self.rows("SELECT key, runs FROM executions WHERE saga_id = ?", (saga_id,))
        return {str(k): int(n) for k, n in rows}

    def crashes(self) -> list[str]:
        """The keys whose handler crashed its process on purpose."""
        return [str(k) for (k,) in self.rows("SELECT key FROM crashes ORDER BY at")]


def _ledger() -> Ledger:
    path = os.environ.get("CHAOS_LEDGER")
    if not path:
        raise RuntimeError("CHAOS_LEDGER is not set: the test services need a ledger file")
    return _open_ledger(path)


@functools.cache
def _open_ledger(path: str) -> Ledger:
    return Ledger(path)


# -- the handlers ----------------------------------------------------------------------------


def _run(service: str, payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    compensating = ctx.phase == "compensation"
    saga_input = payload.get("input") if compensating else payload
    plan = ((saga_input or {}).get("plan") or {}).get(ctx.step) or {}
    pre = "comp_" if compensating else ""
    ledger = _ledger()
    runs = ledger.count_execution(ctx)
    if plan.get(pre + "sleep"):
        time.sleep(float(plan[pre + "sleep"]))
    if plan.get(pre + "hold"):
        # Runs until the test releases it (`Ledger.fix`), at most `hold` seconds: a test that
        # must act while the step runs does not race the handler's clock.
        until = time.monotonic() + float(plan[pre + "hold"])
        while time.monotonic() < until and not ledger.is_fixed(ctx.saga_id, ctx.step, ctx.phase):
            time.sleep(0.05)
    if plan.get(pre + "broken") and not ledger.is_fixed(ctx.saga_id, ctx.step, ctx.phase):
        raise RuntimeError(f"{ctx.step} {ctx.phase} is broken until an operator fixes it")
    if runs <= int(plan.get(pre + "tech", 0)):
        raise RuntimeError(f"injected technical failure (run {runs})")
    if not compensating and plan.get("business"):
        raise StepFailed("injected business failure", {"step": ctx.step})
    outcome = ledger.apply(ctx, service)
    if outcome == "refused":
        raise StepFailed("the step was compensated before this action arrived")
    if plan.get(pre + "crash") and ledger.claim_crash(ctx.idempotency_key):
        os._exit(CRASH_EXIT)  # after the effect, before the reply: the worst moment
    return {"by": service, "key": ctx.idempotency_key}


def _store(service: str) -> ReplyStore:
    path = os.environ.get("CHAOS_LEDGER")
    if not path:
        return MemoryReplyStore()
    return SQLiteReplyStore(Path(path).with_name(f"replies-{service}.db"))


def make_participant(
    service: str,
    *,
    store: ReplyStore | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Participant:
    """A participant of ``service`` with every handler it owns (for in-process use too: run it
    with ``participant.run(transport, prefix=...)``)."""
    participant = Participant(service, store=store or _store(service), limits=limits)
    for definition in sagas:
        for step in definition.steps:
            if step.service != service or step.action is None:
                continue
            participant.handler(step.action)(functools.partial(_run, service))
            if step.compensation is not None:
                participant.handler(step.compensation)(functools.partial(_run, service))
    return participant


# Factories, which `saga participant --app tests.chaos.app:alpha` calls: a process builds
# only its own service's participant, and so opens only its own reply store.


def alpha() -> Participant:
    """The alpha service (steps a, p, f1)."""
    return make_participant("alpha")


def beta() -> Participant:
    """The beta service (steps b, r, f2)."""
    return make_participant("beta")


def gamma() -> Participant:
    """The gamma service (steps c, f3)."""
    return make_participant("gamma")
