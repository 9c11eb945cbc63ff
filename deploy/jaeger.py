"""Jaeger v2 on loopback, built from the Go module proxy, with in-memory storage.

`build` compiles `cmd/jaeger` (the OpenTelemetry-collector-based Jaeger v2 binary) into
`<cache>/jaeger/<module version>/jaeger`. It links to a temporary name and renames, so a build
interrupted half-way never leaves a binary that looks usable. `start_jaeger` writes a collector
configuration that binds every listener to 127.0.0.1 (OTLP gRPC and HTTP, query HTTP and gRPC)
and enables nothing else (no health check, remote sampling, zpages, pprof, expvar or metrics
endpoint), starts the binary and waits until the query API and the OTLP ports answer.

Command line (used by `make jaeger-up` / `make jaeger-down`):

    python -m deploy.jaeger build
    python -m deploy.jaeger up [--otlp-grpc-port 4317] [--otlp-http-port 4318]
                               [--query-port 16686] [--query-grpc-port 16685]
    python -m deploy.jaeger down
    python -m deploy.jaeger status
"""

from __future__ import annotations

import json
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from deploy._go import build_go_program
from deploy._proc import LOOPBACK, cache_dir, port_accepts
from deploy._server import LocalServer, ServerCli, UpOption, launch

__all__ = [
    "JAEGER_MODULE",
    "JAEGER_MODULE_VERSION",
    "JaegerServer",
    "binary_path",
    "build",
    "main",
    "start_jaeger",
]

JAEGER_MODULE = "github.com/jaegertracing/jaeger"
"""The Go module holding `cmd/jaeger`."""

JAEGER_MODULE_VERSION = "v1.76.0"
"""The module version built: the v1 tag that marks the same commit as Jaeger v2.13.0.

Jaeger v2 releases are tagged twice (v2.x.y and v1.(x+63).y); the module path has no /v2
suffix, so the Go module proxy serves them under the v1 tags. The design asked for the v2.20.0
commit, but the proxy this project can reach answers 403 for it and serves only v1.42.0,
v1.61.0, v1.62.0 and v1.76.0, of which v1.76.0 (= v2.13.0) is the newest holding `cmd/jaeger`.
"""

_logger = logging.getLogger("deploy.jaeger")


def binary_path() -> Path:
    """Returns where `build` puts the Jaeger binary."""
    return cache_dir() / "jaeger" / JAEGER_MODULE_VERSION / "jaeger"


def build() -> Path:
    """Builds the Jaeger binary into the cache unless it is already there.

    Returns:
        The path of the executable.

    Raises:
        ToolMissingError: `go` is not on PATH (only checked when building).
        FetchError: Downloading the module or building it failed.
    """
    return build_go_program(
        JAEGER_MODULE, JAEGER_MODULE_VERSION, "./cmd/jaeger", binary_path(), "Jaeger"
    )


def _config(
    *, otlp_grpc_port: int, otlp_http_port: int, query_port: int, query_grpc_port: int
) -> dict[str, object]:
    store = "memstore"
    return {
        "service": {
            "extensions": ["jaeger_storage", "jaeger_query"],
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["batch"],
                    "exporters": ["jaeger_storage_exporter"],
                }
            },
            "telemetry": {
                "resource": {"service.name": "jaeger"},
                # The collector otherwise serves its own metrics on 0.0.0.0:8888.
                "metrics": {"level": "none"},
                "logs": {"level": "info"},
            },
        },
        "extensions": {
            "jaeger_storage": {"backends": {store: {"memory": {"max_traces": 100000}}}},
            "jaeger_query": {
                "storage": {"traces": store},
                # On by default: the query service would export its own spans over OTLP/gRPC to
                # localhost:4317, i.e. into whichever Jaeger holds that port (the demo's), and
                # it blocks shutdown for 10 s when nothing listens there.
                "enable_tracing": False,
                "http": {"endpoint": f"{LOOPBACK}:{query_port}"},
                "grpc": {"endpoint": f"{LOOPBACK}:{query_grpc_port}"},
            },
        },
        "receivers": {
            "otlp": {
                "protocols": {
                    "grpc": {"endpoint": f"{LOOPBACK}:{otlp_grpc_port}"},
                    "http": {"endpoint": f"{LOOPBACK}:{otlp_http_port}"},
                }
            }
        },
        # A short timeout so spans reach storage quickly; tests poll for them.
        "processors": {"batch": {"timeout": "200ms"}},
        "exporters": {"jaeger_storage_exporter": {"trace_storage": store}},
    }


def _query_answers(query_port: int) -> bool:
    url = f"http://{LOOPBACK}:{query_port}/api/services"
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            body = json.loads(response.read())
    except (OSError, ValueError):  # URLError and HTTPError are OSErrors.
        return False
    return isinstance(body, dict) and "data" in body


_PORT_ROLES = (
    "Jaeger OTLP/gRPC receiver",
    "Jaeger OTLP/HTTP receiver",
    "Jaeger query HTTP API",
    "Jaeger query gRPC API",
)


class JaegerServer(LocalServer):
    """A running (or stopped) Jaeger with in-memory storage.

    Use it as a context manager: leaving the block stops Jaeger and, if `start_jaeger` created
    the working directory, removes it. Stored traces live in memory and die with the process.
    """

    TITLE = "Jaeger"
    LOG_NAME = "jaeger.log"
    STOP_GRACE = 10.0

    def __init__(
        self,
        *,
        otlp_grpc_port: int,
        otlp_http_port: int,
        query_port: int,
        query_grpc_port: int,
        work_dir: Path,
        owns_work_dir: bool,
        ready_timeout: float,
    ) -> None:
        """Describes a Jaeger instance; `start_jaeger` creates and starts it.

        Args:
            otlp_grpc_port: The OTLP/gRPC receiver port.
            otlp_http_port: The OTLP/HTTP receiver port.
            query_port: The query API and UI port.
            query_grpc_port: The query gRPC API port.
            work_dir: Holds config.yaml and jaeger.log.
            owns_work_dir: Whether leaving the context manager removes `work_dir`.
            ready_timeout: Seconds each start may take before `StartError`.
        """
        super().__init__(
            directory=work_dir, owns_directory=owns_work_dir, ready_timeout=ready_timeout
        )
        self.otlp_grpc_port = otlp_grpc_port
        self.otlp_http_port = otlp_http_port
        self.query_port = query_port
        self.query_grpc_port = query_grpc_port

    @property
    def work_dir(self) -> Path:
        """Holds config.yaml and jaeger.log."""
        return self.directory

    @property
    def otlp_http_endpoint(self) -> str:
        """The OTLP/HTTP base URL, e.g. "http://127.0.0.1:4318" (exporters add /v1/traces)."""
        return f"http://{LOOPBACK}:{self.otlp_http_port}"

    @property
    def otlp_grpc_endpoint(self) -> str:
        """The OTLP/gRPC endpoint, e.g. "http://127.0.0.1:4317" (plaintext)."""
        return f"http://{LOOPBACK}:{self.otlp_grpc_port}"

    @property
    def query_url(self) -> str:
        """The query API and UI base URL, e.g. "http://127.0.0.1:16686"."""
        return f"http://{LOOPBACK}:{self.query_port}"

    @property
    def label(self) -> str:
        """Jaeger and its query URL, for start-up errors."""
        return f"Jaeger (query on {self.query_url})"

    def ports(self) -> dict[str, int]:
        """Returns the OTLP receiver and query ports, keyed by role."""
        ports = (self.otlp_grpc_port, self.otlp_http_port, self.query_port, self.query_grpc_port)
        return dict(zip(_PORT_ROLES, ports, strict=True))

    def ping(self) -> bool:
        """Tells whether the query API answers and both OTLP ports accept connections."""
        return (
            _query_answers(self.query_port)
            and port_accepts(self.otlp_http_port)
            and port_accepts(self.otlp_grpc_port)
        )

    def _prepare(self) -> list[str]:
        binary = build()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = self.work_dir / "config.yaml"
        settings = _config(
            otlp_grpc_port=self.otlp_grpc_port,
            otlp_http_port=self.otlp_http_port,
            query_port=self.query_port,
            query_grpc_port=self.query_grpc_port,
        )
        # JSON is YAML: no YAML library is needed before the virtualenv exists.
        config.write_text("# Written by deploy/jaeger.py on every start.\n" + json.dumps(settings))
        return [str(binary), "--config", f"file:{config}"]

    def __repr__(self) -> str:
        """Shows the endpoints and the pid."""
        pid = self._shown_pid()
        return f"JaegerServer(otlp={self.otlp_http_endpoint}, query={self.query_url}, pid={pid})"


def start_jaeger(
    otlp_grpc_port: int | None = None,
    otlp_http_port: int | None = None,
    query_port: int | None = None,
    *,
    query_grpc_port: int | None = None,
    work_dir: Path | None = None,
    ready_timeout: float = 60.0,
) -> JaegerServer:
    """Starts Jaeger on 127.0.0.1 and waits until its query API and OTLP ports answer.

    Builds Jaeger first if the cache does not hold it (minutes, once).

    Args:
        otlp_grpc_port: The OTLP/gRPC receiver port; a free one when None.
        otlp_http_port: The OTLP/HTTP receiver port; a free one when None.
        query_port: The query API and UI port; a free one when None.
        query_grpc_port: The query gRPC API port; a free one when None.
        work_dir: Where the configuration and log go; a new temporary directory, removed when
            the server is closed, when None.
        ready_timeout: Seconds to wait for Jaeger to answer.

    Returns:
        The running Jaeger.

    Raises:
        PortInUseError: A requested port is taken; nothing was started.
        ToolMissingError: go is missing and the binary is not built yet.
        FetchError: Jaeger could not be built.
        StartError: Jaeger exited or did not answer in time; it has been stopped.
    """
    requested = (otlp_grpc_port, otlp_http_port, query_port, query_grpc_port)
    return launch(
        dict(zip(_PORT_ROLES, requested, strict=True)),
        work_dir,
        "saga-jaeger-",
        lambda ports, directory, owns: JaegerServer(
            otlp_grpc_port=ports[0],
            otlp_http_port=ports[1],
            query_port=ports[2],
            query_grpc_port=ports[3],
            work_dir=directory,
            owns_work_dir=owns,
            ready_timeout=ready_timeout,
        ),
    )


class _Cli(ServerCli[JaegerServer]):
    NAME = "Jaeger"
    EXPECT = "jaeger"
    DESCRIPTION = "Jaeger v2 with memory storage on loopback."
    PREPARE = ("build", "build Jaeger into the cache (once)")
    UP_OPTIONS = (
        UpOption("--otlp-grpc-port", 4317, "default 4317"),
        UpOption("--otlp-http-port", 4318, "default 4318"),
        UpOption("--query-port", 16686, "UI and API, default 16686"),
        UpOption("--query-grpc-port", 16685, "default 16685"),
    )
    DOWN_GRACE = 10.0

    def prepare(self) -> str:
        return f"Jaeger {JAEGER_MODULE_VERSION} binary: {build()}"

    def start(self, ports: Sequence[int], run_dir: Path) -> JaegerServer:
        grpc, http, query, query_grpc = ports
        return start_jaeger(
            grpc, http, query, query_grpc_port=query_grpc, work_dir=run_dir / "work"
        )

    def state(self, server: JaegerServer) -> dict[str, object]:
        return {
            "otlp_http_endpoint": server.otlp_http_endpoint,
            "otlp_grpc_endpoint": server.otlp_grpc_endpoint,
            "query_url": server.query_url,
        }

    def started(self, server: JaegerServer) -> list[str]:
        return [
            f"Jaeger {JAEGER_MODULE_VERSION} is up (pid {server.pid}).",
            f"OTLP: {server.otlp_http_endpoint} (HTTP), {server.otlp_grpc_endpoint} (gRPC)",
            f"Query API: {server.query_url} (no UI: `saga serve` draws the traces)",
            f"Log: {server.log_path}",
        ]

    def where(self, state: Mapping[str, object]) -> str:
        return f"; UI at {state.get('query_url', '?')}"

    def status(self, state: Mapping[str, object]) -> str:
        return (
            f"; OTLP at {state.get('otlp_http_endpoint', '?')}, UI at {state.get('query_url', '?')}"
        )


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code.

    Args:
        argv: The arguments after the program name; `sys.argv[1:]` when None.
    """
    return _Cli().main(argv)


if __name__ == "__main__":
    sys.exit(main())
