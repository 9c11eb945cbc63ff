"""The ``saga`` command: run coordinators and participants, start and inspect sagas.

Every command takes ``--bootstrap-servers`` (or ``SAGA_KAFKA_BOOTSTRAP``) and ``--prefix`` (or
``SAGA_PREFIX``); the inspecting ones take ``--json`` for scripts. Errors are one line that
says what to do, with exit status 1 (2 for a usage error).

The commands live by family: `saga.cli.serve` (coordinator, participant), `saga.cli.sagas`
(start, status, list), `saga.cli.operate` (cancel, retry, resolve), `saga.cli.inspect`
(replay, watch, timeline, rebuild, graph, trace), `saga.cli.keys` (keys, policy),
`saga.cli.deploy` (deploy, definitions, verify), `saga.cli.index` (index rebuild, status,
serve), `saga.cli.contract` (contract), `saga.cli.server` (serve: the HTTP API and the
console); `saga.cli.common` holds what they share.
Each adds its subcommands with a ``handler``; this module parses and dispatches.

A command imports only its own family (`FAMILIES`), and each family imports what its handlers
need when they run, so that ``saga coordinator`` starts without the console's, the contract's or
the index's libraries: a coordinator restarted after a crash is back the sooner.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping, Sequence

import anyio

from saga.cli.common import CliError, Handler, common_options, load_app
from saga.errors import (
    ConfigurationError,
    ConnectionFailed,
    DefinitionError,
    SagaExists,
    TopologyChanged,
    TransportError,
    Unauthorized,
    UnknownSaga,
)

__all__ = ["FAMILIES", "build_parser", "load_app", "main"]

FAMILIES: Mapping[str, tuple[str, ...]] = {
    "saga.cli.serve": ("coordinator", "participant"),
    "saga.cli.sagas": ("start", "status", "list"),
    "saga.cli.index": ("index",),
    "saga.cli.operate": ("cancel", "retry", "resolve", "signal", "approve", "reject"),
    "saga.cli.inspect": ("replay", "rebuild", "timeline", "watch", "trace", "graph"),
    "saga.cli.keys": ("keys", "policy"),
    "saga.cli.deploy": ("deploy", "definitions", "verify"),
    "saga.cli.contract": ("contract",),
    "saga.cli.server": ("serve",),
}
"""The modules of the commands, in the order ``saga --help`` lists them, with the commands each
adds (tests/views/test_startup_imports.py checks that they add exactly these)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``saga`` console script.

    Args:
        argv: The arguments after ``saga`` (default: the process's).

    Returns:
        The exit status.
    """
    args = build_parser(sys.argv[1:] if argv is None else argv).parse_args(argv)
    from saga.runtime.logs import configure_logging

    configure_logging(args.log_level, args.log_format)
    try:
        return int(anyio.run(_dispatch, args) or 0)
    except CliError as exc:
        print(f"saga: {exc}", file=sys.stderr)
        return 1
    except DefinitionError as exc:
        print(f"saga: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``saga`` parser, for the arguments ``argv``: with only the family of the command
    they name (the only modules of the commands a run imports), else with every family
    (``saga --help``, a mistyped command)."""
    first = argv[0] if argv else None
    wanted = [m for m, commands in FAMILIES.items() if first in commands] or list(FAMILIES)
    common = common_options()
    top = argparse.ArgumentParser(prog="saga", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in wanted:
        importlib.import_module(module).add_commands(sub, common)
    return top


async def _dispatch(args: argparse.Namespace) -> int:
    handler: Handler = args.handler
    try:
        return await handler(args)
    except (TimeoutError, OSError) as exc:
        raise CliError(
            f"cannot reach Kafka at {args.bootstrap_servers} ({exc.__class__.__name__}): start "
            "it with `make kafka-up`, or pass --bootstrap-servers / set SAGA_KAFKA_BOOTSTRAP"
        ) from None
    except (UnknownSaga, TopologyChanged, SagaExists) as exc:
        raise CliError(str(exc)) from None
    except ConfigurationError as exc:
        raise CliError(str(exc)) from None
    except (Unauthorized, ConnectionFailed) as exc:
        # Their messages name the cause and the setting; the hint below (topics, prefix) is
        # about another problem.
        where = (
            "" if args.bootstrap_servers in str(exc) else f" (Kafka at {args.bootstrap_servers})"
        )
        raise CliError(f"{exc}{where}") from None
    except TransportError as exc:
        raise CliError(
            f"{exc} (Kafka at {args.bootstrap_servers}, prefix {args.prefix!r}): check that a "
            "coordinator has created the topics and that --prefix matches"
        ) from None
