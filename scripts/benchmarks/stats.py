"""The benchmark's statistics: medians over runs, percentiles, CPU time per message.

A run that failed holds ``error`` and is left out of every figure; a figure with no
successful run is None, which the report prints as ``-``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def median(runs: list[dict], key: str = 'value') -> float | None:
    """The median of *key* over the successful runs, or None if none succeeded."""
    values = [run[key] for run in runs if 'error' not in run]
    return statistics.median(values) if values else None


def median_cpu(runs: list[dict], role: str) -> float | None:
    """The median CPU µs per message of *role* over the successful runs, or None."""
    ok = [run for run in runs if 'error' not in run]
    return statistics.median(run['cpu_us'][role] for run in ok) if ok else None


def percentiles(samples: Sequence[float]) -> list[float]:
    """The 99 cut points of *samples*: ``percentiles(x)[p - 1]`` is the p-th percentile.

    ``scripts/benchplot.py``'s ``percentile()`` interpolates the same way, so the
    picture's p50 and p99 are the tables'.
    """
    return statistics.quantiles(samples, n=100, method='inclusive')


def cpu_us(before: dict[int, float], after: dict[int, float], pids: list[int],
           messages: int) -> float:
    """Mean CPU µs per message of the processes *pids* between two snapshots."""
    return statistics.fmean(after[pid] - before[pid] for pid in pids) / messages * 1e6
