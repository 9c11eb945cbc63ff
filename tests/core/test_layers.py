"""The architecture, enforced: the core is pure, and imports point inward."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SAGA = Path(__file__).resolve().parents[2] / "saga"

# What the pure core may import: no clock, no randomness, no I/O, no event loop.
CORE_ALLOWED = {
    "__future__",
    "collections",
    "dataclasses",
    "datetime",  # reading ISO-8601 times in data (start_at); clock reads are refused below
    "enum",
    "functools",
    "hashlib",
    "json",
    "pathlib",
    "re",
    "typing",
    "pydantic",
    "orjson",
    "yaml",
    "saga",
}
FORBIDDEN_CALLS = (
    "time.time(",
    "time.monotonic(",
    "datetime.now(",
    "datetime.utcnow(",
    ".today(",
    "random.",
    "uuid.",
    "await ",
    "async def",
)


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


CORE_FILES = sorted((SAGA / "core").glob("*.py"))


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_core_imports_only_pure_libraries(path: Path) -> None:
    for name in imports(path):
        top = name.split(".")[0]
        assert top in CORE_ALLOWED, f"{path.name} imports {name}"
        if top == "saga":
            assert name.startswith(("saga.core", "saga.errors")), f"{path.name} imports {name}"


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_core_reads_no_clock_and_makes_no_random_ids(path: Path) -> None:
    source = path.read_text()
    for needle in FORBIDDEN_CALLS:
        assert needle not in source, f"{path.name} contains {needle!r}"


def test_only_the_kafka_adapter_imports_aiokafka() -> None:
    users = {
        p.relative_to(SAGA).as_posix()
        for p in SAGA.rglob("*.py")
        if any(n.split(".")[0] == "aiokafka" for n in imports(p))
    }
    assert users == {"adapters/kafka.py"}


def test_only_the_tracing_adapter_and_the_metrics_endpoint_import_opentelemetry() -> None:
    users = {
        p.relative_to(SAGA).as_posix()
        for p in SAGA.rglob("*.py")
        if any(n.split(".")[0] == "opentelemetry" for n in imports(p))
    }
    # And the console server's /metrics, whose exporter is OpenTelemetry's Prometheus reader.
    assert users == {"adapters/tracing.py", "server/metrics.py"}


def test_runtime_does_not_import_adapters_at_module_level() -> None:
    for path in (SAGA / "runtime").glob("*.py"):
        for name in imports(path):
            assert not name.startswith("saga.adapters"), f"runtime/{path.name} imports {name}"


def test_importing_the_core_loads_no_io_library() -> None:
    # (pydantic imports socket itself, so the check is on the event loop and our I/O libraries.)
    import subprocess

    code = (
        "import sys, saga.core.decide, saga.core.codec, saga.core.graph; "
        "bad = [m for m in ('asyncio', 'anyio', 'aiokafka', 'opentelemetry') "
        "if m in sys.modules]; print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_participant_does_not_import_the_coordinator() -> None:
    # A service process loads the participant only: the coordinator's machinery stays out of it.
    found = imports(SAGA / "runtime" / "participant.py")
    for module in ("saga.runtime.coordinator", "saga.runtime.partition"):
        assert module not in found, f"runtime/participant.py imports {module}"
    code = (
        "import sys, saga.runtime.participant; "
        "bad = [m for m in ('saga.runtime.coordinator', 'saga.runtime.partition') "
        "if m in sys.modules]; print(','.join(bad))"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_trace_context_crosses_the_wire_only_through_the_observer() -> None:
    # The core decides without trace context, and the runtime's coordinator, participant and
    # client neither read nor write a trace header: the observer port does both (observe.py).
    # The contract documents the header; it never reads or writes one.
    allowed = {"adapters/tracing.py", "runtime/traceids.py", "contract/asyncapi.py"}
    users = {
        p.relative_to(SAGA).as_posix()
        for p in SAGA.rglob("*.py")
        if "traceparent" in p.read_text() or "trace_parent" in p.read_text()
    }
    assert users <= allowed, f"trace context handled outside the observer: {users - allowed}"
