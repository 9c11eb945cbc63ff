"""``saga cancel``, ``saga retry`` and ``saga resolve``: an operator's requests about one saga.

The three differ only in the request sent, so one command serves them, parametrised by an
`Operation`. With ``--wait SECONDS`` it then waits for what the request leads to: the first
final state after the saga's ``seq`` when asked (`SagaClient.wait` with ``after=``), so that a
saga stuck when retried is not taken for the end of its re-driven run. It prints that state
as ``saga start --wait`` does, with the same exit status: 0 if the saga ended as asked, 3 if
it did not (stuck again; for a cancel, also completed because the cancel came too late).
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from saga.cli.common import client, out, show_final, wait_final
from saga.core.state import SagaStatus

if TYPE_CHECKING:
    from saga.runtime.client import SagaClient

__all__ = ["OPERATIONS", "Operation", "add_commands"]


@dataclass(frozen=True, slots=True)
class Operation:
    """One of the operator's requests."""

    name: str
    """The command, and the ``requested`` field of its JSON output."""
    help: str
    send: Callable[[SagaClient, str, str | None], Awaitable[int]]
    """Sends the request for a saga id, with the operator's reason or note; returns the
    saga's ``seq`` when asked."""
    ends_well: frozenset[SagaStatus]
    """The final statuses that mean the request got what it asked for."""
    why: str
    """The option that carries the operator's words: ``--reason`` or ``--note``."""


OPERATIONS = (
    Operation(
        "cancel",
        "cancel a saga (until its pivot starts)",
        lambda c, saga_id, why: c.cancel(saga_id, why or "cancelled by request"),
        frozenset({SagaStatus.COMPENSATED}),
        "--reason",
    ),
    Operation(
        "retry",
        "re-drive a stuck saga",
        lambda c, saga_id, why: c.retry(saga_id, why),
        frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED}),
        "--reason",
    ),
    Operation(
        "resolve",
        "declare a stuck saga's stuck steps handled by hand",
        lambda c, saga_id, why: c.resolve(saga_id, why or "resolved by an operator"),
        frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED}),
        "--note",
    ),
)
"""The commands, in the order ``saga --help`` lists them."""


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds the commands to the ``saga`` parser's subcommands."""
    for op in OPERATIONS:
        p = sub.add_parser(op.name, parents=[common], help=op.help)
        p.add_argument("saga_id")
        p.add_argument(
            op.why,
            dest="why",
            metavar="TEXT",
            help="why (recorded in the saga's log with who asked; `saga replay` shows it)",
        )
        p.add_argument(
            "--wait",
            type=float,
            metavar="SECONDS",
            help="wait for the saga to end after the request, and show how it ended",
        )
        p.set_defaults(handler=_request, operation=op)


async def _request(args: argparse.Namespace) -> int:
    op: Operation = args.operation
    async with client(args) as c:
        seq = await op.send(c, args.saga_id, args.why)
        if args.wait is None:
            data = {"saga_id": args.saga_id, "requested": op.name}
            out(args, data, f"{op.name} requested for {args.saga_id}")
            return 0
        state = await wait_final(c, args.saga_id, args.wait, after=seq)
    return show_final(args, state, op.ends_well)
