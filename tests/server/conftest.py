"""The server's tests run against the real thing: the broker of the session, a coordinator and
the three services of `tests.server.app` in the test process (tracing to the session's Jaeger),
the SQLite index fed by its projector from the broker, and the application served by uvicorn on
a free 127.0.0.1 port. One stack per test module (they take seconds to start); each test uses
its own saga ids.
"""

from __future__ import annotations

import functools
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from deploy.jaeger import JaegerServer
from saga import Coordinator, SagaState
from saga.adapters.kafka import KafkaTransport
from saga.adapters.tracing import OpenTelemetryObserver
from saga.core.policy import Policy
from saga.index.projector import run_projector
from saga.index.sqlite import SqliteSagaIndex
from saga.runtime.ports import Topics
from saga.runtime.trust import SigningKey, Trust
from saga.server import (
    Authenticator,
    ConsoleSettings,
    SagaService,
    TokenTable,
    create_app,
    hash_token,
)
from saga.server.metrics import ServerMetrics
from saga.server.run import open_server
from tests.server.app import participants, sagas

SCREENSHOTS = Path(__file__).parent / "screenshots"
"""Where the browser tests copy their screenshots, to be looked at after a run."""

TOKENS = {"ann": "ann-secret-token", "bob": "bob-secret-token"}
"""Principal -> bearer token known to the server."""


@dataclass
class Stack:
    """A running server and what is behind it."""

    url: str
    prefix: str
    transport: KafkaTransport
    index: SqliteSagaIndex
    jaeger: JaegerServer
    tokens: Mapping[str, str] = field(default_factory=lambda: dict(TOKENS))

    def http(self, principal: str | None = "bob") -> httpx.AsyncClient:
        """An HTTP client of the server, authenticated as ``principal`` (``None``: not)."""
        headers = {"Authorization": f"Bearer {self.tokens[principal]}"} if principal else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=20)

    async def wait_for(
        self, saga_id: str, status: str, timeout: float = 30, **steps: str
    ) -> SagaState:
        """Polls the index until the saga has ``status`` (and the given step statuses)."""
        with anyio.fail_after(timeout):
            while True:
                row = self.index.get(saga_id)
                if (
                    row is not None
                    and row.state.status.value == status
                    and all(
                        (st := row.state.steps.get(n)) is not None and st.status.value == s
                        for n, s in steps.items()
                    )
                ):
                    return row.state
                await anyio.sleep(0.1)

    async def requests_written(self) -> int:
        """How many records the requests topic holds (all partitions)."""
        topic = Topics(self.prefix).requests
        total = 0
        for p in range(await self.transport.partitions(topic)):
            async for _ in self.transport.read(topic, p):
                total += 1
        return total


def _observer(service: str, jaeger: JaegerServer) -> OpenTelemetryObserver:
    saved = dict(os.environ)
    os.environ.update(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.otlp_http_endpoint,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }
    )
    try:
        return OpenTelemetryObserver.from_env(service)
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's data directory (the index file, the tokens file)."""
    return tmp_path_factory.mktemp("server")


@asynccontextmanager
async def open_stack(
    bootstrap: str,
    jaeger: JaegerServer,
    directory: Path,
    *,
    trusts: Mapping[str, Trust] | None = None,
    signers: Mapping[str, SigningKey] | None = None,
    policy: Policy | None = None,
    tokens: Mapping[str, str] = TOKENS,
) -> AsyncIterator[Stack]:
    """Coordinator, services, index, projector and server until the block ends.

    Args:
        trusts: Each process's trust, by name (``coordinator``, ``stock``, ``bank``,
            ``post``); ``None``: unsigned.
        signers: The server's signing keys by principal (``None``: it sends unsigned).
        policy: The server's copy of the policy (refuses early what it denies).
        tokens: Principal -> bearer token, written to the server's tokens file.
    """
    prefix = f"srv-{uuid.uuid4().hex[:10]}"
    tokens_file = directory / "tokens"
    tokens_file.write_text(
        "".join(f"{hash_token(t)} {p}\n" for p, t in tokens.items()), encoding="utf-8"
    )
    transport = KafkaTransport(bootstrap, deadline=20)
    index = SqliteSagaIndex(directory / "index.sqlite3", prefix=prefix)
    observers = {s: _observer(s, jaeger) for s in ("saga-coordinator", "stock", "bank", "post")}
    trusts = trusts or {}
    coordinator = Coordinator(
        sagas,
        transport=transport,
        prefix=prefix,
        partitions=3,
        observer=observers["saga-coordinator"],
        trust=trusts.get("coordinator"),
    )
    service = SagaService(
        transport,
        index,
        prefix=prefix,
        definitions=sagas,
        partitions=3,
        signers=signers,
        policy=policy,
    )
    metrics = ServerMetrics(index)
    app = create_app(
        service,
        Authenticator(tokens=TokenTable.load(tokens_file)),
        settings=ConsoleSettings(jaeger_url=jaeger.query_url, jaeger_ui="http://jaeger.example"),
        metrics=metrics,
    )
    try:
        async with coordinator, anyio.create_task_group() as tg:
            for p in participants():
                run = functools.partial(
                    p.run,
                    transport,
                    prefix=prefix,
                    partitions=3,
                    observer=observers[p.service],
                    trust=trusts.get(p.service),
                )
                await tg.start(run)
            await tg.start(functools.partial(run_projector, transport, prefix, index, interval=0.1))
            await tg.start(functools.partial(metrics.run, transport, prefix, poll=0.2))
            async with open_server(app) as server:
                yield Stack(server.url, prefix, transport, index, jaeger, dict(tokens))
            tg.cancel_scope.cancel()
    finally:
        for observer in observers.values():
            observer.shutdown()
        metrics.shutdown()
        index.close()


@pytest.fixture(scope="module")
async def stack(bootstrap: str, jaeger: JaegerServer, stack_dir: Path) -> AsyncIterator[Stack]:
    """The module's stack, unsigned (`open_stack`)."""
    async with open_stack(bootstrap, jaeger, stack_dir) as running:
        yield running


@pytest.fixture
def shots(tmp_path: Path) -> Any:
    """Saves a page's screenshot in the test's folder and copies it to `SCREENSHOTS`."""
    SCREENSHOTS.mkdir(exist_ok=True)

    async def take(page: Any, name: str) -> Path:
        path = tmp_path / f"{name}.png"
        await page.screenshot(path=str(path), full_page=True)
        shutil.copy(path, SCREENSHOTS / path.name)
        return path

    return take
