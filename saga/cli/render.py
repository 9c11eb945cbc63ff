"""Text views of sagas for people: status, history, and lists."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from saga.core.messages import EventBase
from saga.core.state import SagaState

__all__ = ["replay", "status", "summary_row", "table"]


def _time(at: float | None) -> str:
    if at is None:
        return "-"
    return datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S.%f")[:-3]


def status(state: SagaState) -> str:
    """A saga's state: its status, progress and each step's status, attempts and result."""
    lines = [
        f"saga      {state.saga_id}",
        f"name      {state.name} v{state.version}",
        f"status    {state.status.value}  ({state.percent_complete()}% complete)",
        f"started   {_time(state.started_at)} UTC   updated {_time(state.updated_at)} UTC",
    ]
    if state.reason:
        lines.append(f"reason    {state.reason}")
    lines.append("")
    lines.append(f"{'step':<16} {'status':<22} {'attempts':>8}  result")
    for name, step in state.steps.items():
        attempts = str(step.attempt)
        if step.compensation_attempt:
            attempts += f"+{step.compensation_attempt}c"
        if step.error is not None and step.status.value not in ("succeeded", "compensated"):
            result = f"{step.error.type}: {step.error.message}"
        elif step.output:
            result = _short(step.output)
        else:
            result = ""
        lines.append(f"{name:<16} {step.status.value:<22} {attempts:>8}  {result}")
    return "\n".join(lines)


def replay(events: Sequence[EventBase]) -> str:
    """A saga's events in order, one line each, with the time since the first."""
    if not events:
        return "(no events)"
    t0 = events[0].at
    lines = []
    for e in events:
        data = e.model_dump(mode="json", exclude={"v", "saga_id", "seq", "at", "type"})
        detail = " ".join(f"{k}={_short(v)}" for k, v in data.items() if v not in (None, [], {}))
        kind: str = getattr(e, "type", "event")
        lines.append(f"{e.seq:>4}  +{e.at - t0:8.3f}s  {kind:<30} {detail}")
    return "\n".join(lines)


def summary_row(state: SagaState) -> dict[str, Any]:
    """The fields `saga list --json` prints for one saga."""
    return {
        "saga_id": state.saga_id,
        "name": state.name,
        "status": state.status.value,
        "percent": state.percent_complete(),
        "started_at": state.started_at,
        "updated_at": state.updated_at,
        "reason": state.reason,
    }


def table(states: Sequence[SagaState]) -> str:
    """Sagas as a table, one per line."""
    lines = [f"{'saga':<34} {'name':<14} {'status':<13} {'done':>5}  started"]
    for s in states:
        lines.append(
            f"{s.saga_id:<34} {s.name:<14} {s.status.value:<13} {s.percent_complete():>4}%  "
            f"{_time(s.started_at)}"
        )
    lines.append(f"({len(states)} sagas)")
    return "\n".join(lines)


def _short(value: Any, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
