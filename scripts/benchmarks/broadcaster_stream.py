"""broadcaster's Redis-stream pattern across machines: ``XADD`` and ``XREAD`` one at a time.

What ``broadcaster``'s ``RedisStreamBackend`` does with each message (asyncio, redis-py's
``redis.asyncio``): the publisher (machine A) awaits ``xadd(stream, {'message': text})``
once per message; every subscriber (machines B, C) starts from the stream's last id, as
its ``subscribe()`` does, and awaits ``xread(streams, count=1, block=100)`` for each
message, one at a time. broadcaster carries text: the payload is ``json.dumps``'d and
decoded and ``json.loads``'d in the subscriber. The measured loops are below, inline.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from multiprocessing.connection import Connection

from .cases import CROSS_TOPIC, PAYLOAD
from .procs import Child, Cluster, serve_publisher

END = 'E'
"""The last message of a stream (no JSON object is one character long)."""


def subscriber(conn: Connection, url: str, marks: tuple[int, ...], latency: bool) -> None:
    """A subscriber process: ``XREAD`` one message at a time until END."""
    asyncio.run(_subscribe(conn, url, marks, latency))


async def _subscribe(conn: Connection, url: str, marks: tuple[int, ...],
                     latency: bool) -> None:
    from redis import asyncio as aioredis
    consumer = aioredis.Redis.from_url(url)
    try:
        info = await consumer.xinfo_stream(CROSS_TOPIC)
        last_id = info['last-generated-id']
    except aioredis.ResponseError:                 # no stream yet
        last_id = '0'
    streams = {CROSS_TOPIC: last_id}
    at = frozenset(marks)
    total = max(marks)
    loads = json.loads
    xread = consumer.xread
    times: list[float] = []
    count = 0
    conn.send(('ready', os.getpid()))
    try:
        while True:
            messages = None
            while not messages:
                messages = await xread(streams, count=1, block=100)
            stream, events = messages[0]
            message_id, fields = events[0]
            streams[CROSS_TOPIC] = message_id
            text = fields.get(b'message', b'').decode('utf-8')
            if text == END:
                conn.send(('final', count, True))
                return
            if latency:
                now = time.time()
                data = loads(text)
                count += 1
                times.append(now - data['t'])
                if count == total:
                    conn.send(('latency', times))
            else:
                loads(text)
                count += 1
                if count in at:
                    conn.send(('mark', count, time.time()))
    finally:
        await consumer.aclose()


def publisher(conn: Connection, url: str) -> None:
    """The publisher process: ``XADD`` the JSON text (see ``serve_publisher``)."""
    from redis import asyncio as aioredis
    loop = asyncio.new_event_loop()
    producer = aioredis.Redis.from_url(url)

    async def send_all(n: int) -> None:
        xadd, dumps, payload = producer.xadd, json.dumps, PAYLOAD
        for _ in range(n):
            await xadd(CROSS_TOPIC, {'message': dumps(payload)})

    async def pace_all(n: int, rate: float, started: float) -> None:
        xadd, dumps = producer.xadd, json.dumps
        interval, text = 1.0 / rate, PAYLOAD['text']
        for i in range(n):
            delay = started + i * interval - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await xadd(CROSS_TOPIC, {'message': dumps({'text': text, 't': time.time()})})

    def end() -> bool:
        loop.run_until_complete(producer.xadd(CROSS_TOPIC, {'message': END}))
        return True

    try:
        serve_publisher(conn, lambda n: loop.run_until_complete(send_all(n)),
                        lambda n, rate, t0: loop.run_until_complete(pace_all(n, rate, t0)),
                        end)
    finally:
        loop.run_until_complete(producer.aclose())
        loop.close()


def setup(cluster: Cluster, subscribers: int, marks: tuple[int, ...],
          latency: bool) -> tuple[Child, dict[str, list[int]], list[Child]]:
    """Start Redis, the subscribers and the publisher; (publisher, ``{'engine': [pid]}``,
    subscribers). Each subscriber reads from the stream's end when it starts, before
    anything is sent."""
    engine = cluster.start_engine('redis')
    subs = [cluster.start(f'subscriber {i + 1}', subscriber, engine.url, marks, latency)
            for i in range(subscribers)]
    return cluster.start('publisher', publisher, engine.url), {'engine': [engine.pid]}, subs
