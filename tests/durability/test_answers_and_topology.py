"""On the real broker: every start gets an answer, and a changed partition count is refused.

``saga start`` of a name no coordinator knows used to exit 0 with an id whose request was
dead-lettered, and a start for an existing id with another input was silently dropped; now the
first ends ``rejected`` with its reason and the second follows ``--if-exists``. Adding
partitions to the topics used to move sagas under their coordinators' feet; now a coordinator
refuses to run on a count other than the one its checkpoints were written under.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

import saga
from saga.adapters.kafka import KafkaTransport
from saga.cli import main
from saga.core.codec import encode
from saga.core.messages import StartSaga
from saga.errors import TopologyChanged
from saga.runtime.ports import Outgoing, Topics
from tests.chaos.oracle import read_topic
from tests.views.sample_app import ORDER, participants

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(240)]


@asynccontextmanager
async def _serve(
    transport: KafkaTransport, prefix: str, partitions: int
) -> AsyncIterator[saga.Coordinator]:
    geo, pay, kitchen = participants()
    async with (
        saga.Coordinator(
            [ORDER], transport=transport, prefix=prefix, partitions=partitions
        ) as coordinator,
        geo.serving(transport, prefix=prefix, partitions=partitions),
        pay.serving(transport, prefix=prefix, partitions=partitions),
        kitchen.serving(transport, prefix=prefix, partitions=partitions),
    ):
        yield coordinator


@pytest.fixture
async def served(bootstrap: str, prefix: str) -> AsyncIterator[saga.Coordinator]:
    async with _serve(KafkaTransport(bootstrap, deadline=20), prefix, 3) as coordinator:
        yield coordinator


def _cli(
    capsys: pytest.CaptureFixture[str], bootstrap: str, prefix: str
) -> Callable[..., tuple[int, str, str]]:
    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        try:
            code = main([*args, "--prefix", prefix, "--bootstrap-servers", bootstrap])
        finally:
            # `main` replaces the root logger's handlers (a process's entry point): put back.
            root.handlers[:] = handlers
            root.setLevel(level)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


async def test_the_cli_start_answers_unknown_names_and_follows_the_id_reuse_policy(
    served: saga.Coordinator, bootstrap: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = _cli(capsys, bootstrap, prefix)

    async def run(*args: str) -> tuple[int, str, str]:
        return await anyio.to_thread.run_sync(lambda: cli(*args))

    # An unknown name: rejected, with the reason, instead of "not started" for ever.
    code, out, err = await run("start", "ordr", "--id", f"typo-{prefix}", "--wait", "60")
    assert code == 3, (out, err)
    assert "status    rejected" in out
    assert "reason    no saga definition named 'ordr'" in out
    assert "was rejected: no saga definition named 'ordr'" in err
    code, out, _ = await run("status", f"typo-{prefix}")
    assert code == 0
    assert "status    rejected" in out
    # Nothing ran, so the id can be started again, and --wait waits for the new run.
    amount = '{"amount": 5}'
    code, out, err = await run(
        "start", "order", "--id", f"typo-{prefix}", "--input", amount, "--wait", "60"
    )
    assert code == 0, (out, err)
    assert "status    completed" in out
    assert f"digest    {ORDER.digest}" in out

    # An id that exists: "return" keeps it (and says so), "refuse" refuses another input.
    saga_id = f"order-{prefix}"
    code, _, _ = await run("start", "order", "--id", saga_id, "--input", amount, "--wait", "60")
    assert code == 0
    other = '{"amount": 6}'
    code, out, err = await run(
        "start", "order", "--id", saga_id, "--input", other, "--if-exists", "refuse"
    )
    assert code == 1
    assert f"saga {saga_id!r} exists" in err
    assert "refused" in err
    code, out, err = await run("start", "order", "--id", saga_id, "--input", other, "--wait", "30")
    assert code == 0
    assert "the existing saga is shown" in err
    async with saga.SagaClient(KafkaTransport(bootstrap, deadline=20), prefix=prefix) as client:
        with anyio.fail_after(30):
            while True:
                kinds = [e.type for e in await client.events(saga_id)]
                if "start_ignored" in kinds:
                    break
                await anyio.sleep(0.2)
        state = await client.status(saga_id)
    assert kinds.count("saga_started") == 1
    assert kinds[-1] == "start_ignored"
    assert state is not None
    assert state.input == {"amount": 5}
    code, out, _ = await run("replay", saga_id)
    assert code == 0
    assert "start_ignored" in out
    assert f"digest    {ORDER.digest}" in out


def _on_every_partition(transport: KafkaTransport, partitions: int, tag: str) -> list[str]:
    found: dict[int, str] = {}
    for n in itertools.count():
        saga_id = f"{tag}-{n}"
        found.setdefault(transport.partition_for(saga_id.encode(), partitions), saga_id)
        if len(found) == partitions:
            return [found[p] for p in range(partitions)]
    raise AssertionError("unreachable")


async def test_a_changed_partition_count_is_refused_before_anything_is_consumed(
    bootstrap: str, prefix: str
) -> None:
    transport = KafkaTransport(bootstrap, deadline=20)
    async with _serve(transport, prefix, 2) as coordinator:
        for saga_id in _on_every_partition(transport, 2, prefix):
            await coordinator.start("order", {"amount": 5}, saga_id)
            assert (await coordinator.wait(saga_id, 60)).status is saga.SagaStatus.COMPLETED
    t = Topics(prefix)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_partitions(
            {n: NewPartitions(total_count=3) for n in (t.requests, t.replies, t.log, t.snapshots)}
        )
    finally:
        await admin.close()
    # A start waits on the changed topics (a finished id, sent again); it must not be acted on.
    fresh = KafkaTransport(bootstrap, deadline=20)  # a new process: no cached metadata
    with anyio.fail_after(30):
        while await fresh.partitions(t.requests) != 3:
            await anyio.sleep(0.2)
            fresh = KafkaTransport(bootstrap, deadline=20)
    again = StartSaga(message_id="again", saga_id="x", saga_name="order", input={}, at=1.0)
    async with fresh.producer() as producer:
        await producer.send([Outgoing(t.requests, b"x", encode(again))])
    log_before = len(await read_topic(fresh, t.log))

    later = saga.Coordinator([ORDER], transport=fresh, prefix=prefix, partitions=3)
    with pytest.raises(TopologyChanged) as caught, anyio.fail_after(60):
        await later.run()
    assert (caught.value.recorded, caught.value.current) == (2, 3)
    assert "new prefix" in str(caught.value)
    await anyio.sleep(1)
    assert len(await read_topic(fresh, t.log)) == log_before
    assert await read_topic(fresh, t.dlq) == []
