"""Calling a participant's handler: its context, its interceptors, and what its outcome means.

A handler's outcome is classified in exactly one place, `invoke`: a result is a success (a
dict, a pydantic model, or ``None`` for no output); `saga.StepFailed` is a business failure
(final: the saga compensates); any other exception, including one from an interceptor and the
deadline passing, is a technical failure (retried by the step's policy). Async handlers run in
the event loop; plain ones in a worker thread, so that blocking calls do not stall other sagas.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeAlias, cast

import anyio
import orjson
from pydantic import BaseModel, ValidationError

from saga.core.messages import ErrorInfo
from saga.errors import StepFailed

__all__ = [
    "CallNext",
    "Handler",
    "HandlerResult",
    "Interception",
    "Interceptor",
    "Outcome",
    "Registered",
    "StepContext",
    "invoke",
]

log = logging.getLogger("saga.participant")


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a handler knows about the command it is running."""

    saga_id: str
    saga_name: str
    step: str
    phase: str
    """``action`` or ``compensation``."""
    action: str
    """The handler's name: the step's action or compensation."""
    attempt: int
    idempotency_key: str
    """Stable across retries of this step and phase: pass it to side effects."""
    deadline_at: float
    """When the coordinator stops waiting for this attempt (seconds since the epoch)."""


HandlerResult: TypeAlias = dict[str, Any] | BaseModel | None
Handler: TypeAlias = Callable[
    [dict[str, Any], StepContext], Awaitable[HandlerResult] | HandlerResult
]
CallNext: TypeAlias = Callable[[dict[str, Any], StepContext], Awaitable[HandlerResult]]
"""What an interceptor calls to go on: the next interceptor, or the handler itself."""
Interceptor: TypeAlias = Callable[[dict[str, Any], StepContext, CallNext], Awaitable[HandlerResult]]
"""``async def fn(payload, ctx, call_next) -> result``, wrapping every handler call."""

Outcome: TypeAlias = tuple[bool, dict[str, Any] | None, ErrorInfo | None]
"""(ok, output, error) of one handler call."""


@dataclass(frozen=True, slots=True)
class Registered:
    """A handler as registered: the function, its input model, whether it is async."""

    fn: Handler
    input_model: type[BaseModel] | None
    is_async: bool

    @classmethod
    def of(cls, fn: Handler, input_model: type[BaseModel] | None) -> Registered:
        """Registers ``fn``, noting whether it is a coroutine function."""
        return cls(fn, input_model, inspect.iscoroutinefunction(fn))


class Interception:
    """An interceptor registered on a participant; `remove` takes it off again.

    Also a context manager that removes it on exit::

        with payment.intercept(count_calls):
            ...
    """

    def __init__(self, chain: list[Interception], fn: Interceptor) -> None:
        self._chain = chain
        self.fn = fn

    def remove(self) -> None:
        """Stops intercepting (calls already under way finish with it). Idempotent."""
        if self in self._chain:
            self._chain.remove(self)

    def __enter__(self) -> Interception:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


async def invoke(
    registered: Registered,
    interceptors: list[Interception],
    payload: dict[str, Any],
    ctx: StepContext,
    budget: float,
) -> Outcome:
    """Calls the handler through the interceptors, within ``budget`` seconds, and classifies
    what happened (see the module docstring)."""
    try:
        if registered.input_model is not None:
            try:
                payload = registered.input_model.model_validate(payload).model_dump()
            except ValidationError as exc:
                raise StepFailed(
                    f"input does not match {registered.input_model.__name__}: "
                    f"{exc.errors()[0]['msg']}"
                ) from None
        with anyio.fail_after(max(0.001, budget)):
            result = await _chain(registered, interceptors)(payload, ctx)
    except StepFailed as exc:
        error = ErrorInfo(
            type="StepFailed", message=exc.reason, business=True, details=_jsonable(exc.details)
        )
        return False, None, error
    except TimeoutError:
        return False, None, ErrorInfo(type="Timeout", message="the handler passed the deadline")
    except Exception as exc:
        log.warning(
            "%s/%s attempt %d failed: %r",
            ctx.saga_id,
            ctx.step,
            ctx.attempt,
            exc,
            extra={"saga_id": ctx.saga_id, "step": ctx.step, "attempt": ctx.attempt},
        )
        return False, None, ErrorInfo(type=type(exc).__name__, message=str(exc) or repr(exc))
    if isinstance(result, BaseModel):
        return True, result.model_dump(mode="json"), None
    if result is None:
        return True, {}, None
    if not isinstance(result, dict):
        message = f"handler returned {type(result).__name__}, not a dict"
        return False, None, ErrorInfo(type="OutputInvalid", message=message)
    return True, result, None


def _chain(registered: Registered, interceptors: list[Interception]) -> CallNext:
    """The handler, wrapped in the interceptors registered now (the last one outermost)."""

    async def handler(payload: dict[str, Any], ctx: StepContext) -> HandlerResult:
        if registered.is_async:
            return await cast(Awaitable[HandlerResult], registered.fn(payload, ctx))
        sync = cast(Callable[[dict[str, Any], StepContext], HandlerResult], registered.fn)
        return await anyio.to_thread.run_sync(sync, payload, ctx)

    call: CallNext = handler
    for interception in list(interceptors):
        call = partial(_intercepted, interception.fn, call)
    return call


async def _intercepted(
    fn: Interceptor, call_next: CallNext, payload: dict[str, Any], ctx: StepContext
) -> HandlerResult:
    return await fn(payload, ctx, call_next)


def _jsonable(details: dict[str, object]) -> dict[str, Any]:
    try:
        return dict(orjson.loads(orjson.dumps(details, default=str)))
    except TypeError:
        return {"repr": repr(details)}
