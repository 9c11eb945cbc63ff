"""Payload sealing on the memory transport: what reaches the broker, rotation, tampering, key
files, and readers without the keys."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from saga import Coordinator, Participant, SagaDefinition, SagaStatus, Step, StepContext, StepFailed
from saga.adapters.memory import MemoryBroker, MemoryTransport
from saga.adapters.sealing import (
    UNSEALED_ERROR_HEADER,
    AesGcmCodec,
    KeyFileError,
    SealedTransport,
    SealingError,
    codec_from_env,
    is_sealed,
    load_data_keys,
    new_data_key_file,
)
from saga.core.codec import ENGINE_LIMITS, decode, encode
from saga.core.messages import (
    Reply,
    SagaStarted,
    Snapshot,
    StartSaga,
    StepSucceeded,
    command_adapter,
    event_adapter,
    reply_adapter,
    request_adapter,
    snapshot_adapter,
)
from saga.core.state import SagaState
from saga.runtime.ports import Outgoing, Record, Topics

pytestmark = pytest.mark.anyio

MARKER = "zebra-7f3a-secret"
OUT_MARKER = "okapi-91c2-secret"
TOPICS = Topics("saga")

ORDER = SagaDefinition(
    name="order",
    steps=[
        Step(name="pay", service="bank", action="charge", compensation="refund"),
        Step(name="ship", service="post", action="ship", depends_on=["pay"], kind="pivot"),
    ],
)


class Seen:
    """What the handlers were given."""

    def __init__(self) -> None:
        self.payloads: list[tuple[str, dict[str, Any]]] = []


def services(seen: Seen) -> list[Participant]:
    bank, post = Participant("bank"), Participant("post")

    @bank.handler("charge")
    async def charge(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        seen.payloads.append(("charge", payload))
        return {"receipt": OUT_MARKER, "card": payload["card"]}

    @bank.handler("refund")
    async def refund(payload: dict[str, Any], ctx: StepContext) -> None:
        seen.payloads.append(("refund", payload))

    @post.handler("ship")
    async def ship(payload: dict[str, Any], ctx: StepContext) -> None:
        seen.payloads.append(("ship", payload))
        if payload.get("nowhere"):
            raise StepFailed("no such address")

    return [bank, post]


def codec(*kids: str) -> AesGcmCodec:
    keys = {kid: fixed_key(kid) for kid in kids}
    return AesGcmCodec(keys, kids[-1])


def fixed_key(kid: str) -> bytes:
    """A fixed key per id, so that two codecs with the same ids agree."""
    return (kid.encode() * 32)[:32]


async def run_sagas(
    transport: SealedTransport,
    inputs: list[dict[str, Any]],
    seen: Seen,
    then: Callable[[], Awaitable[None]] | None = None,
) -> list[SagaState]:
    """Runs one saga per input to its end, then ``then`` while everything still runs."""
    bank, post = services(seen)
    async with (
        Coordinator([ORDER], transport=transport, partitions=3) as coordinator,
        bank.serving(transport, partitions=3),
        post.serving(transport, partitions=3),
    ):
        ids = [await coordinator.start("order", data) for data in inputs]
        states = [await coordinator.wait(saga_id, 10) for saga_id in ids]
        if then is not None:
            await then()
        return states


def raw(broker: MemoryBroker) -> dict[str, list[Record]]:
    return {topic: broker.records(topic) for topic in broker.topics}


# -- a whole saga ---------------------------------------------------------------------------------


async def test_sagas_run_sealed_and_no_plaintext_reaches_the_broker() -> None:
    broker = MemoryBroker(default_partitions=3)
    transport = SealedTransport(MemoryTransport(broker), codec("k1"))
    seen = Seen()
    good = {"card": MARKER, "amount": 12}
    bad = {"card": MARKER, "amount": 13, "nowhere": True}

    async def send_a_stray_reply() -> None:
        # A reply for a saga nobody knows, with an output: dead-lettered by the coordinator.
        stray = Reply(
            message_id="m-stray", saga_id="nobody", step="pay", phase="action", attempt=1,
            service="bank", ok=True, output={"leak": MARKER}, at=1.0,
        )  # fmt: skip
        async with transport.producer() as producer:
            await producer.send([Outgoing(TOPICS.replies, b"nobody", encode(stray))])
        with anyio.fail_after(10):
            while not broker.records(TOPICS.dlq):
                await broker.wait_for_change(0.05)

    done, undone = await run_sagas(transport, [good, bad], seen, send_a_stray_reply)

    # The coordinator and the handlers saw plaintext all along.
    assert done.status is SagaStatus.COMPLETED
    assert undone.status is SagaStatus.COMPENSATED
    assert done.input == good
    assert done.steps["pay"].output == {"receipt": OUT_MARKER, "card": MARKER}
    by_action = {action: p for action, p in seen.payloads}
    assert by_action["charge"] == bad  # no template: the step gets the whole saga input
    assert by_action["refund"]["output"] == {"receipt": OUT_MARKER, "card": MARKER}

    records = raw(broker)
    for topic in (TOPICS.requests, TOPICS.commands("bank"), TOPICS.replies, TOPICS.log):
        assert any(b'"$sealed"' in (r.value or b"") for r in records[topic]), topic
    assert any(b'"$sealed"' in (r.value or b"") for r in records[TOPICS.snapshots])
    for topic, found in records.items():
        for r in found:
            assert MARKER.encode() not in (r.value or b""), (topic, r.value)
            assert OUT_MARKER.encode() not in (r.value or b""), (topic, r.value)
    (dead,) = records[TOPICS.dlq]
    assert b'"$sealed"' in (dead.value or b"")
    # Read back with the codec, the dead letter is the reply as the coordinator saw it.
    (opened,) = [r async for r in transport.read(TOPICS.dlq, dead.partition)]
    assert decode(reply_adapter, opened.value).output == {"leak": MARKER}


async def test_a_reader_without_the_codec_sees_sealed_objects_that_still_validate() -> None:
    broker = MemoryBroker(default_partitions=3)
    transport = SealedTransport(MemoryTransport(broker), codec("k1"))
    (state,) = await run_sagas(transport, [{"card": MARKER}], Seen())
    key = state.saga_id.encode()
    records = raw(broker)

    (start,) = [decode(request_adapter, r.value) for r in records[TOPICS.requests]]
    assert isinstance(start, StartSaga)
    assert is_sealed(start.input)
    commands = [decode(command_adapter, r.value) for r in records[TOPICS.commands("bank")]]
    assert commands
    assert all(is_sealed(c.payload) and c.payload["kid"] == "k1" for c in commands)
    replies = [decode(reply_adapter, r.value) for r in records[TOPICS.replies]]
    assert all(r.output is not None and is_sealed(r.output) for r in replies)
    events = [decode(event_adapter, r.value, ENGINE_LIMITS) for r in records[TOPICS.log]]
    started = [e for e in events if isinstance(e, SagaStarted)]
    succeeded = [e for e in events if isinstance(e, StepSucceeded)]
    assert len(started) == 1
    assert is_sealed(started[0].input)
    assert len(succeeded) == 2
    assert all(is_sealed(e.output) for e in succeeded)
    snapshots = [
        s
        for r in records[TOPICS.snapshots]
        if r.key == key
        and isinstance(s := decode(snapshot_adapter, r.value, ENGINE_LIMITS), Snapshot)
    ]
    last = SagaState.model_validate(snapshots[-1].state)  # the core model takes sealed dicts
    assert last.status is SagaStatus.COMPLETED
    assert is_sealed(last.input)
    assert all(s.output is not None and is_sealed(s.output) for s in last.steps.values())
    # What is not sealed stays readable: ids, names, statuses.
    assert {c.step for c in commands} == {"pay"}
    assert {e.step for e in succeeded} == {"pay", "ship"}


# -- rotation -------------------------------------------------------------------------------------


async def test_records_sealed_before_a_rotation_still_open_after_it(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    assert new_data_key_file(path) == "k1"
    broker = MemoryBroker(default_partitions=3)
    before = SealedTransport(MemoryTransport(broker), load_data_keys(path))
    (old,) = await run_sagas(before, [{"card": MARKER, "n": 1}], Seen())

    assert new_data_key_file(path) == "k2"
    rotated = load_data_keys(path)
    assert rotated.current == "k2"
    assert rotated.key_ids == {"k1", "k2"}
    after = SealedTransport(MemoryTransport(broker), rotated)
    (new,) = await run_sagas(after, [{"card": MARKER, "n": 2}], Seen())
    assert new.status is SagaStatus.COMPLETED

    kids: dict[bytes, set[str]] = {}
    for r in broker.records(TOPICS.log):
        event = decode(event_adapter, r.value, ENGINE_LIMITS)
        if isinstance(event, SagaStarted):
            kids.setdefault(r.key or b"", set()).add(event.input["kid"])
    assert kids == {old.saga_id.encode(): {"k1"}, new.saga_id.encode(): {"k2"}}
    # Every record, old or new, opens under the rotated key file.
    for topic in (TOPICS.log, TOPICS.snapshots, TOPICS.replies, TOPICS.commands("bank")):
        for p in range(3):
            async for r in after.read(topic, p):
                assert r.header(UNSEALED_ERROR_HEADER) is None
                assert b'"$sealed"' not in (r.value or b"")
    # A new coordinator with the rotated keys recovers the old saga from the log, in plaintext.
    async with Coordinator([ORDER], transport=after, partitions=3) as coordinator:
        recovered = await coordinator.wait(old.saga_id, 10)
    assert recovered.input == {"card": MARKER, "n": 1}


# -- records that cannot be opened ----------------------------------------------------------------


async def test_a_tampered_or_moved_value_is_delivered_sealed_with_the_error_header() -> None:
    broker = MemoryBroker(default_partitions=1)
    inner = MemoryTransport(broker)
    transport = SealedTransport(inner, codec("k1"))
    reply = Reply(
        message_id="m-1", saga_id="s-1", step="pay", phase="action", attempt=1,
        service="bank", ok=True, output={"card": MARKER}, at=1.0,
    )  # fmt: skip
    async with transport.producer() as producer:
        await producer.send([Outgoing(TOPICS.replies, b"s-1", encode(reply))])
    (good,) = broker.records(TOPICS.replies)
    sealed = orjson.loads(good.value or b"")
    tampered = dict(sealed, output=_flip(sealed["output"]))
    broker.append(
        [
            Outgoing(TOPICS.replies, b"s-1", orjson.dumps(tampered)),
            Outgoing(TOPICS.replies, b"s-2", good.value),  # moved to another saga
            Outgoing(TOPICS.replies, b"s-1", good.value, ((UNSEALED_ERROR_HEADER, b"planted"),)),
            Outgoing(TOPICS.replies, b"s-3", b"not json"),
            Outgoing(TOPICS.replies, b"s-3", None),
        ]
    )
    async with transport.consumer("readers", [TOPICS.replies]) as consumer:
        records: list[Record] = []
        with anyio.fail_after(10):
            while len(records) < 6:
                records += await consumer.poll(0.1)
    first, changed, moved, planted, junk, tombstone = records

    assert first.header(UNSEALED_ERROR_HEADER) is None
    assert decode(reply_adapter, first.value).output == {"card": MARKER}
    for bad in (changed, moved):
        reason = bad.header(UNSEALED_ERROR_HEADER)
        assert reason is not None
        assert reason.startswith("tampered:")
        assert "'k1'" in reason
        assert bad.value == broker.records(TOPICS.replies)[bad.offset].value  # left as it was
    assert planted.header(UNSEALED_ERROR_HEADER) is None  # stripped, then opened fine
    assert decode(reply_adapter, planted.value).output == {"card": MARKER}
    assert junk.value == b"not json"
    assert tombstone.value is None


async def test_an_unknown_key_id_is_named_in_the_header() -> None:
    broker = MemoryBroker(default_partitions=1)
    writer = SealedTransport(MemoryTransport(broker), codec("k9"))
    reader = SealedTransport(MemoryTransport(broker), codec("k1", "k2"))
    record = Outgoing(TOPICS.log, b"s-1", orjson.dumps({"input": {"card": MARKER}}))
    async with writer.producer() as producer:
        await producer.send([record])
    old = orjson.dumps({"input": {"card": MARKER}})  # written before sealing was turned on
    broker.append([Outgoing(TOPICS.log, b"s-1", old)])
    got, plain = [r async for r in reader.read(TOPICS.log, 0)]
    assert got.header(UNSEALED_ERROR_HEADER) == (
        "unknown_key: key id 'k9' is not in the key file (it has k1, k2)"
    )
    assert plain.value == old
    assert plain.headers == ()


# -- the codec ------------------------------------------------------------------------------------


def test_the_codec_binds_values_to_their_saga_and_key() -> None:
    c = codec("k1")
    sealed = c.seal({"card": MARKER}, b"s-1")
    assert set(sealed) == {"$sealed", "kid", "n", "c"}
    assert sealed["kid"] == "k1"
    assert len(base64.b64decode(sealed["n"])) == 12
    assert MARKER not in orjson.dumps(sealed).decode()
    assert c.seal({"card": MARKER}, b"s-1")["n"] != sealed["n"]  # a fresh nonce each time
    assert c.open(sealed, b"s-1") == {"card": MARKER}
    assert c.open({"plain": 1}, b"s-1") == {"plain": 1}  # written before sealing was on
    with pytest.raises(SealingError, match=r"tampered: .*'k1'") as moved:
        c.open(sealed, b"s-2")
    assert moved.value.key_id == "k1"
    with pytest.raises(SealingError, match="unknown_key: key id 'k1'"):
        codec("k2").open(sealed, b"s-1")
    with pytest.raises(SealingError, match="malformed"):
        c.open({"$sealed": 1, "kid": "k1", "n": "!!", "c": "!!"}, b"s-1")
    with pytest.raises(KeyFileError, match="32"):
        AesGcmCodec({"k1": b"short"}, "k1")
    with pytest.raises(KeyFileError, match="'k3' is not among"):
        AesGcmCodec({"k1": fixed_key("k1")}, "k3")


def test_records_without_sealable_fields_are_not_reserialised() -> None:
    transport = SealedTransport(MemoryTransport(), codec("k1"))
    plain = Outgoing(TOPICS.alerts, b"s-1", b'{"type": "alert", "reason": "x"}')
    assert transport.seal_record(plain) is plain
    junk = Outgoing(TOPICS.requests, b"s-1", b'"input" but not json')
    assert transport.seal_record(junk) is junk
    tombstone = Outgoing(TOPICS.snapshots, b"s-1", None)
    assert transport.seal_record(tombstone) is tombstone
    not_object = Outgoing(TOPICS.snapshots, b"s-1", b'"input"')
    assert transport.seal_record(not_object) is not_object
    # Nested at any depth, in lists too, but never inside what it sealed.
    nested = {"a": [{"output": {"input": {"x": 1}}}], "input": "a string stays"}
    out = orjson.loads(
        transport.seal_record(Outgoing("t", b"k", orjson.dumps(nested))).value or b""
    )
    assert is_sealed(out["a"][0]["output"])
    assert out["input"] == "a string stays"
    once = transport.seal_record(Outgoing("t", b"k", orjson.dumps(out)))
    assert orjson.loads(once.value or b"") == out  # already sealed: not sealed again


def test_opening_gives_back_the_exact_bytes_the_engine_encoded() -> None:
    # Signatures (saga.runtime.trust) are over the value's bytes: sealed under them, a record
    # must open to the same bytes, or it would fail verification after a sealed hop.
    transport = SealedTransport(MemoryTransport(), codec("k1"))
    values = {"f": [1e20, 1.5e-7, 0.1, -0.0, 5e-324, 1.0], "i": [2**63 - 1, -(2**63)]}
    values |= {"s": ["é😀\u2028", "\x01\x1f", '"quoted" \\ </script>'], "n": [None, True, {}]}
    reply = Reply(
        message_id="m", saga_id="s-1", step="pay", phase="action", attempt=1, service="bank",
        ok=True, output={"all": values, "output": {"nested": 1}}, at=1_700_000_000.123456,
    )  # fmt: skip
    value = encode(reply)
    sealed = transport.seal_record(Outgoing(TOPICS.replies, b"s-1", value))
    assert sealed.value != value
    opened = transport.open_record(Record(TOPICS.replies, 0, 0, b"s-1", sealed.value))
    assert opened.value == value


# -- key files ------------------------------------------------------------------------------------


def test_key_files_are_private_and_rotate(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "keys.json"
    assert new_data_key_file(path) == "k1"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert new_data_key_file(path, "2026-12") == "2026-12"
    assert new_data_key_file(path) == "k2"
    data = orjson.loads(path.read_bytes())
    assert data["current"] == "k2"
    assert set(data["keys"]) == {"k1", "2026-12", "k2"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(KeyFileError, match="'k1' exists already"):
        new_data_key_file(path, "k1")

    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match=f"mode 0644.*chmod 600 {path}"):
        load_data_keys(path)
    with pytest.raises(KeyFileError, match="chmod 600"):
        new_data_key_file(path)  # nor rotates it
    os.chmod(path, 0o600)
    assert load_data_keys(path).current == "k2"

    missing = tmp_path / "none.json"
    with pytest.raises(KeyFileError, match=r"SAGA_PAYLOAD_KEYS: .*none\.json: no key file there"):
        codec_from_env({"SAGA_PAYLOAD_KEYS": str(missing)})
    assert codec_from_env({}) is None
    from_env = codec_from_env({"SAGA_PAYLOAD_KEYS": str(path)})
    assert from_env is not None
    assert from_env.key_ids == {"k1", "2026-12", "k2"}

    broken = tmp_path / "broken.json"
    broken.write_bytes(b'{"current": "k1", "keys": {"k1": "not base64!"}}')
    broken.chmod(0o600)
    with pytest.raises(KeyFileError, match="'k1' is not base64"):
        load_data_keys(broken)
    broken.write_bytes(b"[]")
    with pytest.raises(KeyFileError, match=r'expected \{"current"'):
        load_data_keys(broken)


def _flip(sealed: dict[str, Any]) -> dict[str, Any]:
    data = bytearray(base64.b64decode(sealed["c"]))
    data[0] ^= 1
    return dict(sealed, c=base64.b64encode(bytes(data)).decode())
