"""``saga keys new|list|remove`` and ``saga policy check``, end to end in a temporary directory:
the files they write are read back with the library, and every refusal exits 1 with its
message."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from saga.cli import main
from saga.runtime.ports import Outgoing, Record
from saga.runtime.trust import Keyring, SigningKey, Trust

POLICY = """
version: 1
coordinators: [coordinator]
services: {payment: [payment]}
rules:
  - name: shop starts orders
    who: [shop]
    may: [start]
    sagas: [order]
"""

APP = """
from saga import SagaDefinition, Step

ORDER = SagaDefinition(
    name="order",
    steps=[
        Step(name="pay", service="payment", action="charge", compensation="refund"),
        Step(name="ride", service="rider", action="assign", compensation="release",
             depends_on=["pay"]),
    ],
)
"""


def saga(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_keys_new_writes_a_private_key_and_adds_it_to_the_keyring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ring = tmp_path / "keyring.yaml"
    code, out, _ = saga(
        capsys, "keys", "new", "payment", "--out", str(tmp_path), "--keyring", str(ring), "--json"
    )
    assert code == 0
    data = orjson.loads(out)
    key_file = tmp_path / "payment.key"
    assert data["key_file"] == str(key_file)
    assert (key_file.stat().st_mode & 0o777) == 0o600
    key = SigningKey.load(key_file)
    assert (key.principal, key.key_id) == ("payment", data["key_id"])
    assert data["key_id"].startswith("payment-")
    loaded = Keyring.load(ring)
    entry = loaded.get(key.key_id)
    assert entry is not None
    assert entry.principal == "payment"
    assert entry.public_key_b64 == data["public_key"]
    signed = key.sign_outgoing(Outgoing("saga.replies", b"s1", b"{}"))
    record = Record(signed.topic, 0, 0, signed.key, signed.value, signed.headers)
    assert loaded.verify(record) == "payment"


def test_keys_new_keeps_other_entries_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ring = str(tmp_path / "keyring.yaml")
    common = ("--out", str(tmp_path), "--keyring", ring)
    assert saga(capsys, "keys", "new", "coordinator", "--key-id", "c1", *common)[0] == 0
    code, out, _ = saga(capsys, "keys", "new", "shop", "--key-id", "s1", *common)
    assert code == 0
    assert f"wrote {tmp_path / 'shop.key'}" in out
    assert {e.key_id for e in Keyring.load(ring).entries()} == {"c1", "s1"}

    code, _, err = saga(capsys, "keys", "new", "shop", "--key-id", "s2", *common)
    assert code == 1
    assert "exists already" in err
    assert "--force" in err
    assert {e.key_id for e in Keyring.load(ring).entries()} == {"c1", "s1"}  # unchanged

    code, _, err = saga(capsys, "keys", "new", "shop", "--key-id", "c1", *common)
    assert code == 1
    assert "key id 'c1' is in keyring" in err

    # rotation: a new key for shop, the old one kept until removed
    assert saga(capsys, "keys", "new", "shop", "--key-id", "s2", "--force", *common)[0] == 0
    assert SigningKey.load(tmp_path / "shop.key").key_id == "s2"
    assert {e.key_id for e in Keyring.load(ring).entries()} == {"c1", "s1", "s2"}


def test_keys_new_refuses_bad_names_and_directories(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = saga(capsys, "keys", "new", "../evil", "--out", str(tmp_path))
    assert code == 1
    assert "is not a valid principal" in err
    code, _, err = saga(capsys, "keys", "new", "ok", "--out", str(tmp_path / "nowhere"))
    assert code == 1
    assert "no such directory" in err
    assert list(tmp_path.iterdir()) == []


def test_keys_new_without_a_keyring_prints_the_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SAGA_KEYRING", raising=False)
    code, out, _ = saga(capsys, "keys", "new", "alice", "--key-id", "a1", "--out", str(tmp_path))
    assert code == 0
    public = SigningKey.load(tmp_path / "alice.key").public_entry().public_key_b64
    assert f"  a1:\n    principal: alice\n    public_key: {public}\n" in out


def test_keys_list_and_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ring = str(tmp_path / "keyring.yaml")
    for principal, kid in (("payment", "p1"), ("shop", "s1")):
        args = ("keys", "new", principal, "--key-id", kid, "--out", str(tmp_path))
        assert saga(capsys, *args, "--keyring", ring)[0] == 0
    code, out, _ = saga(capsys, "keys", "list", "--keyring", ring)
    assert code == 0
    assert out.splitlines() == ["p1\tpayment", "s1\tshop"]
    code, out, _ = saga(capsys, "keys", "list", "--keyring", ring, "--json")
    keys = orjson.loads(out)["keys"]
    assert [(k["key_id"], k["principal"]) for k in keys] == [("p1", "payment"), ("s1", "shop")]

    code, out, _ = saga(capsys, "keys", "remove", "s1", "--keyring", ring)
    assert code == 0
    assert "removed key 's1' of 'shop'" in out
    assert "'shop' has no key left" in out
    assert [e.key_id for e in Keyring.load(ring).entries()] == ["p1"]

    code, _, err = saga(capsys, "keys", "remove", "s1", "--keyring", ring)
    assert code == 1
    assert "no key id 's1'" in err
    code, _, err = saga(capsys, "keys", "list", "--keyring", str(tmp_path / "none.yaml"))
    assert code == 1
    assert "no keyring file" in err


def keys_for_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str], *principals: str) -> str:
    ring = str(tmp_path / "keyring.yaml")
    for p in principals:
        args = ("keys", "new", p, "--out", str(tmp_path), "--keyring", ring)
        assert saga(capsys, *args)[0] == 0
    return ring


def test_policy_check_against_the_keyring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ring = keys_for_policy(tmp_path, capsys, "coordinator", "payment")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    code, _, err = saga(capsys, "policy", "check", str(policy), "--keyring", ring)
    assert code == 1
    assert f"policy {policy} is invalid" in err
    assert "rule 1 ('shop starts orders'): principal 'shop' has no key in the keyring" in err

    keys_for_policy(tmp_path, capsys, "shop")
    code, out, _ = saga(capsys, "policy", "check", str(policy), "--keyring", ring)
    assert code == 0
    assert "is valid (1 rules)" in out

    policy.write_text(POLICY.replace("may: [start]", "may: [start, restart]"))
    code, _, err = saga(capsys, "policy", "check", str(policy), "--keyring", ring)
    assert code == 1
    assert "rule 1 ('shop starts orders'): unknown action 'restart'" in err


def test_policy_check_against_the_definitions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ring = keys_for_policy(tmp_path, capsys, "coordinator", "payment", "shop")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    (tmp_path / "keys_cli_app.py").write_text(APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ("policy", "check", str(policy), "--keyring", ring, "--app", "keys_cli_app:ORDER")
    code, _, err = saga(capsys, *args)
    assert code == 1
    assert "service 'rider' of the definitions has no principal" in err

    keys_for_policy(tmp_path, capsys, "rider")
    policy.write_text(POLICY.replace("payment: [payment]}", "payment: [payment], rider: [rider]}"))
    code, out, _ = saga(capsys, *args, "--json")
    assert code == 0
    data = orjson.loads(out)
    assert data["ok"] is True
    assert data["checked_against_definitions"] is True

    policy.write_text(
        POLICY.replace("sagas: [order]", "sagas: [odrer]").replace("}", ", rider: [rider]}")
    )
    code, _, err = saga(capsys, *args)
    assert code == 1
    assert "no saga definition named 'odrer' (known: order)" in err


def test_files_written_by_the_cli_load_as_a_trust(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ring = keys_for_policy(tmp_path, capsys, "coordinator", "payment", "shop")
    (tmp_path / "policy.yaml").write_text(POLICY)
    env = {
        "SAGA_SIGNING_KEY": str(tmp_path / "coordinator.key"),
        "SAGA_KEYRING": ring,
        "SAGA_POLICY": str(tmp_path / "policy.yaml"),
    }
    trust = Trust.from_env(env)
    trust.check_role("coordinator")
    assert oct(os.stat(env["SAGA_SIGNING_KEY"]).st_mode & 0o777) == "0o600"
