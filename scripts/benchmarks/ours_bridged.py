"""mpchannels across machines: a broker per machine, bridged through Redis or NATS.

Each "machine" is a ``channels-broker`` of its own (its own socket), started with
``--bridge URL`` to the run's own engine (``Cluster.start_engine()``): machine A's
broker serves the publisher process, B's (and C's) the subscriber processes. The app
processes are those of :mod:`benchmarks.ours`, unchanged (``send()`` in a loop, a
handler reading ``message.data``): only the broker each one connects to differs.
"""

from __future__ import annotations

import time

from . import ours
from .procs import Child, Cluster

MACHINES = 'BCDEFGH'
"""The machines of the subscribers, one subscriber process each; A is the publisher's."""


def wait_bridged(cluster: Cluster, brokers: list[str]) -> None:
    """Wait until the bridge of every broker in *brokers* is connected to the engine."""
    from channels.cli import fetch_stats
    deadline = time.monotonic() + cluster.timeout
    while True:
        states = {name: (fetch_stats(cluster.address_of(name)).get('bridge') or {})
                  for name in brokers}
        if all(state.get('connected') for state in states.values()):
            return
        if time.monotonic() > deadline:
            down = {name: state.get('last_error') for name, state in states.items()
                    if not state.get('connected')}
            raise TimeoutError(f'the bridges of these brokers are not connected: {down}')
        time.sleep(0.02)


def setup(kind: str, cluster: Cluster, subscribers: int, marks: tuple[int, ...],
          latency: bool) -> tuple[Child, dict[str, list[int]], list[Child]]:
    """Start the engine (*kind*: redis or nats), broker A and one broker and subscriber
    process per other machine, then the publisher on A; (publisher, ``{'broker A':
    [pid], 'broker B': [pid of each receiving broker], 'engine': [pid]}``, subscribers).

    It returns once every bridge is connected and every receiving broker knows its
    subscriber's subscription.
    """
    if subscribers > len(MACHINES):
        raise ValueError(f'at most {len(MACHINES)} subscriber machines, not {subscribers}')
    engine = cluster.start_engine(kind)
    machines = list(MACHINES[:subscribers])
    brokers = {name: cluster.start_broker(name, bridge=engine.url)
               for name in ['A', *machines]}
    wait_bridged(cluster, list(brokers))
    subs = []
    for name in machines:
        sub = cluster.start(f'subscriber on {name}', ours.subscriber, marks, latency,
                            broker=name)
        ours.wait_subscribed(cluster, [sub], broker=name)
        subs.append(sub)
    publisher = cluster.start('publisher on A', ours.publisher, broker='A')
    return publisher, {'broker A': [brokers['A']],
                       'broker B': [brokers[name] for name in machines],
                       'engine': [engine.pid]}, subs


def setup_redis(cluster: Cluster, subscribers: int, marks: tuple[int, ...],
                latency: bool) -> tuple[Child, dict[str, list[int]], list[Child]]:
    """``setup()`` through Redis Streams."""
    return setup('redis', cluster, subscribers, marks, latency)


def setup_nats(cluster: Cluster, subscribers: int, marks: tuple[int, ...],
               latency: bool) -> tuple[Child, dict[str, list[int]], list[Child]]:
    """``setup()`` through NATS JetStream."""
    return setup('nats', cluster, subscribers, marks, latency)
