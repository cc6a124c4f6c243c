"""python-socketio's RedisManager pattern across machines: Redis pub/sub, at most once.

What ``socketio.RedisManager`` does with each message, without the rest of Socket.IO:
the publisher (machine A) calls redis-py's ``publish(channel, pickle.dumps(data))``
once per message, each a round trip; every subscriber (machines B, C) ``SUBSCRIBE``s
on its own connection and unpickles what ``pubsub.listen()`` yields. Redis pub/sub
keeps nothing: a subscriber that is not connected at the moment misses the message.
The measured loops are the ones below, inline.
"""

from __future__ import annotations

import os
import pickle
import time
from multiprocessing.connection import Connection

from .cases import CROSS_TOPIC, PAYLOAD
from .procs import Child, Cluster, serve_publisher

END = b'E'
"""The last message of a stream (no pickle is one byte long)."""


def subscriber(conn: Connection, url: str, marks: tuple[int, ...], latency: bool) -> None:
    """A subscriber process: ``SUBSCRIBE``, then unpickle each message until END."""
    import redis
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub()
    pubsub.subscribe(CROSS_TOPIC)
    for message in pubsub.listen():             # the server has the subscription
        if message['type'] == 'subscribe':
            break
    at = frozenset(marks)
    total = max(marks)
    loads = pickle.loads
    times: list[float] = []
    count = 0
    conn.send(('ready', os.getpid()))
    try:
        for message in pubsub.listen():
            if message['type'] != 'message':
                continue
            body = message['data']
            if body == END:
                conn.send(('final', count, True))
                return
            if latency:
                now = time.time()
                data = loads(body)
                count += 1
                times.append(now - data['t'])
                if count == total:
                    conn.send(('latency', times))
            else:
                loads(body)
                count += 1
                if count in at:
                    conn.send(('mark', count, time.time()))
    finally:
        pubsub.close()
        client.close()


def publisher(conn: Connection, url: str) -> None:
    """The publisher process: ``PUBLISH`` the pickled dict (see ``serve_publisher``)."""
    import redis
    client = redis.Redis.from_url(url)

    def send(n: int) -> None:
        publish, dumps, payload = client.publish, pickle.dumps, PAYLOAD
        for _ in range(n):
            publish(CROSS_TOPIC, dumps(payload))

    def pace(n: int, rate: float, started: float) -> None:
        publish, dumps = client.publish, pickle.dumps
        interval, text = 1.0 / rate, PAYLOAD['text']
        for i in range(n):
            delay = started + i * interval - time.time()
            if delay > 0:
                time.sleep(delay)
            publish(CROSS_TOPIC, dumps({'text': text, 't': time.time()}))

    def end() -> bool:
        client.publish(CROSS_TOPIC, END)
        return True

    try:
        serve_publisher(conn, send, pace, end)
    finally:
        client.close()


def setup(cluster: Cluster, subscribers: int, marks: tuple[int, ...],
          latency: bool) -> tuple[Child, dict[str, list[int]], list[Child]]:
    """Start Redis, the subscribers and the publisher; (publisher, ``{'engine': [pid]}``,
    subscribers), once Redis has every subscription."""
    engine = cluster.start_engine('redis')
    subs = [cluster.start(f'subscriber {i + 1}', subscriber, engine.url, marks, latency)
            for i in range(subscribers)]
    return cluster.start('publisher', publisher, engine.url), {'engine': [engine.pid]}, subs
