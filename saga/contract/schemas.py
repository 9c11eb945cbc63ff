"""JSON Schemas (draft 2020-12) of every message that crosses a topic, from the pydantic models.

One file per topic's value type (`SCHEMAS`): the requests union, the command, the reply, the
events union, the snapshots topic's records and the saga state they hold, the alert, the
definitions topic's record, and the form a sealed field takes. Each is pydantic's own JSON
Schema of the model or union the engine decodes that topic with, so it says exactly what the
engine accepts, with three additions that pydantic cannot know:

- ``v`` and ``type`` are *required* of every top-level message, although the models default
  them: the engine's decoder refuses a record without a known ``v`` (`saga.core.codec.decode`),
  dispatches unions on ``type``, and writes both in every record;
- every field's docstring becomes its ``description`` (pydantic takes only the class's);
- ``$schema``, ``$id`` and a ``x-saga-topics`` list naming the topics the values travel on.

Sealed payloads (`saga.adapters.sealing`) still match: a sealed ``input``, ``payload`` or
``output`` is itself a JSON object (`SEALED_VALUE`), where the schemas allow any object.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import re
import textwrap
from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import BaseModel, TypeAdapter

from saga.core import events
from saga.core.messages import (
    Alert,
    Checkpoint,
    Command,
    Reply,
    Snapshot,
    alert_adapter,
    command_adapter,
    event_adapter,
    reply_adapter,
    request_adapter,
    snapshot_adapter,
)
from saga.core.state import SagaState
from saga.core.wire import SCHEMA_VERSION, ErrorInfo, ParentRef, WireMessage
from saga.runtime.definitions import DefinitionRecord

__all__ = ["DIALECT", "SCHEMAS", "SEALED_VALUE", "MessageSchema", "json_schemas", "schema_id"]

DIALECT = "https://json-schema.org/draft/2020-12/schema"
"""The JSON Schema dialect pydantic writes."""


@dataclass(frozen=True, slots=True)
class MessageSchema:
    """One schema file: what it is generated from and which topics carry it.

    Attributes:
        file: The file name under ``contract/schemas``.
        title: The schema's title.
        adapter: The engine's decoder of those values (or the model itself).
        topics: The topics whose values it describes (with ``{prefix}``, ``{service}``).
        versioned: Whether the top-level values are wire messages (``v`` and ``type``
            required).
    """

    file: str
    title: str
    adapter: TypeAdapter[Any] | type[BaseModel]
    topics: tuple[str, ...]
    versioned: bool = True


SCHEMAS: tuple[MessageSchema, ...] = (
    MessageSchema("request.json", "Request", request_adapter, ("{prefix}.requests",)),
    MessageSchema("command.json", "Command", command_adapter, ("{prefix}.commands.{service}",)),
    MessageSchema("reply.json", "Reply", reply_adapter, ("{prefix}.replies",)),
    MessageSchema("event.json", "Event", event_adapter, ("{prefix}.log",)),
    MessageSchema(
        "snapshot-record.json", "SnapshotRecord", snapshot_adapter, ("{prefix}.snapshots",)
    ),
    MessageSchema(
        "saga-state.json", "SagaState", SagaState, ("{prefix}.snapshots",), versioned=False
    ),
    MessageSchema("alert.json", "Alert", alert_adapter, ("{prefix}.alerts",)),
    MessageSchema(
        "definition-record.json",
        "DefinitionRecord",
        DefinitionRecord,
        ("{prefix}.definitions",),
        versioned=False,
    ),
)
"""Every generated schema file, in the order the contract lists them."""

SEALED_VALUE: dict[str, Any] = {
    "$schema": DIALECT,
    "$id": "urn:saga-engine:wire:v1:sealed-value.json",
    "title": "SealedValue",
    "description": (
        "What a JSON object under an `input`, `payload` or `output` key becomes when payloads "
        "are sealed (saga.adapters.sealing): AES-256-GCM of the object's compact JSON, a random "
        "96-bit nonce, the record key (the saga id, UTF-8) as associated data."
    ),
    "type": "object",
    "properties": {
        "$sealed": {"const": 1, "description": "The sealed form's version."},
        "kid": {
            "type": "string",
            "pattern": "^[A-Za-z0-9._-]{1,64}$",
            "description": "The id of the data key it was sealed with (rotation).",
        },
        "n": {"type": "string", "description": "Base64 (standard, padded) of the 12-byte nonce."},
        "c": {
            "type": "string",
            "description": "Base64 of the ciphertext followed by the 16-byte GCM tag.",
        },
    },
    "required": ["$sealed", "kid", "n", "c"],
    "additionalProperties": False,
}
"""The schema of a sealed field's value (hand-written: no model holds it)."""


def schema_id(file: str) -> str:
    """The ``$id`` of a schema file: a URN of this wire format's version, so that the files
    can be moved and still refer to each other by name."""
    return f"urn:saga-engine:wire:v{SCHEMA_VERSION}:{file}"


def json_schemas() -> dict[str, dict[str, Any]]:
    """Every schema file's content, by file name (`SCHEMAS`, then ``sealed-value.json``)."""
    found: dict[str, dict[str, Any]] = {}
    for entry in SCHEMAS:
        adapter = entry.adapter
        raw = adapter.model_json_schema() if isinstance(adapter, type) else adapter.json_schema()
        body = _annotate(raw, versioned=entry.versioned)
        body.pop("title", None)
        found[entry.file] = {
            "$schema": DIALECT,
            "$id": schema_id(entry.file),
            "title": entry.title,
            **body,
            "x-saga-topics": list(entry.topics),
        }
    found["sealed-value.json"] = SEALED_VALUE
    return found


def _annotate(schema: dict[str, Any], *, versioned: bool) -> dict[str, Any]:
    """Adds field descriptions and, for wire messages, requires ``v`` and ``type``."""
    models = _models()
    top_level = _top_level_messages() if versioned else set()
    nodes = [schema, *schema.get("$defs", {}).values()]
    for node in nodes:
        model = models.get(node.get("title", ""))
        if model is None or "properties" not in node:
            continue
        for name, doc in _field_docs(model).items():
            prop = node["properties"].get(name)
            if prop is not None and "description" not in prop:
                prop["description"] = doc
        if model.__name__ in top_level:
            required = [f for f in ("v", "type") if f in node["properties"]]
            node["required"] = required + [f for f in node.get("required", []) if f not in required]
    return schema


@cache
def _models() -> dict[str, type[BaseModel]]:
    """The models the schemas are made of, by class name (pydantic's titles of them)."""
    found: dict[str, type[BaseModel]] = {}
    pending: list[type[BaseModel]] = [WireMessage, SagaState, DefinitionRecord]
    while pending:
        model = pending.pop()
        found.setdefault(model.__name__, model)
        pending.extend(model.__subclasses__())
        for field in model.model_fields.values():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel) and ann.__name__ not in found:
                pending.append(ann)
    found.update({m.__name__: m for m in (ErrorInfo, ParentRef)})
    return found


@cache
def _top_level_messages() -> frozenset[str]:
    """The class names of the messages that are a record's whole value."""
    names = {m.__name__ for m in (Command, Reply, Snapshot, Checkpoint, Alert)}
    names |= {m.__name__ for m in _members(request_adapter)}
    names |= {m.__name__ for m in vars(events).values() if _is_event(m)}
    return frozenset(names)


def _is_event(obj: object) -> bool:
    return (
        isinstance(obj, type)
        and issubclass(obj, events.EventBase)
        and "type" in obj.model_fields
        and obj.model_fields["type"].default is not None
        and obj not in (events.EventBase, events.StepEvent)
    )


def _members(adapter: TypeAdapter[Any]) -> list[type[BaseModel]]:
    defs = adapter.json_schema().get("$defs", {})
    models = _models()
    return [models[name] for name in defs if name in models]


def _field_docs(model: type[BaseModel]) -> dict[str, str]:
    """The attribute docstrings of ``model``'s fields (a string right after the field), the
    nearest class's first, as pydantic's ``use_attribute_docstrings`` would collect them."""
    docs: dict[str, str] = {}
    for klass in reversed(model.__mro__):
        if isinstance(klass, type) and issubclass(klass, BaseModel) and klass is not BaseModel:
            docs.update(_class_docs(klass))
    return docs


@cache
def _class_docs(klass: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(source)
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for field, after in itertools.pairwise(body):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            # Lines joined into paragraphs: the wrapping is the source's, not the text's.
            text = inspect.cleandoc(after.value.value)
            docs[field.target.id] = re.sub(r"(?<!\n)\n(?!\n)", " ", text)
    return docs
