#!/usr/bin/env python3
"""Soak test: app processes that subscribe, unsubscribe, send and restart, for a while.

N app processes (spawned, ``--processes``, default 8) connect to one broker started by
``scripts/channels-broker``. Each one sends ``{'n': ..., 'ts': ...}`` to
``soak.<its index>`` at its share of ``--rate`` messages/s (default 10,000 in total),
subscribes one channel for its whole life to the topics of the next ``--fanout``
processes (default 2: every message is handled twice), and subscribes and unsubscribes
channels on topics of its own now and then. Now and then (``--restart-every``, on average) one of them
shuts down gracefully and a fresh one takes its place.

Every process checks exactly-once delivery throughout: for every sender, the numbers
its channel receives must run on without a gap, a repeat or a step back
(a process that starts late starts counting wherever it joins). At the end the script
prints messages delivered, losses, duplicates, latency percentiles (send to handler),
and the RSS of the broker and of each process at the start (after ``--warmup``) and at
the end, and exits 1 if anything was lost or repeated, or (``--check-memory``) if
the broker's or a long-lived process's memory grew by 10% or more.

    python3 scripts/soak.py                       # 60 s, 8 processes, 10,000 msg/s
    python3 scripts/soak.py --duration 5 --processes 4 --rate 2000    # a short run
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def app_main(index: int, address: str, rate: float, conn, seed: int, watched: str) -> None:
    """One app process: subscribe, send at *rate*, check what arrives; report on request."""
    os.environ['CHANNELS_BROKER_ADDRESS'] = address
    import channels
    from channels import Channel

    lock = threading.Lock()
    rng_samples = random.Random(seed)
    last: dict[int, int] = {}
    state = {'delivered': 0, 'losses': 0, 'duplicates': 0, 'latencies': []}

    def on_message(message) -> None:
        data = message.data
        sender, n = data['pid'], data['n']
        with lock:
            state['delivered'] += 1
            previous = last.get(sender)
            if previous is not None:
                if n <= previous:
                    state['duplicates'] += 1
                elif n > previous + 1:
                    state['losses'] += n - previous - 1
            if previous is None or n > previous:
                last[sender] = n
            latency = time.time() - data['ts']
            samples = state['latencies']     # a fixed-size reservoir: flat memory
            if len(samples) < 10_000:
                samples.append(latency)
            else:
                slot = rng_samples.randrange(state['delivered'])
                if slot < 10_000:
                    samples[slot] = latency

    Channel(watched, on_message)
    rng = random.Random(seed)
    extra: list[Channel] = []
    channel = Channel(f'soak.{index}')
    me = os.getpid()
    stop = threading.Event()

    def send_loop() -> None:
        began, n = time.monotonic(), 0
        while not stop.is_set():
            delay = began + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            channel.send({'n': n, 'pid': me, 'ts': time.time()})
            n += 1
            if n % 500 == 0:            # churn: subscribe and unsubscribe topics
                if extra and rng.random() < 0.5:
                    extra.pop(rng.randrange(len(extra))).unsubscribe()
                else:
                    extra.append(Channel(f'private.{me}.{n}', lambda message: None))

    sender = threading.Thread(target=send_loop, name='soak-sender')
    sender.start()
    conn.send(('ready', me))
    while True:
        command = conn.recv()
        if command == 'report':
            with lock:
                conn.send(('report', {key: value for key, value in state.items()
                                      if key != 'latencies'}))
        elif command == 'stop':
            stop.set()
            sender.join(10)
            clean = channels.shutdown(10)
            with lock:
                conn.send(('final', dict(state, clean=clean)))
            return


class App:
    """A running app process and its pipe."""

    def __init__(self, index: int, address: str, rate: float, seed: int, watched: str
                 ) -> None:
        context = multiprocessing.get_context('spawn')
        self.conn, child = context.Pipe()
        self.process = context.Process(target=app_main, args=(index, address, rate, child,
                                                              seed, watched), daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(30):
            raise RuntimeError(f'app process {index} did not start')
        self.pid = self.conn.recv()[1]
        self.started = time.monotonic()

    def rss(self) -> int:
        import psutil
        return psutil.Process(self.pid).memory_info().rss

    def stop(self) -> dict:
        self.conn.send('stop')
        if not self.conn.poll(30):
            raise RuntimeError(f'app process {self.pid} did not stop')
        result = self.conn.recv()[1]
        self.process.join(10)
        return result

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)


def percentile(values: list[float], fraction: float) -> float:
    """The *fraction* percentile of *values* (0 if none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * fraction), len(ordered) - 1)]


def main(argv: list[str] | None = None) -> int:
    """Run the soak test; 0 if nothing was lost or repeated."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--duration', type=float, default=60.0, help='seconds (60)')
    parser.add_argument('--processes', type=int, default=8, help='app processes (8)')
    parser.add_argument('--rate', type=float, default=10_000, help='messages/s in total')
    parser.add_argument('--fanout', type=int, default=2,
                        help='processes that handle each message (2)')
    parser.add_argument('--restart-every', type=float, default=10.0, metavar='S',
                        help='restart a random process every S seconds on average (10)')
    parser.add_argument('--warmup', type=float, default=None,
                        help='seconds before the memory baseline (default: a tenth)')
    parser.add_argument('--check-memory', action='store_true',
                        help='fail if memory grew by 10%% or more after warm-up')
    parser.add_argument('--seed', type=int, default=1)
    args = parser.parse_args(argv)
    import psutil
    rng = random.Random(args.seed)
    directory = tempfile.mkdtemp(prefix='mpchannels-soak-')
    address = os.path.join(directory, 'broker.sock')
    broker = subprocess.Popen([sys.executable, str(ROOT / 'scripts' / 'channels-broker'),
                               '--address', address, '--log-level', 'WARNING'],
                              stdout=subprocess.PIPE)
    apps: list[App] = []
    finals: list[dict] = []
    restarts = 0
    try:
        if not broker.stdout.readline().startswith(b'channels-broker: listening'):
            raise RuntimeError('the broker did not start')
        share = args.rate / args.processes
        fanout = max(1, min(args.fanout, args.processes))

        def watched(i: int) -> str:
            """The topics process *i* handles: those of the next *fanout* processes."""
            others = sorted((i + k) % args.processes for k in range(1, fanout + 1))
            return 'soak.*' if fanout >= args.processes else \
                'soak.[' + ''.join(str(j) for j in others) + ']' if args.processes <= 10 \
                else f'soak.{others[0]}'
        apps = [App(i, address, share, args.seed + i, watched(i))
                for i in range(args.processes)]
        started = time.monotonic()
        warmup = args.warmup if args.warmup is not None else args.duration / 10
        baseline: dict[int, int] = {}
        broker_rss = psutil.Process(broker.pid)
        broker_start = 0
        deadline = started + args.duration
        next_restart = started + rng.expovariate(1 / args.restart_every)
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = time.monotonic()
            if not baseline and now - started >= warmup:
                broker_start = broker_rss.memory_info().rss
                baseline = {app.pid: app.rss() for app in apps}
            if now >= next_restart and now < deadline - 1:
                victim = rng.randrange(len(apps))
                finals.append(apps[victim].stop())
                apps[victim] = App(victim, address, share, args.seed + 100 + restarts,
                                   watched(victim))
                restarts += 1
                next_restart = now + rng.expovariate(1 / args.restart_every)
        broker_end = broker_rss.memory_info().rss
        ends = {app.pid: app.rss() for app in apps}
        finals.extend(app.stop() for app in apps)
        long_lived = [pid for pid in ends if pid in baseline]
    finally:
        for app in apps:
            app.kill()
        if broker.poll() is None:
            broker.send_signal(signal.SIGTERM)
            try:
                broker.wait(15)
            except subprocess.TimeoutExpired:
                broker.kill()
                broker.wait(5)
        broker.stdout.close()
        shutil.rmtree(directory, ignore_errors=True)     # the socket and its .peers file
    delivered = sum(f['delivered'] for f in finals)
    losses = sum(f['losses'] for f in finals)
    duplicates = sum(f['duplicates'] for f in finals)
    latencies = [x for f in finals for x in f['latencies']]
    unclean = sum(1 for f in finals if not f['clean'])
    print(f'soak: {args.duration:.0f} s, {args.processes} processes, {args.rate:,.0f} msg/s '
          f'sent in total, each handled by {fanout}, {restarts} restarts')
    print(f'delivered {delivered:,} messages to the checking channels; losses {losses}, '
          f'duplicates or reorders {duplicates}; shutdowns that timed out {unclean}')
    print(f'latency send -> handler: p50 {percentile(latencies, 0.5) * 1e6:,.0f} µs, '
          f'p99 {percentile(latencies, 0.99) * 1e6:,.0f} µs, '
          f'max {max(latencies, default=0) * 1e6:,.0f} µs')
    growth = []
    if baseline:
        broker_growth = broker_end / broker_start - 1
        growth.append(broker_growth)
        print(f'broker RSS: {broker_start / 2**20:.1f} MiB after warm-up -> '
              f'{broker_end / 2**20:.1f} MiB at the end ({broker_growth:+.1%})')
        for pid in long_lived:
            change = ends[pid] / baseline[pid] - 1
            growth.append(change)
            print(f'app {pid} RSS: {baseline[pid] / 2**20:.1f} -> {ends[pid] / 2**20:.1f} '
                  f'MiB ({change:+.1%})')
        if long_lived:
            print(f'apps alive throughout: median RSS change '
                  f'{statistics.median(growth[1:]):+.1%}')
    failed = losses > 0 or duplicates > 0
    if args.check_memory and any(g >= 0.10 for g in growth):
        print('memory grew by 10% or more after warm-up')
        failed = True
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
