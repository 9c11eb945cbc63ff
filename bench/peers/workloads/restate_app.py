"""Restate's side of the workload: a service whose handler runs 3 sequential `ctx.run` steps.

Runs in the peers' venv (`restate-sdk`, `hypercorn`, `aiohttp`), in two kinds of process started
by `bench.peers.restate_peer`:

    python -m bench.peers.workloads.restate_app serve --port PORT
    python -m bench.peers.workloads.restate_app load --ingress URL --mode ... --out FILE

`serve` is the service deployment (the SDK's ASGI app under Hypercorn, HTTP/2 cleartext, which
the server's invoker speaks); the server reaches it after registration through the admin API.
`load` calls the handler through the server's ingress (`POST <ingress>/BenchSaga/run`), which
answers when the invocation has completed; one aiohttp connection per workflow in flight.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable

import restate

from bench.peers import loadgen

bench_saga = restate.Service("BenchSaga")


async def _noop(value: str) -> str:
    return value


@bench_saga.handler()
async def run(ctx: restate.Context, value: str) -> str:
    """Runs the three journaled steps and returns the last one's result."""
    value = await ctx.run_typed("a", _noop, restate.RunOptions(), value)
    value = await ctx.run_typed("b", _noop, restate.RunOptions(), value)
    return await ctx.run_typed("c", _noop, restate.RunOptions(), value)


def _serve(port: int) -> None:
    import hypercorn.asyncio
    import hypercorn.config

    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.loglevel = "WARNING"
    # Hypercorn's default keep-alive of 5 s would drop the invoker's idle HTTP/2 connections
    # between phases; the server reconnects, but the reconnect should not land in a window.
    config.keep_alive_timeout = 300
    app = restate.app(services=[bench_saga])
    asyncio.run(hypercorn.asyncio.serve(app, config))


async def _connect_load(
    args: argparse.Namespace,
) -> tuple[loadgen.Call, Callable[[], Awaitable[None]]]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=max(args.in_flight, 1))
    session = aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=args.timeout)
    )
    url = f"{args.ingress.rstrip('/')}/BenchSaga/run"

    async def call(i: int) -> object:
        async with session.post(url, json=f"w{i}") as response:
            body = await response.read()
            if response.status != 200:
                raise loadgen.CallError(f"HTTP {response.status}", repr(body[:200]))
            return body

    async def close() -> None:
        await session.close()

    return call, close


def main() -> None:
    """Parses the command line and serves the deployment or runs one load phase."""
    parser = argparse.ArgumentParser(prog="restate_app")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--port", type=int, required=True)
    load = sub.add_parser("load")
    load.add_argument("--ingress", required=True)
    loadgen.add_arguments(load)
    args = parser.parse_args()
    if args.command == "serve":
        _serve(args.port)
    else:
        loadgen.main(args, _connect_load)


if __name__ == "__main__":
    main()
