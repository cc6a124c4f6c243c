"""The second reference across processes: ZeroMQ's C proxy between XSUB and XPUB.

``zmq.proxy`` between an XSUB and an XPUB socket on ``ipc://``; the publisher's PUB
sends ``[topic, pickled dict]``, each SUB unpickles. High-water marks are off, so
nothing is dropped. The measured loops are the ones below, inline.
"""

from __future__ import annotations

import os
import pickle
import time
from multiprocessing.connection import Connection

from .cases import CROSS_TOPIC, PAYLOAD
from .procs import Child, Cluster, serve_publisher


def subscriber(conn: Connection, endpoint: str, marks: tuple[int, ...],
               latency: bool) -> None:
    """A subscriber process of the ZeroMQ proxy: SUB, receive and unpickle until END."""
    import zmq
    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)                   # no limit: nothing is dropped
    sock.setsockopt(zmq.SUBSCRIBE, CROSS_TOPIC.encode())
    sock.connect(endpoint)
    at = frozenset(marks)
    total = max(marks)
    loads = pickle.loads
    recv = sock.recv_multipart
    times: list[float] = []
    count = 0
    joined = False
    conn.send(('ready', os.getpid()))
    try:
        while True:
            _, body = recv()
            if len(body) == 1:                       # b'H'ello or b'E'nd, not a message
                if body == b'E':
                    conn.send(('final', count, True))
                    return
                if not joined:
                    joined = True
                    conn.send(('joined',))
                continue
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
        sock.close(linger=0)
        context.term()


def proxy(conn: Connection, front: str, back: str) -> None:
    """The proxy process: ``zmq.proxy(XSUB, XPUB)``, in C, until it is terminated."""
    import zmq
    context = zmq.Context()
    xsub = context.socket(zmq.XSUB)
    xpub = context.socket(zmq.XPUB)
    for sock in (xsub, xpub):
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    xsub.bind(front)
    xpub.bind(back)
    conn.send(('ready', os.getpid()))
    zmq.proxy(xsub, xpub)



def publisher(conn: Connection, endpoint: str) -> None:
    """The publisher process: PUB ``[topic, pickled dict]`` (see ``serve_publisher``)."""
    import zmq
    context = zmq.Context()
    sock = context.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(endpoint)
    topic = CROSS_TOPIC.encode()

    def send(n: int) -> None:
        send_zmq, dumps, protocol = sock.send_multipart, pickle.dumps, pickle.HIGHEST_PROTOCOL
        payload = PAYLOAD
        for _ in range(n):
            send_zmq([topic, dumps(payload, protocol)])

    def pace(n: int, rate: float, started: float) -> None:
        send_zmq, dumps, protocol = sock.send_multipart, pickle.dumps, pickle.HIGHEST_PROTOCOL
        interval, text = 1.0 / rate, PAYLOAD['text']
        for i in range(n):
            delay = started + i * interval - time.time()
            if delay > 0:
                time.sleep(delay)
            send_zmq([topic, dumps({'text': text, 't': time.time()}, protocol)])

    def hello(conn: Connection) -> None:
        while not conn.poll(0.001):
            sock.send_multipart([topic, b'H'])

    def end() -> bool:
        sock.send_multipart([topic, b'E'])
        return True

    try:
        serve_publisher(conn, send, pace, end, hello)
    finally:
        sock.close(linger=2000)
        context.term()


def setup(cluster: Cluster, subscribers: int, marks: tuple[int, ...],
          latency: bool) -> tuple[Child, dict[str, list[int]], list[Child]]:
    """Start the proxy, the subscribers and the publisher; (publisher,
    ``{'middle': [proxy pid]}``, subscribers).

    It returns once every subscriber has seen a hello from the publisher: a SUB that
    connects late misses what was sent before (ZeroMQ's "slow joiner" problem).
    """
    front, back = f'ipc://{cluster.dir}/xsub', f'ipc://{cluster.dir}/xpub'
    middle = cluster.start('proxy', proxy, front, back)
    middle.listens = False                   # zmq.proxy() reads no command: terminate it
    subs = [cluster.start(f'subscriber {i + 1}', subscriber, back, marks, latency)
            for i in range(subscribers)]
    publisher_ = cluster.start('publisher', publisher, front)
    publisher_.send('hello')
    for sub in subs:
        sub.expect('joined', cluster.timeout)
    return publisher_, {'middle': [middle.pid]}, subs
