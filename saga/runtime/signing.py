"""Who sent a record: Ed25519 signatures on records, and the keyring that verifies them.

Theory of operation. Every principal (the coordinator, each service, each client or operator)
has its own private key, in a key file only it can read (`SigningKey`). Every record it
produces carries three headers::

    saga-signer      the principal, as text
    saga-key-id      the key's id, as text
    saga-signature   base64 of the 64-byte Ed25519 signature

The signature covers, each length-prefixed so that no two different records sign the same
bytes: a domain tag with the format's version (``saga-engine/record-signature/v1``), the signer
and key id, the topic, the record key and the value. So a signature does not carry over to
another topic (a reply replayed as a request, a record of one prefix replayed under another),
another saga (the key is its id) or another message (the value holds its id, attempt and time).
Nothing else is signed: the partition (producers place by the signed key), the timestamp (the
value carries the engine's own ``at``) and every other header, such as the trace context,
which may be added or dropped on the way without making a record a forgery. A reader must not
take a decision on an unsigned header.

Verification (`Keyring.verify`) looks the key id up in the keyring, the trusted public keys
(key id -> principal, public key), checks that the signer header names the key's principal and
that the signature is right, and returns the principal; anything else is `Unauthenticated`.
What the principal may do is the policy's decision (`saga.core.policy`), not this module's.

Why Ed25519 and not HMAC: with a shared secret every verifier can also sign, so each
participant would hold a key that forges the coordinator's commands to every other
participant, and the coordinator's keyring would let whoever reads it forge any reply. With
public keys a verifier holds only public keys: a compromised participant can sign as itself,
and nothing else. (Pairwise HMAC secrets, one per coordinator-service link, would also confine a
participant, at a fiftieth of the cost; but they put every secret in the coordinator's hands,
and leave the log with tags that no auditor can check without being able to forge them.)
Ed25519 signatures are small (64 bytes) and deterministic; signing costs about 40 us and
verifying about 130 us on the project's 2-core machine (bench/bench_trust.py), some 0.35 ms of
CPU per step, beside the 10-20 ms of a Kafka transaction.

Key rotation: a principal may have several keys in the keyring. Sign with the new key, keep the
old one in the keyring until the messages it signed have drained (at most the longest retention
of the topics, and `Trust.max_request_age` for requests), then remove it (`saga keys remove`).

Errors: `TrustError` (a key or keyring file that cannot be used, at start-up) and
`Unauthenticated` (a record unsigned, or whose signature does not verify); `saga.runtime.trust`
re-exports every name here.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import os
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from saga.errors import ConfigurationError, SagaError, UsageError
from saga.runtime.ports import Headers, Outgoing, Record

# `cryptography`, `yaml` and the policy's module (pydantic's models) are imported where keys
# and keyrings are made and read: a process running unsigned (and `saga --help`, whose options
# name this module's settings) does not load them.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "KEY_ID_HEADER",
    "SIGNATURE_HEADER",
    "SIGNATURE_HEADERS",
    "SIGNER_HEADER",
    "KeyEntry",
    "Keyring",
    "SigningKey",
    "TrustError",
    "Unauthenticated",
    "new_key",
    "read_setting_file",
]

SIGNER_HEADER = "saga-signer"
KEY_ID_HEADER = "saga-key-id"
SIGNATURE_HEADER = "saga-signature"
SIGNATURE_HEADERS = frozenset({SIGNER_HEADER, KEY_ID_HEADER, SIGNATURE_HEADER})
"""The headers a signature consists of; `SigningKey.sign_outgoing` replaces any already there."""

_DOMAIN = b"saga-engine/record-signature/v1\x00"


class TrustError(ConfigurationError):
    """The trust settings cannot be used; the message names the setting and what to do."""


class Unauthenticated(SagaError):
    """A record that is not signed, or whose signature does not verify.

    Attributes:
        reason: ``unauthenticated``, the dead-letter reason (as `saga.errors.DecodeError`'s).
        detail: A short machine reason: ``unsigned``, ``malformed``, ``unknown_key``,
            ``wrong_signer`` or ``bad_signature`` (a metric label).
    """

    reason = "unauthenticated"

    def __init__(self, detail: str, message: str) -> None:
        self.detail = detail
        super().__init__(message)


# -- signing ---------------------------------------------------------------------------------------


def _field(data: bytes | None) -> bytes:
    # A presence byte, then a 4-byte big-endian length: None, b"" and any bytes all differ.
    if data is None:
        return b"\x00"
    return b"\x01" + len(data).to_bytes(4, "big") + data


def _prefix(principal: str, key_id: str) -> bytes:
    return _DOMAIN + _field(principal.encode()) + _field(key_id.encode())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A principal's private key: signs the records the process produces."""

    principal: str
    key_id: str
    private_key: Ed25519PrivateKey = field(repr=False, compare=False)
    _prefix: bytes = field(init=False, repr=False, compare=False)
    _names: Headers = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from saga.core.policy import valid_name

        for what, name in (("principal", self.principal), ("key id", self.key_id)):
            if not valid_name(name):
                raise UsageError(f"{name!r} is not a valid {what} (letters, digits and . _ - @)")
        object.__setattr__(self, "_prefix", _prefix(self.principal, self.key_id))
        names = ((SIGNER_HEADER, self.principal.encode()), (KEY_ID_HEADER, self.key_id.encode()))
        object.__setattr__(self, "_names", names)

    def sign(self, topic: str, key: bytes | None, value: bytes | None) -> Headers:
        """The signature headers for a record of ``topic`` with this key and value."""
        message = self._prefix + _field(topic.encode()) + _field(key) + _field(value)
        signature = base64.b64encode(self.private_key.sign(message))
        return (*self._names, (SIGNATURE_HEADER, signature))

    def sign_outgoing(self, record: Outgoing) -> Outgoing:
        """A copy of ``record`` signed: any signature headers it had are replaced, the other
        headers (and the partition) kept."""
        kept = tuple(h for h in record.headers if h[0] not in SIGNATURE_HEADERS)
        signed = self.sign(record.topic, record.key, record.value)
        return dataclasses.replace(record, headers=(*kept, *signed))

    def public_entry(self) -> KeyEntry:
        """The keyring entry that verifies this key's signatures."""
        return KeyEntry(self.key_id, self.principal, self.private_key.public_key())

    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Writes the key file, readable and writable by its owner only (mode 0600).

        Raises:
            TrustError: The file exists and ``overwrite`` is false.
        """
        path = Path(path)
        data = {
            "saga_signing_key": 1,
            "algorithm": "ed25519",
            "principal": self.principal,
            "key_id": self.key_id,
            "private_key": _b64(self.private_key.private_bytes_raw()),
            "public_key": self.public_entry().public_key_b64,
        }
        text = orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n"
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            raise TrustError(
                f"key file {path} exists already; remove it first, or write to another file"
            ) from None
        try:
            os.fchmod(fd, 0o600)  # an existing file kept its mode; the umask may be odd
            os.write(fd, text)
        finally:
            os.close(fd)

    @classmethod
    def load(cls, path: str | Path) -> SigningKey:
        """Reads a key file written by `save` (or ``saga keys new``).

        Refuses a file that its group or others may read or write, as ssh does.

        Raises:
            TrustError: No such file, its permissions are too open, or it is not a key file.
        """
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        path = Path(path)
        try:
            st = path.stat()
            raw = path.read_bytes()
        except FileNotFoundError:
            raise TrustError(
                f"no key file {path}; create one with `saga keys new PRINCIPAL --out DIR`"
            ) from None
        except OSError as exc:
            raise TrustError(f"cannot read key file {path}: {exc.strerror}") from None
        if st.st_mode & 0o077:
            raise TrustError(
                f"key file {path} is accessible by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"a private key must be private: run `chmod 600 {path}`"
            )
        try:
            data = orjson.loads(raw)
            if not isinstance(data, dict) or data.get("saga_signing_key") != 1:
                raise ValueError("not a saga signing key file")
            if data.get("algorithm") != "ed25519":
                raise ValueError(f"algorithm {data.get('algorithm')!r}, expected 'ed25519'")
            private = Ed25519PrivateKey.from_private_bytes(_unb64(str(data["private_key"])))
            key = cls(str(data["principal"]), str(data["key_id"]), private)
            if "public_key" in data and data["public_key"] != key.public_entry().public_key_b64:
                raise ValueError("its public key does not belong to its private key")
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
            raise TrustError(f"key file {path} is not a usable saga signing key: {what}") from None
        return key


def new_key(principal: str, key_id: str | None = None) -> SigningKey:
    """A fresh key for ``principal``.

    Args:
        principal: Who the key is for.
        key_id: Its id (default: ``<principal>-<date>-<4 random hex digits>``).

    Raises:
        UsageError: The principal or key id is not a valid name.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if key_id is None:
        today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
        key_id = f"{principal}-{today}-{secrets.token_hex(2)}"
    return SigningKey(principal, key_id, Ed25519PrivateKey.generate())


# -- verifying -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """A trusted public key: whose it is and its id."""

    key_id: str
    principal: str
    public_key: Ed25519PublicKey = field(repr=False, compare=False)
    _prefix: bytes = field(init=False, repr=False, compare=False)
    _principal: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_prefix", _prefix(self.principal, self.key_id))
        object.__setattr__(self, "_principal", self.principal.encode())

    @property
    def public_key_b64(self) -> str:
        """The raw 32-byte public key, in base64 (as the keyring file holds it)."""
        return _b64(self.public_key.public_bytes_raw())

    @classmethod
    def from_base64(cls, key_id: str, principal: str, public_key: str) -> KeyEntry:
        """An entry from the keyring file's text.

        Raises:
            ValueError: The key is not 32 bytes of base64.
        """
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            raw = _unb64(public_key)
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError("public_key is not base64") from None
        if len(raw) != 32:
            raise ValueError(f"public_key has {len(raw)} bytes, an Ed25519 key has 32")
        return cls(key_id, principal, Ed25519PublicKey.from_public_bytes(raw))


class Keyring:
    """The trusted public keys, by key id. Immutable: `with_key` and `without_key` return a
    new keyring, so that one in use for verification never changes under its readers.

    A principal may have several keys (rotation); a key id names one key.
    """

    __slots__ = ("_entries", "_principals", "source")

    def __init__(self, entries: Iterable[KeyEntry] = (), *, source: str = "<keyring>") -> None:
        self.source = source
        self._entries: dict[str, KeyEntry] = {}
        for e in entries:
            if e.key_id in self._entries:
                raise UsageError(f"key id {e.key_id!r} appears twice in keyring {source}")
            self._entries[e.key_id] = e
        self._principals = frozenset(e.principal for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._entries

    def get(self, key_id: str) -> KeyEntry | None:
        """The entry with that key id, if any."""
        return self._entries.get(key_id)

    def entries(self) -> tuple[KeyEntry, ...]:
        """Every entry, ordered by principal, then key id."""
        return tuple(sorted(self._entries.values(), key=lambda e: (e.principal, e.key_id)))

    def principals(self) -> frozenset[str]:
        """Every principal that has a key."""
        return self._principals

    def with_key(self, entry: KeyEntry) -> Keyring:
        """This keyring and ``entry`` (unchanged if it is there already).

        Raises:
            UsageError: Another key or principal has that key id.
        """
        old = self._entries.get(entry.key_id)
        if old is not None:
            if old.principal == entry.principal and old.public_key_b64 == entry.public_key_b64:
                return self
            raise UsageError(
                f"key id {entry.key_id!r} is in keyring {self.source} already, with another key "
                f"(of {old.principal!r}); choose another key id"
            )
        return Keyring([*self._entries.values(), entry], source=self.source)

    def without_key(self, key_id: str) -> Keyring:
        """This keyring less one key.

        Raises:
            UsageError: No key has that id.
        """
        if key_id not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise UsageError(f"no key id {key_id!r} in keyring {self.source} (keys: {known})")
        return Keyring(
            (e for e in self._entries.values() if e.key_id != key_id), source=self.source
        )

    def verify(self, record: Record) -> str:
        """Checks a record's signature; returns the principal that signed it.

        Raises:
            Unauthenticated: It is unsigned, malformed, signed with an unknown key, under
                another principal's name, or the signature does not match the record.
        """
        signer: bytes | None = None
        key_id: bytes | None = None
        signature: bytes | None = None
        seen: bytes | None
        for name, value in record.headers:
            if name in SIGNATURE_HEADERS:
                if name == SIGNATURE_HEADER:
                    seen, signature = signature, value
                elif name == KEY_ID_HEADER:
                    seen, key_id = key_id, value
                else:
                    seen, signer = signer, value
                if seen is not None:  # a reader taking the other copy would be misled
                    raise Unauthenticated("malformed", f"header {name} appears twice")
        if signer is None or key_id is None or signature is None:
            if signer is None and key_id is None and signature is None:
                raise Unauthenticated("unsigned", "unsigned")
            missing = [n for n, v in _headers(signer, key_id, signature) if v is None]
            raise Unauthenticated("malformed", f"incomplete signature: no {', '.join(missing)}")
        kid = key_id.decode(errors="replace")
        entry = self._entries.get(kid)
        if entry is None:
            raise Unauthenticated("unknown_key", f"unknown key id {kid!r}")
        if signer != entry._principal:
            raise Unauthenticated(
                "wrong_signer",
                f"signer header says {signer.decode(errors='replace')!r} but key {kid!r} "
                f"belongs to {entry.principal!r}",
            )
        message = (
            entry._prefix
            + _field(record.topic.encode())
            + _field(record.key)
            + _field(record.value)
        )
        try:
            raw = base64.b64decode(signature, validate=True)  # binascii.Error: a ValueError
            if len(raw) != 64:
                raise ValueError("an Ed25519 signature is 64 bytes")
            entry.public_key.verify(raw, message)
        except Exception as exc:
            # Imported on the failure path only: a verified record pays no import.
            from cryptography.exceptions import InvalidSignature

            if not isinstance(exc, InvalidSignature | ValueError):
                raise
            raise Unauthenticated(
                "bad_signature", f"bad signature (key {kid!r} of {entry.principal!r})"
            ) from None
        return entry.principal

    # -- files -------------------------------------------------------------------------------------

    def dump(self) -> str:
        """The keyring file's text (YAML)."""
        import yaml

        keys = {
            e.key_id: {"principal": e.principal, "public_key": e.public_key_b64}
            for e in self.entries()
        }
        header = "# saga keyring: the trusted public keys (`saga keys list`)\n"
        return header + yaml.safe_dump({"version": 1, "keys": keys}, sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Writes the keyring file (replacing it at once: readers see the old or the new)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(self.dump(), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def parse(cls, text: str, source: str = "<keyring>") -> Keyring:
        """Reads a keyring file's text::

            version: 1
            keys:
              payment-2026-12-01-3fa2:
                principal: payment
                public_key: <base64 of the raw 32-byte Ed25519 public key>

        Raises:
            TrustError: It is not a keyring; every bad entry is listed.
        """
        import yaml

        from saga.core.policy import valid_name

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise TrustError(f"keyring {source} is not valid YAML: {exc}") from None
        if data is None:
            data = {"version": 1, "keys": {}}
        if not isinstance(data, dict) or set(data) - {"version", "keys"}:
            raise TrustError(f"keyring {source}: expected a mapping of version and keys")
        if data.get("version") != 1:
            raise TrustError(f"keyring {source}: version {data.get('version')!r}, expected 1")
        keys = data.get("keys") or {}
        if not isinstance(keys, dict):
            raise TrustError(f"keyring {source}: keys must map key ids to entries")
        entries, problems = [], []
        for kid, item in keys.items():
            try:
                if not isinstance(kid, str) or not valid_name(kid):
                    raise ValueError("not a valid key id (letters, digits and . _ - @)")
                if not isinstance(item, dict) or set(item) != {"principal", "public_key"}:
                    raise ValueError("expected exactly principal and public_key")
                principal, public = item["principal"], item["public_key"]
                if not isinstance(principal, str) or not valid_name(principal):
                    raise ValueError(f"principal {principal!r} is not a valid name")
                entries.append(KeyEntry.from_base64(kid, principal, str(public)))
            except ValueError as exc:
                problems.append(f"key {kid!r}: {exc}")
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise TrustError(f"keyring {source} is invalid:\n{lines}")
        return cls(entries, source=source)

    @classmethod
    def load(cls, path: str | Path) -> Keyring:
        """Reads a keyring file.

        Raises:
            TrustError: No such file, or it is not a keyring.
        """
        return cls.parse(
            read_setting_file(Path(path), "keyring", "`saga keys new ... --keyring FILE`"),
            str(path),
        )


def _headers(
    signer: bytes | None, key_id: bytes | None, signature: bytes | None
) -> tuple[tuple[str, bytes | None], ...]:
    return ((SIGNER_HEADER, signer), (KEY_ID_HEADER, key_id), (SIGNATURE_HEADER, signature))


def read_setting_file(path: Path, what: str, create: str) -> str:
    """The text of a key, keyring or policy file.

    Raises:
        TrustError: It does not exist (the message says how to create it) or cannot be read.
    """
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrustError(f"no {what} file {path}; create it with {create}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TrustError(f"cannot read {what} file {path}: {exc}") from None
