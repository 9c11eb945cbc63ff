"""The raw reference: what pure aiokafka does with 3 transactional request→reply round trips.

No engine: a coordinator-like process consumes ``<prefix>.requests`` and ``<prefix>.replies``
(read_committed, one consumer group) and, for each poll's batch, in **one transaction**
produces the next command of each "saga" (round 1 on a request, round k+1 on the reply to
round k) to ``<prefix>.commands.<service>`` and commits the consumed offsets with it
(`send_offsets_to_transaction`); after the third reply it produces a ``done`` record to
``<prefix>.done`` instead. A participant-like process per service consumes its command topic
and, per batch, in one transaction produces the replies to ``<prefix>.replies`` and commits its
offsets. So per saga: 4 coordinator-side and 3 participant-side transactional writes, as the
engine's 3-step saga has (start, and one per reply; one per command).

Records keep their partition end to end (the request's partition, chosen by the load
generator, is passed explicitly), so no client hashes keys; the loop is sequential (poll,
transaction, commit, poll). The clients are tuned for latency as a careful user would:
``fetch_max_wait_ms=10``, ``linger_ms=0``, ``retry_backoff_ms=10`` (aiokafka's 100 ms default
backoff is what the issue found behind the engine's p99). Same broker, partitions and in-flight
levels as the engine's runs: the floor of latency and the ceiling of throughput.

A variant (``--plain-replies``, "raw-plain" in the report) replies as the engine's participants
do: an idempotent producer without a transaction, the offsets committed once the replies are
acknowledged (at-least-once; the engine de-duplicates with the participant's reply store). It
is the floor for the engine's actual design, whose participant hop costs no transaction.

Run by `bench.perf.procs.Raw`::

    python -m bench.perf.raw coordinator --bootstrap HOST:PORT --prefix P
    python -m bench.perf.raw participant --bootstrap HOST:PORT --prefix P --services s1,s2,s3
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.perf.app import SERVICES

__all__ = ["RawTopics", "create_raw_topics", "main"]

ROUNDS = len(SERVICES)
CLIENT_TUNING: dict[str, Any] = {"retry_backoff_ms": 10}
CONSUMER_TUNING: dict[str, Any] = {
    "fetch_max_wait_ms": int(os.environ.get("PERF_RAW_FETCH_WAIT_MS", "10")),
    "max_poll_records": 500,
}


@dataclass(frozen=True)
class RawTopics:
    """The reference's topic names under one prefix."""

    prefix: str

    @property
    def requests(self) -> str:
        """Starts from the load generator."""
        return f"{self.prefix}.requests"

    @property
    def replies(self) -> str:
        """Replies from the participant-like processes."""
        return f"{self.prefix}.replies"

    @property
    def done(self) -> str:
        """One record per finished "saga", what the load generator tails."""
        return f"{self.prefix}.done"

    def commands(self, service: str) -> str:
        """One service's commands."""
        return f"{self.prefix}.commands.{service}"

    def all(self) -> list[str]:
        """Every topic."""
        return [self.requests, self.replies, self.done, *map(self.commands, SERVICES)]


async def create_raw_topics(bootstrap: str, prefix: str, partitions: int) -> None:
    """Creates the reference's topics (replication 1, as the engine's on one broker)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        topics = RawTopics(prefix).all()
        await admin.create_topics([NewTopic(t, partitions, 1) for t in topics])
        with anyio.fail_after(60):
            # The broker offers nothing to wait on: poll until every partition has a leader.
            while True:
                described = await admin.describe_topics(topics)
                if all(
                    t.get("error_code", 0) == 0
                    and len(t["partitions"]) == partitions
                    and all(p.get("leader", -1) >= 0 for p in t["partitions"])
                    for t in described
                ):
                    return
                await anyio.sleep(0.2)
    finally:
        await admin.close()


def _producer(bootstrap: str, transactional_id: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=transactional_id,
        enable_idempotence=True,
        acks="all",
        linger_ms=0,
        **CLIENT_TUNING,
    )


def _consumer(bootstrap: str, group: str, topics: list[str]) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=group,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **CONSUMER_TUNING,
        **CLIENT_TUNING,
    )


Route = Callable[[str, bytes], tuple[str, bytes] | None]
"""(topic consumed, value) -> (topic to produce to, value), for each record."""


async def _loop(bootstrap: str, group: str, topics: list[str], route: Route) -> None:
    """Consume, transform each record in one transaction per batch with the offsets, repeat."""
    consumer = _consumer(bootstrap, group, topics)
    producer = _producer(bootstrap, f"{group}.{uuid.uuid4().hex[:8]}")
    await consumer.start()
    await producer.start()
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=100, max_records=500)
            if not batch:
                continue
            async with producer.transaction():
                futures = []
                offsets: dict[TopicPartition, int] = {}
                for tp, msgs in batch.items():
                    for m in msgs:
                        out = route(tp.topic, m.value or b"")
                        if out is not None:
                            futures.append(
                                await producer.send(
                                    out[0], out[1], key=m.key, partition=tp.partition
                                )
                            )
                    offsets[tp] = msgs[-1].offset + 1
                for f in futures:
                    await f
                await producer.send_offsets_to_transaction(offsets, group)
    finally:
        with anyio.CancelScope(shield=True):
            await producer.stop()
            await consumer.stop()


async def run_coordinator(bootstrap: str, prefix: str) -> None:
    """The coordinator-like role: request → command 1, reply k → command k+1 or done."""
    t = RawTopics(prefix)

    def route(topic: str, value: bytes) -> tuple[str, bytes]:
        done_round = 0 if topic == t.requests else int(value)
        if done_round >= ROUNDS:
            return t.done, b"done"
        return t.commands(SERVICES[done_round]), str(done_round + 1).encode()

    await _loop(bootstrap, f"{prefix}.coordinator", [t.requests, t.replies], route)


async def _plain_loop(bootstrap: str, group: str, topics: list[str], route: Route) -> None:
    """Consume, produce with an idempotent producer (no transaction), wait for the acks, commit
    the offsets, repeat: at-least-once, as the engine's participants reply (they de-duplicate
    with their reply store instead)."""
    consumer = _consumer(bootstrap, group, topics)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", linger_ms=0,
        **CLIENT_TUNING,
    )  # fmt: skip
    await consumer.start()
    await producer.start()
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=100, max_records=500)
            futures = []
            for tp, msgs in batch.items():
                for m in msgs:
                    out = route(tp.topic, m.value or b"")
                    if out is not None:
                        futures.append(
                            await producer.send(out[0], out[1], key=m.key, partition=tp.partition)
                        )
            for f in futures:
                await f
            if batch:
                await consumer.commit({tp: msgs[-1].offset + 1 for tp, msgs in batch.items()})
    finally:
        with anyio.CancelScope(shield=True):
            await producer.stop()
            await consumer.stop()


async def run_participants(
    bootstrap: str, prefix: str, services: list[str], *, transactional: bool = True
) -> None:
    """The participant-like role: each command becomes a reply carrying its round, in a
    transaction with the offsets (``transactional``), or acked and then committed."""
    t = RawTopics(prefix)

    def route(topic: str, value: bytes) -> tuple[str, bytes]:
        return t.replies, value

    loop = _loop if transactional else _plain_loop
    async with anyio.create_task_group() as tg:
        for service in services:
            tg.start_soon(loop, bootstrap, f"{prefix}.{service}", [t.commands(service)], route)


async def _until_signalled(run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        await run()
        tg.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> None:
    """Parses the arguments and runs the chosen role until SIGTERM."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("role", choices=["coordinator", "participant"])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--services", default=",".join(SERVICES))
    parser.add_argument(
        "--plain-replies", action="store_true",
        help="participant: replies without a transaction, offsets committed after the acks",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.role == "coordinator":

        async def run() -> None:
            await run_coordinator(args.bootstrap, args.prefix)
    else:
        services = [s for s in args.services.split(",") if s]

        async def run() -> None:
            await run_participants(
                args.bootstrap, args.prefix, services, transactional=not args.plain_replies
            )

    anyio.run(_until_signalled, run)


if __name__ == "__main__":
    main()
