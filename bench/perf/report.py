"""Writes the figures of `bench/results/perf.json` into `bench/REPORT.md`, between the markers
``<!-- perf:begin -->`` and ``<!-- perf:end -->`` (added at the end of the file when missing);
nothing else of the report is touched.

Run alone: ``python -m bench.perf.report [--results FILE] [--report FILE]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.perf.procs import ROOT

__all__ = ["BEGIN", "END", "render", "write"]

BEGIN = "<!-- perf:begin -->"
END = "<!-- perf:end -->"
REPORT = ROOT / "bench" / "REPORT.md"
RESULTS = ROOT / "bench" / "results" / "perf.json"
ORDER = ("b1", "b2", "b3", "b4", "b5", "b6", "b7")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _met(met: Any) -> str:
    return {True: "**met**", False: "**not met**"}.get(met, "-")


def render(results: dict[str, Any]) -> str:
    """The report's region (without the markers) for ``results``."""
    m = results.get("machine", {})
    last = results.get("last_run", {})
    lines = [
        "## Performance suite (`python -m bench.perf`)",
        "",
        f"Written {results.get('date', '?')} from `bench/results/perf.json`. Machine: "
        f"{m.get('nproc', '?')} cores ({m.get('cpu', '?')}), {m.get('memory_gib', '?')} GiB, "
        f"{m.get('os', '?')}; Python {m.get('python', '?')}, Kafka {m.get('kafka', '?')} "
        f"({m.get('java', '?')}), aiokafka {m.get('aiokafka', '?')}, saga-engine "
        f"{m.get('saga_engine', '?')} at {m.get('commit', '?')}; load average at start "
        f"{m.get('load_average_at_start', '?')}. Last run: {', '.join(last.get('benchmarks', []))}"
        f"{' (quick sizes)' if last.get('quick') else ''}, {last.get('seconds', '?')} s.",
        "",
        "One throwaway broker (`deploy.kafka`, replication 1) for the whole run; the engine's "
        "coordinator and participants as separate processes (`bench.perf.roles`; participants "
        "one process per service unless noted), unsigned; the load generator in the driver "
        "process, latency from the start request to the final event polled from the log. "
        "Every reference is measured in the same run on the same broker: the raw aiokafka "
        "reference (`bench.perf.raw`) does 3 transactional request→reply round trips per "
        "saga; raw-plain is the same but its participant-like processes reply without a "
        "transaction and commit offsets once the replies are acknowledged, as the engine's "
        "participants do (their hop costs no transaction). Ratios are engine / reference.",
        "",
        "Biases of the harness: the load generator shares the two cores and decodes every log "
        "record (its CPU share per level is `loadgen_cpu_share` in the JSON); the raw "
        "reference commits one transaction per poll for all partitions (the engine one per "
        "partition) and passes partitions explicitly; the broker runs with "
        "`deploy.kafka.BENCH_JVM_OPTIONS` (full JIT, 1 GiB heap, one parallel GC thread) and "
        "shares the two cores with everything else, so the raw ceiling is that broker's on "
        "this machine. With a load average well above 2 (header) absolute figures mean "
        "little; compare ratios within one run.",
        "",
        "| benchmark | figure | engine | reference | ratio |",
        "|---|---|---|---|---|",
    ]
    benches = results.get("benchmarks", {})
    for name in ORDER:
        b = benches.get(name)
        if b is None:
            continue
        stamp = f" ({b.get('date', '')[:10]}{', quick' if b.get('quick') else ''})"
        for i, row in enumerate(b["rows"]):
            title = b["title"] + stamp if i == 0 else ""
            unit = f" {row['unit']}" if row["unit"] and row["value"] is not None else ""
            ref = "-"
            if row["reference"] is not None:
                ref = f"{_fmt(row['reference'])} ({row['reference_what']})"
            ratio = _fmt(row["ratio"]) + "x" if row["ratio"] is not None else "-"
            lines.append(f"| {title} | {row['what']} | {_fmt(row['value'])}{unit} | {ref} | "
                         f"{ratio} |")  # fmt: skip
    lines += ["", "| benchmark | target | value | |", "|---|---|---|---|"]
    for name in ORDER:
        b = benches.get(name)
        if b is None:
            continue
        for t in b["targets"]:
            lines.append(f"| {name.upper()} | {t['target']} | {_fmt(t['value'])} | "
                         f"{_met(t['met'])} |")  # fmt: skip
    notes = [f"- {name.upper()}: {benches[name]['notes']}" for name in ORDER
             if name in benches and benches[name].get("notes")]  # fmt: skip
    sweeps = _sweep_table(benches)
    if sweeps:
        lines += ["", "Closed-loop sweeps behind B1-B3 (sagas/s, p50/p99 ms):", "", *sweeps]
    if notes:
        lines += ["", *notes]
    lines += ["", "Methods: the docstrings of `bench/perf/*.py`; raw figures in the JSON."]
    return "\n".join(lines)


def _sweep_table(benches: dict[str, Any]) -> list[str]:
    detail = benches.get("b1", {}).get("detail")
    if not detail:
        return []
    plain = detail.get("raw-plain") or {}
    levels = sorted({int(k) for k in detail["engine"]} | {int(k) for k in detail["raw"]})
    out = [
        "| in flight | engine | raw aiokafka | engine / raw | raw-plain |",
        "|---|---|---|---|---|",
    ]
    for level in levels:
        e, r = detail["engine"].get(str(level)), detail["raw"].get(str(level))

        def cell(x: dict[str, Any] | None) -> str:
            if x is None:
                return "-"
            return f"{_fmt(x['sagas_per_s'])} ({_fmt(x['p50_ms'])}/{_fmt(x['p99_ms'])})"

        ratio = "-"
        if e and r and e["sagas_per_s"] and r["sagas_per_s"]:
            ratio = f"{e['sagas_per_s'] / r['sagas_per_s']:.2f}x"
        out.append(f"| {level} | {cell(e)} | {cell(r)} | {ratio} | {cell(plain.get(str(level)))} |")
    return out


def write(results: dict[str, Any], report: Path = REPORT) -> None:
    """Replaces the marked region of ``report`` with `render` (markers appended if missing)."""
    text = report.read_text() if report.exists() else ""
    region = f"{BEGIN}\n{render(results)}\n{END}"
    start, end = text.find(BEGIN), text.find(END)
    if start != -1 and end > start:
        text = text[:start] + region + text[end + len(END) :]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + region + "\n"
    report.write_text(text)


def main(argv: list[str] | None = None) -> None:
    """Rewrites the report's region from the results file."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    write(json.loads(args.results.read_text()), args.report)


if __name__ == "__main__":
    main()
