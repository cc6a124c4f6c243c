"""The report of the cases across machines: the table "Across machines" and its notes.

Like :mod:`benchmarks.report`, it takes the results of ``measure()`` in
``scripts/bench.py``, ``{(lib, case): [result of each run]}``, and measures nothing.
The goals are printed beside the figures, not asserted.
"""

from __future__ import annotations

from .cases import BRIDGED_CASES, BRIDGED_SYSTEMS, PAYLOAD, ROUND_TRIP_SYSTEMS
from .report import div, factor, met, rate, run_notes
from .stats import median, median_cpu

HEADER = ['measurement', 'ours via Redis', 'ours via NATS', 'RedisManager pattern',
          'broadcaster stream', 'nats-py core', 'goal', 'met']
"""The columns: the systems in ``BRIDGED_SYSTEMS``' order, then the goal and whether
ours met it (through Redis / through NATS)."""

OURS = ('ours_redis', 'ours_nats')
RATE_GOAL = 100_000
VS_SOCKETIO_GOAL = 5.0
P50_GOAL_US, P99_GOAL_US = 1_000, 5_000


def _bridge_loop() -> str:
    """The event loop the brokers' bridges run on here (uvloop's where installed)."""
    from importlib import metadata
    try:
        return f'uvloop {metadata.version("uvloop")}'
    except metadata.PackageNotFoundError:
        return 'asyncio\'s loop (uvloop is not installed)'


def _us(x: float | None) -> str:
    if x is None:
        return '-'
    if x >= 1000:
        return f'{x / 1000:,.2f} ms'
    return f'{x:,.0f} µs' if x >= 100 else f'{x:.1f} µs'


def _both(oks: list[bool | None]) -> str:
    """The met cell of a goal of ours: ``yes / NO`` (through Redis / through NATS)."""
    return ' / '.join(met(ok) for ok in oks)


def build_bridged_rows(results: dict, sizes: dict) -> tuple[list[list[str]], list[str]]:
    """The table's rows (as strings, one column per system of ``HEADER``) and its notes."""
    def value(lib: str, case: str, key: str = 'value') -> float | None:
        return median(results.get((lib, case), []), key)

    def cpu(lib: str, case: str, role: str) -> float | None:
        ok = [run for run in results.get((lib, case), []) if 'error' not in run]
        if not ok or role not in ok[0]['cpu_us']:
            return None
        return median_cpu(ok, role)

    def split(lib: str, case: str) -> str:
        parts = [cpu(lib, case, 'publisher'), cpu(lib, case, 'engine'),
                 cpu(lib, case, 'subscriber')]
        if None in parts:
            return '-'
        if lib in OURS:
            a, b = cpu(lib, case, 'broker A'), cpu(lib, case, 'broker B')
            brokers = '-' if a is None or b is None else f'{a:.1f} + {b:.1f}'
        else:
            brokers = 'none'
        return f'{parts[0]:.1f} / {brokers} / {parts[1]:.1f} / {parts[2]:.1f} µs'

    def brokers(case: str) -> list[str]:
        cells = []
        for lib in BRIDGED_SYSTEMS:
            a, b = cpu(lib, case, 'broker A'), cpu(lib, case, 'broker B')
            cells.append('-' if a is None or b is None else _us(a + b)
                         + f' ({a:,.1f} + {b:,.1f})')
        return cells

    rows = []
    one = {lib: value(lib, 'bridged_1to1') for lib in BRIDGED_SYSTEMS}
    rows.append(['1 -> 1 machine: throughput', *(rate(one[lib]) for lib in BRIDGED_SYSTEMS),
                 f'>= {RATE_GOAL:,} msg/s',
                 _both([None if one[lib] is None else one[lib] >= RATE_GOAL for lib in OURS])])
    for other, goal in (('socketio', VS_SOCKETIO_GOAL), ('nats_core', 1.0)):
        ratios = {lib: div(one[lib], one[other]) for lib in OURS}
        rows.append([f'  ours vs {HEADER[1 + BRIDGED_SYSTEMS.index(other)]}',
                     *(factor(ratios[lib]) if lib in OURS else '' for lib in BRIDGED_SYSTEMS),
                     f'>= {goal:g}x',
                     _both([None if ratios[lib] is None else ratios[lib] >= goal
                            for lib in OURS])])
    rows.append(['  CPU/msg: publisher / brokers A + B / engine / subscriber',
                 *(split(lib, 'bridged_1to1') for lib in BRIDGED_SYSTEMS), '', ''])
    two = {lib: value(lib, 'bridged_1to2') for lib in BRIDGED_SYSTEMS}
    rows.append(['1 -> 2 machines: delivered/s', *(rate(two[lib]) for lib in BRIDGED_SYSTEMS),
                 '', ''])
    rows.append(['  CPU/msg: publisher / brokers A + each B / engine / each subscriber',
                 *(split(lib, 'bridged_1to2') for lib in BRIDGED_SYSTEMS), '', ''])
    for key, limit in (('p50_us', P50_GOAL_US), ('p99_us', P99_GOAL_US)):
        cells = {lib: value(lib, 'bridged_latency', key) for lib in BRIDGED_SYSTEMS}
        rows.append([f'latency at {sizes["latency_rate"]:,} msg/s, 1 -> 1: {key[:3]}',
                     *(_us(cells[lib]) for lib in BRIDGED_SYSTEMS), f'< {_us(limit)}',
                     _both([None if cells[lib] is None else cells[lib] < limit
                            for lib in OURS])])
    rows.append(['broker CPU per bridged message, 1 -> 1 (A + B)', *brokers('bridged_1to1'),
                 'printed', '' if one['ours_redis'] is None and one['ours_nats'] is None
                 else 'yes'])
    rows.append([f'  the same at {sizes["latency_rate"]:,} msg/s', *brokers('bridged_latency'),
                 '', ''])
    rows.append(['engine CPU per message, 1 -> 1',
                 *(_us(cpu(lib, 'bridged_1to1', 'engine')) for lib in BRIDGED_SYSTEMS), '', ''])
    return rows, _notes(results, sizes)


def _notes(results: dict, sizes: dict) -> list[str]:
    notes = [
        'Each "machine" is its own process set on this one host: ours runs a '
        '`channels-broker` per machine (its own socket), all bridged through the run\'s own '
        'engine (a `redis-server` with appendonly yes, or `nats-server -js` with file '
        'storage, on a free port, data in a temp dir); the publisher process connects to '
        "machine A's broker, one subscriber process to B's (and one to C's). The others "
        'connect their processes to the engine directly: RedisManager pattern = redis-py '
        '`PUBLISH` per message and `SUBSCRIBE` (python-socketio\'s RedisManager, pickled); '
        'broadcaster stream = `XADD` per message and `XREAD count=1 block=100` '
        '(broadcaster\'s RedisStreamBackend, redis.asyncio, JSON text); nats-py core = '
        '`publish` per message and an async callback. Only ours keeps every message '
        '(exactly once, in order, across an engine outage): Redis pub/sub and core NATS '
        'are at most once, broadcaster\'s stream has no acknowledgement or replay of its own.',
        f'Median of {sizes["bridged_runs"]} run(s) per system, each a fresh set of processes '
        f'and engine (the systems take turns); {sizes["bridged_messages"]:,} messages per '
        f'1 -> 1 run, {sizes["bridged_fanout_messages"]:,} per 1 -> 2 run, after '
        f'{sizes["bridged_warmup"]:,} warm-up; '
        + ' and '.join(HEADER[1 + BRIDGED_SYSTEMS.index(lib)] for lib in ROUND_TRIP_SYSTEMS)
        + f', which await a reply per message, send {sizes["round_trip_messages"]:,} and '
        f'{sizes["round_trip_fanout_messages"]:,} (the rate is the same, the run shorter). '
        f'Payload {{"text": "x" * {len(PAYLOAD["text"])}}}; ours: `send()` to a handler '
        'that reads `message.data`.',
        'CPU/msg: user+system CPU time of each process over the timed part, per message '
        'sent; "brokers A + B": the sending machine\'s broker and (each) receiving one; '
        'all of them, the engine too, share the 2 CPUs with the app processes.',
        f'Latency: {sizes["latency_seconds"]:g} s at {sizes["latency_rate"]:,} msg/s after '
        f'{sizes["latency_warmup"]:g} s of warm-up; time.time() in the handler minus the '
        'send time (ours: message.timestamp, the others: a time in the data).',
        'met: ours via Redis / ours via NATS.',
        f'The bridges ran their event loop on {_bridge_loop()}.',
        *run_notes(results, sizes, BRIDGED_CASES),
    ]
    return notes

