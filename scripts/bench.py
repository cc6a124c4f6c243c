#!/usr/bin/env python3
"""Benchmark ``channels`` (this project) against Lona 1.16.2's ``lona.channels``, across
processes against a Queue relay and ZeroMQ, and across machines against Redis and NATS.

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
   the topic sent to (``room.target``), plus one plain channel that does. Then the
   same with patterns whose literal prefix is empty (``*a*a*a*b<i>``: grouping the
   patterns by prefix cannot skip them); printed, with no goal. Ours may try every
   one of them per message, so it times as many messages as fit in ``star_seconds``
   with 10,000 of them, and these cases' setup does not route the channels' internal
   subscribe events (each would try every pattern too: O(N^2), minutes, untimed).

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

Across processes (``--cross``), through a real ``channels-broker`` and, in the same run,
two references on the same machine: a bare ``multiprocessing.Queue`` relay (publisher
process -> relay process -> one ``Queue`` per subscriber process, one ``put`` per
message; the publisher puts the pickled dict, the relay passes the bytes on, each
subscriber unpickles them) and ZeroMQ's C proxy (``zmq.proxy`` between an XSUB and an
XPUB socket on ``ipc://``; the publisher's PUB sends ``[topic, pickled dict]``, each
SUB unpickles; high-water marks off, so nothing is dropped):

5. **1 -> 1 and 1 -> 4 processes**: a publisher process sends the messages in a loop;
   the clock runs from its first send to the time the last subscriber process has
   handled the last one (ours: in the handler, after reading ``message.data``; the
   references: after unpickling). Delivered/s is that rate times the subscribers.
   Every subscriber must get exactly every message, else the run is an error.
6. **Latency** at a steady 2,000 messages/s, 1 -> 1 (all three): the publisher
   sends to a schedule, the subscriber takes ``time.time()`` minus the send time
   (ours: ``message.timestamp``; the references: a timestamp in the data); p50 and p99.
7. **Broker cost**: the CPU time of the broker process (and of the relay and the
   proxy) per routed message over the 1 -> 1 run, and, for ours, the growth of the
   broker's RSS per subscription when one app process subscribes 100,000 channels on
   distinct topics. The CPU time per message of the publisher and the subscribers is
   shown too (psutil's ``cpu_times()`` of each process): it tells where the time goes.
8. **The picture** (``--plot FILE.png``): the throughput of case 5 with 1, 2, 4 and 8
   subscriber processes (``--sweep``; 1, 2, 4 with ``--quick``) and the latency of
   every message of case 6, for each system, printed as a table and drawn side by side
   by ``scripts/benchplot.py`` (matplotlib, in the ``bench`` extra). The cases the
   tables measure in the same run (1 -> 1, 1 -> 4, latency) are not measured again.

Across machines (``--bridged``), each "machine" its own ``channels-broker`` (its own
socket), all of them bridged (``--bridge URL``) through an engine this benchmark starts
for each run (its own ``redis-server`` with ``appendonly yes`` or ``nats-server -js``,
on a free port, data in a temporary directory, always stopped), in the same run as what
users of those engines have today (``scripts/benchmarks/``: ``ours_bridged``,
``socketio_redis``, ``broadcaster_stream``, ``nats_core``): python-socketio's
RedisManager pattern (redis-py ``PUBLISH`` per message, ``SUBSCRIBE``, pickled),
broadcaster's Redis-stream pattern (``XADD`` per message, ``XREAD count=1``) and nats-py
core publish/subscribe with callbacks (at most once), each straight to the engine:

9. **1 -> 1 and 1 -> 2 machines**: a publisher process on machine A, one subscriber
   process on B (and one on C), as in case 5; ours: ``send()`` to a handler.
10. **Latency** at 2,000 messages/s, 1 -> 1 machine, as in case 6.
11. **Broker CPU per bridged message**: of broker A and of broker B (ours), and of the
    engine (all), over the 1 -> 1 run and at 2,000 msg/s.

python-socketio across workers (``--only socketio``), in the same run:

12. **Socket.IO broadcast**: four uvicorn workers of one python-socketio ``AsyncServer``
    app, each its own process on its own port, with two websocket clients each; one
    worker emits to everyone, through ``channels.socketio.AsyncManager`` (and
    ``channels-broker``) or python-socketio's own ``AsyncRedisManager`` (this run's own
    ``redis-server``): events/s as fast as the worker emits, latency at 200 events/s,
    and the CPU per event of the workers and of the broker or Redis
    (``scripts/benchmarks/socketio_servers.py``). Goal: >= 3x AsyncRedisManager's
    throughput and a lower p50.

The goals (ours through either engine: >= 100,000 msg/s 1 -> 1, >= 5x the RedisManager
pattern, >= nats-py core's rate; p50 < 1 ms and p99 < 5 ms at 2,000 msg/s) are printed
beside the figures, not asserted. ``--engine redis`` (or ``nats``) measures only the
systems through that engine.

Many consumers of one topic in one process (``--only fanout``), against the fan-out a
user would write by hand (one coroutine ``Channel`` putting each message into an
``asyncio.Queue`` per consumer), every consumer on one event loop (see
``scripts/benchmarks/fanout.py``; the publisher is a thread of the same process):

12. **listen()**: an inbox per consumer, 1,000 and 10,000 consumers, without a broker
    and through a real ``channels-broker``: delivered/s (messages x consumers), the
    ratio to the fan-out by hand in the same round, and the p50 latency at saturation.
13. **Coroutine handlers**: a ``Channel(topic, async_fn)`` per consumer, 1,000 of them.
14. **Plain handlers** (the Flask/gthread pattern): 1,000 channels each putting into its
    own ``queue.Queue``, read by a thread each, beside one plain channel putting into
    all 1,000 (printed). ``--plot FILE.png`` draws these into ``FILE-fanout.png``.

Each cross-process (or bridged) run is one fresh subprocess of this script, in its own
process group, which starts the broker (or relay, or proxy) and forks the publisher and the
subscribers; it stops all of them in every case, and the parent kills the whole
group (psutil as a last resort) if the run fails, times out or is interrupted.

Usage::

    PYTHONPATH=. python scripts/bench.py             # full run, both tables (~4 min)
    PYTHONPATH=. python scripts/bench.py --markdown  # Markdown tables for the README
    PYTHONPATH=. python scripts/bench.py --quick     # small sizes: a smoke test (< 30 s)
    PYTHONPATH=. python scripts/bench.py --cross     # only the cross-process cases
    PYTHONPATH=. python scripts/bench.py --bridged   # only the cases across machines
    PYTHONPATH=. python scripts/bench.py --bridged --engine nats --quick  # one engine
    PYTHONPATH=. python scripts/bench.py --only local  # only the in-process cases
    PYTHONPATH=. python scripts/bench.py --only socketio  # python-socketio across workers
    PYTHONPATH=. python scripts/bench.py --only cross --plot docs/bench.png  # + picture
    PYTHONPATH=. python scripts/bench.py --only plot --plot out.png  # only the picture's
    PYTHONPATH=. python scripts/bench.py --only fanout --plot out.png  # out-fanout.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:     # imported by path (the tests): find the package too
    sys.path.insert(0, str(SCRIPTS))

from benchmarks.bridged_report import HEADER as BRIDGED_HEADER  # noqa: E402
from benchmarks.bridged_report import build_bridged_rows  # noqa: E402
from benchmarks.cases import (BRIDGED_CASES, BRIDGED_ENGINES, CASES, CROSS_CASES,  # noqa: E402
                              CROSS_LIBS, FANOUT_CASES, FANOUT_SYSTEMS, FULL, GROUPS, LIBS,
                              LONA_VERSION, QUICK, ROOT, SIO_LIBS, SWEEP_SYSTEMS, cross_systems,
                              plot_cases)
from benchmarks.engines import KINDS as ENGINES  # noqa: E402
from benchmarks.engines import NATS_SERVER, REDIS_SERVER  # noqa: E402
from benchmarks.cross import run_cross_case  # noqa: E402
from benchmarks.fanout import run_fanout_case  # noqa: E402
from benchmarks.fanout_report import HEADER as FANOUT_HEADER  # noqa: E402
from benchmarks.fanout_report import build_fanout_rows, fanout_plot_data  # noqa: E402
from benchmarks.local import run_case  # noqa: E402
from benchmarks.procs import run_child  # noqa: E402
from benchmarks.socketio_report import HEADER as SIO_HEADER  # noqa: E402
from benchmarks.socketio_report import build_socketio_rows  # noqa: E402
from benchmarks.report import (build_cross_rows, build_rows, build_sweep_rows,  # noqa: E402
                               details, print_table, write_plot)


def measure(sizes: dict, quick: bool, progress: bool, groups: tuple[str, ...] = GROUPS,
            sweep: tuple[int, ...] = (), engines: tuple[str, ...] = ENGINES) -> dict:
    """Run every case of *groups* ``runs`` times; return ``{(lib, case): [result]}``.

    With a *sweep* (``--plot``), also the throughput cases with that many subscriber
    processes and the latency case, unless *groups* measured them already. The
    cross-process cases and systems take turns in each round of runs, so that a noisy
    neighbour hits them alike (see measure_cross); so do the bridged ones, of the
    systems that go through one of *engines* (``--engine``).
    """
    results: dict = {}
    if 'local' in groups:
        for case in CASES:
            for lib in LIBS:
                runs = []
                for n in range(sizes['runs']):
                    if progress:
                        print(f'  {lib:4} {case:16} run {n + 1}/{sizes["runs"]}',
                              file=sys.stderr, flush=True)
                    runs.append(run_child(lib, case, quick, sizes['timeout'] + 15))
                results[lib, case] = runs
    if 'cross' in groups:
        measure_cross(results, CROSS_CASES, sizes, quick, progress)
    if 'bridged' in groups:
        measure_cross(results, BRIDGED_CASES, sizes, quick, progress,
                      systems=tuple(lib for lib, kind in BRIDGED_ENGINES.items()
                                    if kind in engines))
    if 'socketio' in groups:
        for n in range(sizes['sio_runs']):
            for case, libs in SIO_LIBS.items():
                for lib in libs:
                    if progress:
                        print(f'  {lib:9} {case:16} run {n + 1}/{sizes["sio_runs"]}',
                              file=sys.stderr, flush=True)
                    results.setdefault((lib, case), []).append(
                        run_child(lib, case, quick, 2 * sizes['timeout'] + 15))
    if 'fanout' in groups:
        measure_fanout(results, sizes, quick, progress)
    if sweep:
        cases = [case for case in plot_cases(sweep)
                 if not any((lib, case) in results for lib in cross_systems(case))]
        measure_cross(results, cases, sizes, quick, progress)
    return results


def measure_cross(results: dict, cases: list[str] | tuple[str, ...], sizes: dict,
                  quick: bool, progress: bool, systems: tuple[str, ...] | None = None) -> None:
    """Run each cross-process (or bridged) case of *cases* ``cross_runs`` (or
    ``bridged_runs``) times into *results*, for each of its systems (those in *systems*
    if given).

    Each round runs every case once for every system, in turn, so that a noisy spell
    on a shared machine hits all of them alike rather than one case.
    """
    runs = sizes['bridged_runs' if set(cases) <= set(BRIDGED_CASES) else 'cross_runs']
    for n in range(runs):
        for case in cases:
            for lib in cross_systems(case):
                if systems is not None and lib not in systems:
                    continue
                if progress:
                    print(f'  {lib:5} {case:16} run {n + 1}/{runs}', file=sys.stderr,
                          flush=True)
                limit = sizes['timeout'] + 15
                if case.endswith('_latency'):
                    limit += sizes['latency_seconds'] + sizes['latency_warmup']
                results.setdefault((lib, case), []).append(run_child(lib, case, quick, limit))


def measure_fanout(results: dict, sizes: dict, quick: bool, progress: bool) -> None:
    """Run each fan-out case ``fan_runs`` times into *results*, ours and by hand in turn
    in each round (so that the ratio within a round compares runs of the same moment)."""
    runs = sizes['fan_runs']
    for n in range(runs):
        for case in FANOUT_CASES:
            for lib in FANOUT_SYSTEMS:
                if progress:
                    print(f'  {lib:5} {case:26} run {n + 1}/{runs}', file=sys.stderr,
                          flush=True)
                results.setdefault((lib, case), []).append(
                    run_child(lib, case, quick, sizes['timeout'] * 2 + 15))


def fanout_plot_path(plot: str) -> str:
    """Where ``--plot FILE.png`` draws the fan-out picture: ``FILE-fanout.png``."""
    path = Path(plot)
    return str(path.with_name(f'{path.stem}-fanout{path.suffix or ".png"}'))


def write_fanout_plot(path: str, results: dict, sizes: dict, machine: str,
                      load: tuple[float, float]) -> None:
    """Draw the fan-out cases of *results* into *path* (``scripts/benchplot.py``)."""
    import benchplot
    caption = '\n'.join([
        f'{datetime.date.today().isoformat()} · {machine} · load average {load[0]:.1f} '
        f'before the runs, {load[1]:.1f} after',
        'Every consumer on one event loop of one process (plain: a thread each), counting '
        'each message; the publisher a thread of the same process (through the broker: '
        'to channels-broker and back). By hand: one coroutine Channel putting into an '
        'asyncio.Queue per consumer (plain: one plain Channel into a queue.Queue each).',
        f'Median of {sizes["fan_runs"]} run(s), bars from the slowest run to the fastest; '
        f'p50 at saturation: at most {sizes["fan_window"]:,} deliveries outstanding.',
    ])
    benchplot.plot_fanout(path, fanout_plot_data(results, sizes), caption=caption,
                          title='mpchannels: many consumers of one topic in one process, '
                                'vs a fan-out written by hand')


def lona_version() -> str:
    """The installed Lona's version (without importing it)."""
    from importlib import metadata
    try:
        return metadata.version('lona')
    except metadata.PackageNotFoundError:
        return 'not installed'


def versions() -> dict[str, str]:
    """The installed versions of Lona, pyzmq and libzmq (Lona without importing it), of
    redis-py, nats-py and the Redis and NATS servers."""
    from importlib import metadata
    found = {'lona': lona_version()}
    try:
        found['pyzmq'] = metadata.version('pyzmq')
        import zmq
        found['libzmq'] = zmq.zmq_version()
    except (metadata.PackageNotFoundError, ImportError):
        found['pyzmq'] = found['libzmq'] = 'not installed'
    for package in ('redis', 'nats-py', 'hiredis', 'python-socketio'):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = 'not installed'
    for name, server in (('redis-server', REDIS_SERVER), ('nats-server', NATS_SERVER)):
        try:
            out = subprocess.run([server, '--version'], capture_output=True, text=True,
                                 timeout=10).stdout
            found[name] = next((word.removeprefix('v=').removeprefix('v')
                                for word in out.split() if word[:1] in 'v0123456789'
                                and any(c.isdigit() for c in word)), out.strip())
        except OSError:
            found[name] = 'not installed'
    return found


def _counts(text: str) -> tuple[int, ...]:
    """``--sweep``: ``1,2,4,8`` -> (1, 2, 4, 8), sorted, each at least 1."""
    try:
        counts = tuple(sorted({int(part) for part in text.split(',') if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f'not numbers separated by commas: {text!r}') from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f'subscriber counts must be 1 or more: {text!r}')
    return counts


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments; run one case (``--one``) or the whole benchmark."""
    parser = argparse.ArgumentParser(
        description='Benchmark channels against Lona 1.16.2 in one process, across '
                    'processes against a multiprocessing.Queue relay and a ZeroMQ proxy, '
                    'and across machines (brokers bridged through Redis or NATS) against '
                    'the RedisManager and broadcaster patterns and nats-py core; print the '
                    'tables.')
    parser.add_argument('--quick', action='store_true',
                        help='small sizes and 1 run: a smoke test')
    parser.add_argument('--markdown', action='store_true',
                        help='print Markdown tables (with date, platform, CPUs, Python)')
    parser.add_argument('--details', action='store_true',
                        help='also print every run\'s figures: send-loop time, CPU per '
                             'message of each process, ...')
    parser.add_argument('--only', choices=(*GROUPS, 'plot'), action='append',
                        help='run only these cases: local (in one process, vs Lona), '
                             'cross (across processes, vs Queue and ZeroMQ), bridged '
                             '(across machines, vs Redis and NATS clients), fanout (many '
                             'consumers of one topic in one process, vs a fan-out by '
                             'hand), socketio (python-socketio across 4 workers, vs its '
                             'AsyncRedisManager) or plot (only what --plot needs); repeatable')
    parser.add_argument('--cross', action='append_const', dest='only', const='cross',
                        help='the same as --only cross')
    parser.add_argument('--bridged', action='append_const', dest='only', const='bridged',
                        help='the same as --only bridged: across machines, brokers bridged '
                             'through Redis and NATS, vs the RedisManager and broadcaster '
                             'patterns and nats-py core')
    parser.add_argument('--engine', choices=ENGINES, action='append',
                        help='the bridged cases only of the systems through this engine '
                             '(repeatable; default: both)')
    parser.add_argument('--plot', metavar='FILE.png',
                        help='also measure throughput by subscriber processes (see --sweep) '
                             'and the latency of each system, print them, and draw them '
                             'into FILE.png (needs matplotlib: the bench extra)')
    parser.add_argument('--sweep', metavar='N,N,...', type=_counts,
                        help='subscriber processes for --plot (default: '
                             f'{",".join(map(str, FULL["sweep"]))}; with --quick '
                             f'{",".join(map(str, QUICK["sweep"]))})')
    parser.add_argument('--runs', metavar='N', type=int,
                        help='measured runs per case and system (default: 3, 1 with --quick); '
                             'the median is shown')
    parser.add_argument('--one', metavar='LIB.CASE', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.runs is not None:
        if args.runs < 1:
            parser.error('--runs must be 1 or more')
        sizes = {**sizes, 'runs': args.runs, 'cross_runs': args.runs,
                 'bridged_runs': args.runs, 'fan_runs': args.runs, 'sio_runs': args.runs}
    only = args.only or (*GROUPS, 'plot')
    groups = tuple(group for group in GROUPS if group in only)
    if 'plot' in only and not args.plot and args.only:
        parser.error('--only plot needs --plot FILE.png')
    if args.sweep and not args.plot:
        parser.error('--sweep needs --plot FILE.png')
    # the cross-process picture's runs, unless only the fan-out cases were asked for
    sweep = (args.sweep or sizes['sweep']) if args.plot and set(only) - {'fanout'} else ()
    if args.plot and not args.one:
        try:
            import matplotlib  # noqa: F401  (fail now, not after minutes of measuring)
        except ImportError:
            parser.error("--plot needs matplotlib: pip install -e '.[bench]'")

    if args.one:
        lib, _, case = args.one.partition('.')
        if lib in SIO_LIBS.get(case, ()):
            from benchmarks.socketio_servers import run_socketio_case
            print(json.dumps(run_socketio_case(lib, case, sizes)), flush=True)
            return 0
        if case in FANOUT_CASES and lib in FANOUT_SYSTEMS:
            sys.path.insert(0, str(ROOT))
            print(json.dumps(run_fanout_case(lib, case, sizes)), flush=True)
            return 0
        if lib in cross_systems(case):
            sys.path.insert(0, str(ROOT))
            print(json.dumps(run_cross_case(lib, case, sizes)), flush=True)
            return 0
        if lib not in LIBS or case not in CASES:
            parser.error(f'--one takes LIB.CASE with LIB in {LIBS} and CASE in {CASES}, '
                         f'or one of {[f"{l}.{c}" for c, ls in CROSS_LIBS.items() for l in ls]}'
                         f' or SYSTEM.cross_1to<N> with SYSTEM in {SWEEP_SYSTEMS}')
        if lib == 'ours':
            sys.path.insert(0, str(ROOT))
        print(json.dumps(run_case(lib, case, sizes)), flush=True)
        return 0

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)     # run the finally clauses: they stop the children

    signal.signal(signal.SIGTERM, on_sigterm)
    found = versions()
    if 'local' in groups and found['lona'] != LONA_VERSION:
        print(f'warning: Lona {found["lona"]} is installed, this benchmark expects '
              f'{LONA_VERSION}', file=sys.stderr)
    if ('cross' in groups or sweep) and found['pyzmq'] == 'not installed':
        print("warning: pyzmq is not installed (pip install -e '.[bench]'): the ZeroMQ "
              "runs will fail", file=sys.stderr)
    if 'bridged' in groups:
        for needed in ('redis', 'hiredis', 'nats-py', 'redis-server', 'nats-server'):
            if found[needed] == 'not installed':
                print(f"warning: {needed} is not installed (pip install -e "
                      f"'.[bench,redis,nats]'; apt-get install redis-server nats-server): "
                      f"some bridged runs will fail", file=sys.stderr)
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        results = measure(sizes, args.quick, progress=sys.stderr.isatty(), groups=groups,
                          sweep=sweep, engines=tuple(args.engine or ENGINES))
    except KeyboardInterrupt:
        print('\ninterrupted; every process the benchmark started is stopped',
              file=sys.stderr)
        return 130
    load = (load_before, os.getloadavg()[0])
    python = f'{platform.python_implementation()} {platform.python_version()}'
    quick = ' (--quick)' if args.quick else ''
    machine = f'{platform.platform()}, {os.cpu_count()} CPUs, {python}{quick}'
    if args.markdown:
        print(f'Benchmark of {datetime.date.today().isoformat()}: {machine}')
        print()
    tables = []
    if 'local' in groups:
        rows, notes = build_rows(results, sizes)
        header = ['measurement', 'ours', f'Lona {found["lona"]}', 'ours vs Lona', 'goal',
                  'met']
        title = 'In one process:' if args.markdown else \
            f'channels vs Lona {found["lona"]}; {machine}'
        tables.append((title, rows, header, notes, None))
    if 'cross' in groups:
        rows, notes = build_cross_rows(results, sizes)
        header = ['measurement', 'ours', 'Queue relay', 'ZeroMQ proxy', 'ours vs Queue',
                  'ours vs ZeroMQ', 'goal', 'met']
        zmq = f'ZeroMQ {found["libzmq"]} proxy (pyzmq {found["pyzmq"]})'
        title = f'Across processes, through channels-broker, vs a multiprocessing.Queue ' \
            f'relay and a {zmq}:' if args.markdown else \
            f'channels across processes vs a multiprocessing.Queue relay and a {zmq}; ' \
            f'{machine}'
        tables.append((title, rows, header, notes, None))
    if 'bridged' in groups:
        rows, notes = build_bridged_rows(results, sizes)
        engines = f'Redis {found["redis-server"]} (redis-py {found["redis"]}, hiredis ' \
            f'{found["hiredis"]}), NATS {found["nats-server"]} (nats-py {found["nats-py"]})'
        title = f'Across machines, brokers bridged through {engines}:' if args.markdown \
            else f'channels across machines vs the engines\' own clients; {engines}; {machine}'
        notes.append(f'Load average (1 min) of this machine: {load[0]:.1f} before the '
                     f'runs, {load[1]:.1f} after ({os.cpu_count()} CPUs).')
        tables.append((title, rows, BRIDGED_HEADER, notes, None))
    if 'socketio' in groups:
        rows, notes = build_socketio_rows(results, sizes)
        title = f'python-socketio {found["python-socketio"]} across workers, vs its own ' \
            f'AsyncRedisManager on Redis {found["redis-server"]}:'
        notes.append(f'Load average (1 min) of this machine: {load[0]:.1f} before the '
                     f'runs, {load[1]:.1f} after ({os.cpu_count()} CPUs).')
        tables.append((title, rows, SIO_HEADER, notes, None))
    if 'fanout' in groups:
        rows, notes = build_fanout_rows(results, sizes)
        few, many = sizes['fan_consumers']
        title = f'Many consumers of one topic in one process ({few:,} and {many:,}), vs a ' \
            f'fan-out by hand:' if args.markdown else \
            f'channels with many consumers of one topic vs a fan-out by hand; {machine}'
        notes.append(f'Load average (1 min) of this machine: {load[0]:.1f} before the runs, '
                     f'{load[1]:.1f} after ({os.cpu_count()} CPUs).')
        tables.append((title, rows, FANOUT_HEADER, notes, None))
    if sweep:
        rows, header, notes = build_sweep_rows(results, sizes, sweep)
        notes.append(f'Load average (1 min) of this machine: {load[0]:.1f} before the runs, '
                     f'{load[1]:.1f} after ({os.cpu_count()} CPUs).')
        title = f'Delivered msg/s by subscriber processes (1 publisher), and latency at ' \
            f'{sizes["latency_rate"]:,} msg/s (1 -> 1), drawn into {args.plot}:'
        tables.append((title, rows, header, notes, ['---'] + ['---:'] * (len(header) - 1)))
    for n, (title, rows, header, notes, align) in enumerate(tables):
        if n:
            print()
        print_table(title, rows, header, notes, args.markdown, align)
    if sweep:
        write_plot(args.plot, results, sizes, sweep, machine, found, load)
    if args.plot and 'fanout' in groups:
        write_fanout_plot(fanout_plot_path(args.plot), results, sizes, machine, load)
    if args.details or args.quick:
        print()
        print('\n'.join(details(results)))
    print(f'\n(benchmark took {time.monotonic() - started:.0f} s)', file=sys.stderr)
    failed = any('error' in run for runs in results.values() for run in runs)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
