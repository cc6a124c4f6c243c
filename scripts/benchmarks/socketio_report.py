"""The Socket.IO table: ours (``channels.socketio.AsyncManager``) against python-socketio's
``AsyncRedisManager``, broadcast from one worker to clients spread over four."""

from __future__ import annotations

from .report import div, factor, met, rate
from .stats import median

HEADER = ['measurement', 'ours (channels.socketio)', 'AsyncRedisManager', 'ours vs Redis',
          'goal', 'met']


def build_socketio_rows(results: dict, sizes: dict) -> tuple[list[list[str]], list[str]]:
    """The rows (as strings) and the notes under them."""
    def value(lib: str, key: str = 'value') -> float | None:
        return median(results.get((lib, 'sio_broadcast'), []), key)

    def ms(x: float | None) -> str:
        return '-' if x is None else f'{x * 1e3:,.2f} ms'

    def us(x: float | None) -> str:
        return '-' if x is None else f'{x:,.0f} µs'

    ours, redis = value('sio_ours'), value('sio_redis')
    workers, clients = sizes['sio_workers'], sizes['sio_clients']
    times = div(ours, redis)
    rows = [[f'broadcast from 1 worker to {workers * clients} clients on {workers} workers: '
             f'events/s', rate(ours), rate(redis), factor(times), '>= 3x AsyncRedisManager',
             met(None if times is None else times >= 3)]]
    rows.append(['  ↳ delivered to clients/s', rate(value('sio_ours', 'delivered')),
                 rate(value('sio_redis', 'delivered')), '', '', ''])
    for key in ('p50', 'p99'):
        a, b = value('sio_ours', key), value('sio_redis', key)
        goal = 'lower than AsyncRedisManager' if key == 'p50' else ''
        rows.append([f'latency at {sizes["sio_rate"]:,} events/s: {key}', ms(a), ms(b),
                     factor(div(b, a)), goal,
                     met(None if a is None or b is None else a < b) if goal else ''])
    rows.append(['  CPU/event: the 4 workers together / broker or Redis',
                 *(f'{us(value(lib, "cpu_workers_us"))} / {us(value(lib, "cpu_carrier_us"))}'
                   for lib in ('sio_ours', 'sio_redis')), '', '', ''])
    notes = [
        f'Median of {sizes["sio_runs"]} run(s) per system, each a fresh set of processes '
        f'(the systems take turns): {workers} uvicorn workers of one python-socketio '
        f'AsyncServer app (one process each, on ports of their own, so the clients are '
        f'spread over all of them), {clients} websocket clients per worker (bare Engine.IO '
        f'clients, which cost little beside the servers), in one client process per worker. A client of worker 0 asks it to emit '
        f'{sizes["sio_messages"]:,} events to everyone as fast as it can (after '
        f'{sizes["sio_warmup"]:,} of warm-up): events/s runs from the first emit to the '
        f'last client\'s arrival of the last event; then {sizes["sio_rate"]:,} a second for '
        f'{sizes["sio_latency_seconds"]:g} s: latency from emit to each arrival at each '
        f'client. Every client must get every event once and in order, else the run is an '
        f'error. Redis: this run\'s own redis-server; python-socketio pickles each emit and '
        f'awaits PUBLISH.',
    ]
    return rows, notes
