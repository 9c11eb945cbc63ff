"""Structured logs: one JSON object per line, carrying the saga id and its trace id.

The trace id is derived from the saga id (`saga.runtime.traceids`), so a log line can be joined
to the saga's trace in Jaeger without any tracing library in the logging path.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson

from saga.runtime.traceids import trace_id_for

__all__ = ["JsonFormatter", "configure_logging"]

_FIELDS = ("saga_id", "saga_name", "step", "phase", "attempt", "service", "partition", "reason")


class JsonFormatter(logging.Formatter):
    """Formats records as JSON lines: time, level, logger, message, saga fields, trace id."""

    def format(self, record: logging.LogRecord) -> str:
        """One JSON object, no newlines inside."""
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        saga_id = record.__dict__.get("saga_id")
        if isinstance(saga_id, str):
            line["trace_id"] = f"{trace_id_for(saga_id):032x}"
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Sends logs to stderr, as JSON lines (``fmt="json"``) or plain text (``"text"``)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
