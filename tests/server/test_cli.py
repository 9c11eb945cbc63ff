"""``saga serve`` as a person runs it: a process on the real broker that prints its URL, serves
the console, the API and /metrics, and stops cleanly on SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from saga.server import hash_token

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(90)]


def saga(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saga", *args], capture_output=True, text=True, timeout=60
    )


def test_hash_token_prints_the_tokens_file_line() -> None:
    done = saga("serve", "--hash-token", "s3cret", "alice")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{hash_token('s3cret')} alice"


def test_serve_wants_to_be_told_how_callers_authenticate(bootstrap: str) -> None:
    done = saga("serve", "--bootstrap-servers", bootstrap, "--port", "0")
    assert done.returncode == 1
    assert "--tokens" in done.stderr
    assert "--no-auth" in done.stderr


def test_serve_prints_its_url_serves_and_stops_on_sigterm(bootstrap: str, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{hash_token('tok')} ops\n", encoding="utf-8")
    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "saga",
            "serve",
            "--bootstrap-servers",
            bootstrap,
            "--prefix",
            prefix,
            "--port",
            "0",
            "--tokens",
            str(tokens),
            "--db",
            str(tmp_path / "index.sqlite3"),
            "--app",
            "tests.server.app:sagas",
            "--log-level",
            "error",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        seen: list[str] = []
        found = None
        while found is None and len(seen) < 200:  # log lines may come first
            line = proc.stderr.readline()
            assert line, f"saga serve ended: {seen}"
            seen.append(line)
            found = re.search(r"console and API on (http://127\.0\.0\.1:\d+)/", line)
        assert found, seen
        url = found.group(1)
        auth = {"Authorization": "Bearer tok"}
        with httpx.Client(base_url=url, headers=auth, timeout=20) as http:
            assert http.get("/api/v1/counts").json() == {}
            r = http.post("/api/v1/sagas", json={"name": "shop_order", "input": {"total": 0}})
            assert r.status_code == 422  # checked against the --app definition's model
            r = http.post(
                "/api/v1/sagas", json={"name": "shop_order", "input": {"customer": "c", "total": 1}}
            )
            assert r.status_code == 202
            assert r.json()["by"] == "ops"
            assert "saga_index_lag" in http.get("/metrics").text
            page = http.get("/")
            assert page.status_code == 200
            assert "saga console" in page.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
