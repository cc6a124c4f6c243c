"""The report of the fan-out cases: the table "Many consumers of one topic", its notes,
and the figures of its picture.

Like :mod:`benchmarks.report`, it takes the results of ``measure()`` in
``scripts/bench.py``, ``{(lib, case): [result of each run]}``, and measures nothing.
The goals are printed beside the figures, not asserted.
"""

from __future__ import annotations

import statistics

from .cases import FANOUT_CASES, PAYLOAD
from .report import factor, met, rate, run_notes
from .stats import median

HEADER = ['measurement', 'ours', 'by hand', 'ours vs by hand', 'ours p50', 'by hand p50',
          'goal', 'met']
"""The columns: delivered/s of ours and of the fan-out written by hand, their ratio, the
latency at saturation of each, the goal and whether ours met it."""

RATIO_GOAL = 0.8
FLAT_SLACK = 0.05
"""The ratio at many consumers may be this much below the ratio at few and still count as
"no worse" (what one run's noise moves it by on a shared machine)."""

_KINDS = {'listen': 'listen()', 'coroutine': 'coroutine handlers',
          'plain': 'plain handlers into a queue.Queue each'}


def _ms(x: float | None) -> str:
    if x is None:
        return '-'
    if x >= 1000:
        return f'{x / 1000:,.1f} ms' if x < 100_000 else f'{x / 1e6:,.2f} s'
    return f'{x:,.0f} µs'


def pairedfactor(results: dict, case: str) -> float | None:
    """Ours / by hand for *case*: the median over the rounds of the ratio within each
    round (the two systems' runs of one round ran back to back), where both succeeded."""
    ours, hand = results.get(('ours', case), []), results.get(('hand', case), [])
    ratios = [a['value'] / b['value'] for a, b in zip(ours, hand)
              if 'error' not in a and 'error' not in b and b['value']]
    return statistics.median(ratios) if ratios else None


def _label(case: str, sizes: dict) -> str:
    kind, which, broker = FANOUT_CASES[case]
    consumers = sizes['fan_consumers'][which]
    where = 'through the broker' if broker else 'no broker'
    unit = 'consumers' if kind == 'listen' else 'channels'
    return f'{_KINDS[kind]}, {consumers:,} {unit}, {where}'


def build_fanout_rows(results: dict, sizes: dict) -> tuple[list[list[str]], list[str]]:
    """The table's rows (as strings, the columns of ``HEADER``) and its notes."""
    few, many = sizes['fan_consumers']
    rows = []

    def row(case: str, goal: bool) -> float | None:
        ours = median(results.get(('ours', case), []))
        hand = median(results.get(('hand', case), []))
        ratio = pairedfactor(results, case)
        p50 = [median(results.get((lib, case), []), 'p50_us') for lib in ('ours', 'hand')]
        rows.append([_label(case, sizes), rate(ours), rate(hand), factor(ratio),
                     _ms(p50[0]), _ms(p50[1]),
                     f'>= {RATIO_GOAL}x by hand' if goal else 'printed',
                     met(None if ratio is None else ratio >= RATIO_GOAL) if goal
                     else '' if ratio is None else 'yes'])
        return ratio

    for suffix in ('', '_broker'):
        low = row(f'fanout_listen_few{suffix}', True)
        high = row(f'fanout_listen_many{suffix}', True)
        flat = None if low is None or high is None else high / low
        where = 'through the broker' if suffix else 'no broker'
        rows.append([f'  ratio at {many:,} vs at {few:,}, {where}', factor(flat), '', '', '', '',
                     f'>= 1x (no worse; {FLAT_SLACK:.0%} slack)',
                     met(None if flat is None else flat >= 1 - FLAT_SLACK)])
    row('fanout_coroutine', True)
    row('fanout_plain', False)

    window = sizes['fan_window']
    notes = [
        f'Median of {sizes["fan_runs"]} run(s) per system, each a fresh process; the '
        f'systems take turns, and "ours vs by hand" is the median of the ratios within a '
        f'round. {sizes["fan_deliveries"]:,} deliveries per run (messages x consumers; '
        f'{sizes["fan_plain_deliveries"]:,} in the plain case) after '
        f'{sizes["fan_warmup"]:,} warm-up; payload {{"text": "x" * {len(PAYLOAD["text"])}}}.',
        'By hand: one coroutine Channel on the topic putting each message into an '
        'asyncio.Queue per consumer, each consumer awaiting queue.get() (the plain case: '
        'one plain Channel putting into every queue.Queue). Ours: a listen() inbox per '
        'consumer, or a Channel per consumer with an async def (or queue.put) handler.',
        'Every consumer is on one event loop (plain: a thread each) in the measured '
        'process, and counts each message without reading its data. The publisher is a '
        'thread of the same process sending in a loop; through the broker, the message '
        'goes to channels-broker and comes back.',
        f'Saturation: the publisher sends while fewer than {window:,} deliveries are '
        f'outstanding (sent x consumers, minus consumed), at least 2 messages, so the '
        f'p50 is of a system kept busy with that much queued; the latency of every '
        f'16th delivery is time.time() in the consumer minus the send time.',
        *run_notes(results, sizes, FANOUT_CASES),
    ]
    return rows, notes


def fanout_plot_data(results: dict, sizes: dict) -> dict[str, dict[int, list[dict]]]:
    """The picture's figures: ``{series: {consumers: [{'delivered', 'p50_us'} of each
    successful run]}}``, a series per kind, broker or not, and system."""
    series: dict[str, dict[int, list[dict]]] = {}
    for case, (kind, which, broker) in FANOUT_CASES.items():
        consumers = sizes['fan_consumers'][which]
        for lib, name in (('ours', _KINDS[kind].split(' into')[0]), ('hand', 'by hand')):
            label = f'{name}{", through the broker" if broker else ""}'
            if kind == 'plain':
                label += ' (plain, threads)'
            runs = [{'delivered': run['delivered'], 'p50_us': run.get('p50_us')}
                    for run in results.get((lib, case), []) if 'error' not in run]
            series.setdefault(label, {}).setdefault(consumers, []).extend(runs)
    return series
