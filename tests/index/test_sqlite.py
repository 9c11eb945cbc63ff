"""The SQLite index on its own: states fed directly, queries checked against `matches`.

No Kafka: the adapter is storage, and what its queries must return is said by
`saga.index.query.select` (the pure reference). Every filter, and paging through a whole result
by cursor, must agree with it.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from saga.core.state import SagaState, SagaStatus, StepState, StepStatus
from saga.errors import ConfigurationError
from saga.index import (
    BadRecord,
    Change,
    CursorError,
    HistoryEntry,
    SagaQuery,
    SagaRow,
    SqliteSagaIndex,
)
from saga.index.query import select

STEPS = ("payment", "kitchen", "rider")
CUSTOMERS = ("c-1", "c-2", "c-3", "c-4")


def make_state(i: int, rng: random.Random) -> SagaState:
    """A varied saga state: names, versions, statuses, steps and inputs drawn from small sets,
    so that every filter matches some and misses others; updated times collide on purpose."""
    status = rng.choice(list(SagaStatus))
    steps = {
        s: StepState(status=rng.choice(list(StepStatus)))
        for s in STEPS[: rng.randint(1, len(STEPS))]
    }
    started = 1000.0 + rng.randint(0, 50)
    inp: dict[str, Any] = {"customer": rng.choice(CUSTOMERS), "total": rng.choice([5, 12, 12.5])}
    if rng.random() < 0.3:
        inp["tags"] = {"b": 2, "a": [1, "x"]}
    return SagaState(
        saga_id=f"{rng.choice(['order', 'trip'])}-{i:04d}",
        name=rng.choice(["order", "trip"]),
        version=rng.randint(1, 3),
        status=status,
        input=inp,
        steps=steps,
        seq=rng.randint(1, 9),
        started_at=started,
        updated_at=started + rng.randint(0, 5),
    )


@pytest.fixture
def states() -> list[SagaState]:
    rng = random.Random(7)
    return [make_state(i, rng) for i in range(300)]


@pytest.fixture
def index(tmp_path: Path, states: list[SagaState]) -> SqliteSagaIndex:
    ix = SqliteSagaIndex(tmp_path / "index.sqlite3", prefix="t")
    # In several batches, as the projector writes them.
    for start in range(0, len(states), 70):
        rows = {s.saga_id: SagaRow(s, 0, n) for n, s in enumerate(states[start : start + 70])}
        ix.write(Change(rows=rows, at=2000.0))
    return ix


def page_through(index: SqliteSagaIndex, query: SagaQuery) -> tuple[list[str], set[int]]:
    """Every saga id of ``query``'s result, page by page, and the totals the pages gave."""
    ids: list[str] = []
    totals: set[int] = set()
    cursor = None
    for _ in range(1000):
        page = index.query(SagaQuery(**{**query.__dict__, "cursor": cursor}))
        ids += [r.state.saga_id for r in page.rows]
        totals.add(page.total)
        cursor = page.next_cursor
        if cursor is None:
            return ids, totals
    raise AssertionError("paging did not end")


QUERIES = [
    SagaQuery(),
    SagaQuery(name="order"),
    SagaQuery(status=["stuck", "compensated"]),
    SagaQuery(name="trip", version=2),
    SagaQuery(step="rider"),
    SagaQuery(step="kitchen", step_status="failed"),
    SagaQuery(step_status="stuck"),
    SagaQuery(started_after=1010, started_before=1030),
    SagaQuery(updated_after=1040),
    SagaQuery(updated_before=1005),
    SagaQuery(input={"customer": "c-2"}),
    SagaQuery(input={"customer": "c-2", "total": 12}),
    SagaQuery(input={"total": 12.5}),
    SagaQuery(input={"tags": {"a": [1, "x"], "b": 2}}),
    SagaQuery(input={"customer": "nobody"}),
    SagaQuery(saga_id_prefix="trip-00"),
    SagaQuery(name="order", status=["running"], input={"customer": "c-1"}, step="payment"),
]


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: repr(q)[9:60])
@pytest.mark.parametrize("limit", [1, 7, 50])
def test_queries_and_paging_agree_with_the_reference(
    index: SqliteSagaIndex, states: list[SagaState], query: SagaQuery, limit: int
) -> None:
    query = SagaQuery(**{**query.__dict__, "limit": limit})
    expected, total, _ = select(SagaQuery(**{**query.__dict__, "limit": 1000}), states)
    ids, totals = page_through(index, query)
    assert ids == [s.saga_id for s in expected]
    assert totals == {total}
    first = index.query(query)
    assert [r.state for r in first.rows] == expected[:limit]
    assert (first.next_cursor is None) == (total <= limit)


def test_the_reference_selects_something_and_not_everything(states: list[SagaState]) -> None:
    # Guards the test above: a filter that matched nothing (or all) would prove little.
    sizes = {
        repr(q): select(SagaQuery(**{**q.__dict__, "limit": 1000}), states)[1] for q in QUERIES
    }
    assert sizes.pop(repr(SagaQuery())) == len(states)
    assert sizes.pop(repr(SagaQuery(input={"customer": "nobody"}))) == 0
    assert all(0 < n < len(states) for n in sizes.values()), sizes


def test_get_counts_history_and_generation(index: SqliteSagaIndex, states: list[SagaState]) -> None:
    s = states[10]
    row = index.get(s.saga_id)
    assert row is not None
    assert row.state == s
    assert index.get("nope") is None
    by_status: dict[str, int] = {}
    for st in states:
        by_status[st.status.value] = by_status.get(st.status.value, 0) + 1
    assert index.counts() == dict(sorted(by_status.items()))
    orders = [st for st in states if st.name == "order"]
    assert sum(index.counts("order").values()) == len(orders)
    before = index.generation
    event = {"type": "saga_started", "saga_id": s.saga_id, "seq": 1, "at": 1.0}
    entries = [HistoryEntry(n, "x", float(n), 0, 100 + n, {**event, "seq": n}) for n in (2, 1)]
    index.write(Change(events=[(s.saga_id, e) for e in entries], at=3000.0))
    # The same events again (a replay): recorded once.
    index.write(Change(events=[(s.saga_id, e) for e in entries], at=3001.0))
    assert [h.seq for h in index.history(s.saga_id)] == [1, 2]
    assert index.history(s.saga_id)[1].event["seq"] == 2
    assert index.history("nope") == []
    assert index.generation == before + 2
    index.write(Change(positions={("t.log", 0): 5}))  # offsets only: no new generation
    assert index.generation == before + 2
    assert index.positions()[("t.log", 0)] == 5


def test_lag_is_measured_against_the_log_ends(tmp_path: Path) -> None:
    ix = SqliteSagaIndex(tmp_path / "i.sqlite3", prefix="t")
    assert ix.lag().total == 0
    assert ix.lag().updated_at is None
    ix.write(Change(positions={("t.log", 0): 3, ("t.log", 1): 10}, log_ends={0: 8, 1: 10}))
    lag = ix.lag()
    assert lag.behind == {0: 5, 1: 0}
    assert lag.total == 5
    ix.write(Change(log_ends={0: 2}))  # an older end (a stale checkpoint) never lowers it
    assert ix.lag().behind == {0: 5, 1: 0}
    bad = BadRecord("t.log", 0, 1, "k", "undecodable")
    ix.write(Change(bad=[bad], at=42.0, caught_up=True))
    info = ix.info()
    assert info.bad == 1
    assert list(info.recent_bad) == [bad]
    assert info.looked_at == 42.0
    assert ix.lag().updated_at == 42.0
    assert ix.lag().looked_at == 42.0
    ix.write(Change(positions={("t.log", 0): 4}, at=50.0, caught_up=True))  # a look, no change
    assert (ix.lag().updated_at, ix.lag().looked_at) == (42.0, 50.0)


def test_a_bad_cursor_is_refused(index: SqliteSagaIndex) -> None:
    with pytest.raises(CursorError):
        index.query(SagaQuery(cursor="not-a-cursor"))


def test_reset_drops_everything_and_the_prefix_is_checked(
    index: SqliteSagaIndex, tmp_path: Path
) -> None:
    index.write(Change(positions={("t.log", 0): 9}))
    index.reset()
    assert index.query(SagaQuery()).total == 0
    assert index.positions() == {}
    assert index.generation == 0
    index.close()
    with pytest.raises(ConfigurationError, match="prefix 't'"):
        SqliteSagaIndex(tmp_path / "index.sqlite3", prefix="other")
    with pytest.raises(ConfigurationError, match="no saga index"):
        SqliteSagaIndex(tmp_path / "missing.sqlite3", readonly=True)


def test_a_second_writer_is_refused_while_the_first_runs(index: SqliteSagaIndex) -> None:
    with pytest.raises(ConfigurationError, match="another process"):
        SqliteSagaIndex(index.path, prefix="t")
    index.close()
    SqliteSagaIndex(index.path, prefix="t").close()  # free again once the first closed


READER = """
import sys, orjson
from saga.index import SagaQuery, SqliteSagaIndex
ix = SqliteSagaIndex(sys.argv[1], readonly=True)
page = ix.query(SagaQuery(status=["running"], limit=1000))
ids = [r.state.saga_id for r in page.rows]
print(orjson.dumps({"ids": ids, "wal": ix.journal_mode()}).decode())
"""


def test_a_reader_in_another_process_sees_committed_batches(
    index: SqliteSagaIndex, states: list[SagaState]
) -> None:
    running = sorted(
        (s for s in states if s.status is SagaStatus.RUNNING),
        key=lambda s: (s.updated_at, s.saga_id),
        reverse=True,
    )
    out = subprocess.run(
        [sys.executable, "-c", READER, str(index.path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    seen = orjson.loads(out.stdout)
    assert seen["wal"] == "wal"
    assert seen["ids"] == [s.saga_id for s in running]


def test_counts_and_totals_follow_a_saga_that_changes_status(tmp_path: Path) -> None:
    ix = SqliteSagaIndex(tmp_path / "i.sqlite3", prefix="t")
    s = make_state(1, random.Random(3)).model_copy(update={"status": SagaStatus.RUNNING})
    ix.write(Change(rows={s.saga_id: SagaRow(s, 0, 1)}))
    assert ix.counts() == {"running": 1}
    done = s.model_copy(update={"status": SagaStatus.COMPLETED, "seq": s.seq + 1})
    ix.write(Change(rows={s.saga_id: SagaRow(done, 0, 2)}))
    ix.write(Change(rows={s.saga_id: SagaRow(done, 0, 2)}))  # the same again: no double count
    assert ix.counts() == {"completed": 1}
    assert ix.counts(s.name) == {"completed": 1}
    assert ix.counts("other") == {}
    assert ix.query(SagaQuery(status=["running"])).total == 0
    assert ix.query(SagaQuery(status=["completed"], name=s.name)).total == 1
