"""What every ``saga`` command shares: the common options, errors, the app loader, the broker
connection and the output (JSON, plain text, or `rich` on a terminal)."""

from __future__ import annotations

import argparse
import getpass
import importlib
import os
import sys
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import orjson

from saga.adapters.kafka_settings import ENV, KafkaSecurity, KafkaSettingsError, Mechanism
from saga.adapters.kafka_settings import SecurityProtocol as _Protocol
from saga.errors import ConfigurationError, SagaTimeout

# What only some commands use is imported where they use it (`rich` and the text views for the
# output, the core's models for an app): `saga coordinator` starts without them.
if TYPE_CHECKING:
    from rich.console import RenderableType

    from saga.adapters.kafka import KafkaTransport
    from saga.adapters.rdkafka import RdKafkaTransport
    from saga.core.definition import SagaDefinition
    from saga.core.state import SagaState, SagaStatus
    from saga.runtime.client import SagaClient
    from saga.runtime.ports import Transport
    from saga.runtime.trust import Role, Trust

__all__ = [
    "DEFAULT_BOOTSTRAP",
    "PAYLOAD_KEYS_VAR",
    "CliError",
    "Handler",
    "client",
    "common_options",
    "definitions",
    "kafka_security",
    "kafka_transport",
    "load_app",
    "out",
    "sealed",
    "show_final",
    "transport",
    "trust",
    "wait_final",
]

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
"""Where ``make kafka-up`` serves Kafka; ``--bootstrap-servers`` when it is not given."""

PAYLOAD_KEYS_VAR = "SAGA_PAYLOAD_KEYS"
"""`saga.adapters.sealing.ENV_VAR`, named here so that a process without payload keys need not
import the sealing adapter (and `cryptography`) to learn that it has none."""

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]
"""A command: runs with the parsed arguments and returns the exit status."""


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def common_options() -> argparse.ArgumentParser:
    """The options every command takes (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--bootstrap-servers",
        default=(
            os.environ.get("SAGA_KAFKA_BOOTSTRAP")
            or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
            or DEFAULT_BOOTSTRAP
        ),
        help="Kafka address (default: $SAGA_KAFKA_BOOTSTRAP, else $KAFKA_BOOTSTRAP_SERVERS, "
        "else %(default)s)",
    )
    _security_options(common)
    _trust_options(common)
    common.add_argument(
        "--prefix",
        default=os.environ.get("SAGA_PREFIX", "saga"),
        help="topic name prefix (default: $SAGA_PREFIX or %(default)s)",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    common.add_argument("--log-level", default=os.environ.get("SAGA_LOG_LEVEL", "warning"))
    common.add_argument(
        "--log-format",
        choices=["json", "text"],
        default=os.environ.get("SAGA_LOG_FORMAT", "json"),
        help="log lines on stderr (default: $SAGA_LOG_FORMAT or %(default)s)",
    )
    return common


def _security_options(common: argparse.ArgumentParser) -> None:
    # The defaults stay None: `kafka_security` lays the flags given over the environment.
    # There is no --sasl-password: a password on the command line is visible in `ps`.
    group = common.add_argument_group(
        "Kafka security",
        "TLS and SASL; each flag overrides its environment variable. The password comes from "
        f"--sasl-password-file, ${ENV['sasl_password_file']} or ${ENV['sasl_password']}.",
    )
    group.add_argument(
        "--security-protocol",
        choices=get_args(_Protocol),
        help=f"default: ${ENV['security_protocol']} or PLAINTEXT",
    )
    group.add_argument(
        "--sasl-mechanism", choices=get_args(Mechanism), help=f"default: ${ENV['sasl_mechanism']}"
    )
    group.add_argument("--sasl-username", help=f"default: ${ENV['sasl_username']}")
    group.add_argument(
        "--sasl-password-file",
        type=Path,
        metavar="PATH",
        help=f"a file holding the SASL password (default: ${ENV['sasl_password_file']})",
    )
    # Declared only to refuse it: else argparse would take it for --sasl-password-file
    # abbreviated, and a password for a path (which an error message would then show).
    group.add_argument("--sasl-password", nargs="?", action=_NoPassword, help=argparse.SUPPRESS)
    group.add_argument(
        "--ssl-ca-location",
        type=Path,
        metavar="PATH",
        help=f"PEM file of the brokers' CA (default: ${ENV['ssl_ca_location']})",
    )
    group.add_argument(
        "--ssl-certificate-location",
        type=Path,
        metavar="PATH",
        help=f"PEM client certificate (default: ${ENV['ssl_certificate_location']})",
    )
    group.add_argument(
        "--ssl-key-location",
        type=Path,
        metavar="PATH",
        help=f"PEM key of the client certificate (default: ${ENV['ssl_key_location']})",
    )
    group.add_argument(
        "--no-ssl-hostname-check",
        action="store_true",
        help="do not check that the broker's certificate names its host (tests only; default: "
        f"${ENV['ssl_check_hostname']}=https, checked)",
    )


_TRUST_FLAGS = {
    "signing_key": "--signing-key",
    "keyring": "--keyring",
    "policy": "--policy",
    "unsigned": "--unsigned",
    "max_request_age": "--max-request-age",
}


def _trust_options(common: argparse.ArgumentParser) -> None:
    from saga.runtime.trust import ENV_SETTINGS as env

    group = common.add_argument_group(
        "message signing",
        "who signs what this process sends, whom it trusts, what the policy allows "
        "(see `saga keys new` and `saga policy check`); each flag overrides its variable",
    )
    group.add_argument(
        "--signing-key",
        metavar="FILE",
        help=f"this process's private key (default: ${env['signing_key']})",
    )
    group.add_argument(
        "--keyring", metavar="FILE", help=f"the trusted public keys (default: ${env['keyring']})"
    )
    group.add_argument(
        "--policy", metavar="FILE", help=f"the authorization policy (default: ${env['policy']})"
    )
    group.add_argument(
        "--payload-keys",
        metavar="FILE",
        help="AES-GCM keys that seal step inputs and outputs on the topics (default: "
        "$SAGA_PAYLOAD_KEYS; see `saga keys data-key`)",
    )
    group.add_argument(
        "--max-request-age",
        type=float,
        metavar="SECONDS",
        help=f"how long a signed request is honoured (default: ${env['max_request_age']} or 86400)",
    )
    group.add_argument(
        "--unsigned",
        action="store_true",
        help=f"run without signing or checking anything: local development only "
        f"(default: ${env['unsigned']}=1)",
    )


def trust(args: argparse.Namespace, role: Role) -> Trust:
    """The message-signing settings of the options and environment, checked for ``role``.

    A coordinator or participant must be given keys, or be told ``--unsigned`` (or
    ``SAGA_UNSIGNED=1``) explicitly; a client with nothing configured sends unsigned requests
    (whether they are accepted is the coordinators' setting).

    Raises:
        CliError: A setting is missing, invalid, or names a file that cannot be used; the
            message names the setting (flag and variable) and what to do.
    """
    from saga.core.policy import PolicyError
    from saga.runtime.trust import ENV_SETTINGS as env
    from saga.runtime.trust import Trust, TrustError

    given = {
        name: getattr(args, name, None) or os.environ.get(env[name]) or None
        for name in ("signing_key", "keyring", "policy")
    }
    unsigned_flag = getattr(args, "unsigned", False)
    if role == "client" and not unsigned_flag and not any(given.values()):
        return Trust.unsigned()
    settings = {n: f"{flag} / ${env[n]}" for n, flag in _TRUST_FLAGS.items()}
    try:
        loaded = Trust.from_env(
            {
                **os.environ,
                **{env[n]: str(v) for n, v in given.items() if v},
                **({env["unsigned"]: "1"} if unsigned_flag else {}),
                **(
                    {env["max_request_age"]: str(args.max_request_age)}
                    if getattr(args, "max_request_age", None) is not None
                    else {}
                ),
            },
            settings=settings,
        )
        loaded.check_role(role)
    except (TrustError, PolicyError) as exc:
        raise CliError(str(exc)) from None
    return loaded


class _NoPassword(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.error(  # without the value: it is a password
            "there is no --sasl-password (a password on the command line is visible in `ps`): "
            f"use --sasl-password-file, ${ENV['sasl_password_file']} or ${ENV['sasl_password']}"
        )


def kafka_security(args: argparse.Namespace) -> KafkaSecurity:
    """The TLS and SASL settings: the ``KAFKA_*`` environment variables, with the flags given
    laid over them (a ``--sasl-password-file`` also replaces ``$KAFKA_SASL_PASSWORD``).

    Raises:
        CliError: The settings are invalid; the message names the setting and what to do.
    """
    try:
        values = KafkaSecurity.env_values(os.environ)
        for field in (
            "security_protocol",
            "sasl_mechanism",
            "sasl_username",
            "sasl_password_file",
            "ssl_ca_location",
            "ssl_certificate_location",
            "ssl_key_location",
        ):
            given = getattr(args, field, None)
            if given is not None:
                values[field] = given
        if getattr(args, "sasl_password_file", None) is not None:
            values.pop("sasl_password", None)
        if getattr(args, "no_ssl_hostname_check", False):
            values["ssl_check_hostname"] = False
        return KafkaSecurity(**values)
    except KafkaSettingsError as exc:
        raise CliError(f"Kafka settings: {exc}") from None


def load_app(spec: str) -> Any:
    """Imports ``MODULE:ATTR`` and returns the attribute (called first if it is a factory).

    Raises:
        CliError: ``spec`` is malformed, or names no importable attribute.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(f"--app {spec!r}: expected MODULE:ATTR, for example services.app:sagas")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"--app {spec!r}: cannot import {module_name!r}: {exc}") from None
    try:
        value = getattr(module, attr)
    except AttributeError:
        raise CliError(f"--app {spec!r}: module {module_name!r} has no {attr!r}") from None
    if callable(value) and not isinstance(value, type) and not hasattr(value, "handler"):
        value = value()
    return value


def definitions(spec: str) -> list[SagaDefinition]:
    """The saga definitions ``--app`` names: one, or a list of them.

    Raises:
        CliError: It names something else.
    """
    from saga.core.definition import SagaDefinition

    value = load_app(spec)
    if isinstance(value, SagaDefinition):
        return [value]
    if isinstance(value, Iterable):
        found = list(value)
        if found and all(isinstance(d, SagaDefinition) for d in found):
            return found
    raise CliError(f"--app {spec!r}: expected a SagaDefinition or a list of them")


def kafka_transport(args: argparse.Namespace) -> KafkaTransport | RdKafkaTransport:
    """The Kafka transport the options point at, secured as `kafka_security` says, on the
    client ``$SAGA_KAFKA_CLIENT`` names (`saga.adapters.clients`: aiokafka by default).

    Raises:
        CliError: The security settings are invalid, or name files that cannot be used, or
            the client is unknown or not installed.
    """
    from saga.adapters.clients import kafka_transport as transport_of

    security = kafka_security(args)
    try:
        return transport_of(
            args.bootstrap_servers,
            security=security,
            instance_id=getattr(args, "instance_id", None),
        )
    except (KafkaSettingsError, ConfigurationError) as exc:
        raise CliError(f"Kafka settings: {exc}") from None


def sealed(args: argparse.Namespace, inner: Transport) -> Transport:
    """``inner``, sealing and opening step inputs and outputs with the payload keys of
    ``--payload-keys`` (or ``$SAGA_PAYLOAD_KEYS``) when there are any.

    Raises:
        CliError: The key file cannot be used (missing, readable by others, malformed).
    """
    path = getattr(args, "payload_keys", None)
    if not path and not os.environ.get(PAYLOAD_KEYS_VAR, "").strip():
        return inner  # as `codec_from_env` finds, without loading `cryptography` to find it
    from saga.adapters.sealing import KeyFileError, SealedTransport, codec_from_env, load_data_keys

    try:
        codec = load_data_keys(path) if path else codec_from_env()
    except KeyFileError as exc:
        raise CliError(f"--payload-keys / $SAGA_PAYLOAD_KEYS: {exc}") from None
    return inner if codec is None else SealedTransport(inner, codec)


def transport(args: argparse.Namespace) -> Transport:
    """The transport the options point at: Kafka, secured as `kafka_security` says, and
    sealing payloads when payload keys are given (`sealed`)."""
    return sealed(args, kafka_transport(args))


def client(args: argparse.Namespace) -> SagaClient:
    """A client of the engine under the options' broker and prefix, signing its requests
    with ``--signing-key`` when one is given (else the user's login name is recorded as who
    asks, unverified)."""
    from saga.runtime.client import SagaClient

    signer = trust(args, "client").signer
    actor = None if signer is not None else _login()
    return SagaClient(transport(args), prefix=args.prefix, signer=signer, actor=actor)


def _login() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in the environment nor the password database
        return None


async def wait_final(c: SagaClient, saga_id: str, seconds: float, *, after: int = 0) -> SagaState:
    """`SagaClient.wait`, its timeout made a user-facing error.

    Raises:
        CliError: The saga did not end (past ``after``) within ``seconds``.
    """
    try:
        return await c.wait(saga_id, seconds, after=after)
    except SagaTimeout as exc:
        raise CliError(str(exc)) from None


def show_final(args: argparse.Namespace, state: SagaState, ends_well: frozenset[SagaStatus]) -> int:
    """Prints a saga's final state and returns the exit status: 0 if it is one of
    ``ends_well``, else 3 (the command worked, but the saga did not end as it asked for)."""
    from saga.cli import render

    out(args, state.model_dump(mode="json"), render.status(state), render.status_view(state))
    return 0 if state.status in ends_well else 3


def out(args: argparse.Namespace, data: Any, text: str, view: RenderableType | None = None) -> None:
    """Prints a command's result: ``data`` as JSON with ``--json``; else ``view`` drawn by
    `rich` when standard output is a terminal; else ``text``, which scripts may parse."""
    if args.json:
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif view is not None and _isatty():
        from rich.console import Console

        Console(highlight=False).print(view)
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def _isatty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False
