"""`saga watch`: live progress of sagas, folded from the log as it grows.

The watcher needs every partition of the log and no share of anyone's work, so it joins no
consumer group (a group member would take partitions away from coordinators' tools, or be given
only some). It tails with the transport port alone: every ``interval`` it reads each partition
from where it stopped to the current end (`Transport.read`), which works the same on the memory
transport and on Kafka.

Folding is `saga.core.replay.Replay`'s, as on a coordinator's recovery. From the start of the
log (``from_start``) every saga begins with its ``saga_started``. From the end, the watcher
feeds the fold the snapshots, then the log from each partition's checkpoint (events the
snapshots already hold are passed over); only what comes after is shown.

Progress counts each step of the definition once: a skipped step as done, a fan-out by the share
of its items that finished (so a thousand items move one step's worth of the bar, not most of
it). The ``current`` column names the busy steps, a fan-out's as ``dishes[3/10]`` (items in
flight of all), and the steps waiting for their timer as ``deliver@14:05:00``.

Output: on a terminal, a frame redrawn in place with a progress bar per active saga and totals
by status (drawn with `rich`); elsewhere, one line per folded event and the totals at the end;
with ``as_json``, one JSON object per folded event.
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

import anyio
import orjson
from rich.console import Console, Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from saga.core.definition import split_item
from saga.core.messages import EventBase
from saga.core.replay import Replay
from saga.core.state import RECORD_ONLY, SagaState, SagaStatus, StepStatus
from saga.runtime.ports import Record, Topics, Transport
from saga.views.spans import step_of
from saga.views.styles import add_row, status_style

__all__ = ["Progress", "percent", "watch"]

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

    replay: Replay[Record] = field(default_factory=Replay[Record])
    """The fold of what was read."""
    events: int = 0
    """Events folded since the watch began (catching up from a checkpoint not counted)."""
    finished: int = 0
    """Sagas that reached a final status since the watch began."""
    started_at: float = 0.0
    """`anyio.current_time` when the watch began."""
    caught_up: int = 0
    """Records the fold could not use while catching up (not counted in `unfoldable`)."""

    @property
    def states(self) -> dict[str, SagaState]:
        """Every saga's state, by saga id."""
        return self.replay.states

    @property
    def unfoldable(self) -> int:
        """Log records that could not be used since the watch began: undecodable, or events
        that do not follow their saga's state (e.g. its start precedes what was read)."""
        return len(self.replay.unusable) - self.caught_up

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
    until: Callable[[Progress], bool] | None = None,
    limit: int = 20,
    as_json: bool = False,
    interval: float = 0.5,
    tty: bool | None = None,
) -> Progress:
    """Tails the log and shows progress until cancelled, until idle, or until ``until`` holds.

    Args:
        transport: The broker.
        topics: The engine's topic names (the prefix).
        out: Where to write (standard output by default).
        from_start: Read the log from offset 0 instead of from its current end.
        until_idle: Return after this many seconds without a new event (``None``: never).
        until: Return once this holds of what was seen (checked after each read of the log),
            e.g. ``lambda p: p.finished >= n`` to watch until n sagas ended.
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
    frame = _Frame(out) if live else None
    last_event = anyio.current_time()
    while True:
        records = await _read_new(transport, topics.log, positions)
        folded = 0
        for record in records:
            found = progress.replay.add_log_record(record)
            if found is None:
                continue
            event, state = found.event, found.state
            folded += 1
            progress.events += 1
            if state.is_final and type(event) not in RECORD_ONLY:
                progress.finished += 1  # a duplicate start of a finished saga is no new finish
            if as_json:
                _write(out, orjson.dumps(_update(event, state)).decode())
            elif frame is None:
                _write(out, _line(event, state))
        now = anyio.current_time()
        if folded:
            last_event = now
        if frame is not None and (folded or not frame.drawn):
            frame.draw(_frame(progress, topics, limit, now))
        if until_idle is not None and now - last_event >= until_idle:
            break
        if until is not None and until(progress):
            break
        await anyio.sleep(interval)
    if not live and not as_json:
        now = anyio.current_time()
        _write(out, f"{_totals_line(progress)}  |  {_rate_line(progress, now)}")
    return progress


async def _catch_up(
    transport: Transport, topics: Topics, count: int, progress: Progress
) -> dict[int, int]:
    """Feeds the fold the snapshots, then the log after the checkpoints; returns the log's ends."""
    replay = progress.replay
    starts = dict.fromkeys(range(await transport.partitions(topics.snapshots)), 0)
    for record in await _read_new(transport, topics.snapshots, starts):
        replay.add_snapshot(record)  # a bad one is set aside; `saga rebuild` reports them
    positions = {p: replay.start_offset(p) for p in range(count)}
    for record in await _read_new(transport, topics.log, positions):
        replay.add_log_record(record)
    # Sagas that began before the checkpoints, or records already bad, are not news.
    progress.caught_up = len(replay.unusable)
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


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


def _write(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


_DONE = frozenset({StepStatus.SUCCEEDED, StepStatus.SKIPPED})


def _items(state: SagaState) -> dict[str, list[StepStatus]]:
    """Each fan-out step's items' statuses."""
    found: dict[str, list[StepStatus]] = {}
    for name, s in state.steps.items():
        base, index = split_item(name)
        if index is not None:
            found.setdefault(base, []).append(s.status)
    return found


def _current(state: SagaState) -> str:
    """The busy steps: a fan-out once, with its items in flight, and timers with their time."""
    items = _items(state)
    busy = []
    for name, s in state.steps.items():
        if split_item(name)[1] is not None:
            continue
        if name in items and s.status is StepStatus.RUNNING:
            running = sum(i in _BUSY for i in items[name])
            busy.append(f"{name}[{running}/{len(items[name])}]")
        elif s.status in _BUSY:
            busy.append(name)
        elif s.status is StepStatus.SCHEDULED and s.wake_at is not None:
            busy.append(f"{name}@{_clock(s.wake_at)}")
    return ",".join(busy) or "-"


def _clock(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S")


def percent(state: SagaState) -> int:
    """Progress in percent, as the watcher shows it: while running, the steps of the
    definition that finished (skipped ones too), a fan-out counting by its items' share;
    otherwise `SagaState.percent_complete`."""
    if state.status is not SagaStatus.RUNNING:
        return state.percent_complete()
    items = _items(state)
    own = [(n, s) for n, s in state.steps.items() if split_item(n)[1] is None]
    done = 0.0
    for name, s in own:
        if s.status in _DONE:
            done += 1
        elif items.get(name):
            done += sum(i in _DONE for i in items[name]) / len(items[name])
    return int(done * 100 // (len(own) or 1))


def _update(event: EventBase, state: SagaState) -> dict[str, object]:
    return {
        "saga_id": state.saga_id,
        "name": state.name,
        "status": state.status.value,
        "percent": percent(state),
        "seq": event.seq,
        "event": event.type,
        "step": step_of(event),
        "current": _current(state),
        "at": event.at,
    }


def _line(event: EventBase, state: SagaState) -> str:
    at = datetime.fromtimestamp(event.at, UTC).strftime("%H:%M:%S.%f")[:-3]
    return (
        f"{at}  {state.saga_id}  {state.name}  {state.status.value:<12} "
        f"{percent(state):>3}%  {event.type} {step_of(event) or ''}".rstrip()
    )


def _totals_line(progress: Progress) -> str:
    return "totals  " + "  ".join(f"{k} {v}" for k, v in progress.totals().items())


def _rate_line(progress: Progress, now: float) -> str:
    return (
        f"{progress.events} events, {progress.finished} finished, {progress.rate(now):.2f} sagas/s"
    )


def _plain(text: str) -> Text:
    # One row of the frame: cut at the terminal's edge, never wrapped onto a second row.
    return Text(text, no_wrap=True, overflow="crop")


def _frame(progress: Progress, topics: Topics, limit: int, now: float) -> RenderableType:
    active = sorted(
        (s for s in progress.states.values() if not s.is_final), key=lambda s: s.started_at
    )
    parts: list[RenderableType] = [
        _plain(f"saga watch  {topics.log}  {len(active)} active  (Ctrl-C to stop)")
    ]
    if active[:limit]:
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("saga", no_wrap=True, max_width=24)
        table.add_column("name", no_wrap=True, max_width=12)
        table.add_column("progress", no_wrap=True, min_width=_BAR)
        table.add_column("done", justify="right", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("current", no_wrap=True, overflow="ellipsis")
        for s in active[:limit]:
            style = status_style(s.status.value)
            add_row(
                table,
                s.saga_id,
                s.name,
                ProgressBar(
                    total=100,
                    completed=percent(s),
                    width=_BAR,
                    complete_style=style,
                    finished_style=style,
                ),
                f"{percent(s)}%",
                Text(s.status.value, style=style),
                _current(s),
            )
        parts.append(table)
    if len(active) > limit:
        parts.append(_plain(f"... and {len(active) - limit} more"))
    parts += [_plain(_totals_line(progress)), _plain(f"        {_rate_line(progress, now)}")]
    return Group(*parts)


class _Frame:
    """The frame on the terminal, replaced in place at each draw.

    `rich.live.Live` would do the drawing, but it also hides the cursor and clears row by
    row, so ``saga watch``'s output would change for whoever reads it (tests, recordings); the
    frame's contents are `rich`'s, and the redraw stays the one below.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.drawn = 0
        """Rows of the frame last drawn (0: none yet)."""

    def draw(self, frame: RenderableType) -> None:
        # Rows are cut one column short of the terminal's width: a row that filled it would
        # wrap on some terminals and break the count of rows to go back over.
        width = shutil.get_terminal_size().columns - 1
        console = Console(file=self.out, force_terminal=True, width=width, highlight=False)
        with console.capture() as captured:
            console.print(frame)
        text = captured.get()
        # Cursor up over the previous frame, then clear to the end of the screen: the frame is
        # replaced without scrolling, and a shorter frame leaves no stale rows behind.
        prefix = f"\x1b[{self.drawn}A\x1b[J" if self.drawn else ""
        self.out.write(prefix + text)
        self.out.flush()
        self.drawn = text.count("\n")
