"""The fan-out cases: many consumers of one topic in one process, ours against by hand.

``run_fanout_case()`` runs one case once for one system, in this process (the measured
subprocess of one run). The consumers all sit in this process, on one event loop (or,
for the plain case, on threads of their own), and all consume one topic:

``listen``
    ours: one ``channels.listen(TOPIC)`` inbox per consumer, consumed with ``async
    for``. By hand: one coroutine ``Channel(TOPIC, fan)`` whose ``fan`` puts each
    message into an ``asyncio.Queue`` per consumer (what a user could write in ten
    lines), each consumer awaiting ``queue.get()``.
``coroutine``
    ours: one ``Channel(TOPIC, handler)`` per consumer, ``handler`` an ``async def``.
    By hand: the same fan-out as above.
``plain``
    ours: one ``Channel(TOPIC, queue.put)`` per consumer, each into its own
    ``queue.Queue``, read by a thread of its own (the Flask/gthread pattern: one thread
    per stream). By hand: one plain channel putting into every ``queue.Queue``.

Every consumer runs the same :class:`Tally` on each message it gets: it counts, and
samples the latency (``time.time() - message.timestamp``) of every 16th delivery. It
does not read ``message.data`` (an inbox's copy is unpickled only when read).

The publisher is a thread of this process, ``Channel(TOPIC).send()`` in a loop, also
through the broker (the message goes to ``channels-broker`` and comes back). It keeps
the system saturated but bounded: it sends while fewer than ``fan_window`` deliveries
are outstanding (sent times consumers, minus delivered), so the latency sampled is the
latency at saturation with that many deliveries queued, for both systems alike.
"""

from __future__ import annotations

import asyncio
import gc
import os
import queue
import threading
import time
from typing import Any

from .cases import FANOUT_CASES, PAYLOAD, ROOT
from .stats import percentiles

TOPIC = 'bench.fanout'
SAMPLE = 16
"""One delivery in this many has its latency sampled (the same ones in both systems)."""


class Tally:
    """What every consumer does with each message: count it, sample its latency, and
    wake the publisher (a thread) when the deliveries reach the mark it waits for; the
    clock stops at the last delivery of the run.

    Called on the event loop, or (:meth:`locked`) by the consumer threads.
    """

    def __init__(self, consumers: int, warmup: int, count: int, window: int,
                 threaded: bool = False) -> None:
        self.consumers = consumers
        self.total = (warmup + count) * consumers        # deliveries of the whole run
        self.timed_from = warmup * consumers             # deliveries of the warm-up
        self.window = window
        self.delivered = 0
        self.sent = 0                                    # messages sent so far
        self.mark = self.total           # the next count that wakes the publisher
        self.samples: list[float] = []
        self.wake = threading.Event()
        self.finished_at = 0.0
        self.lock = threading.Lock() if threaded else None
        self.failure: BaseException | None = None        # a consumer's: the run fails

    def fail(self, error: BaseException) -> None:
        """A consumer failed (its inbox overflowed, say): the publisher stops waiting."""
        self.failure = error
        self.wake.set()

    def __call__(self, message: Any) -> None:
        n = self.delivered = self.delivered + 1
        if not n % SAMPLE and n > self.timed_from:
            self.samples.append(time.time() - message.timestamp)
        if n >= self.mark:
            if n >= self.total:
                self.finished_at = time.perf_counter()
                self.mark = float('inf')
            else:
                self.mark = self.total
            self.wake.set()

    def locked(self, message: Any) -> None:
        """The same, for consumer threads."""
        with self.lock:
            self(message)

    def wait_for(self, deliveries: int, timeout: float) -> None:
        """Wait (on the publisher thread) until *deliveries* have been counted."""
        while self.delivered < deliveries:
            if self.failure is not None:
                raise RuntimeError(f'a consumer failed: {self.failure!r}')
            self.wake.clear()
            self.mark = deliveries
            if self.delivered >= deliveries:
                break
            if not self.wake.wait(timeout):
                raise TimeoutError(f'{self.delivered:,} of {deliveries:,} deliveries '
                                   f'within {timeout:.3g} s')

    def publish(self, send: Any, messages: int, timeout: float) -> None:
        """Send *messages* with *send*, keeping at most the window of deliveries
        outstanding: a step of messages, then wait until it is safe to send the next."""
        consumers = self.consumers
        step = max(1, self.window // 2 // consumers)
        left = messages
        while left:
            n = min(step, left)
            self.wait_for((self.sent + n) * consumers - self.window, timeout)
            for _ in range(n):
                send(PAYLOAD)
            self.sent += n
            left -= n


def _check_ours() -> Any:
    import channels
    from pathlib import Path
    if not Path(channels.__file__).resolve().is_relative_to(ROOT):
        raise RuntimeError(f'imported {channels.__file__}, not this project\'s channels')
    channels.configure(MAX_CHANNEL_MESSAGE_BROKER_THREADS=1, MAX_CHANNEL_TASK_WORKER_THREADS=4)
    return channels


async def _async_case(system: str, kind: str, consumers: int, tally: Tally, sizes: dict,
                      warmup: int, count: int) -> dict:
    """The listen and coroutine cases (and their by-hand fan-out) on the running loop."""
    import channels
    from channels import Channel
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task] = []
    keep: list[Any] = []
    entered = [0]
    all_in = asyncio.Event()
    failures: list[BaseException] = []
    window_messages = max(1, tally.window // consumers)
    maxsize = 10 * window_messages + 100

    def one_more() -> None:
        entered[0] += 1
        if entered[0] == consumers:
            all_in.set()

    if system == 'ours' and kind == 'listen':
        async def consume() -> None:
            try:
                async with channels.listen(TOPIC, maxsize=maxsize,
                                           ready_timeout=sizes['timeout']) as inbox:
                    one_more()
                    async for message in inbox:
                        tally(message)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:        # an overflow, say: the run is an error
                failures.append(exc)
                all_in.set()
                tally.fail(exc)
        tasks = [loop.create_task(consume()) for _ in range(consumers)]
    elif system == 'ours':                       # coroutine handlers
        async def handler(message: Any) -> None:
            tally(message)
        keep = [Channel(TOPIC, handler) for _ in range(consumers)]
        if not await channels.flush_async(sizes['timeout']):
            raise RuntimeError('the subscriptions were not confirmed')
        all_in.set()
    else:                                        # by hand: one coroutine channel, queues
        queues = [asyncio.Queue() for _ in range(consumers)]
        puts = [q.put_nowait for q in queues]

        async def fan(message: Any) -> None:
            for put in puts:
                put(message)

        async def consume(q: asyncio.Queue) -> None:
            while True:
                message = await q.get()
                tally(message)
        tasks = [loop.create_task(consume(q)) for q in queues]
        keep = [Channel(TOPIC, fan)]
        if not await channels.flush_async(sizes['timeout']):
            raise RuntimeError('the subscription was not confirmed')
        all_in.set()
    await asyncio.wait_for(all_in.wait(), sizes['timeout'])
    if failures:
        raise RuntimeError(f'a consumer failed: {failures[0]!r}')
    result = await asyncio.to_thread(_publish, tally, warmup, count, sizes['timeout'])
    if failures:
        raise RuntimeError(f'a consumer failed: {failures[0]!r}')
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in keep:
        channel.unsubscribe()
    return result


def _publish(tally: Tally, warmup: int, count: int, timeout: float) -> dict:
    """The publisher thread: the warm-up, then the timed messages; the figures."""
    from channels import Channel
    send = Channel(TOPIC).send
    tally.publish(send, warmup, timeout)
    tally.wait_for(tally.timed_from, timeout)
    gc.collect()
    started = time.perf_counter()
    tally.publish(send, count, timeout)
    sent = time.perf_counter()
    tally.wait_for(tally.total, timeout)
    elapsed = tally.finished_at - started
    deliveries = count * tally.consumers
    result = {'count': count, 'consumers': tally.consumers, 'deliveries': deliveries,
              'elapsed': elapsed, 'send_loop': sent - started,
              'per_second': deliveries / elapsed, 'delivered': deliveries / elapsed,
              'value': deliveries / elapsed}
    samples = tally.samples
    if len(samples) >= 2:
        cuts = percentiles(samples)
        result.update(p50_us=cuts[49] * 1e6, p99_us=cuts[98] * 1e6, samples=len(samples))
    return result


def _plain_case(system: str, consumers: int, tally: Tally, sizes: dict, warmup: int,
                count: int) -> dict:
    """The plain case: a thread per consumer reading its own queue.Queue."""
    import channels
    from channels import Channel
    queues = [queue.Queue() for _ in range(consumers)]
    stop = object()
    count_one = tally.locked

    def consume(q: queue.Queue) -> None:
        get = q.get
        while True:
            message = get()
            if message is stop:
                return
            count_one(message)

    threads = [threading.Thread(target=consume, args=(q,), daemon=True,
                                name=f'consumer-{n}') for n, q in enumerate(queues)]
    for thread in threads:
        thread.start()
    if system == 'ours':
        keep = [Channel(TOPIC, q.put) for q in queues]
    else:
        puts = [q.put for q in queues]

        def fan(message: Any) -> None:
            for put in puts:
                put(message)
        keep = [Channel(TOPIC, fan)]
    try:
        if not channels.flush(sizes['timeout']):
            raise RuntimeError('the subscriptions were not confirmed')
        return _publish(tally, warmup, count, sizes['timeout'])
    finally:
        for channel in keep:
            channel.unsubscribe()
        for q in queues:
            q.put(stop)
        for thread in threads:
            thread.join(5.0)


def run_fanout_case(system: str, case: str, sizes: dict) -> dict:
    """Measure one fan-out case once for one system (in this process)."""
    kind, which, broker = FANOUT_CASES[case]
    consumers = sizes['fan_consumers'][which]
    deliveries = sizes['fan_plain_deliveries' if kind == 'plain' else 'fan_deliveries']
    count = max(1, deliveries // consumers)
    warmup = max(2, sizes['fan_warmup'] // consumers)
    window = max(sizes['fan_window'], 2 * consumers)
    result: dict = {'lib': system, 'case': case, 'kind': kind, 'broker': broker}
    cluster = None
    if broker:
        from .procs import Cluster
        cluster = Cluster(sizes['timeout'])
    try:
        if cluster is not None:
            cluster.start_broker()        # sets CHANNELS_BROKER_ADDRESS: we connect to it
        channels = _check_ours()
        tally = Tally(consumers, warmup, count, window, threaded=kind == 'plain')
        try:
            if kind == 'plain':
                result.update(_plain_case(system, consumers, tally, sizes, warmup, count))
            else:
                result.update(asyncio.run(_async_case(system, kind, consumers, tally, sizes,
                                                      warmup, count)))
        finally:
            if not channels.shutdown(10.0):
                result.setdefault('warnings', []).append('channels.shutdown() returned False')
        result['pid'] = os.getpid()
    finally:
        if cluster is not None:
            cluster.close()
            if cluster.warnings:
                result.setdefault('warnings', []).extend(cluster.warnings)
    return result
