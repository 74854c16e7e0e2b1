"""Percentiles and one-line reports shared by the benchmarks."""
from __future__ import annotations

import statistics


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def fmt(name: str, values: list[float], *, width: int = 30, unit: str = "ms") -> str:
    """``name  median X ms   p99 Y ms   (n=N)`` for durations in seconds."""
    scale, digits = {"ms": (1e3, 3), "us": (1e6, 2)}[unit]
    return (f"{name:<{width}} median {statistics.median(values) * scale:8.{digits}f} {unit}   "
            f"p99 {pct(values, 99) * scale:8.{digits}f} {unit}   (n={len(values)})")
