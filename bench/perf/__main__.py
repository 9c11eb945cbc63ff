"""``python -m bench.perf``: the performance suite (issue 12's B1-B7).

Commands::

    python -m bench.perf all [--quick]          every benchmark (about 20 min; quick 3-4 min)
    python -m bench.perf b1|b2|...|b7 [...]     the ones named (b1 b4 b7 ...)
    python -m bench.perf raw [--quick]          the raw aiokafka reference's sweep alone
    python -m bench.perf peers-workload --out FILE [--quick]
                                                the engine and raw at 1, 50, 500, 2000 in flight
    python -m bench.perf report                 rewrite bench/REPORT.md's region from the JSON

Options: ``--one-participant-process`` runs the three services in one process instead of one
each; ``--signed`` signs and verifies every message (`bench.perf.signing`; unsigned by
default); ``--results FILE`` (default bench/results/perf.json; bench/REPORT.md is rewritten
only from the default file); ``--keep`` keeps the
processes' logs. Every run starts its own broker (and Jaeger for B7) and stops everything it
started.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench.perf import report
from bench.perf.suite import BENCHMARKS, RESULTS, run_suite


def _raw(quick: bool, split: bool) -> None:
    from bench.perf.common import Context
    from bench.perf.procs import servers
    from bench.perf.suite import _quiet_clients
    from bench.perf.throughput import sweep

    _quiet_clients()
    levels = [1, 50, 1000] if quick else [1, 50, 200, 500, 1000, 2000]
    with tempfile.TemporaryDirectory(prefix="saga-perf-raw-") as wd, servers(Path(wd)) as s:
        found = sweep(Context(s, Path(wd), quick=quick, split=split), "raw", levels,
                      4.0 if quick else 10.0)  # fmt: skip
    print(json.dumps(found, indent=1))


def _peers(out: Path, quick: bool, split: bool) -> None:
    from bench.perf import peers
    from bench.perf.common import Context
    from bench.perf.procs import servers
    from bench.perf.suite import _quiet_clients, machine

    _quiet_clients()
    with tempfile.TemporaryDirectory(prefix="saga-perf-peers-") as wd, servers(Path(wd)) as s:
        doc = peers.run(Context(s, Path(wd), quick=quick, split=split))
    doc["machine"] = machine()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and runs it."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.perf", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("what", nargs="+", help="all, b1..b7, raw, peers-workload or report")
    parser.add_argument("--quick", action="store_true", help="small sizes (3-4 minutes)")
    parser.add_argument("--one-participant-process", action="store_true")
    parser.add_argument("--signed", action="store_true", help="sign and verify (default: unsigned)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, help="peers-workload: where the JSON goes")
    parser.add_argument("--keep", action="store_true", help="keep the processes' logs")
    args = parser.parse_args(argv)
    split = not args.one_participant_process
    what = [w.lower() for w in args.what]
    if what == ["report"]:
        report.write(json.loads(args.results.read_text()))
        return 0
    if what == ["raw"]:
        _raw(args.quick, split)
        return 0
    if what == ["peers-workload"]:
        if args.out is None:
            parser.error("peers-workload needs --out FILE")
        _peers(args.out, args.quick, split)
        return 0
    wanted = list(BENCHMARKS) if what == ["all"] else what
    unknown = sorted(set(wanted) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from all, "
                     f"{', '.join(BENCHMARKS)}, raw, peers-workload, report")  # fmt: skip
    results = run_suite(
        wanted,
        quick=args.quick,
        split=split,
        out=args.results,
        keep=args.keep,
        signed=args.signed,
    )
    if args.results == RESULTS:
        report.write(results)  # the report shows the project's results file only
    for name in BENCHMARKS:
        entry = results["benchmarks"].get(name)
        if entry is not None and name in wanted:
            targets = "; ".join(f"{t['target']}: {t['value']} ({'met' if t['met'] else 'not met'})"
                                for t in entry["targets"])  # fmt: skip
            print(f"{entry['title']}: {targets}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
