"""A definition's DAG as text: Mermaid (renders on GitHub) and Graphviz dot."""

from __future__ import annotations

from saga.core.definition import DependencyType, SagaDefinition, StepKind

__all__ = ["dot", "mermaid"]

_SHORT = {
    DependencyType.FINISH_TO_START: "FS",
    DependencyType.START_TO_START: "SS",
    DependencyType.FINISH_TO_FINISH: "FF",
    DependencyType.START_TO_FINISH: "SF",
}


def _label(d: SagaDefinition, name: str) -> str:
    s = d.step(name)
    undo = f" / {s.compensation}" if s.compensation else ""
    return f"{s.name}\\n{s.service}.{s.action}{undo}\\n({s.kind.value})"


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
        lines.append(
            f"    {_id(s.name)}{left}{_label(d, s.name).replace(chr(92) + 'n', '<br/>')}{right}"
        )
    for s in d.steps:
        for dep in s.depends_on:
            lines.append(f"    {_id(dep.step)} -->|{_SHORT[dep.type]}| {_id(s.name)}")
    return "\n".join(lines) + "\n"


def dot(d: SagaDefinition) -> str:
    """The DAG in Graphviz dot; the pivot is a diamond, retriable steps are rounded."""
    shapes = {
        StepKind.COMPENSATABLE: "box",
        StepKind.PIVOT: "diamond",
        StepKind.RETRIABLE: "box, style=rounded",
    }
    lines = [f'digraph "{d.name}" {{', "    rankdir=LR;"]
    for s in d.steps:
        lines.append(f'    "{s.name}" [label="{_label(d, s.name)}", shape={shapes[s.kind]}];')
    for s in d.steps:
        for dep in s.depends_on:
            lines.append(f'    "{dep.step}" -> "{s.name}" [label="{_SHORT[dep.type]}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _id(name: str) -> str:
    return "s_" + "".join(c if c.isalnum() else "_" for c in name)
