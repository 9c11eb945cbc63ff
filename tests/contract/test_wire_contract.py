"""The published wire contract (``contract/``): current, well formed, and true of real records.

The checked-in files must be exactly what `saga.contract` generates now (so CI fails when a
model changes and nobody ran ``saga contract``); the schemas must be valid draft 2020-12 and
cover every message class; the AsyncAPI document's references must resolve and its names must
be the engine's; the test vectors must verify and open with the engine's own code. Then a real
coordinator and real participants run sagas on the session broker through every kind of
request, success, retry, failure, compensation, stuck and resumed, and every record they wrote
to every topic is held against the schema of its topic.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from deploy.kafka import KafkaServer
from saga import Coordinator, Participant, RetryPolicy, SagaClient, SagaStatus, StepFailed
from saga.adapters.kafka import KafkaTransport
from saga.adapters.memory import MemoryTransport
from saga.adapters.sealing import AesGcmCodec, SealedTransport
from saga.contract import render, stale, write
from saga.contract.schemas import SCHEMAS
from saga.contract.vectors import VECTOR_COMMAND, sealing_vector, signed_bytes, signing_vector
from saga.core import events
from saga.core.codec import encode
from saga.core.definition import SagaDefinition, Step
from saga.core.messages import Command
from saga.runtime.dlq import REASON_HEADER
from saga.runtime.ports import Outgoing, Record, Topics
from saga.runtime.signing import KeyEntry, Keyring
from tests.chaos.oracle import read_topic
from tests.contract.wire import CONTRACT, asyncapi, problems, schema, validator

# -- the files ----------------------------------------------------------------------------------


def test_the_checked_in_contract_is_what_the_code_generates() -> None:
    assert stale(CONTRACT) == [], "the wire contract is out of date: run `saga contract`"


def _saga(*args: str) -> subprocess.CompletedProcess[str]:
    # A process of its own: the CLI configures logging for the whole process it runs in.
    return subprocess.run(
        [sys.executable, "-m", "saga", *args], capture_output=True, text=True, timeout=120
    )


def test_saga_contract_check_fails_on_a_stale_copy_and_a_write_mends_it(tmp_path: Path) -> None:
    copy = tmp_path / "contract"
    shutil.copytree(CONTRACT, copy)
    assert _saga("contract", "--check", "--out", str(copy)).returncode == 0
    (copy / "schemas" / "reply.json").write_text("{}\n")
    (copy / "schemas" / "gone.json").write_text("{}\n")
    checked = _saga("contract", "--check", "--out", str(copy))
    assert checked.returncode == 1
    assert "reply.json: not what the code generates now" in checked.stderr
    assert "gone.json: no longer generated" in checked.stderr
    wrote = _saga("contract", "--out", str(copy))
    assert wrote.returncode == 0
    assert wrote.stdout.split("\n")[:2] == [
        f"wrote {copy / 'schemas' / 'reply.json'}",
        f"removed {copy / 'schemas' / 'gone.json'}",
    ]
    assert stale(copy) == []
    assert write(copy) == ([], [])  # nothing left to change
    assert (copy / "README.md").read_text() == (CONTRACT / "README.md").read_text()


@pytest.mark.parametrize(
    "file", sorted(n.removeprefix("schemas/") for n in render() if n.startswith("schemas/"))
)
def test_every_schema_is_valid_draft_2020_12(file: str) -> None:
    validator(file)  # checks the schema against the metaschema first
    assert schema(file)["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_every_message_class_has_a_schema() -> None:
    named = set()
    for entry in SCHEMAS:
        contents = schema(entry.file)
        named |= set(contents.get("$defs", {})) | {contents["title"]}
    event_classes = {
        name
        for name, obj in vars(events).items()
        if isinstance(obj, type)
        and issubclass(obj, events.EventBase)
        and obj not in (events.EventBase, events.StepEvent)
    }
    wanted = event_classes | {"Command", "Reply", "Snapshot", "Checkpoint", "Alert", "StartSaga"}
    wanted |= {"CancelSaga", "RetrySaga", "ResolveSaga", "SignalSaga", "DecideApproval"}
    assert wanted - named == set()


def test_a_message_without_v_or_type_is_refused_as_the_decoder_refuses_it() -> None:
    command = orjson.loads(encode(VECTOR_COMMAND))
    assert problems("command.json", command) == []
    for field in ("v", "type"):
        assert problems("command.json", {k: v for k, v in command.items() if k != field})
    assert problems("command.json", {**command, "extra": 1})  # unknown fields are refused
    assert problems("command.json", {**command, "v": 2})


def _resolve(document: dict[str, Any], pointer: str) -> Any:
    node: Any = document
    for part in pointer.lstrip("/").split("/"):
        if part:
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_every_reference_of_the_asyncapi_document_resolves() -> None:
    doc = asyncapi()
    assert doc["asyncapi"] == "3.0.0"
    refs: list[str] = []
    stack: list[Any] = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    assert len(refs) > 50
    for ref in refs:
        where, _, pointer = ref.partition("#")
        target = doc if not where else orjson.loads((CONTRACT / where).read_bytes())
        assert _resolve(target, pointer) is not None, ref
    for name, op in doc["operations"].items():
        channel = op["channel"]["$ref"].removeprefix("#/channels/")
        for message in op["messages"]:
            assert message["$ref"].startswith(f"#/channels/{channel}/messages/"), name


def test_the_asyncapi_names_are_the_engines() -> None:
    doc, topics = asyncapi(), Topics("p")
    addresses = {
        n: c["address"].format(prefix="p", service="svc") for n, c in doc["channels"].items()
    }
    assert addresses == {
        "requests": topics.requests,
        "commands": topics.commands("svc"),
        "replies": topics.replies,
        "log": topics.log,
        "snapshots": topics.snapshots,
        "alerts": topics.alerts,
        "dlq": topics.dlq,
        "definitions": topics.definitions,
    }
    receive = doc["operations"]["receiveCommand"]["bindings"]["kafka"]["groupId"]["description"]
    assert receive.format(prefix="p", service="svc").endswith(topics.participant_group("svc"))
    headers = doc["components"]["schemas"]["SignedHeaders"]["properties"]
    assert {"traceparent", "saga-signer", "saga-key-id", "saga-signature"} <= set(headers)


# -- the vectors --------------------------------------------------------------------------------


def test_the_signing_vector_verifies_with_the_engines_keyring() -> None:
    vector = signing_vector()
    entry = KeyEntry.from_base64(vector["key_id"], vector["signer"], vector["public_key"])
    headers = tuple((k, v.encode()) for k, v in vector["headers"].items())
    value = vector["value"].encode()
    record = Record(vector["topic"], 0, 0, vector["key"].encode(), value, headers)
    assert Keyring([entry]).verify(record) == "coordinator"
    # The bytes the contract spells out are the bytes signed: the public key verifies them.
    raw = signed_bytes(vector["signer"], vector["key_id"], vector["topic"], record.key, value)
    assert orjson.loads(value) == orjson.loads(encode(VECTOR_COMMAND))
    entry.public_key.verify(base64.b64decode(vector["signature"]), raw)
    tampered = Record(record.topic, 0, 0, b"order-2", value, headers)
    with pytest.raises(Exception, match="bad signature"):
        Keyring([entry]).verify(tampered)


def test_the_sealing_vector_opens_with_the_engines_codec() -> None:
    vector = sealing_vector()
    codec = AesGcmCodec({vector["kid"]: base64.b64decode(vector["data_key"])}, vector["kid"])
    opened = codec.open(vector["sealed"], vector["aad"].encode())
    assert orjson.dumps(opened).decode() == vector["plaintext"]
    assert problems("sealed-value.json", vector["sealed"]) == []


def test_sealed_records_still_match_their_schemas() -> None:
    vector = sealing_vector()
    codec = AesGcmCodec({"k1": base64.b64decode(vector["data_key"])}, "k1")
    sealing = SealedTransport(MemoryTransport(), codec)
    record = Outgoing("saga.commands.payment", b"order-1", encode(VECTOR_COMMAND))
    sealed = orjson.loads(sealing.seal_record(record).value or b"")
    assert sealed["payload"]["$sealed"] == 1
    assert problems("command.json", sealed) == []
    assert problems("sealed-value.json", sealed["payload"]) == []


# -- real records -------------------------------------------------------------------------------

SHOP = SagaDefinition(
    name="contract-shop",
    steps=(
        Step(
            name="charge",
            service="cpay",
            action="charge",
            compensation="refund",
            timeout=10,
            retry=RetryPolicy(max_attempts=3, initial_backoff=0.05),
        ),
        Step(
            name="pack",
            service="cpack",
            action="pack",
            compensation="unpack",
            depends_on=("charge",),
            timeout=10,
            retry=RetryPolicy(max_attempts=2, initial_backoff=0.05),
        ),
    ),
)


def _services(flaky: set[str]) -> list[Participant]:
    pay, pack = Participant("cpay"), Participant("cpack")

    @pay.handler("charge")
    async def charge(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
        if payload.get("flaky") and ctx.attempt == 1:
            raise ConnectionError("the card network hiccuped")
        return {"charge_id": f"ch-{ctx.saga_id}", "amount": payload["amount"]}

    @pay.handler("refund")
    async def refund(payload: dict[str, Any], ctx: Any) -> None:
        if ctx.saga_id in flaky:
            raise StepFailed("the refund desk is closed", details={"desk": 3})

    @pack.handler("pack")
    async def pack_(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
        if payload.get("fail"):
            raise StepFailed("nothing to pack", details={"why": "empty"})
        return {"parcel": f"p-{ctx.saga_id}"}

    @pack.handler("unpack")
    async def unpack(payload: dict[str, Any], ctx: Any) -> None:
        return None

    return [pay, pack]


def _topic_schemas(prefix: str) -> dict[str, str]:
    found = {}
    for entry in SCHEMAS:
        for topic in entry.topics:
            if entry.file != "saga-state.json":
                found[topic.format(prefix=prefix, service="{service}")] = entry.file
    return found


@pytest.mark.anyio
@pytest.mark.kafka
@pytest.mark.timeout(180)
async def test_every_record_the_engine_writes_matches_its_schema(kafka: KafkaServer) -> None:
    prefix = f"contract-{uuid.uuid4().hex[:8]}"
    transport = KafkaTransport(kafka.bootstrap_servers, deadline=20)
    topics = Topics(prefix)
    stuck_id = f"stuck-{uuid.uuid4().hex[:6]}"
    flaky = {stuck_id}
    coordinator = Coordinator([SHOP], transport=transport, prefix=prefix, partitions=2)
    async with (
        coordinator,
        anyio.create_task_group() as tg,
        SagaClient(transport, prefix=prefix) as client,
    ):
        for participant in _services(flaky):
            await tg.start(
                lambda task_status, p=participant: p.run(
                    transport, prefix=prefix, partitions=2, task_status=task_status
                )
            )
        done = await client.start(SHOP.name, {"amount": 12, "flaky": True})
        failed = await client.start(SHOP.name, {"amount": 5, "fail": True})
        await client.start(SHOP.name, {"amount": 7, "fail": True}, stuck_id)
        rejected = await client.start("no-such-saga", {"amount": 1})
        assert (await client.wait(done, 30, poll=0.2)).status is SagaStatus.COMPLETED
        assert (await client.wait(failed, 30, poll=0.2)).status is SagaStatus.COMPENSATED
        assert (await client.wait(rejected, 30, poll=0.2)).status is SagaStatus.REJECTED
        stuck = await client.wait(stuck_id, 30, poll=0.2)
        assert stuck.status is SagaStatus.STUCK, stuck.reason
        # Every other kind of request, on sagas that take them or refuse them.
        await client.start(SHOP.name, {"amount": 12}, done)  # a duplicate start: ignored
        await client.cancel(done)
        await client.signal(done, "late", {"x": 1})
        flaky.clear()
        seq = await client.retry(stuck_id, reason="the desk is open again")
        resumed = await client.wait(stuck_id, 30, poll=0.2, after=seq)
        assert resumed.status is SagaStatus.COMPENSATED, resumed.reason
        async with transport.producer() as producer:  # a poison request, for a dead letter
            await producer.send([Outgoing(topics.requests, b"poison", b'{"v": 1, "type": "x"}')])
        with anyio.fail_after(30):
            while True:
                if [r for r in await read_topic(transport, topics.dlq) if r.key == b"poison"]:
                    break
                await anyio.sleep(0.2)
        tg.cancel_scope.cancel()

    checked: dict[str, int] = {}
    wrong: list[str] = []
    kinds: set[str] = set()
    for topic, file in _topic_schemas(prefix).items():
        names = [topics.commands(s) for s in ("cpay", "cpack")] if "{service}" in topic else [topic]
        for name in names:
            for record in await read_topic(transport, name):
                if record.value is None or record.key == b"poison":
                    continue  # a tombstone; the poison request written on purpose
                value = orjson.loads(record.value)
                kinds.add(value.get("type", file))
                checked[file] = checked.get(file, 0) + 1
                wrong += [f"{name}@{record.offset}: {p}" for p in problems(file, value)]
                if value.get("type") == "snapshot":
                    state = value["state"]
                    wrong += [
                        f"{name}@{record.offset} state: {p}"
                        for p in problems("saga-state.json", state)
                    ]
    assert wrong == []
    assert set(checked) == {f for f in _topic_schemas(prefix).values()}, checked
    wanted_kinds = {
        "start",
        "cancel",
        "retry",
        "signal",
        "command",
        "reply",
        "snapshot",
        "checkpoint",
        "alert",
        "saga_started",
        "step_started",
        "step_succeeded",
        "step_retry_scheduled",
        "step_failed",
        "saga_aborted",
        "compensation_started",
        "compensation_succeeded",
        "step_stuck",
        "saga_stuck",
        "saga_resumed",
        "saga_completed",
        "saga_compensated",
        "saga_rejected",
        "start_ignored",
        "cancel_rejected",
    }
    assert wanted_kinds - kinds == set()
    # Dead letters: the reason headers the contract names, then the original's.
    documented = set(asyncapi()["components"]["schemas"]["DeadLetterHeaders"]["properties"])
    (poison,) = [r for r in await read_topic(transport, topics.dlq) if r.key == b"poison"]
    assert poison.header(REASON_HEADER) == "invalid_message"
    assert {name for name, _ in poison.headers} <= documented
    assert poison.value == b'{"v": 1, "type": "x"}'
    commands = await read_topic(transport, topics.commands("cpay"))
    assert all(Command.model_validate_json(r.value or b"").service == "cpay" for r in commands)
