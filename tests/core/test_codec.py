"""The codec: round trips, and one poison message per dead-letter reason."""

from __future__ import annotations

import orjson
import pytest

from saga.core.codec import Limits, decode, encode
from saga.core.messages import (
    Command,
    ErrorInfo,
    Reply,
    SagaStarted,
    StartSaga,
    StepRetryScheduled,
    event_adapter,
    request_adapter,
)
from saga.errors import DecodeError

START = StartSaga(message_id="m", saga_id="s", saga_name="n", input={"a": [1, {"b": 2}]}, at=1.5)


def test_round_trips() -> None:
    from pydantic import TypeAdapter

    assert decode(request_adapter, encode(START)) == START
    event = StepRetryScheduled(
        saga_id="s",
        seq=3,
        at=2.0,
        step="x",
        attempt=1,
        error=ErrorInfo(type="Boom", message="no"),
        retry_at=4.0,
    )
    assert decode(event_adapter, encode(event)) == event
    started = SagaStarted(saga_id="s", seq=1, at=1.0, name="n", version=1, input={}, steps=["x"])
    assert decode(event_adapter, encode(started)) == started
    for model in (
        Command(
            message_id="c",
            saga_id="s",
            saga_name="n",
            saga_version=1,
            step="x",
            phase="action",
            service="svc",
            action="do",
            attempt=1,
            idempotency_key="k",
            payload={},
            deadline_at=9.0,
            at=1.0,
        ),
        Reply(
            message_id="r",
            saga_id="s",
            step="x",
            phase="compensation",
            attempt=2,
            service="svc",
            ok=True,
            output={"z": None},
            at=1.0,
        ),
    ):
        assert decode(TypeAdapter(type(model)), encode(model)) == model


def nested(depth: int) -> bytes:
    body: object = 1
    for _ in range(depth):
        body = [body]
    data = orjson.loads(encode(START))
    data["input"] = {"deep": body}
    return orjson.dumps(data)


def with_field(**extra: object) -> bytes:
    return orjson.dumps({**orjson.loads(encode(START)), **extra})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty"),
        (b"x" * 2000, "too_large"),
        (b"\xff\xfe{}", "invalid_utf8"),
        (b'{"v": 1, "type": "start"', "invalid_json"),
        (nested(40), "too_deep"),
        (b"[1, 2]", "not_an_object"),
        (with_field(v=2), "unknown_schema_version"),
        (with_field(extra="field"), "invalid_message"),
        (with_field(type="launch"), "invalid_message"),
        (with_field(saga_id=7), "invalid_message"),
    ],
)
def test_each_poison_message_has_its_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(request_adapter, raw, Limits(max_bytes=1000, max_depth=32))
    assert info.value.reason == reason


def test_depth_limit_is_exact() -> None:
    limits = Limits(max_depth=32)
    decode(request_adapter, nested(30), limits)  # the message, its input, and 30 lists: 32
    with pytest.raises(DecodeError):
        decode(request_adapter, nested(31), limits)


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    # More brackets than the depth limit, all in strings: the message is only 2 levels deep.
    data = with_field(input={"text": "[[[[{{{{" * 10})
    assert decode(request_adapter, data, Limits(max_bytes=10_000, max_depth=2)).input == {
        "text": "[[[[{{{{" * 10
    }
    with pytest.raises(DecodeError) as info:
        decode(request_adapter, data, Limits(max_bytes=10_000, max_depth=1))
    assert info.value.reason == "too_deep"
