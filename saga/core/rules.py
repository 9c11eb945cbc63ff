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
- ``step-work``: a step does one thing: it sends a command (``service`` and ``action``), waits
  for a signal (``wait``) or asks for an approval (``approval``).
- ``no-effect``: a ``wait`` or ``approval`` step changes nothing a compensation could undo, so
  it has no compensation and cannot be the pivot.
- ``unique-signal``: no two ``wait`` steps wait for the same signal.
- ``condition``: a step's ``when`` parses (`saga.core.conditions`) and reads only the saga
  input, the saga id, or the output of a step that finishes before this one starts.
- ``start-at``: ``start_at`` is one reference (to the saga input or an earlier output), and a
  step has a ``delay`` or a ``start_at``, not both.
- ``for-each``: ``for_each`` is one reference to a list (the saga input or an earlier output),
  on a step that sends a command and is not the pivot; ``$.item`` is read only by the input of
  a ``for_each`` step.
- ``finite``: every number of a step (its ``timeout``, and the floats of its retry policies) is
  finite: with an infinite or NaN deadline or backoff a saga would wait for ever. The schema
  itself refuses them (so a Python `Step` cannot hold one either); `describe` words the error
  as this rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from saga.core import conditions, dataflow, triggers
from saga.core.definition import DependencyType, SagaDefinition, Step, StepKind

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
        yield from _work_problems(at, s)
        needs_own = s.kind_of_work == "command"  # a saga step's undo is its child's
        if needs_own and s.kind is StepKind.COMPENSATABLE and not s.compensation:
            yield (
                f"{at}: [compensation-required] a compensatable step needs a compensation; "
                "add one, or mark it kind 'pivot' or 'retriable'"
            )
        if s.kind is not StepKind.COMPENSATABLE and s.compensation:
            yield f"{at}: [no-compensation] a {s.kind.value} step cannot have a compensation"
    signals: dict[str, str] = {}
    for s in d.steps:
        if s.wait is not None and s.wait in signals:
            yield (
                f"{where}, step {s.name!r}: [unique-signal] signal {s.wait!r} is already "
                f"waited for by step {signals[s.wait]!r}"
            )
        elif s.wait is not None:
            signals[s.wait] = s.name
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
    yield from triggers.problems(d.name, d.triggers, d.outcomes, names)


def _work_problems(at: str, s: Step) -> Iterator[str]:
    """The ``step-work``, ``no-effect`` and ``start-at`` rules of one step."""
    works = (("action", s.action), ("wait", s.wait), ("approval", s.approval), ("saga", s.saga))
    kinds = [k for k, v in works if v]
    if len(kinds) != 1:
        got = " and ".join(kinds) if kinds else "none of them"
        yield (
            f"{at}: [step-work] a step has exactly one of action (with service), wait, "
            f"approval or saga; it has {got}"
        )
    elif s.action is not None and s.service is None:
        yield f"{at}: [step-work] a step with an action needs the service that runs it"
    elif s.action is None and s.service is not None:
        yield f"{at}: [step-work] {_a(kinds[0])} step runs in the coordinator: it has no service"
    if s.saga is not None and s.compensation:
        yield (
            f"{at}: [step-work] a saga step is compensated by compensating its child: it has "
            "no compensation of its own"
        )
    if not s.has_effect and s.compensation:
        yield (
            f"{at}: [no-effect] {_a(s.kind_of_work)} step changes nothing, so it has no "
            "compensation"
        )
    if not s.has_effect and s.kind is StepKind.PIVOT:
        yield f"{at}: [no-effect] {_a(s.kind_of_work)} step cannot be the pivot"
    if s.for_each is not None and not s.has_effect:
        yield f"{at}: [for-each] only a step that sends a command can run for each item"
    if s.for_each is not None and s.kind is StepKind.PIVOT:
        yield f"{at}: [for-each] the pivot is one point of no return: it cannot fan out"
    if s.for_each is not None and not (
        s.for_each.startswith("$.") and len(dataflow.references(s.for_each)) == 1
    ):
        yield (
            f"{at}: [for-each] for_each must be one reference such as $.input.dishes, "
            f"not {s.for_each!r}"
        )
    if s.delay is not None and s.start_at is not None:
        yield f"{at}: [start-at] a step has a delay or a start_at, not both"
    if s.start_at is not None and not (
        s.start_at.startswith("$.") and len(dataflow.references(s.start_at)) == 1
    ):
        yield (
            f"{at}: [start-at] start_at must be one reference such as $.input.deliver_at, "
            f"not {s.start_at!r}"
        )


def _a(word: str) -> str:
    """``a wait``, ``an approval``."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


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
        refs = [("input-reference", r) for r in dataflow.references(s.input)]
        refs += [("start-at", r) for r in dataflow.references(s.start_at)]
        refs += [("for-each", r) for r in dataflow.references(s.for_each)]
        if s.when is not None:
            try:
                condition = conditions.parse(s.when)
            except conditions.ConditionError as exc:
                yield f"{at}: [condition] when {s.when!r}: {exc}"
                continue
            refs += [("condition", r) for r in dataflow.references(list(condition.paths()))]
        for rule, (root, _rest) in refs:
            if root in ("input", "saga_id"):
                continue
            if root == "item":
                if rule != "input-reference" or s.for_each is None:
                    yield (
                        f"{at}: [{rule}] reads $.item, which only the input of a for_each step has"
                    )
                continue
            if not root.startswith("steps."):
                yield f"{at}: [{rule}] unknown reference root {root!r}"
                continue
            source = root.removeprefix("steps.")
            if source not in edges:
                yield f"{at}: [{rule}] reads the output of {source!r}, which is not a step"
            elif source not in finished_before:
                yield (
                    f"{at}: [{rule}] reads the output of {source!r} but does not "
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
