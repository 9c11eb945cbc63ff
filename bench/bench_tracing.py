"""The tracing observer's cost per saga, in the calling thread and in the whole process.

Run: ``python -m bench.bench_tracing [--sagas 2000] [--rate 1000] [--otlp http://HOST:4318]
[--baseline PATH | --baseline-git REV]``.

It first runs ``--sagas`` sagas of `bench.bench_engine`'s 4-step saga through
`saga.testing.SagaHarness` with an observer that records every call the coordinator and the
participants make (``committed`` batches, ``headers`` for every command, reply and request,
``handling`` with its outcome and the reply's headers inside it). Then it replays those calls,
in their order, into each observer under test, and reports:

- ``thread_us_per_saga``: the observer's work in the calling thread (`time.thread_time`), the
  part that the coordinator's event loop pays directly;
- ``process_us_per_saga``: the CPU of the whole process over the replay *and* the flush at the
  end (`time.process_time`), so the span processor's export thread, which competes for the
  GIL with the event loop, is counted;
- the spans exported and those dropped (a full queue drops spans, which would flatter a run).

The replay is paced at ``--rate`` sagas per second (``0``: as fast as it goes) because a span
processor behaves differently when spans arrive faster than it exports them; at saturation the
engine runs some hundreds of sagas per second.

The observers: the `NullObserver`; the tracing observer of this tree
(`saga.adapters.tracing`), made by its ``from_env`` and exporting over OTLP/HTTP to a real
Jaeger (`deploy.jaeger.start_jaeger`, unless ``--otlp`` names one); and optionally a baseline
version of that module, loaded from a file (``--baseline``) or from git (``--baseline-git
HEAD``), made and exported alike, so the two are compared in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio

from bench.bench_engine import DEFINITION, participants
from saga.core.messages import Command, ErrorInfo, Reply, StartSaga
from saga.runtime.observe import Committed, Handling, NullObserver, Observer, Outbound
from saga.runtime.ports import Headers
from saga.runtime.traceids import command_span_id, root_span_id, trace_id_for, traceparent
from saga.testing import SagaHarness

__all__ = ["Recorder", "main", "record", "replay"]


@dataclass
class _Handled:
    service: str
    command: Command
    headers: Headers
    inner: list[Outbound] = field(default_factory=list)
    outcome: tuple[bool, ErrorInfo | None, bool] | None = None


Call = tuple[str, Any]
"""One recorded call: ``("committed", (items, committed_at))``, ``("headers", message)``,
``("handling", _Handled)`` or ``("dead_lettered", (topic, reason))``."""


class _RecordedHandling:
    def __init__(self, handled: _Handled) -> None:
        self.handled = handled

    def outcome(self, ok: bool, error: ErrorInfo | None, replayed: bool) -> None:
        self.handled.outcome = (ok, error, replayed)


class Recorder:
    """An observer that records every call, and answers with the headers the tracing observer
    would give (W3C ``traceparent`` values of the same ids), so that the replayed decisions
    carry realistic input headers."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._inside: _Handled | None = None

    def committed(self, items: Sequence[Committed], committed_at: float) -> None:
        """Records one committed batch."""
        self.calls.append(("committed", (tuple(items), committed_at)))

    def dead_lettered(self, topic: str, reason: str) -> None:
        """Records a dead letter."""
        self.calls.append(("dead_lettered", (topic, reason)))

    @contextmanager
    def handling(self, service: str, command: Command, headers: Headers) -> Iterator[Handling]:
        """Records one command's handling, with the reply headers asked for inside it."""
        handled = _Handled(service, command, headers)
        self.calls.append(("handling", handled))
        outer, self._inside = self._inside, handled
        try:
            yield _RecordedHandling(handled)
        finally:
            self._inside = outer

    def headers(self, message: Outbound) -> Headers:
        """Records the call; answers with a ``traceparent`` like the tracing observer's."""
        if self._inside is not None and isinstance(message, Reply):
            self._inside.inner.append(message)
            handling = command_span_id(message.saga_id, message.step, message.phase, 0)
            return (("traceparent", traceparent(trace_id_for(message.saga_id), handling).encode()),)
        self.calls.append(("headers", message))
        if isinstance(message, Command):
            span = command_span_id(message.saga_id, message.step, message.phase, message.attempt)
            return (("traceparent", traceparent(trace_id_for(message.saga_id), span).encode()),)
        if isinstance(message, StartSaga) and message.parent is not None:
            parent = message.parent.saga_id
            value = traceparent(trace_id_for(parent), root_span_id(parent))
            return (("traceparent", value.encode()),)
        return ()

    def watch_in_flight(self, count: Callable[[], int]) -> None:
        """Nothing to record."""


async def record(sagas: int) -> list[Call]:
    """Runs ``sagas`` sagas through the harness and returns what the observer was told."""
    recorder = Recorder()
    async with SagaHarness([DEFINITION], participants(), observer=recorder) as h:
        started = [await h.start("bench", {"i": i}) for i in range(sagas)]
        for saga_id in started:
            await h.run_until_done(saga_id)
    return recorder.calls


def replay(calls: Sequence[Call], observer: Observer, per_saga: int, rate: float) -> None:
    """Makes ``observer`` the calls recorded, in order, paced at ``rate`` sagas per second
    (``per_saga`` calls make one saga, on average)."""
    pause_every = max(1, per_saga * max(1, int(rate / 100)))  # about every 10 ms
    t0 = time.perf_counter()
    for n, (kind, what) in enumerate(calls):
        if kind == "committed":
            observer.committed(*what)
        elif kind == "headers":
            observer.headers(what)
        elif kind == "handling":
            with observer.handling(what.service, what.command, what.headers) as handling:
                for message in what.inner:
                    observer.headers(message)
                if what.outcome is not None:
                    handling.outcome(*what.outcome)
        else:
            observer.dead_lettered(*what)
        if rate and n % pause_every == 0:
            ahead = n / per_saga / rate - (time.perf_counter() - t0)
            if ahead > 0:
                time.sleep(ahead)


class _Traced(Protocol):
    tracer_provider: Any

    def shutdown(self) -> None: ...


class _Drops(logging.Handler):
    """Counts the span processor's "queue full" warnings: one per dropped span."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "Queue full" in record.getMessage():
            self.count += 1


def _load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def measure(
    name: str,
    calls: Sequence[Call],
    sagas: int,
    rate: float,
    make: Callable[[], Observer],
) -> dict[str, Any]:
    """Replays ``calls`` into a new observer from ``make``; flushes and shuts it down."""
    observer = make()
    provider = getattr(observer, "tracer_provider", None)
    exported: list[int] = []
    if provider is not None:
        from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

        class Count(SpanProcessor):
            def on_end(self, span: ReadableSpan) -> None:
                exported.append(1)

        provider.add_span_processor(Count())
    drops = _Drops()
    logging.getLogger("opentelemetry").addHandler(drops)
    per_saga = max(1, len(calls) // sagas)
    wall0, cpu0, thread0 = time.perf_counter(), time.process_time(), time.thread_time()
    replay(calls, observer, per_saga, rate)
    thread = time.thread_time() - thread0
    replayed = time.perf_counter() - wall0
    if provider is not None:
        provider.force_flush()
        traced: _Traced = observer  # type: ignore[assignment]
        traced.shutdown()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    logging.getLogger("opentelemetry").removeHandler(drops)
    return {
        "observer": name,
        "sagas": sagas,
        "rate": rate,
        "thread_us_per_saga": round(thread * 1e6 / sagas, 1),
        "process_us_per_saga": round(cpu * 1e6 / sagas, 1),
        "export_thread_us_per_saga": round((cpu - thread) * 1e6 / sagas, 1),
        "replay_s": round(replayed, 3),
        "with_flush_s": round(wall, 3),
        "spans": len(exported),
        "spans_per_saga": round(len(exported) / sagas, 2),
        "dropped": drops.count,
    }


def main() -> None:
    """Records, then measures each observer; prints one JSON line per observer and the ratios
    against the baseline when one is given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sagas", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=1000.0, help="sagas/s; 0: unpaced")
    parser.add_argument("--otlp", help="OTLP HTTP endpoint (default: start a local Jaeger)")
    parser.add_argument("--baseline", type=Path, help="another saga/adapters/tracing.py")
    parser.add_argument("--baseline-git", help="a git revision to take the baseline from")
    parser.add_argument("--rounds", type=int, default=1, help="replays of each observer")
    parser.add_argument("--only", choices=["null", "baseline", "current"], action="append")
    args = parser.parse_args()
    with ExitStack() as stack:
        otlp = args.otlp
        if otlp is None:
            from deploy.jaeger import start_jaeger

            otlp = stack.enter_context(start_jaeger()).otlp_http_endpoint
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp
        os.environ.setdefault("OTEL_TRACES_EXPORTER", "otlp")
        calls = anyio.run(record, args.sagas)
        import saga.adapters.tracing as current

        makers: dict[str, Callable[[], Observer]] = {"null": NullObserver}
        baseline = args.baseline
        if args.baseline_git:
            text = subprocess.run(
                ["git", "show", f"{args.baseline_git}:saga/adapters/tracing.py"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            baseline = folder / "tracing_baseline.py"
            baseline.write_text(text)
        if baseline is not None:
            old = _load(baseline, "bench_tracing_baseline")
            makers["baseline"] = lambda: old.OpenTelemetryObserver.from_env("bench")
        makers["current"] = lambda: current.OpenTelemetryObserver.from_env("bench")
        results: dict[str, list[dict[str, Any]]] = {}
        for _ in range(args.rounds):
            for name, make in makers.items():
                if args.only and name not in args.only:
                    continue
                figures = measure(name, calls, args.sagas, args.rate, make)
                results.setdefault(name, []).append(figures)
                print(json.dumps(figures), flush=True)
        best = {n: min(r, key=lambda f: f["process_us_per_saga"]) for n, r in results.items()}
        if "baseline" in best and "current" in best:
            old_f, new_f = best["baseline"], best["current"]
            print(
                json.dumps(
                    {
                        "current_over_baseline": {
                            key: round(new_f[key] / old_f[key], 3) if old_f[key] else None
                            for key in ("thread_us_per_saga", "process_us_per_saga", "spans")
                        }
                    }
                )
            )


if __name__ == "__main__":
    main()
