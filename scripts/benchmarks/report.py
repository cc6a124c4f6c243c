"""The benchmark's report: its tables (as text or Markdown), their notes, the picture.

Every function here takes the results of :func:`measure` in ``scripts/bench.py``,
``{(lib, case): [result of each run]}``, and measures nothing.
"""

from __future__ import annotations

import datetime
import os
import statistics

from .cases import CASES, CROSS_CASES, CROSS_LIBS, FANOUT_CASES, PAYLOAD, SWEEP_SYSTEMS, \
    SYSTEM_NAMES, bridged_fanout, cross_systems, fanout_case, fanout_of, plot_cases, wildcard
from .stats import median, median_cpu, percentiles


def rate(x: float | None) -> str:
    """A rate for a table's cell: ``123,456 msg/s``, or ``-`` if not measured."""
    return '-' if x is None else f'{x:,.0f} msg/s'


def div(a: float | None, b: float | None) -> float | None:
    """*a* / *b*, or None if either is unknown or *b* is 0."""
    return None if a is None or b is None or b == 0 else a / b


def met(ok: bool | None) -> str:
    """A goal's cell: ``yes``, ``NO``, or ``?`` if it could not be decided."""
    return '?' if ok is None else 'yes' if ok else 'NO'


def factor(x: float | None) -> str:
    """A ratio for a table's cell: ``1.23x``, or ``-`` if not measured."""
    return '-' if x is None else f'{x:.2f}x'


def run_notes(results: dict, sizes: dict, cases, *, warnings: bool = True) -> list[str]:
    """The notes that end a table: the caveat of a ``--quick`` run, then for each system
    and case of *cases* the first error of its runs and (with *warnings*) their first
    warning, with how many more there were."""
    notes = []
    if sizes['name'] == 'quick':
        notes.append('--quick: runs this short are noisy and the sizes are not the goals\' '
                     'sizes, so "met" is only indicative.')
    for (lib, case), runs in results.items():
        if case not in cases:
            continue
        errors = [run['error'] for run in runs if 'error' in run]
        if errors:
            notes.append(f'ERROR {lib} {case}: {errors[0]}')
        found = [w for run in runs for w in run.get('warnings', ())] if warnings else []
        if found:
            notes.append(f'WARNING {lib} {case}: {found[0]}'
                         + (f' (and {len(found) - 1} more)' if len(found) > 1 else ''))
    return notes


def build_rows(results: dict, sizes: dict) -> tuple[list[list[str]], list[str]]:
    """The table's rows (as strings) and the notes under it."""
    def value(lib: str, case: str) -> float | None:
        return median(results[lib, case])

    def us(x: float | None) -> str:
        return '-' if x is None else f'{x:,.1f} µs/msg'

    def ratio(x: float | None) -> str:
        if x is None:
            return '-'
        return f'{x:.3g}x' if x < 0.1 else f'{x:.2f}x' if x < 100 else f'{x:,.0f}x'

    channels, (few, many) = sizes['channels'], sizes['wildcards']
    lona_scan = sizes['lona_scan_messages']
    rows = []

    single_o, single_l = value('ours', 'single'), value('lona', 'single')
    speed = div(single_o, single_l)
    rows.append(['1 subscriber: throughput', rate(single_o), rate(single_l), ratio(speed),
                 '>= 2.5x Lona', met(None if speed is None else speed >= 2.5)])

    many_o, many_l = value('ours', 'many'), value('lona', 'many')
    rows.append([f'{channels:,} channels, 1 matching: throughput', rate(many_o),
                 rate(many_l) + ('' if many_l is None else f' ({lona_scan} msgs)'),
                 ratio(div(many_o, many_l)), '', ''])
    keep = div(many_o, single_o)
    rows.append([f'  {channels:,} channels vs 1 subscriber', ratio(keep),
                 ratio(div(many_l, single_l)), '', '>= 0.8x (ours)',
                 met(None if keep is None else keep >= 0.8)])

    n_o, n_l = sizes['subscriptions'], sizes['lona_subscriptions']
    for case, what in (('subscribe', 'events delivered to a handler'),
                       ('subscribe_routed', 'events routed, no handler')):
        sub_o, sub_l = value('ours', case), value('lona', case)
        goal = case == 'subscribe'
        rows.append([f'subscribe {n_o:,} channels, {what}',
                     '-' if sub_o is None else f'{sub_o:.2f} s',
                     '-' if sub_l is None else f'{sub_l:.2f} s for {n_l:,} only',
                     '-',
                     '' if not goal else '< 2 s' if n_o == 100_000 else '(< 2 s for 100,000)',
                     '' if not goal else met(None if sub_o is None or n_o != 100_000
                                             else sub_o < 2.0)])

    few_o, few_l = value('ours', 'wild_few'), value('lona', 'wild_few')
    many_wo, many_wl = value('ours', 'wild_many'), value('lona', 'wild_many')
    rows.append([f'{few:,} wildcard subs + 1 plain: time per message', us(few_o), us(few_l),
                 ratio(div(few_l, few_o)), '', ''])
    rows.append([f'{many:,} wildcard subs + 1 plain: time per message', us(many_wo),
                 us(many_wl) + ('' if many_wl is None else f' ({lona_scan} msgs)'),
                 ratio(div(many_wl, many_wo)), '', ''])
    cost = div(many_wo, few_o)
    rows.append([f'  {many:,} vs {few:,} wildcard subs', ratio(cost),
                 ratio(div(many_wl, few_l)), '', '<= 2x (ours)',
                 met(None if cost is None else cost <= 2.0)])

    few_o, few_l = value('ours', 'wild_star_few'), value('lona', 'wild_star_few')
    many_wo, many_wl = value('ours', 'wild_star_many'), value('lona', 'wild_star_many')
    timed = median(results['ours', 'wild_star_many'], 'count')
    rows.append([f'{few:,} empty-prefix wildcard subs + 1 plain: time per message', us(few_o),
                 us(few_l), ratio(div(few_l, few_o)), '', ''])
    rows.append([f'{many:,} empty-prefix wildcard subs + 1 plain: time per message',
                 us(many_wo) + ('' if timed is None or timed >= sizes['messages']
                                else f' ({timed:,.0f} msgs)'),
                 us(many_wl) + ('' if many_wl is None else f' ({lona_scan} msgs)'),
                 ratio(div(many_wl, many_wo)), '', ''])
    cost = div(many_wo, few_o)
    rows.append([f'  {many:,} vs {few:,} empty-prefix wildcard subs', ratio(cost),
                 ratio(div(many_wl, few_l)), '', 'printed', '' if cost is None else 'yes'])

    notes = [
        f'Median of {sizes["runs"]} run(s), each a fresh subprocess with a warm-up; '
        f'1 broker + 4 task threads in both libraries; payload {len(PAYLOAD["text"])}-char str.',
        f'Messages per run: ours {sizes["messages"]:,}; Lona {sizes["lona_messages"]:,}, '
        f'but {lona_scan:,} where it scans {channels:,} topics per message (scaled: the '
        f'rate is the same, the run shorter).',
        f'Lona subscribes {n_l:,} channels, not {n_o:,}: each subscription is an internal '
        f'message that scans every topic, so N subscriptions cost O(N^2).',
        f'Wildcard subs: room.<i>.* (a literal prefix each) or, empty-prefix, '
        f'{wildcard(0, True)[:-1]}<i>, which starts with a wildcard, so grouping patterns by '
        f'prefix cannot skip it; none matches the topic sent to. Ours times as many '
        f'messages as fit in {sizes["star_seconds"]:g} s with {many:,} empty-prefix subs '
        f'(the count is shown when it is fewer).',
        '"ours vs Lona" is the speed-up (higher is better for ours).',
        *run_notes(results, sizes, CASES, warnings=False),
    ]
    return rows, notes


def build_cross_rows(results: dict, sizes: dict) -> tuple[list[list[str]], list[str]]:
    """The cross-process table's rows (as strings) and the notes under it."""
    def value(lib: str, case: str, key: str = 'value') -> float | None:
        return median(results.get((lib, case), []), key)

    def cpu(lib: str, case: str, role: str) -> float | None:
        return median_cpu(results.get((lib, case), []), role)

    def us(x: float | None) -> str:
        return '-' if x is None else f'{x:,.0f} µs' if x >= 100 else f'{x:.1f} µs'

    def split(lib: str, case: str) -> str:
        parts = [cpu(lib, case, role) for role in ('publisher', 'middle', 'subscriber')]
        return '-' if None in parts else ' / '.join(f'{x:.1f}' for x in parts) + ' µs'

    fanout, rate_goal = sizes['fanout'], sizes['latency_rate']
    rows = []
    one = {lib: value(lib, 'cross_1to1') for lib in CROSS_LIBS['cross_1to1']}
    vs_queue, vs_zmq = div(one['ours'], one['queue']), div(one['ours'], one['zmq'])
    rows.append(['1 -> 1 process: throughput', rate(one['ours']), rate(one['queue']),
                 rate(one['zmq']), factor(vs_queue), factor(vs_zmq),
                 '>= 2.5x Queue, >= 1.15x ZeroMQ',
                 met(None if vs_queue is None or vs_zmq is None
                     else vs_queue >= 2.5 and vs_zmq >= 1.15)])
    rows.append(['  CPU/msg: publisher / middle / subscriber',
                 *(split(lib, 'cross_1to1') for lib in ('ours', 'queue', 'zmq')),
                 '', '', '', ''])
    many = {lib: value(lib, 'cross_1to4') for lib in CROSS_LIBS['cross_1to4']}
    vs_queue, vs_zmq = div(many['ours'], many['queue']), div(many['ours'], many['zmq'])
    rows.append([f'1 -> {fanout} processes: delivered/s', rate(many['ours']),
                 rate(many['queue']), rate(many['zmq']), factor(vs_queue), factor(vs_zmq),
                 '>= 1.15x ZeroMQ', met(None if vs_zmq is None else vs_zmq >= 1.15)])
    rows.append(['  CPU/msg: publisher / middle / each subscriber',
                 *(split(lib, 'cross_1to4') for lib in ('ours', 'queue', 'zmq')),
                 '', '', '', ''])
    for key, limit, of_zmq in (('p50_us', 100, 0.8), ('p99_us', 400, None)):
        ours, queue, zmq = (value(lib, 'cross_latency', key) for lib in ('ours', 'queue', 'zmq'))
        goal = f'< {limit} µs' + (f', <= {of_zmq}x ZeroMQ\'s' if of_zmq else '')
        ok = None if ours is None or (of_zmq and zmq is None) else \
            ours < limit and (not of_zmq or ours <= of_zmq * zmq)
        rows.append([f'latency at {rate_goal:,} msg/s, 1 -> 1: {key[:3]}', us(ours), us(queue),
                     us(zmq), factor(div(queue, ours)), factor(div(zmq, ours)), goal, met(ok)])
    broker = {lib: cpu(lib, 'cross_1to1', 'middle') for lib in ('ours', 'queue', 'zmq')}
    rows.append(['broker CPU per routed message (1 -> 1)', us(broker['ours']),
                 us(broker['queue']), us(broker['zmq']),
                 factor(div(broker['queue'], broker['ours'])),
                 factor(div(broker['zmq'], broker['ours'])), 'printed',
                 '' if broker['ours'] is None else 'yes'])
    subs = sizes['cross_subscriptions']
    memory = value('ours', 'cross_memory')
    rows.append([f'broker memory per subscription ({subs:,} subs)',
                 '-' if memory is None else f'{memory:,.0f} B', '-', '-', '', '', 'printed',
                 '' if memory is None else 'yes'])

    notes = [
        f'Median of {sizes["cross_runs"]} run(s) per system, each a fresh set of processes '
        f'(the systems take turns); {sizes["cross_messages"]:,} messages per 1 -> 1 run, '
        f'{sizes["fanout_messages"]:,} per 1 -> {fanout} run, after {sizes["cross_warmup"]:,} '
        f'warm-up messages; payload {{"text": "x" * {len(PAYLOAD["text"])}}}, pickled by the '
        f'publisher and unpickled in each subscriber.',
        'Throughput: from the first send to the last subscriber\'s handling of the last '
        'message; delivered/s = messages/s x subscribers. Every subscriber got exactly '
        'every message, or the run is an error.',
        'Middle: our broker (1 routing thread), the Queue relay process, the ZeroMQ proxy '
        f'process. CPU/msg: user+system CPU time of each process (psutil, in steps of '
        f'{1000 / os.sysconf("SC_CLK_TCK"):g} ms) over the timed part, per message sent (each '
        f'subscriber handles every message); in the latency runs it includes the pacing.',
        f'Latency: {sizes["latency_seconds"]:g} s at {rate_goal:,} msg/s after '
        f'{sizes["latency_warmup"]:g} s of warm-up; time.time() in the handler minus the '
        f'send time (ours: message.timestamp, Queue and ZeroMQ: a time in the data).',
        f'Memory: RSS growth of the broker while one process subscribes {subs:,} channels '
        f'on distinct topics.',
        '"ours vs X" is the speed-up (higher is better for ours): our rate / X\'s, or '
        'X\'s latency or CPU / ours.',
        *run_notes(results, sizes, CROSS_CASES),
    ]
    return rows, notes


def plot_data(results: dict, sweep: tuple[int, ...]
              ) -> tuple[dict[str, dict[int, list[float]]], dict[str, list[float]]]:
    """The picture's figures, as plain data, from the runs that succeeded.

    Returns ``({system: {subscribers: [delivered msg/s of each run]}}, {system: [[latency
    µs of each message] of each run]})``, with the systems' display names.
    """
    def ok(lib: str, case: str) -> list[dict]:
        return [run for run in results.get((lib, case), []) if 'error' not in run]

    throughput = {SYSTEM_NAMES[lib]: {n: [run['delivered'] for run in ok(lib, fanout_case(n))]
                                      for n in sweep}
                  for lib in SWEEP_SYSTEMS}
    latency = {SYSTEM_NAMES[lib]: [run['samples_us'] for run in ok(lib, 'cross_latency')]
               for lib in cross_systems('cross_latency')}
    return throughput, latency


def build_sweep_rows(results: dict, sizes: dict, sweep: tuple[int, ...]
                     ) -> tuple[list[list[str]], list[str], list[str]]:
    """The picture's figures as a table: its rows, its header and the notes under it."""
    throughput, latency = plot_data(results, sweep)
    rows = []
    for name in dict.fromkeys([*throughput, *latency]):
        cells = [name]
        for n in sweep:
            runs = throughput.get(name, {}).get(n, [])
            cells.append(f'{statistics.median(runs):,.0f}' if runs else '-')
        cuts = [percentiles(run) for run in latency.get(name, []) if len(run) >= 2]
        for p in (50, 99):
            cells.append(f'{statistics.median(c[p - 1] for c in cuts):,.0f} µs' if cuts else '-')
        rows.append(cells)
    header = ['system', *(f'1 -> {n}' for n in sweep), 'latency p50', 'latency p99']
    notes = [
        f'Delivered msg/s (messages/s x subscribers), median of {sizes["cross_runs"]} run(s) '
        f'per count; {sizes["cross_messages"]:,} messages per run to 1 subscriber, '
        f'{sizes["fanout_messages"]:,} to more, after {sizes["cross_warmup"]:,} warm-up.',
        f'Latency: {sizes["latency_seconds"]:g} s at {sizes["latency_rate"]:,} msg/s, '
        f'1 -> 1, median of {sizes["cross_runs"]} run(s).',
    ]
    for case in plot_cases(sweep):
        for lib in cross_systems(case):
            errors = [run['error'] for run in results.get((lib, case), []) if 'error' in run]
            if errors and case not in CROSS_CASES:
                notes.append(f'ERROR {lib} {case}: {errors[0]}')
    return rows, header, notes


def write_plot(path: str, results: dict, sizes: dict, sweep: tuple[int, ...], machine: str,
               found: dict[str, str], load: tuple[float, float] | None = None) -> None:
    """Draw the picture of *results* into *path* (``scripts/benchplot.py`` draws it).

    *load* is the machine's 1-minute load average before and after the runs, if known.
    """
    import benchplot      # scripts/benchplot.py: scripts/ is on the path, as for this package
    throughput, latency = plot_data(results, sweep)
    runs = sizes['cross_runs']
    several = runs > 1
    caption = '\n'.join([
        f'{datetime.date.today().isoformat()} · {machine} · ZeroMQ {found["libzmq"]} '
        f'(pyzmq {found["pyzmq"]})'
        + ('' if load is None else f' · load average {load[0]:.1f} before the runs, '
                                   f'{load[1]:.1f} after'),
        f'Payload {{"text": "x" * {len(PAYLOAD["text"])}}}, pickled by the publisher, '
        f'unpickled by each subscriber (ours: in the handler, reading message.data).',
        f'Throughput: {sizes["cross_messages"]:,} messages to 1 subscriber, '
        f'{sizes["fanout_messages"]:,} to more, per run; median of {runs} run(s)'
        + (', bars from the slowest run to the fastest.' if several else '.'),
        f'Latency: time.time() in the handler minus the send time, '
        f'{sizes["latency_seconds"]:g} s at {sizes["latency_rate"]:,} msg/s after '
        f'{sizes["latency_warmup"]:g} s of warm-up'
        + (f'; bold: the run with the median p99, faint: the other runs; p50 and p99: '
           f'median of {runs} runs.' if several else '.'),
    ])
    benchplot.plot_cross(
        path, throughput, latency,
        title='mpchannels across processes, through channels-broker, vs a '
              'multiprocessing.Queue relay and a ZeroMQ proxy',
        caption=caption,
        latency_title=f'Latency at {sizes["latency_rate"]:,} msg/s, 1 → 1 process')


def details(results: dict) -> list[str]:
    """One line per case and library with every run's figure and the send-loop time."""
    lines = []
    for (lib, case), runs in results.items():
        parts = []
        for run in runs:
            if 'error' in run:
                parts.append('error')
            elif case.startswith('subscribe'):
                parts.append(f'{run["value"]:.3f} s (calls {run["calls"]:.3f} s)')
            elif case == 'cross_memory':
                parts.append(f'{run["value"]:,.0f} B/subscription (RSS {run["rss_before"]:,} '
                             f'-> {run["rss_after"]:,}; subscribed in '
                             f'{run["subscribe_calls"]:.2f} s, known to the broker after '
                             f'{run["subscribe_known"]:.2f} s; broker CPU '
                             f'{run["broker_cpu_us"]:.1f} µs/subscription)')
            elif case == 'sio_broadcast':
                parts.append(f'{run["value"]:,.0f} events/s ({run["delivered"]:,.0f} to '
                             f'clients/s), p50 {run["p50"] * 1e3:.2f} ms, p99 '
                             f'{run["p99"] * 1e3:.2f} ms; CPU µs/event: workers '
                             f'{run["cpu_workers_us"]:.0f}, carrier {run["cpu_carrier_us"]:.0f}')
            elif case.endswith('_latency'):
                parts.append(f'p50 {run["p50_us"]:.0f} µs, p99 {run["p99_us"]:.0f} µs, '
                             f'max {run["max_us"]:,.0f} µs, mean {run["mean_us"]:.0f} µs at '
                             f'{run["rate"]:,.0f} msg/s (CPU µs/msg: {_cpu_text(run)})')
            elif case in FANOUT_CASES:
                parts.append(f'{run["delivered"]:,.0f} delivered/s to {run["consumers"]:,} '
                             f'consumers, p50 {run.get("p50_us", 0) / 1000:.1f} ms')
            elif case in CROSS_CASES or fanout_of(case) or bridged_fanout(case):
                parts.append(f'{run["per_second"]:,.0f} msg/s x {run["subscribers"]} '
                             f'(send loop {run["send_loop"] / run["count"] * 1e6:.1f} µs/msg; '
                             f'CPU µs/msg: {_cpu_text(run)})')
            else:
                parts.append(f'{run["per_second"]:,.0f} msg/s '
                             f'(send loop {run["send_loop"] / run["count"] * 1e6:.1f} µs/msg)')
        lines.append(f'{lib:5} {case:16}: ' + '; '.join(parts))
    return lines


def _cpu_text(run: dict) -> str:
    """A run's CPU µs per message of each role: ``publisher 3.2, middle 1.8, ...``."""
    return ', '.join(f'{role} {us:.1f}' for role, us in run['cpu_us'].items())


def format_text(rows: list[list[str]], header: list[str]) -> str:
    """The rows as an aligned plain-text table."""
    table = [header] + rows
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for n, row in enumerate(table):
        lines.append('  '.join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append('  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def format_markdown(rows: list[list[str]], header: list[str],
                    align: list[str] | None = None) -> str:
    """The rows as a Markdown table; *align* is each column's ``---``, ``---:``, ..."""
    if align is None:     # measurement, figures..., goal, met
        align = ['---'] + ['---:'] * (len(header) - 3) + ['---', ':---:']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(align) + '|']
    for row in rows:
        cells = [cell.strip().replace('|', '\\|') for cell in row]
        if row[0].startswith('  '):
            cells[0] = '↳ ' + cells[0]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)



def print_table(title: str, rows: list[list[str]], header: list[str], notes: list[str],
                markdown: bool, align: list[str] | None = None) -> None:
    """One table with its title and notes, as text or as Markdown."""
    print(title)
    print()
    print(format_markdown(rows, header, align) if markdown else format_text(rows, header))
    print()
    for note in notes:
        print(f'- {note}' if markdown else f'* {note}')

