"""``saga cancel``, ``retry``, ``resolve``, ``signal``, ``approve`` and ``reject``: the
requests people make about one saga.

They differ only in the request sent, so one command serves them, parametrised by an
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

import anyio
import orjson

from saga.cli.common import CliError, client, out, show_final, wait_final
from saga.core.events import SignalReceived, SignalRejected
from saga.core.state import SagaStatus

if TYPE_CHECKING:
    from saga.runtime.client import SagaClient

__all__ = ["OPERATIONS", "Operation", "add_commands"]

_ENDS = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED})
_WHY = "(recorded in the saga's log with who asked; `saga replay` shows it)"


@dataclass(frozen=True, slots=True)
class Operation:
    """One of the requests about a saga."""

    name: str
    """The command, and the ``requested`` field of its JSON output."""
    help: str
    send: Callable[[SagaClient, argparse.Namespace], Awaitable[int]]
    """Sends the request with the parsed arguments; returns the saga's ``seq`` when asked."""
    ends_well: frozenset[SagaStatus]
    """The final statuses that mean the request got what it asked for."""
    arguments: tuple[tuple[str, str, str], ...]
    """Its own arguments after the saga id: (name or option, metavar, help)."""


def _data(args: argparse.Namespace) -> dict[str, Any]:
    try:
        value = orjson.loads(args.data) if args.data else {}
    except orjson.JSONDecodeError as exc:
        example = """'{"eta": 12}'"""
        raise CliError(f"--data: not JSON ({exc}); pass an object, e.g. {example}") from None
    if not isinstance(value, dict):
        raise CliError("""--data: the signal's data must be a JSON object, e.g. '{"eta": 12}'""")
    return value


OPERATIONS = (
    Operation(
        "cancel",
        "cancel a saga (until its pivot starts)",
        lambda c, a: c.cancel(a.saga_id, a.reason or "cancelled by request"),
        frozenset({SagaStatus.COMPENSATED}),
        (("--reason", "TEXT", f"why {_WHY}"),),
    ),
    Operation(
        "retry",
        "re-drive a stuck saga",
        lambda c, a: c.retry(a.saga_id, a.reason),
        _ENDS,
        (("--reason", "TEXT", f"why {_WHY}"),),
    ),
    Operation(
        "resolve",
        "declare a stuck saga's stuck steps handled by hand",
        lambda c, a: c.resolve(a.saga_id, a.note or "resolved by an operator"),
        _ENDS,
        (("--note", "TEXT", f"what was done by hand {_WHY}"),),
    ),
    Operation(
        "signal",
        "deliver a named signal to a saga (its wait step completes with the data)",
        lambda c, a: _signal(c, a),
        _ENDS,
        (
            ("name", "NAME", "the signal's name (a wait step's `wait`)"),
            ("--data", "JSON", "the signal's data, a JSON object (the wait step's output)"),
        ),
    ),
    Operation(
        "approve",
        "approve a saga's approval step",
        lambda c, a: c.approve(a.saga_id, a.step, a.note or ""),
        _ENDS,
        (("step", "STEP", "the approval step"), ("--note", "TEXT", f"a note {_WHY}")),
    ),
    Operation(
        "reject",
        "reject a saga's approval step (the saga compensates)",
        lambda c, a: c.reject(a.saga_id, a.step, a.note or ""),
        frozenset({SagaStatus.COMPENSATED}),
        (("step", "STEP", "the approval step"), ("--note", "TEXT", f"why {_WHY}")),
    ),
)
"""The commands, in the order ``saga --help`` lists them."""


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds the commands to the ``saga`` parser's subcommands."""
    for op in OPERATIONS:
        p = sub.add_parser(op.name, parents=[common], help=op.help)
        p.add_argument("saga_id")
        for name, metavar, help_ in op.arguments:
            p.add_argument(name, metavar=metavar, help=help_)
        p.add_argument(
            "--wait",
            type=float,
            metavar="SECONDS",
            help="wait for the saga to end after the request, and show how it ended",
        )
        p.set_defaults(handler=_request, operation=op)


async def _signal(c: SagaClient, args: argparse.Namespace) -> int:
    # A signal for an id that names no saga would only be dead-lettered: say so now.
    if await c.status(args.saga_id) is None:
        raise CliError(
            f"no saga {args.saga_id!r} under prefix {args.prefix!r}: a signal for it would be "
            "dead-lettered; check the id (saga list) and --prefix"
        )
    return await c.signal(args.saga_id, args.name, _data(args))


ANSWER_WAIT = 10.0
"""Seconds ``saga signal`` waits for the coordinator to say whether the saga took it."""


async def _signal_answer(c: SagaClient, args: argparse.Namespace, seq: int) -> int:
    """Prints whether the saga took the signal or why not (exit 3 if it did not)."""
    data: dict[str, Any] = {"saga_id": args.saga_id, "signal": args.name}
    with anyio.move_on_after(ANSWER_WAIT):
        while True:
            state = await c.status(args.saga_id)
            if state is not None and state.seq > seq:
                for event in (await c.events(args.saga_id))[seq:]:
                    if isinstance(event, SignalReceived) and event.name == args.name:
                        text = f"signal {args.name!r} taken by saga {args.saga_id}"
                        out(args, {**data, "taken": True}, text)
                        return 0
                    if isinstance(event, SignalRejected) and event.name == args.name:
                        reason = event.reason
                        out(args, {**data, "taken": False, "reason": reason}, f"refused: {reason}")
                        return 3
            await anyio.sleep(0.2)
    text = f"signal {args.name!r} sent to {args.saga_id}; no answer within {ANSWER_WAIT:g}s yet"
    out(args, {**data, "taken": None}, text)
    return 0


async def _request(args: argparse.Namespace) -> int:
    op: Operation = args.operation
    async with client(args) as c:
        seq = await op.send(c, args)
        if args.wait is None and op.name == "signal":
            return await _signal_answer(c, args, seq)
        if args.wait is None:
            data = {"saga_id": args.saga_id, "requested": op.name}
            out(args, data, f"{op.name} requested for {args.saga_id}")
            return 0
        state = await wait_final(c, args.saga_id, args.wait, after=seq)
    return show_final(args, state, op.ends_well)
