"""Records written by release 1 (before the decoding and folding were made faster) still decode,
fold to the same states, and encode back to the same bytes: the wire format did not move.

``recorded/release1.jsonl`` holds, one record a line, the log of a 3-step saga whose second step
failed once and was retried (``rec-1``), the log of a saga parked on a ``wait`` step (``rec-2``),
and ``rec-2``'s snapshot, all as the engine wrote them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saga.core.codec import ENGINE_LIMITS, decode, encode
from saga.core.messages import Snapshot, event_adapter, snapshot_adapter
from saga.core.replay import Replay
from saga.core.state import SagaState, SagaStatus, StepStatus

RECORDS = (Path(__file__).parent / "recorded" / "release1.jsonl").read_bytes().splitlines()


@dataclass(frozen=True)
class Rec:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def test_every_recorded_record_decodes_and_encodes_back_to_its_bytes() -> None:
    *log, snapshot = RECORDS
    assert len(log) == 14
    for value in log:
        assert encode(decode(event_adapter, value, ENGINE_LIMITS)) == value
    item = decode(snapshot_adapter, snapshot, ENGINE_LIMITS)
    assert isinstance(item, Snapshot)
    assert encode(item) == snapshot
    assert (
        encode(
            Snapshot(
                saga_id="rec-2", state=SagaState.model_validate(item.state).model_dump(mode="json")
            )
        )
        == snapshot
    )


def test_the_recorded_log_folds_to_the_recorded_states() -> None:
    *log, snapshot = RECORDS
    fold: Replay[Rec] = Replay()
    for offset, value in enumerate(log):
        fold.add_log_record(Rec("saga.log", 0, offset, None, value))
    assert not fold.unusable
    done, parked = fold.states["rec-1"], fold.states["rec-2"]
    assert done.status is SagaStatus.COMPLETED
    assert done.steps["restaurant"].attempt == 2
    assert done.steps["restaurant"].uncertain is False
    assert parked.status is SagaStatus.RUNNING
    assert [s.status for s in parked.steps.values()] == [
        StepStatus.SUCCEEDED,
        StepStatus.RUNNING,
        StepStatus.PENDING,
    ]
    from_snapshot: Replay[Rec] = Replay()
    from_snapshot.add_snapshot(Rec("saga.snapshots", 0, 0, b"rec-2", snapshot))
    assert not from_snapshot.unusable
    assert from_snapshot.states["rec-2"] == parked
    assert from_snapshot.states["rec-2"].model_dump() == parked.model_dump()
    assert encode(Snapshot(saga_id="rec-2", state=parked.model_dump(mode="json"))) == snapshot
