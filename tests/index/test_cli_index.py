"""``saga index`` and the index behind ``saga list`` and ``status``, on the real broker.

The sagas run in this process (a coordinator and the sample services); the CLI runs in a worker
thread (it calls `anyio.run` itself), and ``saga index serve`` as a process of its own, as a
user would run it beside the other commands.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import anyio
import orjson
import pytest

from saga.adapters.kafka import KafkaTransport
from saga.cli import main
from tests.index.support import engine, run_orders

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]


async def cli(
    capsys: pytest.CaptureFixture[str], bootstrap: str, prefix: str, *args: str
) -> tuple[int, str, str]:
    """Runs ``saga ARGS`` against the broker and prefix: exit status, stdout, stderr."""
    capsys.readouterr()
    argv = [*args, "--prefix", prefix, "--bootstrap-servers", bootstrap]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code = await anyio.to_thread.run_sync(main, argv)
    finally:
        root.handlers[:] = handlers  # `main` configures the root logger: give pytest's back
        root.setLevel(level)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_rebuild_status_and_list_from_the_index(
    bootstrap: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SAGA_INDEX", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./saga-index.sqlite3 unless a test makes one
    prefix = f"index-cli-{uuid.uuid4().hex[:8]}"
    db = str(tmp_path / "index.sqlite3")
    transport = KafkaTransport(bootstrap, deadline=20)
    async with engine(transport, prefix) as coordinator:
        ok, refused, plain = await run_orders(coordinator, prefix, ["ok", "refused", "plain"])

    async def saga(*args: str) -> tuple[int, str, str]:
        return await cli(capsys, bootstrap, prefix, *args)

    code, out, err = await saga("index", "rebuild", "--db", db, "--json")
    assert code == 0, err
    report = orjson.loads(out)
    assert report["sagas"] == 3
    assert report["by_status"] == {"compensated": 1, "completed": 2}
    assert report["bad_records"] == 0
    assert report["sagas_per_second"] > 0
    code, out, _ = await saga("index", "rebuild", "--db", db)
    assert code == 0
    assert "sagas     3  (1 compensated, 2 completed)" in out
    assert "sagas/s" in out

    code, out, _ = await saga("index", "status", "--db", db, "--json")
    assert code == 0
    status = orjson.loads(out)
    assert status["behind_total"] == 0
    assert status["sagas"] == 3
    assert status["looked_at"] is not None
    code, out, _ = await saga("index", "status", "--db", db)
    assert "lag       0 log records behind" in out

    # Fresh: list and status answer from the index, and say so; the answer is the scan's.
    scans = {}
    for args in (
        ["list"],
        ["list", "--input", "customer=c-1"],
        ["list", "--status", "compensated"],
    ):
        code, scanned, err = await saga(*args, "--json", "--no-index")
        assert code == 0
        assert err == ""
        scans[tuple(args)] = orjson.loads(scanned)
        code, indexed, err = await saga(*args, "--json", "--index", db)
        assert code == 0
        assert f"answered from the index {db}" in err
        assert orjson.loads(indexed) == scans[tuple(args)]
    assert {r["saga_id"] for r in scans[("list", "--input", "customer=c-1")]} == {ok, plain}
    assert [r["saga_id"] for r in scans[("list", "--status", "compensated")]] == [refused]
    assert len(scans[("list",)]) == 3

    code, indexed, err = await saga("status", ok, "--json", "--index", db)
    assert code == 0
    assert "answered from the index" in err
    code, scanned, _ = await saga("status", ok, "--json", "--no-index")
    assert orjson.loads(indexed) == orjson.loads(scanned)

    # $SAGA_INDEX finds it too; stale, it is not used, and the message says why.
    monkeypatch.setenv("SAGA_INDEX", db)
    monkeypatch.setenv("SAGA_INDEX_MAX_AGE", "0")
    code, out, err = await saga("list", "--json")
    assert code == 0
    assert f"index {db} not used (last looked at the log" in err
    assert orjson.loads(out) == scans[("list",)]
    monkeypatch.delenv("SAGA_INDEX_MAX_AGE")
    code, out, err = await saga("list", "--json", "--index", str(tmp_path / "missing.sqlite3"))
    assert code == 0
    assert "not used (no saga index at" in err
    assert orjson.loads(out) == scans[("list",)]
    code, _, err = await saga("list", "--input", "oops")
    assert code == 1
    assert "expected KEY=JSON" in err


async def test_index_serve_keeps_it_live_for_other_processes(
    bootstrap: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SAGA_INDEX", raising=False)
    prefix = f"index-serve-{uuid.uuid4().hex[:8]}"
    db = tmp_path / "index.sqlite3"
    transport = KafkaTransport(bootstrap, deadline=20)
    async with engine(transport, prefix) as coordinator:
        (first,) = await run_orders(coordinator, prefix, ["plain"])
        serve = await anyio.open_process(
            [
                sys.executable,
                "-m",
                "saga",
                "index",
                "serve",
                "--db",
                str(db),
                "--prefix",
                prefix,
                "--bootstrap-servers",
                bootstrap,
                "--interval",
                "0.1",
            ],
            cwd=ROOT,
            env={**os.environ, "SAGA_LOG_LEVEL": "warning"},
            stdout=subprocess.DEVNULL,
        )
        try:
            (later,) = await run_orders(coordinator, prefix, ["refused"])
            with anyio.fail_after(60):
                while True:
                    code, out, err = await cli(
                        capsys, bootstrap, prefix, "status", later, "--json", "--index", str(db)
                    )
                    if "answered from the index" in err and orjson.loads(out)["status"] == (
                        "compensated"
                    ):
                        break
                    await anyio.sleep(0.2)
            code, out, err = await cli(
                capsys, bootstrap, prefix, "list", "--json", "--index", str(db)
            )
            assert "answered from the index" in err
            assert {r["saga_id"] for r in orjson.loads(out)} == {first, later}
            # One writer: a rebuild while the projector runs is refused, and says why.
            code, _, err = await cli(capsys, bootstrap, prefix, "index", "rebuild", "--db", str(db))
            assert code == 1
            assert "being written by another process" in err
        finally:
            serve.send_signal(signal.SIGINT)
            with anyio.move_on_after(30):
                await serve.wait()
            if serve.returncode is None:
                serve.kill()
                await serve.wait()
    assert serve.stderr is not None
    errors = ""
    with anyio.move_on_after(5):
        async for chunk in serve.stderr:
            errors += chunk.decode()
    assert "caught up" in errors
    assert "Traceback" not in errors
