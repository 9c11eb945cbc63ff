"""`saga watch`: live progress of sagas, folded from the log as it grows.

The watcher needs every partition of the log and no share of anyone's work, so it joins no
consumer group (a group member would take partitions away from coordinators' tools, or be given
only some). It tails with the transport port alone: every ``interval`` it reads each partition
from where it stopped to the current end (`Transport.read`), which works the same on the memory
transport and on Kafka.

Folding needs each saga's state before the first event it reads. From the start of the log
(``from_start``) every saga begins with its ``saga_started``. From the end, the watcher does what
a coordinator does on recovery: it loads the snapshots, then reads the log from each partition's
checkpoint, skipping events the snapshots already hold; only what comes after is shown.

Output: on a terminal, a frame redrawn in place (ANSI) with a progress bar per active saga and
totals by status; elsewhere, one line per folded event and the totals at the end; with
``as_json``, one JSON object per folded event.
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

import anyio
import orjson

from saga.core.codec import decode
from saga.core.messages import EventBase, Snapshot, event_adapter
from saga.core.state import SagaState, SagaStatus, StepStatus, evolve
from saga.errors import DecodeError, IllegalTransition
from saga.runtime.ports import Record, Topics, Transport
from saga.views.rebuild import snapshot_adapter

__all__ = ["Progress", "watch"]

_BAR = 20
_BUSY = frozenset(
    {
        StepStatus.RUNNING,
        StepStatus.RETRYING,
        StepStatus.COMPENSATING,
        StepStatus.COMPENSATION_RETRYING,
        StepStatus.STUCK,
    }
)


@dataclass
class Progress:
    """What the watcher knows: every saga's state and what it saw happen."""

    states: dict[str, SagaState] = field(default_factory=dict)
    events: int = 0
    """Events folded since the watch began (catching up from a checkpoint not counted)."""
    finished: int = 0
    """Sagas that reached a final status since the watch began."""
    unfoldable: int = 0
    """Events that could not be folded (their saga's start precedes what was read, or illegal)."""
    started_at: float = 0.0
    """`anyio.current_time` when the watch began."""

    def fold(self, event: EventBase) -> SagaState | None:
        """Folds one event; returns the new state, or ``None`` if the event was not used."""
        state = self.states.get(event.saga_id)
        if state is not None and event.seq <= state.seq:
            return None  # already in the snapshot we started from
        if state is None and event.seq != 1:
            self.unfoldable += 1
            return None
        try:
            new = evolve(state, event)
        except IllegalTransition:
            self.unfoldable += 1
            return None
        self.states[event.saga_id] = new
        return new

    def totals(self) -> dict[str, int]:
        """Sagas per status, every status listed."""
        found = Counter(s.status.value for s in self.states.values())
        return {s.value: found.get(s.value, 0) for s in SagaStatus}

    def rate(self, now: float) -> float:
        """Sagas finished per second since the watch began."""
        elapsed = now - self.started_at
        return self.finished / elapsed if elapsed > 0 else 0.0


async def watch(
    transport: Transport,
    topics: Topics,
    *,
    out: TextIO | None = None,
    from_start: bool = False,
    until_idle: float | None = None,
    limit: int = 20,
    as_json: bool = False,
    interval: float = 0.5,
    tty: bool | None = None,
) -> Progress:
    """Tails the log and shows progress until cancelled, or until idle.

    Args:
        transport: The broker.
        topics: The engine's topic names (the prefix).
        out: Where to write (standard output by default).
        from_start: Read the log from offset 0 instead of from its current end.
        until_idle: Return after this many seconds without a new event (``None``: never).
        limit: Most sagas drawn in the live frame.
        as_json: One JSON line per folded event instead of text.
        interval: Seconds between reads of the log.
        tty: Redraw in place; by default, when ``out`` is a terminal.

    Returns:
        What was seen, for callers that watch from code (tests, scripts).
    """
    out = out or sys.stdout
    live = (tty if tty is not None else _isatty(out)) and not as_json
    progress = Progress(started_at=anyio.current_time())
    count = await transport.partitions(topics.log)
    if from_start:
        positions = dict.fromkeys(range(count), 0)
    else:
        positions = await _catch_up(transport, topics, count, progress)
        if not live and not as_json:
            active = sum(not s.is_final for s in progress.states.values())
            _write(out, f"watching {topics.log} from its end: {active} sagas in progress")
    drawn = 0
    last_event = anyio.current_time()
    while True:
        records = await _read_new(transport, topics.log, positions)
        folded = 0
        for record in records:
            event = _decode(record)
            state = progress.fold(event) if event is not None else None
            if event is None or state is None:
                continue
            folded += 1
            progress.events += 1
            if state.is_final:
                progress.finished += 1
            if as_json:
                _write(out, orjson.dumps(_update(event, state)).decode())
            elif not live:
                _write(out, _line(event, state))
        now = anyio.current_time()
        if folded:
            last_event = now
        if live and (folded or not drawn):
            drawn = _redraw(out, _frame(progress, topics, limit, now), drawn)
        if until_idle is not None and now - last_event >= until_idle:
            break
        await anyio.sleep(interval)
    if not live and not as_json:
        now = anyio.current_time()
        _write(out, f"{_totals_line(progress)}  |  {_rate_line(progress, now)}")
    return progress


async def _catch_up(
    transport: Transport, topics: Topics, count: int, progress: Progress
) -> dict[int, int]:
    """Loads the snapshots and folds the log after the checkpoints; returns the log's ends."""
    checkpoints: dict[int, int] = {}
    starts = dict.fromkeys(range(await transport.partitions(topics.snapshots)), 0)
    for record in await _read_new(transport, topics.snapshots, starts):
        if record.value is None:
            if record.key is not None:
                progress.states.pop(record.key.decode(errors="replace"), None)
            continue
        try:
            item = decode(snapshot_adapter, record.value)
            if isinstance(item, Snapshot):
                progress.states[item.saga_id] = SagaState.model_validate(item.state)
            else:
                checkpoints[item.partition] = item.log_offset
        except (DecodeError, ValueError):
            continue  # a view shows what it can; `saga rebuild` reports bad records
    positions = {p: checkpoints.get(p, 0) for p in range(count)}
    for record in await _read_new(transport, topics.log, positions):
        event = _decode(record)
        if event is not None:
            progress.fold(event)
    progress.unfoldable = 0  # sagas that began before the checkpoints are not a problem
    return positions


async def _read_new(transport: Transport, topic: str, positions: dict[int, int]) -> list[Record]:
    """Every partition's records from its position to its end now; advances the positions."""
    found: dict[int, list[Record]] = {}

    async def read(p: int) -> None:
        found[p] = [r async for r in transport.read(topic, p, positions[p])]

    async with anyio.create_task_group() as tg:
        for p in positions:
            tg.start_soon(read, p)
    records = []
    for p in sorted(found):
        if found[p]:
            positions[p] = found[p][-1].offset + 1
            records += found[p]
    return records


def _decode(record: Record) -> EventBase | None:
    try:
        return decode(event_adapter, record.value)
    except DecodeError:
        return None  # shown nowhere here; `saga rebuild` lists undecodable records


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


def _write(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


def _current(state: SagaState) -> str:
    busy = [name for name, s in state.steps.items() if s.status in _BUSY]
    return ",".join(busy) or "-"


def _update(event: EventBase, state: SagaState) -> dict[str, object]:
    return {
        "saga_id": state.saga_id,
        "name": state.name,
        "status": state.status.value,
        "percent": state.percent_complete(),
        "seq": event.seq,
        "event": getattr(event, "type", None),
        "step": getattr(event, "step", None),
        "current": _current(state),
        "at": event.at,
    }


def _line(event: EventBase, state: SagaState) -> str:
    at = datetime.fromtimestamp(event.at, UTC).strftime("%H:%M:%S.%f")[:-3]
    kind = getattr(event, "type", "event")
    step = getattr(event, "step", None) or ""
    return (
        f"{at}  {state.saga_id}  {state.name}  {state.status.value:<12} "
        f"{state.percent_complete():>3}%  {kind} {step}".rstrip()
    )


def _bar(percent: int) -> str:
    full = percent * _BAR // 100
    return "[" + "#" * full + "-" * (_BAR - full) + "]"


def _totals_line(progress: Progress) -> str:
    return "totals  " + "  ".join(f"{k} {v}" for k, v in progress.totals().items())


def _rate_line(progress: Progress, now: float) -> str:
    return (
        f"{progress.events} events, {progress.finished} finished, {progress.rate(now):.2f} sagas/s"
    )


def _frame(progress: Progress, topics: Topics, limit: int, now: float) -> list[str]:
    active = sorted(
        (s for s in progress.states.values() if not s.is_final), key=lambda s: s.started_at
    )
    lines = [f"saga watch  {topics.log}  {len(active)} active  (Ctrl-C to stop)"]
    for s in active[:limit]:
        lines.append(
            f"{s.saga_id[:16]:<16} {s.name[:12]:<12} {_bar(s.percent_complete())} "
            f"{s.percent_complete():>3}%  {s.status.value:<12} {_current(s)}"
        )
    if len(active) > limit:
        lines.append(f"... and {len(active) - limit} more")
    lines += [_totals_line(progress), f"        {_rate_line(progress, now)}"]
    return lines


def _redraw(out: TextIO, lines: list[str], previous: int) -> int:
    # Cursor up over the previous frame, then clear to the end of the screen: the frame is
    # replaced in place without scrolling, and a shorter frame leaves no stale rows behind.
    # Lines are cut to the terminal's width, as a wrapped line would break the count.
    cols = shutil.get_terminal_size().columns - 1
    prefix = f"\x1b[{previous}A\x1b[J" if previous else ""
    out.write(prefix + "\n".join(line[:cols] for line in lines) + "\n")
    out.flush()
    return len(lines)
