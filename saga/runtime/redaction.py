"""What of an error's text may leave the process in spans and logs.

Error messages carry personal data in practice: a participant's exception says "card 4111...
declined for alice@example.com". The reply keeps the whole message (it is the saga's data, in
the log, for operators: `saga status` shows it), but spans go to a tracing backend with other
readers and retention, and WARNING logs to a log pipeline. So those get a *redacted* form by
default: the exception type and how long the message was, never its text.

A `Redactor` turns an `ErrorInfo` into the text that stands for it:

- `redact` (the default): ``"ValueError (message redacted, 57 chars)"``;
- `keep_message` (the opt-out): ``"ValueError: card 4111 declined"``, cut to
  `MAX_KEPT_MESSAGE` characters;
- any callable of the user's, for example one that masks card numbers and addresses and keeps
  the rest.

It is chosen per object (``OpenTelemetryObserver(..., redactor=keep_message)``) or process-wide
with ``SAGA_REDACT=none`` (keep messages) or ``SAGA_REDACT=default`` (redact; also when unset),
read by `redactor_from_env`. The error *type* is never redacted: it is code, not data, and it is
what an operator searches for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from saga.core.messages import ErrorInfo
from saga.errors import UsageError

__all__ = [
    "ENV_VAR",
    "MAX_KEPT_MESSAGE",
    "Redactor",
    "keep_message",
    "redact",
    "redact_exception",
    "redactor_from_env",
    "safely",
]

ENV_VAR = "SAGA_REDACT"
"""The variable choosing the process-wide redactor: ``default`` (redact) or ``none`` (keep)."""
MAX_KEPT_MESSAGE = 500
"""Longest message `keep_message` lets through, in characters."""

Redactor = Callable[[ErrorInfo], str]
"""Turns an error into the text that may appear in spans and WARNING logs in its place."""


def redact(error: ErrorInfo) -> str:
    """The type and the message's length, never its text (the default redactor)."""
    if not error.message:
        return f"{error.type} (no message)"
    return f"{error.type} (message redacted, {len(error.message)} chars)"


def keep_message(error: ErrorInfo) -> str:
    """The type and the message, cut to `MAX_KEPT_MESSAGE` characters (the opt-out)."""
    if not error.message:
        return error.type
    return f"{error.type}: {error.message[:MAX_KEPT_MESSAGE]}"


_BY_NAME: dict[str, Redactor] = {"default": redact, "none": keep_message}


def redactor_from_env(environ: Mapping[str, str] | None = None) -> Redactor:
    """The process-wide redactor that ``SAGA_REDACT`` names (`redact` when it is unset).

    Raises:
        UsageError: The variable names no redactor (its value and the choices are given).
    """
    value = (os.environ if environ is None else environ).get(ENV_VAR, "").strip().lower()
    if not value:
        return redact
    try:
        return _BY_NAME[value]
    except KeyError:
        raise UsageError(
            f"{ENV_VAR}={value!r} is not a redaction setting: use 'default' (error messages "
            "stay out of spans and WARNING logs) or 'none' (they go in)"
        ) from None


def safely(redactor: Redactor, error: ErrorInfo) -> str:
    """``redactor(error)``, or `redact` of it when the redactor itself fails.

    A user's redactor that raises must not break the observer or the handler path, and falling
    back to the strict form leaks nothing.
    """
    try:
        return str(redactor(error))
    except Exception:
        return redact(error)


def redact_exception(exc: BaseException, redactor: Redactor | None = None) -> str:
    """What a log line may say about ``exc``: ``redactor`` (by default the process-wide one)
    applied to its type and message.

    An invalid ``SAGA_REDACT`` falls back to `redact` here instead of raising: this runs on a
    handler's failure path, where the strict form is the safe one (start-up code should call
    `redactor_from_env` to report the setting).
    """
    if redactor is None:
        try:
            redactor = redactor_from_env()
        except UsageError:
            redactor = redact
    try:
        message = str(exc)
    except Exception:
        message = ""
    return safely(redactor, ErrorInfo(type=type(exc).__name__, message=message))
