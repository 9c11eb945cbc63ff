"""The commands that look at sagas after the fact or as they run: ``saga replay``, ``watch``,
``timeline``, ``rebuild``, ``graph`` and ``trace``."""

from __future__ import annotations

import argparse
import re
from typing import Any

import anyio

from saga.cli.common import CliError, client, definitions, out, transport

__all__ = ["add_commands"]


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds the commands to the ``saga`` parser's subcommands."""
    p = sub.add_parser(
        "replay", parents=[common], help="show a saga's events from the log, in order"
    )
    p.add_argument("saga_id")
    p.set_defaults(handler=_replay)

    p = sub.add_parser(
        "rebuild",
        parents=[common],
        help="rebuild every saga from the log and check the snapshots (exit 3 if they differ)",
    )
    window = p.add_mutually_exclusive_group()
    window.add_argument(
        "--from-offset",
        type=_count,
        default=0,
        metavar="N",
        help="start at offset N of each partition",
    )
    window.add_argument(
        "--from-time",
        type=_iso_time,
        metavar="ISO8601",
        help="start at each partition's first record at or after this time (UTC if no zone)",
    )
    p.set_defaults(handler=_rebuild)

    p = sub.add_parser("timeline", parents=[common], help="write a saga's timeline as HTML")
    p.add_argument("saga_id")
    p.add_argument("--out", help="the HTML file to write (default: saga-<id>.html)")
    p.set_defaults(handler=_timeline)

    p = sub.add_parser("watch", parents=[common], help="show sagas' progress live")
    p.add_argument("--from-start", action="store_true", help="read the log from its beginning")
    p.add_argument(
        "--until-idle", type=float, metavar="SECONDS", help="exit after SECONDS without events"
    )
    p.add_argument("--limit", type=_count, default=20, metavar="N", help="most sagas drawn")
    p.add_argument("--interval", type=float, default=0.5, help=argparse.SUPPRESS)
    p.set_defaults(handler=_watch)

    p = sub.add_parser("trace", parents=[common], help="draw a saga's trace from Jaeger")
    p.add_argument("saga_id")
    p.add_argument("--jaeger", default=None, help="Jaeger query URL (default: $SAGA_JAEGER_URL)")
    p.add_argument(
        "--jaeger-ui",
        metavar="URL",
        help="link the trace to this Jaeger UI (default: $SAGA_JAEGER_UI; without one, to the "
        "console's trace page)",
    )
    p.add_argument(
        "--console-url",
        metavar="URL",
        help="the console (saga serve) the link points at without a Jaeger UI (default: "
        "$SAGA_CONSOLE_URL, else http://127.0.0.1:8080)",
    )
    p.set_defaults(handler=_trace)

    p = sub.add_parser("graph", parents=[common], help="print a definition's DAG")
    p.add_argument("name")
    p.add_argument("--app", required=True, help="MODULE:ATTR naming definitions")
    p.add_argument(
        "--format",
        choices=["mermaid", "dot", "text"],
        default="mermaid",
        help="mermaid (renders on GitHub), dot (Graphviz) or text (a list of the steps)",
    )
    p.set_defaults(handler=_graph)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, 0 or more")
    return int(text)


def _iso_time(text: str) -> float:
    from saga.views.rebuild import parse_time

    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not ISO 8601; use e.g. 2025-01-31T12:00:00Z"
        ) from None


async def _replay(args: argparse.Namespace) -> int:
    from saga.cli import render

    async with client(args) as c:
        events = await c.events(args.saga_id)
    data = [e.model_dump(mode="json") for e in events]
    out(args, data, render.replay(events), render.replay_view(events))
    return 0


async def _rebuild(args: argparse.Namespace) -> int:
    from saga.cli import render
    from saga.runtime.ports import Topics
    from saga.views.rebuild import rebuild

    report = await rebuild(
        transport(args),
        Topics(args.prefix),
        from_offset=args.from_offset,
        from_time=args.from_time,
    )
    out(args, report.to_json(), render.rebuild(report))
    return 0 if report.consistent else 3


async def _timeline(args: argparse.Namespace) -> int:
    from saga.views.timeline import write_page

    async with client(args) as c:
        events = await c.events(args.saga_id)
    # A saga id may hold any character; the default file name keeps only the safe ones.
    target = args.out or f"saga-{re.sub(r'[^A-Za-z0-9_.-]', '_', args.saga_id)}.html"
    try:
        path = write_page(events, target)
    except OSError as exc:
        raise CliError(f"cannot write {target}: {exc.strerror or exc}") from None
    data = {"saga_id": args.saga_id, "path": str(path), "events": len(events)}
    out(args, data, f"wrote {path} ({len(events)} events)")
    return 0


async def _watch(args: argparse.Namespace) -> int:
    from saga.runtime.ports import Topics
    from saga.views.watch import watch

    await watch(
        transport(args),
        Topics(args.prefix),
        from_start=args.from_start,
        until_idle=args.until_idle,
        limit=args.limit,
        as_json=args.json,
        interval=args.interval,
    )
    return 0


async def _trace(args: argparse.Namespace) -> int:
    from rich.console import Group
    from rich.text import Text

    from saga.cli import render
    from saga.views import jaeger

    base = args.jaeger or jaeger.DEFAULT_JAEGER_URL
    try:
        spans = await anyio.to_thread.run_sync(jaeger.fetch_trace, args.saga_id, base)
    except LookupError as exc:
        raise CliError(
            f"{exc}; spans are exported in batches, so try again in a few seconds"
        ) from None
    except OSError as exc:
        raise CliError(
            f"cannot reach Jaeger at {base} ({exc}): "
            "start it with `make jaeger-up`, or pass --jaeger"
        ) from None
    data = [
        {
            "span_id": s.span_id,
            "parent_id": s.parent_id,
            "links": list(s.links),
            "service": s.service,
            "name": s.name,
            "start_us": s.start_us,
            "duration_us": s.duration_us,
            "error": s.error,
        }
        for s in spans
    ]
    # Not the query API's own page: the locally built Jaeger answers it with a placeholder.
    url = jaeger.trace_link(args.saga_id, ui=args.jaeger_ui, console=args.console_url)
    view = Group(Text(url), render.trace_view(spans))
    out(args, data, f"{url}\n{jaeger.waterfall(spans)}", view)
    return 0


async def _graph(args: argparse.Namespace) -> int:
    from saga.core import graph

    found = {d.name: d for d in definitions(args.app)}
    if args.name not in found:
        raise CliError(f"no saga {args.name!r} in {args.app}; it has {sorted(found)}")
    d = found[args.name]
    draw = {"mermaid": graph.mermaid, "dot": graph.dot, "text": graph.text}[args.format]
    text = draw(d)
    out(args, {"name": d.name, "format": args.format, "graph": text}, text)
    return 0
