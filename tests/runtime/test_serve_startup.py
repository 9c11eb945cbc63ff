"""``saga coordinator`` and ``saga participant`` refuse bad trust settings at start-up, with one
line that names the setting and what to do, before they connect to Kafka or touch a saga; and
a coordinator run without them says loudly that nothing is checked.

The broker address points at a closed port: reaching it would be a failure of its own, so a
message about the settings proves they were checked first.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from saga import Coordinator, SagaDefinition, Step
from saga.adapters.memory import MemoryBroker, MemoryTransport
from saga.cli import main
from saga.runtime.trust import UNSIGNED_WARNING, Keyring, new_key

APP = """
from saga import Participant, SagaDefinition, Step

sagas = [SagaDefinition(
    name="order",
    steps=[Step(name="pay", service="payment", action="charge", compensation="refund")],
)]
payment = Participant("payment")
"""

POLICY = """
version: 1
coordinators: [coordinator]
services: {payment: [payment]}
rules:
  - {who: [shop], may: [start], sagas: [order]}
"""


@pytest.fixture
def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An app module, keys for coordinator, payment and shop, a keyring and a policy."""
    (tmp_path / "startup_app.py").write_text(APP)
    monkeypatch.chdir(tmp_path)
    for name in ("SAGA_SIGNING_KEY", "SAGA_KEYRING", "SAGA_POLICY", "SAGA_UNSIGNED"):
        monkeypatch.delenv(name, raising=False)
    keys = {p: new_key(p) for p in ("coordinator", "payment", "shop")}
    for principal, key in keys.items():
        key.save(tmp_path / f"{principal}.key")
    Keyring(k.public_entry() for k in keys.values()).save(tmp_path / "keyring.yaml")
    (tmp_path / "policy.yaml").write_text(POLICY)
    return tmp_path


def _trusting(setup: Path) -> tuple[str, ...]:
    """The keyring and policy options of the set-up."""
    return ("--keyring", str(setup / "keyring.yaml"), "--policy", str(setup / "policy.yaml"))


def _run(capsys: pytest.CaptureFixture[str], bootstrap: str, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main([*args, "--bootstrap-servers", bootstrap])
    return code, capsys.readouterr().err


def test_a_coordinator_without_keys_must_be_told_to_run_unsigned(
    setup: Path, closed_port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run(capsys, closed_port, "coordinator", "--app", "startup_app:sagas")
    assert code == 1
    assert "message signing is not configured" in err
    assert "--signing-key / $SAGA_SIGNING_KEY" in err
    assert "--unsigned / $SAGA_UNSIGNED=1" in err


def test_a_missing_key_file_is_named(
    setup: Path, closed_port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run(
        capsys,
        closed_port,
        "coordinator",
        "--app",
        "startup_app:sagas",
        "--signing-key",
        str(setup / "nope.key"),
        *_trusting(setup),
    )
    assert code == 1
    assert err.count("\n") == 1
    assert "--signing-key / $SAGA_SIGNING_KEY" in err
    assert "nope.key" in err


def test_a_private_key_readable_by_others_is_refused(
    setup: Path, closed_port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    os.chmod(setup / "coordinator.key", 0o644)
    code, err = _run(
        capsys,
        closed_port,
        "coordinator",
        "--app",
        "startup_app:sagas",
        "--signing-key",
        str(setup / "coordinator.key"),
        *_trusting(setup),
    )
    assert code == 1
    assert "chmod 600" in err


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (POLICY.replace("who: [shop]", "who: [eve]"), "principal 'eve' has no key"),
        (POLICY.replace("may: [start]", "may: [launch]"), "'launch'"),
    ],
    ids=["unknown principal", "unknown action"],
)
def test_a_policy_with_an_unknown_principal_or_action_is_refused(
    setup: Path,
    closed_port: str,
    capsys: pytest.CaptureFixture[str],
    policy: str,
    expected: str,
) -> None:
    (setup / "policy.yaml").write_text(policy)
    code, err = _run(
        capsys,
        closed_port,
        "coordinator",
        "--app",
        "startup_app:sagas",
        "--signing-key",
        str(setup / "coordinator.key"),
        *_trusting(setup),
    )
    assert code == 1
    assert expected in err
    assert "rule 1" in err


def test_a_participant_signing_as_another_service_is_refused(
    setup: Path, closed_port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run(
        capsys,
        closed_port,
        "participant",
        "--app",
        "startup_app:payment",
        "--signing-key",
        str(setup / "shop.key"),
        *_trusting(setup),
    )
    assert code == 1
    assert "'shop'" in err
    assert "services.payment" in err


@pytest.mark.anyio
async def test_an_unsigned_coordinator_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    order = SagaDefinition(
        name="order", steps=[Step(name="pay", service="payment", action="charge", kind="pivot")]
    )
    with caplog.at_level(logging.WARNING, logger="saga.trust"):
        async with Coordinator([order], transport=MemoryTransport(MemoryBroker()), partitions=1):
            pass
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        UNSIGNED_WARNING
    ]
