"""Signed records: what verifies, what does not and why; key files, keyrings, and the `Trust`
a process loads from its environment."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from saga.core.policy import PolicyError
from saga.errors import SagaError, UsageError
from saga.runtime.ports import Outgoing, Record
from saga.runtime.trust import (
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    SIGNER_HEADER,
    UNSIGNED_WARNING,
    Keyring,
    SigningKey,
    Trust,
    TrustError,
    Unauthenticated,
    load_policy,
    new_key,
)

TOPIC = "saga.replies"
KEY = b"saga-1"
VALUE = b'{"type":"reply","saga_id":"saga-1","ok":true}'

POLICY = """
version: 1
coordinators: [coordinator]
services: {payment: [payment]}
rules:
  - {who: [shop], may: [start], sagas: ["*"]}
"""


def received(out: Outgoing, topic: str | None = None) -> Record:
    """What a consumer reads of ``out`` (on ``topic``, if it was copied there)."""
    return Record(topic or out.topic, 0, 7, out.key, out.value, out.headers, 1.0)


def ring_of(*keys: SigningKey) -> Keyring:
    return Keyring([k.public_entry() for k in keys])


def refused(ring: Keyring, record: Record) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as info:
        ring.verify(record)
    assert info.value.reason == "unauthenticated"
    return info.value


# -- signing and verifying -------------------------------------------------------------------------


def test_sign_verify_roundtrip_returns_the_principal() -> None:
    payment = new_key("payment")
    out = payment.sign_outgoing(Outgoing(TOPIC, KEY, VALUE, (("trace", b"t1"),), partition=3))
    assert out.partition == 3
    names = [name for name, _ in out.headers]
    assert names == ["trace", SIGNER_HEADER, KEY_ID_HEADER, SIGNATURE_HEADER]
    assert dict(out.headers)[SIGNER_HEADER] == b"payment"
    assert dict(out.headers)[KEY_ID_HEADER] == payment.key_id.encode()
    assert ring_of(payment).verify(received(out)) == "payment"


def test_sign_returns_the_three_headers_for_none_key_and_value() -> None:
    k = new_key("coordinator")
    headers = k.sign("saga.log", None, None)
    assert [n for n, _ in headers] == [SIGNER_HEADER, KEY_ID_HEADER, SIGNATURE_HEADER]
    ring = ring_of(k)
    assert ring.verify(Record("saga.log", 0, 0, None, None, headers)) == "coordinator"
    # None and empty bytes are different records
    refused(ring, Record("saga.log", 0, 0, b"", None, headers))
    refused(ring, Record("saga.log", 0, 0, None, b"", headers))


def test_unsigned_headers_may_change_but_nothing_signed_may() -> None:
    k = new_key("payment")
    ring = ring_of(k)
    record = received(k.sign_outgoing(Outgoing(TOPIC, KEY, VALUE, (("trace", b"a"),))))
    other_trace = dataclasses.replace(record, headers=(("trace", b"b"), *record.headers[1:]))
    assert ring.verify(other_trace) == "payment"
    assert ring.verify(dataclasses.replace(record, partition=5, offset=99)) == "payment"
    for tampered, what in (
        (dataclasses.replace(record, value=VALUE.replace(b"true", b"fals")), "value"),
        (dataclasses.replace(record, key=b"saga-2"), "key"),
        (dataclasses.replace(record, topic="saga.requests"), "topic"),
        (dataclasses.replace(record, topic="other.replies"), "prefix"),
    ):
        exc = refused(ring, tampered)
        assert exc.detail == "bad_signature", what
        assert str(exc) == f"bad signature (key {k.key_id!r} of 'payment')"


def test_resigning_replaces_the_signature_headers() -> None:
    a, b = new_key("payment"), new_key("shop")
    once = a.sign_outgoing(Outgoing(TOPIC, KEY, VALUE, (("x", b"1"),)))
    twice = b.sign_outgoing(once)
    assert [n for n, _ in twice.headers].count(SIGNATURE_HEADER) == 1
    assert twice.headers[0] == ("x", b"1")
    assert ring_of(a, b).verify(received(twice)) == "shop"


def test_unsigned_record() -> None:
    exc = refused(ring_of(new_key("payment")), Record(TOPIC, 0, 0, KEY, VALUE, (("x", b"1"),)))
    assert (exc.detail, str(exc)) == ("unsigned", "unsigned")


def test_unknown_key_id() -> None:
    stranger = new_key("payment", "k9")
    record = received(stranger.sign_outgoing(Outgoing(TOPIC, KEY, VALUE)))
    exc = refused(ring_of(new_key("payment", "k1")), record)
    assert (exc.detail, str(exc)) == ("unknown_key", "unknown key id 'k9'")


def test_signer_header_that_names_another_principal() -> None:
    payment = new_key("payment", "k1")
    out = payment.sign_outgoing(Outgoing(TOPIC, KEY, VALUE))
    lying = tuple((n, b"coordinator" if n == SIGNER_HEADER else v) for n, v in out.headers)
    exc = refused(ring_of(payment), received(dataclasses.replace(out, headers=lying)))
    assert exc.detail == "wrong_signer"
    assert str(exc) == "signer header says 'coordinator' but key 'k1' belongs to 'payment'"


def test_a_key_cannot_sign_for_a_key_id_it_is_not() -> None:
    # A participant's key signing under the coordinator's key id and name.
    coordinator, payment = new_key("coordinator", "c1"), new_key("payment", "p1")
    forged_key = SigningKey("coordinator", "c1", payment.private_key)
    record = received(forged_key.sign_outgoing(Outgoing("saga.commands.rider", KEY, VALUE)))
    exc = refused(ring_of(coordinator, payment), record)
    assert exc.detail == "bad_signature"


def test_malformed_signatures() -> None:
    k = new_key("payment", "k1")
    ring = ring_of(k)
    good = received(k.sign_outgoing(Outgoing(TOPIC, KEY, VALUE)))
    missing = dataclasses.replace(good, headers=good.headers[:2])
    exc = refused(ring, missing)
    assert (exc.detail, str(exc)) == ("malformed", "incomplete signature: no saga-signature")
    doubled = dataclasses.replace(good, headers=(*good.headers, good.headers[2]))
    assert refused(ring, doubled).detail == "malformed"
    for bad in (b"not base64!", b"AAAA", b""):
        headers = (*good.headers[:2], (SIGNATURE_HEADER, bad))
        assert refused(ring, dataclasses.replace(good, headers=headers)).detail == "bad_signature"


def test_rotation_two_keys_of_one_principal() -> None:
    old, new = new_key("payment", "payment-old"), new_key("payment", "payment-new")
    ring = ring_of(old, new)
    assert ring.principals() == {"payment"}
    from_old = received(old.sign_outgoing(Outgoing(TOPIC, KEY, VALUE)))
    from_new = received(new.sign_outgoing(Outgoing(TOPIC, KEY, VALUE)))
    assert ring.verify(from_old) == ring.verify(from_new) == "payment"
    drained = ring.without_key("payment-old")
    assert drained.verify(from_new) == "payment"
    assert refused(drained, from_old).detail == "unknown_key"
    assert len(ring) == 2
    assert len(drained) == 1


def test_errors_are_saga_errors() -> None:
    assert issubclass(Unauthenticated, SagaError)
    assert issubclass(TrustError, SagaError)


def test_new_key_ids_and_names() -> None:
    a, b = new_key("payment"), new_key("payment")
    assert a.key_id.startswith("payment-20")
    assert a.key_id != b.key_id
    assert new_key("payment", "mine").key_id == "mine"
    with pytest.raises(UsageError):
        new_key("../etc")
    with pytest.raises(UsageError):
        new_key("ok", "bad id")
    assert "private" not in repr(a)


# -- files -----------------------------------------------------------------------------------------


def test_key_file_roundtrip_is_written_0600(tmp_path: Path) -> None:
    k = new_key("payment")
    path = tmp_path / "payment.key"
    k.save(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    loaded = SigningKey.load(path)
    assert (loaded.principal, loaded.key_id) == (k.principal, k.key_id)
    record = received(loaded.sign_outgoing(Outgoing(TOPIC, KEY, VALUE)))
    assert ring_of(k).verify(record) == "payment"
    with pytest.raises(TrustError, match="exists already"):
        k.save(path)
    os.chmod(path, 0o644)
    new_key("payment").save(path, overwrite=True)
    assert (path.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_key_file_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "payment.key"
    new_key("payment").save(path)
    os.chmod(path, mode)
    with pytest.raises(TrustError) as info:
        SigningKey.load(path)
    assert f"(mode {mode:04o})" in str(info.value)
    assert f"run `chmod 600 {path}`" in str(info.value)


def test_bad_key_files(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="no key file"):
        SigningKey.load(tmp_path / "missing.key")
    path = tmp_path / "x.key"
    for text in (b"{}", b"nonsense", b'{"saga_signing_key": 1, "algorithm": "ed25519"}'):
        path.write_bytes(text)
        os.chmod(path, 0o600)
        with pytest.raises(TrustError, match="is not a usable saga signing key"):
            SigningKey.load(path)


def test_keyring_file_roundtrip_keeps_other_entries(tmp_path: Path) -> None:
    a, b, c = new_key("coordinator"), new_key("payment"), new_key("payment")
    path = tmp_path / "keyring.yaml"
    ring_of(a, b).save(path)
    loaded = Keyring.load(path)
    assert [e.key_id for e in loaded.entries()] == [a.key_id, b.key_id]
    loaded.with_key(c.public_entry()).save(path)
    again = Keyring.load(path)
    assert {e.key_id for e in again.entries()} == {a.key_id, b.key_id, c.key_id}
    assert again.principals() == {"coordinator", "payment"}
    record = received(b.sign_outgoing(Outgoing(TOPIC, KEY, VALUE)))
    assert again.verify(record) == "payment"
    assert again.with_key(b.public_entry()) is again  # the same entry again: no change
    with pytest.raises(UsageError, match="another key"):
        again.with_key(dataclasses.replace(c.public_entry(), key_id=a.key_id))
    with pytest.raises(UsageError, match="no key id 'nope'"):
        again.without_key("nope")


def test_bad_keyrings_list_every_bad_entry(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="no keyring file"):
        Keyring.load(tmp_path / "none.yaml")
    text = (
        "version: 1\nkeys:\n"
        "  k1: {principal: payment, public_key: AAAA}\n"
        "  k2: {principal: 'a b', public_key: AAAA}\n"
        "  k3: {principal: shop}\n"
    )
    with pytest.raises(TrustError) as info:
        Keyring.parse(text, "ring.yaml")
    message = str(info.value)
    assert message.startswith("keyring ring.yaml is invalid:")
    assert "key 'k1': public_key has 3 bytes, an Ed25519 key has 32" in message
    assert "key 'k2': principal 'a b' is not a valid name" in message
    assert "key 'k3': expected exactly principal and public_key" in message
    with pytest.raises(TrustError, match="version 2"):
        Keyring.parse("version: 2\nkeys: {}\n")
    assert len(Keyring.parse("")) == 0


# -- Trust -----------------------------------------------------------------------------------------


def files(tmp_path: Path) -> dict[str, str]:
    """A coordinator's key, a keyring with every principal of `POLICY`, and the policy."""
    coordinator = new_key("coordinator", "coord-1")
    coordinator.save(tmp_path / "coordinator.key")
    ring = ring_of(coordinator, new_key("payment"), new_key("shop"))
    ring.save(tmp_path / "keyring.yaml")
    (tmp_path / "policy.yaml").write_text(POLICY)
    return {
        "SAGA_SIGNING_KEY": str(tmp_path / "coordinator.key"),
        "SAGA_KEYRING": str(tmp_path / "keyring.yaml"),
        "SAGA_POLICY": str(tmp_path / "policy.yaml"),
    }


def test_from_env_loads_and_checks_the_three_files(tmp_path: Path) -> None:
    trust = Trust.from_env(files(tmp_path))
    assert trust.is_signed
    assert trust.signer is not None
    assert trust.signer.principal == "coordinator"
    assert trust.keyring is not None
    assert trust.keyring.principals() == {
        "coordinator",
        "payment",
        "shop",
    }
    assert trust.policy is not None
    assert trust.policy.is_coordinator("coordinator")
    assert trust.max_request_age == 86_400
    trust.check_role("coordinator")
    described = trust.describe()
    assert "signing as 'coordinator' (key 'coord-1')" in described
    assert "3 keys of 3 principals" in described
    with pytest.raises(TrustError, match="does not list in `coordinators`"):
        dataclasses.replace(trust, signer=new_key("payment")).check_role("coordinator")
    with pytest.raises(TrustError, match=r"not list under services\.payment"):
        trust.check_role("participant", "payment")


def test_unsigned_is_explicit(tmp_path: Path) -> None:
    trust = Trust.from_env({"SAGA_UNSIGNED": "1"})
    assert not trust.is_signed
    assert trust == Trust.unsigned()
    assert trust.describe().startswith("unsigned")
    assert trust.stale(0.0, 1e12) is None
    trust.check_role("coordinator")
    assert "UNSIGNED" in UNSIGNED_WARNING
    assert "SAGA_SIGNING_KEY" in UNSIGNED_WARNING
    with pytest.raises(TrustError) as info:
        Trust.from_env({})
    assert "SAGA_SIGNING_KEY" in str(info.value)
    assert "SAGA_UNSIGNED=1" in str(info.value)
    with pytest.raises(TrustError) as both:
        Trust.from_env({**files(tmp_path), "SAGA_UNSIGNED": "1"})
    assert "SAGA_UNSIGNED is set together with SAGA_SIGNING_KEY, SAGA_KEYRING, SAGA_POLICY" in (
        str(both.value)
    )
    with pytest.raises(TrustError, match="SAGA_UNSIGNED='maybe'"):
        Trust.from_env({"SAGA_UNSIGNED": "maybe"})


def test_from_env_missing_file_names_the_setting(tmp_path: Path) -> None:
    env = files(tmp_path)
    for name in ("SAGA_SIGNING_KEY", "SAGA_KEYRING", "SAGA_POLICY"):
        with pytest.raises(TrustError) as info:
            Trust.from_env({**env, name: str(tmp_path / "missing")})
        assert str(info.value).startswith(f"{name}: no ")


def test_from_env_refuses_a_readable_key_file(tmp_path: Path) -> None:
    env = files(tmp_path)
    os.chmod(env["SAGA_SIGNING_KEY"], 0o644)
    with pytest.raises(TrustError) as info:
        Trust.from_env(env)
    assert str(info.value).startswith("SAGA_SIGNING_KEY: key file")
    assert "chmod 600" in str(info.value)


def test_from_env_refuses_a_key_the_keyring_does_not_have(tmp_path: Path) -> None:
    env = files(tmp_path)
    new_key("coordinator", "coord-2").save(tmp_path / "other.key")
    with pytest.raises(TrustError) as info:
        Trust.from_env({**env, "SAGA_SIGNING_KEY": str(tmp_path / "other.key")})
    assert "key 'coord-2' of 'coordinator' is not in the keyring" in str(info.value)


def test_from_env_refuses_a_keyring_entry_that_does_not_match_the_key(tmp_path: Path) -> None:
    env = files(tmp_path)
    ring = Keyring.load(env["SAGA_KEYRING"]).without_key("coord-1")
    ring.with_key(new_key("coordinator", "coord-1").public_entry()).save(env["SAGA_KEYRING"])
    with pytest.raises(TrustError, match="does not match the private key"):
        Trust.from_env(env)
    ring.with_key(new_key("shop", "coord-1").public_entry()).save(env["SAGA_KEYRING"])
    with pytest.raises(TrustError, match="gives that key id to 'shop'"):
        Trust.from_env(env)


def test_from_env_checks_the_policy_against_the_keyring(tmp_path: Path) -> None:
    env = files(tmp_path)
    Keyring.load(env["SAGA_KEYRING"]).without_key(
        next(e.key_id for e in Keyring.load(env["SAGA_KEYRING"]).entries() if e.principal == "shop")
    ).save(env["SAGA_KEYRING"])
    with pytest.raises(PolicyError) as info:
        Trust.from_env(env)
    assert "(SAGA_POLICY)" in str(info.value)
    assert info.value.problems[0].startswith("rule 1: principal 'shop' has no key")
    (tmp_path / "policy.yaml").write_text("version: 1\ncoordinators: [coordinator]\nbad: 1\n")
    with pytest.raises(PolicyError, match="unknown key 'bad'"):
        Trust.from_env(env)


def test_max_request_age(tmp_path: Path) -> None:
    env = files(tmp_path)
    trust = Trust.from_env({**env, "SAGA_MAX_REQUEST_AGE": "60"})
    assert trust.max_request_age == 60
    now = 1_700_000_000.0
    assert trust.stale(now - 59, now) is None
    assert trust.stale(now + 299, now) is None
    too_old = trust.stale(now - 61, now)
    assert too_old is not None
    assert "made 61 s ago" in too_old
    too_new = trust.stale(now + 301, now)
    assert too_new is not None
    assert "301 s ahead" in too_new
    with pytest.raises(TrustError, match="SAGA_MAX_REQUEST_AGE='-1'"):
        Trust.from_env({**env, "SAGA_MAX_REQUEST_AGE": "-1"})


def test_a_client_needs_only_its_key(tmp_path: Path) -> None:
    shop = new_key("shop")
    shop.save(tmp_path / "shop.key")
    trust = Trust.from_env({"SAGA_SIGNING_KEY": str(tmp_path / "shop.key")})
    trust.check_role("client")
    with pytest.raises(TrustError, match="a participant needs SAGA_KEYRING, SAGA_POLICY"):
        trust.check_role("participant", "payment")


def test_signed_checks_its_pieces_and_load_policy_reads_a_file(tmp_path: Path) -> None:
    a = new_key("coordinator")
    with pytest.raises(TrustError, match="is not in the keyring"):
        Trust.signed(a, Keyring())
    (tmp_path / "p.yaml").write_text(POLICY)
    policy = load_policy(tmp_path / "p.yaml")
    with pytest.raises(PolicyError, match="principal 'payment' has no key"):
        Trust.signed(a, ring_of(a), policy)
    trust = Trust.signed(a, ring_of(a, new_key("payment"), new_key("shop")), policy)
    assert trust.is_signed
    with pytest.raises(UsageError):
        Trust("signed")
    with pytest.raises(TrustError, match="no policy file"):
        load_policy(tmp_path / "none.yaml")
