"""B7: tracing on against off, at saturation.

Method. Two fresh sets of the engine's processes, one after the other on the same broker: off
(no observer: the engine's `NullObserver`) and on (`OpenTelemetryObserver.from_env` in every
process, exporting spans over OTLP/HTTP to a real Jaeger from `deploy.jaeger`, with the SDK's
batch span processor). Each runs the closed loop at B1's saturation level: the in-flight level
at which B1's sweep had its highest throughput (500 when B1 did not run), where the coordinator
is CPU-bound and every microsecond of span work costs throughput. The cost is
1 - throughput(on) / throughput(off); the p50s are compared too. Jaeger's query API must list
the coordinator's service afterwards, or the run fails: spans that went nowhere cost nothing.
"""

from __future__ import annotations

import time
from typing import Any

from bench.perf.common import Context
from bench.perf.throughput import sweep

__all__ = ["run"]


def run(ctx: Context, *, level: int | None = None) -> dict[str, Any]:
    """Runs B7; returns its figures."""
    if ctx.servers.otlp_http is None:
        raise RuntimeError("B7 needs Jaeger: start the servers with jaeger=True")
    seconds = 5.0 if ctx.quick else 12.0
    chosen = level or ctx.results.get("saturation_level") or 500
    off = sweep(ctx, "engine", [chosen], seconds)[str(chosen)]
    on = sweep(ctx, "engine", [chosen], seconds, tracing=True, otlp=ctx.servers.otlp_http)
    on = on[str(chosen)]
    services = _jaeger_services(ctx.servers.jaeger_query)
    if "perf-coordinator" not in services:
        raise RuntimeError(f"Jaeger received no coordinator spans (services: {services})")
    ratio = on["sagas_per_s"] / off["sagas_per_s"] if off["sagas_per_s"] else None
    p50 = on["p50_ms"] / off["p50_ms"] if off["p50_ms"] and on["p50_ms"] else None
    return {
        "in_flight": chosen,
        "off": off,
        "on": on,
        "throughput_on_over_off": None if ratio is None else round(ratio, 3),
        "throughput_cost": None if ratio is None else round(1 - ratio, 3),
        "p50_on_over_off": None if p50 is None else round(p50, 3),
        "jaeger_services": services,
    }


def _jaeger_services(query: str | None) -> list[str]:
    """The services Jaeger has spans of: proof that the "on" run exported for real."""
    import httpx

    if query is None:
        return []
    # The batch processor exports every few seconds; the last spans may still be on their way.
    for _ in range(20):
        found = httpx.get(f"{query}/api/services", timeout=10).json().get("data") or []
        if "perf-coordinator" in found:
            return sorted(found)
        time.sleep(0.5)
    return sorted(found)
