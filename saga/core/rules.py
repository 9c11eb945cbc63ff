"""The rules a saga definition obeys, and the wording of its problems.

`saga.core.definition.SagaDefinition` runs `problems` when it is built, and words schema errors
with `describe`; both are here so that the models and loaders stay apart from the graph checks.
Tests compare the messages, and people fix definitions by them: change their wording with care.

The rules, after Richardson's step kinds and Garcia-Molina and Salem's sagas:

- ``unique-names``: no two steps share a name.
- ``known-dependency``: every dependency names a step of the same saga.
- ``acyclic``: the dependencies, of every type, form no cycle.
- ``compensation-required``: a compensatable step has a compensation.
- ``no-compensation``: a pivot or retriable step has none (a pivot is the point of no return;
  a retriable step is retried forward, never undone).
- ``single-pivot``: at most one pivot.
- ``retriable-after-pivot``: retriable steps need a pivot and cannot be its ancestors.
- ``compensatable-before-pivot``: a compensatable step cannot come after the pivot.
- ``pivot-order``: the engine runs every compensatable step before the pivot and every retriable
  step after it; the declared dependencies must not contradict that order.
- ``input-reference``: an input template refers only to the saga input, the saga id, or the
  output of a step that finishes before this one starts.
- ``finite``: every number of a step (its ``timeout``, and the floats of its retry policies) is
  finite: with an infinite or NaN deadline or backoff a saga would wait for ever. The schema
  itself refuses them (so a Python `Step` cannot hold one either); `describe` words the error
  as this rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from saga.core import dataflow
from saga.core.definition import DependencyType, SagaDefinition, StepKind

__all__ = ["describe", "problems"]


def problems(d: SagaDefinition) -> Iterator[str]:
    """Every rule ``d`` breaks, one message each, naming the saga, the step and the rule.

    The graph rules that need a DAG (the pivot's, and input references) are checked only once
    the dependencies are known to form one.

    Args:
        d: The definition, its fields already valid for the schema.
    """
    where = f"saga {d.name!r}"
    names = [s.name for s in d.steps]
    seen: set[str] = set()
    for n in names:
        if n in seen:
            yield f"{where}, step {n!r}: [unique-names] the name is used by more than one step"
        seen.add(n)
    known = set(names)
    edges: dict[str, set[str]] = {n: set() for n in known}
    for s in d.steps:
        at = f"{where}, step {s.name!r}"
        for dep in s.depends_on:
            if dep.step not in known:
                yield f"{at}: [known-dependency] depends on {dep.step!r}, which is not a step"
            elif dep.step == s.name:
                yield f"{at}: [acyclic] depends on itself"
            else:
                edges[dep.step].add(s.name)
        if s.kind is StepKind.COMPENSATABLE and not s.compensation:
            yield (
                f"{at}: [compensation-required] a compensatable step needs a compensation; "
                "add one, or mark it kind 'pivot' or 'retriable'"
            )
        if s.kind is not StepKind.COMPENSATABLE and s.compensation:
            yield f"{at}: [no-compensation] a {s.kind.value} step cannot have a compensation"
    cycle = _find_cycle(edges)
    if cycle:
        yield f"{where}, step {cycle[0]!r}: [acyclic] dependency cycle {' -> '.join(cycle)}"
        return  # the remaining rules need a DAG

    pivots = [s.name for s in d.steps if s.kind is StepKind.PIVOT]
    if len(pivots) > 1:
        yield f"{where}, steps {pivots}: [single-pivot] a saga has at most one pivot"
        return
    pivot = pivots[0] if pivots else None
    ancestors = _reach(pivot, _reverse(edges)) if pivot else set()
    descendants = _reach(pivot, edges) if pivot else set()
    for s in d.steps:
        at = f"{where}, step {s.name!r}"
        if s.kind is StepKind.RETRIABLE and pivot is None:
            yield f"{at}: [retriable-after-pivot] a retriable step needs a pivot before it"
        elif s.kind is StepKind.RETRIABLE and s.name in ancestors:
            yield f"{at}: [retriable-after-pivot] comes before the pivot {pivot!r}"
        if s.kind is StepKind.COMPENSATABLE and s.name in descendants:
            yield (
                f"{at}: [compensatable-before-pivot] comes after the pivot {pivot!r}; "
                "steps after the pivot must be retriable"
            )
    if pivot:
        # The scheduler adds these edges; together with the declared ones they must stay acyclic.
        implied = {n: set(v) for n, v in edges.items()}
        for s in d.steps:
            if s.kind is StepKind.COMPENSATABLE:
                implied[s.name].add(pivot)
            elif s.kind is StepKind.RETRIABLE:
                implied[pivot].add(s.name)
        cycle = _find_cycle(implied)
        if cycle:
            yield (
                f"{where}, step {cycle[0]!r}: [pivot-order] compensatable steps run before the "
                f"pivot and retriable steps after it, which the dependencies contradict: "
                f"{' -> '.join(cycle)}"
            )
            return
    yield from _reference_problems(d, edges)


def _reference_problems(d: SagaDefinition, edges: Mapping[str, set[str]]) -> Iterator[str]:
    fs_edges: dict[str, set[str]] = {s.name: set() for s in d.steps}
    for s in d.steps:
        for dep in s.depends_on:
            if dep.type is DependencyType.FINISH_TO_START and dep.step in fs_edges:
                fs_edges[dep.step].add(s.name)
    before = _reverse(fs_edges)
    for s in d.steps:
        at = f"saga {d.name!r}, step {s.name!r}"
        finished_before = _reach(s.name, before) - {s.name}
        for root, _rest in dataflow.references(s.input):
            if root in ("input", "saga_id"):
                continue
            if not root.startswith("steps."):
                yield f"{at}: [input-reference] unknown reference root {root!r}"
                continue
            source = root.removeprefix("steps.")
            if source not in edges:
                yield f"{at}: [input-reference] reads the output of {source!r}, which is not a step"
            elif source not in finished_before:
                yield (
                    f"{at}: [input-reference] reads the output of {source!r} but does not "
                    "depend on it finish-to-start, so the output may not exist yet"
                )


def _reverse(edges: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    rev: dict[str, set[str]] = {n: set() for n in edges}
    for a, bs in edges.items():
        for b in bs:
            rev[b].add(a)
    return rev


def _reach(start: str, edges: Mapping[str, Iterable[str]]) -> set[str]:
    seen = {start}
    stack = [start]
    while stack:
        for nxt in edges[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen - {start}


def _find_cycle(edges: Mapping[str, Iterable[str]]) -> list[str] | None:
    color: dict[str, int] = dict.fromkeys(edges, 0)  # 0 new, 1 on the path, 2 done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = 1
        path.append(n)
        for m in sorted(edges[n]):
            if color[m] == 1:
                return [*path[path.index(m) :], m]
            if color[m] == 0 and (found := visit(m)):
                return found
        path.pop()
        color[n] = 2
        return None

    for n in sorted(edges):
        if color[n] == 0 and (found := visit(n)):
            return found
    return None


def describe(saga: str, data: Any, error: Mapping[str, Any]) -> str:
    """A schema error (one of pydantic's) worded like a broken rule: ``[schema]``, with the
    step it is in named rather than numbered.

    Args:
        saga: The saga's name, as far as it is known.
        data: The plain data the definition was built from.
        error: One entry of `pydantic.ValidationError.errors`.
    """
    loc: Sequence[Any] = error.get("loc", ())
    where = f"saga {saga!r}"
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        steps = data.get("steps") if isinstance(data, Mapping) else None
        name = "?"
        if (
            isinstance(steps, Sequence)
            and loc[1] < len(steps)
            and isinstance(steps[loc[1]], Mapping)
        ):
            name = str(steps[loc[1]].get("name", f"#{loc[1]}"))
        where += f", step {name!r}"
        loc = loc[2:]
    field = ".".join(str(p) for p in loc) or "definition"
    if error.get("type") == "finite_number":
        return (
            f"{where}: [finite] {field}: must be a finite number, not {error.get('input')!r}; "
            "with an infinite or NaN deadline or backoff the saga would wait for ever"
        )
    return f"{where}: [schema] {field}: {error.get('msg', 'invalid')}"
