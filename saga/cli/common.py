"""What every ``saga`` command shares: the common options, errors, the app loader, the broker
connection and the output (JSON, plain text, or `rich` on a terminal)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

import orjson
from rich.console import Console, RenderableType

from saga.cli import render
from saga.core.definition import SagaDefinition
from saga.core.state import SagaState, SagaStatus
from saga.errors import SagaTimeout

if TYPE_CHECKING:
    from saga.runtime.client import SagaClient
    from saga.runtime.ports import Transport

__all__ = [
    "DEFAULT_BOOTSTRAP",
    "CliError",
    "Handler",
    "client",
    "common_options",
    "definitions",
    "load_app",
    "out",
    "show_final",
    "transport",
    "wait_final",
]

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
"""Where ``make kafka-up`` serves Kafka; ``--bootstrap-servers`` when it is not given."""

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]
"""A command: runs with the parsed arguments and returns the exit status."""


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def common_options() -> argparse.ArgumentParser:
    """The options every command takes (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("SAGA_KAFKA_BOOTSTRAP", DEFAULT_BOOTSTRAP),
        help="Kafka address (default: $SAGA_KAFKA_BOOTSTRAP or %(default)s)",
    )
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
    value = load_app(spec)
    if isinstance(value, SagaDefinition):
        return [value]
    if isinstance(value, Iterable):
        found = list(value)
        if found and all(isinstance(d, SagaDefinition) for d in found):
            return found
    raise CliError(f"--app {spec!r}: expected a SagaDefinition or a list of them")


def transport(args: argparse.Namespace) -> Transport:
    """The Kafka transport the options point at."""
    from saga.adapters.kafka import KafkaTransport

    return KafkaTransport(args.bootstrap_servers)


def client(args: argparse.Namespace) -> SagaClient:
    """A client of the engine under the options' broker and prefix."""
    from saga.runtime.client import SagaClient

    return SagaClient(transport(args), prefix=args.prefix)


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
    out(args, state.model_dump(mode="json"), render.status(state), render.status_view(state))
    return 0 if state.status in ends_well else 3


def out(args: argparse.Namespace, data: Any, text: str, view: RenderableType | None = None) -> None:
    """Prints a command's result: ``data`` as JSON with ``--json``; else ``view`` drawn by
    `rich` when standard output is a terminal; else ``text``, which scripts may parse."""
    if args.json:
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif view is not None and _isatty():
        Console(highlight=False).print(view)
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def _isatty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False
