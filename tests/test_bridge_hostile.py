"""A broken or hostile writer to the bridge's stream, and operators acting on the engine:
what the receiving brokers and their processes see. Entries are written straight to a
Redis of the test's (redis-py), bypassing any bridge, as another program would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator

import pytest
from brokers import BrokerProcess, app_processes
from engines import EngineServer
from support import wait_until

from channels import wire
from channels.bridge import _ENTRY, _MAGIC, _VERSION

LOST = 'lona.channels.lost'
NAMESPACE = 'mpchannels'

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def redis_server() -> Iterator[EngineServer]:
    """A Redis of this test's; always stopped."""
    server = EngineServer('redis')
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_server):
    import redis
    client = redis.Redis(port=redis_server.port, password=redis_server.password,
                         socket_timeout=10)
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def bridged_broker(url: str) -> Iterator[BrokerProcess]:
    """One broker bridged through *url*; always stopped."""
    directory = tempfile.mkdtemp(prefix='mpch-h-')
    broker = BrokerProcess(os.path.join(directory, 'm.sock'), '--bridge', url)
    try:
        yield broker.start()
    finally:
        if broker.process is not None and broker.process.poll() is None:
            broker.process.send_signal(signal.SIGCONT)
        broker.stop()
        shutil.rmtree(directory, ignore_errors=True)


def entry(origin: str, first: int, frames: list[bytes], incarnation: int = 7,
          count: int | None = None) -> bytes:
    """A bridge entry as a broker writes it."""
    name = origin.encode()
    return _ENTRY.pack(_MAGIC, _VERSION, len(name), incarnation, first,
                       len(frames) if count is None else count) + name + b''.join(frames)


def message(topic: str, message_id: str) -> bytes:
    return wire.encode_message(topic, message_id, time.time(), None, False,
                               b'\x80\x04}\x94.')      # pickle of {}


def xadd_all(client, *entries: bytes) -> None:
    """Append *entries* in one transaction: a reader blocked in XREAD gets them together."""
    with client.pipeline(transaction=True) as pipe:
        for data in entries:
            pipe.xadd(f'{NAMESPACE}:stream', {'d': data})
        pipe.execute()


def _user(received):
    return [(topic, data) for topic, data in received if not topic.startswith('lona.')]


def _bridge(broker: BrokerProcess) -> dict:
    return broker.stats()['bridge']


def _subscribed(broker, app, *topics):
    for topic in topics:
        app.subscribe(topic)
    assert app.call('flush', 20)
    broker.wait_subscribed(app.pid, [t for t in topics if not t.startswith('lona.')])


def test_a_junk_entry_read_with_good_ones_costs_only_itself(redis_server, redis_client):
    """Entries read together are routed together: one whose frames are not MESSAGE
    frames must not take the good entries read with it down (they would be gone with no
    loss told: their numbers were already taken as seen)."""
    with bridged_broker(redis_server.url) as b, app_processes(b.address, 1) as (app,):
        _subscribed(b, app, 'x', LOST)
        wait_until(lambda: _bridge(b)['connected'], 15, what='the bridge connected')
        xadd_all(redis_client,
                 entry('good-a', 1, [message('x', f'1-{"a" * 16}-1')]),
                 # room for the one frame it claims, but not a frame of ours
                 entry('junk', 1, [b'\x00\x00\x00\x20\x02\x04' + b'x' * 32]),
                 entry('good-b', 1, [message('x', f'2-{"b" * 16}-1')]))
        wait_until(lambda: _bridge(b)['entries_received'] >= 3, 15, what='three entries')
        wait_until(lambda: len(_user(app.received('x'))) >= 2, 10,
                   what=f'the two good messages (got {app.received("x")}, '
                        f'{_bridge(b)})')
        wait_until(lambda: app.received(LOST), 10, what='the junk entry told lost')
        [(_, loss)] = app.received(LOST)
        assert loss['count'] == 1 and 'junk' in loss['reason'], loss
        assert _bridge(b)['lost'] == 1
        assert b.process.poll() is None


@pytest.fixture
def twin_bridges(redis_server):
    """Two bridges with one broker id (two machines with one hostname and socket path);
    always stopped. Each records the frames it is handed."""
    from channels.bridge import Bridge
    made = []
    for _ in range(2):
        got: list[bytes] = []
        bridge = Bridge.from_url(redis_server.url, 'twins', broker_id='host/run/b.sock',
                                 on_frames=got.append, on_lost=lambda *_: None)
        made.append((bridge, got))
    try:
        for bridge, _ in made:
            bridge.start()
        yield made
    finally:
        for bridge, _ in made:
            assert bridge.stop(10)


def test_another_broker_with_this_brokers_id_is_a_logged_error(twin_bridges, caplog):
    """Each would skip the other's entries as its own: every message between them lost,
    and nothing said. The id is the host name and the socket's path, so two hosts (or
    containers sharing a host's network) with one name and the default path have one."""
    (a, got_a), (b, _) = twin_bridges
    assert a.publish(message('x', f'1-{"a" * 16}-1'), 1)
    assert b.publish(message('x', f'2-{"b" * 16}-1'), 1)
    wait_until(lambda: any(r.levelname == 'ERROR' and 'host/run/b.sock' in r.getMessage()
                           for r in caplog.records), 10,
               what='an ERROR naming the id that two brokers use')
    assert b.publish(message('x', f'2-{"b" * 16}-2'), 1)     # once it knows: routed
    wait_until(lambda: b'2-bbbbbbbbbbbbbbbb-2' in b''.join(got_a), 10,
               what="b's message at a, once a knows of b")


def test_an_engine_that_refuses_writes_is_one_warning_not_a_flapping_connection(
        redis_server, caplog):
    """Redis out of memory (``maxmemory`` with ``noeviction``) answers reads and refuses
    every XADD, heartbeats too. The bridge is down (it cannot send) until XADD works
    again: one WARNING, not one "not connected" and one "connected again" per retry from
    its reader and its sender taking turns."""
    from channels.bridge import Bridge
    bridge = Bridge.from_url(redis_server.url, 'oom', broker_id='a',
                             on_frames=lambda _: None, on_lost=lambda *_: None)
    bridge.start()
    try:
        wait_until(lambda: bridge.stats()['connected'], 10, what='connected')
        redis_server.redis_cli('config', 'set', 'maxmemory-policy', 'noeviction')
        redis_server.redis_cli('config', 'set', 'maxmemory', '1')
        states = []

        def refused(times: int) -> bool:
            states.append(bridge.stats()['connected'])
            info = redis_server.redis_cli('info', 'errorstats')
            return any(line.startswith('errorstat_OOM:count=') and
                       int(line.split('=')[1].split(',')[0]) >= times
                       for line in info.splitlines())

        wait_until(lambda: refused(1), 10, what='an XADD refused')
        wait_until(lambda: not bridge.stats()['connected'], 5, what='down')
        states.clear()
        wait_until(lambda: refused(8), 15, interval=0.02, what='eight XADDs refused')
        assert not any(states), 'shown connected while every XADD is refused'
        assert sum('connected again' in r.getMessage() for r in caplog.records) == 0
        assert sum('not connected' in r.getMessage() for r in caplog.records) == 1
        redis_server.redis_cli('config', 'set', 'maxmemory', '0')
        wait_until(lambda: bridge.stats()['connected'], 10, what='connected again')
    finally:
        assert bridge.stop(10)


def test_an_entry_claiming_more_messages_than_it_holds_is_dropped_as_not_ours(
        redis_server, redis_client):
    """A header's count is only believed where the entry has room for that many frames:
    a claim of four billion messages in one frame's bytes would make the counters (and
    the losses later told of that origin) nonsense."""
    with bridged_broker(redis_server.url) as b, app_processes(b.address, 1) as (app,):
        _subscribed(b, app, 'x', LOST)
        wait_until(lambda: _bridge(b)['connected'], 15, what='the bridge connected')
        xadd_all(redis_client,
                 entry('liar', 1, [message('x', f'1-{"a" * 16}-1')], count=2 ** 32 - 1),
                 entry('good', 1, [message('x', f'2-{"b" * 16}-1')]))
        wait_until(lambda: len(_user(app.received('x'))) >= 1, 15, what='the good message')
        assert [data for _, data in _user(app.received('x'))] == [{}]
        stats = _bridge(b)
        assert (stats['received'], stats['lost']) == (1, 0), stats
        assert app.received(LOST) == []
        assert 'not an mpchannels entry' in b.log
