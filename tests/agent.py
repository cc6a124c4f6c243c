"""The program of a test app process: runs commands sent over a pipe (see brokers.py)."""

from __future__ import annotations

import os
import threading
import time
import traceback
from typing import Any


def run_agent(conn: Any, settings: dict[str, Any]) -> None:
    """Configure channels with *settings*, then answer commands until 'exit'."""
    import channels
    from channels import Channel

    channels.shutdown()                 # a forked child may have inherited a stopped run
    channels.configure(**settings)
    received: dict[str, list] = {}
    subscribed: dict[str, Channel] = {}
    lock = threading.Lock()

    def recorder(topic: str, delay: float):
        def handler(message):
            if delay:
                time.sleep(delay)
            with lock:
                received[topic].append((message.topic, message.data))
        return handler

    def pid() -> int:
        return os.getpid()

    def subscribe(topic: str, delay: float = 0.0) -> None:
        received.setdefault(topic, [])
        subscribed[topic] = Channel(topic, recorder(topic, delay))

    def unsubscribe(topic: str) -> None:
        subscribed.pop(topic).unsubscribe()

    def get_received(topic: str) -> list:
        with lock:
            return list(received.get(topic, []))

    def count(topic: str) -> int:
        """How many messages the channel on *topic* received (cheaper than received)."""
        with lock:
            return len(received.get(topic, []))

    def send(topic: str, data: dict, kwargs: dict) -> str:
        return Channel(topic).send(data, **kwargs).id

    def send_many(topic: str, count: int, start: int, kwargs: dict) -> None:
        channel = Channel(topic)
        me = os.getpid()
        for n in range(start, start + count):
            channel.send({'n': n, 'pid': me}, **kwargs)

    def send_paced(topic: str, count: int, rate: float, start: int, kwargs: dict,
                   every_tenth_not_droppable: bool = False) -> None:
        """Send like send_many, at *rate* messages per second (optionally droppable but
        for every tenth message)."""
        channel = Channel(topic)
        me = os.getpid()
        began = time.monotonic()
        for n in range(start, start + count):
            delay = began + (n - start) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if every_tenth_not_droppable:
                kwargs = {'droppable': n % 10 != 9}
            channel.send({'n': n, 'pid': me}, **kwargs)

    arrivals: dict[str, list] = {}

    def subscribe_arrivals(topic: str) -> None:
        """Subscribe a channel that records (data['n'], time.monotonic()) only."""
        got = arrivals.setdefault(topic, [])

        def handler(message):
            got.append((message.data['n'], time.monotonic()))
        subscribed[topic] = Channel(topic, handler)

    def get_arrivals(topic: str) -> list:
        return list(arrivals.get(topic, []))

    def publish(topic: str, count: int, rate: float, size: int) -> dict:
        """Send {'n': i, 'blob': <size bytes>} for i in range(count) at *rate* per
        second; count the sends refused with BufferFullError (and go on), and track the
        most bytes waiting for the broker's confirmation."""
        from channels.errors import BufferFullError
        channel = Channel(topic)
        blob = b'x' * size
        refused = largest = 0
        began = time.monotonic()
        for n in range(count):
            delay = began + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                channel.send({'n': n, 'blob': blob})
            except BufferFullError:
                refused += 1
            largest = max(largest, channels.runtime.runtime.machinery.link.buffered_bytes)
        return {'refused': refused, 'largest_buffered': largest}

    def link_counters() -> dict:
        """The broker link's connection count and dropped-message counters."""
        link = channels.runtime.runtime.machinery.link
        return {'connections': link._connections, 'unparsed': link.unparsed,
                'duplicates': link.duplicates}

    def connected() -> bool:
        machinery = channels.runtime.runtime.machinery
        return machinery is not None and machinery.link is not None \
            and machinery.link.connected.is_set()

    def running() -> bool:
        return channels.is_running()

    def shutdown(timeout: float = 10.0) -> bool:
        return channels.shutdown(timeout)

    def fork_recorder(topic: str, path: str, count: int, timeout: float) -> int:
        """os.fork(); the child keeps the inherited channels, waits until the one on
        *topic* received *count* messages, writes them to *path* as JSON and exits."""
        child = os.fork()
        if child == 0:
            status = 1
            try:
                import json
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and len(get_received(topic)) < count:
                    time.sleep(0.01)
                with open(path, 'w') as file:
                    json.dump({'pid': os.getpid(), 'received': get_received(topic)}, file)
                channels.shutdown(5)
                status = 0
            finally:
                os._exit(status)
        return child

    def wait_child(pid: int) -> int:
        return os.waitpid(pid, 0)[1]

    def flush(timeout: float = 10.0) -> bool:
        return channels.flush(timeout)

    commands = {'fork_recorder': fork_recorder, 'wait_child': wait_child, 'pid': pid,
                'subscribe': subscribe, 'unsubscribe': unsubscribe, 'flush': flush,
                'received': get_received, 'count': count, 'send': send, 'send_many': send_many,
                'send_paced': send_paced, 'subscribe_arrivals': subscribe_arrivals,
                'arrivals': get_arrivals, 'publish': publish, 'link_counters': link_counters,
                'connected': connected, 'running': running, 'shutdown': shutdown}
    while True:
        try:
            command, args = conn.recv()
        except EOFError:
            break
        if command == 'exit':
            ok = channels.shutdown(10)
            conn.send(('ok', ok))
            break
        try:
            conn.send(('ok', commands[command](*args)))
        except Exception:
            conn.send(('error', traceback.format_exc()))


def send_and_return(settings: dict[str, Any], topic: str, count: int) -> None:
    """A multiprocessing target that sends *count* messages and returns without calling
    shutdown(): whatever it sent must still reach the broker."""
    import channels
    from channels import Channel
    channels.shutdown()
    channels.configure(**settings)
    channel = Channel(topic)
    for n in range(count):
        channel.send({'n': n})
