"""The suite: runs the benchmarks asked for on one throwaway broker (and Jaeger), turns their
measurements into rows (figure, reference, ratio) and target checks, and keeps the results
file (`bench/results/perf.json`), whose benchmarks not run this time are kept as they were.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.perf import memory, rebuild, recovery, throughput, tracing_cost
from bench.perf.common import Context
from bench.perf.procs import ROOT, servers
from bench.perf.signing import Signing

__all__ = ["BENCHMARKS", "RESULTS", "machine", "run_suite"]

RESULTS = ROOT / "bench" / "results" / "perf.json"
BENCHMARKS = ("b1", "b2", "b3", "b4", "b5", "b6", "b7")


def machine() -> dict[str, Any]:
    """The machine and versions (`bench.soak.machine`, shared with the soak's report)."""
    from bench.soak import machine as soak_machine

    found = soak_machine()
    found.pop("matplotlib", None)
    from saga.adapters.clients import client_from_env

    found["kafka_client"] = client_from_env()  # the engine's processes' (SAGA_KAFKA_CLIENT)
    with contextlib.suppress(OSError):
        found["load_average_at_start"] = [round(x, 2) for x in __import__("os").getloadavg()]
    return found


def _row(
    what: str,
    value: Any,
    unit: str,
    reference: Any = None,
    reference_what: str = "",
    *,
    lower_is_better: bool = False,
) -> dict[str, Any]:
    ratio = None
    if isinstance(value, int | float) and isinstance(reference, int | float) and reference:
        ratio = round(value / reference, 3)
    return {
        "what": what,
        "value": value,
        "unit": unit,
        "reference": reference,
        "reference_what": reference_what,
        "ratio": ratio,
        "lower_is_better": lower_is_better,
    }


def _target(name: str, value: Any, op: str, limit: float) -> dict[str, Any]:
    met = None
    if isinstance(value, bool):
        met = value
    elif isinstance(value, int | float):
        met = value <= limit if op == "<=" else value >= limit
    return {"target": f"{name} {op} {limit:g}", "value": value, "met": met}


# -- B1-B3: one sweep of each system ------------------------------------------------------------


def _sweep_levels(ctx: Context, wanted: set[str]) -> list[int]:
    levels: set[int] = set()
    if "b1" in wanted:
        levels |= {50, 200, 1000} if ctx.quick else {50, 200, 500, 1000, 2000}
    if "b2" in wanted:
        levels.add(1)
    if "b3" in wanted:
        levels.add(50)
    return sorted(levels)


def _throughput(ctx: Context, wanted: set[str], out: dict[str, Any]) -> None:
    levels = _sweep_levels(ctx, wanted)
    seconds = 4.0 if ctx.quick else 10.0
    eng = throughput.sweep(ctx, "engine", levels, seconds)
    raw = throughput.sweep(ctx, "raw", levels, seconds)
    low = [n for n in levels if n <= 50]
    plain = throughput.sweep(ctx, "raw-plain", low, seconds) if low else {}
    ctx.results["sweeps"] = {"engine": eng, "raw": raw, "raw-plain": plain}
    if "b1" in wanted:
        # B1 is about load: the level of 1 (B2's) does not count as a throughput level.
        e_levels = {k: v for k, v in eng.items() if int(k) >= 50}
        r_levels = {k: v for k, v in raw.items() if int(k) >= 50}
        e_best = throughput.best_sustainable(e_levels)
        r_best = throughput.best_sustainable(r_levels)
        e_max, r_max = throughput.best_any(e_levels), throughput.best_any(r_levels)
        e_rate = e_best["sagas_per_s"] if e_best else 0.0
        # The raw ceiling by the same rule; if no raw level kept p99 within the limit (a
        # loaded machine), its best throughput whatever the latency, and the row says so.
        ceiling = r_best or r_max
        r_rate = ceiling["sagas_per_s"] if ceiling else None
        r_what = "raw, same rule" if r_best else "raw, best level (none kept p99 <= 250 ms)"
        if e_max is not None:
            ctx.results["saturation_level"] = e_max["in_flight"]
        # B4 offers half of this: the sustainable rate, or the saturation rate if none was.
        ctx.results["b1_sagas_per_s"] = e_rate or (e_max["sagas_per_s"] if e_max else None)
        ratio = round(e_rate / r_rate, 3) if r_rate else None
        out["b1"] = {
            "title": "B1 max sustainable throughput (p99 ≤ 250 ms)",
            "rows": [
                _row(
                    "sagas/s, best level with p99 ≤ 250 ms",
                    e_rate,
                    "sagas/s",
                    r_rate,
                    r_what,
                ),
                _row(
                    "  at in flight",
                    e_best and e_best["in_flight"],
                    "",
                    ceiling and ceiling["in_flight"],
                    "raw",
                ),
                _row(
                    "  p99 there",
                    e_best and e_best["p99_ms"],
                    "ms",
                    ceiling and ceiling["p99_ms"],
                    "raw",
                    lower_is_better=True,
                ),
                _row(
                    "sagas/s, best level whatever the latency",
                    e_max and e_max["sagas_per_s"],
                    "sagas/s",
                    r_max and r_max["sagas_per_s"],
                    "raw",
                ),
            ],
            "targets": [
                _target("sagas/s", e_rate, ">=", 3000),
                _target("ratio to the raw ceiling", ratio, ">=", 0.2),
            ],
            "notes": "≥ 2.5x Restate in the same run: see the peers table (make bench-peers).",
            "detail": {"engine": eng, "raw": raw, "raw-plain": plain},
        }
    if "b2" in wanted:
        e, r = eng["1"], raw["1"]
        p50 = round(e["p50_ms"] / r["p50_ms"], 3) if e["p50_ms"] and r["p50_ms"] else None
        p99 = round(e["p99_ms"] / r["p99_ms"], 3) if e["p99_ms"] and r["p99_ms"] else None
        out["b2"] = {
            "title": "B2 latency, 1 in flight",
            "rows": [
                _row("p50", e["p50_ms"], "ms", r["p50_ms"], "raw floor", lower_is_better=True),
                _row("p99", e["p99_ms"], "ms", r["p99_ms"], "raw floor", lower_is_better=True),
                _row("sagas measured", e["completed"], "", r["completed"], "raw"),
                *_plain_rows(plain.get("1"), e),
            ],
            "targets": [
                _target("p50 ratio", p50, "<=", 1.25),
                _target("p99 ratio", p99, "<=", 2.0),
            ],
            "detail": {"engine": e, "raw": r, "raw-plain": plain.get("1")},
        }
    if "b3" in wanted:
        e, r = eng["50"], raw["50"]
        out["b3"] = {
            "title": "B3 50 in flight",
            "rows": [
                _row("sagas/s", e["sagas_per_s"], "sagas/s", r["sagas_per_s"], "raw at 50"),
                _row("p50", e["p50_ms"], "ms", r["p50_ms"], "raw at 50", lower_is_better=True),
                _row("p99", e["p99_ms"], "ms", r["p99_ms"], "raw at 50", lower_is_better=True),
                *_plain_rows(plain.get("50"), e),
            ],
            "targets": [_target("sagas/s", e["sagas_per_s"], ">=", 800)],
            "detail": {"engine": e, "raw": r, "raw-plain": plain.get("50")},
        }


def _plain_rows(plain: dict[str, Any] | None, e: dict[str, Any]) -> list[dict[str, Any]]:
    """The same figures against the raw reference with plain (untransacted) replies."""
    if plain is None:
        return []
    what = "raw-plain"
    return [
        _row("sagas/s vs raw-plain", e["sagas_per_s"], "sagas/s", plain["sagas_per_s"], what),
        _row("p50 vs raw-plain", e["p50_ms"], "ms", plain["p50_ms"], what, lower_is_better=True),
        _row("p99 vs raw-plain", e["p99_ms"], "ms", plain["p99_ms"], what, lower_is_better=True),
    ]


# -- B4-B7 ----------------------------------------------------------------------------------


def _b4(ctx: Context, out: dict[str, Any]) -> None:
    b1 = ctx.results.get("b1_sagas_per_s")
    rate = max(20.0, b1 / 2) if b1 else None
    r = recovery.run(ctx, rate=rate)
    c = r["checks"]
    out["b4"] = {
        "title": "B4 recovery after kill -9 of the coordinator",
        "rows": [
            _row("offered load (half of B1)", r["offered_per_s"], "sagas/s"),
            _row("in flight at the kill", r["in_flight_at_kill"], "sagas"),
            _row("backlog (started before the first new event)", r["backlog"], "sagas"),
            _row("kill → first new event", r["first_event_s"], "s", lower_is_better=True),
            _row("kill → backlog cleared", r["backlog_cleared_s"], "s", lower_is_better=True),
            _row(
                "lost / duplicated / not completed",
                f"{c['lost']} / {c['duplicated']} / {c['not_completed']}",
                "",
            ),
            _row(
                "step runs missing / duplicated",
                f"{c['step_runs_missing']} / {c['step_runs_duplicated']}",
                "",
            ),
        ],
        "targets": [
            _target("kill → first new event (s)", r["first_event_s"], "<=", 2.0),
            {"target": "exactly once", "value": r["exactly_once"], "met": r["exactly_once"]},
        ],
        "detail": r,
    }


def _b5(ctx: Context, out: dict[str, Any]) -> None:
    r = rebuild.run(ctx)
    out["b5"] = {
        "title": "B5 rebuild from the log",
        "rows": [
            _row(
                "events folded by recovery",
                r["events_per_s"],
                "events/s",
                r.get("raw_read_events_per_s"),
                "raw read of the same log",
            ),
            _row("log", r["events"], "events"),
            _row("sagas recovered", r["sagas_recovered"], "sagas"),
            _row("rebuild wall time", r["rebuild_s"], "s", lower_is_better=True),
        ],
        "targets": [_target("events/s", r["events_per_s"], ">=", 100_000)],
        "detail": r,
    }


def _b6(ctx: Context, out: dict[str, Any]) -> None:
    r = memory.run(ctx)
    out["b6"] = {
        "title": "B6 resident memory per parked saga",
        "rows": [
            _row("per parked saga", r["bytes_per_saga"], "bytes", lower_is_better=True),
            _row(
                "  marginal (second half)",
                r["marginal_bytes_per_saga"],
                "bytes",
                lower_is_better=True,
            ),
            _row("parked sagas", r["sagas"], "sagas"),
            _row(
                "coordinator RSS before → after",
                f"{r['rss_before_kib'] / 1024:.1f} → {r['rss_after_kib'] / 1024:.1f}",
                "MiB",
            ),
        ],
        "targets": [_target("bytes per saga", r["bytes_per_saga"], "<=", 2048)],
        "detail": r,
    }


def _b7(ctx: Context, out: dict[str, Any]) -> None:
    r = tracing_cost.run(ctx)
    on, off = r["on"], r["off"]
    out["b7"] = {
        "title": f"B7 tracing on vs off at saturation ({r['in_flight']} in flight)",
        "rows": [
            _row(
                "sagas/s, tracing on",
                on["sagas_per_s"],
                "sagas/s",
                off["sagas_per_s"],
                "tracing off",
            ),
            _row(
                "p50, tracing on",
                on["p50_ms"],
                "ms",
                off["p50_ms"],
                "tracing off",
                lower_is_better=True,
            ),
            _row("throughput cost", r["throughput_cost"], "", lower_is_better=True),
        ],
        "targets": [_target("throughput cost", r["throughput_cost"], "<=", 0.10)],
        "detail": r,
    }


_STEPS: dict[str, Callable[[Context, dict[str, Any]], None]] = {
    "b4": _b4,
    "b5": _b5,
    "b6": _b6,
    "b7": _b7,
}


def _quiet_clients() -> None:
    # aiokafka logs what it retries (a new topic's leaders settling, a coordinator moving) at
    # ERROR; a real failure raises in the benchmark.
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def run_suite(
    wanted: list[str],
    *,
    quick: bool = False,
    split: bool = True,
    out: Path = RESULTS,
    keep: bool = False,
    signed: bool = False,
) -> dict[str, Any]:
    """Runs the benchmarks in ``wanted`` (in B1..B7 order) and merges them into ``out``;
    returns the whole results document."""
    _quiet_clients()
    chosen = [b for b in BENCHMARKS if b in wanted]
    workdir = Path(tempfile.mkdtemp(prefix="saga-perf-"))
    t0 = time.monotonic()
    measured: dict[str, Any] = {}
    ok = False
    try:
        with servers(workdir, jaeger="b7" in chosen) as found:
            ctx = Context(found, workdir, quick=quick, split=split)
            if signed:
                ctx.signing = Signing.create(workdir / "trust")
            if {"b1", "b2", "b3"} & set(chosen):
                _log(f"B1-B3 sweeps ({'quick' if quick else 'full'})")
                _throughput(ctx, set(chosen), measured)
            for name in chosen:
                if name in _STEPS:
                    _log(name.upper())
                    _STEPS[name](ctx, measured)
        ok = True
    finally:
        if ok and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"perf: logs kept in {workdir}", file=sys.stderr)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    results = _load(out)
    results.update({"date": now, "machine": machine()})
    results.setdefault("benchmarks", {})
    for name, entry in measured.items():
        entry.update({"date": now, "quick": quick, "split_participants": split, "signed": signed})
        results["benchmarks"][name] = entry
    results["last_run"] = {
        "benchmarks": chosen,
        "quick": quick,
        "split_participants": split,
        "signed": signed,
        "seconds": round(time.monotonic() - t0, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    return results


def _load(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _log(text: str) -> None:
    print(f"perf {time.strftime('%H:%M:%S')}: {text}", file=sys.stderr, flush=True)
