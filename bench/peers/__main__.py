"""`make bench-peers`: the engine and its peers, one after another, on this machine, in one run.

    python -m bench.peers [--only temporal,restate,dbos] [--skip-engine]
                          [--levels 50,500,2000] [--seconds 15] [--latency-n 200]
    python -m bench.peers --render-only      # redraw the table and chart from the JSON

Installs the peers first (`bench.peers.install`, cached), then measures the engine (and raw
aiokafka) through `python -m bench.perf peers-workload --out FILE` when `bench/perf` exists,
then each peer. Writes `bench/results/peers.json`, `bench/results/peers.md` (also printed) and
`bench/peers.png`. A peer that cannot be installed or measured is written as
{"unavailable": reason}; nothing is left out silently.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from bench.peers import dbos_peer, restate_peer, temporal_peer
from bench.peers.chart import draw
from bench.peers.common import REPO_ROOT, Plan
from bench.peers.install import Installed, ensure_installed
from bench.peers.report import document, engine_systems, merge_systems, render_markdown
from deploy._proc import Child, InfraError

PEERS: dict[str, Callable[[Installed, Plan], dict[str, Any]]] = {
    temporal_peer.NAME: temporal_peer.run,
    restate_peer.NAME: restate_peer.run,
    dbos_peer.NAME: dbos_peer.run,
}
"""The peers by key, in the order they run."""

RESULTS_JSON = REPO_ROOT / "bench" / "results" / "peers.json"
RESULTS_MD = REPO_ROOT / "bench" / "results" / "peers.md"
CHART = REPO_ROOT / "bench" / "peers.png"

_ENGINE_BOUND_S = 20 * 60.0
# A level window shorter than this makes the run a development one (see `_engine_options`).
_QUICK_BELOW_S = 10.0


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--only", default=",".join(PEERS), help="peers to run, comma-separated")
    parser.add_argument("--skip-engine", action="store_true", help="do not run bench.perf")
    parser.add_argument("--levels", type=_int_list, default=(50, 500, 2000))
    parser.add_argument("--seconds", type=float, default=15.0, help="window per level")
    parser.add_argument("--latency-n", type=int, default=200, help="sequential workflows")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured sequential workflows")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per workflow")
    parser.add_argument("--render-only", action="store_true", help="redraw from peers.json")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; known: {', '.join(PEERS)}")
    return args


def _engine_options(help_text: str, plan: Plan) -> list[str]:
    # bench.perf is another helper's; pass the run's sizes only where it accepts them.
    options: list[str] = []
    wanted = {
        "--levels": ",".join(str(x) for x in plan.levels),
        "--seconds": f"{plan.seconds:g}",
        "--latency-n": str(plan.latency_n),
    }
    for flag, value in wanted.items():
        if flag in help_text:
            options += [flag, value]
    # Without a --seconds of its own, a short development run asks for its small sizes.
    if "--seconds" not in help_text and "--quick" in help_text and plan.seconds < _QUICK_BELOW_S:
        options.append("--quick")
    return options


def run_engine(plan: Plan) -> dict[str, dict[str, Any]]:
    """Runs `python -m bench.perf peers-workload --out FILE` and returns its systems.

    Returns:
        The engine's systems, or {"saga-engine": {"unavailable": reason}} when it is missing
        or failed.
    """
    if not (REPO_ROOT / "bench" / "perf" / "__main__.py").exists():
        return {"saga-engine": {"unavailable": "bench/perf/__main__.py does not exist"}}
    base = [sys.executable, "-m", "bench.perf", "peers-workload"]
    probe = subprocess.run(
        [*base, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    if probe.returncode != 0:
        return {
            "saga-engine": {
                "unavailable": "bench.perf peers-workload --help failed: "
                + (probe.stderr or probe.stdout).strip()[-500:]
            }
        }
    with tempfile.TemporaryDirectory(prefix="saga-peers-engine-") as tmp:
        out = Path(tmp) / "engine.json"
        argv = [*base, "--out", str(out), *_engine_options(probe.stdout, plan)]
        print(f"engine: {' '.join(argv[1:])}", flush=True)
        child = Child("bench.perf peers-workload", argv, Path(tmp) / "engine.log", cwd=REPO_ROOT)
        child.start()
        try:
            code = child.wait(_ENGINE_BOUND_S)
        finally:
            child.stop(grace=15.0)
        if code != 0 or not out.exists():
            status = "did not finish" if code is None else f"exited with status {code}"
            return {"saga-engine": {"unavailable": f"bench.perf {status}: {child.tail(8)}"}}
        try:
            return engine_systems(json.loads(out.read_text()))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError too
            return {"saga-engine": {"unavailable": f"bench.perf wrote no usable figures: {exc}"}}


def run_peers(names: list[str], plan: Plan) -> dict[str, dict[str, Any]]:
    """Installs and measures the named peers, one after another.

    Returns:
        Their entries by key; {"unavailable": reason} for those that could not be measured.
    """
    try:
        installed = ensure_installed()
    except InfraError as exc:
        return {name: {"unavailable": f"could not be installed: {exc}"} for name in names}
    entries: dict[str, dict[str, Any]] = {}
    for name in names:
        if name in installed.problems:
            entries[name] = {"unavailable": f"could not be installed: {installed.problems[name]}"}
            continue
        print(f"{name}: starting", flush=True)
        started = time.monotonic()
        try:
            entries[name] = PEERS[name](installed, plan)
        except Exception as exc:
            traceback.print_exc()
            entries[name] = {"unavailable": f"could not be measured: {exc}"}
        print(f"{name}: done in {time.monotonic() - started:.0f} s", flush=True)
    return entries


def write_outputs(doc: dict[str, Any]) -> str:
    """Writes the JSON, the markdown and the chart; returns the markdown."""
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(doc, indent=2) + "\n")
    markdown = render_markdown(doc)
    RESULTS_MD.write_text(markdown)
    draw(doc, CHART)
    return markdown


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (from make or a supervisor) unwinds like Ctrl-C, so every `with` block stops the
    # processes it started.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark (or only redraws) and writes the outputs."""
    args = _parse(argv)
    if args.render_only:
        print(write_outputs(json.loads(RESULTS_JSON.read_text())))
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    plan = Plan(
        levels=args.levels,
        seconds=args.seconds,
        latency_n=args.latency_n,
        warmup=args.warmup,
        timeout=args.timeout,
    )
    names = [name for name in PEERS if name in args.only.split(",")]
    try:
        engine = None if args.skip_engine else run_engine(plan)
        peers = run_peers(names, plan)
    except KeyboardInterrupt:
        # Every process was stopped on the way out; no partial report is written.
        print("bench.peers: interrupted, every process it started is stopped", file=sys.stderr)
        return 130
    plan_fields = {
        "levels": list(plan.levels),
        "seconds": plan.seconds,
        "latency_n": plan.latency_n,
        "warmup": plan.warmup,
        "timeout": plan.timeout,
    }
    doc = document(merge_systems(engine, peers), plan_fields)
    print(write_outputs(doc))
    print(
        f"wrote {RESULTS_JSON.relative_to(REPO_ROOT)}, {RESULTS_MD.relative_to(REPO_ROOT)}, "
        f"{CHART.relative_to(REPO_ROOT)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
