"""What the benchmark measures: the sizes of its runs, its cases and systems, their names.

Every other module of the benchmark takes its knobs from here; ``FULL`` and ``QUICK``
(``--quick``) are the two sets of sizes, and a case is named ``LIB.CASE`` on the
command line of a measured subprocess (``--one``).
"""

from __future__ import annotations

from pathlib import Path

PAYLOAD = {'text': 'x' * 48}
"""The data of every message sent: a small dict, about 64 bytes of payload."""

FULL = {
    'name': 'full',
    'runs': 3,                    # measured runs per case and library; the median is shown
    'warmup': 2_000,              # messages sent (or channels subscribed) before timing
    'messages': 100_000,          # ours: messages per run, in every message case
    'lona_messages': 50_000,      # Lona: messages per run, 1 subscriber and 10 wildcards
    'lona_scan_messages': 100,    # Lona: messages per run where it scans 10,000 topics
    'channels': 10_000,           # case 2: channels on distinct topics (one matches)
    'subscriptions': 100_000,     # case 3, ours
    'lona_subscriptions': 1_000,  # case 3, Lona: O(N^2), see the module docstring
    'wildcards': (10, 10_000),    # case 4: wildcard subscriptions, none matching
    'star_seconds': 3.0,          # case 4, empty prefix: ours times what fits in this
    'timeout': 60.0,              # seconds one run (one subprocess) may take
    'cross_runs': 3,              # cross-process: measured runs per case and system
    'cross_warmup': 2_000,        # cross-process: messages sent and handled before timing
    'cross_messages': 100_000,    # case 5, 1 -> 1: messages per run
    'fanout_messages': 40_000,    # case 5, 1 -> 4: messages per run (each subscriber gets all)
    'fanout': 4,                  # case 5: subscriber processes in the fan-out case
    'latency_rate': 2_000,        # case 6: messages/s, sent to a schedule
    'latency_seconds': 5.0,       # case 6: the measured part of a run
    'latency_warmup': 0.5,        # case 6: seconds of paced sends before it, not counted
    'cross_subscriptions': 100_000,  # case 7: subscriptions of one app process
    'sweep': (1, 2, 4, 8),        # --plot: subscriber processes of the throughput runs
    'bridged_runs': 3,            # across machines: measured runs per case and system
    'bridged_warmup': 2_000,      # across machines: messages sent and handled before timing
    'bridged_messages': 50_000,   # 1 -> 1 machine: messages per run
    'bridged_fanout_messages': 20_000,  # 1 -> 2 machines: messages per run (each gets all)
    'round_trip_messages': 10_000,         # the same, for the systems that await every
    'round_trip_fanout_messages': 5_000,   # message's reply (ROUND_TRIP_SYSTEMS)
    'sio_runs': 3,                # Socket.IO: measured runs per system
    'sio_workers': 4,             # Socket.IO: uvicorn worker processes, clients spread over all
    'sio_clients': 2,             # Socket.IO: websocket clients of each worker
    'sio_warmup': 500,            # Socket.IO: events emitted before timing
    'sio_messages': 5_000,        # Socket.IO: events emitted as fast as the worker can
    'sio_rate': 200,              # Socket.IO latency: events/s, emitted to a schedule
    'sio_latency_seconds': 3.0,   # Socket.IO latency: the measured part
    'fan_runs': 3,                # fan-out in one process: measured runs per case and system
    'fan_consumers': (1_000, 10_000),   # consumers of one topic in one process: few, many
    'fan_deliveries': 1_000_000,  # timed deliveries per run (messages x consumers)
    'fan_plain_deliveries': 200_000,    # the same with a thread per consumer (plain case)
    'fan_warmup': 50_000,         # deliveries before timing
    'fan_window': 50_000,         # deliveries outstanding at most (sent, not yet consumed)
}
QUICK = {
    'name': 'quick',
    'runs': 1,
    'warmup': 500,
    'messages': 10_000,
    'lona_messages': 5_000,
    'lona_scan_messages': 10,
    'channels': 10_000,
    'subscriptions': 20_000,
    'lona_subscriptions': 300,
    'wildcards': (10, 10_000),
    'star_seconds': 0.5,
    'timeout': 15.0,
    'cross_runs': 1,
    'cross_warmup': 500,
    'cross_messages': 10_000,
    'fanout_messages': 4_000,
    'fanout': 4,
    'latency_rate': 2_000,
    'latency_seconds': 1.0,
    'latency_warmup': 0.2,
    'cross_subscriptions': 20_000,
    'sweep': (1, 2, 4),
    'bridged_runs': 1,
    'bridged_warmup': 300,
    'bridged_messages': 3_000,
    'bridged_fanout_messages': 1_500,
    'round_trip_messages': 1_000,
    'round_trip_fanout_messages': 500,
    'sio_runs': 1,
    'sio_workers': 4,
    'sio_clients': 2,
    'sio_warmup': 100,
    'sio_messages': 500,
    'sio_rate': 200,
    'sio_latency_seconds': 1.0,
    'fan_runs': 1,
    'fan_consumers': (50, 500),
    'fan_deliveries': 10_000,
    'fan_plain_deliveries': 2_000,
    'fan_warmup': 1_000,
    'fan_window': 2_000,
}

LIBS = ('ours', 'lona')
CASES = ('single', 'many', 'subscribe', 'subscribe_routed', 'wild_few', 'wild_many',
         'wild_star_few', 'wild_star_many')
CROSS_LIBS = {                    # cross-process cases, and the systems each one measures
    'cross_1to1': ('ours', 'queue', 'zmq'),
    'cross_1to4': ('ours', 'queue', 'zmq'),
    'cross_latency': ('ours', 'queue', 'zmq'),
    'cross_memory': ('ours',),
}
CROSS_CASES = tuple(CROSS_LIBS)
SWEEP_SYSTEMS = ('ours', 'queue', 'zmq')   # --plot: throughput by subscriber processes
BRIDGED_ENGINES = {               # across machines: each system, and the engine it goes through
    'ours_redis': 'redis', 'ours_nats': 'nats', 'socketio': 'redis', 'broadcaster': 'redis',
    'nats_core': 'nats'}
BRIDGED_SYSTEMS = tuple(BRIDGED_ENGINES)
BRIDGED_LIBS = {                  # the cases across machines: 1 -> 1 and 1 -> 2 machines, latency
    'bridged_1to1': BRIDGED_SYSTEMS,
    'bridged_1to2': BRIDGED_SYSTEMS,
    'bridged_latency': BRIDGED_SYSTEMS,
}
BRIDGED_CASES = tuple(BRIDGED_LIBS)
OURS_SYSTEMS = ('ours', 'ours_redis', 'ours_nats')   # channels in the app processes
ROUND_TRIP_SYSTEMS = ('socketio', 'broadcaster')
"""They await Redis's reply to every message they send: a few thousand per second, so
their runs send fewer messages (the rate is the same, the run shorter)."""
SIO_LIBS = {'sio_broadcast': ('sio_ours', 'sio_redis')}
"""The Socket.IO case: broadcast from one uvicorn worker to clients of four, through ours
(``channels.socketio.AsyncManager``) or python-socketio's ``AsyncRedisManager``."""
FANOUT_CASES = {                 # fan-out in one process: (kind, which of fan_consumers, broker)
    'fanout_listen_few': ('listen', 0, False),
    'fanout_listen_many': ('listen', 1, False),
    'fanout_listen_few_broker': ('listen', 0, True),
    'fanout_listen_many_broker': ('listen', 1, True),
    'fanout_coroutine': ('coroutine', 0, False),
    'fanout_plain': ('plain', 0, False),
}
FANOUT_SYSTEMS = ('ours', 'hand')   # ours, and the fan-out written by hand (see fanout)
GROUPS = ('local', 'cross', 'bridged', 'fanout', 'socketio')   # --only: in one process, across
#       processes, machines, many consumers of one topic, python-socketio's workers
SYSTEM_NAMES = {'ours': 'mpchannels', 'queue': 'Queue relay', 'zmq': 'ZeroMQ proxy',
                'ours_redis': 'ours via Redis', 'ours_nats': 'ours via NATS',
                'socketio': 'socketio RedisManager', 'broadcaster': 'broadcaster Redis stream',
                'nats_core': 'nats-py core', 'hand': 'by hand',
                'sio_ours': 'ours (channels.socketio)', 'sio_redis': 'AsyncRedisManager'}
CROSS_TOPIC = 'bench'
LONA_VERSION = '1.16.2'
ROOT = Path(__file__).resolve().parent.parent.parent
"""The project's root: its ``channels`` is the one measured."""
BROKER_SCRIPT = ROOT / 'scripts' / 'channels-broker'
SENTINEL_TOPIC = 'bench.sentinel'
WILD_TARGET = 'room.target'
"""The plain topic the wildcard cases send to; none of their patterns matches it."""
SUBSCRIBE_TOPIC = 'lona.channels.subscribe'


def fanout_case(subscribers: int) -> str:
    """The name of the throughput case with *subscribers* processes: ``cross_1to<N>``.

    ``cross_1to1`` and ``cross_1to4`` are cases of the table (the latter with
    ``sizes['fanout']`` subscribers, which is 4); ``--plot`` measures the others too.
    """
    return f'cross_1to{subscribers}'


def fanout_of(case: str) -> int | None:
    """The subscriber processes of a throughput case ``cross_1to<N>``; None for others."""
    prefix = 'cross_1to'
    count = case[len(prefix):]
    if case.startswith(prefix) and count.isdigit() and int(count) >= 1:
        return int(count)
    return None


def cross_systems(case: str) -> tuple[str, ...]:
    """The systems a cross-process or bridged case measures (none if it is no such case)."""
    if case in CROSS_LIBS:
        return CROSS_LIBS[case]
    if case in BRIDGED_LIBS:
        return BRIDGED_LIBS[case]
    return SWEEP_SYSTEMS if fanout_of(case) else ()


def bridged_fanout(case: str) -> int | None:
    """The subscriber machines of a bridged throughput case (``bridged_1to<N>``)."""
    return {'bridged_1to1': 1, 'bridged_1to2': 2}.get(case)


def bridged_count(system: str, machines: int, sizes: dict) -> int:
    """The messages of one bridged throughput run of *system* to *machines* machines."""
    prefix = 'round_trip' if system in ROUND_TRIP_SYSTEMS else 'bridged'
    return sizes[f'{prefix}_messages' if machines == 1 else f'{prefix}_fanout_messages']


def plot_cases(sweep: tuple[int, ...]) -> list[str]:
    """The cross-process cases the picture needs: a throughput case per count, latency."""
    return [fanout_case(n) for n in sweep] + ['cross_latency']


def wildcard(i: int, star: bool) -> str:
    """The *i*-th pattern of a wildcard case: all distinct, none matching ``WILD_TARGET``.

    ``room.<i>.*`` has a literal prefix of its own; with *star*, ``*a*a*a*b<i>`` (the
    shape of issue 10's item 9) starts with a wildcard: its literal prefix is empty,
    so grouping patterns by prefix cannot skip it.
    """
    return f'*a*a*a*b{i}' if star else f'room.{i}.*'
