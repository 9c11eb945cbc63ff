"""A secured single-node Kafka (KRaft) on loopback: TLS, SASL/SCRAM users and ACLs.

The broker of `deploy.kafka` with every listener on ``SASL_SSL``, so nothing reaches it without
TLS and a password:

* ``CLIENT`` (the bootstrap address, also the inter-broker listener): SCRAM-SHA-512 and
  SCRAM-SHA-256. The credentials of every principal in `PRINCIPALS` are written into the
  metadata when the storage is formatted (``kafka-storage format --add-scram``); their random
  passwords live in ``<cache>/secure/users.json`` (0600), reused across runs.
* ``CONTROLLER``: SASL/PLAIN with the single user ``admin``. KRaft controllers cannot use SCRAM
  (the credentials live in the metadata log they serve), and a PLAINTEXT controller listener
  would need ``User:ANONYMOUS`` as a super user there, which any local process could use to
  create ACLs through the controller. With PLAIN, no principal but ``admin`` exists on it.

TLS: a local CA and a broker certificate for ``127.0.0.1`` and ``localhost`` (`deploy.tls`),
kept in ``<cache>/secure``; Kafka reads both PEM files directly. Authorization: the KRaft
``StandardAuthorizer``, ``allow.everyone.if.no.acl.found=false``, ``super.users=User:admin``.
`SecureKafka.grant` (or `grant_acls`) adds the ACLs of one engine deployment, see
`engine_acls` for the layout, in a single CreateAcls request sent over a raw TLS + SCRAM
connection (aiokafka's admin client has no ACL API), then waits until the broker's authorizer
lists every one of them, so a test may rely on them as soon as it returns.

Command line (``make kafka-up SECURE=1``, ``make kafka-down``):

    python -m deploy.kafka_secure up [--port 9092] [--controller-port 9093]
    python -m deploy.kafka_secure down
    python -m deploy.kafka_secure status
    python -m deploy.kafka_secure grant --prefix saga --services payment,rider [--bootstrap ...]

(``python -m deploy.kafka up --secure`` and ``python -m deploy.kafka grant`` are the same.)
``up`` writes ``<cache>/secure/<principal>.env`` (0600) for every principal, with the variables
of `SecureKafka.client_env`; ``set -a; . ~/.cache/saga-engine/secure/client.env; set +a`` puts
them into a shell.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import enum
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import socket
import ssl
import struct
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from deploy._daemon import Daemon
from deploy._proc import LOOPBACK, InfraError, cache_dir, file_lock
from deploy._server import ServerCli, UpOption, launch
from deploy.kafka import (
    _PORT_ROLES,
    KAFKA_VERSION,
    KafkaServer,
    _metadata_ready,
    _request,
    _server_properties,
    fetch,
)
from deploy.tls import CertAuthority, ensure_ca, ensure_server_cert, write_private

__all__ = [
    "ADMIN",
    "CLUSTER_RESOURCE",
    "MECHANISMS",
    "PRINCIPALS",
    "AclBinding",
    "AclOperation",
    "AuthenticationError",
    "GrantError",
    "PatternType",
    "ResourceType",
    "SecureKafka",
    "describe_acls",
    "engine_acls",
    "grant_acls",
    "load_users",
    "main",
    "secure_dir",
    "start_secure_kafka",
    "write_env_files",
]

ADMIN = "admin"
"""The super user: the broker's own inter-broker and controller connections, and setup."""

PRINCIPALS = (
    ADMIN,
    "coordinator",
    "client",
    "operator",
    # The demo's services (services/).
    "location",
    "payment",
    "restaurant",
    "rider",
    "notification",
    # The services the test suites run.
    "svc",
    "shop",
    "shared",
    "post",
    "mail",
    "hotels",
    "echo",
    "cars",
    "airline",
)
"""The SCRAM users a secured broker is formatted with, unless told otherwise."""

MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256")
"""The SASL mechanisms of the client listener; every user has credentials for both."""

CLUSTER_RESOURCE = "kafka-cluster"
"""The name of Kafka's single cluster resource in ACLs."""

_HASHES = {"SCRAM-SHA-512": "sha512", "SCRAM-SHA-256": "sha256"}
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # Principals and service names.
_PREFIX = re.compile(r"^[A-Za-z0-9._-]+$")  # Kafka's legal topic characters.

_logger = logging.getLogger("deploy.kafka_secure")


class AuthenticationError(InfraError):
    """The broker refused the SASL handshake or the credentials."""


class GrantError(InfraError):
    """Creating ACLs failed, or the broker did not apply them in time."""


# -- secrets on disk ---------------------------------------------------------------------------


def secure_dir() -> Path:
    """Returns ``<cache>/secure`` (mode 0700): the CA, the broker key, users and env files."""
    path = cache_dir() / "secure"
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _check_principal(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"principal {name!r}: use letters, digits, '_' and '-' only")
    return name


def load_users(principals: Iterable[str] = PRINCIPALS) -> dict[str, str]:
    """Returns a password for each principal (and `ADMIN`), creating missing ones.

    Passwords are random (32 URL-safe characters) and kept in ``<cache>/secure/users.json``
    (mode 0600), which only grows: a principal keeps its password across runs.

    Args:
        principals: The principals wanted; `ADMIN` is always added.

    Returns:
        Principal to password, in the order given (`ADMIN` first when it was not given).
    """
    wanted = list(dict.fromkeys([ADMIN, *(_check_principal(p) for p in principals)]))
    directory = secure_dir()
    path = directory / "users.json"
    with file_lock(directory / ".users.lock"):
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        if not isinstance(known, dict):
            known = {}
        missing = [p for p in wanted if not isinstance(known.get(p), str)]
        for principal in missing:
            known[principal] = secrets.token_urlsafe(24)
        if missing or not path.is_file():
            write_private(path, (json.dumps(known, indent=2, sort_keys=True) + "\n").encode())
        return {p: str(known[p]) for p in wanted}


# -- a raw Kafka connection over TLS and SASL/SCRAM ----------------------------------------------


def _kstr(text: str | None) -> bytes:
    if text is None:
        return struct.pack(">h", -1)
    raw = text.encode()
    return struct.pack(">h", len(raw)) + raw


def _kbytes(raw: bytes) -> bytes:
    return struct.pack(">i", len(raw)) + raw


class _Reader:
    """Reads the fields of a (non-flexible) Kafka response body in order."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def _take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return int(value)

    def int8(self) -> int:
        return self._take(">b")

    def int16(self) -> int:
        return self._take(">h")

    def int32(self) -> int:
        return self._take(">i")

    def string(self) -> str | None:
        size = self.int16()
        if size < 0:
            return None
        raw = self.data[self.offset : self.offset + size]
        self.offset += size
        return raw.decode()

    def bytes_(self) -> bytes:
        size = self.int32()
        raw = self.data[self.offset : self.offset + max(size, 0)]
        self.offset += max(size, 0)
        return raw


def _split_bootstrap(bootstrap: str) -> tuple[str, int]:
    first = bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bootstrap servers {bootstrap!r}: expected host:port")
    return host, int(port)


class _Connection:
    """One authenticated connection: TLS verified against a CA, then SASL/SCRAM.

    Synchronous and free of event loops, like the probes of `deploy.kafka`, so a pytest
    fixture may use it while the anyio plugin owns a loop.
    """

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self._corr = 0

    def request(self, api_key: int, version: int, body: bytes) -> bytes:
        self._corr += 1
        return _request(self.sock, api_key, version, self._corr, body)

    def authenticate(self, mechanism: str, username: str, password: str) -> None:
        hash_name = _HASHES.get(mechanism)
        if hash_name is None:
            raise ValueError(f"SASL mechanism {mechanism!r}: expected one of {MECHANISMS}")
        shake = _Reader(self.request(17, 1, _kstr(mechanism)))  # SaslHandshake v1
        if (code := shake.int16()) != 0:
            raise AuthenticationError(f"the broker refused SASL {mechanism} (error {code})")
        nonce = secrets.token_urlsafe(24)
        # RFC 5802 escaping; the principals of this module never need it, callers' might.
        user = username.replace("=", "=3D").replace(",", "=2C")
        first_bare = f"n={user},r={nonce}"
        server_first = self._sasl(b"n,," + first_bare.encode()).decode()
        fields = dict(item.split("=", 1) for item in server_first.split(",") if "=" in item)
        server_nonce = fields.get("r", "")
        if not server_nonce.startswith(nonce) or "s" not in fields or "i" not in fields:
            raise AuthenticationError("the broker sent a malformed SCRAM challenge")
        salted = hashlib.pbkdf2_hmac(
            hash_name, password.encode(), base64.b64decode(fields["s"]), int(fields["i"])
        )
        client_key = hmac.new(salted, b"Client Key", hash_name).digest()
        stored_key = hashlib.new(hash_name, client_key).digest()
        without_proof = f"c=biws,r={server_nonce}"
        auth_message = f"{first_bare},{server_first},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, hash_name).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        final = f"{without_proof},p={base64.b64encode(proof).decode()}"
        server_final = self._sasl(final.encode()).decode()
        server_key = hmac.new(salted, b"Server Key", hash_name).digest()
        expected = hmac.new(server_key, auth_message, hash_name).digest()
        if not server_final.startswith("v=") or not hmac.compare_digest(
            base64.b64decode(server_final[2:]), expected
        ):
            raise AuthenticationError("the broker's SCRAM signature does not verify")

    def _sasl(self, token: bytes) -> bytes:
        reply = _Reader(self.request(36, 0, _kbytes(token)))  # SaslAuthenticate v0
        code = reply.int16()
        message = reply.string()
        if code != 0:
            # The message names the user at most, never the password.
            raise AuthenticationError(f"SASL authentication failed (error {code}): {message}")
        return reply.bytes_()


@contextlib.contextmanager
def _connect(
    bootstrap: str,
    ca_file: Path,
    username: str,
    password: str,
    mechanism: str,
    timeout: float,
) -> Iterator[_Connection]:
    host, port = _split_bootstrap(bootstrap)
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection((host, port), timeout=min(timeout, 2.0)) as raw:
        raw.settimeout(timeout)
        with context.wrap_socket(raw, server_hostname=host) as sock:
            conn = _Connection(sock)
            conn.authenticate(mechanism, username, password)
            yield conn


def _secure_ready(
    bootstrap: str, ca_file: Path, username: str, password: str, mechanism: str, timeout: float
) -> bool:
    """Tells whether an authenticated Metadata request lists a broker and a controller."""
    try:
        with _connect(bootstrap, ca_file, username, password, mechanism, timeout) as conn:
            return _metadata_ready(conn.request(3, 1, struct.pack(">i", 0)))
    except (OSError, struct.error, ValueError, InfraError):
        # ssl.SSLError is an OSError. Until the broker has loaded its metadata the SCRAM users
        # are unknown, so authentication failures mean "not yet" here.
        return False


# -- ACLs ---------------------------------------------------------------------------------------


class ResourceType(enum.IntEnum):
    """Kafka's ACL resource types (the wire codes)."""

    TOPIC = 2
    GROUP = 3
    CLUSTER = 4
    TRANSACTIONAL_ID = 5


class PatternType(enum.IntEnum):
    """How an ACL's resource name matches (the wire codes)."""

    LITERAL = 3
    PREFIXED = 4


class AclOperation(enum.IntEnum):
    """Kafka's ACL operations (the wire codes)."""

    READ = 3
    WRITE = 4
    CREATE = 5
    DELETE = 6
    ALTER = 7
    DESCRIBE = 8
    CLUSTER_ACTION = 9
    DESCRIBE_CONFIGS = 10
    ALTER_CONFIGS = 11
    IDEMPOTENT_WRITE = 12


_ALLOW = 3  # AclPermissionType.ALLOW; this module never creates DENY entries.
_ANY = 1  # The "any" code of every filter field of DescribeAcls.


class AclBinding(NamedTuple):
    """One ALLOW entry: `principal` may do `operation` on a resource, from any host.

    Attributes:
        resource_type: Topic, group, cluster or transactional id.
        name: The resource name, or the prefix when `pattern` is PREFIXED.
        pattern: LITERAL or PREFIXED.
        principal: E.g. "User:payment".
        operation: What is allowed.
    """

    resource_type: ResourceType
    name: str
    pattern: PatternType
    principal: str
    operation: AclOperation

    def __str__(self) -> str:
        """E.g. "User:payment READ TOPIC LITERAL saga.commands.payment"."""
        return (
            f"{self.principal} {self.operation.name} {self.resource_type.name} "
            f"{self.pattern.name} {self.name}"
        )


def engine_acls(prefix: str, services: Sequence[str]) -> list[AclBinding]:
    """The ACLs of one engine deployment whose topics start with ``<prefix>.``.

    * ``coordinator``: create, describe, read, write and describe configs on every topic
      prefixed ``<prefix>.``; read and describe on groups and write and describe on
      transactional ids prefixed ``<prefix>.``; idempotent write and describe on the cluster.
    * each service S: read and describe on the topic ``<prefix>.commands.S`` and the group
      ``<prefix>.participant.S``; write and describe on ``<prefix>.replies`` and
      ``<prefix>.dlq``. Nothing else: no other command topic, not the log nor the requests.
    * ``client``: write and describe on ``<prefix>.requests``; read and describe on
      ``<prefix>.log`` and ``<prefix>.snapshots``; read and describe on groups prefixed
      ``<prefix>.view``.
    * ``operator``: what ``client`` has, plus read and describe on ``<prefix>.dlq`` and
      ``<prefix>.alerts``, and read, write and describe on ``<prefix>.definitions`` (``saga
      deploy`` publishes definitions, ``saga definitions`` and ``saga verify`` read them).
    * the deployment's domain events, topics prefixed ``<prefix>-events.`` (outside the
      engine's topics: a saga's trigger cannot read those): the ``coordinator`` creates, reads
      (its trigger relay starts sagas from them), writes (outcome events) and describes them;
      ``client`` writes, reads and describes them (the front end that places orders and
      follows their outcomes).

    Args:
        prefix: The deployment's topic prefix, e.g. "saga".
        services: The services (principals of the same name) taking part.

    Raises:
        ValueError: The prefix or a service name has characters Kafka or SCRAM do not allow.
    """
    if not _PREFIX.match(prefix) or prefix.endswith("."):
        raise ValueError(f"prefix {prefix!r}: use letters, digits, '.', '_' and '-' only")
    for service in services:
        if not _NAME.match(service):
            raise ValueError(f"service {service!r}: use letters, digits, '_' and '-' only")
    T, G, C, X = (
        ResourceType.TOPIC,
        ResourceType.GROUP,
        ResourceType.CLUSTER,
        ResourceType.TRANSACTIONAL_ID,
    )
    lit, pre = PatternType.LITERAL, PatternType.PREFIXED
    op = AclOperation
    scope = f"{prefix}."
    out: list[AclBinding] = []

    def allow(
        user: str, kind: ResourceType, name: str, pattern: PatternType, *ops: AclOperation
    ) -> None:
        out.extend(AclBinding(kind, name, pattern, f"User:{user}", o) for o in ops)

    coordinator = "coordinator"
    allow(
        coordinator, T, scope, pre,
        op.CREATE, op.DESCRIBE, op.READ, op.WRITE, op.DESCRIBE_CONFIGS,
    )  # fmt: skip
    allow(coordinator, G, scope, pre, op.READ, op.DESCRIBE)
    allow(coordinator, X, scope, pre, op.WRITE, op.DESCRIBE)
    # Describe: the coordinator's describe_cluster picks the replication factor.
    allow(coordinator, C, CLUSTER_RESOURCE, lit, op.IDEMPOTENT_WRITE, op.DESCRIBE)
    for service in dict.fromkeys(services):
        allow(service, T, f"{prefix}.commands.{service}", lit, op.READ, op.DESCRIBE)
        allow(service, G, f"{prefix}.participant.{service}", lit, op.READ, op.DESCRIBE)
        allow(service, T, f"{prefix}.replies", lit, op.WRITE, op.DESCRIBE)
        # Participants dead-letter the commands they cannot decode (poison messages) themselves.
        allow(service, T, f"{prefix}.dlq", lit, op.WRITE, op.DESCRIBE)
        # No cluster ACL: an idempotent producer's InitProducerId is allowed to any principal
        # that may write some topic (KIP-679).
    for user in ("client", "operator"):
        allow(user, T, f"{prefix}.requests", lit, op.WRITE, op.DESCRIBE)
        # Status and wait read these by assignment, without a consumer group.
        allow(user, T, f"{prefix}.log", lit, op.READ, op.DESCRIBE)
        allow(user, T, f"{prefix}.snapshots", lit, op.READ, op.DESCRIBE)
        # Tailing views commit their progress in groups of their own.
        allow(user, G, f"{prefix}.view", pre, op.READ, op.DESCRIBE)
    allow("operator", T, f"{prefix}.dlq", lit, op.READ, op.DESCRIBE)
    allow("operator", T, f"{prefix}.alerts", lit, op.READ, op.DESCRIBE)
    allow("operator", T, f"{prefix}.definitions", lit, op.READ, op.WRITE, op.DESCRIBE)
    events = f"{prefix}-events."
    allow(coordinator, T, events, pre, op.CREATE, op.READ, op.WRITE, op.DESCRIBE)
    allow("client", T, events, pre, op.READ, op.WRITE, op.DESCRIBE)
    return out


def _create_acls_body(bindings: Sequence[AclBinding]) -> bytes:
    body = struct.pack(">i", len(bindings))
    for b in bindings:
        body += struct.pack(">b", b.resource_type) + _kstr(b.name) + struct.pack(">b", b.pattern)
        body += _kstr(b.principal) + _kstr("*") + struct.pack(">bb", b.operation, _ALLOW)
    return body


def _describe_all_acls(conn: _Connection) -> set[AclBinding]:
    """Every ALLOW entry of the broker's authorizer, of the types this module knows."""
    body = struct.pack(">b", _ANY) + _kstr(None) + struct.pack(">b", _ANY)
    body += _kstr(None) + _kstr(None) + struct.pack(">bb", _ANY, _ANY)
    reply = _Reader(conn.request(29, 1, body))  # DescribeAcls v1
    reply.int32()  # throttle_time_ms
    code = reply.int16()
    message = reply.string()
    if code != 0:
        raise GrantError(f"DescribeAcls failed (error {code}): {message}")
    found: set[AclBinding] = set()
    for _ in range(reply.int32()):
        kind, name, pattern = reply.int8(), reply.string() or "", reply.int8()
        for _ in range(reply.int32()):
            principal, _host = reply.string() or "", reply.string()
            operation, permission = reply.int8(), reply.int8()
            with contextlib.suppress(ValueError):
                if permission == _ALLOW:
                    found.add(
                        AclBinding(
                            ResourceType(kind),
                            name,
                            PatternType(pattern),
                            principal,
                            AclOperation(operation),
                        )
                    )
    return found


def describe_acls(
    bootstrap_servers: str,
    ca_file: Path,
    admin_password: str,
    *,
    mechanism: str = "SCRAM-SHA-512",
    timeout: float = 10.0,
) -> set[AclBinding]:
    """Returns every ALLOW entry the broker's authorizer holds (of the kinds `AclBinding` knows).

    Synchronous; authenticates as `ADMIN`. The arguments are those of `grant_acls`.

    Raises:
        AuthenticationError: The broker refused the admin credentials.
        GrantError: The broker refused the request.
        OSError: The broker could not be reached.
    """
    with _connect(bootstrap_servers, ca_file, ADMIN, admin_password, mechanism, timeout) as conn:
        return _describe_all_acls(conn)


def grant_acls(
    bootstrap_servers: str,
    ca_file: Path,
    admin_password: str,
    prefix: str,
    services: Sequence[str],
    *,
    mechanism: str = "SCRAM-SHA-512",
    timeout: float = 15.0,
) -> list[AclBinding]:
    """Creates the ACLs of `engine_acls` on a secured broker and waits until they apply.

    Synchronous: one TLS + SCRAM connection as `ADMIN`, one CreateAcls request, then
    DescribeAcls until the broker's authorizer lists every entry. Granting again is harmless.

    Args:
        bootstrap_servers: The broker's SASL_SSL address, e.g. "127.0.0.1:9092".
        ca_file: The CA that signed the broker's certificate (PEM).
        admin_password: `ADMIN`'s password.
        prefix: The deployment's topic prefix.
        services: The services taking part.
        mechanism: The SCRAM mechanism to authenticate with.
        timeout: Seconds for the whole operation.

    Returns:
        The entries created.

    Raises:
        ValueError: A bad prefix or service name.
        AuthenticationError: The broker refused the admin credentials.
        GrantError: The broker refused an entry, or did not list them all in time.
        OSError: The broker could not be reached (ssl.SSLError: the TLS handshake failed).
    """
    bindings = engine_acls(prefix, services)
    deadline = time.monotonic() + timeout
    with _connect(bootstrap_servers, ca_file, ADMIN, admin_password, mechanism, timeout) as conn:
        reply = _Reader(conn.request(30, 1, _create_acls_body(bindings)))  # CreateAcls v1
        reply.int32()  # throttle_time_ms
        if (count := reply.int32()) != len(bindings):
            raise GrantError(f"CreateAcls answered {count} results for {len(bindings)} ACLs")
        errors = []
        for binding in bindings:
            code, message = reply.int16(), reply.string()
            if code != 0:
                errors.append(f"{binding}: error {code} {message or ''}".rstrip())
        if errors:
            raise GrantError("the broker refused ACLs:\n" + "\n".join(errors))
        wanted = set(bindings)
        while True:
            missing = wanted - _describe_all_acls(conn)
            if not missing:
                return bindings
            if time.monotonic() >= deadline:
                raise GrantError(
                    f"{len(missing)} ACLs were accepted but not applied within {timeout:.0f} s, "
                    f"e.g. {next(iter(missing))}"
                )
            time.sleep(0.05)  # The broker applies them when it replays the metadata log.


# -- the broker ---------------------------------------------------------------------------------


def _jaas(module: str, **options: str) -> str:
    pairs = " ".join(f'{key}="{value}"' for key, value in options.items())
    return f"org.apache.kafka.common.security.{module} required {pairs};"


class SecureKafka(KafkaServer):
    """A running (or stopped) secured single-node broker; see the module docstring.

    Use it as a context manager, like `KafkaServer`. `bootstrap_servers` is the SASL_SSL
    listener: the only one clients can use.
    """

    TITLE = "the secured Kafka broker"

    def __init__(
        self,
        *,
        port: int,
        controller_port: int,
        data_dir: Path,
        owns_data_dir: bool,
        ready_timeout: float,
        users: Mapping[str, str],
        ca: CertAuthority,
        server_pem: Path,
        mechanism: str,
    ) -> None:
        """Describes a broker; `start_secure_kafka` creates and starts it.

        Args:
            port: The SASL_SSL client listener port on 127.0.0.1.
            controller_port: The SASL_SSL (PLAIN, admin only) controller port on 127.0.0.1.
            data_dir: Holds server.properties (0600: it has the admin password), the log and
                the log dirs.
            owns_data_dir: Whether leaving the context manager removes `data_dir`.
            ready_timeout: Seconds each start may take before `StartError`.
            users: Principal to password; must contain `ADMIN`.
            ca: The CA clients trust.
            server_pem: The broker's key and certificate chain (PEM).
            mechanism: The SCRAM mechanism `client_env` names and the probe uses.
        """
        if ADMIN not in users:
            raise ValueError(f"users must contain {ADMIN!r}")
        if mechanism not in MECHANISMS:
            raise ValueError(f"SASL mechanism {mechanism!r}: expected one of {MECHANISMS}")
        super().__init__(
            port=port,
            controller_port=controller_port,
            data_dir=data_dir,
            owns_data_dir=owns_data_dir,
            ready_timeout=ready_timeout,
        )
        self._users = MappingProxyType(dict(users))
        self._ca = ca
        self.server_pem = server_pem
        self.mechanism = mechanism

    @property
    def ca_file(self) -> Path:
        """The PEM of the CA that signed the broker's certificate: what clients must trust."""
        return self._ca.cert_file

    @property
    def users(self) -> Mapping[str, str]:
        """Principal to password (read-only), `ADMIN` included."""
        return self._users

    @property
    def label(self) -> str:
        """The broker and its address, for start-up errors."""
        return f"secured Kafka broker on {self.bootstrap_servers}"

    def client_env(self, principal: str) -> dict[str, str]:
        """The environment variables a process needs to connect as `principal`.

        Args:
            principal: One of `users`.

        Returns:
            KAFKA_BOOTSTRAP_SERVERS, KAFKA_SECURITY_PROTOCOL (SASL_SSL), KAFKA_SASL_MECHANISM,
            KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD and KAFKA_SSL_CA_LOCATION.

        Raises:
            KeyError: The broker has no such user.
        """
        if principal not in self._users:
            raise KeyError(f"the secured broker has no user {principal!r}")
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": self.mechanism,
            "KAFKA_SASL_USERNAME": principal,
            "KAFKA_SASL_PASSWORD": self._users[principal],
            "KAFKA_SSL_CA_LOCATION": str(self.ca_file),
        }

    def grant(self, prefix: str, services: Sequence[str]) -> None:
        """Creates the ACLs of one engine deployment (`engine_acls`); synchronous.

        Returns once the broker enforces them; granting again is harmless.

        Args:
            prefix: The deployment's topic prefix, e.g. "saga".
            services: Its services, each a principal of the same name.

        Raises:
            ValueError: A bad prefix or service name.
            InfraError: The broker refused or could not be reached (see `grant_acls`).
        """
        try:
            grant_acls(
                self.bootstrap_servers, self.ca_file, self._users[ADMIN], prefix, services,
                mechanism=self.mechanism,
            )  # fmt: skip
        except OSError as exc:
            raise GrantError(f"could not reach {self.label}: {exc}") from exc

    def acls(self) -> set[AclBinding]:
        """Returns the ALLOW entries the broker enforces now (`describe_acls`); synchronous.

        Raises:
            InfraError: The broker refused or could not be reached.
        """
        try:
            return describe_acls(
                self.bootstrap_servers, self.ca_file, self._users[ADMIN], mechanism=self.mechanism
            )
        except OSError as exc:
            raise GrantError(f"could not reach {self.label}: {exc}") from exc

    def ping(self, timeout: float = 5.0) -> bool:
        """Tells whether an authenticated (admin, TLS + SCRAM) Metadata request works now.

        Args:
            timeout: Seconds to wait for each answer.
        """
        return _secure_ready(
            self.bootstrap_servers,
            self.ca_file,
            ADMIN,
            self._users[ADMIN],
            self.mechanism,
            timeout,
        )

    def _config(self, log_dirs: Path) -> str:
        admin_password = self._users[ADMIN]
        scram_jaas = _jaas("scram.ScramLoginModule", username=ADMIN, password=admin_password)
        plain_jaas = _jaas(
            "plain.PlainLoginModule",
            username=ADMIN,
            password=admin_password,
            **{f"user_{ADMIN}": admin_password},
        )
        secured = {
            "listeners": f"CLIENT://{LOOPBACK}:{self.port},"
            f"CONTROLLER://{LOOPBACK}:{self.controller_port}",
            "advertised.listeners": f"CLIENT://{LOOPBACK}:{self.port}",
            "listener.security.protocol.map": "CLIENT:SASL_SSL,CONTROLLER:SASL_SSL",
            "inter.broker.listener.name": "CLIENT",
            "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
            "listener.name.client.sasl.enabled.mechanisms": ",".join(MECHANISMS),
            "listener.name.client.scram-sha-512.sasl.jaas.config": scram_jaas,
            "listener.name.client.scram-sha-256.sasl.jaas.config": scram_jaas,
            # The broker's own connections to its controller log in with the same entry.
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": plain_jaas,
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.server_pem),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca_file),
            "ssl.client.auth": "none",
            "ssl.endpoint.identification.algorithm": "https",
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            "super.users": f"User:{ADMIN}",
            # Clients may not create topics by asking for them: the coordinator creates them.
            "auto.create.topics.enable": "false",
        }
        return _server_properties(self.port, self.controller_port, log_dirs, overrides=secured)

    def _format_options(self) -> list[str]:
        # The passwords are on the format's command line for the second or two it runs, so any
        # local user could read them in the process list then: acceptable for a loopback
        # development broker, and StorageTool takes SCRAM credentials no other way.
        return [
            arg
            for mechanism in MECHANISMS
            for user, password in self._users.items()
            for arg in ("--add-scram", f"{mechanism}=[name={user},password={password}]")
        ]

    def _users_fingerprint(self) -> str:
        text = json.dumps([MECHANISMS, sorted(self._users.items())])
        return hashlib.sha256(text.encode()).hexdigest()

    def _prepare(self) -> list[str]:
        # 0700 before server.properties, which holds the admin password, is written into it.
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        log_dirs = self.data_dir / "logs"
        marker = self.data_dir / "users.sha256"
        fingerprint = self._users_fingerprint()
        formatted = (log_dirs / "meta.properties").is_file()
        if formatted and (not marker.is_file() or marker.read_text().strip() != fingerprint):
            # SCRAM users are only written when the storage is formatted: a broker whose users
            # changed (a new principal) starts over on empty storage.
            _logger.warning("The secured broker's users changed: reformatting %s", log_dirs)
            shutil.rmtree(log_dirs, ignore_errors=True)
        argv = super()._prepare()
        os.chmod(self.data_dir / "server.properties", 0o600)
        marker.write_text(fingerprint + "\n")
        return argv

    def __repr__(self) -> str:
        """Shows the endpoint, the pid and the data directory (never a password)."""
        pid = self._shown_pid()
        return f"SecureKafka({self.bootstrap_servers}, pid={pid}, data_dir={self.data_dir})"


def start_secure_kafka(
    port: int | None = None,
    controller_port: int | None = None,
    data_dir: Path | None = None,
    *,
    principals: Sequence[str] = PRINCIPALS,
    mechanism: str = "SCRAM-SHA-512",
    ready_timeout: float = 90.0,
) -> SecureKafka:
    """Starts a secured single-node KRaft broker on 127.0.0.1 and waits until it answers.

    Creates (or reuses) the CA, the broker certificate and the users' passwords in
    ``<cache>/secure``, formats the storage with the users' SCRAM credentials on first use,
    and returns once an authenticated Metadata request as `ADMIN` succeeds. No ACLs exist yet
    apart from the super user: call `SecureKafka.grant` per deployment.

    Args:
        port: The SASL_SSL client port; a free one when None.
        controller_port: The controller port; a free one when None.
        data_dir: The broker's directory; a new temporary one, removed on close, when None.
        principals: The SCRAM users (`ADMIN` is always added).
        mechanism: What `client_env` tells clients to use: "SCRAM-SHA-512" or "SCRAM-SHA-256"
            (both work).
        ready_timeout: Seconds to wait for the broker to answer.

    Returns:
        The running broker; a context manager that stops it.

    Raises:
        PortInUseError: A requested port is taken; nothing was started.
        ToolMissingError: java (or, when fetching, mvn) is missing.
        FetchError: Kafka could not be fetched.
        StartError: The broker exited or did not answer in time; it has been stopped.
    """
    if mechanism not in MECHANISMS:
        raise ValueError(f"SASL mechanism {mechanism!r}: expected one of {MECHANISMS}")
    fetch()  # Before the certificates: a missing JDK should be the first thing reported.
    users = load_users(principals)
    directory = secure_dir()
    ca = ensure_ca(directory)
    server_pem = ensure_server_cert(ca, directory / "broker.pem")
    return launch(
        dict(zip(_PORT_ROLES, (port, controller_port), strict=True)),
        data_dir,
        "saga-kafka-secure-",
        lambda ports, path, owns: SecureKafka(
            port=ports[0],
            controller_port=ports[1],
            data_dir=path,
            owns_data_dir=owns,
            ready_timeout=ready_timeout,
            users=users,
            ca=ca,
            server_pem=server_pem,
            mechanism=mechanism,
        ),
    )


def write_env_files(server: SecureKafka, directory: Path | None = None) -> dict[str, Path]:
    """Writes ``<principal>.env`` (mode 0600) for every user, with `SecureKafka.client_env`.

    Each line is ``NAME=value``, quoted for a POSIX shell, so
    ``set -a; . <file>; set +a`` exports them.

    Args:
        server: The running broker.
        directory: Where to write; ``<cache>/secure`` when None.

    Returns:
        Principal to file.
    """
    target = secure_dir() if directory is None else directory
    written = {}
    for principal in server.users:
        env = server.client_env(principal)
        text = "".join(f"{key}={shlex.quote(value)}\n" for key, value in env.items())
        path = target / f"{principal}.env"
        write_private(path, text.encode())
        written[principal] = path
    return written


# -- command line -------------------------------------------------------------------------------


class _Cli(ServerCli[SecureKafka]):
    # NAME names the daemon's run directory (<cache>/run/kafka_secure) and the module in
    # `--help`, hence the underscore.
    NAME = "kafka_secure"
    EXPECT = "kafka.Kafka"
    DESCRIPTION = "A single-node Kafka on loopback with TLS, SASL/SCRAM and ACLs."
    PREPARE = ("fetch", "download Kafka into the cache (once)")
    UP_OPTIONS = (
        UpOption("--port", 9092, "SASL_SSL client port (default 9092)"),
        UpOption("--controller-port", 9093, "default 9093"),
    )
    DOWN_GRACE = 20.0

    def prepare(self) -> str:
        return f"Kafka {KAFKA_VERSION} jars: {fetch()}"

    def start(self, ports: Sequence[int], run_dir: Path) -> SecureKafka:
        server = start_secure_kafka(ports[0], ports[1], run_dir / "data")
        write_env_files(server)
        return server

    def state(self, server: SecureKafka) -> dict[str, object]:
        return {
            "bootstrap_servers": server.bootstrap_servers,
            "port": server.port,
            "controller_port": server.controller_port,
            "ca_file": str(server.ca_file),
            "mechanism": server.mechanism,
            "env_dir": str(secure_dir()),
        }

    def started(self, server: SecureKafka) -> list[str]:
        env_dir = secure_dir()
        return [
            f"Kafka {KAFKA_VERSION} (SASL_SSL, SCRAM, ACLs) is up (pid {server.pid}) at "
            f"{server.bootstrap_servers}.",
            f"CA: {server.ca_file}",
            f"Users: {', '.join(server.users)}; one env file each in {env_dir}/<principal>.env",
            f"Use one in a shell: set -a; . {env_dir}/client.env; set +a",
            "Grant a deployment's ACLs: python -m deploy.kafka_secure grant --prefix saga "
            "--services a,b",
            f"Log: {server.log_path}",
        ]

    def where(self, state: Mapping[str, object]) -> str:
        return f" at {state.get('bootstrap_servers', '?')}"

    def status(self, state: Mapping[str, object]) -> str:
        bootstrap = state.get("bootstrap_servers")
        ca_file = state.get("ca_file")
        mechanism = state.get("mechanism")
        answers = (
            isinstance(bootstrap, str)
            and isinstance(ca_file, str)
            and isinstance(mechanism, str)
            and _secure_ready(
                bootstrap, Path(ca_file), ADMIN, load_users([])[ADMIN], mechanism, 5.0
            )
        )
        return f"{self.where(state)}, {'answering' if answers else 'NOT answering'}"


def _grant_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.kafka_secure grant",
        description="Create the ACLs of one engine deployment on the secured broker.",
    )
    parser.add_argument("--prefix", required=True, help="the deployment's topic prefix")
    parser.add_argument(
        "--services", required=True, help="comma-separated services, e.g. payment,rider"
    )
    parser.add_argument(
        "--bootstrap", help="the broker (default: the one `up` started, from its state file)"
    )
    args = parser.parse_args(argv)
    services = [s.strip() for s in args.services.split(",") if s.strip()]
    bootstrap = args.bootstrap
    mechanism = "SCRAM-SHA-512"
    ca_file = secure_dir() / "ca.pem"
    try:
        if bootstrap is None:
            found = Daemon(_Cli.NAME.lower(), expect=_Cli.EXPECT).find()
            if found is None:
                raise InfraError(
                    "the secured broker is not running: start it with `make kafka-up SECURE=1`"
                    " or pass --bootstrap"
                )
            bootstrap = str(found[1].get("bootstrap_servers", ""))
            mechanism = str(found[1].get("mechanism", mechanism))
            ca_file = Path(str(found[1].get("ca_file", ca_file)))
        started = time.monotonic()
        bindings = grant_acls(
            bootstrap, ca_file, load_users([])[ADMIN], args.prefix, services, mechanism=mechanism
        )
    except (InfraError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    print(f"Granted {len(bindings)} ACLs for prefix {args.prefix!r} in {elapsed:.2f} s:")
    for binding in bindings:
        print(f"  {binding}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code.

    Args:
        argv: The arguments after the program name; `sys.argv[1:]` when None.
    """
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["grant"]:
        return _grant_main(args[1:])
    return _Cli().main(args)


if __name__ == "__main__":
    sys.exit(main())
