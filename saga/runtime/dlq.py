"""Dead letters: the records that could not be used, set aside with their reason.

Whoever meets a record it cannot use (the coordinator: a request, reply, snapshot or log record;
a participant: a command) writes a `DeadLetter` to ``<prefix>.dlq`` instead of stopping: the
original bytes and key, and headers saying why and where it came from. A dead letter is a value
first and a record second, so the writer counts it by its fields once the write committed,
without parsing back the headers it wrote.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from saga.runtime.ports import Outgoing, Record

__all__ = [
    "DETAIL_HEADER",
    "DLQ_MAX_VALUE",
    "REASON_HEADER",
    "SHA256_HEADER",
    "SOURCE_HEADER",
    "TRUNCATED_HEADER",
    "DeadLetter",
]

log = logging.getLogger("saga.dlq")

REASON_HEADER = "saga.dlq.reason"
"""A short, stable reason code (``invalid_json``, ``unknown_saga``, ...)."""
DETAIL_HEADER = "saga.dlq.detail"
"""What exactly was wrong, for people (at most 2,000 bytes)."""
SOURCE_HEADER = "saga.dlq.source"
"""``topic/partition/offset`` of the original record."""
TRUNCATED_HEADER = "saga.dlq.truncated_from"
"""Present when the value was cut: the original size in bytes."""
SHA256_HEADER = "saga.dlq.sha256"
"""Present when the value was cut: the SHA-256 of the original value."""

DLQ_MAX_VALUE = 512 * 1024
"""Largest value copied whole into a dead letter; larger ones keep their head and a digest."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record set aside, and why.

    Attributes:
        record: The original record.
        reason: A short, stable reason code, also the metric label.
        detail: What was wrong, in words.
    """

    record: Record
    reason: str
    detail: str

    @property
    def source_topic(self) -> str:
        """The topic the record came from."""
        return self.record.topic

    def outgoing(self, dlq_topic: str) -> Outgoing:
        """The record to write to ``dlq_topic``: the original bytes with the reason in headers.

        A value too large for the producer (a ``too_large`` poison message is larger than a
        request may be) is cut to its first `DLQ_MAX_VALUE` bytes, with its full size and
        SHA-256 in the headers; the original stays readable at its source offset for the
        topic's retention.
        """
        r = self.record
        value = r.value or b""
        headers = [
            (REASON_HEADER, self.reason.encode()),
            (DETAIL_HEADER, self.detail.encode()[:2000]),
            (SOURCE_HEADER, f"{r.topic}/{r.partition}/{r.offset}".encode()),
        ]
        if len(value) > DLQ_MAX_VALUE:
            headers.append((TRUNCATED_HEADER, str(len(value)).encode()))
            headers.append((SHA256_HEADER, hashlib.sha256(value).hexdigest().encode()))
            value = value[:DLQ_MAX_VALUE]
        return Outgoing(dlq_topic, r.key, value, (*headers, *r.headers))

    def log(self) -> None:
        """Writes the warning every dead letter deserves."""
        r = self.record
        log.warning(
            "dead-lettered %s/%d/%d: %s: %s",
            r.topic,
            r.partition,
            r.offset,
            self.reason,
            self.detail,
            extra={"reason": self.reason, "partition": r.partition},
        )
