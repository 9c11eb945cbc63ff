"""Pure figures: percentiles and the summaries the load generators and the report share.

Standard library only: the load generators import this module from the peers' venv, where the
project's dependencies are not installed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "COLLAPSE_ERROR_SHARE",
    "latency_summary",
    "level_summary",
    "percentile",
]

COLLAPSE_ERROR_SHARE = 0.05
"""A level whose failed or timed-out share of attempts exceeds this is reported as collapsed."""


def percentile(values: Sequence[float], q: float) -> float:
    """Returns the q-th percentile of `values` by linear interpolation between closest ranks.

    The same definition as numpy's default ("linear"), so figures agree with other tools.

    Args:
        values: The sample, in any order; must not be empty.
        q: The percentile, 0 to 100.

    Raises:
        ValueError: `values` is empty or `q` is outside 0..100.
    """
    if not values:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def latency_summary(latencies_s: Sequence[float]) -> dict[str, Any]:
    """Summarises sequential latencies (one in flight) as the report's `latency_1` entry.

    Args:
        latencies_s: One latency per workflow, in seconds; must not be empty.

    Returns:
        {"p50_ms", "p99_ms", "n"}, milliseconds rounded to 0.01.
    """
    return {
        "p50_ms": round(percentile(latencies_s, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies_s, 99) * 1000, 2),
        "n": len(latencies_s),
    }


def level_summary(
    latencies_s: Sequence[float],
    errors: Iterable[str],
    seconds: float,
    *,
    late: int = 0,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Summarises one in-flight level as the report's throughput entry.

    Args:
        latencies_s: Latencies of the workflows that completed inside the measured window.
        errors: One short description (an exception's type, say) per failed or timed-out
            workflow started inside the window.
        seconds: The window's length.
        late: Workflows that completed after the window closed (counted neither as completed
            nor as errors; they show how much was still queued).
        timeout_s: The per-workflow timeout, quoted in a collapse reason.

    Returns:
        {"sagas_per_s", "completed", "errors", "p50_ms", "p99_ms", "late"}; with "collapsed"
        (the reason) as well when nothing completed or more than `COLLAPSE_ERROR_SHARE` of the
        attempts failed, and "error_kinds" when anything failed.
    """
    kinds = Counter(errors)
    failed = sum(kinds.values())
    completed = len(latencies_s)
    result: dict[str, Any] = {
        "sagas_per_s": round(completed / seconds, 1) if seconds > 0 else 0.0,
        "completed": completed,
        "errors": failed,
        "late": late,
    }
    if completed:
        result["p50_ms"] = round(percentile(latencies_s, 50) * 1000, 2)
        result["p99_ms"] = round(percentile(latencies_s, 99) * 1000, 2)
    if kinds:
        result["error_kinds"] = dict(kinds.most_common())
    attempts = completed + failed
    described = ", ".join(f"{kind} x{count}" for kind, count in kinds.most_common(3))
    limit = f" ({timeout_s:g} s per workflow)" if timeout_s is not None else ""
    if completed == 0:
        result["collapsed"] = f"no workflow completed in {seconds:g} s" + (
            f"; {failed} failed: {described}" if failed else ""
        )
    elif failed > COLLAPSE_ERROR_SHARE * attempts:
        result["collapsed"] = (
            f"{failed} of {attempts} workflows failed or timed out{limit}: {described}"
        )
    return result
