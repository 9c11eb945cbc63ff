"""Live updates as server-sent events (``text/event-stream``).

The index's `generation` grows each time it applies a change; a stream looks at it a few times
a second and, when it moved, sends what the page shows live: the counts by status for the list
(event ``counts``), or the saga's ``seq`` and status for a saga page (event ``saga``, only when
that saga changed). The pages' script answers either by fetching the page again and swapping
the parts marked ``data-live``. A comment line every 15 seconds keeps proxies from closing an
idle stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import StreamingResponse

from saga.index.port import SagaIndex

__all__ = ["event_stream", "format_event"]

_KEEPALIVE = 15.0


def format_event(event: str, data: Any) -> bytes:
    """One server-sent event: its name and its data as JSON."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def event_stream(
    request: Request,
    index: SagaIndex,
    snapshot: Callable[[], tuple[str, Any] | None],
    *,
    poll: float = 0.25,
) -> StreamingResponse:
    """A stream that sends ``snapshot()`` (an event name and its data) whenever the index's
    generation moved and the snapshot differs from the last one sent (``None``: nothing)."""

    async def events() -> AsyncIterator[bytes]:
        last: tuple[str, Any] | None = None
        generation = -1
        quiet = 0.0
        yield b"retry: 2000\n\n"
        while not await request.is_disconnected():
            if index.generation != generation:
                generation = index.generation
                now = snapshot()
                if now is not None and now != last:
                    last = now
                    quiet = 0.0
                    yield format_event(*now)
            await anyio.sleep(poll)
            quiet += poll
            if quiet >= _KEEPALIVE:
                quiet = 0.0
                yield b": keep-alive\n\n"

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
