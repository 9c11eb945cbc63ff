"""``python -m services.demo`` as ``make demo`` runs it, on the session's broker and Jaeger.

The demo runs as a process with a small batch, its console on a free port. While it runs, the
test uses the console as a person would: the list page and the API find the batch's orders,
and a saga's page and its trace page open. When it has ended: it exited 0, its own check of
the console's index against the log passed, its trace links point at the console's trace page
(no Jaeger UI is configured), and the console was stopped with the rest. Then ``saga status``
on one of the orders prints the console's trace link without a Jaeger UI, and the Jaeger UI's
page with one (``SAGA_JAEGER_UI``).
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from deploy._proc import StartError, free_port, port_accepts
from deploy.jaeger import JaegerServer
from saga.runtime.traceids import trace_id_for
from services.fleet import Fleet

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
COUNT = 8


class Output:
    """The lines a process writes, read in a thread as they come, kept in order."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first line from now on matching ``pattern``.

        Raises:
            AssertionError: The output ended, or the time ran out, first.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r} within {timeout:.0f}s:\n" + self.text()
                ) from None
            if line is None:
                raise AssertionError(f"the output ended without {pattern!r}:\n" + self.text())
            self.lines.append(line)
            if found := re.search(pattern, line):
                return found

    def drain(self, timeout: float) -> None:
        """Reads the rest of the output (until the process closes it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                continue
            if line is None:
                return
            self.lines.append(line)

    def text(self) -> str:
        """Everything read so far."""
        return "\n".join(self.lines)


def get(url: str) -> tuple[int, bytes]:
    """GETs ``url``: status and body."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


def orders_in_console(console: str) -> dict[str, str]:
    """The orders the console's API lists, with their statuses."""
    query = urllib.parse.urlencode({"saga_id_prefix": "order-", "limit": 500})
    _, body = get(f"{console}/api/v1/sagas?{query}")
    page: dict[str, Any] = orjson.loads(body)
    return {s["saga_id"]: s["status"] for s in page["sagas"]}


def demo_env(bootstrap: str, jaeger: JaegerServer) -> dict[str, str]:
    """The environment ``make demo`` gives the demo, on the session's servers, with no Jaeger
    UI and no console address configured."""
    env = dict(os.environ)
    for name in ("SAGA_JAEGER_UI", "SAGA_CONSOLE_URL", "SAGA_CONSOLE_PORT", "SAGA_DEMO_SECURE"):
        env.pop(name, None)
    env.update(
        {
            "SAGA_KAFKA_BOOTSTRAP": bootstrap,
            "OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.otlp_http_endpoint,
            "SAGA_JAEGER_URL": jaeger.query_url,
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def saga_status(env: dict[str, str], saga_id: str, prefix: str, *extra: str) -> str:
    """``python -m saga status`` of one saga (no index): its standard output."""
    argv = [sys.executable, "-m", "saga", "status", saga_id, "--prefix", prefix, "--no-index"]
    done = subprocess.run(
        [*argv, *extra], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_demo_serves_its_console_and_links_traces_to_it(
    bootstrap: str, jaeger: JaegerServer, tmp_path: Path
) -> None:
    port = free_port()
    console = f"http://127.0.0.1:{port}"
    prefix = f"demo-{uuid.uuid4().hex[:8]}"
    env = demo_env(bootstrap, jaeger)
    argv = [sys.executable, "-m", "services.demo", "--count", str(COUNT), "--prefix", prefix]
    argv += ["--data-dir", str(tmp_path / "data"), "--console-port", str(port)]
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out = Output(proc)
    try:
        # Printed before the batch, once the console answers.
        banner = out.wait_for(r"^\s+CONSOLE\s+(\S+)/\s", timeout=300)
        assert banner.group(1) == console
        placed = int(out.wait_for(r"^placed (\d+) orders", timeout=60).group(1))
        assert placed == COUNT

        # A person opens the console while the batch runs: the orders are all there.
        deadline = time.monotonic() + 60
        while len(found := orders_in_console(console)) < COUNT:
            assert time.monotonic() < deadline, f"the console lists only {found}"
            time.sleep(0.5)
        status, page = get(f"{console}/")
        assert status == 200
        listed = [i for i in found if i.encode() in page]
        assert listed, "the list page shows none of the orders"
        one = listed[0]
        quoted = urllib.parse.quote(one, safe="")
        assert get(f"{console}/sagas/{quoted}")[0] == 200
        status, trace_page = get(f"{console}/sagas/{quoted}/trace")
        assert status == 200
        assert one.encode() in trace_page
        status, metrics = get(f"{console}/metrics")
        assert status == 200
        assert b"saga" in metrics

        out.wait_for(r"^all processes stopped", timeout=400)
        assert proc.wait(timeout=60) == 0, out.text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 2)  # SIGINT: the demo stops what it started
            proc.wait(timeout=60)
        out.drain(10)
        assert proc.stdout is not None
        proc.stdout.close()
    text = out.text()
    print(text)  # the demo's output, shown when the test fails

    # Its own check of the console's index against the log, and the console's place in the
    # summary and the next steps.
    assert f"all {COUNT} orders of the batch, each in the state the log shows" in text, text
    assert re.search(rf"^CONSOLE\s+{re.escape(console)}/", text, re.M), text
    assert f"  traces:  {console}/sagas/<saga id>/trace" in text, text
    example = re.search(rf"^\s+{re.escape(console)}/sagas/([^/\s]+)/trace\s+\((\S+)\)$", text, re.M)
    assert example is not None, text
    assert urllib.parse.unquote(example.group(1)) == example.group(2)
    assert "16686" not in text  # no link to the query API's placeholder page
    # Stopped with the rest.
    assert not port_accepts(port)

    # `saga status` links the trace to the console without a Jaeger UI, to the UI with one.
    trace_id = f"{trace_id_for(one):032x}"
    plain = saga_status(env, one, prefix)
    assert f"trace     http://127.0.0.1:8080/sagas/{quoted}/trace" in plain, plain
    there = saga_status({**env, "SAGA_CONSOLE_URL": console}, one, prefix)
    assert f"trace     {console}/sagas/{quoted}/trace" in there, there
    ui = saga_status({**env, "SAGA_JAEGER_UI": "http://jaeger.example:16686/"}, one, prefix)
    assert f"trace     http://jaeger.example:16686/trace/{trace_id}" in ui, ui
    flagged = saga_status(env, one, prefix, "--jaeger-ui", "http://ui.example", "--json")
    assert orjson.loads(flagged)["trace_url"] == f"http://ui.example/trace/{trace_id}"


def test_a_console_that_cannot_start_is_reported_with_its_log(
    bootstrap: str, tmp_path: Path
) -> None:
    """What the demo reports in one line and goes on without: the console's exit, quoted."""
    fleet = Fleet(bootstrap=bootstrap, prefix=f"nocon-{uuid.uuid4().hex[:8]}", data_dir=tmp_path)
    try:
        console = fleet.start_console(free_port(), app="services.no_such_module:sagas")
        with pytest.raises(StartError, match=r"the console exited with code 1") as raised:
            console.wait_answering(timeout=120)
        assert "no_such_module" in str(raised.value)
    finally:
        fleet.stop()
    assert console.process.poll() is not None
