"""Which Kafka client a process runs on: aiokafka (the default) or librdkafka.

Both adapters implement the same transport port and pass the same contract suite
(tests/contract): `saga.adapters.kafka.KafkaTransport` (aiokafka, pure Python) and
`saga.adapters.rdkafka.RdKafkaTransport` (confluent-kafka, the protocol in C on librdkafka's
threads; several times the throughput at a fraction of the CPU in bench/REPORT.md, no
OAUTHBEARER). ``SAGA_KAFKA_CLIENT=rdkafka`` picks the second for the `saga` command and the
benchmarks; a program picks by constructing the one it wants.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

from saga.adapters.kafka_settings import KafkaSecurity
from saga.errors import ConfigurationError

if TYPE_CHECKING:
    from saga.adapters.kafka import KafkaTransport
    from saga.adapters.rdkafka import RdKafkaTransport

__all__ = ["CLIENTS", "Client", "client_from_env", "kafka_transport"]

Client = Literal["aiokafka", "rdkafka"]
CLIENTS: tuple[Client, ...] = ("aiokafka", "rdkafka")


def client_from_env() -> Client:
    """``$SAGA_KAFKA_CLIENT``, ``aiokafka`` when unset.

    Raises:
        ConfigurationError: It names another client.
    """
    given = os.environ.get("SAGA_KAFKA_CLIENT", "").strip().lower() or "aiokafka"
    for client in CLIENTS:
        if given == client:
            return client
    raise ConfigurationError(f"SAGA_KAFKA_CLIENT={given!r}: use aiokafka (the default) or rdkafka")


def kafka_transport(
    bootstrap_servers: str,
    *,
    client: Client | None = None,
    security: KafkaSecurity | None = None,
    instance_id: str | None = None,
    deadline: float = 30.0,
) -> KafkaTransport | RdKafkaTransport:
    """The transport of ``client`` (default: `client_from_env`) on the given brokers.

    Raises:
        ConfigurationError: The client is unknown, or librdkafka's is not installed.
        KafkaSettingsError: The security settings do not fit the client.
    """
    chosen = client or client_from_env()
    if chosen == "rdkafka":
        try:
            from saga.adapters.rdkafka import RdKafkaTransport
        except ImportError:
            raise ConfigurationError(
                "SAGA_KAFKA_CLIENT=rdkafka needs confluent-kafka: "
                "pip install 'saga-engine[rdkafka]'"
            ) from None
        return RdKafkaTransport(
            bootstrap_servers, security=security, instance_id=instance_id, deadline=deadline
        )
    from saga.adapters.kafka import KafkaTransport

    return KafkaTransport(
        bootstrap_servers, security=security, instance_id=instance_id, deadline=deadline
    )
