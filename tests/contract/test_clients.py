"""Choosing the Kafka client (`saga.adapters.clients`): SAGA_KAFKA_CLIENT and its errors."""

from __future__ import annotations

import pytest

from saga.adapters.clients import client_from_env, kafka_transport
from saga.adapters.kafka import KafkaTransport
from saga.adapters.rdkafka import RdKafkaTransport
from saga.errors import ConfigurationError


def test_aiokafka_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAGA_KAFKA_CLIENT", raising=False)
    assert client_from_env() == "aiokafka"
    assert isinstance(kafka_transport("127.0.0.1:1"), KafkaTransport)


def test_rdkafka_is_chosen_by_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_KAFKA_CLIENT", " RdKafka ")
    transport = kafka_transport("127.0.0.1:1", instance_id="coordinator-0")
    assert isinstance(transport, RdKafkaTransport)
    assert transport.bootstrap_servers == "127.0.0.1:1"


def test_an_unknown_client_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_KAFKA_CLIENT", "kafka-python")
    with pytest.raises(ConfigurationError, match=r"'kafka-python'.*aiokafka.*rdkafka"):
        client_from_env()
