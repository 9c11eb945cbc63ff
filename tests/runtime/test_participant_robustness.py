"""The participant against hostile handlers and bad timing, on the memory transport.

- Outputs that are not JSON, or too large to send, are permanent (business) failures, stored
  under the key; exceptions no handler should raise (KeyboardInterrupt, SystemExit, its own
  CancelledError) are technical failures of that attempt; the participant's own cancellation is
  never swallowed; a command whose handler never finishes (its process keeps dying) is
  dead-lettered after a few deliveries, with a reply so that the saga moves on.
- A command that arrives after its budget is answered ``Expired`` without running; budgets are
  relative and measured on the participant's clock, so a clock that runs ahead does not time
  out every attempt; a compensation keeps one idempotency key across operator retries.
- One slow or hung handler delays neither other sagas nor shutdown; offsets are committed up to
  the last contiguous finished record, so a crash redelivers exactly what was not finished.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from saga import (
    Coordinator,
    Participant,
    RetryPolicy,
    SagaDefinition,
    SagaStatus,
    SQLiteReplyStore,
    Step,
    StepContext,
    StepFailed,
)
from saga.adapters.memory import MemoryBroker, MemoryTransport
from saga.core.codec import decode, encode
from saga.core.messages import Command, Reply, command_adapter, reply_adapter
from saga.runtime.dlq import REASON_HEADER
from saga.runtime.ports import Outgoing, SystemClock, Topics
from saga.runtime.stores import MemoryReplyStore
from saga.testing import SagaHarness

pytestmark = pytest.mark.anyio

TOPICS = Topics("saga")
TOPIC = TOPICS.commands("svc")
GROUP = TOPICS.participant_group("svc")


def command(
    saga_id: str = "s-1",
    step: str = "a",
    *,
    phase: str = "action",
    action: str = "do",
    attempt: int = 1,
    at: float | None = None,
    timeout: float = 60.0,
    budget: float | None = None,
) -> Command:
    """A command of service ``svc``; issued ``at`` (now by default), due ``timeout`` later."""
    issued = time.time() if at is None else at
    extra: dict[str, Any] = {} if budget is None else {"budget": budget}
    return Command(
        message_id=f"{saga_id}/{step}/{phase}/{attempt}",
        saga_id=saga_id,
        saga_name="test",
        saga_version=1,
        step=step,
        phase=phase,
        service="svc",
        action=action,
        attempt=attempt,
        idempotency_key=f"{saga_id}/{step}/{phase}",
        payload={},
        deadline_at=issued + timeout,
        at=issued,
        **extra,
    )


def send(broker: MemoryBroker, *commands: Command) -> None:
    broker.append([Outgoing(TOPIC, c.saga_id.encode(), encode(c)) for c in commands])


def replies_now(broker: MemoryBroker) -> list[Reply]:
    return [decode(reply_adapter, r.value) for r in broker.records(TOPICS.replies)]


async def replies(broker: MemoryBroker, count: int, timeout: float = 10) -> list[Reply]:
    """The first ``count`` replies, once there are that many."""
    with anyio.fail_after(timeout):
        while len(broker.records(TOPICS.replies)) < count:
            await broker.wait_for_change(0.05)
    return replies_now(broker)[:count]


async def reply_of(broker: MemoryBroker, saga_id: str, timeout: float = 10) -> Reply:
    """The first reply for ``saga_id``, once there is one."""
    with anyio.fail_after(timeout):
        while True:
            for reply in replies_now(broker):
                if reply.saga_id == saga_id:
                    return reply
            await broker.wait_for_change(0.05)


async def until(condition: Any, timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while True:
            if condition():
                return
            await anyio.sleep(0.01)


def committed(broker: MemoryBroker) -> int | None:
    """The participants' committed offset of the command topic's partition (the tests' brokers
    make topics of one partition, so that records' order is offsets' order)."""
    group = broker.groups.get(GROUP)
    return None if group is None else group.committed.get((TOPIC, 0))


@asynccontextmanager
async def one_partition(p: Participant, broker: MemoryBroker) -> AsyncIterator[None]:
    """Serves ``p``, creating a command topic of one partition if it does not exist yet."""
    async with p.serving(MemoryTransport(broker), partitions=1):
        yield


# -- Finding 3: outputs that cannot be sent ----------------------------------------------------

NOT_JSON = {
    "an object": lambda: {"x": object()},
    "bytes": lambda: {"x": b"\xff\xfe"},
    "NaN": lambda: {"x": math.nan},
    "infinity": lambda: {"x": [1.0, math.inf]},
    "a lone surrogate": lambda: {"x": "\ud800"},
    "a key that is not a string": lambda: {1: "one"},
    "an int past 64 bits": lambda: {"x": 2**80},
    "not a dict": lambda: [1, 2, 3],
}


@pytest.mark.parametrize("kind", list(NOT_JSON))
async def test_an_output_that_is_not_json_is_a_stored_business_failure(kind: str) -> None:
    p = Participant("svc")
    calls: list[str] = []

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> Any:
        calls.append(ctx.saga_id)
        return NOT_JSON[kind]()

    broker = MemoryBroker(default_partitions=1)
    async with p.serving(MemoryTransport(broker)):
        send(broker, command("s-1"))
        (first,) = await replies(broker, 1)
        send(broker, command("s-1"), command("s-2"))  # a redelivery, then another saga
        await replies(broker, 3)
    again = next(r for r in replies_now(broker)[1:] if r.saga_id == "s-1")
    assert not first.ok
    assert first.error is not None
    assert (first.error.type, first.error.business) == ("OutputInvalid", True)
    assert again.error == first.error  # replayed, not run again
    assert calls == ["s-1", "s-2"]  # and the participant is still serving


async def test_a_sync_handlers_bad_output_is_caught_too() -> None:
    p = Participant("svc")

    @p.handler("do")
    def do(payload: dict[str, Any], ctx: StepContext) -> Any:
        return {"when": object()}

    broker = MemoryBroker(default_partitions=1)
    async with p.serving(MemoryTransport(broker)):
        send(broker, command())
        (reply,) = await replies(broker, 1)
    assert reply.error is not None
    assert reply.error.type == "OutputInvalid"


async def test_an_output_too_large_to_send_is_a_stored_business_failure() -> None:
    p = Participant("svc")
    calls: list[str] = []

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        calls.append(ctx.saga_id)
        return {"blob": "x" * (2 * 1024 * 1024)}  # 2 MiB: Kafka refuses a record this size

    broker = MemoryBroker(default_partitions=1)
    async with p.serving(MemoryTransport(broker)):
        send(broker, command("s-1"))
        (first,) = await replies(broker, 1)
        send(broker, command("s-1"))
        _, again = await replies(broker, 2)
    assert first.error is not None
    assert (first.error.type, first.error.business) == ("OutputTooLarge", True)
    assert again.error == first.error
    assert calls == ["s-1"]
    assert max(len(r.value or b"") for r in broker.records(TOPICS.replies)) < 900 * 1024


async def test_the_reply_size_limit_is_configurable_and_covers_a_failures_details() -> None:
    p = Participant("svc", max_reply_bytes=4096)

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        if ctx.saga_id == "big":
            return {"blob": "x" * 5000}
        if ctx.saga_id == "chatty":
            raise StepFailed("no", {"blob": "y" * 100_000})
        return {"blob": "x" * 1000}

    broker = MemoryBroker(default_partitions=1)
    async with p.serving(MemoryTransport(broker)):
        send(broker, command("big"), command("small"), command("chatty"))
        got = {r.saga_id: r for r in await replies(broker, 3)}
    assert got["big"].error is not None
    assert got["big"].error.type == "OutputTooLarge"
    assert got["small"].ok
    chatty = got["chatty"].error
    assert chatty is not None
    assert (chatty.type, chatty.business) == ("StepFailed", True)  # cut down, still sent
    assert all(len(r.value or b"") <= 4096 for r in broker.records(TOPICS.replies))


# -- Finding 3: exceptions that are not Exceptions ---------------------------------------------


def _raise(kind: str) -> None:
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt
    if kind == "SystemExit":
        raise SystemExit(3)
    raise asyncio.CancelledError  # the handler's own, not a cancellation of the participant


@pytest.mark.parametrize("style", ["async", "sync"])
@pytest.mark.parametrize("kind", ["KeyboardInterrupt", "SystemExit", "CancelledError"])
async def test_a_base_exception_from_a_handler_is_a_technical_failure_of_the_attempt(
    kind: str, style: str
) -> None:
    p = Participant("svc")
    calls: list[str] = []

    if style == "async":

        @p.handler("do")
        async def do(payload: dict[str, Any], ctx: StepContext) -> None:
            calls.append(ctx.saga_id)
            if ctx.saga_id == "bad":
                _raise(kind)

    else:

        @p.handler("do")
        def do_sync(payload: dict[str, Any], ctx: StepContext) -> None:
            calls.append(ctx.saga_id)
            if ctx.saga_id == "bad":
                _raise(kind)

    broker = MemoryBroker(default_partitions=1)
    escaped: list[BaseException] = []
    try:
        async with one_partition(p, broker):
            send(broker, command("bad"))
            (failed,) = await replies(broker, 1)
            send(broker, command("bad"), command("good"))  # a redelivery replays the failure
            await replies(broker, 3)
            await until(lambda: committed(broker) == 3)
    except BaseException as exc:  # what escaped would have killed the process
        escaped.append(exc)
    assert not escaped, f"{kind} escaped the participant: {escaped!r}"
    assert failed.error is not None
    assert (failed.error.type, failed.error.business) == (kind, False)
    assert calls == ["bad", "good"]
    assert p.stats.technical_failures == 1


async def test_the_participants_own_cancellation_is_not_swallowed() -> None:
    p = Participant("svc", grace=0.1)
    started = anyio.Event()

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        except asyncio.CancelledError:
            # A handler that turns the cancellation into a CancelledError of its own, as some
            # asyncio code does: it is still the participant being stopped.
            raise asyncio.CancelledError("cleaned up") from None

    broker = MemoryBroker(default_partitions=1)
    with anyio.fail_after(5):
        async with one_partition(p, broker):
            send(broker, command())
            await started.wait()
    assert replies_now(broker) == []  # cut off: no reply, and nothing committed
    assert not committed(broker)


# -- Finding 3: crash loops --------------------------------------------------------------------


async def test_the_delivery_counter_lives_in_the_reply_store(tmp_path: Path) -> None:
    memory = MemoryReplyStore()
    assert [await memory.increment("k") for _ in range(3)] == [1, 2, 3]
    assert await memory.increment("other") == 1
    assert await memory.get("k") is None  # counters are not outcomes
    path = tmp_path / "replies.sqlite3"
    assert [await SQLiteReplyStore(path).increment("k") for _ in range(3)] == [1, 2, 3]
    assert await SQLiteReplyStore(path).get("k") is None


async def test_a_command_whose_handler_never_finishes_is_dead_lettered_and_answered(
    tmp_path: Path,
) -> None:
    path = tmp_path / "replies.sqlite3"
    broker = MemoryBroker(default_partitions=1)
    runs: list[int] = []

    def restarted() -> Participant:
        # A new process: a new participant, a new store object, the same file.
        p = Participant("svc", store=SQLiteReplyStore(path), max_deliveries=3, grace=0)

        @p.handler("do")
        async def do(payload: dict[str, Any], ctx: StepContext) -> None:
            runs.append(ctx.attempt)
            await anyio.sleep_forever()  # killed before it ends, every time

        return p

    send(broker, command())
    for n in (1, 2, 3):
        with anyio.fail_after(5):
            async with one_partition(restarted(), broker):
                await until(lambda n=n: len(runs) == n)
        assert replies_now(broker) == []
        assert not committed(broker)
    last = restarted()
    async with one_partition(last, broker):
        (reply,) = await replies(broker, 1)
        await until(lambda: committed(broker) == 1)
    assert runs == [1, 1, 1]  # not a fourth time
    assert reply.error is not None
    assert (reply.error.type, reply.error.business) == ("Redelivered", False)
    (dead,) = broker.records(TOPICS.dlq)
    assert dict(dead.headers)[REASON_HEADER] == b"redelivered"
    assert last.stats.dead_letters == {"redelivered": 1}
    # The next attempt (a retry) is a new command: it runs again.
    send(broker, command(attempt=2))
    async with one_partition(restarted(), broker):
        await until(lambda: len(runs) == 4)
    assert runs[-1] == 2


# -- Finding 4: work after the saga gave up ---------------------------------------------------


async def test_a_command_older_than_its_budget_is_answered_expired_without_running() -> None:
    p = Participant("svc")
    calls: list[str] = []

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> None:
        calls.append(ctx.saga_id)

    broker = MemoryBroker(default_partitions=1)
    long_ago = time.time() - 40 * 60  # the service was down for 40 minutes
    async with p.serving(MemoryTransport(broker)):
        send(broker, command("late", at=long_ago, timeout=10))
        (expired,) = await replies(broker, 1)
        send(broker, command("late", at=long_ago, timeout=10))  # redelivered: replayed
        send(broker, command("fresh"))
        await replies(broker, 3)
    assert expired.error is not None
    assert (expired.error.type, expired.error.business) == ("Expired", False)
    assert calls == ["fresh"]
    assert p.stats.expired == 1


async def test_a_command_that_waited_out_its_budget_inside_the_participant_expires() -> None:
    p = Participant("svc")
    calls: list[str] = []

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> None:
        calls.append(ctx.step)
        if ctx.step == "first":
            await anyio.sleep(0.6)  # the saga's next command waits behind it

    broker = MemoryBroker(default_partitions=1)
    async with p.serving(MemoryTransport(broker)):
        send(broker, command(step="first", budget=5), command(step="second", budget=0.3))
        first, second = await replies(broker, 2)
    assert first.ok
    assert second.error is not None
    assert second.error.type == "Expired"
    assert calls == ["first"]


async def test_a_command_without_a_budget_from_an_older_release_still_runs() -> None:
    p = Participant("svc")
    seen: list[float] = []

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> None:
        seen.append(ctx.deadline_at - time.time())

    broker = MemoryBroker(default_partitions=1)
    fields = orjson.loads(encode(command(timeout=20)))
    fields.pop("budget", None)  # the bytes an older coordinator wrote
    assert decode(command_adapter, orjson.dumps(fields)).budget is None
    broker.append([Outgoing(TOPIC, b"s-1", orjson.dumps(fields))])
    async with p.serving(MemoryTransport(broker)):
        (reply,) = await replies(broker, 1)
    assert reply.ok
    assert 15 < seen[0] <= 20  # its budget: the deadline less the time it was issued at


class AheadClock(SystemClock):
    """The wall clock of a machine whose clock runs ``offset`` seconds ahead."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def now(self) -> float:
        return time.time() + self.offset


async def test_a_participant_whose_clock_runs_ahead_does_not_time_out_every_attempt() -> None:
    saga = SagaDefinition(
        name="skewed",
        steps=[
            Step(
                name="a",
                service="svc",
                action="do",
                kind="pivot",
                timeout=10,
                retry=RetryPolicy(max_attempts=3, initial_backoff=0.01, jitter=0),
            )
        ],
    )
    p = Participant("svc")
    calls: list[int] = []

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        calls.append(ctx.attempt)
        await anyio.sleep(0.05)  # real work takes a little time
        return {"done": True}

    transport = MemoryTransport(MemoryBroker())
    async with (
        Coordinator([saga], transport=transport) as coordinator,
        p.serving(transport, clock=AheadClock(15)),
    ):
        saga_id = await coordinator.start("skewed", {})
        state = await coordinator.wait(saga_id, 10)
    assert state.status is SagaStatus.COMPLETED
    assert calls == [1]


TRIP = SagaDefinition(
    name="trip",
    steps=[
        Step(
            name="pay",
            service="svc",
            action="charge",
            compensation="refund",
            compensation_retry=RetryPolicy(max_attempts=1),
        ),
        Step(name="book", service="svc", action="book", kind="pivot", depends_on=["pay"]),
    ],
)


@pytest.mark.parametrize("failure", ["technical", "business"])
async def test_a_compensation_keeps_its_key_across_an_operator_retry(failure: str) -> None:
    p = Participant("svc")
    refunds: list[str] = []

    @p.handler("charge")
    async def charge(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"charge": "c-1"}

    @p.handler("book")
    async def book(payload: dict[str, Any], ctx: StepContext) -> None:
        raise StepFailed("sold out")

    @p.handler("refund")
    async def refund(payload: dict[str, Any], ctx: StepContext) -> None:
        refunds.append(ctx.idempotency_key)
        if len(refunds) == 1:  # the provider refunded, but the answer got lost
            if failure == "business":
                raise StepFailed("refunds are closed for the night")
            raise ConnectionError("payment provider unreachable")

    async with SagaHarness([TRIP], [p]) as h:
        saga_id = await h.start("trip", {})
        stuck = await h.run_until_done(saga_id)
        assert stuck.status is SagaStatus.STUCK
        seq = await h.retry(saga_id)
        state = await h.run_until_done(saga_id, after=seq)
    assert state.status is SagaStatus.COMPENSATED
    assert refunds == [f"{saga_id}/pay/compensation"] * 2  # one key: the provider dedupes


# -- Finding 5: head-of-line blocking ---------------------------------------------------------


async def test_a_slow_handler_of_one_saga_does_not_delay_another_sagas_reply() -> None:
    p = Participant("svc")
    release = anyio.Event()
    slow_started = anyio.Event()

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> None:
        if ctx.saga_id == "slow":
            slow_started.set()
            await release.wait()

    broker = MemoryBroker(default_partitions=1)
    async with one_partition(p, broker):
        send(broker, command("slow"))
        with anyio.fail_after(5):
            await slow_started.wait()
        send(broker, command("quick"))  # polled while the slow one runs
        try:
            started = anyio.current_time()
            quick = await reply_of(broker, "quick", timeout=5)
            waited = anyio.current_time() - started
        finally:
            release.set()
        slow = await reply_of(broker, "slow")
        await until(lambda: committed(broker) == 2)
    assert quick.ok
    assert slow.ok
    assert waited < 2.0


async def test_commands_of_one_saga_run_in_order_while_other_sagas_overtake() -> None:
    p = Participant("svc")
    order: list[str] = []
    release = anyio.Event()

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> None:
        order.append(f"start {ctx.saga_id}/{ctx.step}")
        if ctx.step == "first":
            await release.wait()
        order.append(f"end {ctx.saga_id}/{ctx.step}")

    broker = MemoryBroker(default_partitions=1)
    async with one_partition(p, broker):
        send(broker, command("a", "first"), command("a", "second"), command("b", "only"))
        await reply_of(broker, "b")
        assert "start a/second" not in order  # queued behind a/first
        release.set()
        await replies(broker, 3)
    assert order.index("end a/first") < order.index("start a/second")
    assert [r.step for r in replies_now(broker) if r.saga_id == "a"] == ["first", "second"]


async def test_a_hung_sync_handler_stops_neither_other_sagas_nor_shutdown() -> None:
    p = Participant("svc", grace=0.2)
    hung = threading.Event()
    release = threading.Event()
    watchdog = threading.Timer(20, release.set)  # frees the thread if the test goes wrong
    watchdog.start()

    @p.handler("do")
    def do(payload: dict[str, Any], ctx: StepContext) -> None:
        if ctx.saga_id == "hung":
            hung.set()
            release.wait()

    broker = MemoryBroker(default_partitions=1)
    try:
        async with one_partition(p, broker):
            send(broker, command("hung"))
            await until(hung.is_set, 5)
            send(broker, command("other-1"), command("other-2"))
            await reply_of(broker, "other-1", timeout=5)
            await reply_of(broker, "other-2", timeout=5)
            stopping = anyio.current_time()
        stopped_in = anyio.current_time() - stopping
    finally:
        release.set()
        watchdog.cancel()
    assert stopped_in < 3.0
    assert not [r for r in replies_now(broker) if r.saga_id == "hung"]  # its reply is dropped
    assert committed(broker) in (None, 0)  # held back by the hung one


async def test_sync_handlers_run_in_a_bounded_worker_pool() -> None:
    p = Participant("svc", workers=2)
    lock = threading.Lock()
    running: list[int] = [0]
    peak: list[int] = [0]

    @p.handler("do")
    def do(payload: dict[str, Any], ctx: StepContext) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1

    broker = MemoryBroker(default_partitions=1)
    async with p.serving(MemoryTransport(broker)):
        send(broker, *(command(f"s-{i}") for i in range(8)))
        await replies(broker, 8)
    assert peak[0] == 2


async def test_offsets_are_committed_up_to_the_last_contiguous_finished_record() -> None:
    broker = MemoryBroker(default_partitions=1)
    store = MemoryReplyStore()  # the same store across the restart, as a SQLite file would be
    calls: list[str] = []
    hang = {"b"}

    def participant() -> Participant:
        p = Participant("svc", store=store, grace=0)

        @p.handler("do")
        async def do(payload: dict[str, Any], ctx: StepContext) -> None:
            calls.append(ctx.saga_id)
            if ctx.saga_id in hang:
                await anyio.sleep_forever()

        return p

    send(broker, command("a"), command("b"), command("c"), command("d"))
    async with one_partition(participant(), broker):
        for saga_id in ("a", "c", "d"):
            await reply_of(broker, saga_id)
        await until(lambda: committed(broker) == 1)
        await anyio.sleep(0.2)  # c and d finished, but b before them did not
        assert committed(broker) == 1
    # Killed mid-way (no grace): b, c and d come again; c and d are replayed, b runs.
    assert committed(broker) == 1
    hang.clear()
    calls.clear()
    again = participant()
    async with one_partition(again, broker):
        await until(lambda: committed(broker) == 4)
    assert calls == ["b"]
    assert again.stats.replayed == 2
    assert sorted(r.saga_id for r in replies_now(broker)) == ["a", "b", "c", "c", "d", "d"]


async def test_graceful_shutdown_finishes_and_commits_the_work_in_hand() -> None:
    p = Participant("svc", grace=5)
    started = anyio.Event()

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> None:
        started.set()
        await anyio.sleep(0.3)

    broker = MemoryBroker(default_partitions=1)
    async with one_partition(p, broker):
        send(broker, command())
        await started.wait()
    (reply,) = replies_now(broker)
    assert reply.ok
    assert committed(broker) == 1


async def test_the_harness_still_drives_sagas_with_concurrent_participants() -> None:
    # A smoke test of saga.testing with the new scheduling: many sagas at once.
    p = Participant("svc")

    @p.handler("charge")
    async def charge(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        await anyio.sleep(0.01)
        return {"charge": ctx.saga_id}

    @p.handler("book")
    async def book(payload: dict[str, Any], ctx: StepContext) -> None:
        return None

    @p.handler("refund")
    async def refund(payload: dict[str, Any], ctx: StepContext) -> None:
        return None

    async with SagaHarness([TRIP], [p]) as h:
        ids = [await h.start("trip", {}) for _ in range(10)]
        states = [await h.run_until_done(i) for i in ids]
    assert {s.status for s in states} == {SagaStatus.COMPLETED}


# -- The worker pool ---------------------------------------------------------------------------


async def test_no_more_commands_run_at_once_than_the_participants_concurrency() -> None:
    p = Participant("svc", concurrency=2)
    running: set[str] = set()
    peak = [0]
    release: dict[str, anyio.Event] = {f"s-{i}": anyio.Event() for i in range(5)}

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> None:
        running.add(ctx.saga_id)
        peak[0] = max(peak[0], len(running))
        await release[ctx.saga_id].wait()
        running.discard(ctx.saga_id)

    broker = MemoryBroker(default_partitions=1)
    async with one_partition(p, broker):
        send(broker, *(command(f"s-{i}") for i in range(5)))
        released: set[str] = set()
        for expected in (2, 2, 2, 2, 1):  # each one released lets exactly one more in
            await until(lambda n=expected: len(running) == n and not running & released)
            released.add(min(running))
            release[min(running)].set()
        await replies(broker, 5)
        await until(lambda: committed(broker) == 5)
    assert peak[0] == 2
    assert sorted(r.saga_id for r in replies_now(broker)) == [f"s-{i}" for i in range(5)]
    assert all(r.ok for r in replies_now(broker))


async def test_a_command_that_waited_out_its_budget_for_a_free_worker_expires() -> None:
    p = Participant("svc", concurrency=1)
    calls: list[str] = []

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> None:
        calls.append(ctx.saga_id)
        if ctx.saga_id == "busy":
            await anyio.sleep(0.6)  # the only worker: the other saga waits for it

    broker = MemoryBroker(default_partitions=1)
    async with one_partition(p, broker):
        send(broker, command("busy", budget=5), command("waiting", budget=0.3))
        busy = await reply_of(broker, "busy")
        waiting = await reply_of(broker, "waiting")
    assert busy.ok
    assert waiting.error is not None
    assert (waiting.error.type, waiting.error.business) == ("Expired", False)
    assert calls == ["busy"]


async def test_a_sagas_backlog_does_not_keep_a_worker_from_other_sagas() -> None:
    p = Participant("svc", concurrency=1)
    order: list[str] = []

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> None:
        order.append(f"{ctx.saga_id}/{ctx.step}")

    broker = MemoryBroker(default_partitions=1)
    async with one_partition(p, broker):
        send(broker, command("a", "1"), command("a", "2"), command("a", "3"), command("b", "1"))
        await replies(broker, 4)
    # The only worker handles b/1 while a/1's reply is written, before a/2: a worker does not
    # hold on to one saga until its backlog is done.
    assert order.index("b/1") < order.index("a/2")
    assert [s for s in order if s.startswith("a/")] == ["a/1", "a/2", "a/3"]
    assert [f"{r.saga_id}/{r.step}" for r in replies_now(broker) if r.saga_id == "a"] == [
        "a/1",
        "a/2",
        "a/3",
    ]


async def test_a_stop_finishes_what_waits_for_a_worker_within_the_grace_period() -> None:
    p = Participant("svc", concurrency=1, grace=10)
    started = anyio.Event()

    @p.handler("do")
    async def do(payload: dict[str, Any], ctx: StepContext) -> None:
        started.set()
        await anyio.sleep(0.05)

    broker = MemoryBroker(default_partitions=1)
    async with one_partition(p, broker):
        send(broker, *(command(f"s-{i}") for i in range(4)))
        await started.wait()
        await until(lambda: p.stats.handled + p.stats.replayed >= 1)
    # Stopped while three of them were still queued behind the only worker.
    assert sorted(r.saga_id for r in replies_now(broker)) == [f"s-{i}" for i in range(4)]
    assert committed(broker) == 4
