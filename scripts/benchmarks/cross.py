"""The cross-process cases, for any system: the measured subprocess of one run.

``run_cross_case()`` runs one case once for one system: it starts that system's
processes (each system's ``setup()``: ``ours``, ``queue_relay``, ``zeromq``), drives
them over their Pipes, and stops them all. The measured loops are in the systems'
modules; here is only the clock around them and the checks of what arrived.
"""

from __future__ import annotations

import signal
import statistics
from collections.abc import Callable
from pathlib import Path

from . import ours, queue_relay, zeromq
from .cases import ROOT, fanout_of
from .procs import CLUSTERS, Child, Cluster, kill_descendants
from .stats import cpu_us, percentiles

Setup = Callable[[Cluster, int, tuple[int, ...], bool], tuple[Child, int, list[Child]]]
SETUPS: dict[str, Setup] = {'ours': ours.setup, 'queue': queue_relay.setup,
                            'zmq': zeromq.setup}
"""Each system's ``setup(cluster, subscribers, marks, latency)``: (publisher, middle's
pid, subscribers), once every subscriber is known to the middle (broker, relay, proxy)."""


def _setup_system(cluster: Cluster, system: str, subscribers: int, marks: tuple[int, ...],
                  latency: bool) -> tuple[Child, int, list[Child]]:
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
    if system == 'ours':
        for sub in subs:
            sub.send('finish')
    finals = [sub.expect('final', timeout) for sub in subs]
    for sub, final in zip(subs, finals):
        if not final[2]:
            cluster.warnings.append(f'channels.shutdown() returned False in {sub.name}')
    return [final[1] for final in finals]


def cross_throughput(system: str, subscribers: int, sizes: dict) -> dict:
    """Case 5: one publisher process sends in a loop to *subscribers* processes."""
    warmup = sizes['cross_warmup']
    count = sizes['cross_messages'] if subscribers == 1 else sizes['fanout_messages']
    timeout = sizes['timeout']
    with Cluster(timeout) as cluster:
        publisher, middle, subs = _setup_system(cluster, system, subscribers,
                                                (warmup, warmup + count), False)
        publisher.send('send', warmup)
        publisher.expect('sent', timeout)
        for sub in subs:
            sub.expect('mark', timeout)
        sub_pids = [sub.pid for sub in subs]
        pids = [publisher.pid, middle, *sub_pids]
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
            'cpu_us': {'publisher': cpu_us(before, after, [publisher.pid], count),
                       'middle': cpu_us(before, after, [middle], count),
                       'subscriber': cpu_us(before, after, sub_pids, count)}}


def cross_latency(system: str, sizes: dict) -> dict:
    """Case 6: 1 -> 1 at a steady rate; the latency of every message after the warm-up."""
    rate, timeout = sizes['latency_rate'], sizes['timeout']
    warmup = round(rate * sizes['latency_warmup'])
    count = round(rate * sizes['latency_seconds'])
    with Cluster(timeout) as cluster:
        publisher, middle, subs = _setup_system(cluster, system, 1, (warmup + count,), True)
        pids = [publisher.pid, middle, subs[0].pid]
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
            'cpu_us': {'publisher': cpu_us(before, after, [pids[0]], total),
                       'middle': cpu_us(before, after, [pids[1]], total),
                       'subscriber': cpu_us(before, after, [pids[2]], total)}}




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
    result: dict = {'lib': lib, 'case': case}
    try:
        if case == 'cross_1to1':
            result.update(cross_throughput(lib, 1, sizes))
        elif case == 'cross_1to4':
            result.update(cross_throughput(lib, sizes['fanout'], sizes))
        elif case == 'cross_latency':
            result.update(cross_latency(lib, sizes))
        elif case == 'cross_memory':
            result.update(ours.memory(sizes))
        elif fanout_of(case):
            result.update(cross_throughput(lib, fanout_of(case), sizes))
        else:
            raise ValueError(f'unknown case {case!r}')
    finally:
        kill_descendants()
    warnings = [w for cluster in CLUSTERS for w in cluster.warnings]
    if warnings:
        result['warnings'] = warnings
    return result

