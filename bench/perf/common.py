"""What every benchmark of the suite shares: the run's context (broker, work directory,
options), topic set-up, and starting the engine or the raw reference for a measurement."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from bench.perf.load import EngineLoad, Generator, RawLoad
from bench.perf.procs import Engine, Raw, Servers
from bench.perf.raw import create_raw_topics
from bench.perf.signing import Signing
from saga.runtime.signing import SigningKey

__all__ = [
    "Context",
    "engine_generator",
    "engine_topics",
    "new_prefix",
    "raw_generator",
]


@dataclass
class Context:
    """One run of the suite: the servers, where logs go, and the options.

    Attributes:
        servers: The throwaway broker (and Jaeger).
        workdir: Logs of every process, kept on failure.
        quick: The small sizes (a few minutes in all).
        split: One participant process per service.
        partitions: Partition count of every topic.
        results: Figures measured so far in this run, by benchmark (B7 and B4 use B1's).
        signing: Keys and policy when running signed; None: unsigned.
    """

    servers: Servers
    workdir: Path
    quick: bool = False
    split: bool = True
    partitions: int = 6
    results: dict[str, Any] = field(default_factory=dict)
    signing: Signing | None = None

    def signer(self) -> SigningKey | None:
        """The load generator's signing key when signed."""
        return None if self.signing is None else self.signing.signer()

    @property
    def bootstrap(self) -> str:
        """The broker's address."""
        return self.servers.bootstrap


def new_prefix(what: str) -> str:
    """A topic prefix of its own for one measurement: nothing left over from another."""
    return f"perf-{what}-{uuid.uuid4().hex[:6]}"


async def engine_topics(bootstrap: str, prefix: str, partitions: int) -> None:
    """Creates the engine's topics as its coordinator would (`Coordinator.ensure_topics`),
    before any process starts, so that no client's first write auto-creates one."""
    from bench.perf.app import sagas
    from saga import Coordinator
    from saga.adapters.kafka import KafkaTransport

    transport = KafkaTransport(bootstrap, deadline=60)
    await Coordinator(
        sagas, transport=transport, prefix=prefix, partitions=partitions
    ).ensure_topics()


@contextlib.contextmanager
def engine(ctx: Context, prefix: str, **kwargs: Any) -> Iterator[Engine]:
    """The engine's processes on ``prefix`` (topics created first), stopped after the block."""
    anyio.run(engine_topics, ctx.bootstrap, prefix, ctx.partitions)
    with Engine(
        ctx.bootstrap,
        prefix,
        ctx.workdir,
        split=ctx.split,
        partitions=ctx.partitions,
        signing=ctx.signing,
        **kwargs,
    ) as procs:
        yield procs


@contextlib.contextmanager
def raw(ctx: Context, prefix: str, *, plain_replies: bool = False) -> Iterator[Raw]:
    """The raw reference's processes on ``prefix`` (topics created first)."""
    anyio.run(create_raw_topics, ctx.bootstrap, prefix, ctx.partitions)
    with Raw(
        ctx.bootstrap, prefix, ctx.workdir, split=ctx.split, plain_replies=plain_replies
    ) as procs:
        yield procs


@contextlib.asynccontextmanager
async def engine_generator(ctx: Context, procs: Engine) -> AsyncIterator[Generator]:
    """A warmed-up load generator on the engine's processes."""
    load = EngineLoad(ctx.bootstrap, procs.prefix, partitions=ctx.partitions, signer=ctx.signer())
    async with Generator(ctx.bootstrap, load, procs.check_alive) as gen:
        await gen.warm_up()
        yield gen


@contextlib.asynccontextmanager
async def raw_generator(ctx: Context, procs: Raw) -> AsyncIterator[Generator]:
    """A warmed-up load generator on the raw reference's processes."""
    load = RawLoad(ctx.bootstrap, procs.prefix, partitions=ctx.partitions)
    async with Generator(ctx.bootstrap, load, procs.check_alive) as gen:
        await gen.warm_up()
        yield gen
