"""The participant on the memory transport: dedupe, late actions, the reply store, interceptors,
worker threads, start-up against an unreachable broker, and waiting past a re-drive."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from saga import (
    Coordinator,
    Participant,
    RetryPolicy,
    SagaClient,
    SagaDefinition,
    SagaStatus,
    SQLiteReplyStore,
    Step,
    StepContext,
    StepFailed,
)
from saga.adapters.memory import MemoryBroker, MemoryTransport
from saga.core.codec import decode, encode
from saga.core.messages import Command, Reply, reply_adapter
from saga.errors import Fenced, TransportError, UsageError
from saga.runtime.participant import CallNext, HandlerResult
from saga.runtime.ports import Outgoing, Topics
from saga.testing import SagaHarness

pytestmark = pytest.mark.anyio


def command(
    step: str = "a",
    phase: str = "action",
    action: str = "do",
    *,
    saga_id: str = "s-1",
    service: str = "svc",
    payload: dict[str, Any] | None = None,
    attempt: int = 1,
) -> Command:
    return Command(
        message_id=f"{saga_id}/{step}/{phase}/{attempt}",
        saga_id=saga_id,
        saga_name="test",
        saga_version=1,
        step=step,
        phase=phase,
        service=service,
        action=action,
        attempt=attempt,
        idempotency_key=f"{saga_id}/{step}/{phase}",
        payload=payload or {},
        deadline_at=time.time() + 60,
        at=time.time(),
    )


def send(broker: MemoryBroker, *commands: Command, prefix: str = "saga") -> None:
    topics = Topics(prefix)
    broker.append(
        [Outgoing(topics.commands(c.service), c.saga_id.encode(), encode(c)) for c in commands]
    )


async def replies(broker: MemoryBroker, count: int, prefix: str = "saga") -> list[Reply]:
    """The first ``count`` replies, once there are that many."""
    topic = Topics(prefix).replies
    with anyio.fail_after(10):
        while len(broker.records(topic)) < count:
            await broker.wait_for_change(0.05)
    return [decode(reply_adapter, r.value) for r in broker.records(topic)][:count]


def counting(service: str = "svc") -> tuple[Participant, list[str]]:
    """A participant whose handlers record their calls: ``do``/``undo`` and ``boom``."""
    p = Participant(service)
    calls: list[str] = []

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        calls.append(f"do {ctx.step}")
        return {"n": len(calls)}

    @p.handler("undo")
    async def undo(payload: dict[str, Any], ctx: StepContext) -> None:
        calls.append(f"undo {ctx.step}")

    return p, calls


# -- handling ------------------------------------------------------------------------------


async def test_a_redelivered_command_replays_the_stored_reply() -> None:
    p, calls = counting()
    broker = MemoryBroker()
    async with p.serving(MemoryTransport(broker)):
        send(broker, command())
        (first,) = await replies(broker, 1)
        send(broker, command())  # the same command again: same idempotency key
        _, second = await replies(broker, 2)
    assert calls == ["do a"]
    assert first.ok
    assert second.ok
    assert first.output == second.output == {"n": 1}
    assert p.stats.handled == 1
    assert p.stats.replayed == 1


async def test_an_action_that_arrives_after_its_compensation_is_refused() -> None:
    p, calls = counting()
    broker = MemoryBroker()
    async with p.serving(MemoryTransport(broker)):
        send(broker, command("a", "compensation", "undo"), command("a", "action", "do"))
        undo, late = await replies(broker, 2)
    assert calls == ["undo a"]
    assert undo.ok
    assert not late.ok
    assert late.error is not None
    assert late.error.business
    assert "compensated before this attempt" in late.error.message


async def test_the_sqlite_reply_store_survives_a_new_store_on_the_same_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "replies.sqlite3"
    calls: list[int] = []

    def make() -> Participant:
        p = Participant("svc", store=SQLiteReplyStore(path))

        @p.handler("do")
        async def do(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
            calls.append(1)
            return {"charge": "c-1"}

        return p

    broker = MemoryBroker()
    async with make().serving(MemoryTransport(broker)):
        send(broker, command())
        await replies(broker, 1)
    # A restarted service: a new participant, a new store object, the same file.
    restarted = make()
    async with restarted.serving(MemoryTransport(broker)):
        send(broker, command())
        _, again = await replies(broker, 2)
    assert calls == [1]
    assert again.ok
    assert again.output == {"charge": "c-1"}
    assert restarted.stats.replayed == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


async def test_a_sync_handler_runs_in_a_worker_thread() -> None:
    p = Participant("svc")
    threads: list[threading.Thread] = []

    @p.handler("do")
    def do(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        threads.append(threading.current_thread())
        return {}

    seen: list[threading.Thread] = []

    async def outer(payload: dict[str, Any], ctx: StepContext, call_next: CallNext) -> Any:
        seen.append(threading.current_thread())
        return await call_next(payload, ctx)

    broker = MemoryBroker()
    with p.intercept(outer):  # an interceptor does not move the handler into the event loop
        async with p.serving(MemoryTransport(broker)):
            send(broker, command())
            (reply,) = await replies(broker, 1)
    assert reply.ok
    assert threads
    assert threads[0] is not threading.main_thread()
    assert seen == [threading.main_thread()]


def test_a_handler_registered_twice_is_a_usage_error() -> None:
    p, _ = counting()

    async def again(payload: dict[str, Any], ctx: StepContext) -> None:
        return None

    with pytest.raises(UsageError, match="registered twice"):
        p.handler("do")(again)
    assert issubclass(UsageError, ValueError)


# -- interception --------------------------------------------------------------------------


async def test_interceptors_wrap_every_call_last_registered_outermost_and_can_be_removed() -> None:
    p, calls = counting()
    order: list[str] = []

    def tracing(name: str) -> Any:
        async def intercept(
            payload: dict[str, Any], ctx: StepContext, call_next: CallNext
        ) -> HandlerResult:
            order.append(f"{name} {ctx.action}")
            return await call_next({**payload, name: True}, ctx)

        return intercept

    first = p.intercept(tracing("first"))
    second = p.intercept(tracing("second"))
    broker = MemoryBroker()
    async with p.serving(MemoryTransport(broker)):
        send(broker, command("a"))
        await replies(broker, 1)
        first.remove()
        first.remove()  # idempotent
        send(broker, command("b"))
        await replies(broker, 2)
        second.remove()
        send(broker, command("c"))
        await replies(broker, 3)
    assert order == ["second do", "first do", "second do"]
    assert calls == ["do a", "do b", "do c"]


async def test_what_an_interceptor_raises_is_classified_like_the_handlers_own() -> None:
    p, calls = counting()

    async def gate(payload: dict[str, Any], ctx: StepContext, call_next: CallNext) -> Any:
        if ctx.step == "business":
            raise StepFailed("refused by policy", {"rule": 7})
        if ctx.step == "technical":
            raise ConnectionError("policy service down")
        return await call_next(payload, ctx)

    broker = MemoryBroker()
    with p.intercept(gate):
        async with p.serving(MemoryTransport(broker)):
            send(broker, command("business", saga_id="s-1"), command("technical", saga_id="s-2"))
            got = {r.step: r for r in await replies(broker, 2)}
            send(broker, command("technical", saga_id="s-2", attempt=2))
            await replies(broker, 3)
    assert got["business"].error is not None
    assert got["business"].error.business
    assert got["business"].error.details == {"rule": 7}
    assert got["technical"].error is not None
    assert not got["technical"].error.business
    assert got["technical"].error.type == "ConnectionError"
    assert calls == []  # short-circuited every time
    assert p.stats.business_failures == 1
    assert p.stats.technical_failures == 2


ONE = SagaDefinition(
    name="one",
    steps=[Step(name="a", service="shared", action="do", kind="pivot")],
)

shared = Participant("shared")  # declared once, as a service module would


@shared.handler("do")
def _shared_do(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"thread": threading.current_thread().name}


async def test_a_fault_of_one_harness_does_not_reach_the_next() -> None:
    async with SagaHarness([ONE], [shared]) as h:
        h.fail("shared", "do", business=True)
        failed = await h.run_until_done(await h.start("one", {}))
    assert failed.status is SagaStatus.COMPENSATED
    async with SagaHarness([ONE], [shared]) as h:
        done = await h.run_until_done(await h.start("one", {}))
        assert h.calls("shared") == ["do"]
    assert done.status is SagaStatus.COMPLETED
    assert done.steps["a"].output is not None
    assert done.steps["a"].output["thread"] != threading.main_thread().name  # a worker thread


async def test_one_participant_serves_two_deployments_at_once() -> None:
    p, calls = counting()
    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    async with p.serving(transport, prefix="east"), p.serving(transport, prefix="west"):
        send(broker, command(saga_id="e"), prefix="east")
        send(broker, command(saga_id="w"), prefix="west")
        (east,) = await replies(broker, 1, prefix="east")
        (west,) = await replies(broker, 1, prefix="west")
    assert (east.saga_id, west.saga_id) == ("e", "w")
    assert sorted(calls) == ["do a", "do a"]


# -- start-up against a broker that is away -------------------------------------------------


class Unreachable(MemoryTransport):
    """Refuses the first ``failures`` start-ups with ``error``."""

    def __init__(self, broker: MemoryBroker, failures: int, error: TransportError) -> None:
        super().__init__(broker)
        self.failures = failures
        self.error = error
        self.attempts = 0

    async def ensure_topics(
        self, names: Sequence[str], partitions: int, compacted: Sequence[str] = ()
    ) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise self.error
        await super().ensure_topics(names, partitions, compacted)


async def test_a_participant_started_while_the_broker_is_away_waits_for_it() -> None:
    p, calls = counting()
    broker = MemoryBroker()
    transport = Unreachable(broker, 3, TransportError("could not create topics"))
    async with p.serving(transport):
        send(broker, command())
        (reply,) = await replies(broker, 1)
    assert transport.attempts == 4
    assert reply.ok
    assert calls == ["do a"]


async def test_a_start_up_error_that_retrying_cannot_help_ends_the_run() -> None:
    p, _ = counting()
    transport = Unreachable(MemoryBroker(), 1, Fenced("not retriable"))
    with pytest.raises(Fenced):
        with anyio.fail_after(5):
            await p.run(transport)
    assert transport.attempts == 1


# -- waiting past a re-drive (the race: the old stuck state is final too) -------------------

FRAGILE = SagaDefinition(
    name="fragile",
    steps=[
        Step(name="charge", service="bank", action="charge", kind="pivot"),
        Step(
            name="notify",
            service="mail",
            action="send",
            kind="retriable",
            depends_on=["charge"],
            retry=RetryPolicy(max_attempts=2, initial_backoff=0.01, jitter=0),
        ),
    ],
)


def fragile_services(broken: dict[str, bool]) -> list[Participant]:
    bank, mail = Participant("bank"), Participant("mail")
    sent: list[str] = []

    @bank.handler("charge")
    async def charge(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"charged": True}

    @mail.handler("send")
    async def send_mail(payload: dict[str, Any], ctx: StepContext) -> None:
        if broken["mail"]:
            raise ConnectionError("smtp down")
        sent.append(ctx.saga_id)

    return [bank, mail]


async def test_harness_run_until_done_after_a_retry_waits_for_the_re_driven_run() -> None:
    broken = {"mail": True}
    async with SagaHarness([FRAGILE], fragile_services(broken)) as h:
        saga_id = await h.start("fragile", {})
        stuck = await h.run_until_done(saga_id)
        assert stuck.status is SagaStatus.STUCK
        broken["mail"] = False
        seq = await h.retry(saga_id)
        assert seq == stuck.seq
        state = await h.run_until_done(saga_id, after=seq)
    assert state.status is SagaStatus.COMPLETED
    assert state.seq > seq


async def test_harness_run_until_done_after_a_resolve() -> None:
    async with SagaHarness([FRAGILE], fragile_services({"mail": True})) as h:
        saga_id = await h.start("fragile", {})
        stuck = await h.run_until_done(saga_id)
        assert stuck.status is SagaStatus.STUCK
        calls = len(h.calls("mail"))
        seq = await h.resolve(saga_id, note="sent by hand")
        state = await h.run_until_done(saga_id, after=seq)
        assert len(h.calls("mail")) == calls  # resolved, not run again
    assert state.status is SagaStatus.COMPLETED


async def test_harness_run_until_done_after_a_cancel() -> None:
    trip = SagaDefinition(
        name="trip",
        steps=[
            Step(name="a", service="svc", action="do", compensation="undo", timeout=30),
            Step(name="b", service="svc", action="do", kind="pivot", depends_on=["a"]),
        ],
    )
    p, _ = counting()
    async with SagaHarness([trip], [p]) as h:
        h.drop_commands("svc", 1)  # step a hangs until its deadline: the cancel comes first
        saga_id = await h.start("trip", {})
        with anyio.fail_after(5):
            while (state := await h.status(saga_id)) is None:
                await h.broker.wait_for_change(0.02)
        seq = await h.cancel(saga_id, reason="changed my mind")
        state = await h.run_until_done(saga_id, after=seq)
    assert state.status is SagaStatus.COMPENSATED


async def test_harness_run_until_done_after_with_nothing_coming_times_out() -> None:
    from saga.errors import SagaTimeout

    async with SagaHarness([FRAGILE], fragile_services({"mail": True})) as h:
        saga_id = await h.start("fragile", {})
        stuck = await h.run_until_done(saga_id)
        with pytest.raises(SagaTimeout, match="not past"):
            await h.run_until_done(saga_id, after=stuck.seq)  # no retry was asked for


async def test_coordinator_and_client_wait_after_a_retry_on_the_memory_transport() -> None:
    broken = {"mail": True}
    transport = MemoryTransport(MemoryBroker())
    bank, mail = fragile_services(broken)
    async with (
        Coordinator([FRAGILE], transport=transport) as coordinator,
        bank.serving(transport),
        mail.serving(transport),
        SagaClient(transport) as client,
    ):
        first = await coordinator.start("fragile", {})
        second = await coordinator.start("fragile", {})
        for saga_id in (first, second):
            assert (await coordinator.wait(saga_id, 10)).status is SagaStatus.STUCK
        broken["mail"] = False

        seq = await coordinator.retry(first)
        state = await coordinator.wait(first, 10, after=seq)
        assert state.status is SagaStatus.COMPLETED

        seq = await client.retry(second)
        seen = await client.wait(second, 10, after=seq, poll=0.01)
        assert seen.status is SagaStatus.COMPLETED


async def test_coordinator_and_client_wait_after_a_resolve_on_the_memory_transport() -> None:
    transport = MemoryTransport(MemoryBroker())
    bank, mail = fragile_services({"mail": True})
    async with (
        Coordinator([FRAGILE], transport=transport) as coordinator,
        bank.serving(transport),
        mail.serving(transport),
        SagaClient(transport) as client,
    ):
        first = await coordinator.start("fragile", {})
        second = await coordinator.start("fragile", {})
        for saga_id in (first, second):
            assert (await coordinator.wait(saga_id, 10)).status is SagaStatus.STUCK

        seq = await coordinator.resolve(first)
        assert (await coordinator.wait(first, 10, after=seq)).status is SagaStatus.COMPLETED

        seq = await client.resolve(second, note="done by hand")
        seen = await client.wait(second, 10, after=seq, poll=0.01)
        assert seen.status is SagaStatus.COMPLETED
