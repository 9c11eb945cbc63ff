"""``saga start``, ``saga status`` and ``saga list``: start sagas and read their states."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

import orjson
from rich.console import Group
from rich.text import Text

from saga.cli import render
from saga.cli.common import CliError, client, out, show_final, wait_final
from saga.core.state import SagaState, SagaStatus

if TYPE_CHECKING:
    from saga.runtime.client import SagaClient
from saga.errors import SagaExists

__all__ = ["add_commands"]


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds the commands to the ``saga`` parser's subcommands."""
    p = sub.add_parser("start", parents=[common], help="start a saga")
    p.add_argument("name")
    p.add_argument("--input", default="{}", help="the saga input as a JSON object")
    p.add_argument("--id", dest="saga_id", help="the saga id (default: a new random id)")
    p.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the saga to end")
    p.add_argument(
        "--if-exists",
        choices=["return", "refuse"],
        default="return",
        help="when the id names a saga already: keep it and change nothing (return, the "
        "default), or refuse a request with another name or input (refuse)",
    )
    p.set_defaults(handler=_start)

    p = sub.add_parser("status", parents=[common], help="show a saga's state")
    p.add_argument("saga_id")
    p.set_defaults(handler=_status)

    p = sub.add_parser("list", parents=[common], help="list sagas")
    p.add_argument("--status", choices=[s.value for s in SagaStatus])
    p.set_defaults(handler=_list)


async def _start(args: argparse.Namespace) -> int:
    try:
        data = orjson.loads(args.input)
    except orjson.JSONDecodeError as exc:
        raise CliError(
            f"--input is not valid JSON ({exc}); pass an object like '{{\"a\": 1}}'"
        ) from None
    if not isinstance(data, dict):
        raise CliError("--input must be a JSON object, like '{\"a\": 1}'")
    async with client(args) as c:
        # A rejected saga is final; a new start of its id must not be answered by it.
        before = await c.status(args.saga_id) if args.saga_id and args.wait is not None else None
        after = before.seq if before is not None and before.status is SagaStatus.REJECTED else 0
        try:
            saga_id = await c.start(args.name, data, args.saga_id, if_exists=args.if_exists)
        except SagaExists as exc:
            raise CliError(str(exc)) from None
        if args.wait is None:
            out(args, {"saga_id": saga_id}, saga_id)
            return 0
        state = await wait_final(c, saga_id, args.wait, after=after)
    code = show_final(args, state, frozenset({SagaStatus.COMPLETED}))
    if state.status is SagaStatus.REJECTED:
        print(f"saga: saga {saga_id!r} was rejected: {state.reason}", file=sys.stderr)
    elif state.name != args.name or state.input != data:
        # The id named another saga: under "return" its end is shown, under "refuse" the
        # coordinator refused this request (two starts raced past the client's check).
        verdict = "refused" if args.if_exists == "refuse" else "kept"
        print(
            f"saga: saga {saga_id!r} already existed with another name or input; this start "
            f"was {verdict} (--if-exists {args.if_exists}) and the existing saga is shown",
            file=sys.stderr,
        )
        if args.if_exists == "refuse":
            return 1
    return code


async def _status(args: argparse.Namespace) -> int:
    async with client(args) as c:
        state = await c.status(args.saga_id)
        if state is None:
            raise CliError(
                f"no saga {args.saga_id!r} under prefix {args.prefix!r}: check the id and --prefix"
            )
        tree = await _children(c, state)
    from saga.views.jaeger import trace_url

    link = trace_url(state.saga_id)
    data = {
        **state.model_dump(mode="json"),
        "trace_url": link,
        "children": [{"depth": d, **s.model_dump(mode="json")} for d, s in tree],
    }
    line = f"trace     {link}"
    lines = [line, *(render.tree_line(d, s) for d, s in tree)]
    text = "\n".join(lines)
    view = Group(render.status_view(state), Text(""), Text(text))
    out(args, data, f"{render.status(state)}\n\n{text}", view)
    return 0


async def _children(
    c: SagaClient, state: SagaState, depth: int = 1, limit: int = 100
) -> list[tuple[int, SagaState]]:
    """The sub-sagas of ``state``'s steps, depth first (``limit`` at most, in case of a very
    wide tree)."""
    found: list[tuple[int, SagaState]] = []
    for step in state.steps.values():
        if step.child is None or len(found) >= limit:
            continue
        child = await c.status(step.child)
        if child is not None:
            found.append((depth, child))
            found += await _children(c, child, depth + 1, limit - len(found))
    return found


async def _list(args: argparse.Namespace) -> int:
    async with client(args) as c:
        states = [s async for s in c.states() if not args.status or s.status == args.status]
    states.sort(key=lambda s: s.started_at)
    out(
        args,
        [render.summary_row(s) for s in states],
        render.table(states),
        render.table_view(states),
    )
    return 0
