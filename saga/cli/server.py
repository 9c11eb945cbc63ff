"""``saga serve``: the HTTP API, the web console and ``/metrics`` in one process, with the
index projector that keeps the saga index current beside them (`saga.server`).

Authentication is required unless ``--no-auth`` says otherwise (local development): bearer
tokens (``--tokens FILE``, lines of ``sha256(token) principal``, made with ``--hash-token``)
and/or client certificates (``--tls-cert``, ``--tls-key`` and ``--tls-client-ca``: every
client must present a certificate of that CA, whose common name is its principal). Requests
are signed as the caller when the server holds its key (``--principal-keys DIR`` of
``<principal>.key`` files, and the server's own ``--signing-key``); without any key the server
sends them unsigned, the caller recorded as an unverified claim.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import anyio

from saga.cli.common import CliError, definitions, kafka_transport, sealed, trust
from saga.errors import ConfigurationError

__all__ = ["add_commands"]

log = logging.getLogger("saga.server")


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds ``saga serve`` to the ``saga`` parser's subcommands."""
    p = sub.add_parser(
        "serve",
        parents=[common],
        help="serve the HTTP API, the web console and /metrics (and keep the index current)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    p.add_argument("--port", type=int, default=8080, help="port (%(default)s; 0: any free one)")
    p.add_argument("--db", type=Path, metavar="PATH", help="the index file (default: $SAGA_INDEX)")
    p.add_argument("--app", help="MODULE:ATTR naming definitions (their input models check starts)")
    p.add_argument("--tokens", type=Path, metavar="FILE", help="bearer tokens file")
    p.add_argument("--no-auth", action="store_true", help="no authentication (development only)")
    p.add_argument(
        "--as",
        dest="open_as",
        default="console",
        metavar="PRINCIPAL",
        help="with --no-auth: who requests are recorded as (%(default)s)",
    )
    p.add_argument("--principal-keys", type=Path, metavar="DIR", help="<principal>.key files")
    p.add_argument("--tls-cert", type=Path, metavar="FILE", help="serve HTTPS with this chain")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key")
    p.add_argument("--tls-client-ca", type=Path, metavar="FILE", help="require client certs")
    p.add_argument("--jaeger-url", help="Jaeger query API for trace pages ($SAGA_JAEGER_URL)")
    p.add_argument("--jaeger-ui", metavar="URL", help="a Jaeger UI to link traces to")
    p.add_argument("--partitions", type=int, default=6, help="partitions for new topics")
    p.add_argument(
        "--hash-token",
        nargs=2,
        metavar=("TOKEN", "PRINCIPAL"),
        help="print the tokens file line for TOKEN and PRINCIPAL, and exit",
    )
    p.set_defaults(handler=_serve)


async def _serve(args: argparse.Namespace) -> int:
    from saga.server.auth import hash_token

    if args.hash_token:
        token, principal = args.hash_token
        print(f"{hash_token(token)} {principal}")
        return 0
    try:
        return await _run(args)
    except ConfigurationError as exc:
        raise CliError(str(exc)) from None


def _signers(args: argparse.Namespace) -> dict[str, Any] | None:
    from saga.runtime.trust import SigningKey, TrustError

    own = trust(args, "client").signer
    found: dict[str, Any] = {}
    if args.principal_keys is not None:
        if not args.principal_keys.is_dir():
            raise CliError(f"--principal-keys {args.principal_keys}: not a directory")
        for path in sorted(args.principal_keys.glob("*.key")):
            try:
                key = SigningKey.load(path)
            except TrustError as exc:
                raise CliError(f"--principal-keys: {exc}") from None
            found[key.principal] = key
    if own is not None:
        found[own.principal] = own
    return found or None


async def _run(args: argparse.Namespace) -> int:
    from saga.cli.index import index_path
    from saga.index.projector import run_projector
    from saga.index.sqlite import SqliteSagaIndex
    from saga.runtime.ports import Topics
    from saga.runtime.trust import TrustError
    from saga.server import Authenticator, ConsoleSettings, SagaService, TokenTable, create_app
    from saga.server.metrics import ServerMetrics
    from saga.server.run import TlsFiles, open_server
    from saga.views.jaeger import DEFAULT_JAEGER_URL

    if not (args.tokens or args.tls_client_ca or args.no_auth):
        raise CliError(
            "say how callers authenticate: --tokens FILE, --tls-client-ca FILE (with --tls-cert "
            "and --tls-key), or --no-auth for local development"
        )
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        raise CliError("TLS needs both --tls-cert and --tls-key (and them for --tls-client-ca)")
    found = definitions(args.app) if args.app else []
    signers = _signers(args)
    try:
        policy = trust(args, "client").policy
    except TrustError as exc:
        raise CliError(str(exc)) from None
    authenticator = Authenticator(
        tokens=TokenTable.load(args.tokens) if args.tokens else None,
        certificates=args.tls_client_ca is not None,
        open_as=args.open_as if args.no_auth else None,
    )
    kafka = kafka_transport(args)
    await kafka.check()
    transport = sealed(args, kafka)
    # The topics a client uses, made as a client's first request would make them (so that the
    # projector can follow them before any coordinator has run under this prefix).
    topics = Topics(args.prefix)
    await transport.ensure_topics(
        [topics.requests, topics.log, topics.snapshots],
        args.partitions,
        compacted=[topics.snapshots],
    )
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    with SqliteSagaIndex(index_path(args.db), prefix=args.prefix) as index:
        service = SagaService(
            transport,
            index,
            prefix=args.prefix,
            definitions=found,
            signers=signers,
            policy=policy,
            partitions=args.partitions,
        )
        metrics = ServerMetrics(index)
        settings = ConsoleSettings(
            jaeger_url=args.jaeger_url or DEFAULT_JAEGER_URL, jaeger_ui=args.jaeger_ui
        )
        app = create_app(service, authenticator, settings=settings, metrics=metrics)
        async with anyio.create_task_group() as tg:
            await tg.start(run_projector, transport, args.prefix, index)
            tg.start_soon(metrics.run, transport, args.prefix)
            async with open_server(app, args.host, args.port, tls=tls) as server:
                mode = "signed" if signers else "unsigned"
                print(
                    f"saga: console and API on {server.url}/ (API docs {server.url}/docs, "
                    f"metrics {server.url}/metrics; requests {mode}); Ctrl-C stops",
                    file=sys.stderr,
                    flush=True,
                )
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        log.info("shutting down")
                        break
            tg.cancel_scope.cancel()
        metrics.shutdown()
    return 0
