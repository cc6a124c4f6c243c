"""The python-socketio server of the Socket.IO benchmark: one worker of four.

Run by uvicorn (``uvicorn sio_app:app --app-dir scripts/benchmarks``), one process per
worker, each on its own port, so that the clients are spread over the four workers
exactly. ``SIO_BENCH_MANAGER`` picks the client manager that carries emits between the
workers: ``ours`` (``channels.socketio.AsyncManager``, through ``channels-broker``; the
worker finds it by ``CHANNELS_BROKER_ADDRESS``) or ``redis`` (python-socketio's own
``AsyncRedisManager`` on ``SIO_BENCH_REDIS_URL``).

A client's ``blast`` event ``{'count': n, 'rate': r, 'phase': p}`` makes this worker
emit n ``m`` events to every client of every worker, as fast as it can (rate 0) or r
per second, each ``{'i': i, 'n': n, 'p': p, 't': time.time(), 'text': ...}``; it
answers once the last one is emitted.
"""

from __future__ import annotations

import asyncio
import os
import time

import socketio

TEXT = 'x' * 48


def _manager() -> socketio.AsyncManager:
    kind = os.environ['SIO_BENCH_MANAGER']
    if kind == 'ours':
        from channels.socketio import AsyncManager
        return AsyncManager()
    if kind == 'redis':
        return socketio.AsyncRedisManager(os.environ['SIO_BENCH_REDIS_URL'])
    raise SystemExit(f'SIO_BENCH_MANAGER must be ours or redis, not {kind!r}')


sio = socketio.AsyncServer(async_mode='asgi', client_manager=_manager(),
                           transports=['websocket'])
app = socketio.ASGIApp(sio)


@sio.event
async def blast(sid: str, command: dict) -> float:
    """Emit ``command['count']`` events to everyone; the time the first one was emitted."""
    count, rate, phase = command['count'], command['rate'], command['phase']
    emit = sio.emit
    started = time.time()
    for i in range(count):
        if rate:
            delay = started + i / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await emit('m', {'i': i, 'n': count, 'p': phase, 't': time.time(), 'text': TEXT})
    return started
