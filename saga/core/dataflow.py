"""How a step's input is built from the saga input and earlier steps' outputs.

A step's ``input`` is a template: any JSON value in which a string that starts with ``$.`` is a
reference, resolved when the step starts. Everything else is a literal.

    ``$.input``                    the whole saga input
    ``$.input.order.total``        a path into it (dict keys, or list indexes as digits)
    ``$.steps.payment.output.id``  a path into the output of step ``payment``
    ``$.saga_id``                  the saga's id
    ``$.item.dish``                inside a ``for_each`` step: the item it runs for

A template of ``None`` (the default) passes the saga input unchanged. References are checked
when the definition loads (`references`), so a typo fails early, and resolved purely here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ResolveError", "lookup", "references", "render", "render_with"]

_PREFIX = "$."


class ResolveError(Exception):
    """A reference in an input template could not be resolved against the saga's data."""


def references(template: Any) -> list[tuple[str, str]]:
    """Lists the references in a template as ``(root, rest)`` pairs.

    ``root`` is ``input``, ``saga_id`` or ``steps.<name>``; ``rest`` is the remaining dotted
    path. An unrecognised root is returned as it is, so the caller can report it.
    """
    found: list[tuple[str, str]] = []
    stack = [template]
    while stack:
        value = stack.pop()
        if isinstance(value, str) and value.startswith(_PREFIX):
            parts = value[len(_PREFIX) :].split(".")
            if parts[0] == "steps" and len(parts) >= 2:
                found.append((f"steps.{parts[1]}", ".".join(parts[2:])))
            else:
                found.append((parts[0], ".".join(parts[1:])))
        elif isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    return found


_NO_ITEM: Any = object()


def render(
    template: Any,
    *,
    saga_id: str,
    saga_input: Mapping[str, Any],
    outputs: Mapping[str, Any],
    item: Any = _NO_ITEM,
) -> Any:
    """Resolves every reference in ``template`` (``$.item`` only when ``item`` is given: the
    item a ``for_each`` step runs for).

    Raises:
        ResolveError: A path does not exist in the data (the message names the path).
    """
    if template is None:
        return dict(saga_input)
    data = _Data(saga_id, saga_input, outputs, item)
    return _substitute(template, lambda ref: _lookup(ref, data))


class _Data:
    """What a template is resolved against."""

    __slots__ = ("item", "outputs", "saga_id", "saga_input")

    def __init__(
        self, saga_id: str, saga_input: Mapping[str, Any], outputs: Mapping[str, Any], item: Any
    ) -> None:
        self.saga_id = saga_id
        self.saga_input = saga_input
        self.outputs = outputs
        self.item = item


def render_with(template: Any, roots: Mapping[str, Any]) -> Any:
    """Resolves every reference in ``template`` against named roots: ``$.event.id`` reads
    ``roots["event"]["id"]``. For the templates that are not a step's input (a trigger's saga
    id and input over ``$.event``, an outcome event over ``$.status`` and ``$.input``, a
    fan-out item's ``$.item``); unlike `render`, a template of ``None`` stays ``None``.

    Raises:
        ResolveError: A root or a path does not exist (the message names the reference).
    """
    return _substitute(template, lambda ref: lookup(ref, roots))


def lookup(ref: str, roots: Mapping[str, Any]) -> Any:
    """The value a ``$.root.path`` reference names in ``roots``.

    Raises:
        ResolveError: The root is not one of ``roots``, or the path is not in its value.
    """
    parts = ref[len(_PREFIX) :].split(".") if ref.startswith(_PREFIX) else [ref]
    if parts[0] not in roots:
        known = ", ".join(f"$.{r}" for r in roots)
        raise ResolveError(f"{ref}: unknown reference (use {known})")
    return _walk(ref, roots[parts[0]], parts[1:])


def _walk(ref: str, value: Any, path: list[str]) -> Any:
    for key in path:
        if isinstance(value, Mapping) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isascii() and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            raise ResolveError(f"{ref}: no {key!r} in the data")
    return value


def _substitute(template: Any, resolve: Callable[[str], Any]) -> Any:
    """``template`` with every reference in it replaced by what ``resolve`` gives for it."""
    # Inside a template, None is a literal null (only a missing template means "the input").
    if isinstance(template, str) and template.startswith(_PREFIX):
        return resolve(template)
    if isinstance(template, Mapping):
        return {k: _substitute(v, resolve) for k, v in template.items()}
    if isinstance(template, list | tuple):
        return [_substitute(v, resolve) for v in template]
    return template


def _lookup(ref: str, data: _Data) -> Any:
    parts = ref[len(_PREFIX) :].split(".")
    root = parts[0]
    if root == "saga_id" and len(parts) == 1:
        return data.saga_id
    if root == "item" and data.item is not _NO_ITEM:
        return _walk(ref, data.item, parts[1:])
    if root == "input":
        value: Any = data.saga_input
        path = parts[1:]
    elif root == "steps" and len(parts) >= 3 and parts[2] == "output":
        if parts[1] not in data.outputs:
            raise ResolveError(f"{ref}: step {parts[1]!r} has no output yet")
        value = data.outputs[parts[1]]
        path = parts[3:]
    else:
        raise ResolveError(
            f"{ref}: unknown reference (use $.input, $.steps.NAME.output or $.saga_id)"
        )
    return _walk(ref, value, path)
