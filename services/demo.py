"""The pasta order demo: the coordinator and five services as processes, a batch of orders.

Run ``python -m services.demo`` (``make demo`` starts Kafka and Jaeger first). It:

1. starts the coordinator and the location, payment, restaurant, rider and notification
   services as separate processes under a fresh topic prefix and data directory, and waits
   until a canary order goes through all of them; beside them the operators' console
   (``saga serve``, acting as the operator) on ``--console-port`` (``SAGA_CONSOLE_PORT``,
   default 8080), whose address it prints before the batch (if the port is taken it says so
   and goes on without the console);
2. places a batch of orders (``--count``, default 40) as ``order-placed`` events on the
   order topic (`services.app.order_topics`), each of which starts a saga; about a quarter of
   them fail on purpose: a declined card, a refusing restaurant, a flaky rider app and SMS
   gateway (errors that retries absorb), a kitchen that breaks down at the pivot, one slow
   restaurant whose every attempt times out, and one order whose refund keeps failing, which
   ends ``stuck``; one in eight waits: a large order the manager approves (after a reminder),
   one the manager rejects (compensated), one nobody decides until it is escalated to the
   operator, who approves it, and an order for later, whose cooking waits for its delivery
   window to open;
3. plays the people meanwhile: each restaurant's kitchen confirms its orders with the
   ``kitchen_confirmed`` signal (`SagaClient.signal`, what ``saga signal`` sends), and the
   manager and the operator decide the large orders (`SagaClient.approve` and ``reject``, what
   ``saga approve`` and ``saga reject`` send), as ``manager`` and ``operator``;
4. prints a progress line per second, then a summary: outcomes against expectations,
   throughput, saga and per-step latencies measured from the event log, the approvals,
   confirmations and delivery windows, the ``order-completed`` and ``order-cancelled`` outcome
   events it consumed (checked against how each saga ended), the dishes fan-out, what the
   console indexed (checked against the log), and where to look next (the console, the
   traces, ``saga replay``); once the batch has ended it also runs one party's ``catering``
   (three orders, each a ``catering_order`` sub-saga) and shows its tree;
5. stops every process it started, the console included (SIGTERM, then SIGKILL after a grace
   period), also on Ctrl-C or an error.

Trace links (`saga.views.jaeger.trace_link`) open a Jaeger UI's page where one is given
(``--jaeger-ui`` or ``SAGA_JAEGER_UI``), else the console's trace page, which draws the trace
from Jaeger's query API: the locally built Jaeger has no UI.

It exits with status 0 when every saga reached a final state (completed, compensated or
stuck), 1 otherwise, 130 when interrupted.

By default it runs unsigned on the plain broker of ``make kafka-up``. With ``--secure`` (or
``SAGA_DEMO_SECURE=1``; ``make demo SECURE=1``) it runs on the secured broker of ``make
kafka-up SECURE=1`` (TLS, SASL/SCRAM, ACLs; its users and CA are read from the cache), with
every process signing as its own principal, the policy enforced and payloads sealed: the keys,
keyring, policy and payload keys are made on the first run in
``~/.cache/saga-engine/secure/demo`` and reused afterwards (`services.secure.SecureSetup`), the
prefix's ACLs are granted at start, and an ``operator.env`` there lets the ``saga`` commands
of the summary run as the operator. The console then connects and signs as the operator and
takes a bearer token made for the run, which the demo prints (sign in with it).

The slow-restaurant order is placed once the rest of the batch is past the kitchen. A
participant handles one polled batch of commands at a time, so a handler that stalls until its
deadline holds up every restaurant command that arrives meanwhile; sent with the others, it
would time out innocent orders along with itself.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shlex
import signal
import socket
import sys
import time
import urllib.parse
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import anyio
import orjson
from anyio.abc import TaskStatus

from deploy._proc import InfraError, PortInUseError, StartError, free_port
from deploy.tls import write_private
from saga import (
    SagaClient,
    SagaError,
    SagaState,
    SagaStatus,
    SagaTimeout,
    StepStatus,
    TransportError,
)
from saga.core.messages import (
    ApprovalReminded,
    CompensationStarted,
    CompensationSucceeded,
    EventBase,
    StepExpanded,
    StepRetryScheduled,
    StepScheduled,
    StepStarted,
    StepSucceeded,
    StepTimedOut,
)
from saga.core.replay import Replay
from saga.runtime.ports import Record, Transport
from saga.views.jaeger import DEFAULT_CONSOLE_URL, jaeger_ui, trace_link
from services.app import DISHES_PARALLEL, KITCHEN_SIGNAL, order_topics
from services.fleet import PARTICIPANTS, Console, Fleet
from services.orders import make_catering, make_order, place, submit_catering
from services.secure import MANAGER, OPERATOR, LocalSecureBroker, SecureSetup

__all__ = [
    "LogTail",
    "OutcomeTail",
    "Scenario",
    "main",
    "plan_orders",
    "scenarios",
    "waiting_scenarios",
]

CONSOLE_PORT = 8080
"""The console's port unless ``--console-port`` or ``SAGA_CONSOLE_PORT`` says otherwise."""

SECURED_HOW = "make kafka-down && make kafka-up SECURE=1 && make demo SECURE=1"
"""How to run the demo secured, as the unsigned run says."""


@dataclass(frozen=True, slots=True)
class Scenario:
    """A kind of order in the batch and the outcome it should have.

    Attributes:
        name: What it shows, for the summary.
        faults: Faults for `services.faults`.
        expect: The saga's end.
        large: A large order (over `services.app.LARGE_ORDER`): it needs an approval.
        decision: Who decides it and how: ``approve`` and ``reject`` (the manager, after the
            first reminder), ``escalate`` (nobody until it is escalated, then the operator
            approves); None for an order that needs no approval.
        later: Seconds from now until its delivery window opens (its ``cook`` step's timer).
    """

    name: str
    faults: dict[str, str]
    expect: SagaStatus
    large: bool = False
    decision: Literal["approve", "reject", "escalate"] | None = None
    later: float = 0.0


HAPPY = Scenario("happy", {}, SagaStatus.COMPLETED)
SLOW = "slow restaurant (every attempt times out)"

APPROVAL_REMIND = 2.0
"""Seconds after which a pending approval is reminded, in the demo (``SAGA_APPROVAL_REMIND``)."""
APPROVAL_ESCALATE = 8.0
"""Seconds after which it is escalated to the operator (``SAGA_APPROVAL_ESCALATE``)."""
APPROVAL_TIMEOUT = 60.0
"""Seconds after which an undecided approval counts as rejected (``SAGA_APPROVAL_TIMEOUT``)."""
_MANAGER_THINKS = 3.0  # the manager decides after the reminder, before the escalation
_OPERATOR_THINKS = 9.0  # the operator decides once the escalation reached them
LATER = 10.0
"""Seconds until the delivery window of the orders for later opens."""


def scenarios(step_timeout: float) -> list[Scenario]:
    """The failing scenarios, the ones that appear once first, then those that repeat."""
    slow = f"delay:{step_timeout + 2:g}"
    return [
        Scenario("card declined", {"payment.charge": "fail"}, SagaStatus.COMPENSATED),
        Scenario("restaurant refuses", {"restaurant.accept": "fail"}, SagaStatus.COMPENSATED),
        Scenario("rider app error, then ok", {"rider.assign": "error:1"}, SagaStatus.COMPLETED),
        Scenario(
            "SMS gateway errors, then ok",
            {"notify.notify_customer": "error:2"},
            SagaStatus.COMPLETED,
        ),
        Scenario(SLOW, {"restaurant.accept": slow}, SagaStatus.COMPENSATED),
        Scenario(
            "refund keeps failing",
            {"restaurant.accept": "fail", "payment.refund": "always_error"},
            SagaStatus.STUCK,
        ),
        Scenario(
            "kitchen breaks down (pivot)", {"cook.start_cooking": "fail"}, SagaStatus.COMPENSATED
        ),
    ]


def waiting_scenarios() -> list[Scenario]:
    """The orders that wait for people or for time, in the order they are taken."""
    return [
        Scenario("large order, manager approves", {}, SagaStatus.COMPLETED, True, "approve"),
        Scenario(f"for later (window opens in {LATER:g}s)", {}, SagaStatus.COMPLETED, later=LATER),
        Scenario("large order, manager rejects", {}, SagaStatus.COMPENSATED, True, "reject"),
        Scenario(
            "large order, escalated, operator approves", {}, SagaStatus.COMPLETED, True, "escalate"
        ),
    ]


_REPEATING = (0, 1, 2, 3, 6)  # indexes of the scenarios that may appear more than once


def plan_orders(count: int, step_timeout: float) -> list[tuple[Scenario, dict[str, Any]]]:
    """The batch: ``count`` orders, one in four failing on purpose (at least one of each
    failing scenario when the batch is big enough) and one in eight waiting for an approval or
    a later delivery window, spread evenly through it. Every order's kitchen confirms it by
    hand (the demo plays the kitchens)."""
    failing = scenarios(step_timeout)
    wanted = max(1, round(count / 4)) if count >= 2 else 0
    chosen = failing[:wanted]
    i = 0
    while len(chosen) < wanted:
        chosen.append(failing[_REPEATING[i % len(_REPEATING)]])
        i += 1
    waiting = waiting_scenarios()
    extra = [waiting[k % len(waiting)] for k in range(round(count / 8) if count >= 4 else 0)]
    # Interleaved, so that both kinds are spread through the batch.
    special: list[Scenario] = []
    for k in range(max(len(chosen), len(extra))):
        special += chosen[k : k + 1] + extra[k : k + 1]
    every = count / len(special) if special else math.inf
    slots = {min(count - 1, int(k * every + every / 2)): s for k, s in enumerate(special)}
    plan: list[tuple[Scenario, dict[str, Any]]] = []
    for n in range(count):
        scenario = slots.get(n, HAPPY)
        order = make_order(
            n + 1,
            scenario.faults or None,
            large=scenario.large,
            kitchen_confirms=True,
        )
        plan.append((scenario, order))
    return plan


def _open_windows(plan: Sequence[tuple[Scenario, dict[str, Any]]]) -> None:
    """Sets the delivery windows of the orders for later, counted from now (when they are
    placed, not when the batch was planned)."""
    now = time.time()
    for scenario, order in plan:
        if scenario.later:
            opens = datetime.fromtimestamp(now + scenario.later, UTC)
            order["deliver_after"] = opens.isoformat(timespec="milliseconds")


# -- watching the log --------------------------------------------------------------------------


@dataclass
class LogTail:
    """Folds the saga log into states as the coordinator writes it (a read model)."""

    transport: Transport
    prefix: str
    replay: Replay[Record] = field(default_factory=Replay[Record])
    """The fold; records it cannot use are set aside in it (only the coordinator writes the
    log, so there are none to show)."""
    events: dict[str, list[EventBase]] = field(default_factory=lambda: defaultdict(list))
    """Each saga's folded events, in order."""

    @property
    def states(self) -> dict[str, SagaState]:
        """Every saga's state so far, by saga id."""
        return self.replay.states

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Reads the log from the start until cancelled."""
        # Under `<prefix>.view`: the groups a client may use on a secured broker.
        group = f"{self.prefix}.view.demo-watch-{uuid.uuid4().hex[:8]}"
        async with self.transport.consumer(group, [f"{self.prefix}.log"]) as consumer:
            task_status.started()
            while True:
                for record in await consumer.poll(0.2, 1000):
                    folded = self.replay.add_log_record(record)
                    if folded is not None:
                        self.events[folded.event.saga_id].append(folded.event)


@dataclass
class OutcomeTail:
    """Reads the order's outcome events (``order-completed``, ``order-cancelled``), as the
    services that follow orders would."""

    transport: Transport
    prefix: str
    events: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    """Each order's outcome events, in the order read."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Reads both topics from the start until cancelled."""
        topics = order_topics(self.prefix)
        group = f"{self.prefix}.view.demo-outcomes-{uuid.uuid4().hex[:8]}"
        sources = [topics.completed, topics.cancelled]
        async with self.transport.consumer(group, sources) as consumer:
            task_status.started()
            while True:
                for record in await consumer.poll(0.2, 1000):
                    if record.key is not None and record.value:
                        self.events[record.key.decode()].append(orjson.loads(record.value))


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Run:
    """One demo run's inputs and what it observed."""

    args: argparse.Namespace
    fleet: Fleet
    step_timeout: float
    plan: list[tuple[Scenario, dict[str, Any]]]
    tail: LogTail | None = None
    outcomes: OutcomeTail | None = None
    submitted_at: float = 0.0
    slow_sent_at: float | None = None
    confirmed: set[str] = field(default_factory=set)
    """Orders whose kitchen confirmation the demo sent."""
    decided: dict[str, str] = field(default_factory=dict)
    """Order id to the decision the demo sent on its approval (``approve`` or ``reject``)."""
    catering: list[SagaState] = field(default_factory=list)
    """The party's catering saga after the batch, then its child sagas, once it ended."""
    console: Console | None = None
    """The console, once it answered."""
    no_console: str = ""
    """Why there is no console, when there is none."""

    @property
    def ids(self) -> list[str]:
        return [str(order["order_id"]) for _, order in self.plan]

    def states(self) -> list[SagaState]:
        assert self.tail is not None
        return [s for i in self.ids if (s := self.tail.states.get(i)) is not None]


async def _drive(run: Run) -> bool:
    fleet = run.fleet
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(fleet.client())
        manager = await stack.enter_async_context(fleet.manager())
        operator = await stack.enter_async_context(fleet.operator())
        print("waiting for the coordinator and the services (a canary order goes through) ...")
        # The console follows the saga topics: made first (on a secured broker the operator,
        # whom the console acts as, may not make them), so that it starts beside the canary.
        await fleet.ensure_topics(client)
        console = _start_console(run)
        ready = await fleet.wait_ready(client, timeout=run.args.ready_timeout)
        print(f"all six processes serving; the canary order took {ready:.1f}s end to end")
        if console is not None:
            await _console_up(run, console)
        print()
        run.tail = LogTail(client.transport, fleet.prefix)
        run.outcomes = OutcomeTail(client.transport, fleet.prefix)
        async with anyio.create_task_group() as tg:
            await tg.start(run.tail.run)
            await tg.start(run.outcomes.run)
            for restaurant in sorted({str(o["restaurant"]) for _, o in run.plan}):
                kitchen = await stack.enter_async_context(fleet.client())
                tg.start_soon(_kitchen, run, restaurant, kitchen)
            tg.start_soon(_decider, run, MANAGER, manager)
            tg.start_soon(_decider, run, OPERATOR, operator)
            held = [(s, o) for s, o in run.plan if s.name == SLOW]
            first = [o for s, o in run.plan if s.name != SLOW]
            _open_windows(run.plan)
            run.submitted_at = time.time()
            topic = order_topics(fleet.prefix).placed
            await place(client.transport, topic, first)
            print(
                f"placed {len(first)} orders at once as order-placed events on {topic}"
                + (", holding one back" if held else "")
            )
            ended = await _watch(run, client, held)
            # The outcome events are written with the sagas' last events: a moment more.
            await _outcomes_in(run, 5.0)
            if ended:
                await _catering(run, client)
            tg.cancel_scope.cancel()
    return ended


def _start_console(run: Run) -> Console | None:
    """Starts the console on the chosen port, or says in one line why it cannot."""
    port = run.args.console_port or free_port()
    try:
        return run.fleet.start_console(port, jaeger_ui=run.args.jaeger_ui)
    except PortInUseError:
        run.no_console = f"port {port} is in use"
    except OSError as exc:
        run.no_console = f"it could not start: {exc}"
    print(
        f"console: {run.no_console}; going on without it "
        "(--console-port or SAGA_CONSOLE_PORT picks another port)"
    )
    return None


async def _console_up(run: Run, console: Console, timeout: float = 60.0) -> None:
    """Waits until the console answers, then prints where it is; if it does not, says so in
    one line and stops it (the demo goes on without it)."""
    try:
        await anyio.to_thread.run_sync(console.wait_answering, timeout)
    except StartError as exc:
        reason = str(exc).split(". ", 1)[0].removeprefix("the console ")
        run.no_console = f"it {reason}; see {console.process.log_path}"
        print(f"console: {run.no_console}; going on without it")
        console.process.stop(run.fleet.grace)
        return
    run.console = console
    bar = "-" * 78
    print(bar)
    print(f"  CONSOLE  {console.url}/   the orders live: list, saga pages, timelines, traces")
    if console.token is not None:
        print(f"           sign in as the {console.principal} with the token {console.token}")
    else:
        print(f"           no sign-in (local development): you act as the {console.principal}")
    print(bar)


async def _catering(run: Run, client: SagaClient, timeout: float = 60.0) -> None:
    """Runs one party's catering (three orders, each a sub-saga) and keeps its tree."""
    party = make_catering(900, orders=3)
    (saga_id,) = await submit_catering(client, [party])
    print(f"\na party's catering {saga_id}: {len(party['orders'])} orders as sub-sagas ...")
    try:
        state = await client.wait(saga_id, timeout, poll=0.2)
    except SagaTimeout:
        print(f"  it did not end within {timeout:.0f}s")
        return
    run.catering = [state]
    for step in state.steps.values():
        child = await client.status(step.child) if step.child is not None else None
        if child is not None:
            run.catering.append(child)


async def _outcomes_in(run: Run, timeout: float) -> None:
    assert run.outcomes is not None
    outcomes = run.outcomes
    with anyio.move_on_after(timeout):
        while True:
            missing = [s for s in run.states() if s.is_final and s.saga_id not in outcomes.events]
            if not missing:
                return
            await anyio.sleep(0.2)


async def _kitchen(run: Run, restaurant: str, client: SagaClient) -> None:
    """One restaurant's kitchen tablet: confirms each of its orders once the saga waits for
    the confirmation (one client per kitchen, so that the kitchens confirm side by side)."""
    assert run.tail is not None
    tail = run.tail
    mine = [str(o["order_id"]) for _, o in run.plan if o["restaurant"] == restaurant]
    while True:
        await anyio.sleep(0.1)
        for saga_id in mine:
            state = tail.states.get(saga_id)
            if state is None or state.is_final or saga_id in run.confirmed:
                continue
            if state.steps["kitchen"].status is StepStatus.RUNNING:
                run.confirmed.add(saga_id)
                accepted = state.steps["restaurant"].output or {}
                chef = _CHEFS[int(accepted.get("ticket", 0)) % len(_CHEFS)]
                data = {"chef": chef, "ready_in_minutes": accepted.get("prep_minutes", 15)}
                await client.signal(saga_id, KITCHEN_SIGNAL, data)


async def _decider(run: Run, who: str, client: SagaClient) -> None:
    """The manager (``who == "manager"``) decides the large orders after the first
    reminder; the operator approves those nobody decided until they were escalated."""
    assert run.tail is not None
    tail = run.tail
    scenario_of = {str(o["order_id"]): s for s, o in run.plan}
    while True:
        await anyio.sleep(0.2)
        now = time.time()
        for saga_id, scenario in scenario_of.items():
            state = tail.states.get(saga_id)
            if state is None or state.is_final or saga_id in run.decided:
                continue
            if state.steps["approval"].status is not StepStatus.RUNNING:
                continue
            asked = _started_at(tail.events[saga_id], "approval")
            if asked is None:
                continue
            if who == OPERATOR and scenario.decision == "escalate":
                if now - asked >= _OPERATOR_THINKS:
                    run.decided[saga_id] = "approve"
                    await client.approve(saga_id, "approval", "escalated to me: approved")
            elif who != OPERATOR and scenario.decision in ("approve", "reject"):
                if now - asked < _MANAGER_THINKS:
                    continue
                run.decided[saga_id] = str(scenario.decision)
                if scenario.decision == "reject":
                    note = "too many portions for one rider: call the customer"
                    await client.reject(saga_id, "approval", note)
                else:
                    await client.approve(saga_id, "approval", "a party, fine")


_CHEFS = ("Gino", "Rosa", "Tommaso", "Chiara")


def _started_at(events: Sequence[EventBase], step: str) -> float | None:
    return next((e.at for e in events if isinstance(e, StepStarted) and e.step == step), None)


async def _watch(run: Run, client: SagaClient, held: list[tuple[Scenario, dict[str, Any]]]) -> bool:
    total = len(run.plan)
    deadline = time.monotonic() + run.args.timeout
    while True:
        await anyio.sleep(1.0)
        states = run.states()
        if held and run.slow_sent_at is None and _past_the_kitchen(run):
            await place(
                client.transport, order_topics(run.fleet.prefix).placed, [o for _, o in held]
            )
            run.slow_sent_at = time.time()
            print("  -> the rest is past the kitchen: placing the slow-restaurant order now")
        counts = Counter(s.status for s in states)
        ended = sum(
            counts[s] for s in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.STUCK)
        )
        print(_progress_line(time.time() - run.submitted_at, ended, total, counts), flush=True)
        if ended == total:
            return True
        if time.monotonic() > deadline:
            print(f"giving up after {run.args.timeout:.0f}s: {total - ended} sagas have not ended")
            return False


def _past_the_kitchen(run: Run) -> bool:
    assert run.tail is not None
    for scenario, order in run.plan:
        if scenario.name == SLOW:
            continue
        state = run.tail.states.get(str(order["order_id"]))
        if state is None:
            return False
        if not state.is_final and state.steps["cook"].status is not StepStatus.SUCCEEDED:
            return False
    return True


def _progress_line(elapsed: float, ended: int, total: int, counts: Counter[SagaStatus]) -> str:
    width = 30
    filled = width * ended // total if total else width
    bar = "#" * filled + "." * (width - filled)
    parts = " ".join(f"{status.value} {counts[status]:>3}" for status in SagaStatus)
    return f"[{elapsed:6.1f}s] [{bar}] {ended:>3}/{total} ended | {parts}"


# -- the summary ------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _stats(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    return (
        f"mean {mean * 1000:7.0f} ms   p50 {_percentile(values, 50) * 1000:7.0f} ms   "
        f"p95 {_percentile(values, 95) * 1000:7.0f} ms   max {max(values) * 1000:7.0f} ms"
        f"   (n={len(values)})"
    )


def _saga_seconds(events: Sequence[EventBase]) -> float | None:
    if len(events) < 2:
        return None
    return events[-1].at - events[0].at


def _step_seconds(events: Iterable[EventBase]) -> tuple[dict[str, float], dict[str, float]]:
    """Per step: first StepStarted -> StepSucceeded, and first CompensationStarted ->
    CompensationSucceeded (retries included: that is what the saga waited)."""
    started: dict[str, float] = {}
    undo_started: dict[str, float] = {}
    done: dict[str, float] = {}
    undone: dict[str, float] = {}
    for e in events:
        if isinstance(e, StepStarted | StepExpanded):  # a fan-out expands: its items start
            started.setdefault(e.step, e.at)
        elif isinstance(e, StepSucceeded) and e.step in started:
            done[e.step] = e.at - started[e.step]
        elif isinstance(e, CompensationStarted):
            undo_started.setdefault(e.step, e.at)
        elif isinstance(e, CompensationSucceeded) and e.step in undo_started:
            undone[e.step] = e.at - undo_started[e.step]
    return done, undone


def _summary(run: Run) -> None:
    assert run.tail is not None
    tail = run.tail
    states = {s.saga_id: s for s in run.states()}
    counts = Counter(s.status for s in states.values())
    total = len(run.plan)
    print("\n" + "=" * 78)
    print(f"SUMMARY  prefix {run.fleet.prefix}   {total} orders")
    if run.console is not None:
        print(f"CONSOLE  {run.console.url}/   (until the demo stops)")
    print("=" * 78)
    final = (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.STUCK)
    not_ended = total - sum(counts[status] for status in final)
    print(
        "outcomes:  "
        + "   ".join(f"{status.value} {counts[status]}" for status in final)
        + (f"   NOT ENDED {not_ended}" if not_ended else "")
    )

    print(f"\n  {'scenario':<42} orders  {'expected':<13} got")
    by_scenario: dict[str, list[tuple[Scenario, str]]] = defaultdict(list)
    for scenario, order in run.plan:
        by_scenario[scenario.name].append((scenario, str(order["order_id"])))
    mismatches = 0
    for name, items in by_scenario.items():
        got = Counter(states[i].status.value if i in states else "not started" for _, i in items)
        expect = items[0][0].expect.value
        ok = set(got) == {expect}
        mismatches += not ok
        shown = ", ".join(f"{k} {v}" for k, v in sorted(got.items()))
        print(
            f"  {name:<42} {len(items):>5}  {expect:<13} {shown}"
            + ("  ok" if ok else "  <-- unexpected")
        )

    # Throughput over the batch sent at once (the held-back slow order runs on its own).
    main_ids = [str(o["order_id"]) for s, o in run.plan if s.name != SLOW]
    main_events = [tail.events[i] for i in main_ids if tail.events.get(i)]
    if main_events:
        first = min(ev[0].at for ev in main_events)
        last = max(ev[-1].at for ev in main_events)
        span = max(last - first, 1e-9)
        print(
            f"\nthroughput: {len(main_events)} sagas of the batch ended in {span:.2f}s"
            f" = {len(main_events) / span:.1f} sagas/s"
            f"  (first start to last end, from the log's timestamps)"
        )
    all_events = [tail.events[i] for i in run.ids if tail.events.get(i)]
    if all_events:
        first = min(ev[0].at for ev in all_events)
        last = max(ev[-1].at for ev in all_events)
        print(f"whole run including the slow order: {last - first:.2f}s")

    print("\nsaga latency (SagaStarted -> final event):")
    by_outcome: dict[str, list[float]] = defaultdict(list)
    for saga_id in main_ids:
        seconds = _saga_seconds(tail.events.get(saga_id, []))
        if seconds is not None and saga_id in states:
            by_outcome["all of the batch"].append(seconds)
            by_outcome[states[saga_id].status.value].append(seconds)
    for outcome, values in by_outcome.items():
        print(f"  {outcome:<17} {_stats(values)}")

    print("\nstep latency (first StepStarted -> StepSucceeded, retries included):")
    step_times: dict[str, list[float]] = defaultdict(list)
    undo_times: dict[str, list[float]] = defaultdict(list)
    retries: Counter[str] = Counter()
    for saga_id in main_ids:
        events = tail.events.get(saga_id, [])
        done, undone = _step_seconds(events)
        for step, seconds in done.items():
            step_times[step].append(seconds)
        for step, seconds in undone.items():
            undo_times[step].append(seconds)
        for e in events:
            if isinstance(e, StepStarted) and e.attempt > 1:
                retries[e.step] += 1
    for step in _STEPS:
        extra = f"   retries {retries[step]}" if retries[step] else ""
        print(f"  {step:<11} {_stats(step_times.get(step, []))}{extra}")
    if undo_times:
        print("compensation latency (first CompensationStarted -> CompensationSucceeded):")
        for step in ("rider", "restaurant", "payment", "location"):
            if undo_times.get(step):
                print(f"  {step:<11} {_stats(undo_times[step])}")

    slow = [str(o["order_id"]) for s, o in run.plan if s.name == SLOW]
    for saga_id in slow:
        events = tail.events.get(saga_id, [])
        timeouts = sum(isinstance(e, StepRetryScheduled | StepTimedOut) for e in events)
        seconds = _saga_seconds(events)
        if seconds is not None:
            state = states.get(saga_id)
            print(
                f"\nslow restaurant {saga_id}: {timeouts} attempts of {run.step_timeout:g}s timed"
                f" out, then {state.status.value if state else '?'} after {seconds:.1f}s"
            )
    _waiting(run, states)
    mismatches += _fan_out(run, states)
    mismatches += _outcome_events(run, states)
    mismatches += _console_index(run, states)
    if mismatches:
        print(f"\nWARNING: {mismatches} check(s) did not come out as expected (see above)")
    _next_steps(run, states)


_STEPS = (
    "approval",
    "location",
    "payment",
    "restaurant",
    "kitchen",
    "dishes",
    "rider",
    "cook",
    "notify",
)


def _waiting(run: Run, states: dict[str, SagaState]) -> None:
    """The approvals, the kitchens' confirmations and the delivery windows."""
    assert run.tail is not None
    tail = run.tail
    print("\nwaiting for people and for time:")
    asked = reminded = escalated = 0
    decisions: Counter[str] = Counter()
    for saga_id in run.ids:
        events = tail.events.get(saga_id, [])
        if _started_at(events, "approval") is None:
            continue
        asked += 1
        for e in events:
            if isinstance(e, ApprovalReminded):
                escalated += e.escalated
                reminded += not e.escalated
        approval = states[saga_id].steps["approval"] if saga_id in states else None
        if approval is not None and approval.output:
            decisions[f"approved by {approval.output.get('by')}"] += 1
        elif approval is not None and approval.error is not None:
            decisions[f"{approval.error.type.lower()}: {approval.error.message}"] += 1
    skipped = sum(
        1
        for i in run.ids
        if i in states and states[i].steps["approval"].status is StepStatus.SKIPPED
    )
    print(
        f"  approvals: {asked} large orders asked the manager ({skipped} small ones skipped the "
        f"step); reminders {reminded}, escalations to the operator {escalated}"
    )
    for decision, n in sorted(decisions.items()):
        print(f"    {n} x {decision}")
    kitchen_waits = [
        done["kitchen"]
        for i in run.ids
        if "kitchen" in (done := _step_seconds(tail.events.get(i, []))[0])
    ]
    waited = (
        f"the sagas waited {_percentile(kitchen_waits, 50) * 1000:.0f} ms (p50), "
        f"{max(kitchen_waits) * 1000:.0f} ms at most, for them"
        if kitchen_waits
        else "no saga waited for one"
    )
    print(
        f"  kitchen confirmations: {len(run.confirmed)} `{KITCHEN_SIGNAL}` signals sent; {waited}"
    )
    for scenario, order in run.plan:
        if not scenario.later:
            continue
        saga_id = str(order["order_id"])
        events = tail.events.get(saga_id, [])
        scheduled = next(
            (e for e in events if isinstance(e, StepScheduled) and e.step == "cook"), None
        )
        cooked = _started_at(events, "cook")
        if cooked is None:
            print(f"  delivery window of {saga_id}: cook never started")
            continue
        if scheduled is None:
            print(
                f"  delivery window of {saga_id}: it had opened when cook could start (no timer "
                "needed), cook started at once"
            )
            continue
        ahead = scheduled.due_at - scheduled.at
        print(
            f"  delivery window of {saga_id}: cook scheduled at +{scheduled.at - events[0].at:.1f}s"
            f" for {ahead:.1f}s later, started {cooked - scheduled.due_at:+.2f}s from the window"
        )


def _fan_out(run: Run, states: dict[str, SagaState]) -> int:
    """The dishes fan-out over the batch, and the catering's tree of sub-sagas; the
    problems found."""
    prepared = discarded = orders = 0
    for state in states.values():
        items = [s for name, s in state.steps.items() if name.startswith("dishes[")]
        orders += bool(items)
        prepared += sum(s.status in (StepStatus.SUCCEEDED, StepStatus.COMPENSATED) for s in items)
        discarded += sum(s.status is StepStatus.COMPENSATED for s in items)
    print(
        f"\nfan-out: {prepared} dishes prepared as items dishes[i] of {orders} orders "
        f"(up to {DISHES_PARALLEL} at a time), {discarded} of them discarded when their order "
        "was undone"
    )
    if not run.catering:
        return 0
    party, *children = run.catering
    print(
        f"sub-sagas: catering {party.saga_id} {party.status.value} with {len(children)} "
        "catering_order children:"
    )
    for child in children:
        print(f"    {child.saga_id:<40} {child.status.value}")
    ok = party.status is SagaStatus.COMPLETED and all(
        c.status is SagaStatus.COMPLETED for c in children
    )
    return 0 if ok else 1


def _outcome_events(run: Run, states: dict[str, SagaState]) -> int:
    """The outcome events consumed, checked against the sagas' ends; the problems found."""
    assert run.outcomes is not None
    got = {i: run.outcomes.events.get(i, []) for i in run.ids}
    kinds = Counter(
        f"{e.get('type')} ({e.get('status')})" if e.get("status") else str(e.get("type"))
        for events in got.values()
        for e in events
    )
    topics = order_topics(run.fleet.prefix)
    print(f"\noutcome events consumed from {topics.completed} and {topics.cancelled}:")
    print("  " + ("   ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none"))
    wrong = 0
    for saga_id, state in states.items():
        if not state.is_final:
            continue
        wanted = "order-completed" if state.status is SagaStatus.COMPLETED else "order-cancelled"
        if [e.get("type") for e in got[saga_id]] != [wanted]:
            wrong += 1
            print(f"  {saga_id} ended {state.status.value} but published {got[saga_id]}")
    if not wrong:
        print("  every order that ended published exactly one, matching how it ended")
    example = next((e[0] for e in got.values() if e and e[0].get("approved_by")), None)
    if example is not None:
        print(f"  e.g. {orjson.dumps(example).decode()[:200]}")
    return 1 if wrong else 0


def _console_orders(console: Console) -> dict[str, str]:
    """Every order the console's index holds, with its status (``GET /api/v1/sagas``).

    Raises:
        OSError: The console did not answer.
    """
    found: dict[str, str] = {}
    cursor = ""
    while True:
        query = urllib.parse.urlencode(
            {"saga_id_prefix": "order-", "limit": 500, **({"cursor": cursor} if cursor else {})}
        )
        page = console.get(f"/api/v1/sagas?{query}")
        for state in page["sagas"]:
            found[state["saga_id"]] = state["status"]
        cursor = page.get("next_cursor") or ""
        if not cursor:
            return found


def _console_index(run: Run, states: dict[str, SagaState], timeout: float = 15.0) -> int:
    """What the console indexed, checked against the log; the problems found."""
    console = run.console
    if console is None:
        print(f"\nconsole: none ({run.no_console})")
        return 0
    want = {i: states[i].status.value for i in run.ids if i in states}
    deadline = time.monotonic() + timeout
    while True:  # its index follows the log: it may be a moment behind
        try:
            got = _console_orders(console)
        except (OSError, ValueError, KeyError) as exc:
            print(f"\nconsole: {console.url} did not answer its API: {exc}")
            return 1
        wrong = {i for i, status in want.items() if got.get(i) != status}
        if not wrong or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    counts = Counter(got.get(i, "missing") for i in run.ids)
    shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"\nconsole: {console.url}/ ({console.principal}'s view) indexed {shown}")
    if wrong:
        print(f"  {len(wrong)} orders not as the log has them, e.g. {sorted(wrong)[:3]}")
        return 1
    print(f"  all {len(want)} orders of the batch, each in the state the log shows")
    return 0


def _next_steps(run: Run, states: dict[str, SagaState]) -> None:
    prefix, bootstrap = run.fleet.prefix, run.args.bootstrap_servers
    common = f"--prefix {prefix} --bootstrap-servers {bootstrap}"
    secure = run.fleet.secure
    stuck = [i for i, s in states.items() if s.status is SagaStatus.STUCK]
    compensated = [i for i, s in states.items() if s.status is SagaStatus.COMPENSATED]
    example = (stuck or compensated or list(states) or ["<saga id>"])[0]
    print("\nwhere to look next:")
    console = run.console
    if console is not None:
        print(f"  console: {console.url}/  (it stops with the demo; `serve` below brings it back)")
    ui = run.args.jaeger_ui
    if ui:
        print(f"  traces:  {ui}  (service 'saga-coordinator'; one trace per saga)")
    elif console is not None:
        print(
            f"  traces:  {console.url}/sagas/<saga id>/trace  (drawn from Jaeger's query API; "
            "SAGA_JAEGER_UI links a Jaeger UI instead)"
        )
    else:
        print(f"  traces:  python -m saga trace <saga id> {common}  (a waterfall in the terminal)")
    if example != "<saga id>" and (ui or console is not None):
        url = console.url if console is not None else None
        print(f"           {trace_link(example, ui=ui, console=url)}  ({example})")
    if secure is not None:
        env_file = secure.directory / f"{OPERATOR}.env"
        print(f"  as the operator, first:  set -a; . {env_file}; set +a")
    print(f"  replay:  python -m saga replay {example} {common}")
    if run.catering:
        # Its trace link points at this console, wherever it listens.
        elsewhere = (
            f" --console-url {console.url}"
            if console is not None and console.url != DEFAULT_CONSOLE_URL
            else ""
        )
        print(f"  tree:    python -m saga status {run.catering[0].saga_id} {common}{elsewhere}")
    print(f"  list:    python -m saga list {common}")
    approver = "as the operator (an approver once escalated)" if secure is not None else "as a"
    print(
        f"  decide:  python -m saga approve ID approval --note 'ok' {common}   "
        f"({approver}{' principal of the step' if secure is None else ''}; or saga reject)"
    )
    print(
        f"  confirm: python -m saga signal ID {KITCHEN_SIGNAL} "
        f"""--data '{{"chef": "Gino"}}' {common}"""
    )
    for saga_id in stuck:
        print(f"  stuck:   python -m saga retry {saga_id} {common}   (or: saga resolve)")
    if console is not None:
        auth, note = "--no-auth --as operator", "the console again"
        if console.tokens_file is not None:
            auth = f"--tokens {console.tokens_file}"
            note += f"; its token is in {console.token_file}"
        port = console.url.rsplit(":", 1)[1]
        print(
            f"  serve:   python -m saga serve --app services.app:sagas --port {port} "
            f"--db {console.db} {common} {auth}   ({note})"
        )
    print(f"  data:    {run.fleet.data_dir}   logs: {run.fleet.log_dir}")


# -- plumbing ---------------------------------------------------------------------------------


def _secure_setup(bootstrap: str, prefix: str) -> SecureSetup:
    """Keys (made on the first run), policy and ACLs for ``prefix`` on the secured broker."""
    from deploy.kafka_secure import secure_dir
    from services.app import sagas

    broker = LocalSecureBroker(bootstrap_servers=bootstrap)
    if not broker.ca_file.is_file():
        raise OSError(
            f"no CA in {broker.ca_file}: the secured broker has never run; start it with "
            "`make kafka-up SECURE=1`"
        )
    directory = secure_dir() / "demo"
    setup = SecureSetup.create(
        broker, prefix, PARTICIPANTS, directory, sagas=[d.name for d in sagas]
    )
    # For the `saga` commands the summary suggests: the operator's broker and trust settings.
    text = "".join(f"{k}={shlex.quote(v)}\n" for k, v in setup.env(OPERATOR).items())
    write_private(directory / f"{OPERATOR}.env", text.encode())
    return setup


def _otlp_reachable() -> bool:
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318")
    url = urllib.parse.urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "localhost", url.port or 4318), 0.5):
            return True
    except OSError:
        return False


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--count", type=int, default=40, help="orders in the batch (default 40)")
    parser.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("SAGA_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        help="Kafka address (default: $SAGA_KAFKA_BOOTSTRAP or %(default)s)",
    )
    parser.add_argument("--prefix", help="topic prefix (default: demo-<timestamp>)")
    parser.add_argument("--data-dir", type=Path, help="services' data (default: var/<prefix>)")
    parser.add_argument(
        "--step-timeout", type=float, help="seconds per step attempt (default: services.app's)"
    )
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="seconds to wait for the batch to end"
    )
    parser.add_argument(
        "--jaeger-ui",
        default=jaeger_ui(),
        metavar="URL",
        help="a Jaeger UI to link traces to (default: $SAGA_JAEGER_UI; the local Jaeger has "
        "none, so without one the links open the console's trace page)",
    )
    parser.add_argument(
        "--console-port",
        type=int,
        default=int(os.environ.get("SAGA_CONSOLE_PORT") or CONSOLE_PORT),
        metavar="PORT",
        help="the console's port (default: $SAGA_CONSOLE_PORT or %(default)s; 0: any free one)",
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=90.0, help="seconds to wait for the processes"
    )
    parser.add_argument(
        "--secure",
        action="store_true",
        default=os.environ.get("SAGA_DEMO_SECURE", "") not in ("", "0"),
        help="run on the secured broker of `make kafka-up SECURE=1`, signed, with the policy "
        "enforced and payloads sealed (default: $SAGA_DEMO_SECURE)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m services.demo``."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # aiokafka warns about every produce retry while new topics elect their leaders: noise
    # here, since the sends succeed a moment later.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    # Its fetcher logs, at ERROR, every offset lookup that meets a partition of the new topics
    # still electing its leader; the lookup is retried and succeeds.
    logging.getLogger("aiokafka.consumer.fetcher").setLevel(logging.CRITICAL)
    if args.count < 1:
        _parser().error("--count must be at least 1")
    prefix = args.prefix or f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    data_dir: Path = args.data_dir or Path("var") / prefix
    env: dict[str, str] = {
        "SAGA_APPROVAL_REMIND": f"{APPROVAL_REMIND:g}",
        "SAGA_APPROVAL_ESCALATE": f"{APPROVAL_ESCALATE:g}",
        "SAGA_APPROVAL_TIMEOUT": f"{APPROVAL_TIMEOUT:g}",
    }
    if args.step_timeout:
        env["SAGA_STEP_TIMEOUT"] = str(args.step_timeout)
        step_timeout = float(args.step_timeout)
    else:
        from services.app import STEP_TIMEOUT

        step_timeout = STEP_TIMEOUT
    traced = _otlp_reachable()
    if not traced:
        env["OTEL_TRACES_EXPORTER"] = "none"
    plan = plan_orders(args.count, step_timeout)
    print(f"pasta order demo: {args.count} orders, prefix {prefix}, Kafka {args.bootstrap_servers}")
    print(f"  data and logs in {data_dir}; step timeout {step_timeout:g}s")
    if not traced:
        print("  (no OTLP collector answers: traces are off; `make jaeger-up` to see them)")
    secure: SecureSetup | None = None
    if args.secure:
        try:
            secure = _secure_setup(args.bootstrap_servers, prefix)
        except (InfraError, OSError, KeyError, SagaError) as exc:
            print(f"\ndemo failed: the secured broker: {exc}", file=sys.stderr)
            print(f"  run it with: {SECURED_HOW}", file=sys.stderr)
            return 1
        sealing = "payloads sealed" if secure.payload_keys else "payloads in clear"
        print(
            f"  secured: SASL_SSL + SCRAM + ACLs, each process signs as its principal, "
            f"policy enforced, {sealing}; keys in {secure.directory}"
        )
    else:
        print(
            f"  unsigned, on a plain broker (local development); run it secured with: {SECURED_HOW}"
        )
    fleet = Fleet(
        bootstrap=args.bootstrap_servers, prefix=prefix, data_dir=data_dir, env=env, secure=secure
    )
    run = Run(args, fleet, step_timeout, plan)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    ended = False
    try:
        fleet.start()
        ended = anyio.run(_drive, run)
        _summary(run)
        if run.console is not None and sys.stdin.isatty():
            # At a terminal, the console (and the services behind it) stay up to be looked
            # at; a script or a test is not asked.
            print(f"\nthe console stays up at {run.console.url}: press Enter to stop the demo")
            with contextlib.suppress(EOFError):
                input()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (TimeoutError, TransportError, OSError) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        also = " and the console" if fleet.console is not None else ""
        print(f"stopping the coordinator, the services{also} ...", flush=True)
        fleet.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        exits = {p.name: p.exit_codes for p in fleet.processes.values() if p.exit_codes}
        if exits:
            print(f"processes restarted during the run: {exits}")
        print("all processes stopped")
    return 0 if ended else 1


if __name__ == "__main__":
    sys.exit(main())
