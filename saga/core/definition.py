"""Saga definitions: steps, their kinds, dependencies and retry policies, and the rules they obey.

A definition is checked when it is built (in Python, or from YAML or JSON with the same schema).
Every broken rule is reported at once, each naming the saga, the step and the rule, so that a
definition can be fixed in one pass.

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
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from saga.core import dataflow
from saga.errors import DefinitionError

__all__ = [
    "Dependency",
    "DependencyType",
    "RetryPolicy",
    "SagaDefinition",
    "Step",
    "StepKind",
]


class StepKind(StrEnum):
    """What a step is allowed to do when the saga fails (Richardson's classification)."""

    COMPENSATABLE = "compensatable"
    """Can be undone by its compensation; runs before the pivot."""
    PIVOT = "pivot"
    """The point of no return: once it succeeds the saga only goes forward."""
    RETRIABLE = "retriable"
    """Runs after the pivot and is retried until it succeeds (or the saga is stuck)."""


class DependencyType(StrEnum):
    """The four precedence relations of project scheduling, from predecessor A to successor B."""

    FINISH_TO_START = "finish_to_start"
    """B starts after A finishes (the default)."""
    START_TO_START = "start_to_start"
    """B starts once A has started."""
    FINISH_TO_FINISH = "finish_to_finish"
    """B is not finished before A finishes."""
    START_TO_FINISH = "start_to_finish"
    """B is not finished before A starts."""


_DEPENDENCY_ALIASES = {
    "fs": DependencyType.FINISH_TO_START,
    "ss": DependencyType.START_TO_START,
    "ff": DependencyType.FINISH_TO_FINISH,
    "sf": DependencyType.START_TO_FINISH,
}

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class Dependency(BaseModel):
    """A precedence from step ``step`` (the predecessor) to the step that declares it."""

    model_config = _FROZEN

    step: str
    """The predecessor's name."""
    type: DependencyType = DependencyType.FINISH_TO_START
    """The kind of precedence; ``fs``, ``ss``, ``ff`` and ``sf`` are accepted too."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # "payment" or "payment:ss" in YAML reads better than a mapping.
        if isinstance(value, str):
            name, _, kind = value.partition(":")
            return {"step": name, "type": kind or DependencyType.FINISH_TO_START}
        return value

    @field_validator("type", mode="before")
    @classmethod
    def _alias(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _DEPENDENCY_ALIASES.get(value.lower(), value)
        return value


class RetryPolicy(BaseModel):
    """How often and how soon a failed attempt is tried again.

    The delay before attempt ``n + 1`` is ``initial_backoff * multiplier ** (n - 1)``, capped at
    ``max_backoff``, then spread by ``jitter`` (a fraction). The jitter is derived from a hash of
    the saga id, step and attempt rather than a random source, so that deciding stays a pure
    function and a replay of the log schedules the same retries.
    """

    model_config = _FROZEN

    max_attempts: int = Field(default=3, ge=1, le=1000)
    """Attempts in all, the first included."""
    initial_backoff: float = Field(default=0.2, ge=0)
    """Seconds before the second attempt."""
    multiplier: float = Field(default=2.0, ge=1)
    """Growth of the delay per attempt."""
    max_backoff: float = Field(default=30.0, ge=0)
    """Upper bound of one delay, in seconds."""
    jitter: float = Field(default=0.2, ge=0, le=1)
    """Spread of each delay, as a fraction of it (0.2 means +-20%)."""
    retry_on: tuple[str, ...] | None = None
    """Error type names that are retried (``Timeout`` for a missed deadline); ``None`` retries
    every technical failure. Business failures (`saga.StepFailed`) are never retried."""

    def allows_retry(self, attempt: int, error_type: str) -> bool:
        """Whether a technical failure of ``attempt`` (1-based) is tried again."""
        if attempt >= self.max_attempts:
            return False
        return self.retry_on is None or error_type in self.retry_on

    def backoff(self, attempt: int, seed: str) -> float:
        """Seconds to wait after failed ``attempt`` (1-based), jittered by a hash of ``seed``."""
        base = min(self.initial_backoff * self.multiplier ** (attempt - 1), self.max_backoff)
        digest = hashlib.blake2b(f"{seed}:{attempt}".encode(), digest_size=8).digest()
        unit = int.from_bytes(digest, "big") / 2**64
        return max(0.0, base * (1 + self.jitter * (2 * unit - 1)))


_COMPENSATION_RETRY = RetryPolicy(max_attempts=5)


class Step(BaseModel):
    """One step of a saga: a command to one service, with its compensation and policies."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")
    """Unique within the saga."""
    service: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")
    """The service whose participants run the step (its command topic is named after it)."""
    action: str = Field(min_length=1)
    """The command type the participant's handler is registered for."""
    compensation: str | None = None
    """The command type that undoes the action; required for compensatable steps."""
    kind: StepKind = StepKind.COMPENSATABLE
    """Compensatable, pivot or retriable."""
    depends_on: tuple[Dependency, ...] = ()
    """Predecessors, finish-to-start unless stated."""
    retry: RetryPolicy = RetryPolicy()
    """Retry policy of the action."""
    compensation_retry: RetryPolicy = _COMPENSATION_RETRY
    """Retry policy of the compensation; when it is exhausted the saga is stuck."""
    timeout: float = Field(default=30.0, gt=0)
    """Seconds an attempt may take before it counts as failed with error type ``Timeout``."""
    input: Any = None
    """Input template (see `saga.core.dataflow`); ``None`` passes the saga input."""
    input_model: type[BaseModel] | None = Field(default=None, exclude=True)
    """Optional pydantic model the built input must satisfy (Python definitions only)."""
    output_model: type[BaseModel] | None = Field(default=None, exclude=True)
    """Optional pydantic model the step's output must satisfy (Python definitions only)."""

    @field_validator("depends_on", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if isinstance(value, str | Mapping | Dependency):
            return (value,)
        return value


class SagaDefinition(BaseModel):
    """A named, versioned saga: a DAG of steps. Validated when built.

    Raises:
        DefinitionError: One or more rules are broken; every problem is listed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")
    """The saga's name, used to start it."""
    version: int = Field(default=1, ge=1)
    """Recorded on every saga started from this definition."""
    description: str = ""
    """Free text for people."""
    steps: tuple[Step, ...] = Field(min_length=1)
    """The steps; their order here does not matter, dependencies do."""
    input_model: type[BaseModel] | None = Field(default=None, exclude=True)
    """Optional pydantic model the saga input must satisfy (Python definitions only)."""

    @model_validator(mode="after")
    def _check_rules(self) -> SagaDefinition:
        problems = list(_problems(self))
        if problems:
            raise DefinitionError(self.name, problems)
        return self

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SagaDefinition:
        """Builds a definition from plain data (the YAML/JSON schema).

        Raises:
            DefinitionError: The data does not fit the schema or breaks a rule.
        """
        name = str(data.get("name", "?")) if isinstance(data, Mapping) else "?"
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            errors = exc.errors()
            if any(len(e["loc"]) > 1 and e["loc"][0] == "steps" for e in errors):
                # Invalid steps leave the tuple short; that is not a problem of its own.
                errors = [e for e in errors if tuple(e["loc"]) != ("steps",)]
            raise DefinitionError(name, [_describe(name, data, e) for e in errors]) from None

    @classmethod
    def from_yaml(cls, source: str | Path) -> SagaDefinition:
        """Loads a definition from YAML text or a ``.yaml``/``.yml`` file path."""
        import yaml  # only here: the core stays importable without a YAML parser in hot paths

        text = source.read_text() if isinstance(source, Path) else source
        return cls.from_dict(yaml.safe_load(text))

    @classmethod
    def from_json(cls, source: str | bytes | Path) -> SagaDefinition:
        """Loads a definition from JSON text or a ``.json`` file path."""
        text = source.read_text() if isinstance(source, Path) else source
        return cls.from_dict(json.loads(text))

    def to_dict(self) -> dict[str, Any]:
        """The definition as plain data, loadable again by `from_dict`."""
        return self.model_dump(mode="json", exclude_defaults=True)

    # -- queries used by the scheduler ---------------------------------------------------------

    def step(self, name: str) -> Step:
        """The step called ``name``.

        Raises:
            KeyError: No such step.
        """
        return self._by_name[name]

    def has_step(self, name: str) -> bool:
        """Whether the saga has a step called ``name``."""
        return name in self._by_name

    def dependents(self, name: str) -> tuple[tuple[str, DependencyType], ...]:
        """The steps that declare ``name`` as a predecessor, with the dependency type."""
        return self._dependents.get(name, ())

    @property
    def pivot(self) -> str | None:
        """The pivot step's name, if the saga has one."""
        return next((s.name for s in self.steps if s.kind is StepKind.PIVOT), None)

    @property
    def _by_name(self) -> dict[str, Step]:
        cached: dict[str, Step] | None = self.__dict__.get("_by_name_cache")
        if cached is None:
            cached = {s.name: s for s in self.steps}
            self.__dict__["_by_name_cache"] = cached
        return cached

    @property
    def _dependents(self) -> dict[str, tuple[tuple[str, DependencyType], ...]]:
        cached: dict[str, tuple[tuple[str, DependencyType], ...]] | None = self.__dict__.get(
            "_dependents_cache"
        )
        if cached is None:
            found: dict[str, list[tuple[str, DependencyType]]] = {}
            for s in self.steps:
                for d in s.depends_on:
                    found.setdefault(d.step, []).append((s.name, d.type))
            cached = {k: tuple(v) for k, v in found.items()}
            self.__dict__["_dependents_cache"] = cached
        return cached


# -- validation ------------------------------------------------------------------------------------


def _problems(d: SagaDefinition) -> Iterator[str]:
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


def _describe(saga: str, data: Any, error: Mapping[str, Any]) -> str:
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
    return f"{where}: [schema] {field}: {error.get('msg', 'invalid')}"
