"""Session fixtures for the real infrastructure: one Kafka broker, one secured Kafka broker
(TLS, SASL/SCRAM, ACLs), one 3-broker Kafka cluster and one Jaeger per run.

Each starts lazily, the first time a test asks for it, on free loopback ports, and stops when
the session ends. When one cannot start (a missing JDK, a failed build, a port race, a crash
during start-up) the fixture raises and every test that needs it errors with the cause and the
server's log (every broker's, for the cluster): infrastructure tests never skip, so a broken CI
machine cannot pass by testing nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deploy.jaeger import JaegerServer, start_jaeger
from deploy.kafka import KafkaServer, start_kafka
from deploy.kafka_cluster import KafkaCluster, start_kafka_cluster
from deploy.kafka_secure import SecureKafka, start_secure_kafka


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
def kafka_secure() -> Iterator[SecureKafka]:
    """A secured single-node KRaft broker on 127.0.0.1, shared by the whole session.

    Its only client listener is SASL_SSL (`SecureKafka.bootstrap_servers`, CA in `ca_file`),
    with a SCRAM user per principal of `deploy.kafka_secure.PRINCIPALS` (`users`,
    `client_env`). Nobody but ``admin`` may do anything until a test module calls
    ``kafka_secure.grant(prefix, services)`` for its own topic prefix.
    """
    with start_secure_kafka() as server:
        yield server


@pytest.fixture(scope="session")
def kafka_cluster() -> Iterator[KafkaCluster]:
    """A KRaft cluster of three combined broker-controller nodes on 127.0.0.1 (replication 3,
    ``min.insync.replicas`` 2), shared by the whole session.

    A test that kills, stops or pauses a broker brings it back before it ends, and waits until
    `KafkaCluster.healthy`, so that the next test finds all three brokers in sync.
    """
    with start_kafka_cluster(brokers=3) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def jaeger() -> Iterator[JaegerServer]:
    """A Jaeger v2 with memory storage on 127.0.0.1, shared by the whole session."""
    with start_jaeger() as server:
        yield server


# Under `make test` the suite runs on two xdist workers (`--dist loadgroup`), each with its own
# lazily started servers. The tests of the 3-broker cluster and of the secured broker are kept
# on one worker each, so that only one of each is started per run (a cluster is three JVMs).
_ONE_WORKER_FIXTURES = {"kafka_cluster": "cluster", "kafka_secure": "secure"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Puts the tests that need the cluster, or the secured broker, in one xdist group each."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        for fixture, group in _ONE_WORKER_FIXTURES.items():
            if fixture in fixtures:
                item.add_marker(pytest.mark.xdist_group(group))
                break
