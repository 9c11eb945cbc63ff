"""``saga coordinator`` and ``saga participant`` start without what only other commands or other
settings use: a coordinator restarted after ``kill -9`` is back the sooner (issue 12, B4).

The checks are on the modules a process imports, never on its timings: the parser of the two
commands in a fresh interpreter (``build_parser``, as ``main`` builds it), and the real start
path, ``python -X importtime -m saga coordinator|participant`` on the broker, serving a saga to
its end, whose import log lists every module the process loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process

from saga.cli import FAMILIES, build_parser
from saga.cli.common import PAYLOAD_KEYS_VAR, common_options, sealed

HEAVY = {
    "opentelemetry",
    "fastapi",
    "uvicorn",
    "starlette",
    "jinja2",
    "rich",
    "yaml",
    "cryptography",
    "httpx",
}
"""Libraries that parsing the serving commands must not load (top-level packages)."""

NOT_FOR_SERVING = (
    "saga.contract",
    "saga.index",
    "saga.views",
    "saga.server",
    "saga.cli.render",
    "saga.adapters.sealing",
    *(m for m in FAMILIES if m != "saga.cli.serve"),
)
"""The engine's modules that ``saga coordinator`` and ``saga participant`` have no use for
(without payload keys, for the sealing adapter): what other commands and settings need."""

ENGINE = (
    "saga.core",
    "saga.runtime.coordinator",
    "saga.runtime.participant",
    "saga.adapters.kafka",
    "saga.adapters.tracing",
)
"""What parsing need not load either: the engine itself comes with running."""

_PARSE = """
import contextlib, io, json, sys
from saga.cli import build_parser
argv = sys.argv[1:]
shown = io.StringIO()
with contextlib.redirect_stdout(shown):
    try:
        build_parser(argv).parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 0, exc.code
print(json.dumps({"help": shown.getvalue(), "modules": sorted(sys.modules)}))
"""


def _clean_env() -> dict[str, str]:
    """This environment less the settings that would make a process load more (keys, sealing)."""
    unset = {"SAGA_SIGNING_KEY", "SAGA_KEYRING", "SAGA_POLICY", PAYLOAD_KEYS_VAR}
    return {k: v for k, v in os.environ.items() if k not in unset}


def _under(modules: Iterable[str], prefixes: Iterable[str]) -> list[str]:
    wanted = tuple(prefixes)
    return sorted(m for m in modules if m in wanted or m.startswith(tuple(p + "." for p in wanted)))


@pytest.mark.parametrize("command", ["coordinator", "participant"])
def test_parsing_a_serving_command_loads_no_other_family_and_no_heavy_library(
    command: str,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PARSE, command, "--help"],
        capture_output=True,
        text=True,
        check=True,
        env=_clean_env(),
        timeout=60,
    )
    found = json.loads(done.stdout)
    assert "--instance-id" in found["help"]  # the command's own help was printed
    modules = set(found["modules"])
    assert "saga.cli.serve" in modules
    assert sorted({m.split(".")[0] for m in modules} & HEAVY) == []
    assert _under(modules, NOT_FOR_SERVING) == []
    assert _under(modules, ENGINE) == []
    assert "aiokafka" not in modules


def test_every_family_adds_the_commands_it_is_listed_with() -> None:
    import importlib

    for module, commands in FAMILIES.items():
        top = argparse.ArgumentParser(prog="saga")
        sub = top.add_subparsers(dest="command")
        importlib.import_module(module).add_commands(sub, common_options())
        assert tuple(sub.choices) == commands, module


def test_the_help_of_saga_lists_every_command_in_family_order() -> None:
    top = build_parser([])
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    assert tuple(sub.choices) == tuple(c for cs in FAMILIES.values() for c in cs)
    # A command names its family only: the parser of `saga start` knows no `coordinator`.
    assert (
        tuple(
            next(
                a
                for a in build_parser(["start"])._actions
                if isinstance(a, argparse._SubParsersAction)
            ).choices
        )
        == FAMILIES["saga.cli.sagas"]
    )


def test_importing_saga_loads_its_names_only_when_they_are_used() -> None:
    code = (
        "import json, sys, saga\n"
        "before = sorted(m for m in sys.modules if m.startswith('saga'))\n"
        "import saga.core.definition as d, saga.runtime.coordinator as c\n"
        "same = saga.Step is d.Step and saga.Coordinator is c.Coordinator\n"
        "every = all(getattr(saga, n) is not None for n in saga.__all__)\n"
        "listed = set(saga.__all__) <= set(dir(saga))\n"
        "print(json.dumps([before, same, every, listed]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    before, same, every, listed = json.loads(done.stdout)
    assert before == ["saga", "saga.errors"]
    assert same
    assert every
    assert listed


def test_sealing_is_loaded_only_with_payload_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from saga.adapters import sealing
    from saga.adapters.memory import MemoryBroker, MemoryTransport

    assert PAYLOAD_KEYS_VAR == sealing.ENV_VAR
    inner = MemoryTransport(MemoryBroker())
    args = argparse.Namespace(payload_keys=None)
    for blank in (None, "", "  "):
        if blank is None:
            monkeypatch.delenv(PAYLOAD_KEYS_VAR, raising=False)
        else:
            monkeypatch.setenv(PAYLOAD_KEYS_VAR, blank)
        assert sealed(args, inner) is inner
    keys = tmp_path / "payload.keys"
    sealing.new_data_key_file(keys, None)
    monkeypatch.setenv(PAYLOAD_KEYS_VAR, str(keys))
    assert isinstance(sealed(args, inner), sealing.SealedTransport)
    monkeypatch.delenv(PAYLOAD_KEYS_VAR)
    assert isinstance(
        sealed(argparse.Namespace(payload_keys=str(keys)), inner), sealing.SealedTransport
    )


APP = """
from typing import Any

from saga import Participant, SagaDefinition, Step, StepContext

sagas = [
    SagaDefinition(
        name="hello",
        steps=[Step(name="greet", service="greeter", action="greet", compensation="forget")],
    )
]
greeter = Participant("greeter")


@greeter.handler("greet")
async def greet(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"hello": payload["who"]}


@greeter.handler("forget")
async def forget(payload: dict[str, Any], ctx: StepContext) -> None:
    return None
"""


def _imported(log: str) -> set[str]:
    """The modules ``-X importtime`` says the process imported, from its standard error."""
    found = set()
    for line in log.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                found.add(name)
    return found


async def _until_logged(log: Path, needle: str, seconds: float = 60.0) -> None:
    """Waits until the process's log says ``needle``; fails with what it said instead."""
    for _ in range(int(seconds * 10)):
        if needle in await anyio.Path(log).read_text(errors="replace"):
            return
        await anyio.sleep(0.1)
    text = await anyio.Path(log).read_text(errors="replace")
    said = [x for x in text.splitlines() if not x.startswith("import time:")]
    raise AssertionError(f"{log.name} did not say {needle!r}; it said:\n" + "\n".join(said[-20:]))


@pytest.mark.anyio
@pytest.mark.kafka
@pytest.mark.timeout(180)
async def test_a_coordinator_and_a_participant_serve_a_saga_without_the_other_libraries(
    bootstrap: str, tmp_path: Path
) -> None:
    from saga import SagaClient, SagaStatus
    from saga.adapters.kafka import KafkaTransport

    await anyio.Path(tmp_path / "startup_imports_app.py").write_text(APP)
    prefix = f"startup-{uuid.uuid4().hex[:8]}"
    env = {
        **_clean_env(),
        "PYTHONUNBUFFERED": "1",
        "SAGA_UNSIGNED": "1",
        "OTEL_SDK_DISABLED": "true",
    }
    common = ["--bootstrap-servers", bootstrap, "--prefix", prefix, "--log-level", "info"]
    roles = {
        "coordinator": ["coordinator", "--app", "startup_imports_app:sagas"],
        "participant": ["participant", "--app", "startup_imports_app:greeter"],
    }
    logs = {role: tmp_path / f"{role}.log" for role in roles}
    procs: list[Process] = []
    try:
        for role, argv in roles.items():
            async with await anyio.open_file(logs[role], "w") as err:
                procs.append(
                    await anyio.open_process(
                        [sys.executable, "-X", "importtime", "-m", "saga", *argv, *common],
                        cwd=tmp_path,
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=err.wrapped,
                    )
                )
        await _until_logged(logs["coordinator"], "recovered")
        await _until_logged(logs["participant"], "connected to Kafka")
        async with SagaClient(KafkaTransport(bootstrap), prefix=prefix) as client:
            saga_id = await client.start("hello", {"who": "world"})
            state = await client.wait(saga_id, 90)
        assert state.status is SagaStatus.COMPLETED
        assert state.steps["greet"].output == {"hello": "world"}
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            with anyio.move_on_after(30):
                await p.wait()
            if p.returncode is None:
                p.kill()
                await p.wait()
    for role in roles:
        modules = _imported(await anyio.Path(logs[role]).read_text(errors="replace"))
        assert f"saga.runtime.{role}" in modules, role  # the log is the process's whole import
        unwanted = {"rich", "jinja2", "fastapi", "uvicorn", "starlette", "httpx", "cryptography"}
        unwanted |= {"yaml"}  # no policy file, no YAML app: no YAML parser
        assert sorted({m.split(".")[0] for m in modules} & unwanted) == [], role
        assert _under(modules, NOT_FOR_SERVING) == [], role
