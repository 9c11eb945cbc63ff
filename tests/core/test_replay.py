"""The one fold (`saga.core.replay`): snapshots, then the log after the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from saga.core.codec import encode
from saga.core.messages import (
    Checkpoint,
    EventBase,
    SagaCompleted,
    SagaStarted,
    Snapshot,
    StepStarted,
    StepSucceeded,
)
from saga.core.replay import Replay, checkpoint_key, is_saga_key
from saga.core.state import SagaState, SagaStatus, StepStatus, evolve


@dataclass(frozen=True)
class Rec:
    """A stored record, as a topic would give it back."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def history(saga_id: str) -> list[EventBase]:
    return [
        SagaStarted(saga_id=saga_id, seq=1, at=1.0, name="n", version=1, input={}, steps=["a"]),
        StepStarted(saga_id=saga_id, seq=2, at=2.0, step="a", attempt=1, deadline_at=30.0),
        StepSucceeded(saga_id=saga_id, seq=3, at=3.0, step="a", attempt=1, output={"x": 1}),
        SagaCompleted(saga_id=saga_id, seq=4, at=4.0),
    ]


def fold(events: list[EventBase]) -> SagaState:
    state: SagaState | None = None
    for e in events:
        state = evolve(state, e)
    assert state is not None
    return state


def log_records(events: list[EventBase], start: int = 0, partition: int = 0) -> list[Rec]:
    return [
        Rec("log", partition, start + i, e.saga_id.encode(), encode(e))
        for i, e in enumerate(events)
    ]


def snapshot(state: SagaState, offset: int) -> Rec:
    snap = Snapshot(saga_id=state.saga_id, state=state.model_dump(mode="json"))
    return Rec("snapshots", 0, offset, state.saga_id.encode(), encode(snap))


def checkpoint(partition: int, log_offset: int, offset: int) -> Rec:
    value = encode(Checkpoint(partition=partition, log_offset=log_offset))
    return Rec("snapshots", partition, offset, checkpoint_key(partition), value)


def test_from_the_start_of_the_log_every_saga_is_folded_from_its_first_event() -> None:
    replay: Replay[Rec] = Replay()
    events = history("s1") + history("s2")
    folded = [replay.add_log_record(r) for r in log_records(events)]
    assert all(f is not None for f in folded)
    assert replay.states == {"s1": fold(history("s1")), "s2": fold(history("s2"))}
    assert replay.log_next == {0: 8}
    assert replay.unusable == []
    last = folded[-1]
    assert last is not None
    assert last.event == events[-1]
    assert last.state.status is SagaStatus.COMPLETED


def test_snapshots_then_the_log_after_the_checkpoint() -> None:
    events = history("s1")
    replay: Replay[Rec] = Replay()
    replay.add_snapshot(snapshot(fold(events[:2]), 0))
    replay.add_snapshot(checkpoint(0, 2, 1))
    assert replay.start_offset(0) == 2
    assert replay.start_offset(1) == 0  # no checkpoint: from the start
    for record in log_records(events[2:], start=2):
        replay.add_log_record(record)
    assert replay.states["s1"] == fold(events)
    assert replay.log_next == {0: 4}


def test_events_the_snapshot_already_holds_are_passed_over() -> None:
    events = history("s1")
    replay: Replay[Rec] = Replay()
    replay.add_snapshot(snapshot(fold(events[:3]), 0))
    results = [replay.add_log_record(r) for r in log_records(events)]
    assert results[:3] == [None, None, None]
    assert results[3] is not None
    assert replay.states["s1"] == fold(events)
    assert replay.unusable == []  # covered is not unusable


def test_the_latest_snapshot_wins_and_a_tombstone_removes_the_saga() -> None:
    events = history("s1")
    replay: Replay[Rec] = Replay()
    replay.add_snapshot(snapshot(fold(events[:2]), 0))
    replay.add_snapshot(snapshot(fold(events[:3]), 1))
    assert replay.states["s1"].steps["a"].status is StepStatus.SUCCEEDED
    replay.add_snapshot(Rec("snapshots", 0, 2, b"s1", None))
    assert "s1" not in replay.states
    # A checkpoint's tombstone (compaction never writes one, but a foreign writer might) is not
    # a saga's and removes nothing.
    replay.add_snapshot(snapshot(fold(events), 3))
    replay.add_snapshot(Rec("snapshots", 0, 4, checkpoint_key(0), None))
    assert "s1" in replay.states


def test_bad_snapshots_are_returned_with_their_reason_and_the_rest_goes_on() -> None:
    events = history("s1")
    good = snapshot(fold(events), 3)
    wrong_key = snapshot(fold(history("s2")), 4)
    wrong_key = Rec("snapshots", 0, 4, b"not-s2", wrong_key.value)
    broken_state = Snapshot(saga_id="s3", state={"saga_id": "s3"})
    bad = [
        Rec("snapshots", 0, 0, b"s1", b"{not json"),
        Rec("snapshots", 0, 1, b"s1", b'{"v": 1, "type": "snapshot"}'),
        Rec("snapshots", 0, 2, b"s3", encode(broken_state)),
        wrong_key,
    ]
    replay: Replay[Rec] = Replay()
    for record in [*bad[:3], good, bad[3]]:
        replay.add_snapshot(record)
    assert set(replay.states) == {"s1"}
    assert [u.record for u in replay.unusable] == bad
    assert {u.reason for u in replay.unusable} == {"bad_snapshot"}
    assert "wrong_key" in replay.unusable[3].detail


def test_bad_log_records_are_returned_and_do_not_stop_other_sagas() -> None:
    one, two = history("s1"), history("s2")
    records = log_records([one[0], two[0], one[1]])
    junk = Rec("log", 0, 3, b"s1", b"\xff\xfe")
    gap = Rec("log", 0, 4, b"s2", encode(two[2]))  # seq 3 after seq 1: a gap
    orphan = Rec("log", 0, 5, b"s9", encode(history("s9")[1]))  # no start
    tail = log_records(two[1:], start=6)
    replay: Replay[Rec] = Replay()
    for record in [*records, junk, gap, orphan, *tail]:
        replay.add_log_record(record)
    assert [u.record for u in replay.unusable] == [junk, gap, orphan]
    assert {u.reason for u in replay.unusable} == {"bad_log_record"}
    assert "does not follow" in replay.unusable[1].detail
    assert replay.states["s1"] == fold(one[:2])
    assert replay.states["s2"] == fold(two)
    assert "s9" not in replay.states
    assert replay.log_next == {0: 9}


def test_checkpoints_are_kept_per_partition_and_keys_tell_sagas_from_checkpoints() -> None:
    replay: Replay[Rec] = Replay()
    replay.add_snapshot(checkpoint(0, 7, 0))
    replay.add_snapshot(checkpoint(1, 3, 0))
    replay.add_snapshot(checkpoint(0, 9, 1))
    assert replay.checkpoints == {0: 9, 1: 3}
    assert not is_saga_key(checkpoint_key(4))
    assert not is_saga_key(None)
    assert is_saga_key(b"order-1")


def test_add_event_folds_decoded_events_alike() -> None:
    events = history("s1")
    replay: Replay[Rec] = Replay()
    assert all(replay.add_event(e) is not None for e in events)
    assert replay.add_event(events[1]) is None  # already folded
    assert replay.states["s1"] == fold(events)
