"""nats-py core publish/subscribe across machines: callbacks, at most once.

The publisher (machine A) awaits nats-py's ``publish(subject, pickled dict)`` once per
message (nats-py buffers and writes in the background; a ``flush()`` ends each batch);
every subscriber (machines B, C) subscribes with an async callback that unpickles.
Core NATS keeps nothing: no acknowledgement, no replay, a slow consumer's messages are
dropped. The measured loops are the ones below, inline.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import time
from multiprocessing.connection import Connection
from typing import Any

from .cases import CROSS_TOPIC, PAYLOAD
from .procs import Child, Cluster, serve_publisher

END = b'E'
"""The last message of a stream (no pickle is one byte long)."""


def subscriber(conn: Connection, url: str, marks: tuple[int, ...], latency: bool) -> None:
    """A subscriber process: a callback that unpickles each message, until END."""
    asyncio.run(_subscribe(conn, url, marks, latency))


async def _subscribe(conn: Connection, url: str, marks: tuple[int, ...],
                     latency: bool) -> None:
    import nats
    nc = await nats.connect(url)
    done = asyncio.Event()
    at = frozenset(marks)
    total = max(marks)
    loads = pickle.loads
    times: list[float] = []
    state = [0]

    async def on_message(msg: Any) -> None:
        body = msg.data
        if body == END:
            conn.send(('final', state[0], True))
            done.set()
        elif latency:
            now = time.time()
            data = loads(body)
            times.append(now - data['t'])
            state[0] += 1
            if state[0] == total:
                conn.send(('latency', times))
        else:
            loads(body)
            n = state[0] = state[0] + 1
            if n in at:
                conn.send(('mark', n, time.time()))

    await nc.subscribe(CROSS_TOPIC, cb=on_message)
    await nc.flush()                                # the server has the subscription
    conn.send(('ready', os.getpid()))
    try:
        await done.wait()
    finally:
        await nc.close()


def publisher(conn: Connection, url: str) -> None:
    """The publisher process: ``publish`` the pickled dict (see ``serve_publisher``)."""
    import nats
    loop = asyncio.new_event_loop()
    nc = loop.run_until_complete(nats.connect(url))

    async def send_all(n: int) -> None:
        publish, dumps, protocol, payload = nc.publish, pickle.dumps, \
            pickle.HIGHEST_PROTOCOL, PAYLOAD
        for _ in range(n):
            await publish(CROSS_TOPIC, dumps(payload, protocol))
        await nc.flush()

    async def pace_all(n: int, rate: float, started: float) -> None:
        publish, dumps, protocol = nc.publish, pickle.dumps, pickle.HIGHEST_PROTOCOL
        interval, text = 1.0 / rate, PAYLOAD['text']
        for i in range(n):
            delay = started + i * interval - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await publish(CROSS_TOPIC, dumps({'text': text, 't': time.time()}, protocol))
        await nc.flush()

    async def end_stream() -> None:
        await nc.publish(CROSS_TOPIC, END)
        await nc.flush()

    def end() -> bool:
        loop.run_until_complete(end_stream())
        return True

    try:
        serve_publisher(conn, lambda n: loop.run_until_complete(send_all(n)),
                        lambda n, rate, t0: loop.run_until_complete(pace_all(n, rate, t0)),
                        end)
    finally:
        loop.run_until_complete(nc.close())
        loop.close()


def setup(cluster: Cluster, subscribers: int, marks: tuple[int, ...],
          latency: bool) -> tuple[Child, dict[str, list[int]], list[Child]]:
    """Start NATS, the subscribers and the publisher; (publisher, ``{'engine': [pid]}``,
    subscribers), once NATS has every subscription."""
    engine = cluster.start_engine('nats')
    subs = [cluster.start(f'subscriber {i + 1}', subscriber, engine.url, marks, latency)
            for i in range(subscribers)]
    return cluster.start('publisher', publisher, engine.url), {'engine': [engine.pid]}, subs
