"""Summaries of a load run's records: percentiles, error counts, achieved rates.

Latencies are reported in milliseconds, over the requests that succeeded; errors are counted by
kind, so a run that failed half its requests never looks fast.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) of `values` by linear interpolation; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def quantile_points(values: list[float], points: int = 200) -> list[float]:
    """`points` evenly spaced quantiles of `values`: enough to draw its CDF, small to store."""
    if not values:
        return []
    return [percentile(values, 100 * i / (points - 1)) or 0.0 for i in range(points)]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one load run (`bench.loadgen`'s output)."""
    records = result["records"]
    spec = result["spec"]
    ok = [r for r in records if r["error"] is None]
    errors = Counter(r["error"] for r in records if r["error"] is not None)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    ttfb = [r["ttfb"] for r in ok if r["ttfb"] is not None]
    total = [r["total"] for r in ok if r["total"] is not None]
    gaps = [gap for r in ok for gap in r["gaps"]]
    ends = sorted(r["start"] + r["total"] for r in ok)
    achieved = (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 and ends[-1] > ends[0] else 0
    return {
        "surface": spec["label"],
        "mode": spec["mode"],
        "offered_rate": spec["rate"] if spec["mode"] == "open" else None,
        "concurrency": spec["concurrency"] if spec["mode"] == "closed" else None,
        "duration": spec["duration"],
        "elapsed": round(result["elapsed"], 2),
        "requests": len(records),
        "ok": len(ok),
        "success_rate": round(len(ok) / len(records), 4) if records else 0.0,
        "errors": dict(errors),
        "achieved_rate": round(achieved, 1),
        "loadgen_lateness_p99_ms": _ms(result.get("lateness_p99")),
        "ttfb_p50": _ms(percentile(ttfb, 50)),
        "ttfb_p99": _ms(percentile(ttfb, 99)),
        "ttft_p50": _ms(percentile(ttft, 50)),
        "ttft_p99": _ms(percentile(ttft, 99)),
        "total_p50": _ms(percentile(total, 50)),
        "total_p99": _ms(percentile(total, 99)),
        "gap_p50": _ms(percentile(gaps, 50)),
        "gap_p99": _ms(percentile(gaps, 99)),
        "events": sum(r["events"] for r in records),
        "body_bytes": sum(r["bytes"] for r in records),
    }
