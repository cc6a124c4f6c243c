"""Draw the benchmark's figures from plain data (no measuring here).

``scripts/bench.py --plot FILE.png`` measures, then calls :func:`plot_cross` (across
processes) and :func:`plot_fanout` (many consumers of one topic, into
``FILE-fanout.png``) with the figures it measured; a test calls them with made-up
figures. Matplotlib is imported
when a figure is drawn, and only its Agg canvas is used: no screen, no pyplot state.
"""

from __future__ import annotations

import math
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

COLORS = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2',
          '#7f7f7f')
"""One colour per system, in the order the systems are first named; both panels agree."""
MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'X', '*')
PERCENTILES = (50, 99)
"""The percentiles marked on each latency curve and given in the legend."""
DODGE = 1.04
"""The systems' throughput points at one count are this factor apart on the x axis."""
CAPTION_WIDTH = 170
"""Characters per line of the caption: longer lines are wrapped."""
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


def median_run(runs: Sequence[Sequence[float]]) -> Sequence[float]:
    """The run whose p99 is the median of the runs' (the lower middle one if even)."""
    ordered = sorted(runs, key=lambda run: percentile(run, 99))
    return ordered[(len(ordered) - 1) // 2]


def _us(x: float) -> str:
    return f'{x:,.0f} µs' if x >= 100 else f'{x:.1f} µs'


def _tick_us(x: float, _: object = None) -> str:
    return f'{x / 1e6:g}M' if x >= 1e6 else f'{x / 1000:g}k' if x >= 1000 else f'{x:g}'


def _rate(x: float, _: object = None) -> str:
    return f'{x / 1000:,.0f}k' if x >= 1000 or x == 0 else f'{x:,.0f}'


def plot_cross(path: str | Path, throughput: Mapping[str, Mapping[int, Sequence[float]]],
               latency_us: Mapping[str, Sequence[Sequence[float]]], *, title: str,
               caption: str = '', latency_title: str = 'Latency, 1 -> 1',
               dpi: int = 110) -> None:
    """Write a two-panel PNG to *path*: throughput by subscriber processes, latency.

    *throughput* maps a system's label to ``{subscriber processes: [delivered msg/s of
    each run]}``; the left panel draws the median of the runs per count (a line with
    markers) and the range of the runs (an error bar) when there are several. A count
    with no runs is left out.

    *latency_us* maps a system's label to its runs, each a list of latency samples in
    µs. The right panel draws each run's distribution as a CDF, latency on a log axis
    and the percentile on a logit axis (so p50, p90, p99 and p99.9 are evenly spaced):
    the run with the median p99 (:func:`median_run`) bold, the others faint. The
    markers and the legend give the median of the runs' p50 and p99. A system with no
    samples is left out.

    *title* goes above both panels, *caption* (may hold newlines; long lines are
    wrapped) under them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

    systems = list(dict.fromkeys([*throughput, *latency_us]))
    style = {name: (COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)])
             for i, name in enumerate(systems)}
    lines = sum(len(textwrap.wrap(line, CAPTION_WIDTH)) or 1
                for line in caption.split('\n')) if caption else 0
    fig = Figure(figsize=(12.0, 5.2 + 0.22 * lines), layout='constrained')
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)

    counts: set[int] = set()
    top = 0.0
    for i, name in enumerate(systems):
        points = sorted((n, sorted(runs)) for n, runs in throughput.get(name, {}).items()
                        if runs)
        if not points:
            continue
        color, marker = style[name]
        xs = [n * DODGE ** (i - (len(systems) - 1) / 2) for n, _ in points]   # side by side
        mids = [statistics.median(runs) for _, runs in points]
        low = [mid - runs[0] for mid, (_, runs) in zip(mids, points)]
        high = [runs[-1] - mid for mid, (_, runs) in zip(mids, points)]
        several = any(len(runs) > 1 for _, runs in points)
        left.errorbar(xs, mids, yerr=[low, high] if several else None, color=color,
                      marker=marker, markersize=7, linewidth=2, capsize=4, label=name)
        counts.update(n for n, _ in points)
        top = max(top, max(runs[-1] for _, runs in points))
    left.set_title('Delivered throughput by subscriber processes')
    left.set_xlabel('subscriber processes (1 publisher process)')
    left.set_ylabel('delivered messages/s (all subscribers)')
    if counts:
        left.set_xscale('log', base=2)
        left.xaxis.set_major_locator(FixedLocator(sorted(counts)))
        left.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f'{x:g}'))
        left.xaxis.set_minor_locator(NullLocator())
        left.set_xlim(min(counts) / 1.3, max(counts) * 1.3)
        left.set_ylim(0, top * 1.15 if top else 1)
        left.legend(loc='upper left')
    left.yaxis.set_major_formatter(FuncFormatter(_rate))
    left.grid(True, alpha=0.3)

    drawn = False
    smallest, largest, top_rank = float('inf'), 0.0, 0.999
    for name in systems:
        runs = [sorted(x for x in run if x > 0) for run in latency_us.get(name, ())]
        runs = [run for run in runs if run]
        if not runs:
            continue
        color, marker = style[name]
        marks = {p: statistics.median(percentile(run, p) for run in runs) for p in PERCENTILES}
        typical = median_run(runs)
        label = f'{name}: ' + ', '.join(f'p{p} {_us(x)}' for p, x in marks.items())
        for run in runs:
            ranks = [(i + 0.5) / len(run) for i in range(len(run))]
            if run is typical:
                right.plot(run, ranks, color=color, linewidth=2.2, label=label, zorder=3)
            else:
                right.plot(run, ranks, color=color, linewidth=1, alpha=0.35, zorder=2)
            smallest = min(smallest, percentile(run, BOTTOM * 100))
            largest, top_rank = max(largest, run[-1]), max(top_rank, ranks[-1])
        right.plot(list(marks.values()), [p / 100 for p in marks], linestyle='none',
                   marker=marker, markersize=7, color=color, markeredgecolor='black', zorder=4)
        drawn = True
    right.set_title(latency_title)
    right.set_xlabel('latency from send to handler (µs, log scale)')
    right.set_ylabel('percentile of messages (logit scale)')
    if drawn:
        right.set_xscale('log')
        right.set_xlim(smallest / 1.3, largest * 1.3)
        decades = math.log10(largest * 1.3) - math.log10(smallest / 1.3)
        subs = (1.0, 2.0, 5.0) if decades <= 3.2 else (1.0, 3.0) if decades <= 4.5 else (1.0,)
        right.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
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
        wrapped = '\n'.join(textwrap.fill(line, CAPTION_WIDTH) for line in caption.split('\n'))
        fig.supxlabel(wrapped, fontsize='small', color='#444444')
    fig.savefig(path, dpi=dpi, format='png')


def plot_fanout(path: str | Path, series: Mapping[str, Mapping[int, Sequence[Mapping]]], *,
                title: str, caption: str = '', dpi: int = 110) -> None:
    """Write a two-panel PNG to *path*: delivered/s and p50 latency by consumers.

    *series* maps a line's label to ``{consumers of one topic: [run, ...]}``, each run a
    mapping with ``delivered`` (msg/s) and ``p50_us`` (µs, or None). Each panel draws
    the median of the runs per count (a line with markers; a single count is a point)
    and the range of the runs as an error bar when there are several; a label whose
    name starts with "by hand" is dashed. Counts with no runs, and series with none at
    all, are left out.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    lines = sum(len(textwrap.wrap(line, CAPTION_WIDTH)) or 1
                for line in caption.split('\n')) if caption else 0
    fig = Figure(figsize=(12.0, 5.2 + 0.22 * lines), layout='constrained')
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    names = [name for name, by_count in series.items() if any(by_count.values())]
    counts: set[int] = set()
    top = 0.0
    for i, name in enumerate(names):
        color, marker = COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)]
        style = '--' if name.startswith('by hand') else '-'
        points = sorted((n, runs) for n, runs in series[name].items() if runs)
        for panel, key, scale in ((left, 'delivered', 1.0), (right, 'p50_us', 1e-3)):
            xs, mids, low, high = [], [], [], []
            for n, runs in points:
                values = sorted(run[key] * scale for run in runs if run.get(key) is not None)
                if not values:
                    continue
                mid = statistics.median(values)
                xs.append(n * DODGE ** (i - (len(names) - 1) / 2))
                mids.append(mid)
                low.append(mid - values[0])
                high.append(values[-1] - mid)
                if panel is left:
                    top = max(top, values[-1])
            if xs:
                several = any(h or lo for h, lo in zip(high, low))
                panel.errorbar(xs, mids, yerr=[low, high] if several else None, color=color,
                               marker=marker, markersize=7, linewidth=2, linestyle=style,
                               capsize=4, label=name)
        counts.update(n for n, _ in points)
    left.set_title('Delivered messages/s by consumers of one topic')
    left.set_ylabel('delivered messages/s (all consumers)')
    right.set_title('p50 latency at saturation')
    right.set_ylabel('p50 latency (ms, log scale)')
    for panel in (left, right):
        panel.set_xlabel('consumers of one topic in one process')
        panel.grid(True, alpha=0.3)
        if counts:
            panel.set_xscale('log')
            panel.xaxis.set_major_locator(FixedLocator(sorted(counts)))
            panel.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f'{x:,.0f}'))
            panel.xaxis.set_minor_locator(NullLocator())
            panel.set_xlim(min(counts) / 1.6, max(counts) * 1.6)
    if counts:
        left.set_ylim(0, top * 1.15 if top else 1)
        left.legend(loc='best', fontsize='small')
        if any(len(line.get_xdata()) for line in right.get_lines()):
            right.set_yscale('log')
            right.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f'{y:g}'))
            right.yaxis.set_minor_formatter(NullFormatter())
            right.legend(loc='best', fontsize='small')
    left.yaxis.set_major_formatter(FuncFormatter(_rate))
    fig.suptitle(title, fontsize='large', fontweight='bold')
    if caption:
        wrapped = '\n'.join(textwrap.fill(line, CAPTION_WIDTH) for line in caption.split('\n'))
        fig.supxlabel(wrapped, fontsize='small', color='#444444')
    fig.savefig(path, dpi=dpi, format='png')
