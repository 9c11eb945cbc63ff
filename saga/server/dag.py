"""A saga's DAG as inline SVG, coloured by the state of each step, computed on the server.

Layout: each step sits in the column of its longest chain of dependencies from a root (so
every edge points right), steps of one column stacked in definition order; edges are curves
from a predecessor's right side to the dependant's left, labelled with the dependency's type
when it is not finish-to-start. A node shows the step's name, what it does
(`saga.core.graph.work`'s first line), its kind when it is not compensatable, and its attempt
count; a fan-out shows how many of its items are done. The SVG is XML-safe text ready to
embed in a page; colours come from the page's CSS (``.node.<status>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from saga.core.definition import DependencyType, SagaDefinition, StepKind
from saga.core.graph import work
from saga.core.schedule import items_of
from saga.core.state import SagaState, StepStatus

__all__ = ["NodeBox", "layout", "svg"]

_W, _H = 186, 58
_GAP_X, _GAP_Y = 44, 22
_PAD = 12
_SHORT = {
    DependencyType.START_TO_START: "SS",
    DependencyType.FINISH_TO_FINISH: "FF",
    DependencyType.START_TO_FINISH: "SF",
}
_DONE = {StepStatus.SUCCEEDED, StepStatus.SKIPPED, StepStatus.COMPENSATED}


@dataclass(frozen=True, slots=True)
class NodeBox:
    """Where one step's node is drawn."""

    step: str
    column: int
    row: int
    x: int
    y: int


def layout(definition: SagaDefinition) -> dict[str, NodeBox]:
    """The nodes' places: column by longest dependency chain, row by definition order."""
    deps = {s.name: [d.step for d in s.depends_on] for s in definition.steps}
    column: dict[str, int] = {}

    def col(name: str, seen: frozenset[str] = frozenset()) -> int:
        if name not in column:
            before = [p for p in deps.get(name, []) if p in deps and p not in seen]
            column[name] = 1 + max((col(p, seen | {name}) for p in before), default=-1)
        return column[name]

    rows: dict[int, int] = {}
    boxes = {}
    for s in definition.steps:
        c = col(s.name)
        r = rows.get(c, 0)
        rows[c] = r + 1
        boxes[s.name] = NodeBox(s.name, c, r, _PAD + c * (_W + _GAP_X), _PAD + r * (_H + _GAP_Y))
    return boxes


def _status_of(state: SagaState | None, name: str) -> str:
    if state is None or name not in state.steps:
        return StepStatus.PENDING.value
    return state.steps[name].status.value


def svg(definition: SagaDefinition, state: SagaState | None = None) -> str:
    """The DAG of ``definition`` as an ``<svg>`` element, nodes coloured by ``state``."""
    boxes = layout(definition)
    width = max(b.x for b in boxes.values()) + _W + _PAD
    height = max(b.y for b in boxes.values()) + _H + _PAD
    parts = [
        f'<svg class="dag" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" '
        f'aria-label="steps of {escape(definition.name)}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'class="arrowhead"/></marker></defs>',
    ]
    for s in definition.steps:
        to = boxes[s.name]
        for d in s.depends_on:
            fr = boxes.get(d.step)
            if fr is None:
                continue
            x1, y1 = fr.x + _W, fr.y + _H // 2
            x2, y2 = to.x - 2, to.y + _H // 2
            mid = (x1 + x2) / 2
            done = _status_of(state, d.step) in {v.value for v in _DONE}
            parts.append(
                f'<path class="edge{" done" if done else ""}" d="M{x1},{y1} C{mid},{y1} '
                f'{mid},{y2} {x2},{y2}" marker-end="url(#arrow)"/>'
            )
            if d.type in _SHORT:
                parts.append(
                    f'<text class="edge-label" x="{mid}" y="{(y1 + y2) / 2 - 4}">'
                    f"{_SHORT[d.type]}</text>"
                )
    for s in definition.steps:
        b = boxes[s.name]
        status = _status_of(state, s.name)
        step_state = state.steps.get(s.name) if state is not None else None
        sub = work(s)[0]
        badges = []
        if s.kind is not StepKind.COMPENSATABLE:
            badges.append(s.kind.value)
        if step_state is not None and step_state.attempt > 1:
            badges.append(f"attempt {step_state.attempt}")
        if s.for_each is not None and state is not None:
            items = items_of(state, s.name)
            finished = sum(1 for i in items if state.steps[i].status in _DONE)
            badges.append(f"{finished}/{len(items)} items" if items else "fan-out")
        title = f"{s.name}: {status}" + (f" — {sub}" if sub else "")
        if step_state is not None and step_state.error is not None:
            title += f" ({step_state.error.type})"
        parts.append(
            f'<g class="node {escape(status)}" data-step="{escape(s.name)}">'
            f"<title>{escape(title)}</title>"
            f'<rect x="{b.x}" y="{b.y}" width="{_W}" height="{_H}" rx="9"/>'
            f'<text class="name" x="{b.x + 12}" y="{b.y + 20}">{escape(_cut(s.name, 24))}</text>'
            f'<text class="sub" x="{b.x + 12}" y="{b.y + 36}">{escape(_cut(sub, 27))}</text>'
            f'<text class="badge" x="{b.x + 12}" y="{b.y + 50}">'
            f"{escape(' · '.join([status.replace('_', ' '), *badges]))}</text>"
            "</g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _cut(text: str, size: int) -> str:
    return text if len(text) <= size else text[: size - 1] + "\u2026"
