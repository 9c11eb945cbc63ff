"""``saga start``, ``saga status`` and ``saga list``: start sagas and read their states (and
``saga index``, from `saga.cli.index`).

``status`` and ``list`` answer from the saga index (`saga.index`) when one is fresh: the file
``--index`` or ``$SAGA_INDEX`` names (or ``./saga-index.sqlite3`` if it exists), kept up to date
by a running projector (`saga.cli.index.open_fresh`). Otherwise they scan the snapshots topic,
as without an index. When an index was asked for, a line on standard error says which source
answered, and why the index did not.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from saga.cli.common import CliError, client, out, show_final, wait_final
from saga.cli.index import Fresh, open_fresh
from saga.core.state import SagaState, SagaStatus, StepStatus
from saga.errors import SagaExists

# The index (its package loads the projector and SQLite), `rich` and the text views are
# imported by the handlers that use them: the other commands of the CLI do not load them.
if TYPE_CHECKING:
    from saga.index.port import SagaIndex, SagaQuery
    from saga.runtime.client import SagaClient

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
    _index_options(p)
    p.add_argument(
        "--jaeger-ui",
        metavar="URL",
        help="link the trace to this Jaeger UI (default: $SAGA_JAEGER_UI; without one, to the "
        "console's trace page)",
    )
    p.add_argument(
        "--console-url",
        metavar="URL",
        help="the console (saga serve) the trace link points at without a Jaeger UI (default: "
        "$SAGA_CONSOLE_URL, else http://127.0.0.1:8080)",
    )
    p.set_defaults(handler=_status)

    p = sub.add_parser("list", parents=[common], help="list sagas")
    p.add_argument("--status", choices=[s.value for s in SagaStatus], action="append")
    p.add_argument("--name", help="only sagas of this definition")
    p.add_argument("--version", type=int, help="only sagas of this definition version")
    p.add_argument("--step", help="only sagas with this step (with --step-status: in it)")
    p.add_argument("--step-status", choices=[s.value for s in StepStatus])
    p.add_argument(
        "--input",
        dest="inputs",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="only sagas whose input's top-level KEY equals the JSON value (a bare word is a "
        "string): --input customer=c-7 --input total=12",
    )
    p.add_argument(
        "--limit", type=int, metavar="N", help="only the N most recently updated (default: all)"
    )
    _index_options(p)
    p.set_defaults(handler=_list)

    # `saga index` belongs with list and status, which read the index it keeps.


def _index_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--index",
        metavar="PATH",
        help="answer from this saga index when it is fresh (default: $SAGA_INDEX, else "
        "./saga-index.sqlite3 if it exists)",
    )
    p.add_argument(
        "--no-index", action="store_true", help="scan the snapshots topic, even with an index"
    )


def _fresh(args: argparse.Namespace) -> Fresh:
    return open_fresh(args.index, args.prefix, disabled=args.no_index)


def _say(note: str | None) -> None:
    if note is not None:
        print(f"saga: {note}", file=sys.stderr)


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
    from rich.console import Group
    from rich.text import Text

    from saga.cli import render

    fresh = _fresh(args)
    state, tree = None, []
    if fresh.index is not None:
        with fresh.index as index:
            row = index.get(args.saga_id)
            if row is not None:
                state = row.state
                tree = _children(_lookup(index), state)
    if state is not None:
        _say(fresh.note)
    else:
        if fresh.index is not None:
            _say(f"saga {args.saga_id!r} is not in the index (yet?); scanned the snapshots topic")
        else:
            _say(fresh.note)
        async with client(args) as c:
            state = await c.status(args.saga_id)
            if state is None:
                raise CliError(
                    f"no saga {args.saga_id!r} under prefix {args.prefix!r}: check the id and "
                    "--prefix"
                )
            tree = await _children_of(c, state)
    from saga.views.jaeger import trace_link

    link = trace_link(state.saga_id, ui=args.jaeger_ui, console=args.console_url)
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


def _lookup(index: SagaIndex) -> Callable[[str], SagaState | None]:
    def state_of(saga_id: str) -> SagaState | None:
        row = index.get(saga_id)
        return None if row is None else row.state

    return state_of


def _children(
    status: Callable[[str], SagaState | None], state: SagaState, depth: int = 1, limit: int = 100
) -> list[tuple[int, SagaState]]:
    """The sub-sagas of ``state``'s steps, depth first, from the index."""
    found: list[tuple[int, SagaState]] = []
    for step in state.steps.values():
        if step.child is None or len(found) >= limit:
            continue
        child = status(step.child)
        if child is not None:
            found.append((depth, child))
            found += _children(status, child, depth + 1, limit - len(found))
    return found


async def _children_of(
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
            found += await _children_of(c, child, depth + 1, limit - len(found))
    return found


async def _list(args: argparse.Namespace) -> int:
    from saga.cli import render
    from saga.index.query import matches

    query = _query(args)
    fresh = _fresh(args)
    _say(fresh.note)
    if fresh.index is not None:
        with fresh.index as index:
            states = _all_pages(index, query, args.limit)
    else:
        async with client(args) as c:
            states = [s async for s in c.states() if matches(query, s)]
        if args.limit is not None:
            states = sorted(states, key=lambda s: (s.updated_at, s.saga_id), reverse=True)
            states = states[: args.limit]
    states.sort(key=lambda s: s.started_at)
    out(
        args,
        [render.summary_row(s) for s in states],
        render.table(states),
        render.table_view(states),
    )
    return 0


def _query(args: argparse.Namespace) -> SagaQuery:
    from saga.index.port import SagaQuery

    inputs: dict[str, Any] = {}
    for item in args.inputs:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CliError(f"--input {item!r}: expected KEY=JSON, like customer=c-7 or total=12")
        try:
            inputs[key] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            inputs[key] = raw  # a bare word: the string itself
    if args.limit is not None and args.limit < 1:
        raise CliError("--limit must be 1 or more")
    return SagaQuery(
        name=args.name,
        status=tuple(args.status or ()),
        version=args.version,
        step=args.step,
        step_status=args.step_status,
        input=inputs,
    )


def _all_pages(index: SagaIndex, query: SagaQuery, limit: int | None) -> list[SagaState]:
    """The states of every page of ``query`` (of the first ``limit``, if given)."""
    from saga.index.port import SagaQuery
    from saga.index.query import MAX_LIMIT

    found: list[SagaState] = []
    cursor = None
    while True:
        want = MAX_LIMIT if limit is None else min(MAX_LIMIT, limit - len(found))
        page = index.query(SagaQuery(**{**query.__dict__, "limit": want, "cursor": cursor}))
        found += [r.state for r in page.rows]
        cursor = page.next_cursor
        if cursor is None or (limit is not None and len(found) >= limit):
            return found
