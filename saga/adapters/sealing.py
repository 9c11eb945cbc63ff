"""Payload encryption at rest and in transit: a codec hook and a transport that applies it.

Like Temporal's payload codec, the data is sealed by the processes that hold the keys (the
coordinator, the participants, the clients and tools given the key file) and is opaque to
everyone else who can read the topics: broker administrators, other consumers, backups of the
log. The coordinator still sees plaintext, because it builds each step's input from the saga
input and earlier outputs with templates; it holds the keys.

`SealedTransport` wraps any transport (Kafka, memory). On the way out it parses each record's
value and, if it is a JSON object, replaces every JSON object found under the keys ``input``,
``payload`` or ``output``, at any depth, by its sealed form (and does not look inside what it
sealed); on the way in (``poll``, ``read``, a tail's ``poll``) it opens them again. Keys,
headers and partitions are unchanged, and so the consumers' decoders, which see plaintext, are
unchanged too.

What is sealed, by message (field names from `saga.core.messages`, `saga.core.events` and
`saga.core.state`):

- requests: ``StartSaga.input``;
- commands: ``Command.payload`` (a compensation's payload, ``{"input", "output"}``, is sealed
  as one object);
- replies: ``Reply.output``;
- the log: ``SagaStarted.input``, ``SagaRejected.input``, ``StepSucceeded.output``;
- snapshots: the saga state's ``input`` and every step's ``output`` (``Snapshot.state.input``,
  ``Snapshot.state.steps.<name>.output``);
- dead letters: the original value, sealed like the record it was (a dead letter holds the
  plaintext the reader decoded; it is sealed again on its way to the DLQ topic).

What is NOT sealed, on purpose, because the coordinator routes and decides on it and operators
and tools read it without the keys: saga ids (also the record keys), saga and step names,
services and actions, phases, attempts, idempotency keys, statuses, timestamps and deadlines,
reasons and notes, and error information (``ErrorInfo.type``, ``.message`` and ``.details``,
in replies, events and snapshots: keep personal data out of error messages and details, or
rely on `saga.runtime.redaction` for what reaches spans and logs; the log still holds it).
Also not sealed: alerts, checkpoints, headers (trace context, dead-letter reasons), values that
are not JSON objects (a poison message, a dead letter's value cut at `DLQ_MAX_VALUE`), the
participants' own reply stores (on the service's disk), and spans with ``record_payloads=True``.
The length of a sealed value is visible (AES-GCM does not hide it).

A sealed value is ``{"$sealed": 1, "kid": "k2", "n": "<base64 nonce>", "c": "<base64
ciphertext and tag>"}`` (AES-256-GCM, a random 96-bit nonce per value, the plaintext being the
object's compact JSON), with the record key (the saga id) as associated data, so that a sealed
value moved into another saga's record fails to open. Rotation: values are sealed with the
current key and opened with whichever known key their ``kid`` names, so after rotating the old
keys stay in the key file until no record sealed with them is retained.

A record that cannot be opened (a key id not in the key file, a tampered or moved value) is not
an error of ``poll``, which would wedge the consumer: it is delivered as it was, still sealed,
with the header `UNSEALED_ERROR_HEADER` giving the reason, for the reader to dead-letter. An
incoming header of that name is removed first, so that no producer can plant one.

Records holding none of the three keys are passed on as they are, without parsing (a byte
search decides), and a record whose fields are already sealed is not re-serialised. A sealed
field grows by about a third (base64) plus some 60 bytes, so a record near the broker's size
limit in plaintext may be refused once sealed: keep the coordinator's ``max_record_bytes``
about a quarter below the limit.

Opening gives back the exact bytes that were sealed, for values in compact JSON as the engine
writes them (pydantic's and orjson's output agree, key order included), so a signature made
over the plaintext value (`saga.runtime.trust`) still verifies after a sealed hop. Signing the
sealed bytes instead (seal, then sign; verify, then open: `SealedTransport.seal_record` and
`SealedTransport.open_record` can be called where the runtime signs and verifies) is better:
a signature over plaintext lets whoever has the public key confirm a guess of a low-entropy
field.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from saga.errors import SagaError
from saga.runtime.ports import (
    UNSEALED_HEADER,
    Consumer,
    Headers,
    Outgoing,
    Producer,
    RebalanceListener,
    Record,
    Tail,
    TopicPartition,
    Transport,
    TxProducer,
)

__all__ = [
    "ENV_VAR",
    "SEALED_FIELDS",
    "UNSEALED_ERROR_HEADER",
    "AesGcmCodec",
    "KeyFileError",
    "PayloadCodec",
    "SealedTransport",
    "SealingError",
    "codec_from_env",
    "is_sealed",
    "load_data_keys",
    "new_data_key_file",
]

ENV_VAR = "SAGA_PAYLOAD_KEYS"
"""The variable naming the key file (`codec_from_env`)."""
UNSEALED_ERROR_HEADER = UNSEALED_HEADER
"""Set on an incoming record whose sealed fields could not be opened: ``<reason>: <detail>``,
the reason one of ``unknown_key``, ``tampered``, ``malformed``."""
SEALED_FIELDS = frozenset({"input", "payload", "output"})
"""The keys whose JSON object values are sealed, at any depth of a record's value."""

_MARK = "$sealed"
_KEY_BYTES = 32
_NONCE_BYTES = 12
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A field can only be present if its quoted name is; a JSON escape could spell a name
# differently, so a value with any escape is parsed to be sure.
_OUT_MARKERS = (*(f'"{name}"'.encode() for name in sorted(SEALED_FIELDS)), b"\\u")
_IN_MARKER = f'"{_MARK}"'.encode()
_CONTAINERS = (dict, list)  # a tuple: isinstance is faster with one than with a union


class SealingError(SagaError):
    """A sealed value that cannot be opened.

    Attributes:
        reason: ``unknown_key``, ``tampered`` or ``malformed``.
        key_id: The key id the value names, if it names one.
    """

    def __init__(self, reason: str, detail: str, key_id: str | None = None) -> None:
        self.reason = reason
        self.key_id = key_id
        super().__init__(f"{reason}: {detail}")


class KeyFileError(SagaError):
    """A key file that is missing, unreadable, too widely readable or not valid."""


class PayloadCodec(Protocol):
    """Seals and opens one JSON object; ``aad`` binds it to its record (the saga id)."""

    def seal(self, obj: dict[str, Any], aad: bytes) -> dict[str, Any]:
        """The sealed form of ``obj``, itself a JSON object."""
        ...

    def open(self, obj: dict[str, Any], aad: bytes) -> dict[str, Any]:
        """The object that ``obj`` seals; ``obj`` itself if it is not sealed.

        Raises:
            SealingError: It is sealed, but cannot be opened.
        """
        ...


def is_sealed(obj: Mapping[str, Any]) -> bool:
    """Whether a JSON object is a sealed value (of any codec that uses the ``$sealed`` mark)."""
    return _MARK in obj


class AesGcmCodec:
    """AES-256-GCM with key ids: seals with ``current``, opens with any key in ``keys``.

    Random 96-bit nonces keep the chance of a repeat negligible up to about 2**32 values per
    key; rotate long before that (`new_data_key_file`).

    Args:
        keys: Key id to 32-byte key.
        current: The id of the key new values are sealed with.

    Raises:
        KeyFileError: No keys, ``current`` not among them, a key of the wrong size or an id
            that is not 1 to 64 letters, digits, ``.``, ``_`` or ``-``.
    """

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if current not in keys:
            known = ", ".join(sorted(keys)) or "none"
            raise KeyFileError(f"the current key id {current!r} is not among the keys ({known})")
        for kid, key in keys.items():
            if not _KEY_ID.fullmatch(kid):
                raise KeyFileError(f"key id {kid!r}: use 1 to 64 letters, digits, '.', '_', '-'")
            if len(key) != _KEY_BYTES:
                raise KeyFileError(f"key {kid!r} has {len(key)} bytes; AES-256 needs 32")
        self.current = current
        self._ciphers = {kid: AESGCM(bytes(key)) for kid, key in keys.items()}

    @property
    def key_ids(self) -> frozenset[str]:
        """The ids of the keys it can open with."""
        return frozenset(self._ciphers)

    def seal(self, obj: dict[str, Any], aad: bytes) -> dict[str, Any]:
        """``obj`` encrypted with the current key, bound to ``aad``."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._ciphers[self.current].encrypt(nonce, orjson.dumps(obj), aad)
        return {
            _MARK: 1,
            "kid": self.current,
            "n": base64.b64encode(nonce).decode(),
            "c": base64.b64encode(sealed).decode(),
        }

    def open(self, obj: dict[str, Any], aad: bytes) -> dict[str, Any]:
        """The object ``obj`` seals (``obj`` itself if it is not sealed).

        Raises:
            SealingError: ``unknown_key`` (the key id is not known: give the reader the key file
                with it), ``tampered`` (the tag does not verify: changed, or moved from another
                saga's record) or ``malformed``.
        """
        if not is_sealed(obj):
            return obj
        kid, nonce, data = obj.get("kid"), obj.get("n"), obj.get("c")
        if obj.get(_MARK) != 1 or not isinstance(kid, str):
            raise SealingError("malformed", "a sealed value without version 1 and a key id")
        if not isinstance(nonce, str) or not isinstance(data, str):
            raise SealingError("malformed", f"a sealed value (key id {kid!r}) without n or c", kid)
        cipher = self._ciphers.get(kid)
        if cipher is None:
            known = ", ".join(sorted(self._ciphers))
            raise SealingError(
                "unknown_key", f"key id {kid!r} is not in the key file (it has {known})", kid
            )
        try:
            plain = cipher.decrypt(
                base64.b64decode(nonce, validate=True), base64.b64decode(data, validate=True), aad
            )
        except (binascii.Error, ValueError):
            raise SealingError(
                "malformed", f"a sealed value (key id {kid!r}) has a bad nonce or ciphertext", kid
            ) from None
        except InvalidTag:
            raise SealingError(
                "tampered",
                f"a value sealed with key id {kid!r} does not verify: changed, or moved from "
                "another saga's record",
                kid,
            ) from None
        opened = orjson.loads(plain)
        if not isinstance(opened, dict):
            raise SealingError("malformed", f"a value sealed with key id {kid!r} is no object", kid)
        return opened


# -- key files --------------------------------------------------------------------------------


def load_data_keys(path: str | os.PathLike[str]) -> AesGcmCodec:
    """The codec of a key file: ``{"current": "k2", "keys": {"k1": "<base64>", ...}}``.

    Raises:
        KeyFileError: The file is missing, readable by group or others (``chmod 600`` it), or
            not a valid key file; the message names the file and what to do.
    """
    p = Path(path)
    try:
        info = p.stat()
    except FileNotFoundError:
        raise KeyFileError(
            f"{p}: no key file there; create one with "
            f"saga.adapters.sealing.new_data_key_file({str(p)!r})"
        ) from None
    if os.name == "posix" and info.st_mode & 0o077:
        mode = stat.S_IMODE(info.st_mode)
        raise KeyFileError(
            f"{p}: the key file is readable or writable by others (mode {mode:04o}); "
            f"run `chmod 600 {p}`"
        )
    try:
        data = orjson.loads(p.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise KeyFileError(f"{p}: not a readable JSON key file ({exc})") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("current"), str)
        or not isinstance(data.get("keys"), dict)
    ):
        raise KeyFileError(f'{p}: expected {{"current": "<key id>", "keys": {{...}}}}')
    keys: dict[str, bytes] = {}
    for kid, text in data["keys"].items():
        try:
            keys[kid] = base64.b64decode(text, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise KeyFileError(f"{p}: key {kid!r} is not base64") from None
    try:
        return AesGcmCodec(keys, data["current"])
    except KeyFileError as exc:
        raise KeyFileError(f"{p}: {exc}") from None


def new_data_key_file(path: str | os.PathLike[str], key_id: str | None = None) -> str:
    """Creates a key file with one new key, or rotates an existing one: adds a new key and
    makes it current, keeping the old ones (records sealed with them stay readable).

    The file is written with mode ``0600``, whole or not at all (a temporary file renamed).

    Args:
        path: The key file.
        key_id: The new key's id; by default ``k<n>``, one past the highest such id.

    Returns:
        The new key's id, now current.

    Raises:
        KeyFileError: The existing file is not a valid key file, or ``key_id`` is taken.
    """
    p = Path(path)
    keys: dict[str, str] = {}
    if p.exists():
        load_data_keys(p)  # refuse to rotate a file that is not valid or too open
        keys = dict(orjson.loads(p.read_bytes())["keys"])
    if key_id is None:
        numbers = [int(k[1:]) for k in keys if re.fullmatch(r"k\d+", k)]
        key_id = f"k{max(numbers, default=0) + 1}"
    if key_id in keys:
        raise KeyFileError(f"{p}: key id {key_id!r} exists already; choose another")
    keys[key_id] = base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()
    AesGcmCodec({k: base64.b64decode(v) for k, v in keys.items()}, key_id)  # checks the id
    text = orjson.dumps({"current": key_id, "keys": keys}, option=orjson.OPT_INDENT_2) + b"\n"
    p.parent.mkdir(parents=True, exist_ok=True)
    temporary = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, p)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return key_id


def codec_from_env(environ: Mapping[str, str] | None = None) -> AesGcmCodec | None:
    """The codec of the key file ``SAGA_PAYLOAD_KEYS`` names; ``None`` when it is unset.

    Raises:
        KeyFileError: The file named cannot be used (the message names the variable).
    """
    path = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if not path:
        return None
    try:
        return load_data_keys(path)
    except KeyFileError as exc:
        raise KeyFileError(f"{ENV_VAR}: {exc}") from None


# -- the transport ----------------------------------------------------------------------------


class SealedTransport:
    """A transport whose records' inputs, payloads and outputs are sealed by ``codec``
    (see the module docstring).

    Args:
        inner: The transport that carries the records.
        codec: Seals and opens them.
    """

    def __init__(self, inner: Transport, codec: PayloadCodec) -> None:
        self.inner = inner
        self.codec = codec

    # -- records, both ways ----------------------------------------------------------------

    def seal_record(self, record: Outgoing) -> Outgoing:
        """``record`` with its fields sealed (the same object if there was nothing to seal).

        An error of the codec propagates: better a failed send than a plaintext one.
        """
        value = record.value
        if value is None or not any(marker in value for marker in _OUT_MARKERS):
            return record
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError:
            return record
        if not isinstance(obj, dict) or not self._seal_tree(obj, record.key or b""):
            return record
        # Built directly: dataclasses.replace costs more than the encryption of a small value.
        return Outgoing(
            record.topic, record.key, orjson.dumps(obj), record.headers, record.partition
        )

    def open_record(self, record: Record) -> Record:
        """``record`` with its sealed fields opened, or left sealed with the error header."""
        headers = record.headers
        if any(name == UNSEALED_ERROR_HEADER for name, _ in headers):
            headers = tuple(h for h in headers if h[0] != UNSEALED_ERROR_HEADER)
        value = record.value
        if value is None or _IN_MARKER not in value:
            return record if headers is record.headers else _with(record, value, headers)
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            return _with(record, value, headers)
        try:
            opened = self._open_tree(obj, record.key or b"")
        except Exception as exc:
            # Never out of poll: one bad record (or a user codec's bug) would wedge the consumer.
            text = str(exc) if isinstance(exc, SealingError) else f"malformed: {exc!r}"
            reason = (UNSEALED_ERROR_HEADER, text.encode()[:1000])
            return _with(record, value, (*headers, reason))
        if not opened:
            return _with(record, value, headers)
        return _with(record, orjson.dumps(obj), headers, wire=value)

    def _seal_tree(self, root: dict[str, Any], aad: bytes) -> bool:
        # Sealed already: a dead letter of a record that could not be opened.
        return _transform(root, lambda obj: not is_sealed(obj), self.codec.seal, aad)

    def _open_tree(self, root: dict[str, Any], aad: bytes) -> bool:
        return _transform(root, is_sealed, self.codec.open, aad)

    # -- the transport port ----------------------------------------------------------------

    async def ensure_topics(
        self, names: Sequence[str], partitions: int, compacted: Sequence[str] = ()
    ) -> None:
        """Creates the topics that are missing (the inner transport's)."""
        await self.inner.ensure_topics(names, partitions, compacted)

    async def partitions(self, topic: str) -> int:
        """The number of partitions of ``topic``."""
        return await self.inner.partitions(topic)

    def partition_for(self, key: bytes, partitions: int) -> int:
        """The inner transport's partitioner."""
        return self.inner.partition_for(key, partitions)

    def consumer(
        self,
        group_id: str,
        topics: Sequence[str],
        listener: RebalanceListener | None = None,
    ) -> AbstractAsyncContextManager[Consumer]:
        """A group member whose records arrive opened."""
        return self._consumer(group_id, topics, listener)

    @asynccontextmanager
    async def _consumer(
        self, group_id: str, topics: Sequence[str], listener: RebalanceListener | None
    ) -> AsyncIterator[Consumer]:
        async with self.inner.consumer(group_id, topics, listener) as consumer:
            yield _SealedConsumer(consumer, self)

    def producer(self) -> AbstractAsyncContextManager[Producer]:
        """A producer that seals what it sends."""
        return self._producer()

    @asynccontextmanager
    async def _producer(self) -> AsyncIterator[Producer]:
        async with self.inner.producer() as producer:
            yield _SealedProducer(producer, self)

    def tx_producer(self, transactional_id: str) -> AbstractAsyncContextManager[TxProducer]:
        """A transactional producer that seals what it commits."""
        return self._tx_producer(transactional_id)

    @asynccontextmanager
    async def _tx_producer(self, transactional_id: str) -> AsyncIterator[TxProducer]:
        async with self.inner.tx_producer(transactional_id) as producer:
            yield _SealedTxProducer(producer, self)

    async def read(self, topic: str, partition: int, start: int = 0) -> AsyncIterator[Record]:
        """Reads committed records of one partition, opened."""
        async for record in self.inner.read(topic, partition, start):
            yield self.open_record(record)

    def tail(self, topic: str, starts: Mapping[int, int]) -> AbstractAsyncContextManager[Tail]:
        """A tail of the inner transport whose records arrive opened, as `read`'s do."""
        return self._tail(topic, starts)

    @asynccontextmanager
    async def _tail(self, topic: str, starts: Mapping[int, int]) -> AsyncIterator[Tail]:
        async with self.inner.tail(topic, starts) as tail:
            yield _SealedTail(tail, self)


def _transform(
    root: dict[str, Any],
    wanted: Callable[[dict[str, Any]], bool],
    change: Callable[[dict[str, Any], bytes], dict[str, Any]],
    aad: bytes,
) -> bool:
    """Replaces, in place, every object under a `SEALED_FIELDS` key that is ``wanted`` by what
    ``change`` makes of it (without going into what it replaced); whether any was."""
    changed = False
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(item for item in node if isinstance(item, _CONTAINERS))
            continue
        for name, child in node.items():
            if name in SEALED_FIELDS and isinstance(child, dict):
                if wanted(child):
                    node[name] = change(child, aad)
                    changed = True
            elif isinstance(child, _CONTAINERS):
                stack.append(child)
    return changed


def _with(
    record: Record, value: bytes | None, headers: Headers, wire: bytes | None = None
) -> Record:
    return Record(
        record.topic,
        record.partition,
        record.offset,
        record.key,
        value,
        headers,
        record.timestamp,
        wire,
    )


class _SealedConsumer:
    def __init__(self, inner: Consumer, sealing: SealedTransport) -> None:
        self.inner = inner
        self.sealing = sealing

    async def poll(self, timeout: float, max_records: int = 500) -> list[Record]:
        records = await self.inner.poll(timeout, max_records)
        return [self.sealing.open_record(r) for r in records]

    def assignment(self) -> frozenset[TopicPartition]:
        return self.inner.assignment()

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        await self.inner.commit(offsets)

    async def seek_to_committed(self, partitions: frozenset[TopicPartition]) -> None:
        await self.inner.seek_to_committed(partitions)


class _SealedTail:
    def __init__(self, inner: Tail, sealing: SealedTransport) -> None:
        self.inner = inner
        self.sealing = sealing

    async def poll(self, timeout: float, max_records: int = 500) -> list[Record]:
        records = await self.inner.poll(timeout, max_records)
        return [self.sealing.open_record(r) for r in records]

    async def end_offsets(self) -> dict[int, int]:
        return await self.inner.end_offsets()

    async def positions(self) -> dict[int, int]:
        return await self.inner.positions()


class _SealedProducer:
    def __init__(self, inner: Producer, sealing: SealedTransport) -> None:
        self.inner = inner
        self.sealing = sealing

    async def send(self, records: Sequence[Outgoing]) -> None:
        await self.inner.send([self.sealing.seal_record(r) for r in records])


class _SealedTxProducer:
    def __init__(self, inner: TxProducer, sealing: SealedTransport) -> None:
        self.inner = inner
        self.sealing = sealing

    async def commit(
        self,
        records: Sequence[Outgoing],
        offsets: Mapping[TopicPartition, int],
        group_id: str,
    ) -> list[int]:
        sealed = [self.sealing.seal_record(r) for r in records]
        return await self.inner.commit(sealed, offsets, group_id)
