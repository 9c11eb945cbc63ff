"""Saga definitions: steps, their kinds, dependencies and retry policies, and their loaders.

A definition is checked when it is built (in Python, or from YAML or JSON with the same schema).
Every broken rule is reported at once, each naming the saga, the step and the rule, so that a
definition can be fixed in one pass. The rules themselves, and the wording of their messages,
are `saga.core.rules`; this module holds the models and the loaders.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from saga.core.triggers import Outcome, Trigger
from saga.errors import DefinitionError

__all__ = [
    "Approval",
    "Dependency",
    "DependencyType",
    "RetryPolicy",
    "SagaDefinition",
    "Step",
    "StepKind",
    "item_name",
    "split_item",
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
    """How often and how soon a failed attempt is tried again. Every number is finite (rule
    ``finite``: an infinite or NaN delay would leave the saga waiting for ever).

    The delay before attempt ``n + 1`` is ``initial_backoff * multiplier ** (n - 1)``, capped at
    ``max_backoff``, then spread by ``jitter`` (a fraction). The jitter is derived from a hash of
    the saga id, step and attempt rather than a random source, so that deciding stays a pure
    function and a replay of the log schedules the same retries.
    """

    model_config = _FROZEN

    max_attempts: int = Field(default=3, ge=1, le=1000)
    """Attempts in all, the first included."""
    initial_backoff: float = Field(default=0.2, ge=0, allow_inf_nan=False)
    """Seconds before the second attempt."""
    multiplier: float = Field(default=2.0, ge=1, allow_inf_nan=False)
    """Growth of the delay per attempt."""
    max_backoff: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    """Upper bound of one delay, in seconds."""
    jitter: float = Field(default=0.2, ge=0, le=1, allow_inf_nan=False)
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

_NAME = r"^[A-Za-z0-9_.-]+$"


def item_name(step: str, index: int) -> str:
    """The name of item ``index`` of ``for_each`` step ``step``: ``dishes[2]`` (step names
    cannot hold brackets, so it never names a step of its own)."""
    return f"{step}[{index}]"


def split_item(name: str) -> tuple[str, int | None]:
    """``("dishes", 2)`` for ``dishes[2]``; ``(name, None)`` for a step's own name."""
    if name.endswith("]") and "[" in name:
        base, _, rest = name[:-1].partition("[")
        if rest.isascii() and rest.isdigit():
            return base, int(rest)
    return name, None


class Approval(BaseModel):
    """What an ``approval`` step asks: named people decide (`saga approve` / `saga reject`).

    While it waits, a pending-approval alert goes out when it starts, a reminder after
    ``remind_after`` seconds and an escalation (to ``escalate_to``) after ``escalate_after``;
    the step's ``timeout`` is the final one, after which the request counts as rejected.
    """

    model_config = _FROZEN

    approvers: tuple[str, ...] = ()
    """The principals who may decide (besides what the authorization policy allows); empty:
    whoever the policy lets ``approve`` the step."""
    remind_after: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Seconds after the request when the approvers are reminded."""
    escalate_after: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Seconds after the request when it is escalated to ``escalate_to``."""
    escalate_to: tuple[str, ...] = ()
    """Who is told at the escalation (and may then decide too)."""

    @field_validator("approvers", "escalate_to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    def may_decide(self, principal: str) -> bool:
        """Whether ``principal`` is among the approvers (anyone, when none are named)."""
        return not self.approvers or principal in self.approvers or principal in self.escalate_to


class Step(BaseModel):
    """One step of a saga: a command to one service, with its compensation and policies."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    name: str = Field(min_length=1, max_length=100, pattern=_NAME)
    """Unique within the saga."""
    service: str | None = Field(default=None, min_length=1, max_length=100, pattern=_NAME)
    """The service whose participants run the step (its command topic is named after it);
    only for steps that send a command (not ``wait`` or ``approval`` steps)."""
    action: str | None = Field(default=None, min_length=1)
    """The command type the participant's handler is registered for."""
    wait: str | None = Field(default=None, min_length=1, max_length=100, pattern=_NAME)
    """A ``wait`` step: the name of the signal it waits for (`saga signal`); it completes when
    the signal arrives, its output the signal's data, and fails at its ``timeout``."""
    approval: Approval | None = None
    """An ``approval`` step: who decides, and when they are reminded; a rejection (or the
    final ``timeout``) is a business failure."""
    saga: str | None = Field(default=None, min_length=1, max_length=100, pattern=_NAME)
    """A sub-saga step: the name of the saga it starts, with the step's input as that saga's
    input; it completes with the child's outcome (its output: the child's id and outputs; a
    child that compensated is a business failure), and compensating it compensates the child.
    Its ``timeout`` is how long the parent waits; retries do not apply (the child runs once)."""
    when: str | None = None
    """A condition over the saga's data (`saga.core.conditions`), checked when the step could
    start: when it is false the step is skipped (finished for its dependants, never
    compensated)."""
    delay: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    """Seconds to wait, once the step could start, before it starts (a durable timer)."""
    start_at: str | None = None
    """A reference to a time in the saga's data (``$.input.deliver_at``: seconds since the
    epoch, or an ISO-8601 text; UTC when it names no zone): the step starts then (at once if
    that has passed)."""
    for_each: str | None = None
    """Fan-out: a reference to a list in the saga's data (``$.input.dishes``). The step runs
    once per item (its input template reads the item as ``$.item``), ``max_parallel`` at a
    time, and its output is ``{"items": [each item's output, in order]}``. When the saga
    compensates, exactly the items that took effect are compensated."""
    max_parallel: int = Field(default=10, ge=1, le=1000)
    """Most items of a ``for_each`` step in flight at once."""
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
    timeout: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    """Seconds an attempt may take before it counts as failed with error type ``Timeout``
    (finite: an attempt must time out some time)."""
    input: Any = None
    """Input template (see `saga.core.dataflow`); ``None`` passes the saga input."""
    input_model: type[BaseModel] | None = Field(default=None, exclude=True)
    """Optional pydantic model the built input must satisfy (Python definitions only)."""
    output_model: type[BaseModel] | None = Field(default=None, exclude=True)
    """Optional pydantic model the step's output must satisfy (Python definitions only)."""

    @property
    def kind_of_work(self) -> str:
        """``command``, ``wait`` or ``approval``: what the step does when it runs."""
        if self.wait is not None:
            return "wait"
        if self.approval is not None:
            return "approval"
        if self.saga is not None:
            return "saga"
        return "command"

    @property
    def has_effect(self) -> bool:
        """Whether running the step changes something a compensation must undo (a command);
        waiting for a signal or a decision changes nothing."""
        return self.kind_of_work in ("command", "saga")

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
    deadline: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Seconds after its start by which the saga should have ended: a saga still running then
    is compensated if its pivot has not started, else an alert is raised."""
    triggers: tuple[Trigger, ...] = ()
    """Topics of events that start this saga, one saga per event (`saga.core.triggers`)."""
    outcomes: tuple[Outcome, ...] = ()
    """Events this saga publishes when it ends, in the transaction of its final event."""

    @model_validator(mode="after")
    def _check_rules(self) -> SagaDefinition:
        # Imported here, not at the top: saga.core.rules imports this module for its step kinds
        # and dependency types, so a top-level import would be a cycle.
        from saga.core.rules import problems as rule_problems

        problems = list(rule_problems(self))
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
        from saga.core.rules import describe  # not at the top: see _check_rules

        name = str(data.get("name", "?")) if isinstance(data, Mapping) else "?"
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            errors = exc.errors()
            if any(len(e["loc"]) > 1 and e["loc"][0] == "steps" for e in errors):
                # Invalid steps leave the tuple short; that is not a problem of its own.
                errors = [e for e in errors if tuple(e["loc"]) != ("steps",)]
            raise DefinitionError(name, [describe(name, data, e) for e in errors]) from None

    @classmethod
    def from_yaml(cls, source: str | Path) -> SagaDefinition:
        """Loads a definition from YAML text or from a file.

        ``source`` is read as a file when it is a `pathlib.Path`, or a one-line string ending in
        ``.yaml``, ``.yml`` or ``.json`` (``SagaDefinition.from_yaml("order.yaml")``); any other
        string is YAML text. Relative paths are read from the current directory.

        Raises:
            FileNotFoundError: ``source`` names a file that does not exist.
            DefinitionError: The data does not fit the schema or breaks a rule.
            yaml.YAMLError: The text is not YAML.
        """
        import yaml  # only here: the core stays importable without a YAML parser in hot paths

        path = _as_path(source)
        text = _read(path) if path is not None else str(source)
        return cls.from_dict(yaml.safe_load(text))

    @classmethod
    def from_json(cls, source: str | bytes | Path) -> SagaDefinition:
        """Loads a definition from JSON text (or bytes) or from a file.

        ``source`` is read as a file when it is a `pathlib.Path`, or a one-line string ending in
        ``.json``, ``.yaml`` or ``.yml``; any other string, and bytes, are JSON text.

        Raises:
            FileNotFoundError: ``source`` names a file that does not exist.
            DefinitionError: The data does not fit the schema or breaks a rule.
            json.JSONDecodeError: The text is not JSON.
        """
        if isinstance(source, bytes):
            return cls.from_dict(json.loads(source))
        path = _as_path(source)
        return cls.from_dict(json.loads(_read(path) if path is not None else str(source)))

    @classmethod
    def from_yaml_file(cls, path: str | Path) -> SagaDefinition:
        """Loads a definition from a YAML file, whatever its name ends in.

        Raises:
            FileNotFoundError: There is no such file.
            DefinitionError: The data does not fit the schema or breaks a rule.
        """
        import yaml

        return cls.from_dict(yaml.safe_load(_read(Path(path))))

    @classmethod
    def from_json_file(cls, path: str | Path) -> SagaDefinition:
        """Loads a definition from a JSON file, whatever its name ends in.

        Raises:
            FileNotFoundError: There is no such file.
            DefinitionError: The data does not fit the schema or breaks a rule.
        """
        return cls.from_dict(json.loads(_read(Path(path))))

    @classmethod
    def load(cls, path: str | Path) -> SagaDefinition:
        """Loads a definition from a file, as JSON if its name ends in ``.json``, else as YAML.

        Raises:
            FileNotFoundError: There is no such file.
            DefinitionError: The data does not fit the schema or breaks a rule.
        """
        path = Path(path)
        if path.suffix.lower() == ".json":
            return cls.from_json_file(path)
        return cls.from_yaml_file(path)

    def to_dict(self) -> dict[str, Any]:
        """The definition as plain data, loadable again by `from_dict`."""
        return self.model_dump(mode="json", exclude_defaults=True)

    @property
    def digest(self) -> str:
        """A stable hash of the definition's content (16 hex digits).

        The SHA-256 of its canonical JSON: its plain data (`to_dict`, which leaves defaults
        out) with keys sorted and no spaces, plus the JSON schemas of the Python-only input and
        output models. So it does not depend on how the definition was written (Python, YAML,
        JSON, defaults spelled out or not), nor change when a release adds a field with a
        default; any change to what is written, a step's order included, changes it. The
        coordinator records it on every saga (`saga.core.messages.SagaStarted.digest`) and
        refuses two different definitions under one name and version
        (`saga.runtime.catalog.Catalog`).
        """
        cached: str | None = self.__dict__.get("_digest_cache")
        if cached is None:
            data = self.to_dict()
            if self.input_model is not None:
                data["input_model"] = _model_schema(self.input_model)
            for step, dumped in zip(self.steps, data["steps"], strict=True):
                for key in ("input_model", "output_model"):
                    model = getattr(step, key)
                    if model is not None:
                        dumped[key] = _model_schema(model)
            text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            cached = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
            self.__dict__["_digest_cache"] = cached
        return cached

    # -- queries used by the scheduler ---------------------------------------------------------

    def step(self, name: str) -> Step:
        """The step called ``name``; for an item of a ``for_each`` step (``dishes[2]``, see
        `item_name`), that step.

        Raises:
            KeyError: No such step.
        """
        found = self._by_name.get(name)
        if found is not None:
            return found
        base, index = split_item(name)
        found = self._by_name.get(base) if index is not None else None
        if found is None or found.for_each is None:
            raise KeyError(name)
        return found

    def unit(self, name: str) -> Step:
        """What runs under ``name``: the step, or for an item of a ``for_each`` step
        (``dishes[2]``) that step under the item's name, so that the item's events, commands
        and idempotency key are its own.

        Raises:
            KeyError: No such step.
        """
        found = self.step(name)
        return found if found.name == name else found.model_copy(update={"name": name})

    def has_step(self, name: str) -> bool:
        """Whether the saga has a step called ``name``."""
        try:
            self.step(name)
        except KeyError:
            return False
        return True

    def dependents(self, name: str) -> tuple[tuple[str, DependencyType], ...]:
        """The steps that declare ``name`` (or, for an item, its step) as a predecessor, with
        the dependency type."""
        return self._dependents.get(split_item(name)[0], ())

    @property
    def services(self) -> frozenset[str]:
        """The services whose participants run its steps (waiting steps have none)."""
        return frozenset(s.service for s in self.steps if s.service is not None)

    def waits_for(self, signal: str) -> Step | None:
        """The ``wait`` step that waits for ``signal``, if any (rule ``unique-signal``: one)."""
        return next((s for s in self.steps if s.wait == signal), None)

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


def _model_schema(model: type[BaseModel]) -> Any:
    """What a Python-only model contributes to the digest: its JSON schema, or its qualified
    name when it has none."""
    try:
        return model.model_json_schema()
    except Exception:  # a model with a type JSON Schema cannot express
        return f"{model.__module__}.{model.__qualname__}"


# -- files -----------------------------------------------------------------------------------------

_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def _as_path(source: str | Path) -> Path | None:
    """The file ``source`` names, or ``None`` when it is definition text."""
    if isinstance(source, Path):
        return source
    name = source.strip()
    if name and "\n" not in name and name.lower().endswith(_FILE_SUFFIXES):
        return Path(name)
    return None


def _read(path: Path) -> str:
    if not path.exists():
        where = path if path.is_absolute() else Path.cwd() / path
        raise FileNotFoundError(
            f"no saga definition file {str(path)!r} (looked for {where}); pass an existing "
            "path, or the definition's text itself"
        )
    return path.read_text(encoding="utf-8")
