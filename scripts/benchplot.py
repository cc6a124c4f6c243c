"""Draw the cross-process benchmark's figure from plain data (no measuring here).

``scripts/bench.py --plot FILE.png`` measures, then calls :func:`plot_cross` with the
figures it measured; a test calls it with made-up figures. Matplotlib is imported
when a figure is drawn, and only its Agg canvas is used: no screen, no pyplot state.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

COLORS = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b')
"""One colour per system, in the order the systems are first named; both panels agree."""
MARKERS = ('o', 's', '^', 'D', 'v', 'P')
PERCENTILES = (50, 99)
"""The percentiles marked on each latency curve and given in the legend."""
BOTTOM = 0.005
"""The lowest fraction the latency panel shows (p0.5): below it is the fastest few."""


def percentile(samples: Sequence[float], p: float) -> float:
    """The *p*-th percentile of *samples*, interpolated between the nearest two.

    The same as ``statistics.quantiles(samples, n=100, method='inclusive')[p - 1]``,
    which ``bench.py`` prints, for a whole *p*; *p* may be any number from 0 to 100.
    """
    ordered = sorted(samples)
    if not ordered:
        raise ValueError('no samples')
    at = (len(ordered) - 1) * min(max(p, 0.0), 100.0) / 100
    below = int(at)
    if below + 1 >= len(ordered):
        return float(ordered[-1])
    return ordered[below] + (ordered[below + 1] - ordered[below]) * (at - below)


def _us(x: float) -> str:
    return f'{x:,.0f} µs' if x >= 100 else f'{x:.1f} µs'


def _tick_us(x: float, _: object = None) -> str:
    return f'{x / 1000:g}k' if x >= 1000 else f'{x:g}'


def _rate(x: float, _: object = None) -> str:
    return f'{x / 1000:,.0f}k' if x >= 1000 or x == 0 else f'{x:,.0f}'


def plot_cross(path: str | Path, throughput: Mapping[str, Mapping[int, Sequence[float]]],
               latency_us: Mapping[str, Sequence[float]], *, title: str, caption: str = '',
               latency_title: str = 'Latency, 1 -> 1', dpi: int = 110) -> None:
    """Write a two-panel PNG to *path*: throughput by subscriber processes, latency.

    *throughput* maps a system's label to ``{subscriber processes: [delivered msg/s of
    each run]}``; the left panel draws the median of the runs per count (a line with
    markers) and the range of the runs (an error bar) when there are several. A count
    with no runs is left out. *latency_us* maps a system's label to its latency samples
    in µs; the right panel draws each system's distribution as a CDF with latency on a
    log axis and the percentile on a logit axis (so p50, p90, p99 and p99.9 are evenly
    spaced), marks p50 and p99 on it and states them in the legend. A system with no
    samples is left out. *title* goes above both panels, *caption* (may hold newlines)
    under them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

    systems = list(dict.fromkeys([*throughput, *latency_us]))
    style = {name: (COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)])
             for i, name in enumerate(systems)}
    lines = caption.count('\n') + 1 if caption else 0
    fig = Figure(figsize=(12.0, 5.2 + 0.22 * lines), layout='constrained')
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)

    counts: set[int] = set()
    top = 0.0
    for name in systems:
        points = sorted((n, sorted(runs)) for n, runs in throughput.get(name, {}).items()
                        if runs)
        if not points:
            continue
        color, marker = style[name]
        xs = [n for n, _ in points]
        mids = [statistics.median(runs) for _, runs in points]
        low = [mid - runs[0] for mid, (_, runs) in zip(mids, points)]
        high = [runs[-1] - mid for mid, (_, runs) in zip(mids, points)]
        several = any(len(runs) > 1 for _, runs in points)
        left.errorbar(xs, mids, yerr=[low, high] if several else None, color=color,
                      marker=marker, markersize=7, linewidth=2, capsize=4, label=name)
        counts.update(xs)
        top = max(top, max(runs[-1] for _, runs in points))
    left.set_title('Delivered throughput by subscriber processes')
    left.set_xlabel('subscriber processes (1 publisher process)')
    left.set_ylabel('delivered messages/s (all subscribers)')
    if counts:
        left.set_xscale('log', base=2)
        left.xaxis.set_major_locator(FixedLocator(sorted(counts)))
        left.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f'{x:g}'))
        left.xaxis.set_minor_locator(NullLocator())
        low_n, high_n = min(counts), max(counts)
        left.set_xlim(low_n / 1.25, high_n * 1.25)
        left.set_ylim(0, top * 1.15 if top else 1)
        left.legend(loc='upper left')
    left.yaxis.set_major_formatter(FuncFormatter(_rate))
    left.grid(True, alpha=0.3)

    drawn = False
    smallest, largest, top_rank = float('inf'), 0.0, 0.999
    for name in systems:
        samples = sorted(x for x in latency_us.get(name, ()) if x > 0)
        if not samples:
            continue
        color, marker = style[name]
        n = len(samples)
        ranks = [(i + 0.5) / n for i in range(n)]
        marks = {p: percentile(samples, p) for p in PERCENTILES}
        label = f'{name}: ' + ', '.join(f'p{p} {_us(x)}' for p, x in marks.items())
        right.plot(samples, ranks, color=color, linewidth=2, label=label)
        right.plot(list(marks.values()), [p / 100 for p in marks], linestyle='none',
                   marker=marker, markersize=7, color=color, markeredgecolor='black')
        smallest = min(smallest, percentile(samples, BOTTOM * 100))
        largest, top_rank = max(largest, samples[-1]), max(top_rank, ranks[-1])
        drawn = True
    right.set_title(latency_title)
    right.set_xlabel('latency from send to handler (µs, log scale)')
    right.set_ylabel('percentile of messages (logit scale)')
    if drawn:
        right.set_xscale('log')
        right.set_xlim(smallest / 1.3, largest * 1.3)
        right.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        right.xaxis.set_major_formatter(FuncFormatter(_tick_us))
        right.xaxis.set_minor_locator(NullLocator())
        right.set_yscale('logit')
        top = 1 - (1 - top_rank) / 1.5
        right.set_ylim(BOTTOM, top)
        ticks = [t for t in (0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999) if t < top]
        right.yaxis.set_major_locator(FixedLocator(ticks))
        right.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f'p{y * 100:g}'))
        right.yaxis.set_minor_locator(NullLocator())
        for p in PERCENTILES:
            right.axhline(p / 100, color='grey', linewidth=0.8, linestyle=':')
        right.legend(loc='upper left', fontsize='small')
    right.grid(True, which='major', alpha=0.3)

    fig.suptitle(title, fontsize='large', fontweight='bold')
    if caption:
        fig.supxlabel(caption, fontsize='small', color='#444444')
    fig.savefig(path, dpi=dpi, format='png')
