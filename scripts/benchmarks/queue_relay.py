"""The first reference across processes: a bare ``multiprocessing.Queue`` relay.

Publisher process -> relay process -> one ``Queue`` per subscriber process, one
``put()`` per message: the publisher puts the pickled dict, the relay passes the bytes
on, each subscriber unpickles them. The measured loops are the ones below, inline.
"""

from __future__ import annotations

import os
import pickle
import time
from multiprocessing.connection import Connection
from typing import Any

from .cases import PAYLOAD
from .procs import Child, Cluster, serve_publisher


def subscriber(conn: Connection, queue: Any, marks: tuple[int, ...],
               latency: bool) -> None:
    """A subscriber process of the Queue relay: ``get()`` and unpickle until None."""
    at = frozenset(marks)
    total = max(marks)
    loads = pickle.loads
    get = queue.get
    times: list[float] = []
    count = 0
    conn.send(('ready', os.getpid()))
    while True:
        item = get()
        if item is None:
            conn.send(('final', count, True))
            return
        if latency:
            now = time.time()
            data = loads(item)
            count += 1
            times.append(now - data['t'])
            if count == total:
                conn.send(('latency', times))
        else:
            loads(item)
            count += 1
            if count in at:
                conn.send(('mark', count, time.time()))


def relay(conn: Connection, inbound: Any, outbound: list[Any]) -> None:
    """The relay process: one ``get()``, then one ``put()`` per subscriber's Queue."""
    get = inbound.get
    puts = [queue.put for queue in outbound]
    conn.send(('ready', os.getpid()))
    while True:
        item = get()
        for put in puts:
            put(item)
        if item is None:
            return                # the Queues' feeder threads flush before the exit


def publisher(conn: Connection, queue: Any) -> None:
    """The publisher process: ``put()`` the pickled dict (see ``serve_publisher``)."""
    def send(n: int) -> None:
        put, dumps, protocol, payload = queue.put, pickle.dumps, pickle.HIGHEST_PROTOCOL, PAYLOAD
        for _ in range(n):
            put(dumps(payload, protocol))

    def pace(n: int, rate: float, started: float) -> None:
        put, dumps, protocol = queue.put, pickle.dumps, pickle.HIGHEST_PROTOCOL
        interval, text = 1.0 / rate, PAYLOAD['text']
        for i in range(n):
            delay = started + i * interval - time.time()
            if delay > 0:
                time.sleep(delay)
            put(dumps({'text': text, 't': time.time()}, protocol))

    def end() -> bool:
        queue.put(None)
        return True

    serve_publisher(conn, send, pace, end)


def setup(cluster: Cluster, subscribers: int, marks: tuple[int, ...],
          latency: bool) -> tuple[Child, dict[str, list[int]], list[Child]]:
    """Start the relay, the subscribers and the publisher; (publisher,
    ``{'middle': [relay pid]}``, subscribers).

    A Queue has nothing to join: the subscribers get every message put after this.
    """
    inbound = cluster.context.Queue()
    outbound = [cluster.context.Queue() for _ in range(subscribers)]
    relay_pid = cluster.start('relay', relay, inbound, outbound).pid
    subs = [cluster.start(f'subscriber {i + 1}', subscriber, queue, marks, latency)
            for i, queue in enumerate(outbound)]
    return cluster.start('publisher', publisher, inbound), {'middle': [relay_pid]}, subs
