"""The trust boundary on the secured broker, tried as a hostile user would.

A coordinator and two services (payment, rider) run in this process, each with its own SASL
principal on the secured broker (`kafka_secure`: SASL_SSL, SCRAM, ACLs) and its own Ed25519
signing key; a policy lets ``shop`` start orders and ``operator`` cancel, retry and resolve
them. Then the attacks of the issue are made, each by whoever could make it: the ``admin``
principal (an insider with broker rights, or a broker whose ACLs were got wrong) writes unsigned
or wrongly signed records anywhere; the payment service's own principal and key forge a reply
for the rider's step; a known principal with no rights (``mallory``) sends requests; genuine
signed records are copied off the topics and written again.

Every one must be dead-lettered with its reason (``unauthenticated`` or ``forbidden``) while
legitimate sagas carry on, and the services' own ledger (what the handlers did) must show no
effect of any of them: no second charge, no refund of a completed saga, no output ``FORGED``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import orjson
import pytest

from deploy.kafka_secure import SecureKafka
from saga import Coordinator, Participant, SagaClient, SagaStatus
from saga.adapters.kafka import KafkaTransport
from saga.adapters.kafka_settings import KafkaSecurity
from saga.core.codec import encode
from saga.core.definition import SagaDefinition, Step
from saga.core.messages import Command, Reply, RetrySaga, event_adapter
from saga.core.policy import parse_policy
from saga.runtime.dlq import REASON_HEADER
from saga.runtime.ports import Outgoing, Record, Topics
from saga.runtime.trust import Keyring, SigningKey, Trust, new_key
from tests.chaos.oracle import read_topic

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(240)]

T = TypeVar("T")
PARTITIONS = 2
TIMEOUT = 60.0

ORDER = SagaDefinition(
    name="order",
    steps=(
        Step(name="charge", service="payment", action="charge", compensation="refund", timeout=20),
        Step(
            name="dispatch",
            service="rider",
            action="dispatch",
            compensation="recall",
            depends_on=("charge",),
            timeout=20,
        ),
    ),
)

POLICY = """
version: 1
coordinators: [coordinator]
services:
  payment: [payment]
  rider: [rider]
rules:
  - name: the shop starts orders
    who: [shop]
    may: [start]
    sagas: [order]
  - name: operators operate
    who: [operator]
    may: [cancel, retry, resolve]
    sagas: ["*"]
"""


async def until(fetch: Callable[[], Awaitable[T]], ok: Callable[[T], bool]) -> T:
    """Reads with ``fetch`` until what it returns is ``ok``; returns that (the topics offer
    nothing to wait on but reading them again)."""
    with anyio.fail_after(TIMEOUT):
        while True:
            if ok(found := await fetch()):
                return found
            await anyio.sleep(0.3)


@dataclass
class Ledger:
    """What the handlers did: the oracle. Only a handler that ran adds to it."""

    effects: list[tuple[str, str]] = field(default_factory=list)
    hold: dict[str, anyio.Event] = field(default_factory=dict)
    """Sagas whose dispatch waits until the test releases it (a step held running)."""

    def of(self, saga_id: str) -> list[str]:
        return [what for what, sid in self.effects if sid == saga_id]


def _participants(ledger: Ledger) -> tuple[Participant, Participant]:
    payment, rider = Participant("payment"), Participant("rider")

    @payment.handler("charge")
    async def charge(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
        ledger.effects.append(("charge", ctx.saga_id))
        return {"charge_id": f"ch_{ctx.saga_id}"}

    @payment.handler("refund")
    async def refund(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
        ledger.effects.append(("refund", ctx.saga_id))
        return {}

    @rider.handler("dispatch")
    async def dispatch(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
        if (held := ledger.hold.get(ctx.saga_id)) is not None:
            await held.wait()
        ledger.effects.append(("dispatch", ctx.saga_id))
        return {"rider": "r-1"}

    @rider.handler("recall")
    async def recall(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
        ledger.effects.append(("recall", ctx.saga_id))
        return {}

    return payment, rider


@dataclass
class Deployment:
    """The engine on the secured broker, and what the attackers hold."""

    broker: SecureKafka
    prefix: str
    keys: dict[str, SigningKey]
    keyring: Keyring
    ledger: Ledger
    coordinator: Coordinator

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix)

    def transport(self, principal: str) -> KafkaTransport:
        """A transport that authenticates to the broker as ``principal``."""
        security = KafkaSecurity.from_env(self.broker.client_env(principal))
        return KafkaTransport(self.broker.bootstrap_servers, deadline=20, security=security)

    def client(self, key: str, *, principal: str = "client") -> SagaClient:
        """A client signing with ``key``'s key, on the broker as ``principal`` (the client
        principal's rights: write requests, read the log and the snapshots)."""
        return SagaClient(self.transport(principal), prefix=self.prefix, signer=self.keys[key])

    async def write(self, records: list[Outgoing]) -> None:
        """Writes records as ``admin``: past every ACL, as an insider could."""
        async with self.transport("admin").producer() as producer:
            await producer.send(records)

    async def read(self, topic: str) -> list[Record]:
        return await read_topic(self.transport("admin"), topic)

    async def dead_letters(self, saga_id: str, count: int = 1) -> list[str]:
        """Waits for ``count`` dead letters of ``saga_id``'s records; returns their reasons."""
        found = await until(
            lambda: self.read(self.topics.dlq),
            lambda rs: sum(r.key == saga_id.encode() for r in rs) >= count,
        )
        return [r.header(REASON_HEADER) or "?" for r in found if r.key == saga_id.encode()]

    async def events(self, saga_id: str) -> list[Any]:
        return [
            event_adapter.validate_json(r.value or b"")
            for r in await self.read(self.topics.log)
            if r.key == saga_id.encode()
        ]


@pytest.fixture
async def deployment(kafka_secure: SecureKafka, tmp_path: Path) -> AsyncIterator[Deployment]:
    prefix = f"trust-{uuid.uuid4().hex[:8]}"
    kafka_secure.grant(prefix, ["payment", "rider"])
    keys = {p: new_key(p) for p in ("coordinator", "payment", "rider", "shop", "operator")}
    keys["mallory"] = new_key("mallory")  # known to the keyring, allowed nothing
    keyring = Keyring(k.public_entry() for k in keys.values())
    policy = parse_policy(POLICY, "policy.yaml")

    def trust(principal: str) -> Trust:
        return Trust.signed(keys[principal], keyring, policy)

    ledger = Ledger()
    broker = kafka_secure

    def transport(principal: str) -> KafkaTransport:
        security = KafkaSecurity.from_env(broker.client_env(principal))
        return KafkaTransport(broker.bootstrap_servers, deadline=20, security=security)

    coordinator = Coordinator(
        [ORDER],
        transport=transport("coordinator"),
        prefix=prefix,
        partitions=PARTITIONS,
        trust=trust("coordinator"),
    )
    payment, rider = _participants(ledger)
    async with coordinator, anyio.create_task_group() as tg:
        for who, participant in (("payment", payment), ("rider", rider)):
            await tg.start(
                lambda task_status, p=participant, w=who: p.run(
                    transport(w),
                    prefix=prefix,
                    partitions=PARTITIONS,
                    trust=trust(w),
                    task_status=task_status,
                )
            )
        yield Deployment(broker, prefix, keys, keyring, ledger, coordinator)
        tg.cancel_scope.cancel()


def _saga_id(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:6]}"


async def _wait_running(d: Deployment, saga_id: str, step: str) -> Command:
    """Waits until ``step`` of the saga is running; returns its command as sent."""
    topic = d.topics.commands(ORDER.step(step).service)

    async def commands() -> list[Command]:
        return [
            c
            for r in await d.read(topic)
            if r.key == saga_id.encode()
            and (c := Command.model_validate_json(r.value or b"")).step == step
            and c.phase == "action"
        ]

    return (await until(commands, bool))[0]


def _reply(command: Command, output: dict[str, Any], service: str | None = None) -> Reply:
    return Reply(
        message_id=f"forged-{uuid.uuid4().hex[:6]}",
        saga_id=command.saga_id,
        step=command.step,
        phase=command.phase,
        attempt=command.attempt,
        service=service or command.service,
        ok=True,
        output=output,
        at=command.at,
    )


async def test_forged_replies_are_refused_and_the_saga_finishes_on_the_real_one(
    deployment: Deployment,
) -> None:
    d = deployment
    held = _saga_id("held")
    d.ledger.hold[held] = anyio.Event()
    async with d.client("shop") as shop:
        await shop.start("order", {"total": 12}, held)
        dispatch = await _wait_running(d, held, "dispatch")
        key = held.encode()
        # 1. An unsigned reply, written past the ACLs.
        forged = _reply(dispatch, {"rider": "FORGED"})
        await d.write([Outgoing(d.topics.replies, key, encode(forged))])
        assert await d.dead_letters(held) == ["unauthenticated"]
        # 2. A reply signed by the payment service, for the rider's step, written with the
        # payment principal's own broker rights (it may write replies).
        as_payment = d.keys["payment"].sign_outgoing(
            Outgoing(d.topics.replies, key, encode(_reply(dispatch, {"rider": "FORGED"})))
        )
        async with d.transport("payment").producer() as producer:
            await producer.send([as_payment])
        assert await d.dead_letters(held, 2) == ["unauthenticated", "forbidden"]
        alerts = [orjson.loads(r.value or b"") for r in await d.read(d.topics.alerts)]
        assert any(a["saga_id"] == held and a.get("kind") == "forbidden" for a in alerts)
        # The step is still waiting for its real reply; release it.
        d.ledger.hold[held].set()
        state = await shop.wait(held, TIMEOUT)
    assert state.status is SagaStatus.COMPLETED
    assert state.steps["dispatch"].output == {"rider": "r-1"}
    assert d.ledger.of(held) == ["charge", "dispatch"]
    assert d.coordinator.stats.dead_letters["unauthenticated"] >= 1
    assert d.coordinator.stats.dead_letters["forbidden"] >= 1


async def test_forged_commands_never_run(deployment: Deployment) -> None:
    d = deployment
    done = _saga_id("done")
    async with d.client("shop") as shop:
        await shop.start("order", {"total": 5}, done)
        assert (await shop.wait(done, TIMEOUT)).status is SagaStatus.COMPLETED
    charge = await _wait_running(d, done, "charge")
    key = done.encode()
    # A second charge under a new idempotency key, unsigned; a refund of the completed saga
    # signed by the payment service's key (not a coordinator's): neither may run.
    second = charge.model_copy(
        update={"message_id": "forged-1", "idempotency_key": f"{done}/charge/action/evil"}
    )
    refund = charge.model_copy(
        update={
            "message_id": "forged-2",
            "phase": "compensation",
            "action": "refund",
            "idempotency_key": f"{done}/charge/compensation",
        }
    )
    topic = d.topics.commands("payment")
    await d.write(
        [
            Outgoing(topic, key, encode(second)),
            d.keys["payment"].sign_outgoing(Outgoing(topic, key, encode(refund))),
        ]
    )
    assert await d.dead_letters(done, 2) == ["unauthenticated", "forbidden"]
    assert d.ledger.of(done) == ["charge", "dispatch"]  # no second charge, no refund


async def test_requests_are_honoured_only_when_signed_and_allowed(
    deployment: Deployment,
) -> None:
    d = deployment
    # A start signed by a principal the policy does not let start: refused, recorded, alerted.
    denied = _saga_id("denied")
    async with d.client("mallory") as mallory:
        await mallory.start("order", {"total": 1}, denied)
        assert await d.dead_letters(denied) == ["forbidden"]
        state = await mallory.wait(denied, TIMEOUT)
    assert state.status is SagaStatus.REJECTED
    assert state.reason is not None
    assert "refused" in state.reason
    assert d.ledger.of(denied) == []

    # A cancel of a running saga: unsigned (written past the ACLs), then by mallory: both
    # refused, the saga finishes; the second is a denial in its log, by mallory.
    running = _saga_id("running")
    d.ledger.hold[running] = anyio.Event()
    async with d.client("shop") as shop:
        await shop.start("order", {"total": 3}, running)
        await _wait_running(d, running, "dispatch")
        unsigned = {
            "v": 1,
            "type": "cancel",
            "message_id": "c-unsigned",
            "saga_id": running,
            "at": d.coordinator.clock.now(),
        }
        await d.write([Outgoing(d.topics.requests, running.encode(), orjson.dumps(unsigned))])
        assert await d.dead_letters(running) == ["unauthenticated"]
        async with d.client("mallory") as mallory:
            await mallory.cancel(running, "because I can")
        events = await until(
            lambda: d.events(running), lambda es: any(e.type == "request_denied" for e in es)
        )
        (denial,) = [e for e in events if e.type == "request_denied"]
        assert (denial.by, denial.request) == ("mallory", "cancel")
        d.ledger.hold[running].set()
        state = await shop.wait(running, TIMEOUT)
    assert state.status is SagaStatus.COMPLETED
    assert d.ledger.of(running) == ["charge", "dispatch"]


async def test_a_replayed_signed_request_changes_nothing(deployment: Deployment) -> None:
    d = deployment
    saga_id = _saga_id("replayed")
    async with d.client("shop") as shop:
        await shop.start("order", {"total": 9}, saga_id)
        assert (await shop.wait(saga_id, TIMEOUT)).status is SagaStatus.COMPLETED
    # The operator's genuine retry of a completed saga is answered (ignored: not stuck); then
    # the same signed record, copied off the requests topic, is written again.
    async with d.client("operator", principal="operator") as operator:
        await operator.retry(saga_id, "checking")

    async def retries() -> list[Record]:
        return [
            r
            for r in await d.read(d.topics.requests)
            if r.key == saga_id.encode() and b'"retry"' in (r.value or b"")
        ]

    (genuine,) = await until(retries, bool)
    retry = RetrySaga.model_validate_json(genuine.value or b"")
    assert retry.by == "operator"
    before = await d.events(saga_id)
    await d.write([Outgoing(d.topics.requests, genuine.key, genuine.value, genuine.headers)])
    # A later valid request shows that the replay was taken in and passed over.
    async with d.client("operator", principal="operator") as operator:
        await operator.cancel(saga_id, "after the replay")
    after = await until(lambda: d.events(saga_id), lambda es: len(es) > len(before))
    assert [e.type for e in after[len(before) :]] == ["cancel_rejected"]
    assert after[-1].by == "operator"
    assert d.ledger.of(saga_id) == ["charge", "dispatch"]
