"""The ASGI application: the HTTP API (`saga.server.api`), the console (`saga.server.console`)
and ``/metrics`` (`saga.server.metrics`), in one FastAPI app served by uvicorn.

`create_app` builds it around a `saga.server.service.SagaService` (entered and left by the
app's lifespan) and an `saga.server.auth.Authenticator`; `saga serve` (`saga.cli.server`) wires
them from its options and runs the index projector beside it. The OpenAPI document is FastAPI's,
at ``/openapi.json``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from saga.runtime.redaction import Redactor, redactor_from_env
from saga.server import api, console, problems
from saga.server.auth import Authenticator
from saga.server.metrics import ServerMetrics
from saga.server.service import SagaService

__all__ = ["ConsoleSettings", "create_app"]

_HERE = Path(__file__).parent


@dataclass(frozen=True)
class ConsoleSettings:
    """How the console presents what it shows.

    Attributes:
        jaeger_url: Jaeger's query API, for the trace page (``None``: no trace page).
        jaeger_ui: A Jaeger UI to link each trace to (``None``: no link out).
        redactor: Turns an error into the text the console shows for it
            (`saga.runtime.redaction`; ``SAGA_REDACT`` by default).
        poll: Seconds between looks at the index's generation, for live updates.
    """

    jaeger_url: str | None = None
    jaeger_ui: str | None = None
    redactor: Redactor | None = None
    poll: float = 0.25

    def redact(self) -> Redactor:
        """The redactor in use."""
        return self.redactor or redactor_from_env()


def create_app(
    service: SagaService,
    authenticator: Authenticator,
    *,
    settings: ConsoleSettings | None = None,
    metrics: ServerMetrics | None = None,
    on_startup: Callable[[], None] | None = None,
) -> FastAPI:
    """The application.

    Args:
        service: What the routes do; the app's lifespan enters and leaves it.
        authenticator: Who a request comes from.
        settings: The console's settings.
        metrics: The Prometheus exporter for ``/metrics`` (a new one by default).
        on_startup: Called once the service is ready (tests and ``saga serve`` log it).
    """
    settings = settings or ConsoleSettings()
    metrics = metrics or ServerMetrics(service.index)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        del app
        async with service:
            if on_startup is not None:
                on_startup()
            yield

    app = FastAPI(
        title="saga-engine",
        summary="Start, inspect and operate sagas.",
        version="1",
        lifespan=lifespan,
        # Swagger UI and ReDoc load their scripts from a CDN, which an operator's network may
        # not reach: /openapi.json is the document, for any viewer or client generator.
        docs_url=None,
        redoc_url=None,
        openapi_tags=[{"name": "sagas", "description": "Sagas and the requests about them."}],
    )
    app.state.service = service
    app.state.authenticator = authenticator
    app.state.settings = settings
    app.state.metrics = metrics
    problems.install_handlers(app)
    app.include_router(api.router)
    app.include_router(console.router)
    app.add_route("/metrics", metrics.endpoint, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")
    return app
