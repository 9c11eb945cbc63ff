"""The codec, message type by message type, and one concrete poison payload per reason.

(`test_codec.py` holds the first round trips and a table of reasons; this file goes through
every message the engine writes and adds the edge cases of each reason.)
"""

from __future__ import annotations

import typing
from typing import Any

import orjson
import pytest
from pydantic import BaseModel, TypeAdapter

from saga.core import messages as m
from saga.core.codec import DEFAULT_LIMITS, Limits, decode, encode
from saga.errors import DecodeError, SagaError

ERR = m.ErrorInfo(type="ConnectionError", message="refused", details={"host": "db", "n": [1, 2]})
BASE: dict[str, Any] = {"saga_id": "saga-1", "seq": 3, "at": 1_700_000_000.25}

EVENTS: list[BaseModel] = [
    m.SagaStarted(
        **BASE,
        name="order",
        version=2,
        input={"total": 12.5, "items": ["pasta", {"qty": 2}], "note": "é ✓"},
        steps=["pay", "ship"],
    ),
    m.SagaStarted(**BASE, name="order", version=2, input={}, steps=["pay"], digest="0123abcd"),
    m.SagaRejected(
        **BASE, name="ordr", input={"a": 1}, reason="no saga definition 'ordr'", message_id="m"
    ),
    m.SagaRejected(
        **BASE,
        name="order",
        version=2,
        digest="0123abcd",
        input={"a": "x"},
        reason="input is invalid",
        message_id="m",
    ),
    m.StartIgnored(**BASE, message_id="m", reason="exists", differs=[]),
    m.StartIgnored(**BASE, message_id="m", reason="exists", differs=["input"]),
    m.StartRefused(**BASE, message_id="m", reason="exists", differs=["name", "input"]),
    m.StepStarted(**BASE, step="pay", attempt=1, deadline_at=1_700_000_030.0),
    m.StepSucceeded(**BASE, step="pay", attempt=2, output={"charge": "c-1", "none": None}),
    m.StepRetryScheduled(**BASE, step="pay", attempt=1, error=ERR, retry_at=1_700_000_001.5),
    m.StepFailedEvent(
        **BASE,
        step="pay",
        attempt=1,
        error=m.ErrorInfo(type="StepFailed", message="card declined", business=True),
    ),
    m.StepTimedOut(**BASE, step="pay", attempt=3),
    m.StepStuck(**BASE, step="pay", phase="compensation", attempt=5, error=ERR),
    m.CompensationStarted(**BASE, step="pay", attempt=1, deadline_at=9.0),
    m.CompensationSucceeded(**BASE, step="pay", attempt=1),
    m.CompensationRetryScheduled(**BASE, step="pay", attempt=1, error=ERR, retry_at=10.0),
    m.SagaAborted(**BASE, reason="ship failed", step="ship"),
    m.SagaAborted(**BASE, reason="cancelled"),
    m.SagaCompleted(**BASE),
    m.SagaCompensated(**BASE),
    m.SagaStuck(**BASE, reason="pay is stuck"),
    m.SagaResumed(**BASE, compensating=True),
    m.StepResolved(**BASE, step="pay", attempt=3, note="charged by hand"),
    m.CompensationResolved(**BASE, step="pay", attempt=2, note="refunded by hand"),
    m.CancelRejected(**BASE, reason="the pivot has started"),
    m.CancelRejected(**BASE, reason="too late", message_id="m9", by="alice"),
    m.RequestDenied(**BASE, request="retry", message_id="m8", by="mallory", reason="no rule"),
    m.StepScheduled(**BASE, step="deliver", attempt=0, due_at=9.5),
    m.StepExpanded(**BASE, step="dishes", attempt=0, count=3),
    m.SagaCompensationAsked(**BASE, attempt=2, message_id="c", by="coordinator"),
    m.StepSkipped(**BASE, step="vet", attempt=0, reason="condition is false"),
    m.ApprovalReminded(
        **BASE, step="ok", attempt=1, escalated=True, recipients=["boss"], next_at=None
    ),
    m.SignalReceived(**BASE, name="cooked", data={"by": "chef"}, message_id="s1", by="kitchen"),
    m.SignalRejected(**BASE, name="cooked", reason="the saga is completed", message_id="s2"),
    m.SagaDeadlinePassed(**BASE, compensating=True),
    m.StepSucceeded(**BASE, step="wait", attempt=1, output={"x": 1}, signal="cooked"),
]
REQUESTS: list[BaseModel] = [
    m.StartSaga(message_id="m1", saga_id="saga-1", saga_name="order", input={"a": 1}, at=1.0),
    m.StartSaga(
        message_id="m1", saga_id="s", saga_name="order", input={}, at=1.0, if_exists="refuse"
    ),
    m.CancelSaga(message_id="m2", saga_id="saga-1", at=2.0),
    m.CancelSaga(message_id="m3", saga_id="saga-1", reason="changed my mind", at=2.0),
    m.RetrySaga(message_id="m4", saga_id="saga-1", at=3.0),
    m.RetrySaga(message_id="m6", saga_id="saga-1", at=3.0, reason="db back", by="alice"),
    m.SignalSaga(message_id="m7", saga_id="saga-1", name="cooked", data={"n": 1}, at=5.0),
    m.CompensateSaga(
        message_id="m9",
        saga_id="p/ship",
        parent=m.ParentRef(saga_id="p", step="ship", attempt=1),
        at=7.0,
    ),
    m.DecideApproval(
        message_id="m8", saga_id="saga-1", step="ok", approve=False, note="too big", at=6.0
    ),
    m.ResolveSaga(message_id="m5", saga_id="saga-1", note="done by hand", at=4.0),
]
OTHERS: list[BaseModel] = [
    m.Command(
        message_id="saga-1/pay/action/1",
        saga_id="saga-1",
        saga_name="order",
        saga_version=2,
        step="pay",
        phase="action",
        service="billing",
        action="charge",
        attempt=1,
        idempotency_key="saga-1/pay/action",
        payload={"amount": 12.5},
        deadline_at=31.0,
        at=1.0,
    ),
    m.Reply(
        message_id="r1",
        saga_id="saga-1",
        step="pay",
        phase="action",
        attempt=1,
        service="billing",
        ok=True,
        output={"charge": "c-1"},
        at=2.0,
    ),
    m.Reply(
        message_id="r2",
        saga_id="saga-1",
        step="pay",
        phase="compensation",
        attempt=2,
        service="billing",
        ok=False,
        error=ERR,
        at=2.0,
    ),
    m.Snapshot(saga_id="saga-1", state={"status": "running", "steps": {"pay": {"attempt": 1}}}),
    m.Checkpoint(partition=3, log_offset=12_345),
    m.Checkpoint(partition=3, log_offset=12_345, partitions=6),
    m.Alert(saga_id="saga-1", saga_name="order", reason="stuck", steps=["pay"], at=5.0),
]


def _adapter_for(message: BaseModel) -> TypeAdapter[Any]:
    if message in EVENTS:
        return m.event_adapter
    if message in REQUESTS:
        return m.request_adapter
    return TypeAdapter(type(message))


def test_every_event_and_request_type_is_covered() -> None:
    (event_union, _) = typing.get_args(m.Event)
    assert {type(e) for e in EVENTS} == set(typing.get_args(event_union))
    assert {type(r) for r in REQUESTS} == set(typing.get_args(m.Request))


@pytest.mark.parametrize("message", EVENTS + REQUESTS + OTHERS, ids=lambda x: f"{type(x).__name__}")
def test_round_trip(message: BaseModel) -> None:
    data = encode(message)
    assert isinstance(data, bytes)
    decoded = decode(_adapter_for(message), data)
    assert decoded == message
    assert type(decoded) is type(message)
    assert encode(decoded) == data
    as_json = orjson.loads(data)
    assert as_json["v"] == m.SCHEMA_VERSION
    assert b'": ' not in data  # compact: no space after a key
    assert data == orjson.dumps(as_json)


@pytest.mark.parametrize("message", EVENTS, ids=lambda x: f"{type(x).__name__}")
def test_an_event_is_not_a_request(message: BaseModel) -> None:
    with pytest.raises(DecodeError) as caught:
        decode(m.request_adapter, encode(message))
    assert caught.value.reason == "invalid_message"


def test_new_optional_fields_are_written_only_when_set_and_old_records_still_read() -> None:
    # Records written before the id-reuse policy, the definition digest and the recorded
    # partition count still decode; and a record that does not use them is written as before.
    start = REQUESTS[0]
    assert b"if_exists" not in encode(start)
    assert start.if_exists == "return"  # type: ignore[attr-defined]
    assert b'"if_exists":"refuse"' in encode(REQUESTS[1])
    old_start = (
        b'{"v":1,"type":"start","message_id":"m","saga_id":"s","saga_name":"n","input":{},"at":1}'
    )
    assert decode(m.request_adapter, old_start).if_exists == "return"  # type: ignore[union-attr]
    started = EVENTS[0]
    assert b"digest" not in encode(started)
    assert orjson.loads(encode(EVENTS[1]))["digest"] == "0123abcd"
    checkpoint = decode(
        m.snapshot_adapter, b'{"v":1,"type":"checkpoint","partition":1,"log_offset":5}'
    )
    assert isinstance(checkpoint, m.Checkpoint)
    assert checkpoint.partitions is None
    assert b"partitions" not in encode(checkpoint)
    assert orjson.loads(encode(OTHERS[-2]))["partitions"] == 6


def test_a_command_carries_its_budget_and_one_written_before_budgets_still_reads() -> None:
    command = OTHERS[0]
    assert isinstance(command, m.Command)
    with_budget = command.model_copy(update={"budget": 30.0})
    assert decode(m.command_adapter, encode(with_budget)) == with_budget
    old = orjson.loads(encode(command))
    old.pop("budget", None)
    decoded = decode(m.command_adapter, orjson.dumps(old))
    assert decoded.budget is None  # the participant uses deadline_at - at, the same span
    assert decoded.deadline_at - decoded.at == 30.0


@pytest.mark.parametrize("policy", ["replace", "", None, 1])
def test_an_unknown_id_reuse_policy_is_an_invalid_message(policy: Any) -> None:
    error = _reason(orjson.dumps({**_valid(), "if_exists": policy}))
    assert error.reason == "invalid_message"
    assert "if_exists" in error.detail


def _valid() -> dict[str, Any]:
    return orjson.loads(encode(REQUESTS[0]))


def _reason(data: bytes | None, limits: Limits = DEFAULT_LIMITS) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        decode(m.request_adapter, data, limits)
    assert isinstance(caught.value, SagaError)
    assert str(caught.value).startswith(f"{caught.value.reason}: ")
    return caught.value


@pytest.mark.parametrize("data", [b"", None])
def test_empty(data: bytes | None) -> None:
    assert _reason(data).reason == "empty"


def test_too_large() -> None:
    data = orjson.dumps({**_valid(), "input": {"blob": "x" * DEFAULT_LIMITS.max_bytes}})
    error = _reason(data)
    assert error.reason == "too_large"
    assert str(DEFAULT_LIMITS.max_bytes) in error.detail
    # The size is checked before parsing: a huge message of garbage is too large, not invalid.
    assert _reason(b"\xff" * 101, Limits(max_bytes=100)).reason == "too_large"
    # Exactly at the limit is fine.
    exact = encode(REQUESTS[0])
    assert decode(m.request_adapter, exact, Limits(max_bytes=len(exact))) == REQUESTS[0]


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe{}",
        b'{"v":1,"type":"start","message_id":"\xc3\x28"}',
        b"\x80",
        b'{"a":"\xed\xa0\x80"}',
    ],
)
def test_invalid_utf8(data: bytes) -> None:
    assert _reason(data).reason == "invalid_utf8"


@pytest.mark.parametrize(
    "data",
    [
        b"{",
        b"   ",
        b'{"v": 1,}',
        b"{'v': 1}",
        b'{"v": NaN}',
        b'{"v": 1} trailing',
        b"\xef\xbb\xbf{}",  # a UTF-8 byte order mark
    ],
)
def test_invalid_json(data: bytes) -> None:
    assert _reason(data).reason == "invalid_json"


def _nested(depth: int) -> bytes:
    """A valid start request whose input holds ``depth`` nested lists (object + input = 2)."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return orjson.dumps({**_valid(), "input": {"deep": value}})


def test_too_deep() -> None:
    limit = DEFAULT_LIMITS.max_depth
    assert decode(m.request_adapter, _nested(limit - 2)) is not None
    assert _reason(_nested(limit - 1)).reason == "too_deep"
    deep_dicts: Any = {}
    for _ in range(50):
        deep_dicts = {"d": deep_dicts}
    assert _reason(orjson.dumps({**_valid(), "input": deep_dicts})).reason == "too_deep"
    assert _reason(_nested(10), Limits(max_depth=5)).reason == "too_deep"


def test_very_deep_nesting_is_too_deep_not_invalid_json() -> None:
    # (built as text: orjson will not even write JSON this deep)
    valid = orjson.dumps({**_valid(), "input": {"deep": None}})
    data = valid.replace(b"null", b"[" * 2_000 + b"1" + b"]" * 2_000)
    assert len(data) < DEFAULT_LIMITS.max_bytes
    assert _reason(data).reason == "too_deep"


@pytest.mark.parametrize("data", [b"[]", b"[1, 2]", b"42", b'"start"', b"null", b"true", b"1.5"])
def test_not_an_object(data: bytes) -> None:
    assert _reason(data).reason == "not_an_object"


@pytest.mark.parametrize("version", [0, 2, 99, "1", None, 1.5])
def test_unknown_schema_version(version: Any) -> None:
    error = _reason(orjson.dumps({**_valid(), "v": version}))
    assert error.reason == "unknown_schema_version"
    assert repr(version) in error.detail


@pytest.mark.parametrize("version", [[1], {"major": 1}])
def test_unhashable_schema_version_is_a_decode_error(version: Any) -> None:
    assert _reason(orjson.dumps({**_valid(), "v": version})).reason == "unknown_schema_version"


def test_missing_schema_version() -> None:
    data = _valid()
    del data["v"]
    assert _reason(orjson.dumps(data)).reason == "unknown_schema_version"


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"colour": "red"}, "colour"),  # an unknown field
        ({"type": "launch"}, "message"),  # an unknown message type
        ({"saga_id": 7}, "saga_id"),
        ({"input": [1, 2]}, "input"),
        ({"at": "yesterday"}, "at"),
        ({"message_id": None}, "message_id"),
    ],
)
def test_invalid_message(change: dict[str, Any], where: str) -> None:
    error = _reason(orjson.dumps({**_valid(), **change}))
    assert error.reason == "invalid_message"
    assert where in error.detail


def test_invalid_message_missing_field() -> None:
    data = _valid()
    del data["saga_id"]
    error = _reason(orjson.dumps(data))
    assert error.reason == "invalid_message"
    assert "saga_id" in error.detail


def test_unknown_field_inside_a_nested_model() -> None:
    reply = orjson.loads(encode(OTHERS[2]))
    reply["error"]["stack"] = "..."
    with pytest.raises(DecodeError) as caught:
        decode(TypeAdapter(m.Reply), orjson.dumps(reply))
    assert caught.value.reason == "invalid_message"
    assert "error.stack" in caught.value.detail


def test_an_event_with_seq_zero_is_invalid() -> None:
    data = orjson.loads(encode(EVENTS[0]))
    data["seq"] = 0
    with pytest.raises(DecodeError) as caught:
        decode(m.event_adapter, orjson.dumps(data))
    assert caught.value.reason == "invalid_message"
