"""The snapshot written on the hot path is byte for byte the `Snapshot` message's encoding."""

from __future__ import annotations

from saga.core.codec import decode, encode
from saga.core.messages import Snapshot, snapshot_adapter
from saga.core.state import SagaState
from saga.core.wire import ParentRef
from saga.runtime.partition import snapshot_value
from tests.core.support import Driver, chain


def _states() -> list[SagaState]:
    driver = Driver(chain("reserve", "charge", "ship"), saga_id='saga-é/1 "quoted"')
    driver.start({"order": 7, "note": "ünïcode ☕", "nested": {"a": [1, 2.5, None, True]}})
    states = [driver.state]
    driver.reply(driver.inflight.pop(0), "ok", output={"reservation": "r-1"})
    states.append(driver.state)
    driver.reply(driver.inflight.pop(0), "business")  # charge fails: compensation follows
    states.append(driver.state)
    while driver.inflight:
        driver.reply(driver.inflight.pop(0), "ok")
        states.append(driver.state)
    last = driver.state
    assert last is not None
    parent = ParentRef(saga_id="parent", step="child", attempt=2)
    states.append(
        last.model_copy(
            update={
                "deadline_at": 99.5,
                "signals": {"kitchen": {"ok": True}},
                "parent": parent,
                "requests": ("m-1", "m-2"),
                "digest": "sha256:abc",
            }
        )
    )
    return [s for s in states if s is not None]


def test_snapshot_value_is_the_encoding_of_the_snapshot_message() -> None:
    states = _states()
    assert len(states) >= 5
    for state in states:
        expected = encode(Snapshot(saga_id=state.saga_id, state=state.model_dump(mode="json")))
        assert snapshot_value(state) == expected
        decoded = decode(snapshot_adapter, snapshot_value(state))
        assert isinstance(decoded, Snapshot)
        assert SagaState.model_validate(decoded.state) == state
