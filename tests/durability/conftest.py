"""What the durability tests share: a fresh topic prefix, a transport and a cluster factory.

Each test gets its own prefix (so its own topics, consumer groups and transactional ids) on the
session broker, or on a broker of its own where it kills or pauses the broker.
"""

from __future__ import annotations

import gc
import os
import random
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from saga.adapters.kafka import KafkaTransport
from tests.chaos.cluster import Cluster

SEED = int(os.environ.get("CHAOS_SEED", "20240607"))
"""Seeds every random choice of these tests; a failure prints it."""


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A topic prefix no other test uses."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:24].strip("-")
    return f"dur-{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A random source seeded by ``CHAOS_SEED`` and the test's name."""
    return random.Random(f"{SEED}:{request.node.name}")


@pytest.fixture
def transport(bootstrap: str) -> KafkaTransport:
    """The test process's own transport on the session broker."""
    return KafkaTransport(bootstrap, deadline=20)


@pytest.fixture
def make_cluster(bootstrap: str, prefix: str, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Builds clusters on the session broker; every process is stopped at teardown."""
    made: list[Cluster] = []

    def make(*, partitions: int = 4, step_timeout: float = 5.0, on: str | None = None) -> Cluster:
        workdir = tmp_path / f"cluster-{len(made)}"
        cluster = Cluster(
            on or bootstrap, prefix, workdir, partitions=partitions, step_timeout=step_timeout
        )
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.close()


@pytest.fixture(autouse=True)
def _reclaim_garbage() -> Iterator[None]:
    """Collects garbage after each test, so that a client a test left open warns in that test
    (with ``filterwarnings = error``, it fails there) rather than in a later, unrelated one."""
    yield
    gc.collect()
