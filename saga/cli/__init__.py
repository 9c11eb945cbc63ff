"""The ``saga`` command: run coordinators and participants, start and inspect sagas.

Every command takes ``--bootstrap-servers`` (or ``SAGA_KAFKA_BOOTSTRAP``) and ``--prefix`` (or
``SAGA_PREFIX``); the inspecting ones take ``--json`` for scripts. Errors are one line that
says what to do, with exit status 1 (2 for a usage error).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

import anyio
import orjson

from saga.cli import render
from saga.core.definition import SagaDefinition
from saga.core.state import SagaStatus
from saga.errors import DefinitionError, SagaTimeout, TransportError, UnknownSaga

__all__ = ["load_app", "main"]

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``saga`` console script."""
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

    parser = argparse.ArgumentParser(prog="saga", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("coordinator", parents=[common], help="run a coordinator")
    p.add_argument("--app", required=True, help="MODULE:ATTR naming definitions to run")
    p.add_argument("--partitions", type=int, default=6, help="partitions for new topics")

    p = sub.add_parser("participant", parents=[common], help="run a service's participant")
    p.add_argument("--app", required=True, help="MODULE:ATTR naming a saga.Participant")

    p = sub.add_parser("start", parents=[common], help="start a saga")
    p.add_argument("name")
    p.add_argument("--input", default="{}", help="the saga input as a JSON object")
    p.add_argument("--id", dest="saga_id", help="the saga id (default: a new random id)")
    p.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the saga to end")

    for name, text in (
        ("status", "show a saga's state"),
        ("replay", "show a saga's events from the log, in order"),
        ("cancel", "cancel a saga (until its pivot starts)"),
        ("retry", "re-drive a stuck saga"),
        ("resolve", "declare a stuck saga's stuck steps handled by hand"),
    ):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("saga_id")

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

    p = sub.add_parser("timeline", parents=[common], help="write a saga's timeline as HTML")
    p.add_argument("saga_id")
    p.add_argument("--out", help="the HTML file to write (default: saga-<id>.html)")

    p = sub.add_parser("watch", parents=[common], help="show sagas' progress live")
    p.add_argument("--from-start", action="store_true", help="read the log from its beginning")
    p.add_argument(
        "--until-idle", type=float, metavar="SECONDS", help="exit after SECONDS without events"
    )
    p.add_argument("--limit", type=_count, default=20, metavar="N", help="most sagas drawn")
    p.add_argument("--interval", type=float, default=0.5, help=argparse.SUPPRESS)

    p = sub.add_parser("trace", parents=[common], help="draw a saga's trace from Jaeger")
    p.add_argument("saga_id")
    p.add_argument("--jaeger", default=None, help="Jaeger query URL (default: $SAGA_JAEGER_URL)")

    p = sub.add_parser("list", parents=[common], help="list sagas")
    p.add_argument("--status", choices=[s.value for s in SagaStatus])

    p = sub.add_parser("graph", parents=[common], help="print a definition's DAG")
    p.add_argument("name")
    p.add_argument("--app", required=True, help="MODULE:ATTR naming definitions")
    p.add_argument("--format", choices=["mermaid", "dot"], default="mermaid")
    return parser


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


async def _dispatch(args: argparse.Namespace) -> int:
    handlers: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
        "coordinator": _coordinator,
        "participant": _participant,
        "start": _start,
        "status": _status,
        "replay": _replay,
        "list": _list,
        "cancel": _cancel,
        "retry": _retry,
        "resolve": _resolve,
        "graph": _graph,
        "trace": _trace,
        "rebuild": _rebuild,
        "timeline": _timeline,
        "watch": _watch,
    }
    try:
        return await handlers[args.command](args)
    except (TimeoutError, OSError) as exc:
        raise CliError(
            f"cannot reach Kafka at {args.bootstrap_servers} ({exc.__class__.__name__}): start "
            "it with `make kafka-up`, or pass --bootstrap-servers / set SAGA_KAFKA_BOOTSTRAP"
        ) from None
    except UnknownSaga as exc:
        raise CliError(str(exc)) from None
    except TransportError as exc:
        raise CliError(
            f"{exc} (Kafka at {args.bootstrap_servers}, prefix {args.prefix!r}): check that a "
            "coordinator has created the topics and that --prefix matches"
        ) from None


def _transport(args: argparse.Namespace) -> Any:
    from saga.adapters.kafka import KafkaTransport

    return KafkaTransport(args.bootstrap_servers)


def load_app(spec: str) -> Any:
    """Imports ``MODULE:ATTR`` and returns the attribute (called first if it is a factory)."""
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


def _definitions(spec: str) -> list[SagaDefinition]:
    value = load_app(spec)
    if isinstance(value, SagaDefinition):
        return [value]
    if isinstance(value, Iterable):
        found = list(value)
        if found and all(isinstance(d, SagaDefinition) for d in found):
            return found
    raise CliError(f"--app {spec!r}: expected a SagaDefinition or a list of them")


async def _serve_until_signalled(run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    logging.getLogger("saga").info("shutting down")
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch_signals)
        await run()
        tg.cancel_scope.cancel()


async def _coordinator(args: argparse.Namespace) -> int:
    from saga.adapters.tracing import OpenTelemetryObserver
    from saga.runtime.coordinator import Coordinator

    observer = OpenTelemetryObserver.from_env("saga-coordinator")
    coordinator = Coordinator(
        _definitions(args.app),
        transport=_transport(args),
        prefix=args.prefix,
        partitions=args.partitions,
        observer=observer,
    )
    try:
        await _serve_until_signalled(coordinator.run)
    finally:
        observer.shutdown()  # flushes the spans of the last transactions
    return 0


async def _participant(args: argparse.Namespace) -> int:
    from saga.runtime.participant import Participant

    participant = load_app(args.app)
    if not isinstance(participant, Participant):
        raise CliError(f"--app {args.app!r}: expected a saga.Participant")
    from saga.adapters.tracing import OpenTelemetryObserver

    participant.topics = type(participant.topics)(args.prefix)
    observer = OpenTelemetryObserver.from_env(participant.service)
    participant.observer = observer
    transport = _transport(args)
    try:
        await _serve_until_signalled(lambda: participant.run(transport))
    finally:
        observer.shutdown()
    return 0


def _client(args: argparse.Namespace) -> Any:
    from saga.runtime.client import SagaClient

    return SagaClient(_transport(args), prefix=args.prefix)


async def _start(args: argparse.Namespace) -> int:
    try:
        data = orjson.loads(args.input)
    except orjson.JSONDecodeError as exc:
        raise CliError(
            f"--input is not valid JSON ({exc}); pass an object like '{{\"a\": 1}}'"
        ) from None
    if not isinstance(data, dict):
        raise CliError("--input must be a JSON object, like '{\"a\": 1}'")
    async with _client(args) as client:
        saga_id = await client.start(args.name, data, args.saga_id)
        if args.wait is None:
            _out(args, {"saga_id": saga_id}, saga_id)
            return 0
        try:
            state = await client.wait(saga_id, args.wait)
        except SagaTimeout as exc:
            raise CliError(str(exc)) from None
    _out(args, state.model_dump(mode="json"), render.status(state))
    return 0 if state.status is SagaStatus.COMPLETED else 3


async def _status(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        state = await client.status(args.saga_id)
    if state is None:
        raise CliError(
            f"no saga {args.saga_id!r} under prefix {args.prefix!r}: check the id and --prefix"
        )
    from saga.views.jaeger import trace_url

    link = trace_url(state.saga_id)
    data = {**state.model_dump(mode="json"), "trace_url": link}
    _out(args, data, f"{render.status(state)}\n\ntrace     {link}")
    return 0


async def _trace(args: argparse.Namespace) -> int:
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
    _out(args, data, f"{jaeger.trace_url(args.saga_id, base)}\n{jaeger.waterfall(spans)}")
    return 0


async def _replay(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        events = await client.events(args.saga_id)
    _out(args, [e.model_dump(mode="json") for e in events], render.replay(events))
    return 0


async def _rebuild(args: argparse.Namespace) -> int:
    from saga.runtime.ports import Topics
    from saga.views.rebuild import rebuild

    report = await rebuild(
        _transport(args),
        Topics(args.prefix),
        from_offset=args.from_offset,
        from_time=args.from_time,
    )
    _out(args, report.to_json(), render.rebuild(report))
    return 0 if report.consistent else 3


async def _timeline(args: argparse.Namespace) -> int:
    from saga.views.timeline import write_page

    async with _client(args) as client:
        events = await client.events(args.saga_id)
    # A saga id may hold any character; the default file name keeps only the safe ones.
    target = args.out or f"saga-{re.sub(r'[^A-Za-z0-9_.-]', '_', args.saga_id)}.html"
    try:
        path = write_page(events, target)
    except OSError as exc:
        raise CliError(f"cannot write {target}: {exc.strerror or exc}") from None
    data = {"saga_id": args.saga_id, "path": str(path), "events": len(events)}
    _out(args, data, f"wrote {path} ({len(events)} events)")
    return 0


async def _watch(args: argparse.Namespace) -> int:
    from saga.runtime.ports import Topics
    from saga.views.watch import watch

    await watch(
        _transport(args),
        Topics(args.prefix),
        from_start=args.from_start,
        until_idle=args.until_idle,
        limit=args.limit,
        as_json=args.json,
        interval=args.interval,
    )
    return 0


async def _list(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        states = [s async for s in client.states() if not args.status or s.status == args.status]
    states.sort(key=lambda s: s.started_at)
    _out(args, [render.summary_row(s) for s in states], render.table(states))
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        await client.cancel(args.saga_id)
    _out(
        args,
        {"saga_id": args.saga_id, "requested": "cancel"},
        f"cancel requested for {args.saga_id}",
    )
    return 0


async def _retry(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        await client.retry(args.saga_id)
    _out(
        args, {"saga_id": args.saga_id, "requested": "retry"}, f"retry requested for {args.saga_id}"
    )
    return 0


async def _resolve(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        await client.resolve(args.saga_id)
    _out(
        args,
        {"saga_id": args.saga_id, "requested": "resolve"},
        f"resolve requested for {args.saga_id}",
    )
    return 0


async def _graph(args: argparse.Namespace) -> int:
    from saga.core import graph

    found = {d.name: d for d in _definitions(args.app)}
    if args.name not in found:
        raise CliError(f"no saga {args.name!r} in {args.app}; it has {sorted(found)}")
    d = found[args.name]
    text = graph.mermaid(d) if args.format == "mermaid" else graph.dot(d)
    _out(args, {"name": d.name, "format": args.format, "graph": text}, text)
    return 0


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()
