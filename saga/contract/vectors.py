"""Test vectors for implementers: a signed record and a sealed value, with every byte shown.

Both are computed here with the engine's own code (`saga.runtime.signing.SigningKey`, the AES-GCM
of `saga.adapters.sealing`) from fixed keys, so they are the same on every run: Ed25519 is
deterministic, and the sealed value takes a fixed nonce in place of the random one the codec
draws. An implementation in another language that reproduces them signs and seals as the engine
does; the contract test checks that they still verify and open with the engine's code.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from saga.core.codec import encode
from saga.core.messages import Command
from saga.runtime.signing import SIGNATURE_HEADER, SigningKey

__all__ = ["SIGNING_SEED", "VECTOR_COMMAND", "sealing_vector", "signed_bytes", "signing_vector"]

SIGNING_SEED = bytes(range(32))
"""The test key's 32-byte Ed25519 seed (never a real key)."""

VECTOR_COMMAND = Command(
    message_id="order-1/charge/action/1",
    saga_id="order-1",
    saga_name="order",
    saga_version=1,
    step="charge",
    phase="action",
    service="payment",
    action="charge",
    attempt=1,
    idempotency_key="order-1/charge/action",
    payload={"amount": 12},
    deadline_at=1767225610.0,
    at=1767225600.0,
    budget=10.0,
)
"""The command the signing vector signs."""

_DOMAIN = b"saga-engine/record-signature/v1\x00"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _field(data: bytes | None) -> bytes:
    return b"\x00" if data is None else b"\x01" + len(data).to_bytes(4, "big") + data


def signed_bytes(signer: str, key_id: str, topic: str, key: bytes | None, value: bytes) -> bytes:
    """The bytes an Ed25519 record signature covers, spelled out as the contract states them
    (the engine builds the same in `saga.runtime.signing`; the contract test checks both
    agree)."""
    return (
        _DOMAIN
        + _field(signer.encode())
        + _field(key_id.encode())
        + _field(topic.encode())
        + _field(key)
        + _field(value)
    )


def signing_vector() -> dict[str, Any]:
    """A command signed by a test coordinator key: inputs, the signed bytes and the headers."""
    key = SigningKey(
        "coordinator", "coordinator-test", Ed25519PrivateKey.from_private_bytes(SIGNING_SEED)
    )
    topic, record_key, value = "saga.commands.payment", b"order-1", encode(VECTOR_COMMAND)
    headers = dict(key.sign(topic, record_key, value))
    return {
        "seed": _b64(SIGNING_SEED),
        "public_key": key.public_entry().public_key_b64,
        "signer": key.principal,
        "key_id": key.key_id,
        "topic": topic,
        "key": record_key.decode(),
        "value": value.decode(),
        "signed_bytes": _b64(signed_bytes(key.principal, key.key_id, topic, record_key, value)),
        "headers": {name: raw.decode() for name, raw in headers.items()},
        "signature": headers[SIGNATURE_HEADER].decode(),
    }


def sealing_vector() -> dict[str, Any]:
    """A command payload sealed with a test data key and a fixed nonce."""
    data_key, nonce, aad = bytes(range(100, 132)), bytes(range(12)), b"order-1"
    plaintext = orjson.dumps(VECTOR_COMMAND.payload)
    sealed = AESGCM(data_key).encrypt(nonce, plaintext, aad)
    return {
        "data_key": _b64(data_key),
        "kid": "k1",
        "aad": aad.decode(),
        "plaintext": plaintext.decode(),
        "sealed": {"$sealed": 1, "kid": "k1", "n": _b64(nonce), "c": _b64(sealed)},
    }
