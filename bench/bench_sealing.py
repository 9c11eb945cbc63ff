"""Cost of payload sealing per record: sealed against plain, as a ratio, in one run.

"Plain" is what the engine pays for a record without a codec: encoding the message (on the way
out) or decoding it (on the way in). "Sealed" adds `SealedTransport.seal_record` or
`SealedTransport.open_record` (AES-256-GCM). Records of each shape the engine writes: commands
with a small and a 4 KiB payload, a reply with an output, a snapshot of a four-step saga, and a
checkpoint (no field to seal: the byte search lets it through without parsing).

Run: ``python -m bench.bench_sealing``. No broker needed; prints one JSON object.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, TypeAdapter

from saga.adapters.memory import MemoryTransport
from saga.adapters.sealing import AesGcmCodec, SealedTransport
from saga.core.codec import ENGINE_LIMITS, decode, encode
from saga.core.messages import (
    Checkpoint,
    Command,
    Reply,
    Snapshot,
    command_adapter,
    reply_adapter,
    snapshot_adapter,
)
from saga.core.state import SagaState, SagaStatus, StepState, StepStatus
from saga.runtime.ports import Outgoing, Record

NOW = 1_700_000_000.0
SMALL = {"order_id": "o-1", "customer": "Ada", "amount": 14.9, "items": [{"dish": "x", "q": 1}]}
LARGE = {**SMALL, "notes": "n" * 4000}


def command(payload: dict[str, Any]) -> Command:
    return Command(
        message_id="s-1/pay/action/1", saga_id="s-1", saga_name="order", saga_version=1,
        step="pay", phase="action", service="payment", action="charge", attempt=1,
        idempotency_key="s-1/pay/action", payload=payload, deadline_at=NOW + 10, at=NOW,
    )  # fmt: skip


def snapshot() -> Snapshot:
    steps = {
        name: StepState(status=StepStatus.SUCCEEDED, attempt=1, output={"id": f"{name}-1"})
        for name in ("location", "payment", "restaurant", "rider")
    }
    state = SagaState(
        saga_id="s-1", name="order", version=1, status=SagaStatus.RUNNING, input=SMALL,
        steps=steps, seq=9, started_at=NOW, updated_at=NOW,
    )  # fmt: skip
    return Snapshot(saga_id="s-1", state=state.model_dump(mode="json"))


REPLY = Reply(
    message_id="r-1", saga_id="s-1", step="pay", phase="action", attempt=1, service="payment",
    ok=True, output={"charge_id": "ch_1", "amount": 14.9}, at=NOW,
)  # fmt: skip

CASES: list[tuple[str, BaseModel, TypeAdapter[Any]]] = [
    ("command_small", command(SMALL), command_adapter),
    ("command_4k", command(LARGE), command_adapter),
    ("reply", REPLY, reply_adapter),
    ("snapshot", snapshot(), snapshot_adapter),
    ("checkpoint", Checkpoint(partition=0, log_offset=10, partitions=6), snapshot_adapter),
]


def per_record_us(fn: Callable[[], object], n: int) -> float:
    """Microseconds per call, the best of three runs of ``n`` calls."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def main() -> None:
    """Measures and prints the figures."""
    sealing = SealedTransport(MemoryTransport(), AesGcmCodec({"k1": b"k" * 32}, "k1"))
    n = 5000
    figures: dict[str, Any] = {"records_per_case": n}
    for name, message, adapter in CASES:
        value = encode(message)
        out = Outgoing("t", b"s-1", value)
        sealed = sealing.seal_record(out)
        incoming = Record("t", 0, 0, b"s-1", sealed.value)
        plain_in = Record("t", 0, 0, b"s-1", value)
        assert decode(adapter, sealing.open_record(incoming).value, ENGINE_LIMITS) == message

        def plain_out(m: BaseModel = message) -> Outgoing:
            return Outgoing("t", b"s-1", encode(m))

        def sealed_out(m: BaseModel = message) -> Outgoing:
            return sealing.seal_record(Outgoing("t", b"s-1", encode(m)))

        def plain_read(r: Record = plain_in, a: TypeAdapter[Any] = adapter) -> object:
            return decode(a, r.value, ENGINE_LIMITS)

        def sealed_read(r: Record = incoming, a: TypeAdapter[Any] = adapter) -> object:
            return decode(a, sealing.open_record(r).value, ENGINE_LIMITS)

        plain_out_us = per_record_us(plain_out, n)
        sealed_out_us = per_record_us(sealed_out, n)
        plain_in_us = per_record_us(plain_read, n)
        sealed_in_us = per_record_us(sealed_read, n)
        figures[name] = {
            "bytes_plain": len(value),
            "bytes_sealed": len(sealed.value or b""),
            "out_plain_us": round(plain_out_us, 2),
            "out_sealed_us": round(sealed_out_us, 2),
            "out_ratio": round(sealed_out_us / plain_out_us, 2),
            "in_plain_us": round(plain_in_us, 2),
            "in_sealed_us": round(sealed_in_us, 2),
            "in_ratio": round(sealed_in_us / plain_in_us, 2),
        }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
