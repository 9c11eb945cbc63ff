"""The checked-in wire contract (``contract/``) as JSON Schema validators, for the tests that
hold real records against it (tests/contract/test_wire_contract.py, tests/conformance)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, Protocol, cast

import orjson
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

__all__ = ["CONTRACT", "Validator", "asyncapi", "problems", "schema", "validator"]

CONTRACT = Path(__file__).resolve().parents[2] / "contract"
"""The repository's contract directory."""


class _Error(Protocol):
    message: str
    absolute_path: Any


class Validator(Protocol):
    """What the tests use of a jsonschema validator (jsonschema ships no type hints)."""

    def iter_errors(self, instance: object) -> Iterator[_Error]:
        """Every way ``instance`` fails the schema."""
        ...


def schema(file: str) -> dict[str, Any]:
    """One checked-in schema file, parsed."""
    data: dict[str, Any] = orjson.loads((CONTRACT / "schemas" / file).read_bytes())
    return data


@cache
def _registry() -> Registry[Any]:
    resources = []
    for path in sorted((CONTRACT / "schemas").glob("*.json")):
        contents = orjson.loads(path.read_bytes())
        resources.append((contents["$id"], Resource.from_contents(contents)))
    return Registry().with_resources(resources)


@cache
def validator(file: str) -> Validator:
    """A draft 2020-12 validator of the checked-in schema ``file`` (the schema itself checked
    against the dialect's metaschema first)."""
    contents = schema(file)
    Draft202012Validator.check_schema(contents)
    return cast(Validator, Draft202012Validator(contents, registry=_registry()))


def problems(file: str, value: bytes | dict[str, Any]) -> list[str]:
    """Why a record's value does not match ``file`` (empty when it does)."""
    instance = orjson.loads(value) if isinstance(value, bytes) else value
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator(file).iter_errors(instance)
    ]


@cache
def asyncapi() -> dict[str, Any]:
    """The checked-in AsyncAPI document, parsed."""
    data: dict[str, Any] = yaml.safe_load((CONTRACT / "asyncapi.yaml").read_text())
    return data
