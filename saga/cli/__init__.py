"""The ``saga`` command: run coordinators and participants, start and inspect sagas.

Every command takes ``--bootstrap-servers`` (or ``SAGA_KAFKA_BOOTSTRAP``) and ``--prefix`` (or
``SAGA_PREFIX``); the inspecting ones take ``--json`` for scripts. Errors are one line that
says what to do, with exit status 1 (2 for a usage error).

The commands live by family: `saga.cli.serve` (coordinator, participant), `saga.cli.sagas`
(start, status, list), `saga.cli.operate` (cancel, retry, resolve), `saga.cli.inspect`
(replay, watch, timeline, rebuild, graph, trace), `saga.cli.keys` (keys, policy),
`saga.cli.deploy` (deploy, definitions, verify), `saga.cli.index` (index rebuild, status,
serve), `saga.cli.contract` (contract); `saga.cli.common` holds what they share.
Each adds its subcommands with a ``handler``; this module parses and dispatches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import anyio

from saga.cli import contract, deploy, index, inspect, keys, operate, sagas, serve
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

__all__ = ["load_app", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``saga`` console script.

    Args:
        argv: The arguments after ``saga`` (default: the process's).

    Returns:
        The exit status.
    """
    args = _parser().parse_args(argv)
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


def _parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(prog="saga", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for family in (serve, sagas, index, operate, inspect, keys, deploy, contract):
        family.add_commands(sub, common)
    return parser


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
