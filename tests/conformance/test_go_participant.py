"""A participant written in Go, from the published contract alone, serving a saga's middle step.

The saga ``go-order``: ``charge`` (payment, Python) -> ``reserve`` (warehouse, the Go program of
tests/conformance/go) -> ``ship`` (shipping, Python), each with a compensation. A Python
coordinator and the Python participants run in this process; the Go participant is a process
of its own on the same broker, in the consumer group a Python participant of ``warehouse``
would join. What each side did is known independently: the Python handlers keep a ledger, the
Go process reports every handler it ran and every reply it sent.

Checked: a saga completes with the Go step's output in the state (after a technical failure
that the coordinator retries as attempt 2) and in the next step's input; Go's replies match the
reply schema, are keyed and partitioned as the contract says and carry the command's trace; a
saga whose later step fails runs the Go step's compensation before the earlier step's; a
business failure in Go compensates the step before it and never "undoes" the failed step; a
command delivered again, to the same process or to a restarted one that reloads its store
file, is answered from the store and not run twice; and in signed mode Go verifies the
coordinator's Ed25519 signature on commands (dead-lettering a forged one) and signs its replies
so that the coordinator takes them.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from deploy.kafka import KafkaServer
from saga import Coordinator, Participant, RetryPolicy, SagaClient, SagaStatus, StepFailed
from saga.adapters.kafka import KafkaTransport
from saga.adapters.tracing import OpenTelemetryObserver
from saga.core.codec import encode
from saga.core.definition import SagaDefinition, Step
from saga.core.messages import Command, CompensationSucceeded, EventBase
from saga.core.policy import parse_policy
from saga.runtime.dlq import REASON_HEADER
from saga.runtime.ports import Outgoing, Record, Topics
from saga.runtime.traceids import command_span_id, trace_id_for
from saga.runtime.trust import Keyring, SigningKey, Trust, new_key
from tests.chaos.oracle import read_topic
from tests.conformance.goparticipant import GoParticipant, build
from tests.contract.wire import problems

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(180)]

PARTITIONS = 2
TIMEOUT = 30.0

ORDER = SagaDefinition(
    name="go-order",
    steps=(
        Step(name="charge", service="payment", action="charge", compensation="refund", timeout=10),
        Step(
            name="reserve",
            service="warehouse",
            action="reserve",
            compensation="release",
            depends_on=("charge",),
            timeout=10,
            retry=RetryPolicy(max_attempts=3, initial_backoff=0.1),
        ),
        Step(
            name="ship",
            service="shipping",
            action="ship",
            compensation="cancel_shipment",
            depends_on=("reserve",),
            input={
                "reservation": "$.steps.reserve.output.reservation",
                "fail": "$.input.ship_fails",
            },
            timeout=10,
        ),
    ),
)

POLICY = """
version: 1
coordinators: [coordinator]
services:
  payment: [payment]
  warehouse: [warehouse]
  shipping: [shipping]
rules:
  - name: the shop starts orders
    who: [shop]
    may: [start]
    sagas: [go-order]
"""


@dataclass
class Ledger:
    """What the Python handlers did, in order: (handler, saga id, payload)."""

    effects: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def of(self, saga_id: str) -> list[str]:
        return [what for what, sid, _ in self.effects if sid == saga_id]


def _python_services(ledger: Ledger) -> list[Participant]:
    payment, shipping = Participant("payment"), Participant("shipping")

    @payment.handler("charge")
    async def charge(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
        ledger.effects.append(("charge", ctx.saga_id, payload))
        return {"charge_id": f"ch-{ctx.saga_id}"}

    @payment.handler("refund")
    async def refund(payload: dict[str, Any], ctx: Any) -> None:
        ledger.effects.append(("refund", ctx.saga_id, payload))

    @shipping.handler("ship")
    async def ship(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
        ledger.effects.append(("ship", ctx.saga_id, payload))
        if payload["fail"]:
            raise StepFailed("no courier today")
        return {"tracking": f"tr-{payload['reservation']}"}

    @shipping.handler("cancel_shipment")
    async def cancel_shipment(payload: dict[str, Any], ctx: Any) -> None:
        ledger.effects.append(("cancel_shipment", ctx.saga_id, payload))

    return [payment, shipping]


@dataclass
class Deployment:
    """The saga's services on the session broker: Python in this process, Go beside it."""

    kafka: KafkaServer
    prefix: str
    binary: Path
    go_args: list[str]
    log: Path
    ledger: Ledger
    go: GoParticipant
    keys: dict[str, SigningKey] = field(default_factory=dict)

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix)

    @property
    def transport(self) -> KafkaTransport:
        return KafkaTransport(self.kafka.bootstrap_servers, deadline=20)

    def client(self) -> SagaClient:
        return SagaClient(self.transport, prefix=self.prefix, signer=self.keys.get("shop"))

    async def read(self, topic: str) -> list[Record]:
        return await read_topic(self.transport, topic)

    async def run(self, saga_input: dict[str, Any]) -> tuple[str, Any]:
        """Starts a saga and waits until it ends; its id and final state."""
        saga_id = f"go-{uuid.uuid4().hex[:10]}"
        async with self.client() as client:
            await client.start(ORDER.name, saga_input, saga_id)
            return saga_id, await client.wait(saga_id, TIMEOUT, poll=0.2)

    async def events(self, saga_id: str) -> list[EventBase]:
        async with self.client() as client:
            return await client.events(saga_id)

    async def start_go(self) -> GoParticipant:
        """Starts a Go participant (the store file kept) and waits until it owns the partitions."""
        go = GoParticipant(self.binary, self.go_args, self.log).__enter__()
        self.go = go
        await go.wait_for(
            lambda: any(
                len(r["partitions"] or ()) == PARTITIONS for r in go.seen(event="assigned")
            ),
            what="its partitions assigned",
        )
        return go


@asynccontextmanager
async def _deploy(kafka: KafkaServer, tmp: Path, signed: bool) -> AsyncIterator[Deployment]:
    binary = build()
    prefix = f"conf-{uuid.uuid4().hex[:8]}"
    ledger = Ledger()
    transport = KafkaTransport(kafka.bootstrap_servers, deadline=20)
    go_args = [
        f"-bootstrap={kafka.bootstrap_servers}",
        f"-prefix={prefix}",
        "-service=warehouse",
        f"-partitions={PARTITIONS}",
        f"-store={tmp / 'warehouse-store.jsonl'}",
    ]
    keys: dict[str, SigningKey] = {}
    trust: dict[str, Trust | None] = {p: None for p in ("coordinator", "payment", "shipping")}
    if signed:
        principals = ("coordinator", "payment", "shipping", "warehouse", "shop")
        keys = {p: new_key(p) for p in principals}
        keyring = Keyring(k.public_entry() for k in keys.values())
        policy = parse_policy(POLICY, "policy.yaml")
        trust = {p: Trust.signed(keys[p], keyring, policy) for p in trust}
        keys["warehouse"].save(tmp / "warehouse.key")
        entries = {
            e.key_id: {"principal": e.principal, "public_key": e.public_key_b64}
            for e in keyring.entries()
        }
        (tmp / "trust.json").write_bytes(
            orjson.dumps({"coordinators": ["coordinator"], "keys": entries})
        )
        go_args += [f"-signing-key={tmp / 'warehouse.key'}", f"-trust={tmp / 'trust.json'}"]
    coordinator = Coordinator(
        [ORDER],
        transport=transport,
        prefix=prefix,
        partitions=PARTITIONS,
        trust=trust["coordinator"],
        # Traced (spans go nowhere), so that commands carry the trace context Go passes on.
        observer=OpenTelemetryObserver(TracerProvider(), MeterProvider()),
    )
    log = tmp / "go.stderr"
    placeholder = GoParticipant(binary, go_args, log)  # replaced by the one started below
    d = Deployment(kafka, prefix, binary, go_args, log, ledger, placeholder, keys)
    async with coordinator, anyio.create_task_group() as tg:
        for participant in _python_services(ledger):
            await tg.start(
                lambda task_status, p=participant: p.run(
                    KafkaTransport(kafka.bootstrap_servers, deadline=20),
                    prefix=prefix,
                    partitions=PARTITIONS,
                    trust=trust[p.service],
                    task_status=task_status,
                )
            )
        try:
            await d.start_go()
            yield d
        finally:
            code = d.go.stop()
            tg.cancel_scope.cancel()
        assert code == 0, f"the Go participant exited with {code}: {d.log.read_text()[-2000:]}"
        assert d.go.seen(event="stopped"), "the Go participant did not stop cleanly"


@pytest.fixture(scope="module")
async def deployment(
    kafka: KafkaServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Deployment]:
    """Unsigned mode: the baseline."""
    async with _deploy(kafka, tmp_path_factory.mktemp("go-unsigned"), signed=False) as d:
        yield d


def _value(record: Record) -> dict[str, Any]:
    value: dict[str, Any] = orjson.loads(record.value or b"")
    return value


async def test_the_go_step_output_is_in_the_state_and_the_next_step(deployment: Deployment) -> None:
    d = deployment
    saga_id, state = await d.run(
        {"sku": "A-1", "qty": 2, "reserve_flaky": True, "ship_fails": False}
    )
    assert state.status is SagaStatus.COMPLETED, state.reason
    expected = {"reservation": f"res-{saga_id}", "sku": "A-1", "qty": 2, "by": "go", "attempt": 2}
    assert state.steps["reserve"].output == expected
    assert state.steps["reserve"].attempt == 2  # attempt 1 failed technically and was retried
    ship = [p for what, sid, p in d.ledger.effects if what == "ship" and sid == saga_id]
    assert ship == [{"reservation": f"res-{saga_id}", "fail": False}]
    replies = d.go.seen(event="replied", saga_id=saga_id)
    assert [(r["attempt"], r["ok"], r["error_type"]) for r in replies] == [
        (1, False, "WarehouseBusy"),
        (2, True, ""),
    ]
    # On the wire: Go's replies match the schema, are keyed and partitioned by the saga id as
    # the coordinator's own producers would, and carry the trace of the command they answer.
    transport = d.transport
    records = [r for r in await d.read(d.topics.replies) if r.key == saga_id.encode()]
    go_replies = [r for r in records if _value(r)["service"] == "warehouse"]
    assert len(go_replies) == 2
    for record in go_replies:
        assert problems("reply.json", record.value or b"") == []
        assert record.partition == transport.partition_for(saga_id.encode(), PARTITIONS)
        reply = _value(record)
        assert reply["message_id"] == f"{saga_id}/reserve/action/{reply['attempt']}/reply"
        traceparent = record.header("traceparent") or ""
        _, trace, span, _ = traceparent.split("-")
        assert int(trace, 16) == trace_id_for(saga_id)
        assert int(span, 16) != command_span_id(saga_id, "reserve", "action", reply["attempt"])


async def test_a_later_failure_runs_the_go_compensation_in_reverse_order(
    deployment: Deployment,
) -> None:
    d = deployment
    saga_id, state = await d.run({"sku": "B-2", "qty": 1, "ship_fails": True})
    assert state.status is SagaStatus.COMPENSATED, state.reason
    assert state.steps["reserve"].status == "compensated"
    events = await d.events(saga_id)
    undone = [e.step for e in events if isinstance(e, CompensationSucceeded)]
    assert undone == ["reserve", "charge"]  # ship failed for good: nothing of it to undo
    released = d.go.seen(event="replied", saga_id=saga_id, phase="compensation")
    assert [(r["action"], r["ok"], r["output"]) for r in released] == [
        ("release", True, {"released": f"res-{saga_id}", "by": "go"})
    ]
    assert len(d.go.seen(event="ran", saga_id=saga_id, action="release")) == 1
    assert d.ledger.of(saga_id) == ["charge", "ship", "refund"]


async def test_a_go_business_failure_compensates_the_step_before_it(deployment: Deployment) -> None:
    d = deployment
    saga_id, state = await d.run(
        {"sku": "C-3", "qty": 9, "reserve_fails": True, "ship_fails": False}
    )
    assert state.status is SagaStatus.COMPENSATED, state.reason
    error = state.steps["reserve"].error
    assert error is not None
    assert (error.type, error.message, error.business) == ("StepFailed", "out of stock", True)
    assert error.details == {"sku": "C-3"}
    assert state.steps["reserve"].attempt == 1  # a business failure is not retried
    assert d.ledger.of(saga_id) == ["charge", "refund"]
    assert d.go.seen(event="ran", saga_id=saga_id, action="release") == []


async def test_a_redelivered_command_is_answered_from_the_store(deployment: Deployment) -> None:
    d = deployment
    saga_id, state = await d.run({"sku": "D-4", "qty": 3, "ship_fails": False})
    assert state.status is SagaStatus.COMPLETED, state.reason
    key = f"{saga_id}/reserve/action"
    assert len(d.go.seen(event="ran", idempotency_key=key)) == 1
    (record,) = [
        r
        for r in await d.read(d.topics.commands("warehouse"))
        if r.key == saga_id.encode() and _value(r)["phase"] == "action"
    ]
    assert problems("command.json", record.value or b"") == []
    again = Outgoing(record.topic, record.key, record.value, record.headers)
    events_before = len(await d.events(saga_id))

    async def redeliver() -> None:
        async with d.transport.producer() as producer:
            await producer.send([again])

    # The same process: the command comes again (a redelivery after a lost commit looks so).
    await redeliver()
    await d.go.wait_for(
        lambda: len(d.go.seen(event="replied", idempotency_key=key)) == 2, what="a second reply"
    )
    # A restarted process: the store file answers it.
    assert d.go.stop() == 0
    go = await d.start_go()
    await redeliver()
    await go.wait_for(
        lambda: len(go.seen(event="replied", idempotency_key=key)) == 1, what="the replay"
    )
    replayed = go.seen(event="replied", idempotency_key=key)
    assert [(r["ok"], r["replayed"], r["output"]["reservation"]) for r in replayed] == [
        (True, True, f"res-{saga_id}")
    ]
    assert go.seen(event="ran", idempotency_key=key) == []
    # The coordinator takes the duplicates as stale: nothing changes in the saga.
    async with d.client() as client:
        after = await client.status(saga_id)
    assert after is not None
    assert after.status is SagaStatus.COMPLETED
    assert after.steps["reserve"].output == state.steps["reserve"].output
    late = (await d.events(saga_id))[events_before:]
    assert not [e for e in late if e.type == "step_succeeded"]


@pytest.fixture(scope="module")
async def signed(
    kafka: KafkaServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Deployment]:
    """Signed mode: every command, reply and request signed with Ed25519 and checked."""
    async with _deploy(kafka, tmp_path_factory.mktemp("go-signed"), signed=True) as d:
        yield d


async def test_signed_mode_go_verifies_commands_and_signs_replies(signed: Deployment) -> None:
    d = signed
    saga_id, state = await d.run({"sku": "E-5", "qty": 1, "ship_fails": True})
    assert state.status is SagaStatus.COMPENSATED, state.reason  # both directions crossed
    assert [r["phase"] for r in d.go.seen(event="replied", saga_id=saga_id)] == [
        "action",
        "compensation",
    ]
    assert all(r["signed"] for r in d.go.seen(event="replied", saga_id=saga_id))
    # A forged command (a new idempotency key, signed by a service, not a coordinator) and an
    # unsigned one never run: both are dead-lettered with their reasons.
    (record,) = [
        r
        for r in await d.read(d.topics.commands("warehouse"))
        if r.key == saga_id.encode() and _value(r)["phase"] == "action"
    ]
    forged = Command.model_validate_json(record.value or b"").model_copy(
        update={"idempotency_key": f"{saga_id}/reserve/action/forged", "attempt": 7}
    )
    topic, key = d.topics.commands("warehouse"), saga_id.encode()
    as_payment = d.keys["payment"].sign_outgoing(Outgoing(topic, key, encode(forged)))
    unsigned = Outgoing(topic, key, encode(forged))
    async with d.transport.producer() as producer:
        await producer.send([as_payment, unsigned])
    await d.go.wait_for(
        lambda: len(d.go.seen(event="dead_letter", key=saga_id)) == 2, what="two dead letters"
    )
    reasons = [r["reason"] for r in d.go.seen(event="dead_letter", key=saga_id)]
    assert reasons == ["forbidden", "unauthenticated"]
    assert d.go.seen(event="ran", attempt=7) == []
    dlq = [r for r in await d.read(d.topics.dlq) if r.key == key]
    assert sorted(r.header(REASON_HEADER) or "" for r in dlq) == ["forbidden", "unauthenticated"]
