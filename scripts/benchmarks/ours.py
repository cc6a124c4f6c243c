"""mpchannels across processes: its subscriber and publisher processes, through a broker.

The broker is the real ``channels-broker`` (``Cluster.start_broker()``); the other
processes are forked from the runner, as a pre-forking server forks its workers, and
use ``channels`` as an app does. The measured loops are the ones below, inline: the
publisher's ``send()`` in a loop, the subscriber's handler reading ``message.data``.
"""

from __future__ import annotations

import os
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from .cases import CROSS_TOPIC, PAYLOAD
from .procs import Child, Cluster, serve_publisher


def subscriber(conn: Connection, marks: tuple[int, ...], latency: bool) -> None:
    """A subscriber process of ours: one channel on CROSS_TOPIC, through the broker."""
    import channels
    from channels import Channel
    total = max(marks)
    times: list[float] = []
    state = [0]
    if latency:
        def handler(message: Any) -> None:
            now = time.time()
            message.data                      # noqa: B018 (unpickled, as the others do)
            times.append(now - message.timestamp)
            if len(times) == total:
                conn.send(('latency', times))
    else:
        at = frozenset(marks)

        def handler(message: Any) -> None:
            message.data                      # noqa: B018 (unpickled, as the others do)
            n = state[0] = state[0] + 1       # a channel's handler never runs concurrently
            if n in at:
                conn.send(('mark', n, time.time()))
    channel = Channel(CROSS_TOPIC, handler)
    conn.send(('ready', os.getpid()))
    while True:
        command = conn.recv()
        if command[0] == 'finish':        # the publisher has flushed: shut down, count
            drained = channels.shutdown(10.0)
            conn.send(('final', len(times) if latency else state[0], drained))
        elif command[0] == 'exit':
            channels.shutdown(5.0)
            del channel
            return


def publisher(conn: Connection) -> None:
    """The publisher process: ``Channel(CROSS_TOPIC).send()`` (see ``serve_publisher``)."""
    import channels
    from channels import Channel
    channel = Channel(CROSS_TOPIC)

    def send(n: int) -> None:
        send_one, payload = channel.send, PAYLOAD
        for _ in range(n):
            send_one(payload)

    def pace(n: int, rate: float, started: float) -> None:
        send_one, payload, interval = channel.send, PAYLOAD, 1.0 / rate
        for i in range(n):
            delay = started + i * interval - time.time()
            if delay > 0:
                time.sleep(delay)
            send_one(payload)             # message.timestamp is the send time

    serve_publisher(conn, send, pace, end=lambda: channels.shutdown(10.0))


def wait_subscribed(cluster: Cluster, subs: list[Child], broker: str = 'broker') -> None:
    """Wait until the broker called *broker* knows that every one of *subs* subscribes."""
    from channels.cli import fetch_stats
    deadline = time.monotonic() + cluster.timeout
    pids = [sub.pid for sub in subs]
    while True:
        known = {p['pid'] for p in fetch_stats(cluster.address_of(broker))['processes']
                 if CROSS_TOPIC in p['subscriptions']}
        if known >= set(pids):
            return
        for sub in subs:
            if sub.conn.poll():                 # it reports something: an error?
                sub.expect('nothing yet', 0)
        if time.monotonic() > deadline:
            raise TimeoutError(f'the broker knows the subscriptions of {sorted(known)}, '
                               f'not of all of {sorted(pids)}')
        time.sleep(0.02)


def setup(cluster: Cluster, subscribers: int, marks: tuple[int, ...],
          latency: bool) -> tuple[Child, dict[str, list[int]], list[Child]]:
    """Start the broker, the subscribers and the publisher; (publisher,
    ``{'middle': [broker pid]}``, subscribers).

    It returns once the broker knows every subscriber's subscription.
    """
    broker = cluster.start_broker()
    subs = [cluster.start(f'subscriber {i + 1}', subscriber, marks, latency)
            for i in range(subscribers)]
    wait_subscribed(cluster, subs)
    return cluster.start('publisher', publisher), {'middle': [broker]}, subs


def _noop(message: object) -> None:
    """The handler of the memory case's channels, which get no message."""


def many_subscriptions(conn: Connection) -> None:
    """The app process of the memory case: subscribes many channels on distinct topics.

    A channel on ``bench.echo`` receives what this process sends there: the broker
    applies a process's subscriptions and routes its messages in the order they were
    sent, so once the echo is back every earlier subscription is in the broker.
    """
    import channels
    from channels import Channel
    echoed = threading.Event()
    echo = Channel('bench.echo', lambda message: echoed.set())
    kept: list[Any] = [echo]

    def round_trip() -> float:
        echoed.clear()
        Channel('bench.echo').send({})
        if not echoed.wait(60.0):
            raise TimeoutError('the echo message did not come back within 60 s')
        return time.time()

    round_trip()
    conn.send(('ready', os.getpid()))
    while True:
        command = conn.recv()
        if command[0] == 'subscribe':
            started = time.time()
            kept.extend(Channel(f'bench.sub.{i}', _noop) for i in range(command[1]))
            returned = time.time()
            conn.send(('subscribed', started, returned, round_trip()))
        elif command[0] == 'exit':
            channels.shutdown(5.0)
            return


def memory(sizes: dict) -> dict:
    """Case 7: the broker's RSS growth while one process subscribes N distinct topics."""
    import psutil
    from channels.cli import fetch_stats
    count, timeout = sizes['cross_subscriptions'], sizes['timeout']
    with Cluster(timeout) as cluster:
        broker = psutil.Process(cluster.start_broker())
        app = cluster.start('app', many_subscriptions)
        rss_before = broker.memory_info().rss
        cpu_before = cluster.cpu([broker.pid])
        app.send('subscribe', count)
        _, started, returned, echoed = app.expect('subscribed', timeout)
        rss_after = broker.memory_info().rss
        cpu_after = cluster.cpu([broker.pid])
        topics = fetch_stats(cluster.address, timeout=timeout)['topics']   # once: it is big
    if topics != count + 1:
        raise RuntimeError(f'the broker has {topics} topics, not {count} + bench.echo')
    return {'count': count, 'topics': topics, 'rss_before': rss_before, 'rss_after': rss_after,
            'value': (rss_after - rss_before) / count,
            'subscribe_calls': returned - started, 'subscribe_known': echoed - started,
            'broker_cpu_us': (cpu_after[broker.pid] - cpu_before[broker.pid]) / count * 1e6}
