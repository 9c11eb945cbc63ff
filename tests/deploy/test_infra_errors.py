"""Failures of the local infrastructure end in one clear message and leave nothing running."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy import PortInUseError, StartError, ToolMissingError
from deploy import jaeger as jaeger_mod
from deploy import kafka as kafka_mod
from deploy._proc import require_tool

REPO = Path(__file__).resolve().parents[2]


def _kafka_pids(marker: str = "") -> set[int]:
    """Kafka JVMs, optionally only those whose command line names ``marker`` (a data dir)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"kafka.Kafka" in cmdline and b"java" in cmdline and marker.encode() in cmdline:
                pids.add(int(entry.name))
    return pids


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port held by a listening socket for the duration of the test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Points the cache at an empty directory so nothing is found already fetched or built."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "saga-engine"


@pytest.fixture
def no_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH holding no java, mvn or go."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def _cli(module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("which", ["port", "controller_port"])
def test_busy_kafka_port_fails_clearly_and_starts_nothing(busy_port: int, which: str) -> None:
    before = _kafka_pids()
    with pytest.raises(PortInUseError, match=rf"port {busy_port} is already in use") as info:
        kafka_mod.start_kafka(**{which: busy_port})  # type: ignore[arg-type]
    assert info.value.port == busy_port
    assert _kafka_pids() <= before


def test_busy_jaeger_port_fails_clearly(busy_port: int) -> None:
    with pytest.raises(PortInUseError, match=rf"OTLP/HTTP.*port {busy_port} is already in use"):
        jaeger_mod.start_jaeger(otlp_http_port=busy_port)


def test_cli_up_on_busy_port_exits_1_with_the_port_named(busy_port: int, empty_cache: Path) -> None:
    done = _cli("deploy.kafka", "up", "--port", str(busy_port), env=dict(os.environ))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: Kafka broker cannot listen on 127.0.0.1:{busy_port}: port {busy_port} is "
        "already in use by another process. Stop that process or choose another port."
    ]


def test_missing_java_is_one_clear_message(no_tools: None) -> None:
    # Whether or not the jars are cached, java is the first tool looked for.
    with pytest.raises(ToolMissingError, match=r"`java` was not found on PATH\. Install a JDK"):
        kafka_mod.start_kafka()


def test_cli_without_java_prints_one_line_and_exits_1(empty_cache: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PATH=str(tmp_path))  # sys.executable is absolute; PATH is not needed.
    done = _cli("deploy.kafka", "fetch", env=env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: `java` was not found on PATH.")
    assert "Traceback" not in done.stderr


def test_require_tool_names_the_tool_and_the_fix(no_tools: None) -> None:
    with pytest.raises(ToolMissingError) as info:
        require_tool("go", "Install Go from https://go.dev/dl/.")
    assert str(info.value) == "`go` was not found on PATH. Install Go from https://go.dev/dl/."


def test_half_fetched_kafka_is_fetched_again(empty_cache: Path, no_tools: None) -> None:
    home = kafka_mod.kafka_home()
    (home / "libs").mkdir(parents=True)
    (home / "libs" / "kafka-clients-3.9.2.jar").write_bytes(b"truncated")
    # No marker: the copy is incomplete, so fetch must download (and here finds no tools).
    with pytest.raises(ToolMissingError, match="java"):
        kafka_mod.fetch()
    # A marker for another pom is stale too.
    (home / "complete").write_text("0" * 64 + "\n")
    with pytest.raises(ToolMissingError, match="java"):
        kafka_mod.fetch()


def test_complete_kafka_cache_is_reused_without_any_tool(empty_cache: Path, no_tools: None) -> None:
    home = kafka_mod.kafka_home()
    (home / "libs").mkdir(parents=True)
    (home / "complete").write_text(kafka_mod._fingerprint() + "\n")
    assert kafka_mod.fetch() == home / "libs"


def test_jaeger_build_ignores_a_partial_binary(empty_cache: Path, no_tools: None) -> None:
    target = jaeger_mod.binary_path()
    target.parent.mkdir(parents=True)
    (target.parent / "jaeger.partial-12345").write_bytes(b"\x7fELF half")
    with pytest.raises(ToolMissingError, match="`go` was not found"):
        jaeger_mod.build()
    target.write_bytes(b"#!/bin/sh\n")
    target.chmod(0o755)
    assert jaeger_mod.build() == target


def test_broker_crash_during_start_quotes_its_log_and_leaves_nothing(tmp_path: Path) -> None:
    data = tmp_path / "kafka"
    with kafka_mod.start_kafka(data_dir=data):
        pass
    meta = data / "logs" / "meta.properties"
    # A node id that does not match server.properties makes the broker refuse to start.
    meta.write_text(meta.read_text().replace("node.id=1", "node.id=7"))
    with pytest.raises(StartError, match=r"exited with code \d+ during start-up") as info:
        kafka_mod.start_kafka(data_dir=data)
    assert "Last lines of" in str(info.value)
    assert _kafka_pids(str(data)) == set()
