"""The in-process cases: this project's ``channels`` and Lona's, driven the same way.

``run_case()`` runs one case once for one library, in this process (the measured
subprocess of one run). A :class:`Rig` adapts each library (how to make a channel, how
to start and stop its threads); the measured loops, :func:`time_messages` and
:func:`time_subscribe`, are the same for both, so the counted work is the same.
"""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

from .cases import PAYLOAD, ROOT, SENTINEL_TOPIC, SUBSCRIBE_TOPIC, WILD_TARGET, wildcard

PROBE = 10
"""Messages that tell what one costs, where a case's cost is not known in advance."""


class Counter:
    """A handler that counts its calls and notes the time the expected count is reached.

    It counts under a lock, since Lona may run it on several threads at once; the same
    handler is used for both libraries.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.target = -1
        self.reached = threading.Event()
        self.reached_at = 0.0

    def __call__(self, message: object) -> None:
        with self.lock:
            self.count += 1
            if self.count == self.target:
                self.reached_at = time.perf_counter()
                self.reached.set()

    def expect(self, total: int) -> None:
        """Arm the counter: wait() returns once *total* calls have been counted in all."""
        with self.lock:
            self.reached.clear()
            self.target = total
            if self.count >= total:
                self.reached_at = time.perf_counter()
                self.reached.set()

    def wait(self, timeout: float) -> float:
        """Wait for the expected count; return the ``perf_counter()`` when it was reached."""
        if not self.reached.wait(timeout):
            raise TimeoutError(f'handler saw {self.count} of {self.target} messages '
                               f'within {timeout:.3g}s')
        return self.reached_at


def noop(message: object) -> None:
    """A handler that does nothing (for channels that should never or rarely be called)."""


class Rig:
    """One library's channels, driven the same way: prepare, start, use, stop."""

    label = ''

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.channels: list[object] = []     # keeps every subscribed channel alive
        self.sentinel = Counter()
        self.sentinel_seen = 0

    def channel(self, topic: str, handler: object = None) -> object:
        """A channel of this library; subscribed if *handler* is given."""
        raise NotImplementedError

    def prepare(self, subscriptions: list[tuple[str, object]], events: bool = True) -> None:
        """Subscribe the channels the case needs (not timed).

        With *events* False their internal subscribe events are not routed, where the
        library lets the benchmark skip them (Lona's are always discarded, see
        :class:`LonaRig`).
        """
        self.channels.append(self.channel(SENTINEL_TOPIC, self.sentinel))
        self.channels.extend(self.channel(topic, handler) for topic, handler in subscriptions)

    def start(self) -> None:
        """Start the library's threads, if needed, and let pending internal events pass."""
        self.settle()

    def settle(self) -> None:
        """Send one message to the sentinel channel and wait for it.

        With one broker thread, which routes messages in the order sent, every message
        sent before (internal events included) has been routed once this returns.
        """
        self.sentinel_seen += 1
        self.sentinel.expect(self.sentinel_seen)
        self.channel(SENTINEL_TOPIC).send({})
        self.sentinel.wait(self.timeout)

    def stop(self) -> None:
        """Stop the library's threads."""
        raise NotImplementedError


class OursRig(Rig):
    """This project's ``channels``: 1 broker thread and 4 task threads, started lazily."""

    label = 'ours'

    def __init__(self, timeout: float) -> None:
        super().__init__(timeout)
        import channels
        if not Path(channels.__file__).resolve().is_relative_to(ROOT):
            raise RuntimeError(f'imported {channels.__file__}, not this project\'s channels')
        channels.configure(MAX_CHANNEL_MESSAGE_BROKER_THREADS=1,
                           MAX_CHANNEL_TASK_WORKER_THREADS=4)
        self.module = channels
        self.Channel = channels.Channel

    def channel(self, topic: str, handler: object = None) -> object:
        """A ``channels.Channel``; subscribed if *handler* is given."""
        return self.Channel(topic, handler)

    def prepare(self, subscriptions: list[tuple[str, object]], events: bool = True) -> None:
        """Subscribe; with *events* False, without sending their internal events.

        Every such event is routed like a message: with N empty-prefix patterns
        subscribed it tries all N, so subscribing them costs O(N^2) (minutes for
        10,000 ``*a*a*a*b<i>``). The cases that skip them time messages, not that.
        """
        from channels.runtime import runtime
        if events or not hasattr(runtime, '_send_event'):
            super().prepare(subscriptions)
            return
        runtime._send_event = lambda *args: None       # this instance only, for a moment
        try:
            super().prepare(subscriptions)
        finally:
            del runtime._send_event

    def stop(self) -> None:
        """``channels.shutdown()``."""
        self.module.shutdown(timeout=10.0)


class LonaRig(Rig):
    """Lona's ``lona.channels`` without a server: 1 ``MessageBroker``, 4 ``TaskWorker``s."""

    label = 'lona'

    def __init__(self, timeout: float) -> None:
        super().__init__(timeout)
        import lona.channels as lona_channels
        from concurrent.futures import ThreadPoolExecutor
        self.module = lona_channels
        self.Channel = lona_channels.Channel
        self.Channel._clear_state()
        self.executor = ThreadPoolExecutor(5)
        self.workers: list[object] = []

    def channel(self, topic: str, handler: object = None) -> object:
        """A ``lona.channels.Channel``; subscribed if *handler* is given."""
        return self.Channel(topic, handler)

    def start(self) -> None:
        """Discard the subscribe events queued so far, start the workers, settle."""
        self.module.clear_queue(self.Channel._messages)
        self.workers = [self.module.MessageBroker(None, self.executor, 1.0)] \
            + [self.module.TaskWorker(None, self.executor, 1.0) for _ in range(4)]
        super().start()

    def stop(self) -> None:
        """Shut the workers down, then the executor (the process ends next: no cleanup)."""
        for worker in self.workers:
            worker.shutdown()
        self.executor.shutdown(wait=True)


def time_messages(rig: Rig, topic: str, counter: Counter, warmup: int, count: int,
                  budget: float | None = None) -> dict:
    """Send *warmup*, then *count* messages to *topic*; time the second batch.

    The clock starts before the first ``send()`` and stops in the handler (a
    :class:`Counter` subscribed to *topic*) when it has seen the last message. With a
    *budget* (seconds), ``PROBE`` messages sent first tell what one costs, and the
    warm-up and the timed batch are cut to what fits in a tenth of it and in it (the
    timed batch to ``PROBE`` messages at least): for a case whose cost is not known.
    """
    sender = rig.channel(topic)
    sent = 0
    if budget is not None:
        counter.expect(PROBE)
        probed = time.perf_counter()
        for _ in range(PROBE):
            sender.send(PAYLOAD)
        each = (counter.wait(rig.timeout) - probed) / PROBE
        sent = PROBE
        warmup = PROBE + min(warmup, int(budget / 10 / each))
        count = max(PROBE, min(count, int(budget / each)))
    counter.expect(warmup)
    for _ in range(warmup - sent):
        sender.send(PAYLOAD)
    counter.wait(rig.timeout)
    gc.collect()
    counter.expect(warmup + count)
    send = sender.send
    started = time.perf_counter()
    for _ in range(count):
        send(PAYLOAD)
    sent = time.perf_counter()
    finished = counter.wait(rig.timeout)
    elapsed = finished - started
    return {'count': count, 'elapsed': elapsed, 'send_loop': sent - started,
            'per_second': count / elapsed, 'us_per_message': elapsed / count * 1e6}


def time_subscribe(rig: Rig, count: int, warmup: int, delivered: bool) -> dict:
    """Subscribe *warmup*, then *count* channels to distinct topics; time the second batch.

    The clock starts before the first subscription. If *delivered*, a channel subscribed
    to ``lona.channels.subscribe`` counts the internal events and the clock stops when
    it has seen the last one. If not, nothing subscribes to the events, and the clock
    stops when a message sent after the last ``subscribe()`` has reached its handler:
    with one broker thread, which routes in the order sent, every event has then been
    routed (to no channel).
    """
    rig.prepare([])
    rig.start()
    counter = Counter()
    if delivered:
        counter.expect(1)      # its own subscribe event
        rig.channels.append(rig.channel(SUBSCRIBE_TOPIC, counter))
        counter.wait(rig.timeout)
        counter.expect(1 + warmup)
    rig.channels.extend(rig.channel(f'bench.warm.{i}', noop) for i in range(warmup))
    if delivered:
        counter.wait(rig.timeout)
    else:
        rig.settle()
    topics = [f'bench.sub.{i}' for i in range(count)]
    channel = rig.channel
    made = []
    gc.collect()
    if delivered:
        counter.expect(1 + warmup + count)
    started = time.perf_counter()
    for topic in topics:
        made.append(channel(topic, noop))
    returned = time.perf_counter()
    if delivered:
        finished = counter.wait(rig.timeout)
    else:
        rig.settle()
        finished = rig.sentinel.reached_at
    rig.channels.extend(made)
    return {'elapsed': finished - started, 'calls': returned - started}


def run_case(lib: str, case: str, sizes: dict) -> dict:
    """Measure one case once for one library (in this process); return the result."""
    rig = OursRig(sizes['timeout']) if lib == 'ours' else LonaRig(sizes['timeout'])
    ours = lib == 'ours'
    warmup = sizes['warmup']
    result: dict = {'lib': lib, 'case': case}
    try:
        if case in ('single', 'many'):
            counter = Counter()
            others = sizes['channels'] - 1 if case == 'many' else 0
            rig.prepare([(f'bench.other.{i}', noop) for i in range(others)]
                        + [('bench.topic', counter)])
            rig.start()
            count = sizes['messages'] if ours else \
                sizes['lona_messages'] if case == 'single' else sizes['lona_scan_messages']
            result['size'] = others + 1
            result.update(time_messages(rig, 'bench.topic', counter,
                                        warmup if ours or case == 'single' else 10, count))
            result['value'] = result['per_second']
        elif case in ('wild_few', 'wild_many', 'wild_star_few', 'wild_star_many'):
            counter = Counter()
            star = case.startswith('wild_star_')
            wildcards = sizes['wildcards'][0 if case.endswith('_few') else 1]
            rig.prepare([(wildcard(i, star), noop) for i in range(wildcards)]
                        + [(WILD_TARGET, counter)], events=not star)
            rig.start()
            scans = not ours and case.endswith('_many')
            count = sizes['messages'] if ours else \
                sizes['lona_scan_messages'] if scans else sizes['lona_messages']
            # ours may scan empty-prefix patterns too: time what fits in star_seconds
            budget = sizes['star_seconds'] if ours and case == 'wild_star_many' else None
            result['size'] = wildcards
            result.update(time_messages(rig, WILD_TARGET, counter,
                                        10 if scans else warmup, count, budget))
            result['value'] = result['us_per_message']
        elif case in ('subscribe', 'subscribe_routed'):
            count = sizes['subscriptions'] if ours else sizes['lona_subscriptions']
            result.update(size=count, count=count)
            result.update(time_subscribe(rig, count, min(warmup, count // 10),
                                         delivered=case == 'subscribe'))
            result['value'] = result['elapsed']
        else:
            raise ValueError(f'unknown case {case!r}')
    finally:
        rig.stop()
    if ours:
        result['module'] = rig.module.__file__
    return result
