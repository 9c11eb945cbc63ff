"""Calling a participant's handler: its context, its interceptors, and what its outcome means.

A handler's outcome is classified in exactly one place, `invoke`:

- A result is a success once it passes the checks a reply needs: a dict, a pydantic model, or
  ``None`` for no output; strict JSON (no NaN or infinity, bytes, arbitrary objects, keys that
  are not strings, integers past 64 bits); nested no deeper than a reply may be; no larger
  than the participant's reply limit. The output replied and stored is that JSON parsed back,
  exactly what the coordinator will read. A result that fails a check is ``OutputInvalid`` or
  ``OutputTooLarge``, a business failure: running the handler again would return the same, so
  retrying is pointless, and the check happens here, before anything is sent or stored, because
  an output that cannot be encoded used to crash the participant after the handler's effect,
  which redelivered the command to run (and crash) again.
- `saga.StepFailed` is a business failure (final: the saga compensates).
- Any other exception, including one from an interceptor and the budget running out, is a
  technical failure (retried by the step's policy). So are the exceptions no handler should
  raise, but some do: ``KeyboardInterrupt``, ``SystemExit``, and a ``CancelledError`` of the
  handler's own. They fail the attempt, instead of killing the participant before it commits
  the offset (and so redelivering the command to the same fate). The participant's own
  cancellation, its shutdown, is told apart from a handler's ``CancelledError`` by asking
  whether an enclosing cancel scope was cancelled, and is never swallowed: structured
  concurrency relies on it propagating.

Error messages and details are cut short (`MAX_ERROR_MESSAGE`, `MAX_ERROR_DETAILS`); a reply
that still does not fit is cut further by `smaller`, as `saga.runtime.outcomes` does. The
WARNING logged for a technical failure names the exception's type and a redacted summary
(`saga.runtime.redaction`; ``SAGA_REDACT=none`` keeps the message); the full text is logged at
DEBUG and replied in the `ErrorInfo`, unencrypted even under a payload codec, which seals inputs
and outputs only (`saga.adapters.sealing`).

Async handlers run in the event loop; plain ones in a worker thread of a bounded pool (the
participant's ``workers``), so that blocking calls stall neither other sagas nor the event
loop. A plain handler is abandoned when its budget ends or the participant stops: its thread
runs on to its end outside the pool, and what it returns is dropped (the attempt has failed
with ``Timeout``, or the participant is gone, and the coordinator's deadline governs the step).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeAlias, cast

import anyio
import orjson
from pydantic import BaseModel, ValidationError

from saga.core.codec import DEFAULT_LIMITS
from saga.core.messages import ErrorInfo
from saga.errors import StepFailed
from saga.runtime.redaction import redact_exception

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
    "smaller",
]

log = logging.getLogger("saga.participant")

MAX_ERROR_MESSAGE = 4000
"""Longest error message replied, in characters; a longer one is cut."""
MAX_ERROR_DETAILS = 64 * 1024
"""Largest error details replied, in bytes of JSON; larger ones are replaced by their size."""
MAX_OUTPUT_DEPTH = DEFAULT_LIMITS.max_depth - 1
"""Deepest output: the coordinator reads replies with `DEFAULT_LIMITS`, and a reply's output
sits one level inside it."""


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
    """When this attempt's budget ends, on the participant's clock (seconds since the epoch):
    the command's budget counted from when the participant took it."""


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
    *,
    workers: anyio.CapacityLimiter,
    max_output_bytes: int,
) -> Outcome:
    """Calls the handler through the interceptors, within ``budget`` seconds, and classifies
    what happened (see the module docstring).

    Args:
        registered: The handler.
        interceptors: The participant's interceptors now (the last one outermost).
        payload: The command's payload.
        ctx: The handler's context.
        budget: Seconds the call may take.
        workers: The pool a plain (sync) handler takes a thread from.
        max_output_bytes: The largest output, as JSON, that still fits a reply.

    Raises:
        BaseException: Only the cancellation of the participant itself.
    """
    try:
        if registered.input_model is not None:
            try:
                payload = registered.input_model.model_validate(payload).model_dump()
            except ValidationError as exc:
                raise StepFailed(
                    f"input does not match {registered.input_model.__name__}: "
                    f"{exc.errors()[0]['msg']}"
                ) from None
        result = await _within(_chain(registered, interceptors, workers), payload, ctx, budget)
        return True, _output(result, max_output_bytes), None
    except _BadOutput as exc:
        return False, None, ErrorInfo(type=exc.kind, message=exc.message, business=True)
    except StepFailed as exc:
        error = ErrorInfo(
            type="StepFailed",
            message=_text(exc.reason),
            business=True,
            details=_jsonable(exc.details),
        )
        return False, None, error
    except TimeoutError:
        return False, None, ErrorInfo(type="Timeout", message="the handler passed the deadline")
    except Exception as exc:
        return _technical(exc, ctx)
    except BaseException as exc:
        # An enclosing scope cancelled means the participant is stopping: that cancellation,
        # whatever exception carries it, must reach the scope that asked for it. Otherwise the
        # handler raised it on its own, and it is one more way for an attempt to fail.
        if anyio.current_effective_deadline() == -math.inf:
            raise
        return _technical(exc, ctx)


async def _within(
    call: CallNext, payload: dict[str, Any], ctx: StepContext, budget: float
) -> HandlerResult:
    """``call(payload, ctx)``, cut off with `TimeoutError` once ``budget`` seconds passed.

    The call's first step runs at once, outside any deadline: a handler that returns without
    waiting on anything (computation only, the common no-op and in-memory handler) has nothing
    a deadline could interrupt, and a deadline scope per call cost more than such a handler.
    Only a call that does wait runs on under the deadline, counted from before its first step:
    a hung handler is cut off exactly as before. The deadline is asyncio's own
    (``asyncio.timeout_at``), which, unlike an anyio scope, may be entered after the handler's
    first step has entered scopes of its own: it does not keep a stack of scopes, it cancels the
    task and turns that cancellation, and only that one, into `TimeoutError`.
    """
    deadline = asyncio.get_running_loop().time() + max(0.001, budget)
    awaitable = call(payload, ctx)
    if not isinstance(awaitable, Coroutine):  # _chain makes coroutines; anything else waits
        async with asyncio.timeout_at(deadline):
            return await awaitable
    try:
        waiting_on = awaitable.send(None)
    except StopIteration as finished:
        result: HandlerResult = finished.value
        return result
    async with asyncio.timeout_at(deadline):
        return await _resume(awaitable, waiting_on)


@types.coroutine
def _resume(
    coro: Coroutine[Any, Any, HandlerResult], waiting_on: Any
) -> Generator[Any, Any, HandlerResult]:
    """Awaits a coroutine whose first step has run and is waiting on ``waiting_on``: hands that
    to the event loop, then goes on as ``await`` does (what is sent or thrown in goes on to the
    coroutine)."""
    try:
        while True:
            try:
                sent = yield waiting_on
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                waiting_on = coro.throw(exc)
            else:
                waiting_on = coro.send(sent)
    except StopIteration as finished:
        result: HandlerResult = finished.value
        return result


def smaller(outcome: Outcome) -> Outcome:
    """A stand-in for an outcome whose reply is still too large to send.

    A failure keeps its type and classification with its message cut short and no details;
    a success (whose output fit, so the rest of the reply is what is large) becomes an
    ``OutputTooLarge`` failure.
    """
    _, _, error = outcome
    if error is not None:
        return False, None, error.model_copy(update={"message": error.message[:200], "details": {}})
    message = "the reply is larger than the participant may send"
    return False, None, ErrorInfo(type="OutputTooLarge", message=message, business=True)


class _BadOutput(Exception):
    """A handler's result that cannot be replied: ``kind`` is the error type to reply with."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _output(result: object, max_bytes: int) -> dict[str, Any]:
    """The handler's result as the JSON object to reply with, or `_BadOutput` saying why not."""
    if isinstance(result, BaseModel):
        try:
            result = result.model_dump(mode="json")
        except Exception as exc:
            raise _BadOutput(
                "OutputInvalid", f"the output does not serialise: {_text(exc)}"
            ) from None
    elif result is None:
        return {}
    if not isinstance(result, dict):
        raise _BadOutput("OutputInvalid", f"handler returned {type(result).__name__}, not a dict")
    try:
        data = orjson.dumps(result)
    except TypeError as exc:  # orjson's JSONEncodeError; also its recursion limit
        raise _BadOutput("OutputInvalid", f"the output is not JSON: {exc}") from None
    if len(data) > max_bytes:
        message = f"the output is {len(data)} bytes of JSON; a reply may take at most {max_bytes}"
        raise _BadOutput("OutputTooLarge", message)
    # orjson writes NaN and the infinities as null, silently: look for them in the result
    # itself (bounded: it just serialised into at most max_bytes).
    if (where := _non_finite(result)) is not None:
        raise _BadOutput("OutputInvalid", f"the output is not JSON: {where} is not finite")
    output: dict[str, Any] = orjson.loads(data)
    if _depth(output) > MAX_OUTPUT_DEPTH:
        raise _BadOutput("OutputInvalid", f"the output nests deeper than {MAX_OUTPUT_DEPTH}")
    return output


def _non_finite(value: object) -> str | None:
    """Where ``value`` holds a NaN or an infinity (a path such as ``$.a[2]``), if anywhere."""
    stack: list[tuple[object, str]] = [(value, "$")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return path
        if isinstance(item, dict):
            stack.extend((v, f"{path}.{k}") for k, v in item.items())
        elif isinstance(item, list | tuple):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))
    return None


def _depth(value: object) -> int:
    """Nesting depth of parsed JSON (an object or array counts one level)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def _technical(exc: BaseException, ctx: StepContext) -> Outcome:
    # The message often holds personal data (a card number, an address), so the WARNING says
    # what `saga.runtime.redaction` lets through (by default the type and length only); the
    # full text goes to DEBUG and into the reply's ErrorInfo, which is the saga's own data.
    extra = {"saga_id": ctx.saga_id, "step": ctx.step, "attempt": ctx.attempt}
    log.warning(
        "%s/%s attempt %d failed: %s",
        ctx.saga_id,
        ctx.step,
        ctx.attempt,
        redact_exception(exc),
        extra=extra,
    )
    log.debug("%s/%s attempt %d failed: %r", ctx.saga_id, ctx.step, ctx.attempt, exc, extra=extra)
    message = _text(exc) or _text(repr(exc))
    return False, None, ErrorInfo(type=type(exc).__name__, message=message)


def _text(value: object) -> str:
    """``str(value)``, cut to `MAX_ERROR_MESSAGE`; a ``__str__`` that raises gives the type."""
    try:
        text = str(value)
    except Exception:
        text = f"<{type(value).__name__} that cannot be shown>"
    return text[:MAX_ERROR_MESSAGE]


def _chain(
    registered: Registered, interceptors: list[Interception], workers: anyio.CapacityLimiter
) -> CallNext:
    """The handler, wrapped in the interceptors registered now (the last one outermost)."""

    async def handler(payload: dict[str, Any], ctx: StepContext) -> HandlerResult:
        if registered.is_async:
            return await cast(Awaitable[HandlerResult], registered.fn(payload, ctx))
        sync = cast(Callable[[dict[str, Any], StepContext], HandlerResult], registered.fn)
        # Abandoned on cancellation (its budget, or the participant stopping): a hung call
        # must not hold up the participant, which cannot interrupt a thread anyway.
        return await anyio.to_thread.run_sync(
            sync, payload, ctx, abandon_on_cancel=True, limiter=workers
        )

    call: CallNext = handler
    for interception in list(interceptors):
        call = partial(_intercepted, interception.fn, call)
    return call


async def _intercepted(
    fn: Interceptor, call_next: CallNext, payload: dict[str, Any], ctx: StepContext
) -> HandlerResult:
    return await fn(payload, ctx, call_next)


def _jsonable(details: object) -> dict[str, Any]:
    try:
        data = orjson.dumps(details, default=str)
    except TypeError:
        return {"repr": _text(repr(details))}
    if len(data) > MAX_ERROR_DETAILS:
        return {"truncated": True, "bytes": len(data)}
    loaded = orjson.loads(data)
    return loaded if isinstance(loaded, dict) else {"value": loaded}
