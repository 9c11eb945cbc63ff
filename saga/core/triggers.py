"""Sagas started by the events services already emit, and outcome events for the rest.

A saga may subscribe to a topic of domain events (`Trigger`): each event that passes the
trigger's condition starts a saga, its id and input taken from the event by templates. A saga
may also publish outcome events (`Outcome`) when it completes, is compensated, or gets stuck,
in the same transaction as the event that ends it: a transactional outbox without a database.
This module is the pure half: what a record of a trigger topic becomes (`start_for`), what a
saga that just ended publishes (`outcome_records`), and the rules both obey (`problems`). The
relay that consumes the topics is `saga.runtime.triggers`; the coordinator's partition adds the
outcome records to its transaction.

Trigger templates and conditions read two roots:

    ``$.event...``   the event: the record's value, a JSON object
    ``$.meta...``    where it came from: ``topic``, ``partition``, ``offset``, ``key`` (the
                     record's key as text, or null) and ``timestamp`` (seconds since the epoch)

A trigger's ``saga_id`` is either one reference (``"$.event.order_id"``, whose value is a
string or an integer) or text in which each ``{$.path}`` is replaced by the value it names
(``"order-{$.event.order_id}"``); there is no escape for braces, and any other ``{`` or ``}``
is an error. The default id is ``<saga>-<topic>-<partition>-<offset>``: the same record always
names the same saga, and two sagas subscribed to one topic never share an id. A redelivered
event is therefore the same start request (same saga id, same message id), which the
coordinator keeps once.

Outcome templates read ``$.saga_id``, ``$.name``, ``$.version``, ``$.status`` (``completed``,
``compensated`` or ``stuck``), ``$.reason``, ``$.at`` (when it ended), ``$.seq`` (the number of
the event that ended it: with ``$.saga_id``, a key to deduplicate by, since a saga that is
retried by an operator can get stuck, and so publish, more than once), ``$.input`` and
``$.steps.NAME.status`` / ``$.steps.NAME.output...``. A reference to data the saga does not have
(the output of a step that never ran, in a compensated saga) renders as ``null``: the event is
published all the same. References to unknown roots or steps are caught by `problems` when the
definition loads.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from saga.core import dataflow
from saga.core.codec import DEFAULT_LIMITS, Limits, encode
from saga.core.conditions import Condition, ConditionError, Scope, parse
from saga.core.events import EventBase, SagaCompensated, SagaCompleted, SagaStuck
from saga.core.messages import StartSaga

if TYPE_CHECKING:  # only read: the state module need not load with this one
    from saga.core.state import SagaState

__all__ = [
    "OUTCOME_ROOTS",
    "TRIGGER_ROOTS",
    "Outcome",
    "OutcomeRecord",
    "OutcomeStatus",
    "Refused",
    "Skip",
    "Subscription",
    "Trigger",
    "condition",
    "outcome_records",
    "problems",
    "start_for",
]

OutcomeStatus = Literal["completed", "compensated", "stuck"]
"""The ends of a saga an outcome event can be published for."""

TRIGGER_ROOTS = ("event", "meta")
"""The roots a trigger's templates and condition read."""
OUTCOME_ROOTS = ("saga_id", "name", "version", "status", "reason", "at", "seq", "input", "steps")
"""The roots an outcome's template reads."""

_MAX_ID = 200  # the coordinator's and the client's bound on a saga id


class Trigger(BaseModel):
    """A topic of events, each of which starts a saga of the definition it belongs to.

    Example::

        Trigger(
            topic="orders.placed",
            when='$.event.type == "order-placed" and $.event.total > 0',
            saga_id="order-{$.event.order_id}",
            input={"order": "$.event.order_id", "dishes": "$.event.dishes"},
        )
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    topic: str = Field(min_length=1)
    """The topic the events come from (a topic of the services', not of the engine)."""
    when: str | None = None
    """A condition (`saga.core.conditions`) over ``$.event`` and ``$.meta``; an event it does
    not hold for is passed over. ``None``: every event."""
    saga_id: str | None = None
    """The saga's id: one reference, or text with ``{$.path}`` parts (see the module
    docstring). ``None``: ``<saga>-<topic>-<partition>-<offset>``."""
    input: Any = None
    """A template (`saga.core.dataflow`) over ``$.event`` and ``$.meta`` that must give a JSON
    object. ``None``: the event itself."""


class Outcome(BaseModel):
    """An event the saga publishes to a topic when it ends, in the transaction that ends it.

    Keyed by the saga id, so one saga's outcome events keep their order.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    topic: str = Field(min_length=1)
    """The topic to publish to."""
    on: tuple[OutcomeStatus, ...] = Field(
        default=("completed", "compensated", "stuck"), min_length=1
    )
    """The ends it is published for."""
    value: Any = None
    """A template over the roots in `OUTCOME_ROOTS`. ``None``: ``{"saga_id", "saga_name",
    "status", "reason", "at", "seq"}``."""

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, value: Any) -> Any:
        # YAML 1.1 (PyYAML) reads a bare ``on:`` key as the boolean true: take it for "on".
        if isinstance(value, dict) and True in value and "on" not in value:
            value = {("on" if k is True else k): v for k, v in value.items()}
        return value


@dataclass(frozen=True, slots=True)
class Subscription:
    """One saga name's trigger: what the relay consumes for whom.

    Attributes:
        saga: The name of the saga the events start.
        trigger: The trigger.
    """

    saga: str
    trigger: Trigger


@dataclass(frozen=True, slots=True)
class Skip:
    """An event passed over on purpose (the condition does not hold, or a tombstone).

    Attributes:
        detail: Why, for the debug log.
    """

    detail: str


@dataclass(frozen=True, slots=True)
class Refused:
    """An event that cannot start its saga: it goes to the dead-letter topic.

    Attributes:
        reason: A short, stable code (``invalid_json``, ``not_an_object``, ``no_saga_id``, ...),
            the dead letter's reason header and metric label.
        detail: What exactly was wrong, for people.
    """

    reason: str
    detail: str


class OutcomeRecord(NamedTuple):
    """A record to add to the transaction that ends a saga."""

    topic: str
    key: bytes
    value: bytes


# -- starting ---------------------------------------------------------------------------------


def start_for(
    trigger: Trigger,
    saga_name: str,
    topic: str,
    partition: int,
    offset: int,
    value: bytes | None,
    at: float,
    *,
    key: bytes | None = None,
    timestamp: float = 0.0,
    limits: Limits = DEFAULT_LIMITS,
) -> StartSaga | Skip | Refused:
    """What one record of a trigger's topic becomes: a start request, a skip, or a refusal.

    The request is the same for the same record however often it is read (its saga id and
    message id are derived from the record), so a redelivery starts nothing new.

    Args:
        trigger: The trigger (its condition and templates checked by `problems`).
        saga_name: The saga it starts.
        topic: The record's topic.
        partition: Its partition.
        offset: Its offset.
        value: Its value (``None``: a tombstone, skipped).
        at: The request's time (the relay's clock: the coordinator checks that a signed
            request is fresh).
        key: Its key (``$.meta.key``).
        timestamp: Its timestamp (``$.meta.timestamp``).
        limits: The bounds the coordinator reads requests with: an event whose start would
            break them is refused here, with the source offset, rather than at the coordinator.

    Raises:
        ConditionError: The trigger's condition is not one (`problems` reports it first).
    """
    if value is None:
        return Skip("a tombstone (no value)")
    event = _decode(value, limits)
    if isinstance(event, Refused):
        return event
    meta = {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "key": key.decode(errors="replace") if key is not None else None,
        "timestamp": timestamp,
    }
    if trigger.when is not None:
        cond = condition(trigger.when)
        scope = _scope(event, meta)
        if not cond.evaluate(scope):
            explained = cond.explain(scope).replace("$.input", "$.event")
            return Skip(explained.replace("$.item", "$.meta"))
    roots = {"event": event, "meta": meta}
    saga_id = _saga_id(trigger, saga_name, roots)
    if isinstance(saga_id, Refused):
        return saga_id
    if trigger.input is None:
        saga_input: Any = event
    else:
        try:
            saga_input = dataflow.render_with(trigger.input, roots)
        except dataflow.ResolveError as exc:
            return Refused("input_unresolved", f"the saga input cannot be built: {exc}")
        if not isinstance(saga_input, dict):
            kind = type(saga_input).__name__
            return Refused(
                "input_not_an_object", f"the input template gave a {kind}, not an object"
            )
        if _depth(saga_input) >= limits.max_depth:
            return Refused("too_deep", f"the saga input nests deeper than {limits.max_depth - 1}")
    start = StartSaga(
        message_id=f"trigger:{saga_name}:{topic}:{partition}:{offset}",
        saga_id=saga_id,
        saga_name=saga_name,
        input=saga_input,
        at=at,
    )
    if (size := len(encode(start))) > limits.max_bytes:
        return Refused(
            "too_large", f"the start request would be {size} bytes, over {limits.max_bytes}"
        )
    return start


def _decode(value: bytes, limits: Limits) -> dict[str, Any] | Refused:
    if not value:
        return Refused("empty", "the event has no value")
    if len(value) > limits.max_bytes:
        return Refused("too_large", f"{len(value)} bytes, the limit is {limits.max_bytes}")
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as uexc:
            return Refused("invalid_utf8", str(uexc))
        return Refused("invalid_json", str(exc))
    if not isinstance(event, dict):
        return Refused("not_an_object", f"expected a JSON object, got {type(event).__name__}")
    # The start request holds the event one level down, where the coordinator's bound applies.
    if _depth(event) >= limits.max_depth:
        return Refused("too_deep", f"the event nests deeper than {limits.max_depth - 1}")
    return event


def _depth(root: Any) -> int:
    deepest = 0
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        value, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(value, dict):
            stack.extend((v, level + 1) for v in value.values() if isinstance(v, dict | list))
        elif isinstance(value, list):
            stack.extend((v, level + 1) for v in value if isinstance(v, dict | list))
    return deepest


_PART = re.compile(r"\{(\$\.[^{}]*)\}")


def _id_refs(template: str) -> list[str] | str:
    """The references of a saga id template, or what is wrong with it."""
    if template.startswith("$."):
        if "{" in template or "}" in template:
            return "a reference cannot hold braces (write text with {$.path} parts instead)"
        return [template]
    refs = _PART.findall(template)
    rest = _PART.sub("", template)
    if "{" in rest or "}" in rest:
        return "a brace that is not part of a {$.path} reference"
    return list(refs)


def _saga_id(trigger: Trigger, saga_name: str, roots: Mapping[str, Any]) -> str | Refused:
    meta = roots["meta"]
    if trigger.saga_id is None:
        found = f"{saga_name}-{meta['topic']}-{meta['partition']}-{meta['offset']}"
        if len(found) > _MAX_ID:  # a long topic name: still one id per record
            digest = hashlib.sha256(found.encode()).hexdigest()[:32]
            found = f"{saga_name[: _MAX_ID - 33]}-{digest}"
        return found
    template = trigger.saga_id
    refs = _id_refs(template)
    if isinstance(refs, str):
        return Refused("invalid_saga_id", f"saga id template {template!r}: {refs}")
    values: dict[str, str] = {}
    for ref in refs:
        try:
            value = dataflow.lookup(ref, roots)
        except dataflow.ResolveError as exc:
            return Refused("no_saga_id", f"the saga id cannot be built: {exc}")
        if isinstance(value, bool) or not isinstance(value, str | int):
            kind = "null" if value is None else type(value).__name__
            return Refused(
                "no_saga_id", f"{ref} is a {kind}: a saga id part is a string or integer"
            )
        values[ref] = str(value)
    if template.startswith("$."):
        found = values[template]
    else:
        found = _PART.sub(lambda m: values[m.group(1)], template)
    if not found or len(found) > _MAX_ID or found.startswith("__"):
        return Refused(
            "invalid_saga_id",
            f"saga id {found[:_MAX_ID]!r}: use 1 to {_MAX_ID} characters, not starting with '__'",
        )
    return found


# -- conditions over $.event and $.meta ----------------------------------------------------------
# The condition language knows the saga's roots ($.input, $.item, ...), not a trigger's. Its
# $.input and $.item stand in for $.event and $.meta: the names have the same lengths, so the
# positions in its error messages stay those of the text as written. Only path tokens are
# renamed (never the inside of a string literal).

_ALIASES = {"event": "input", "meta": "item"}


_PARSED: dict[str, Condition] = {}


def condition(text: str) -> Condition:
    """A trigger's condition, parsed once (over ``$.event`` and ``$.meta``).

    Raises:
        ConditionError: The text is not a condition, or reads another root.
    """
    found = _PARSED.get(text)
    if found is None:
        found = parse(_translate(text))
        if len(_PARSED) >= 1024:  # a bound, for a process that builds triggers on the fly
            _PARSED.clear()
        _PARSED[text] = found
    return found


def _scope(event: Mapping[str, Any], meta: Mapping[str, Any]) -> Scope:
    return Scope(saga_input=event, item=dict(meta))


def _translate(text: str) -> str:
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "\"'":
            j = i + 1
            while j < n and text[j] != ch:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif ch == "$" and text[i + 1 : i + 2] == ".":
            j = i + 2
            while j < n and (text[j].isalnum() or text[j] in "_-"):
                j += 1
            root = text[i + 2 : j]
            if root not in _ALIASES:
                raise ConditionError(
                    "expected $.event or $.meta at the start of a path (a trigger's condition "
                    "reads the event and where it came from)",
                    i + 3,
                    text,
                )
            out.append("$." + _ALIASES[root])
            i = j
        else:
            out.append(ch)
            i += 1
    return "".join(out)


# -- outcomes ---------------------------------------------------------------------------------

_ENDS: dict[type[EventBase], OutcomeStatus] = {
    SagaCompleted: "completed",
    SagaCompensated: "compensated",
    SagaStuck: "stuck",
}


def outcome_records(
    outcomes: Sequence[Outcome], state: SagaState, events: Sequence[EventBase]
) -> list[OutcomeRecord]:
    """The outcome events to publish for a decision, in the transaction that records it.

    Nothing unless ``events`` hold the event that ends the saga (`SagaCompleted`,
    `SagaCompensated`, `SagaStuck`): a duplicate request for a finished saga publishes nothing
    again.

    Args:
        outcomes: The definition's outcomes.
        state: The saga's state after ``events``.
        events: The events just decided (a `saga.core.decide.Decision`'s).
    """
    ending = next((e for e in reversed(events) if type(e) in _ENDS), None)
    if ending is None or not outcomes:
        return []
    status = _ENDS[type(ending)]
    roots: dict[str, Any] = {
        "saga_id": state.saga_id,
        "name": state.name,
        "version": state.version,
        "status": status,
        "reason": state.reason if status != "completed" else None,
        "at": ending.at,
        "seq": ending.seq,
        "input": state.input,
        "steps": {
            n: {"status": s.status.value, "output": s.output} for n, s in state.steps.items()
        },
    }
    key = state.saga_id.encode()
    found: list[OutcomeRecord] = []
    for outcome in outcomes:
        if status not in outcome.on:
            continue
        if outcome.value is None:
            value: Any = {
                "saga_id": state.saga_id,
                "saga_name": state.name,
                "status": status,
                "reason": roots["reason"],
                "at": ending.at,
                "seq": ending.seq,
            }
        else:
            value = _render_lenient(outcome.value, roots)
        found.append(OutcomeRecord(outcome.topic, key, orjson.dumps(value)))
    return found


def _render_lenient(template: Any, roots: Mapping[str, Any]) -> Any:
    if isinstance(template, str) and template.startswith("$."):
        try:
            return dataflow.lookup(template, roots)
        except dataflow.ResolveError:
            return None  # data the saga does not have (a step that never ran)
    if isinstance(template, Mapping):
        return {k: _render_lenient(v, roots) for k, v in template.items()}
    if isinstance(template, list | tuple):
        return [_render_lenient(v, roots) for v in template]
    return template


# -- rules ------------------------------------------------------------------------------------


def problems(
    saga: str,
    triggers: Sequence[Trigger],
    outcomes: Sequence[Outcome],
    steps: Collection[str],
) -> Iterator[str]:
    """Every rule the triggers and outcomes of saga ``saga`` break, one message each.

    The rules:

    - ``trigger-condition``: a trigger's ``when`` is a condition over ``$.event`` and
      ``$.meta``.
    - ``trigger-reference``: a trigger's ``saga_id`` and ``input`` are templates over
      ``$.event`` and ``$.meta`` (and ``saga_id`` has no stray braces).
    - ``trigger-topic``: a saga subscribes to a topic once (join conditions with ``or``).
    - ``outcome-reference``: an outcome's ``value`` reads only `OUTCOME_ROOTS`, and
      ``$.steps.NAME`` names a step of the saga.

    Args:
        saga: The saga's name.
        triggers: Its triggers.
        outcomes: Its outcomes.
        steps: Its step names.
    """
    seen: set[str] = set()
    for t in triggers:
        at = f"saga {saga!r}, trigger on {t.topic!r}"
        if t.topic in seen:
            yield f"{at}: [trigger-topic] the saga subscribes to this topic more than once"
        seen.add(t.topic)
        if t.when is not None:
            try:
                condition(t.when)
            except ConditionError as exc:
                yield f"{at}: [trigger-condition] {t.when!r}: {exc}"
        if t.saga_id is not None:
            refs = _id_refs(t.saga_id)
            if isinstance(refs, str):
                yield f"{at}: [trigger-reference] saga_id {t.saga_id!r}: {refs}"
            else:
                yield from _unknown_roots(at, "saga_id", refs, TRIGGER_ROOTS)
        yield from _unknown_roots(at, "input", _refs(t.input), TRIGGER_ROOTS)
    for o in outcomes:
        at = f"saga {saga!r}, outcome to {o.topic!r}"
        for ref in _refs(o.value):
            root, *rest = ref.removeprefix("$.").split(".")
            if root == "steps" and rest:
                if rest[0] not in steps:
                    yield f"{at}: [outcome-reference] reads step {rest[0]!r}, which is not a step"
                elif len(rest) > 1 and rest[1] not in ("status", "output"):
                    yield f"{at}: [outcome-reference] {ref}: a step has a status and an output"
            elif root not in OUTCOME_ROOTS:
                known = ", ".join(f"$.{r}" for r in OUTCOME_ROOTS)
                yield f"{at}: [outcome-reference] unknown reference root {root!r} (use {known})"


def _refs(template: Any) -> list[str]:
    """The references in a template, as written."""
    found: list[str] = []
    stack = [template]
    while stack:
        value = stack.pop()
        if isinstance(value, str) and value.startswith("$."):
            found.append(value)
        elif isinstance(value, Mapping):
            stack.extend(reversed(list(value.values())))
        elif isinstance(value, list | tuple):
            stack.extend(reversed(value))
    return found


def _unknown_roots(at: str, field: str, refs: Sequence[str], roots: Sequence[str]) -> Iterator[str]:
    for ref in refs:
        root = ref.removeprefix("$.").split(".")[0]
        if root not in roots:
            known = " or ".join(f"$.{r}" for r in roots)
            yield f"{at}: [trigger-reference] {field} reads {ref!r}: use {known}"
