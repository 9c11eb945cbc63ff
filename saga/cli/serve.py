"""``saga coordinator`` and ``saga participant``: run the engine's long-lived processes until
SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import anyio

from saga.cli.common import CliError, definitions, kafka_transport, load_app, sealed, trust

if TYPE_CHECKING:
    from saga.runtime.ports import Transport

__all__ = ["add_commands"]


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds the commands to the ``saga`` parser's subcommands."""
    p = sub.add_parser("coordinator", parents=[common], help="run a coordinator")
    p.add_argument("--app", required=True, help="MODULE:ATTR naming definitions to run")
    p.add_argument("--partitions", type=int, default=6, help="partitions for new topics")
    _instance_id(p)
    p.set_defaults(handler=_coordinator)

    p = sub.add_parser("participant", parents=[common], help="run a service's participant")
    p.add_argument("--app", required=True, help="MODULE:ATTR naming a saga.Participant")
    p.add_argument(
        "--partitions", type=int, default=6, help="partitions if it creates its command topic"
    )
    _instance_id(p)
    p.set_defaults(handler=_participant)


def _instance_id(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--instance-id",
        default=os.environ.get("SAGA_INSTANCE_ID") or None,
        metavar="NAME",
        help="this process's stable name in its consumer group (Kafka's static membership: a "
        "restarted process takes its partitions back at once instead of after the session "
        "timeout; a stopped one holds them for the session timeout); default $SAGA_INSTANCE_ID",
    )


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


async def _connected(args: argparse.Namespace) -> Transport:
    """The transport, once it has reached the broker with its settings: a wrong password, an
    untrusted certificate or a missing right ends the process here, with the setting to fix,
    before any saga is touched."""
    kafka = kafka_transport(args)
    await kafka.check()
    logging.getLogger("saga").info("connected to Kafka: %s", kafka.security.describe())
    return sealed(args, kafka)


async def _coordinator(args: argparse.Namespace) -> int:
    from saga.adapters.tracing import OpenTelemetryObserver
    from saga.runtime.coordinator import Coordinator

    found = definitions(args.app)
    signing = trust(args, "coordinator")
    kafka = await _connected(args)
    observer = OpenTelemetryObserver.from_env("saga-coordinator")
    coordinator = Coordinator(
        found,
        transport=kafka,
        prefix=args.prefix,
        partitions=args.partitions,
        observer=observer,
        trust=signing,
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

    signing = trust(args, "participant")
    signing.check_role("participant", participant.service)
    kafka = await _connected(args)
    observer = OpenTelemetryObserver.from_env(participant.service)
    try:
        await _serve_until_signalled(
            lambda: participant.run(
                kafka,
                prefix=args.prefix,
                partitions=args.partitions,
                observer=observer,
                trust=signing,
            )
        )
    finally:
        observer.shutdown()
    return 0
