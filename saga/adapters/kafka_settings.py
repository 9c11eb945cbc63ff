"""How the Kafka adapter connects: TLS and SASL settings, from Python, flags or the environment.

`KafkaSecurity` is the one settings model; `KafkaSecurity.from_env` reads it from environment
variables named as Kafka's clients name the settings (``KAFKA_SECURITY_PROTOCOL``,
``KAFKA_SASL_MECHANISM``, ...), and the ``saga`` command's flags override those. A model that
is built is valid: every rule it breaks is one `KafkaSettingsError` that names the setting (its
field and its environment variable) and what to do, raised before any connection is tried.

Secrets (``sasl_password``, ``ssl_key_password``) are `pydantic.SecretStr`: they never appear
in ``repr``, ``str``, ``model_dump(mode="json")``, `KafkaSecurity.describe` or an error message.

The errors the adapter raises for connections and rights live here, not in `saga.adapters.kafka`,
so that the CLI can name them without importing aiokafka. This module does not import aiokafka
either (only the adapter module does): the TLS context is built with `ssl` exactly as
``aiokafka.helpers.create_ssl_context`` builds it, and the token provider's type is checked by
the adapter.
"""

from __future__ import annotations

import importlib
import os
import ssl
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    model_validator,
)

from saga.errors import ConfigurationError, ConnectionFailed, Unauthorized

__all__ = [
    "ENV",
    "ConnectionFailed",
    "KafkaSecurity",
    "KafkaSettingsError",
    "Mechanism",
    "SecurityProtocol",
    "Unauthorized",
]

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
"""Kafka's ``security.protocol`` values."""

Mechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]
"""The SASL mechanisms the adapter supports (``sasl.mechanism``)."""

ENV: Mapping[str, str] = {
    "security_protocol": "KAFKA_SECURITY_PROTOCOL",
    "ssl_ca_location": "KAFKA_SSL_CA_LOCATION",
    "ssl_certificate_location": "KAFKA_SSL_CERTIFICATE_LOCATION",
    "ssl_key_location": "KAFKA_SSL_KEY_LOCATION",
    "ssl_key_password": "KAFKA_SSL_KEY_PASSWORD",
    "ssl_check_hostname": "KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM",
    "sasl_mechanism": "KAFKA_SASL_MECHANISM",
    "sasl_username": "KAFKA_SASL_USERNAME",
    "sasl_password": "KAFKA_SASL_PASSWORD",
    "sasl_password_file": "KAFKA_SASL_PASSWORD_FILE",
    "sasl_oauthbearer_token_provider": "KAFKA_SASL_OAUTHBEARER_TOKEN_PROVIDER",
}
"""The environment variable of each `KafkaSecurity` field."""

_TLS: frozenset[str] = frozenset({"SSL", "SASL_SSL"})
_SASL: frozenset[str] = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})


class KafkaSettingsError(ConfigurationError):
    """The Kafka connection settings are invalid; the message names the setting (field and
    environment variable) and what to do, and never contains a secret."""


def _name(field: str) -> str:
    return f"{field} ({ENV[field]})"


class KafkaSecurity(BaseModel):
    """How to connect to Kafka: the security protocol, TLS files and SASL credentials.

    Example::

        security = KafkaSecurity(
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="payment",
            sasl_password_file=Path("/run/secrets/kafka"),
            ssl_ca_location=Path("/etc/kafka/ca.pem"),
        )
        transport = KafkaTransport("kafka:9093", security=security)

    Raises:
        KafkaSettingsError: A rule is broken (at construction).
    """

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        arbitrary_types_allowed=True,
        hide_input_in_errors=True,  # an input may be a password
    )

    security_protocol: SecurityProtocol = "PLAINTEXT"
    """``security.protocol``: TLS with ``SSL`` and ``SASL_SSL``, SASL with the ``SASL_*``."""
    ssl_ca_location: Path | None = None
    """PEM file of the CAs that sign the brokers' certificates (else the system's CAs)."""
    ssl_certificate_location: Path | None = None
    """PEM file of the client certificate, for brokers that authenticate clients by TLS."""
    ssl_key_location: Path | None = None
    """PEM file of the client certificate's private key (with ``ssl_certificate_location``)."""
    ssl_key_password: SecretStr | None = None
    """Password of an encrypted ``ssl_key_location``."""
    ssl_check_hostname: bool = True
    """Whether the broker's certificate must name the host connected to (Kafka's
    ``ssl.endpoint.identification.algorithm=https``, the default)."""
    sasl_mechanism: Mechanism | None = None
    """``sasl.mechanism``; required with the ``SASL_*`` protocols, refused with the others."""
    sasl_username: str | None = None
    """The SASL user (the principal is ``User:<name>``); PLAIN and SCRAM."""
    sasl_password: SecretStr | None = None
    """The SASL user's password; or give ``sasl_password_file``, not both."""
    sasl_password_file: Path | None = None
    """A file holding the password (a trailing newline is stripped), read at each start."""
    sasl_oauthbearer_token_provider: Any = Field(default=None)
    """OAUTHBEARER: ``MODULE:ATTR`` naming an aiokafka ``AbstractTokenProvider`` subclass,
    instance or factory, or (from Python) the provider object itself."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            # Pydantic's own text would be several lines per error and name only the field.
            raise KafkaSettingsError(_explain(exc)) from None

    @field_serializer("ssl_key_password", "sasl_password")
    def _hide(self, value: SecretStr | None) -> str | None:
        return None if value is None else "**********"

    @field_serializer("sasl_oauthbearer_token_provider")
    def _provider_name(self, value: Any) -> str | None:
        if value is None or isinstance(value, str):
            return value
        kind = value if isinstance(value, type) else type(value)
        return f"{kind.__module__}:{kind.__qualname__}"

    @model_validator(mode="after")
    def _check(self) -> KafkaSecurity:
        problem = _problem(self)
        if problem is not None:
            raise ValueError(problem)
        return self

    # -- reading -----------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KafkaSecurity:
        """The settings the ``KAFKA_*`` environment variables give (see `ENV`); unset and
        empty variables keep the defaults.

        ``KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM`` is ``https`` (check the hostname, the
        default) or empty or ``none`` (do not), as Kafka's Java clients take it.

        Args:
            environ: Where to read (default: the process's environment).

        Raises:
            KafkaSettingsError: A variable has an invalid value, or the settings break a rule.
        """
        return cls(**cls.env_values(os.environ if environ is None else environ))

    @staticmethod
    def env_values(environ: Mapping[str, str]) -> dict[str, Any]:
        """The fields the ``KAFKA_*`` variables of ``environ`` set, as `from_env` reads them
        (for callers that override some, as the CLI's flags do).

        Raises:
            KafkaSettingsError: ``KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM`` is not
                ``https``, ``none`` or empty.
        """
        values: dict[str, Any] = {}
        for field, var in ENV.items():
            raw = environ.get(var)
            if raw is None:
                continue
            if field == "ssl_check_hostname":
                algorithm = raw.strip().lower()
                if algorithm not in ("https", "", "none"):
                    raise KafkaSettingsError(
                        f"{var}={raw!r} is not an endpoint identification algorithm: use "
                        "'https' to check the broker's hostname (the default), or '' or 'none' "
                        "not to"
                    )
                values[field] = algorithm == "https"
            elif raw.strip():
                values[field] = raw if field.endswith("password") else raw.strip()
        return values

    def password(self) -> SecretStr | None:
        """The SASL password: ``sasl_password``, or the content of ``sasl_password_file`` read
        now (its trailing newline stripped).

        Raises:
            KafkaSettingsError: The file cannot be read.
        """
        if self.sasl_password_file is None:
            return self.sasl_password
        return SecretStr(_read_secret(self.sasl_password_file, "sasl_password_file"))

    @property
    def principal(self) -> str:
        """Who the broker will take this client for, in words for error messages."""
        if self.security_protocol in _SASL:
            if self.sasl_mechanism == "OAUTHBEARER":
                return "the OAUTHBEARER token's subject"
            return f"User:{self.sasl_username}"
        if self.ssl_certificate_location is not None:
            return f"the subject of the certificate {self.ssl_certificate_location}"
        return "User:ANONYMOUS"

    def describe(self) -> str:
        """A one-line summary without secrets, for logs: for example
        ``SASL_SSL, SCRAM-SHA-512 as payment, CA /etc/kafka/ca.pem``."""
        parts: list[str] = [self.security_protocol]
        if self.security_protocol in _SASL:
            if self.sasl_mechanism == "OAUTHBEARER":
                parts.append(
                    f"OAUTHBEARER with {self._provider_name(self.sasl_oauthbearer_token_provider)}"
                )
            else:
                parts.append(f"{self.sasl_mechanism} as {self.sasl_username}")
        if self.security_protocol in _TLS:
            parts.append(f"CA {self.ssl_ca_location or 'of the system'}")
            if self.ssl_certificate_location is not None:
                parts.append(f"client certificate {self.ssl_certificate_location}")
            if not self.ssl_check_hostname:
                parts.append("no hostname check")
        return ", ".join(parts)

    # -- for the adapter ---------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of the ``SSL`` and ``SASL_SSL`` protocols (else ``None``): what
        ``aiokafka.helpers.create_ssl_context`` builds, with the hostname check as set.

        Raises:
            KafkaSettingsError: A file is not what its setting says it is (a key that does not
                match the certificate, a wrong key password, ...).
        """
        if self.security_protocol not in _TLS:
            return None
        try:
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH,
                cafile=None if self.ssl_ca_location is None else str(self.ssl_ca_location),
            )
        except ssl.SSLError as exc:
            raise KafkaSettingsError(
                f"{_name('ssl_ca_location')}: {self.ssl_ca_location} holds no usable CA "
                f"certificate ({exc.reason or exc}): give the PEM file of the CA that signed the "
                "brokers' certificates"
            ) from None
        context.check_hostname = self.ssl_check_hostname
        if self.ssl_certificate_location is not None:
            key_password = self.ssl_key_password
            try:
                context.load_cert_chain(
                    str(self.ssl_certificate_location),
                    None if self.ssl_key_location is None else str(self.ssl_key_location),
                    # A callable, so that OpenSSL never prompts on the terminal for one.
                    lambda: "" if key_password is None else key_password.get_secret_value(),
                )
            except ssl.SSLError as exc:
                raise KafkaSettingsError(
                    f"{_name('ssl_certificate_location')} and {_name('ssl_key_location')}: "
                    f"cannot load the client certificate {self.ssl_certificate_location} with "
                    f"the key {self.ssl_key_location} ({exc.reason or 'invalid'}): check that "
                    "the key belongs to the certificate, and set "
                    f"{_name('ssl_key_password')} if the key is encrypted"
                ) from None
        return context

    def aiokafka_options(self) -> dict[str, Any]:
        """The keyword arguments every aiokafka client takes for these settings:
        ``security_protocol``, ``ssl_context``, ``sasl_mechanism`` and the SASL credentials
        (``sasl_plain_username`` and ``sasl_plain_password``, or
        ``sasl_oauth_token_provider``). The password file is read now.

        Raises:
            KafkaSettingsError: A file cannot be used (see `ssl_context`, `password` and
                `token_provider`).
        """
        options: dict[str, Any] = {"security_protocol": self.security_protocol}
        context = self.ssl_context()
        if context is not None:
            options["ssl_context"] = context
        if self.sasl_mechanism is not None:
            options["sasl_mechanism"] = self.sasl_mechanism
            if self.sasl_mechanism == "OAUTHBEARER":
                options["sasl_oauth_token_provider"] = self.token_provider()
            else:
                password = self.password()
                options["sasl_plain_username"] = self.sasl_username
                options["sasl_plain_password"] = (
                    None if password is None else password.get_secret_value()
                )
        return options

    def token_provider(self) -> Any:
        """The OAUTHBEARER token provider: ``sasl_oauthbearer_token_provider`` resolved (a
        ``MODULE:ATTR`` imported; a class instantiated; a factory called), or ``None``.

        Raises:
            KafkaSettingsError: It names nothing importable, or its factory failed.
        """
        value = self.sasl_oauthbearer_token_provider
        if value is None:
            return None
        setting = _name("sasl_oauthbearer_token_provider")
        if isinstance(value, str):
            module_name, _, attr = value.partition(":")
            if not module_name or not attr:
                raise KafkaSettingsError(
                    f"{setting}={value!r}: expected MODULE:ATTR, for example myapp.auth:Tokens"
                )
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())  # as ``--app`` finds the user's modules
            try:
                value = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as exc:
                raise KafkaSettingsError(f"{setting}={value!r}: cannot import it: {exc}") from None
        if callable(value) and not hasattr(value, "token"):
            value = value()  # a factory
        elif isinstance(value, type):
            value = value()
        if not callable(getattr(value, "token", None)):
            raise KafkaSettingsError(
                f"{setting}: {value!r} is not a token provider: give an aiokafka "
                "AbstractTokenProvider (an object with an async token() method)"
            )
        return value


def _problem(s: KafkaSecurity) -> str | None:
    """The first rule ``s`` breaks, in words that name the setting and what to do."""
    protocol = f"{_name('security_protocol')} is {s.security_protocol}"
    if s.security_protocol in _SASL:
        if s.sasl_mechanism is None:
            return (
                f"{protocol}, which needs a SASL mechanism: set {_name('sasl_mechanism')} to "
                "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER"
            )
    elif s.sasl_mechanism is not None:
        return (
            f"{_name('sasl_mechanism')} is {s.sasl_mechanism}, but {protocol}, which does not "
            f"use SASL: set {ENV['security_protocol']} to SASL_SSL (or SASL_PLAINTEXT), or unset "
            "the mechanism"
        )
    if s.sasl_password is not None and s.sasl_password_file is not None:
        return (
            f"both {_name('sasl_password')} and {_name('sasl_password_file')} are set: give "
            "the password one way only"
        )
    if s.sasl_mechanism == "OAUTHBEARER":
        if s.sasl_oauthbearer_token_provider is None:
            return (
                "SASL mechanism OAUTHBEARER needs a token provider: set "
                f"{_name('sasl_oauthbearer_token_provider')} to MODULE:ATTR naming an aiokafka "
                "AbstractTokenProvider"
            )
    elif s.sasl_mechanism is not None:
        if not s.sasl_username:
            return f"SASL mechanism {s.sasl_mechanism} needs a user: set {_name('sasl_username')}"
        if s.sasl_password is None and s.sasl_password_file is None:
            return (
                f"SASL mechanism {s.sasl_mechanism} needs the password of user "
                f"{s.sasl_username!r}: set {_name('sasl_password')} or "
                f"{_name('sasl_password_file')}"
            )
    tls_files = ("ssl_ca_location", "ssl_certificate_location", "ssl_key_location")
    if s.security_protocol not in _TLS:
        given = [f for f in tls_files if getattr(s, f) is not None]
        if given:
            return (
                f"{_name(given[0])} is set, but {protocol}, which does not use TLS: set "
                f"{ENV['security_protocol']} to SSL or SASL_SSL, or unset it"
            )
    if s.ssl_certificate_location is not None and s.ssl_key_location is None:
        return (
            f"{_name('ssl_certificate_location')} is set without its private key: set "
            f"{_name('ssl_key_location')}"
        )
    if s.ssl_key_location is not None and s.ssl_certificate_location is None:
        return (
            f"{_name('ssl_key_location')} is set without its certificate: set "
            f"{_name('ssl_certificate_location')}"
        )
    pem = {
        "ssl_ca_location": (b"-----BEGIN CERTIFICATE-----", "the PEM file of the CA certificate"),
        "ssl_certificate_location": (b"-----BEGIN CERTIFICATE-----", "a PEM certificate"),
        "ssl_key_location": (b"PRIVATE KEY-----", "a PEM private key"),
    }
    for field, (marker, what) in pem.items():
        path: Path | None = getattr(s, field)
        if path is None:
            continue
        try:
            content = path.read_bytes()
        except OSError as exc:
            return f"{_name(field)}: cannot read {path} ({exc.strerror}): {_fix_file(path)}"
        if marker not in content:
            return (
                f"{_name(field)}: {path} is not {what} (no {marker.decode()!r} line): convert "
                "it to PEM (for a DER file: openssl x509 -inform der -in FILE -out FILE.pem)"
            )
    if s.sasl_password_file is not None:
        try:
            _read_secret(s.sasl_password_file, "sasl_password_file")
        except KafkaSettingsError as exc:
            return str(exc)
    return None


def _read_secret(path: Path, field: str) -> str:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not text"
        raise KafkaSettingsError(
            f"{_name(field)}: cannot read {path} ({reason}): {_fix_file(path)}"
        ) from None
    secret = text.rstrip("\r\n")
    if not secret:
        raise KafkaSettingsError(f"{_name(field)}: {path} is empty: write the password in it")
    return secret


def _fix_file(path: Path) -> str:
    if not path.exists():
        return "the file does not exist; check the path"
    return "check the file's permissions for the user running this process"


def _explain(exc: ValidationError) -> str:
    """One line per error of ``exc``: a rule's own message, or the field, its environment
    variable and what pydantic expected (never the input, which may be a secret)."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        if error["type"] == "value_error" and not error["loc"]:
            lines.append(str(error["ctx"]["error"]))
            continue
        field = str(error["loc"][0]) if error["loc"] else ""
        where = _name(field) if field in ENV else f"unknown setting {field!r}"
        lines.append(f"{where}: {error['msg']}")
    return "; ".join(lines)
