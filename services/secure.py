"""A secured deployment of one topic prefix: keys, keyring, policy, payload keys and ACLs.

`SecureSetup.create` prepares everything the processes of one deployment (a coordinator, its
services, a client and an operator) need on a secured broker (`deploy.kafka_secure`):

- an Ed25519 signing key per principal (``<directory>/<principal>.key``, mode 0600): the
  ``coordinator``, each service (the principal of the same name) and, for the requests,
  ``client``, ``operator`` and ``manager``;
- the keyring of their public keys (``keyring.yaml``) and a policy (``policy.yaml``): the
  coordinator is the only coordinator, each service answers for itself only, ``client`` may
  start the deployment's sagas and signal them (the demo plays the kitchens, which confirm
  orders), ``manager`` may decide their approval steps, and ``operator`` may cancel, retry
  and resolve any saga, and decide approvals escalated to it;
- optionally an AES-GCM payload key file (``payload-keys.json``, 0600) for payload sealing;
- the broker ACLs of the prefix (`deploy.kafka_secure.engine_acls`).

Keys and payload keys already in the directory are reused, so that a second run (of the demo,
say) can still read what the first one wrote; the keyring and the policy are written again
each time from the keys found. `SecureSetup.env` then gives the environment of one principal's
process (the broker's ``KAFKA_*`` settings and the ``SAGA_*`` trust settings) and
`SecureSetup.transport` and `SecureSetup.client` build matching objects in this process.

The broker is a `SecureKafka` (tests) or `LocalSecureBroker` (the broker of
``make kafka-up SECURE=1``, read from the cache): anything with the `SecureBroker` shape.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import yaml

from deploy.kafka_secure import ADMIN, grant_acls, load_users, secure_dir
from saga import SagaClient
from saga.adapters.kafka import KafkaTransport
from saga.adapters.kafka_settings import KafkaSecurity
from saga.adapters.sealing import ENV_VAR as PAYLOAD_KEYS_ENV
from saga.adapters.sealing import SealedTransport, load_data_keys, new_data_key_file
from saga.runtime.ports import Transport
from saga.runtime.trust import ENV_SETTINGS, Keyring, SigningKey, new_key

__all__ = [
    "CLIENT",
    "COORDINATOR",
    "MANAGER",
    "OPERATOR",
    "SIGNERS_ONLY",
    "TRUST_ENV",
    "LocalSecureBroker",
    "SecureBroker",
    "SecureSetup",
]

COORDINATOR = "coordinator"
"""The coordinator's principal (its SASL user and its signing key)."""
CLIENT = "client"
"""The principal that starts sagas (the demo, the tests)."""
OPERATOR = "operator"
"""The principal that cancels, retries and resolves sagas."""
MANAGER = "manager"
"""The principal that approves large orders. It signs only: it has no broker user of its own,
and its requests go over the broker connection of ``client`` (`SecureSetup.client`)."""
SIGNERS_ONLY = (MANAGER,)
"""Principals with a signing key but no broker user: they connect as `CLIENT`."""

TRUST_ENV = (
    ENV_SETTINGS["signing_key"],
    ENV_SETTINGS["keyring"],
    ENV_SETTINGS["policy"],
    ENV_SETTINGS["unsigned"],
    PAYLOAD_KEYS_ENV,
)
"""The trust and sealing variables, which a process must get from its setup and nowhere else
(an inherited ``SAGA_UNSIGNED=1`` beside keys is refused at start-up)."""


class SecureBroker(Protocol):
    """What a setup needs of a secured broker (`deploy.kafka_secure.SecureKafka` has it)."""

    @property
    def bootstrap_servers(self) -> str:
        """The SASL_SSL address."""
        ...

    @property
    def users(self) -> Mapping[str, str]:
        """Principal to SCRAM password, ``admin`` included."""
        ...

    def client_env(self, principal: str) -> dict[str, str]:
        """The ``KAFKA_*`` variables that connect as ``principal``."""
        ...

    def grant(self, prefix: str, services: Sequence[str]) -> None:
        """Creates the ACLs of one deployment and waits until they apply."""
        ...


@dataclass(frozen=True)
class LocalSecureBroker:
    """The broker of ``make kafka-up SECURE=1``, known from the cache (``<cache>/secure``).

    Args:
        bootstrap_servers: Its SASL_SSL address.
        ca_file: The CA that signed its certificate (default ``<cache>/secure/ca.pem``).
        mechanism: The SCRAM mechanism to use.
    """

    bootstrap_servers: str = "127.0.0.1:9092"
    ca_file: Path = field(default_factory=lambda: secure_dir() / "ca.pem")
    mechanism: str = "SCRAM-SHA-512"

    @property
    def users(self) -> Mapping[str, str]:
        """Principal to password, from ``<cache>/secure/users.json`` (as the broker was
        formatted with them)."""
        return load_users()

    def client_env(self, principal: str) -> dict[str, str]:
        """The ``KAFKA_*`` variables that connect as ``principal`` (as `SecureKafka` gives
        them).

        Raises:
            KeyError: The broker has no such user.
        """
        users = self.users
        if principal not in users:
            raise KeyError(f"the secured broker has no user {principal!r}")
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": self.mechanism,
            "KAFKA_SASL_USERNAME": principal,
            "KAFKA_SASL_PASSWORD": users[principal],
            "KAFKA_SSL_CA_LOCATION": str(self.ca_file),
        }

    def grant(self, prefix: str, services: Sequence[str]) -> None:
        """Creates the ACLs of one deployment (`deploy.kafka_secure.grant_acls`).

        Raises:
            InfraError: The broker refused or did not apply them in time.
            OSError: The broker could not be reached.
        """
        grant_acls(
            self.bootstrap_servers,
            self.ca_file,
            self.users[ADMIN],
            prefix,
            services,
            mechanism=self.mechanism,
        )


def _policy(services: Iterable[str], sagas: Sequence[str]) -> str:
    data = {
        "version": 1,
        "coordinators": [COORDINATOR],
        "services": {s: [s] for s in services},
        "rules": [
            {"name": "the client starts sagas", "who": [CLIENT], "may": ["start"], "sagas": sagas},
            # The demo's client plays the kitchens too, which confirm orders with a signal.
            {"name": "kitchens confirm orders", "who": [CLIENT], "may": ["signal"], "sagas": sagas},
            {
                "name": "managers decide approvals",
                "who": [MANAGER],
                "may": ["approve"],
                "sagas": sagas,
            },
            {
                "name": "the operator operates",
                "who": [OPERATOR],
                # approve: escalated approvals reach the operator (`services.app.ESCALATE_TO`)
                "may": ["cancel", "retry", "resolve", "approve"],
                "sagas": ["*"],
            },
        ],
    }
    return yaml.safe_dump(data, sort_keys=False)


def _key(directory: Path, principal: str) -> SigningKey:
    path = directory / f"{principal}.key"
    if path.exists():
        return SigningKey.load(path)
    key = new_key(principal)
    key.save(path)
    return key


@dataclass(frozen=True)
class SecureSetup:
    """The files and grants of one secured deployment; see the module docstring.

    Build it with `create`.

    Attributes:
        broker: The secured broker.
        prefix: The deployment's topic prefix.
        services: Its services (each also a principal).
        directory: Where the key files, keyring and policy are.
        payload_keys: The payload key file, or None when payloads are not sealed.
    """

    broker: SecureBroker
    prefix: str
    services: tuple[str, ...]
    directory: Path
    payload_keys: Path | None

    @property
    def principals(self) -> tuple[str, ...]:
        """Every principal with a signing key: coordinator, services, client, operator,
        manager."""
        return (COORDINATOR, *self.services, CLIENT, OPERATOR, *SIGNERS_ONLY)

    @property
    def users(self) -> tuple[str, ...]:
        """The principals that connect to the broker as themselves (all but `SIGNERS_ONLY`)."""
        return tuple(p for p in self.principals if p not in SIGNERS_ONLY)

    @property
    def keyring(self) -> Path:
        """The keyring file (every principal's public keys)."""
        return self.directory / "keyring.yaml"

    @property
    def policy(self) -> Path:
        """The policy file."""
        return self.directory / "policy.yaml"

    def key_file(self, principal: str) -> Path:
        """The signing key file of ``principal``."""
        return self.directory / f"{principal}.key"

    @classmethod
    def create(
        cls,
        broker: SecureBroker,
        prefix: str,
        services: Sequence[str],
        directory: Path,
        *,
        sagas: Sequence[str] = ("*",),
        seal: bool = True,
        grant: bool = True,
    ) -> SecureSetup:
        """Writes (or reuses) the keys, writes the keyring and policy, grants the ACLs.

        Args:
            broker: The secured broker; it must have a user for every principal.
            prefix: The deployment's topic prefix.
            services: The services taking part (principals of the same name).
            directory: Where the files go (created with mode 0700).
            sagas: The saga names ``client`` may start (default: any).
            seal: Whether payloads are sealed (a payload key file is created or reused).
            grant: Whether to create the prefix's ACLs on the broker now.

        Raises:
            KeyError: The broker has no user for one of the principals.
            TrustError: A key file in the directory is unusable.
            InfraError: The ACLs could not be created.
        """
        setup = cls(broker, prefix, tuple(dict.fromkeys(services)), directory, None)
        missing = [p for p in setup.users if p not in broker.users]
        if missing:
            raise KeyError(f"the secured broker has no users {missing}: add them to its users")
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        keys = [_key(directory, p) for p in setup.principals]
        Keyring(k.public_entry() for k in keys).save(setup.keyring)
        setup.policy.write_text(_policy(setup.services, list(sagas)))
        payload_keys = None
        if seal:
            payload_keys = directory / "payload-keys.json"
            if not payload_keys.exists():
                new_data_key_file(payload_keys)
            load_data_keys(payload_keys)  # refuse an unusable file here, not in six processes
        if grant:
            broker.grant(prefix, setup.services)
        return cls(broker, prefix, setup.services, directory, payload_keys)

    def env(self, principal: str) -> dict[str, str]:
        """The environment of a process of ``principal``: the broker's ``KAFKA_*`` variables,
        ``SAGA_SIGNING_KEY``, ``SAGA_KEYRING``, ``SAGA_POLICY`` and, when sealing,
        ``SAGA_PAYLOAD_KEYS``.

        ``admin`` (the broker's super user, for oracles and set-up) gets the broker variables
        and the keyring, policy and payload keys, but no signing key.

        Raises:
            KeyError: The broker has no such user.
        """
        env = dict(self.broker.client_env(principal))
        if principal != ADMIN:
            env[ENV_SETTINGS["signing_key"]] = str(self.key_file(principal))
        env[ENV_SETTINGS["keyring"]] = str(self.keyring)
        env[ENV_SETTINGS["policy"]] = str(self.policy)
        if self.payload_keys is not None:
            env[PAYLOAD_KEYS_ENV] = str(self.payload_keys)
        return env

    def security(self, principal: str) -> KafkaSecurity:
        """The Kafka connection settings of ``principal``."""
        return KafkaSecurity.from_env(self.broker.client_env(principal))

    def transport(self, principal: str, *, deadline: float = 30.0) -> Transport:
        """A transport connected as ``principal``, sealing and opening payloads when the
        setup seals them.

        Args:
            principal: A user of the broker (``admin`` for oracles that read everything).
            deadline: The transport's deadline (see `KafkaTransport`).
        """
        inner = KafkaTransport(
            self.broker.bootstrap_servers,
            deadline=deadline,
            client_id=f"saga-{principal}",
            security=self.security(principal),
        )
        if self.payload_keys is None:
            return inner
        return SealedTransport(inner, load_data_keys(self.payload_keys))

    def signer(self, principal: str) -> SigningKey:
        """The signing key of ``principal``."""
        return SigningKey.load(self.key_file(principal))

    def client(self, principal: str = CLIENT, *, deadline: float = 30.0) -> SagaClient:
        """A `SagaClient` on the prefix that connects and signs as ``principal``.

        A principal of `SIGNERS_ONLY` (``manager``) connects as ``client`` and signs as
        itself.

        Args:
            principal: ``client`` (starts sagas), ``operator`` (operates them) or ``manager``
                (decides approvals).
            deadline: The transport's deadline.
        """
        connects_as = CLIENT if principal in SIGNERS_ONLY else principal
        return SagaClient(
            self.transport(connects_as, deadline=deadline),
            prefix=self.prefix,
            signer=self.signer(principal),
        )
