"""A definition's DAG as text: Mermaid (renders on GitHub), Graphviz dot, and a plain list.

Every node says what its step does when it runs: a command (``service.action / compensation``),
``wait signal NAME``, ``approval by WHO``, or ``saga NAME``; and what shapes when it runs:
``for_each``, ``when``, ``delay`` or ``start_at``. In dot, waiting steps are dashed, sub-saga
steps doubly outlined and fan-outs stacked, besides the shape of the step's kind.
"""

from __future__ import annotations

from saga.core.definition import DependencyType, SagaDefinition, Step, StepKind

__all__ = ["dot", "mermaid", "text", "work"]

_SHORT = {
    DependencyType.FINISH_TO_START: "FS",
    DependencyType.START_TO_START: "SS",
    DependencyType.FINISH_TO_FINISH: "FF",
    DependencyType.START_TO_FINISH: "SF",
}


def work(s: Step) -> list[str]:
    """What step ``s`` does, then each thing that shapes when or how often it runs: one short
    line each (``wait signal kitchen_done``, ``for_each $.input.dishes (max 10)``, ...)."""
    if s.wait is not None:
        lines = [f"wait signal {s.wait} (timeout {s.timeout:g}s)"]
    elif s.approval is not None:
        a = s.approval
        lines = [f"approval by {', '.join(a.approvers) or 'the policy'} (timeout {s.timeout:g}s)"]
        if a.remind_after is not None:
            lines.append(f"remind after {a.remind_after:g}s")
        if a.escalate_after is not None:
            to = ", ".join(a.escalate_to) or "the approvers"
            lines.append(f"escalate to {to} after {a.escalate_after:g}s")
    elif s.saga is not None:
        lines = [f"saga {s.saga}"]
    else:
        undo = f" / {s.compensation}" if s.compensation else ""
        lines = [f"{s.service}.{s.action}{undo}"]
    if s.for_each is not None:
        lines.append(f"for_each {s.for_each} (max {s.max_parallel})")
    if s.when is not None:
        lines.append(f"when {s.when}")
    if s.delay is not None:
        lines.append(f"delay {s.delay:g}s")
    if s.start_at is not None:
        lines.append(f"start_at {s.start_at}")
    return lines


def _lines(s: Step) -> list[str]:
    return [s.name, *work(s), f"({s.kind.value})"]


def mermaid(d: SagaDefinition) -> str:
    """The DAG as a Mermaid flowchart; edges are labelled with their dependency type."""
    lines = ["flowchart LR"]
    shapes = {
        StepKind.COMPENSATABLE: ('["', '"]'),
        StepKind.PIVOT: ('{{"', '"}}'),
        StepKind.RETRIABLE: ('(["', '"])'),
    }
    for s in d.steps:
        left, right = shapes[s.kind]
        label = "<br/>".join(_mermaid_text(line) for line in _lines(s))
        lines.append(f"    {_id(s.name)}{left}{label}{right}")
    for s in d.steps:
        for dep in s.depends_on:
            lines.append(f"    {_id(dep.step)} -->|{_SHORT[dep.type]}| {_id(s.name)}")
    return "\n".join(lines) + "\n"


def dot(d: SagaDefinition) -> str:
    """The DAG in Graphviz dot; the pivot is a diamond, retriable steps are rounded, waiting
    steps dashed, sub-saga steps doubly outlined, fan-outs stacked (``box3d``)."""
    shapes = {
        StepKind.COMPENSATABLE: "box",
        StepKind.PIVOT: "diamond",
        StepKind.RETRIABLE: "box",
    }
    lines = [f'digraph "{_dot_text(d.name)}" {{', "    rankdir=LR;"]
    for s in d.steps:
        shape = (
            "box3d" if s.for_each is not None and s.kind is not StepKind.PIVOT else shapes[s.kind]
        )
        styles = ["rounded"] if s.kind is StepKind.RETRIABLE else []
        if s.wait is not None or s.approval is not None:
            styles.append("dashed")
        extra = f', style="{",".join(styles)}"' if styles else ""
        if s.saga is not None:
            extra += ", peripheries=2"
        label = "\\n".join(_dot_text(line) for line in _lines(s))
        lines.append(f'    "{s.name}" [label="{label}", shape={shape}{extra}];')
    for s in d.steps:
        for dep in s.depends_on:
            lines.append(f'    "{dep.step}" -> "{s.name}" [label="{_SHORT[dep.type]}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def text(d: SagaDefinition) -> str:
    """The DAG as plain text: one block per step, in the definition's order, with its kind,
    its work and its dependencies."""
    lines = [f"saga {d.name} v{d.version}"]
    for s in d.steps:
        deps = ", ".join(
            dep.step
            + ("" if dep.type is DependencyType.FINISH_TO_START else f":{_SHORT[dep.type]}")
            for dep in s.depends_on
        )
        lines.append(f"  {s.name} ({s.kind.value})" + (f"  after {deps}" if deps else ""))
        lines += [f"      {line}" for line in work(s)]
    return "\n".join(lines) + "\n"


def _dot_text(value: str) -> str:
    # Inside a double-quoted dot string only the quote and the backslash are special; a
    # condition (`$.steps.risk.output.level == "high"`) has both.
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _mermaid_text(value: str) -> str:
    # Mermaid labels are quoted; its entity codes stand for what would end or break them.
    return (
        value.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")
    )


def _id(name: str) -> str:
    return "s_" + "".join(c if c.isalnum() else "_" for c in name)
