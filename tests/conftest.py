"""Session fixtures for the real infrastructure: one Kafka broker and one Jaeger per run.

Both start lazily, the first time a test asks for them, on free loopback ports, and stop when
the session ends. When one cannot start (a missing JDK, a failed build, a port race, a crash
during start-up) the fixture raises and every test that needs it errors with the cause and the
server's log: infrastructure tests never skip, so a broken CI machine cannot pass by testing
nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deploy.jaeger import JaegerServer, start_jaeger
from deploy.kafka import KafkaServer, start_kafka


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Runs `@pytest.mark.anyio` tests on asyncio only (aiokafka needs it)."""
    return "asyncio"


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaServer]:
    """A single-node KRaft broker on 127.0.0.1, shared by the whole session."""
    with start_kafka() as server:
        yield server


@pytest.fixture(scope="session")
def bootstrap(kafka: KafkaServer) -> str:
    """The session broker's bootstrap string, e.g. "127.0.0.1:40123"."""
    return kafka.bootstrap_servers


@pytest.fixture(scope="session")
def jaeger() -> Iterator[JaegerServer]:
    """A Jaeger v2 with memory storage on 127.0.0.1, shared by the whole session."""
    with start_jaeger() as server:
        yield server
