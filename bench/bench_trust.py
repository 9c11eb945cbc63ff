"""What signing and verifying cost per record, against encoding and decoding the same message.

For a typical command and reply (and a command with a 16 KiB payload, to show how the cost grows
with size), in one run: nanoseconds per operation for encoding a message (`saga.core.codec`)
and signing the record (`SigningKey.sign_outgoing`), for decoding it and verifying the
signature (`Keyring.verify`), the ratios signed/unsigned, and the sum over one step (a command
and its reply, each signed once and verified once). Each figure is the best of
several rounds (the least disturbed by whatever else runs on the machine).

Run: ``python -m bench.bench_trust``. No broker needed; prints one JSON object.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, TypeAdapter

from saga.core.codec import decode, encode
from saga.core.messages import Command, Reply, command_adapter, reply_adapter
from saga.runtime.ports import Outgoing, Record
from saga.runtime.trust import Keyring, new_key

ROUNDS = 5
N = 5_000

NOW = 1_700_000_000.0


def command(payload: dict[str, Any]) -> Command:
    """A step's command as the coordinator sends it."""
    return Command(
        message_id="saga-000123/payment/action/1",
        saga_id="saga-000123",
        saga_name="order_pasta",
        saga_version=1,
        step="payment",
        phase="action",
        service="payment",
        action="charge",
        attempt=1,
        idempotency_key="saga-000123/payment/action",
        payload=payload,
        deadline_at=NOW + 10,
        at=NOW,
        budget=10.0,
    )


TYPICAL_PAYLOAD = {
    "amount": 42.5,
    "currency": "EUR",
    "customer": "cust-81723",
    "order": {"dish": "carbonara", "quantity": 2, "notes": "no pepper"},
}

REPLY = Reply(
    message_id="saga-000123/payment/action/1/reply",
    saga_id="saga-000123",
    step="payment",
    phase="action",
    attempt=1,
    service="payment",
    ok=True,
    output={"charge_id": "ch_3PqR8x2eZvKuYc1L", "amount": 42.5},
    at=NOW,
)


def best_ns(op: Callable[[], object]) -> float:
    """The best mean time of one call over `ROUNDS` rounds of `N` calls, in ns."""
    best = float("inf")
    for _ in range(ROUNDS):
        t0 = time.perf_counter_ns()
        for _ in range(N):
            op()
        best = min(best, (time.perf_counter_ns() - t0) / N)
    return best


def measure(name: str, message: BaseModel, adapter: TypeAdapter[Any], topic: str) -> dict[str, Any]:
    """The figures for one kind of message."""
    signer = new_key("coordinator")
    ring = Keyring([signer.public_entry(), new_key("payment").public_entry()])
    key = b"saga-000123"
    value = encode(message)
    unsigned = Outgoing(topic, key, value)
    signed = signer.sign_outgoing(unsigned)
    record = Record(topic, 0, 0, key, value, signed.headers)
    assert ring.verify(record) == "coordinator"

    encode_ns = best_ns(lambda: encode(message))
    sign_ns = best_ns(lambda: signer.sign_outgoing(unsigned))
    decode_ns = best_ns(lambda: decode(adapter, value))
    verify_ns = best_ns(lambda: ring.verify(record))
    return {
        "message": name,
        "value_bytes": len(value),
        "signature_header_bytes": sum(len(k) + len(v) for k, v in signed.headers),
        "encode_ns": round(encode_ns),
        "sign_ns": round(sign_ns),
        "decode_ns": round(decode_ns),
        "verify_ns": round(verify_ns),
        "sign_over_encode": round(sign_ns / encode_ns, 2),
        "verify_over_decode": round(verify_ns / decode_ns, 2),
        "signed_send_over_unsigned": round((encode_ns + sign_ns) / encode_ns, 2),
        "verified_receive_over_unverified": round((decode_ns + verify_ns) / decode_ns, 2),
    }


def main() -> None:
    """Measures and prints the figures."""
    big = {**TYPICAL_PAYLOAD, "blob": "x" * 16_384}
    results = [
        measure("command", command(TYPICAL_PAYLOAD), command_adapter, "saga.commands.payment"),
        measure("reply", REPLY, reply_adapter, "saga.replies"),
        measure("command_16k", command(big), command_adapter, "saga.commands.payment"),
    ]
    # One step crosses the trust boundary twice: the coordinator signs the command and the
    # participant verifies it, the participant signs the reply and the coordinator verifies it.
    cmd, reply = results[0], results[1]
    unsigned_step = sum(r["encode_ns"] + r["decode_ns"] for r in (cmd, reply))
    trust_step = sum(r["sign_ns"] + r["verify_ns"] for r in (cmd, reply))
    per_step = {
        "unsigned_codec_ns": unsigned_step,
        "sign_and_verify_ns": trust_step,
        "signed_over_unsigned": round((unsigned_step + trust_step) / unsigned_step, 2),
    }
    print(
        json.dumps(
            {"rounds": ROUNDS, "calls_per_round": N, "results": results, "per_step": per_step}
        )
    )


if __name__ == "__main__":
    main()
