#!/usr/bin/env python3
"""Bridge throughput and latency, 1 -> 1, through real Redis and NATS servers.

Two :class:`channels.bridge.Bridge` objects in this process stand for the brokers of two
machines; the engine servers are started here on free ports and always stopped. Frames
are MESSAGE frames with 64-byte payloads, published in batches as a broker's routing
thread hands them over. Prints msg/s and p50/p99 latency at a steady rate.

    PYTHONPATH=. python3 scripts/bench_bridge.py [redis|nats ...]
"""

from __future__ import annotations

import statistics
import struct
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'tests'))

from engines import EngineServer  # noqa: E402

from channels import wire  # noqa: E402
from channels.bridge import Bridge  # noqa: E402

MESSAGES = 300_000        # throughput run
BATCH = 64                # frames per publish() in the throughput run
RATE = 2_000              # msg/s in the latency run
SECONDS = 5.0             # length of the latency run
RUNS = 3                  # throughput runs; the median is printed

_STAMP = struct.Struct('!d')


def _frame(stamp: float) -> bytes:
    payload = _STAMP.pack(stamp) + b'x' * 56          # 64 bytes
    return wire.encode_message('chat.room', 'a00000001', 1.0, None, False, payload)


FRAME_SIZE = len(_frame(0.0))


class _Counter:
    def __init__(self) -> None:
        self.count = 0
        self.done = threading.Event()
        self.target = 0
        self.latencies: list[float] | None = None

    def on_frames(self, data: bytes) -> None:
        n = len(data) // FRAME_SIZE
        if self.latencies is not None:
            now = time.perf_counter()
            offset = wire.HEADER.size + wire.MESSAGE_HEADER.size + len('chat.room') + 9
            for i in range(n):
                sent, = _STAMP.unpack_from(data, i * FRAME_SIZE + offset)
                self.latencies.append(now - sent)
        self.count += n
        if self.count >= self.target:
            self.done.set()


def _receiver(url: str, target: int, measure: bool, pipe) -> None:
    """Machine B, in a process of its own: count (and time) what arrives."""
    counter = _Counter()
    counter.target = target
    if measure:
        counter.latencies = []
    b = Bridge.from_url(url, 'bench', broker_id='B', on_frames=counter.on_frames,
                        on_lost=lambda c, r: print('LOST', c, r))
    b.start()
    pipe.send('ready')
    try:
        if counter.done.wait(120):
            pipe.send((time.perf_counter(), counter.latencies))
        else:
            pipe.send((None, counter.count))
    finally:
        b.stop()


def _run(url: str, target: int, measure: bool, send) -> tuple[float, float | None, list]:
    """Start machine B's receiver, call send(bridge A), return (start, end, latencies)."""
    import multiprocessing
    context = multiprocessing.get_context('spawn')
    mine, theirs = context.Pipe()
    child = context.Process(target=_receiver, args=(url, target, measure, theirs))
    child.start()
    a = Bridge.from_url(url, 'bench', broker_id='A', on_frames=lambda d: None,
                        on_lost=lambda c, r: print('LOST', c, r))
    a.start()
    try:
        if not mine.poll(30) or mine.recv() != 'ready':
            raise RuntimeError('the receiver did not start')
        started = time.perf_counter()
        send(a)
        if not mine.poll(150):
            raise RuntimeError('the receiver did not finish')
        ended, latencies = mine.recv()
        if ended is None:
            raise RuntimeError(f'only {latencies} of {target} arrived')
        return started, ended, latencies
    finally:
        a.stop()
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()


def throughput(url: str) -> float:
    """msg/s of publish (machine A) -> on_frames (machine B) for MESSAGES messages."""
    batch = _frame(0.0) * BATCH
    calls = MESSAGES // BATCH

    def send(a: Bridge) -> None:
        for _ in range(calls):
            a.publish(batch, BATCH)

    started, ended, _ = _run(url, calls * BATCH, False, send)
    return calls * BATCH / (ended - started)


def latency(url: str) -> tuple[float, float, float]:
    """(p50, p99, max) seconds at RATE msg/s, one message per publish()."""
    total = int(RATE * SECONDS)
    interval = 1.0 / RATE

    def send(a: Bridge) -> None:
        start = time.perf_counter()
        for i in range(total):
            left = start + i * interval - time.perf_counter()
            if left > 0:       # sleep, never spin: a spinning thread holds the GIL
                time.sleep(left)
            a.publish(_frame(time.perf_counter()), 1)

    _, _, latencies = _run(url, total, True, send)
    samples = sorted(latencies[RATE // 2:])      # half a second of warm-up
    return statistics.median(samples), samples[int(len(samples) * 0.99)], samples[-1]


def main(kinds: list[str]) -> None:
    for kind in kinds:
        server = EngineServer(kind)
        server.start()
        try:
            rates = sorted(throughput(server.url) for _ in range(RUNS))
            p50, p99, worst = latency(server.url)
        finally:
            server.stop()
        print(f'{kind:6} 1 -> 1: {rates[len(rates) // 2]:>9,.0f} msg/s (runs: '
              f'{", ".join(f"{r:,.0f}" for r in rates)});  at {RATE} msg/s: '
              f'p50 {p50 * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms, max {worst * 1e3:.1f} ms')


if __name__ == '__main__':
    main(sys.argv[1:] or ['redis', 'nats'])
