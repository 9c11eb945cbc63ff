"""What a `SagaQuery` means, said once in Python: the adapters' SQL must agree with `matches`.

`matches` is the reference: the scanning fallback of ``saga list`` filters with it, and the
adapters' tests check their results against it. `input_value` is the one canonical JSON form of
an input value (sorted keys, compact), so that ``{"a": 1, "b": 2}`` equals ``{"b": 2, "a": 1}``;
``1`` and ``1.0`` stay different, as JSON has them. The cursor is the last row's
``(updated_at, saga_id)``, opaque to callers.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Any

import orjson

from saga.core.state import SagaState
from saga.errors import UsageError
from saga.index.port import SagaQuery

__all__ = [
    "CursorError",
    "decode_cursor",
    "encode_cursor",
    "input_value",
    "matches",
    "order_key",
    "select",
]

MAX_LIMIT = 1000
"""The largest page a query may ask for."""


class CursorError(UsageError):
    """A cursor that no page of this index handed out."""


def input_value(value: Any) -> str:
    """The canonical JSON text of an input value (how the index stores and compares it)."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def encode_cursor(updated_at: float, saga_id: str) -> str:
    """The cursor that continues after the row with these keys."""
    return base64.urlsafe_b64encode(orjson.dumps([updated_at, saga_id])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The ``(updated_at, saga_id)`` of a cursor.

    Raises:
        CursorError: It is not one that `encode_cursor` made.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, saga_id = orjson.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise CursorError(f"cursor {cursor!r} is not one this index handed out") from None
    if not isinstance(at, int | float) or isinstance(at, bool) or not isinstance(saga_id, str):
        raise CursorError(f"cursor {cursor!r} is not one this index handed out")
    return float(at), saga_id


def order_key(state: SagaState) -> tuple[float, str]:
    """The sort key of the index's order (apply descending): newest update, then saga id."""
    return (state.updated_at, state.saga_id)


def matches(query: SagaQuery, state: SagaState) -> bool:
    """Whether ``state`` is one of the sagas ``query`` asks for (the cursor and limit aside)."""
    if query.name is not None and state.name != query.name:
        return False
    if query.status and state.status.value not in set(query.status):
        return False
    if query.version is not None and state.version != query.version:
        return False
    if query.step is not None:
        step = state.steps.get(query.step)
        if step is None:
            return False
        if query.step_status is not None and step.status.value != query.step_status:
            return False
    elif query.step_status is not None and not any(
        s.status.value == query.step_status for s in state.steps.values()
    ):
        return False
    if query.started_after is not None and state.started_at < query.started_after:
        return False
    if query.started_before is not None and state.started_at > query.started_before:
        return False
    if query.updated_after is not None and state.updated_at < query.updated_after:
        return False
    if query.updated_before is not None and state.updated_at > query.updated_before:
        return False
    if query.saga_id_prefix is not None and not state.saga_id.startswith(query.saga_id_prefix):
        return False
    for key, value in query.input.items():
        if key not in state.input or input_value(state.input[key]) != input_value(value):
            return False
    return True


def select(
    query: SagaQuery, states: Iterable[SagaState]
) -> tuple[list[SagaState], int, str | None]:
    """A page of ``states`` as an index answers ``query``: the page, the total that matched,
    and the next cursor (for scanning without an index, and as the reference in tests)."""
    found = sorted((s for s in states if matches(query, s)), key=order_key, reverse=True)
    total = len(found)
    if query.cursor is not None:
        after = decode_cursor(query.cursor)
        found = [s for s in found if order_key(s) < after]
    limit = max(1, min(query.limit, MAX_LIMIT))
    page = found[:limit]
    more = len(found) > limit
    return page, total, encode_cursor(*order_key(page[-1])) if more and page else None
