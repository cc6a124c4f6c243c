#!/usr/bin/env python3
"""Benchmark ``channels`` (this project) against Lona 1.16.2's ``lona.channels``.

What it measures, for both libraries on the same machine, in one run:

1. **1 subscriber**: messages/s from the first ``send()`` until the handler has seen
   all of them. The messages (a 48-character string in a dict, ``PAYLOAD``) are sent
   in a loop from the main thread; the clock stops in the handler, at the last one.
2. **10,000 channels**: the same, with 10,000 channels subscribed to distinct plain
   topics, of which one matches the topic sent to.
3. **Subscribe**: the time to subscribe 100,000 channels to distinct topics, until the
   internal ``lona.channels.subscribe`` events are delivered too: a channel subscribed
   to that topic counts them, and the clock stops when it has seen all of them. A
   second variant has no channel on that topic, and stops the clock when a message
   sent after the last ``subscribe()`` has reached its handler: with one broker thread,
   which routes messages in the order sent, every event has then been routed.
4. **Wildcards**: the time per message (as in 1) with 10 and with 10,000 wildcard
   subscriptions with distinct literal prefixes (``room.<i>.*``), none of which matches
   the topic sent to (``room.target``), plus one plain channel that does.

Both libraries run 1 message-broker thread and 4 task-worker threads, and every
handler that counts takes a lock (Lona runs the handlers of one channel on several
threads at once); the counted work is the same for both. Each measured run is one
fresh subprocess of this script (``--one LIB.CASE``, which prints a JSON result), so
the state and the garbage of one run do not leak into the next: its setup (not timed)
subscribes the channels a case needs and lets their internal events pass, then a
warm-up, then one timed run. Every case runs ``RUNS`` times; the table shows the
median, and the goals of the project next to the figures they are about.

Lona routes a message by testing every subscribed topic, and every subscription is an
internal message that does the same, so its 10,000-topic cases and its subscribe case
are scaled down (fewer messages, fewer subscriptions) to take seconds, not hours; the
table says where. Lona's channels are subscribed before its worker threads start and
their queued internal events are discarded, so its setup stays fast too.

Usage::

    PYTHONPATH=. python scripts/bench.py             # full run, a text table
    PYTHONPATH=. python scripts/bench.py --markdown  # a Markdown table for the README
    PYTHONPATH=. python scripts/bench.py --quick     # small sizes: a smoke test (< 20 s)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# knobs ------------------------------------------------------------------------------

PAYLOAD = {'text': 'x' * 48}
"""The data of every message sent: a small dict, about 64 bytes of payload."""

FULL = {
    'runs': 3,                    # measured runs per case and library; the median is shown
    'warmup': 2_000,              # messages sent (or channels subscribed) before timing
    'messages': 100_000,          # ours: messages per run, in every message case
    'lona_messages': 50_000,      # Lona: messages per run, 1 subscriber and 10 wildcards
    'lona_scan_messages': 100,    # Lona: messages per run where it scans 10,000 topics
    'channels': 10_000,           # case 2: channels on distinct topics (one matches)
    'subscriptions': 100_000,     # case 3, ours
    'lona_subscriptions': 1_000,  # case 3, Lona: O(N^2), see the module docstring
    'wildcards': (10, 10_000),    # case 4: wildcard subscriptions, none matching
    'timeout': 60.0,              # seconds one run (one subprocess) may take
}
QUICK = {
    'runs': 1,
    'warmup': 500,
    'messages': 10_000,
    'lona_messages': 5_000,
    'lona_scan_messages': 10,
    'channels': 10_000,
    'subscriptions': 20_000,
    'lona_subscriptions': 300,
    'wildcards': (10, 10_000),
    'timeout': 15.0,
}

LIBS = ('ours', 'lona')
CASES = ('single', 'many', 'subscribe', 'subscribe_routed', 'wild_few', 'wild_many')
LONA_VERSION = '1.16.2'
ROOT = Path(__file__).resolve().parent.parent
SENTINEL_TOPIC = 'bench.sentinel'
SUBSCRIBE_TOPIC = 'lona.channels.subscribe'


# helpers used in the measured subprocess --------------------------------------------

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

    def prepare(self, subscriptions: list[tuple[str, object]]) -> None:
        """Subscribe the channels the case needs (not timed)."""
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


def time_messages(rig: Rig, topic: str, counter: Counter, warmup: int, count: int) -> dict:
    """Send *warmup*, then *count* messages to *topic*; time the second batch.

    The clock starts before the first ``send()`` and stops in the handler (a
    :class:`Counter` subscribed to *topic*) when it has seen the last message.
    """
    sender = rig.channel(topic)
    counter.expect(warmup)
    for _ in range(warmup):
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
        elif case in ('wild_few', 'wild_many'):
            counter = Counter()
            wildcards = sizes['wildcards'][0 if case == 'wild_few' else 1]
            rig.prepare([(f'room.{i}.*', noop) for i in range(wildcards)]
                        + [('room.target', counter)])
            rig.start()
            scans = not ours and case == 'wild_many'
            count = sizes['messages'] if ours else \
                sizes['lona_scan_messages'] if scans else sizes['lona_messages']
            result['size'] = wildcards
            result.update(time_messages(rig, 'room.target', counter,
                                        10 if scans else warmup, count))
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


# the parent: runs the subprocesses and prints the table -----------------------------

def run_child(lib: str, case: str, quick: bool, timeout: float) -> dict:
    """Run ``--one LIB.CASE`` in a fresh subprocess; return its JSON result.

    On a failure or a timeout the result holds ``error``; the child is always killed
    if it is still running when this returns.
    """
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [str(ROOT)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    command = [sys.executable, str(Path(__file__).resolve()), '--one', f'{lib}.{case}']
    if quick:
        command.append('--quick')
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=str(ROOT))
    try:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            return {'error': f'timed out after {timeout:.3g} s'}
        if process.returncode != 0:
            last = (err.strip().splitlines() or ['?'])[-1]
            return {'error': f'exit {process.returncode}: {last}'}
        return json.loads(out.strip().splitlines()[-1])
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def measure(sizes: dict, quick: bool, progress: bool) -> dict:
    """Run every case for both libraries ``runs`` times; return ``{(lib, case): [result]}``."""
    results: dict = {}
    for case in CASES:
        for lib in LIBS:
            runs = []
            for n in range(sizes['runs']):
                if progress:
                    print(f'  {lib:4} {case:16} run {n + 1}/{sizes["runs"]}',
                          file=sys.stderr, flush=True)
                runs.append(run_child(lib, case, quick, sizes['timeout'] + 15))
            results[lib, case] = runs
    return results


def median(runs: list[dict], key: str = 'value') -> float | None:
    """The median of *key* over the successful runs, or None if none succeeded."""
    values = [run[key] for run in runs if 'error' not in run]
    return statistics.median(values) if values else None


def build_rows(results: dict, sizes: dict) -> tuple[list[list[str]], list[str]]:
    """The table's rows (as strings) and the notes under it."""
    def value(lib: str, case: str) -> float | None:
        return median(results[lib, case])

    def rate(x: float | None) -> str:
        return '-' if x is None else f'{x:,.0f} msg/s'

    def us(x: float | None) -> str:
        return '-' if x is None else f'{x:,.1f} µs/msg'

    def ratio(x: float | None) -> str:
        if x is None:
            return '-'
        return f'{x:.3g}x' if x < 0.1 else f'{x:.2f}x' if x < 100 else f'{x:,.0f}x'

    def div(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    def met(ok: bool | None) -> str:
        return '?' if ok is None else 'yes' if ok else 'NO'

    channels, (few, many) = sizes['channels'], sizes['wildcards']
    lona_scan = sizes['lona_scan_messages']
    rows = []

    single_o, single_l = value('ours', 'single'), value('lona', 'single')
    speed = div(single_o, single_l)
    rows.append(['1 subscriber: throughput', rate(single_o), rate(single_l), ratio(speed),
                 '>= 2x Lona', met(None if speed is None else speed >= 2)])

    many_o, many_l = value('ours', 'many'), value('lona', 'many')
    rows.append([f'{channels:,} channels, 1 matching: throughput', rate(many_o),
                 rate(many_l) + ('' if many_l is None else f' ({lona_scan} msgs)'),
                 ratio(div(many_o, many_l)), '', ''])
    keep = div(many_o, single_o)
    rows.append([f'  {channels:,} channels vs 1 subscriber', ratio(keep),
                 ratio(div(many_l, single_l)), '', '>= 0.8x (ours)',
                 met(None if keep is None else keep >= 0.8)])

    n_o, n_l = sizes['subscriptions'], sizes['lona_subscriptions']
    for case, what in (('subscribe', 'events delivered to a handler'),
                       ('subscribe_routed', 'events routed, no handler')):
        sub_o, sub_l = value('ours', case), value('lona', case)
        goal = case == 'subscribe'
        rows.append([f'subscribe {n_o:,} channels, {what}',
                     '-' if sub_o is None else f'{sub_o:.2f} s',
                     '-' if sub_l is None else f'{sub_l:.2f} s for {n_l:,} only',
                     '-',
                     '' if not goal else '< 2 s' if n_o == 100_000 else '(< 2 s for 100,000)',
                     '' if not goal else met(None if sub_o is None or n_o != 100_000
                                             else sub_o < 2.0)])

    few_o, few_l = value('ours', 'wild_few'), value('lona', 'wild_few')
    many_wo, many_wl = value('ours', 'wild_many'), value('lona', 'wild_many')
    rows.append([f'{few:,} wildcard subs + 1 plain: time per message', us(few_o), us(few_l),
                 ratio(div(few_l, few_o)), '', ''])
    rows.append([f'{many:,} wildcard subs + 1 plain: time per message', us(many_wo),
                 us(many_wl) + ('' if many_wl is None else f' ({lona_scan} msgs)'),
                 ratio(div(many_wl, many_wo)), '', ''])
    cost = div(many_wo, few_o)
    rows.append([f'  {many:,} vs {few:,} wildcard subs', ratio(cost),
                 ratio(div(many_wl, few_l)), '', '<= 2x (ours)',
                 met(None if cost is None else cost <= 2.0)])

    notes = [
        f'Median of {sizes["runs"]} run(s), each a fresh subprocess with a warm-up; '
        f'1 broker + 4 task threads in both libraries; payload {len(PAYLOAD["text"])}-char str.',
        f'Messages per run: ours {sizes["messages"]:,}; Lona {sizes["lona_messages"]:,}, '
        f'but {lona_scan:,} where it scans {channels:,} topics per message (scaled: the '
        f'rate is the same, the run shorter).',
        f'Lona subscribes {n_l:,} channels, not {n_o:,}: each subscription is an internal '
        f'message that scans every topic, so N subscriptions cost O(N^2).',
        '"ours vs Lona" is the speed-up (higher is better for ours).',
    ]
    if sizes is QUICK:
        notes.append('--quick: runs this short are noisy and the sizes are not the goals\' '
                     'sizes, so "met" is only indicative.')
    for (lib, case), runs in results.items():
        errors = [run['error'] for run in runs if 'error' in run]
        if errors:
            notes.append(f'ERROR {lib} {case}: {errors[0]}')
    return rows, notes


def details(results: dict) -> list[str]:
    """One line per case and library with every run's figure and the send-loop time."""
    lines = []
    for (lib, case), runs in results.items():
        parts = []
        for run in runs:
            if 'error' in run:
                parts.append('error')
            elif case.startswith('subscribe'):
                parts.append(f'{run["value"]:.3f} s (calls {run["calls"]:.3f} s)')
            else:
                parts.append(f'{run["per_second"]:,.0f} msg/s '
                             f'(send loop {run["send_loop"] / run["count"] * 1e6:.1f} µs/msg)')
        lines.append(f'{lib:4} {case:16}: ' + '; '.join(parts))
    return lines


def format_text(rows: list[list[str]], header: list[str]) -> str:
    """The rows as an aligned plain-text table."""
    table = [header] + rows
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for n, row in enumerate(table):
        lines.append('  '.join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append('  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def format_markdown(rows: list[list[str]], header: list[str]) -> str:
    """The rows as a Markdown table."""
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(
        ['---'] + ['---:'] * 3 + ['---', ':---:']) + '|']
    for row in rows:
        cells = [cell.strip().replace('|', '\\|') for cell in row]
        if row[0].startswith('  '):
            cells[0] = '↳ ' + cells[0]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def lona_version() -> str:
    """The installed Lona's version (without importing it)."""
    from importlib import metadata
    try:
        return metadata.version('lona')
    except metadata.PackageNotFoundError:
        return 'not installed'


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments; run one case (``--one``) or the whole benchmark."""
    parser = argparse.ArgumentParser(
        description='Benchmark channels against Lona 1.16.2 and print a table.')
    parser.add_argument('--quick', action='store_true',
                        help='small sizes and 1 run: a smoke test')
    parser.add_argument('--markdown', action='store_true',
                        help='print a Markdown table (with date, platform, CPUs, Python)')
    parser.add_argument('--details', action='store_true',
                        help='also print every run\'s figure and the send-loop time')
    parser.add_argument('--one', metavar='LIB.CASE', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL

    if args.one:
        lib, _, case = args.one.partition('.')
        if lib not in LIBS or case not in CASES:
            parser.error(f'--one takes LIB.CASE with LIB in {LIBS} and CASE in {CASES}')
        if lib == 'ours':
            sys.path.insert(0, str(ROOT))
        print(json.dumps(run_case(lib, case, sizes)), flush=True)
        return 0

    version = lona_version()
    if version != LONA_VERSION:
        print(f'warning: Lona {version} is installed, this benchmark expects {LONA_VERSION}',
              file=sys.stderr)
    started = time.monotonic()
    results = measure(sizes, args.quick, progress=sys.stderr.isatty())
    rows, notes = build_rows(results, sizes)
    header = ['measurement', 'ours', f'Lona {version}', 'ours vs Lona', 'goal', 'met']
    python = f'{platform.python_implementation()} {platform.python_version()}'
    if args.markdown:
        print(f'Benchmark of {datetime.date.today().isoformat()}: {platform.platform()}, '
              f'{os.cpu_count()} CPUs, {python}' + (' (--quick)' if args.quick else ''))
        print()
        print(format_markdown(rows, header))
        print()
        for note in notes:
            print(f'- {note}')
    else:
        print(f'channels vs Lona {version}; {platform.platform()}, {os.cpu_count()} CPUs, '
              f'{python}' + (' (--quick)' if args.quick else ''))
        print()
        print(format_text(rows, header))
        print()
        for note in notes:
            print(f'* {note}')
    if args.details or args.quick:
        print()
        print('\n'.join(details(results)))
    print(f'\n(benchmark took {time.monotonic() - started:.0f} s)', file=sys.stderr)
    failed = any('error' in run for runs in results.values() for run in runs)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
