"""The operators' HTTP server: the API, the web console and ``/metrics`` in one ASGI app.

`create_app` builds the application (`saga.server.app`); `SagaService` is what its routes do
(`saga.server.service`); `open_server` runs it on uvicorn inside an async block
(`saga.server.run`); `saga serve` (`saga.cli.server`) is the command.
"""

from saga.server.app import ConsoleSettings, create_app
from saga.server.auth import Authenticator, Principal, TokenTable, hash_token
from saga.server.run import RunningServer, open_server
from saga.server.service import SagaService

__all__ = [
    "Authenticator",
    "ConsoleSettings",
    "Principal",
    "RunningServer",
    "SagaService",
    "TokenTable",
    "create_app",
    "hash_token",
    "open_server",
]
