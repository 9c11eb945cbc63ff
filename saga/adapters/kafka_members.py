"""What both Kafka transports take and keep (`saga.adapters.kafka`, `saga.adapters.rdkafka`):
the brokers, the deadline, the security settings, and the names their consumers use in their
groups under static membership."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from saga.adapters.kafka_settings import KafkaSecurity, KafkaSettingsError

__all__ = ["KafkaClientSettings"]


class KafkaClientSettings:
    """The settings of a Kafka transport (each transport documents them in its own ``Args``).

    Raises:
        KafkaSettingsError: ``instance_id`` is blank.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        deadline: float = 30.0,
        client_id: str = "saga",
        security: KafkaSecurity | None = None,
        instance_id: str | None = None,
        session_timeout: float = 10.0,
    ) -> None:
        if instance_id is not None and not instance_id.strip():
            raise KafkaSettingsError("instance_id: give a name, or None for none")
        self.bootstrap_servers = bootstrap_servers
        self.deadline = deadline
        self.client_id = client_id
        self.security = security or KafkaSecurity()
        self.instance_id = instance_id
        self.session_timeout = session_timeout
        self._instances: dict[str, set[str]] = {}  # group -> the instance ids open in it

    @contextmanager
    def _instance(self, group_id: str) -> Iterator[str | None]:
        """This transport's instance id for a new member of ``group_id``, suffixed (``-2``,
        ``-3``, in the order opened) when one is open in the group already."""
        if self.instance_id is None:
            yield None
            return
        taken = self._instances.setdefault(group_id, set())
        name, n = self.instance_id, 1
        while name in taken:
            n += 1
            name = f"{self.instance_id}-{n}"
        taken.add(name)
        try:
            yield name
        finally:
            taken.discard(name)
