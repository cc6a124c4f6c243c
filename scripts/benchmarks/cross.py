"""The cross-process and bridged cases, for any system: the measured subprocess of one run.

``run_cross_case()`` runs one case once for one system: it starts that system's
processes (each system's ``setup()``: ``ours``, ``queue_relay``, ``zeromq`` on one
machine; ``ours_bridged``, ``socketio_redis``, ``broadcaster_stream``, ``nats_core``
across machines), drives them over their Pipes, and stops them all. The measured loops
are in the systems' modules; here is only the clock around them and the checks of what
arrived.
"""

from __future__ import annotations

import signal
import statistics
from collections.abc import Callable
from pathlib import Path

from . import broadcaster_stream, nats_core, ours, ours_bridged, queue_relay, socketio_redis, \
    zeromq
from .cases import BRIDGED_ENGINES, OURS_SYSTEMS, ROOT, bridged_count, bridged_fanout, fanout_of
from .procs import CLUSTERS, Child, Cluster, kill_descendants
from .stats import cpu_us, percentiles

Middles = dict[str, list[int]]
Setup = Callable[[Cluster, int, tuple[int, ...], bool], tuple[Child, Middles, list[Child]]]
SETUPS: dict[str, Setup] = {'ours': ours.setup, 'queue': queue_relay.setup,
                            'zmq': zeromq.setup, 'ours_redis': ours_bridged.setup_redis,
                            'ours_nats': ours_bridged.setup_nats,
                            'socketio': socketio_redis.setup,
                            'broadcaster': broadcaster_stream.setup, 'nats_core': nats_core.setup}
"""Each system's ``setup(cluster, subscribers, marks, latency)``: (publisher, middles,
subscribers), once every subscriber is known to the middle (broker, relay, proxy,
engine). *middles* names the pids of each role between them: ``{'middle': [pid]}`` on
one machine; across machines ``{'broker A': [pid], 'brokers B': [pid, ...], 'engine':
[pid]}`` (the pattern systems have only an engine)."""


def _setup_system(cluster: Cluster, system: str, subscribers: int, marks: tuple[int, ...],
                  latency: bool) -> tuple[Child, Middles, list[Child]]:
    """Start *system*'s middle, subscribers and publisher (see ``SETUPS``)."""
    if system not in SETUPS:
        raise ValueError(f'unknown system {system!r}')
    return SETUPS[system](cluster, subscribers, marks, latency)


def _finish(cluster: Cluster, system: str, publisher: Child, subs: list[Child],
            timeout: float) -> list[int]:
    """End the stream; every subscriber's final count of messages.

    A ``channels.shutdown()`` that returns False (it did not drain in time) is noted
    in ``cluster.warnings``.
    """
    publisher.send('end')
    if not publisher.expect('ended', timeout)[1]:
        cluster.warnings.append('channels.shutdown() returned False in the publisher')
    if system in OURS_SYSTEMS:
        for sub in subs:
            sub.send('finish')
    finals = [sub.expect('final', timeout) for sub in subs]
    for sub, final in zip(subs, finals):
        if not final[2]:
            cluster.warnings.append(f'channels.shutdown() returned False in {sub.name}')
    return [final[1] for final in finals]


def _cpu_split(before: dict[int, float], after: dict[int, float], publisher: Child,
               middles: Middles, subs: list[Child], messages: int) -> dict[str, float]:
    """CPU µs per message of the publisher, each middle role and (each) subscriber."""
    return {'publisher': cpu_us(before, after, [publisher.pid], messages),
            **{role: cpu_us(before, after, pids, messages) for role, pids in middles.items()},
            'subscriber': cpu_us(before, after, [sub.pid for sub in subs], messages)}


def cross_throughput(system: str, subscribers: int, count: int, warmup: int,
                     sizes: dict) -> dict:
    """Case 5 (and the bridged 1 -> N): a publisher sends *count* messages in a loop to
    *subscribers* processes, after *warmup* more."""
    timeout = sizes['timeout']
    with Cluster(timeout) as cluster:
        publisher, middles, subs = _setup_system(cluster, system, subscribers,
                                                 (warmup, warmup + count), False)
        publisher.send('send', warmup)
        publisher.expect('sent', timeout)
        for sub in subs:
            sub.expect('mark', timeout)
        pids = [publisher.pid, *(pid for group in middles.values() for pid in group),
                *(sub.pid for sub in subs)]
        before = cluster.cpu(pids)
        publisher.send('send', count)
        _, started, sent = publisher.expect('sent', timeout)
        try:
            ends = [sub.expect('mark', timeout)[2] for sub in subs]
        except TimeoutError as exc:
            try:
                got = f'the subscribers got {_finish(cluster, system, publisher, subs, 5.0)}'
            except Exception as again:
                got = f'then ending the stream failed: {again}'
            raise RuntimeError(f'{exc}; {got} of {warmup + count} messages') from None
        after = cluster.cpu(pids)
        counts = _finish(cluster, system, publisher, subs, timeout)
    if any(n != warmup + count for n in counts):
        raise RuntimeError(f'the subscribers got {counts} messages, not {warmup + count} each')
    elapsed = max(ends) - started
    rate = count / elapsed
    return {'count': count, 'subscribers': subscribers, 'elapsed': elapsed,
            'send_loop': sent - started, 'per_second': rate, 'delivered': rate * subscribers,
            'value': rate * subscribers, 'counts': counts,
            'cpu_us': _cpu_split(before, after, publisher, middles, subs, count)}


def cross_latency(system: str, sizes: dict) -> dict:
    """Case 6: 1 -> 1 at a steady rate; the latency of every message after the warm-up."""
    rate, timeout = sizes['latency_rate'], sizes['timeout']
    warmup = round(rate * sizes['latency_warmup'])
    count = round(rate * sizes['latency_seconds'])
    with Cluster(timeout) as cluster:
        publisher, middles, subs = _setup_system(cluster, system, 1, (warmup + count,), True)
        pids = [publisher.pid, *(pid for group in middles.values() for pid in group),
                subs[0].pid]
        before = cluster.cpu(pids)
        publisher.send('pace', warmup + count, rate)
        _, started, sent = publisher.expect('sent', (warmup + count) / rate + timeout)
        times = subs[0].expect('latency', timeout)[1]
        after = cluster.cpu(pids)
        counts = _finish(cluster, system, publisher, subs, timeout)
    if counts != [warmup + count]:
        raise RuntimeError(f'the subscriber got {counts[0]} messages, not {warmup + count}')
    latencies = times[warmup:]
    cuts = percentiles(latencies)
    total = warmup + count
    return {'count': count, 'rate': total / (sent - started),
            'samples_us': [round(x * 1e6, 1) for x in latencies],
            'p50_us': cuts[49] * 1e6, 'p99_us': cuts[98] * 1e6,
            'max_us': max(latencies) * 1e6, 'mean_us': statistics.fmean(latencies) * 1e6,
            'value': cuts[49] * 1e6,
            'cpu_us': _cpu_split(before, after, publisher, middles, subs, total)}


def run_cross_case(lib: str, case: str, sizes: dict) -> dict:
    """Measure one cross-process case once for one system (the processes are ours)."""
    def on_sigterm(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)     # once: let the cleanup run
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    import channels
    if not Path(channels.__file__).resolve().is_relative_to(ROOT):
        raise RuntimeError(f'imported {channels.__file__}, not this project\'s channels')
    if lib == 'zmq':
        import zmq  # noqa: F401  (fail early and clearly: pip install -e '.[bench]')
    engine = BRIDGED_ENGINES.get(lib)
    if engine == 'redis':
        import redis  # noqa: F401  (fail early and clearly: pip install -e '.[redis]')
    elif engine == 'nats':
        import nats  # noqa: F401  (pip install -e '.[nats]')
    result: dict = {'lib': lib, 'case': case}
    warmup, messages = sizes['cross_warmup'], sizes['cross_messages']
    try:
        if case == 'cross_1to1':
            result.update(cross_throughput(lib, 1, messages, warmup, sizes))
        elif case == 'cross_1to4':
            result.update(cross_throughput(lib, sizes['fanout'], sizes['fanout_messages'],
                                           warmup, sizes))
        elif case in ('cross_latency', 'bridged_latency'):
            result.update(cross_latency(lib, sizes))
        elif case == 'cross_memory':
            result.update(ours.memory(sizes))
        elif bridged_fanout(case):
            machines = bridged_fanout(case)
            result.update(cross_throughput(lib, machines, bridged_count(lib, machines, sizes),
                                           sizes['bridged_warmup'], sizes))
        elif fanout_of(case):
            count = messages if fanout_of(case) == 1 else sizes['fanout_messages']
            result.update(cross_throughput(lib, fanout_of(case), count, warmup, sizes))
        else:
            raise ValueError(f'unknown case {case!r}')
    finally:
        kill_descendants()
    warnings = [w for cluster in CLUSTERS for w in cluster.warnings]
    if warnings:
        result['warnings'] = warnings
    return result

