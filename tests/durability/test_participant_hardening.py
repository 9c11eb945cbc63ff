"""The participant against hostile handlers and bad timing, on the real broker.

The same findings as ``tests/runtime/test_participant_robustness.py``, where the broker is part
of the story: a reply larger than Kafka takes, redelivery after a participant was stopped
mid-handler (offsets, the consumer group), a command that waited in its topic for longer than
its budget, a participant whose clock runs ahead of the coordinator's.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from saga import Participant, SQLiteReplyStore, StepContext
from saga.adapters.kafka import KafkaTransport
from saga.core.codec import decode, encode
from saga.core.messages import Command, Reply, reply_adapter
from saga.runtime.dlq import REASON_HEADER
from saga.runtime.ports import Outgoing, SystemClock, Topics
from tests.chaos.oracle import read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


def command(
    saga_id: str, *, attempt: int = 1, at: float | None = None, timeout: float = 60.0
) -> Command:
    issued = time.time() if at is None else at
    return Command(
        message_id=f"{saga_id}/a/action/{attempt}",
        saga_id=saga_id,
        saga_name="test",
        saga_version=1,
        step="a",
        phase="action",
        service="svc",
        action="do",
        attempt=attempt,
        idempotency_key=f"{saga_id}/a/action",
        payload={},
        deadline_at=issued + timeout,
        at=issued,
    )


class Bench:
    """One service's topics (one partition each) under the test's prefix, and its replies."""

    def __init__(self, transport: KafkaTransport, prefix: str) -> None:
        self.transport = transport
        self.prefix = prefix
        self.topics = Topics(prefix)

    async def setup(self) -> None:
        t = self.topics
        await self.transport.ensure_topics([t.commands("svc"), t.replies, t.dlq], 1)

    async def send(self, *commands: Command) -> None:
        topic = self.topics.commands("svc")
        async with self.transport.producer() as producer:
            await producer.send([Outgoing(topic, c.saga_id.encode(), encode(c)) for c in commands])

    async def replies(self) -> list[Reply]:
        records = await read_topic(self.transport, self.topics.replies)
        return [decode(reply_adapter, r.value) for r in records]

    async def reply_of(self, saga_id: str, timeout: float = 30) -> Reply:
        with anyio.fail_after(timeout):
            while True:
                for reply in await self.replies():
                    if reply.saga_id == saga_id:
                        return reply
                await anyio.sleep(0.1)

    @asynccontextmanager
    async def serving(self, p: Participant, **kw: Any) -> AsyncIterator[None]:
        async with p.serving(self.transport, prefix=self.prefix, partitions=1, **kw):
            yield


async def until(condition: Any, timeout: float = 30) -> None:
    with anyio.fail_after(timeout):
        while True:
            if condition():
                return
            await anyio.sleep(0.05)


@pytest.fixture
async def bench(transport: KafkaTransport, prefix: str) -> Bench:
    b = Bench(transport, prefix)
    await b.setup()
    return b


async def test_a_slow_handler_does_not_delay_another_sagas_reply(bench: Bench) -> None:
    p = Participant("svc")
    release = anyio.Event()
    slow_started = anyio.Event()

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> None:
        if ctx.saga_id == "slow":
            slow_started.set()
            await release.wait()

    async with bench.serving(p):
        await bench.send(command("slow"))
        with anyio.fail_after(30):
            await slow_started.wait()
        await bench.send(command("quick"))
        try:
            quick = await bench.reply_of("quick", timeout=10)
        finally:
            release.set()
        slow = await bench.reply_of("slow")
    assert quick.ok
    assert slow.ok


async def test_an_output_larger_than_kafka_takes_is_answered_output_too_large(
    bench: Bench,
) -> None:
    p = Participant("svc")
    calls: list[str] = []

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        calls.append(ctx.saga_id)
        return {"blob": "x" * (2 * 1024 * 1024)}

    async with bench.serving(p):
        await bench.send(command("big"))
        reply = await bench.reply_of("big")
    assert reply.error is not None
    assert (reply.error.type, reply.error.business) == ("OutputTooLarge", True)
    assert calls == ["big"]


async def test_a_command_that_waited_in_its_topic_past_its_budget_is_not_run(
    bench: Bench,
) -> None:
    p = Participant("svc")
    calls: list[str] = []

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> None:
        calls.append(ctx.saga_id)

    await bench.send(command("late", at=time.time() - 40 * 60, timeout=10))  # service was down
    async with bench.serving(p):
        await bench.send(command("fresh"))
        late = await bench.reply_of("late")
        fresh = await bench.reply_of("fresh")
    assert late.error is not None
    assert (late.error.type, late.error.business) == ("Expired", False)
    assert fresh.ok
    assert calls == ["fresh"]


class AheadClock(SystemClock):
    def now(self) -> float:
        return time.time() + 15


async def test_a_participant_whose_clock_runs_ahead_runs_its_commands(bench: Bench) -> None:
    p = Participant("svc")

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> None:
        await anyio.sleep(0.05)

    async with bench.serving(p, clock=AheadClock()):
        await bench.send(command("skewed", timeout=10))
        reply = await bench.reply_of("skewed")
    assert reply.ok, reply.error


async def test_a_handlers_system_exit_is_answered_and_committed_not_looped(
    bench: Bench, tmp_path: Path
) -> None:
    path = tmp_path / "replies.sqlite3"
    calls: list[str] = []

    def participant() -> Participant:
        p = Participant("svc", store=SQLiteReplyStore(path))

        @p.handler("do")
        async def do(payload: dict[str, Any], ctx: StepContext) -> None:
            calls.append(ctx.saga_id)
            raise SystemExit(1)

        return p

    async with bench.serving(participant()):
        await bench.send(command("exits"))
        reply = await bench.reply_of("exits")
    assert reply.error is not None
    assert (reply.error.type, reply.error.business) == ("SystemExit", False)
    restarted = participant()
    async with bench.serving(restarted):
        await bench.send(command("next"))
        await bench.reply_of("next")
    assert calls == ["exits", "next"]  # the first was committed: not delivered again
    assert restarted.stats.replayed == 0


async def test_a_command_whose_handler_never_finishes_is_dead_lettered_after_redeliveries(
    bench: Bench, tmp_path: Path
) -> None:
    path = tmp_path / "replies.sqlite3"
    runs: list[str] = []

    def participant() -> Participant:
        p = Participant("svc", store=SQLiteReplyStore(path), max_deliveries=2, grace=0)

        @p.handler("do")
        async def do(payload: dict[str, Any], ctx: StepContext) -> None:
            runs.append(ctx.saga_id)
            await anyio.sleep_forever()  # killed before it ends, every time

        return p

    await bench.send(command("loops"))
    for n in (1, 2):
        async with bench.serving(participant()):
            await until(lambda n=n: len(runs) == n)
    last = participant()
    async with bench.serving(last):
        reply = await bench.reply_of("loops")
        await until(lambda: bool(last.stats.dead_letters))
    assert runs == ["loops", "loops"]
    assert reply.error is not None
    assert (reply.error.type, reply.error.business) == ("Redelivered", False)
    dead = await read_topic(bench.transport, bench.topics.dlq)
    assert [dict(r.headers)[REASON_HEADER] for r in dead] == [b"redelivered"]


async def test_a_stop_mid_way_redelivers_from_the_first_unfinished_record(
    bench: Bench, tmp_path: Path
) -> None:
    path = tmp_path / "replies.sqlite3"
    calls: list[str] = []
    hang = {"b"}

    def participant() -> Participant:
        p = Participant("svc", store=SQLiteReplyStore(path), grace=0)

        @p.handler("do")
        async def do(payload: dict[str, Any], ctx: StepContext) -> None:
            calls.append(ctx.saga_id)
            if ctx.saga_id in hang:
                await anyio.sleep_forever()

        return p

    await bench.send(command("a"), command("b"), command("c"))
    async with bench.serving(participant()):
        await bench.reply_of("a")
        await bench.reply_of("c")
        await until(lambda: calls.count("b") == 1)
    hang.clear()
    calls.clear()
    again = participant()
    async with bench.serving(again):
        await bench.reply_of("b")
        await until(lambda: again.stats.replayed == 1)
    assert calls == ["b"]  # a was committed; c came again and was replayed
    assert sorted(r.saga_id for r in await bench.replies()) == ["a", "b", "c", "c"]
