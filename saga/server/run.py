"""Running the application on uvicorn inside an async block.

`open_server` binds the socket itself (port 0 picks a free one, which tests and benchmarks
need), serves in a task of the caller's task group, and on leaving the block asks uvicorn to
finish the requests in hand and waits for it. Signals stay the caller's: ``saga serve``
handles SIGTERM and SIGINT around the block, and a test's process keeps its own.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import uvicorn
from fastapi import FastAPI

from saga.server.auth import MtlsProtocol

__all__ = ["RunningServer", "TlsFiles", "open_server"]


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The server's TLS settings.

    Attributes:
        certfile: The server's certificate chain (PEM).
        keyfile: Its private key (PEM).
        client_ca: A CA bundle: when given, every client must present a certificate it
            signed, and the certificate names the caller (`saga.server.auth`).
    """

    certfile: Path
    keyfile: Path
    client_ca: Path | None = None


@dataclass(frozen=True, slots=True)
class RunningServer:
    """A server serving in the background."""

    host: str
    port: int
    scheme: str

    @property
    def url(self) -> str:
        """The server's base URL (no trailing slash)."""
        return f"{self.scheme}://{self.host}:{self.port}"


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The caller owns the process's signals (see the module docstring).
        yield


@contextlib.asynccontextmanager
async def open_server(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, tls: TlsFiles | None = None
) -> AsyncIterator[RunningServer]:
    """Serves ``app`` until the block ends.

    Raises:
        OSError: The address cannot be bound.
        RuntimeError: The application failed to start (its lifespan raised).
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_level="warning",
        access_log=False,
        http=MtlsProtocol if tls is not None and tls.client_ca else "h11",
        ssl_certfile=str(tls.certfile) if tls else None,
        ssl_keyfile=str(tls.keyfile) if tls else None,
        ssl_ca_certs=str(tls.client_ca) if tls and tls.client_ca else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca else ssl.CERT_NONE,
        timeout_graceful_shutdown=5,
    )
    server = _Server(config)
    ended = anyio.Event()

    async def serve() -> None:
        try:
            await server.serve([sock])
        finally:
            ended.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            while not server.started:
                if ended.is_set():
                    # uvicorn returns without raising when the app's start-up failed.
                    raise RuntimeError("the server did not start (its log says why)")
                await anyio.sleep(0.02)
            try:
                yield RunningServer(host, bound, "https" if tls else "http")
            finally:
                # Graceful even when the block raised: uvicorn finishes the requests in hand
                # and runs the app's shutdown, instead of being cancelled in the middle.
                server.should_exit = True
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    await ended.wait()
    finally:
        sock.close()
