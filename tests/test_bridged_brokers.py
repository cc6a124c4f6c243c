"""Brokers on several "machines" bridged through real Redis and NATS servers.

Each machine is a real broker started by its script (``channels-broker --address A
--bridge URL``) with real app processes of its own; the engine is a ``redis-server`` or
``nats-server -js`` of the test's, on a free port with its data in a temp dir. The
bridge component itself (losses, liveness, outages) is tested in ``test_bridge.py``.
"""

from __future__ import annotations

import contextlib
import os
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from brokers import BROKER_SCRIPT, BrokerProcess, app_processes
from engines import EngineServer
from support import wait_until

LOST = 'lona.channels.lost'

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(params=['redis', 'nats'])
def engine(request) -> Iterator[EngineServer]:
    """A Redis or NATS JetStream server of this test's; always stopped. What the broker
    does whatever the engine is tested against one of them:
    ``@pytest.mark.parametrize('engine', ['redis'], indirect=True)``."""
    server = EngineServer(request.param)
    try:
        yield server.start()
    finally:
        server.stop()


@contextlib.contextmanager
def machines(url: str, count: int, *extra: str, **env: str) -> Iterator[list[BrokerProcess]]:
    """*count* brokers bridged through *url*, each with a socket of its own and *env*
    (CHANNELS_... settings) in its environment; always stopped (and continued first,
    if a test stopped one with SIGSTOP)."""
    directory = tempfile.mkdtemp(prefix='mpch-m-')
    environment = dict(os.environ, **env) if env else None
    brokers = [BrokerProcess(os.path.join(directory, f'm{n}.sock'), '--bridge', url, *extra,
                             env=environment) for n in range(count)]
    try:
        for broker in brokers:
            broker.start()
        yield brokers
    finally:
        for broker in brokers:
            if broker.process is not None and broker.process.poll() is None:
                broker.process.send_signal(signal.SIGCONT)
            broker.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _user(received: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    return [(topic, data) for topic, data in received if not topic.startswith('lona.')]


def _wait_bridged(brokers: list[BrokerProcess]) -> None:
    """Until every broker's bridge is connected and has heard every other broker."""
    def ready() -> bool:
        for broker in brokers:
            bridge = broker.stats()['bridge']
            if not bridge['connected'] or len(bridge['peers']) < len(brokers) - 1:
                return False
        return True
    wait_until(ready, 20, what='every bridge connected and hearing the others')


def test_a_message_reaches_every_matching_channel_on_every_machine_exactly_once(engine):
    with machines(engine.url, 2) as (a, b), \
            app_processes(a.address, 2) as (a1, a2), app_processes(b.address, 2) as (b1, b2):
        for app in (a2, b1, b2):
            app.subscribe('chat.*')
        for app in (a2, b1, b2):
            assert app.call('flush', 20)
        _wait_bridged([a, b])
        a1.send_many('chat.lobby', 50)
        b2.send_many('chat.lobby', 50, start=1000)
        for app in (a2, b1, b2):
            got = app.wait_received('chat.*', 100)
            assert len(_user(got)) == 100
            mine = [d['n'] for _, d in _user(got) if d['pid'] == a1.pid]
            theirs = [d['n'] for _, d in _user(got) if d['pid'] == b2.pid]
            assert mine == list(range(50))                    # each sender's order
            assert theirs == list(range(1000, 1050))


@pytest.mark.parametrize('engine', ['nats'], indirect=True)
def test_local_messages_never_leave_their_process_and_expired_ones_are_dropped(engine):
    with machines(engine.url, 2) as (a, b), \
            app_processes(a.address, 1) as (a1,), app_processes(b.address, 1) as (b1,):
        b1.subscribe('news')
        assert b1.call('flush', 20)
        _wait_bridged([a, b])
        a1.send_many('news', 3, local=True)
        a1.send_many('news', 1, start=3)
        b1.wait_received('news', 1)
        assert [d['n'] for _, d in _user(b1.received('news'))] == [3]
        assert a.stats()['bridge']['sent'] == 1


def test_stats_show_the_bridge_with_its_password_redacted():
    server = EngineServer('redis', password='s3cret')
    try:
        server.start()
        with machines(server.url, 1) as (a,):
            bridge = a.stats()['bridge']
            assert bridge['connected'] is True
            assert 's3cret' not in bridge['url'] and bridge['url'].startswith('redis://')
            assert {'url', 'connected', 'sent', 'received', 'lost', 'peers'} <= set(bridge)
            text = subprocess.run([sys.executable, str(BROKER_SCRIPT), 'stats', '--address',
                                   a.address], capture_output=True, text=True, timeout=30)
            assert 's3cret' not in text.stdout and 'bridge' in text.stdout, text.stdout
    finally:
        server.stop()


def test_a_broker_without_a_bridge_shows_none(broker):
    assert broker.stats()['bridge'] is None


@pytest.mark.parametrize('url, says', [
    ('redis://127.0.0.1:notaport', 'not valid'),
    ('http://127.0.0.1:80', 'redis://'),
], ids=['bad port', 'not an engine scheme'])
def test_a_bad_bridge_url_stops_the_broker_at_start_saying_why(broker_address, url, says):
    result = subprocess.run([sys.executable, str(BROKER_SCRIPT), '--address', broker_address,
                             '--bridge', url], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert says in result.stderr, result.stderr
    assert not os.path.exists(broker_address)


def test_a_wrong_engine_password_stops_the_broker_at_start_saying_so(broker_address):
    server = EngineServer('redis', password='s3cret')
    try:
        server.start()
        url = server.url.replace('s3cret', 'wrong')
        result = subprocess.run([sys.executable, str(BROKER_SCRIPT), '--address',
                                 broker_address, '--bridge', url],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result
        assert 'password' in result.stderr.lower() and 'wrong' not in result.stderr, \
            result.stderr
    finally:
        server.stop()


def test_an_engine_down_at_start_is_waited_for_with_a_warning(broker_address):
    from engines import free_port
    with machines(f'redis://127.0.0.1:{free_port()}', 1) as (a,):
        assert a.stats()['bridge']['connected'] is False
        wait_until(lambda: 'WARNING channels.bridge' in a.log, what='a warning')


def test_engine_order_gives_every_machine_one_order(engine):
    with machines(engine.url, 2, '--bridge-order', 'engine') as (a, b), \
            app_processes(a.address, 1) as (a1,), app_processes(b.address, 1) as (b1,):
        for app in (a1, b1):
            app.subscribe('t')
            assert app.call('flush', 20)
        _wait_bridged([a, b])
        a1.send_many('t', 100)
        b1.send_many('t', 100, start=1000)
        seen = [[(d['pid'], d['n']) for _, d in _user(app.wait_received('t', 200))]
                for app in (a1, b1)]
        assert len(seen[0]) == 200 and seen[0] == seen[1]


# helpers for the outage tests ------------------------------------------------------------

def _numbers(app, topic: str) -> dict[int, list[int]]:
    """Sender pid -> the 'n' of each user message *app* got on *topic*, in order."""
    got: dict[int, list[int]] = {}
    for _, data in _user(app.received(topic)):
        got.setdefault(data['pid'], []).append(data['n'])
    return got


def _wait_count(app, topic: str, count: int, timeout: float = 30.0) -> None:
    wait_until(lambda: app.call('count', topic) >= count, timeout, interval=0.05,
               what=f'{count} messages on {topic!r} in pid {app.pid} '
                    f'(got {app.call("count", topic)})')


def _subscribed(broker: BrokerProcess, apps, *topics: str) -> None:
    for app in apps:
        for topic in topics:
            app.subscribe(topic)
        assert app.call('flush', 20)
        broker.wait_subscribed(app.pid, [t for t in topics if not t.startswith('lona.')])


def _bridge(broker: BrokerProcess) -> dict:
    return broker.stats()['bridge']


def _stats_json(broker: BrokerProcess) -> dict:
    """What ``channels-broker stats --json`` prints."""
    result = subprocess.run([sys.executable, str(BROKER_SCRIPT), 'stats', '--json',
                             '--address', broker.address], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result
    return json.loads(result.stdout)


def _losses(app) -> list[dict]:
    return [data for _, data in app.received(LOST)]


# 1. nothing lost, nothing repeated across an engine outage ------------------------------

@pytest.mark.slow
def test_nothing_is_lost_or_repeated_across_machines_when_the_engine_is_killed_twice(
        engine):
    """20,000 messages from 2 machines to 2 others; the engine (with persistence) is
    SIGKILLed and restarted twice during the stream."""
    per_sender = 10_000
    with machines(engine.url, 4) as (a, b, c, d), \
            app_processes(a.address, 1) as (a1,), app_processes(b.address, 1) as (b1,), \
            app_processes(c.address, 1) as (c1,), app_processes(d.address, 1) as (d1,):
        _subscribed(c, [c1], 'feed', LOST)
        _subscribed(d, [d1], 'feed', LOST)
        _wait_bridged([a, b, c, d])
        senders, receivers = (a1, b1), (c1, d1)
        for app in senders:           # about 4 s of stream, in batches of 25 (as apps do)
            app.begin('send_paced', 'feed', per_sender, 2500, 0, {})
        for received in (2_000, 9_000):
            wait_until(lambda: _bridge(c)['received'] >= received, 30,
                       what=f'{received} messages across before the kill')
            assert all(app.busy() for app in senders), 'the kill missed the stream'
            engine.kill()
            engine.restart()
        for app in senders:
            app.finish('send_paced', 60)
            app.send_many('feed', 1, start=per_sender)     # a marker behind the stream
        for app in receivers:
            _wait_count(app, 'feed', 2 * per_sender + 2, 60)
        for app in receivers:
            assert _numbers(app, 'feed') == {s.pid: list(range(per_sender + 1))
                                             for s in senders}
            assert app.call('link_counters')['duplicates'] == 0    # none came twice
            assert _losses(app) == []
        for broker in (c, d):
            assert _bridge(broker)['lost'] == 0
        for broker in (a, b):
            bridge = _bridge(broker)
            assert bridge['dropped'] == 0 and bridge['pending_messages'] == 0
            assert bridge['reconnects'] >= 2


# 2. never silent ----------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['redis', 'nats'])
def test_every_process_of_a_machine_is_told_of_what_an_engine_without_persistence_lost(kind):
    server = EngineServer(kind, persist=False).start()
    try:
        with machines(server.url, 2) as (a, c), app_processes(a.address, 1) as (a1,), \
                app_processes(c.address, 2) as (c1, c2):
            _subscribed(a, [a1], LOST)
            _subscribed(c, [c1, c2], 'feed', LOST)
            _wait_bridged([a, c])
            a1.send_many('feed', 100)
            for app in (c1, c2):
                _wait_count(app, 'feed', 100)
            _wait_saved(c, a, 100)
            c.kill()                            # machine C is down ...
            a1.send_many('feed', 200, start=100)
            wait_until(lambda: _bridge(a)['sent'] == 300, 15, what='the engine to take 300')
            server.restart(persist=False)       # ... while the engine loses 200 for it
            c.start()
            wait_until(lambda: _bridge(a)['connected'], 15, what='A connected again')
            a1.send_many('feed', 100, start=300)
            for app in (c1, c2):
                _wait_count(app, 'feed', 200)
                wait_until(lambda: _losses(app), 15, what=f'the loss told to pid {app.pid}')
                [loss] = _losses(app)
                assert loss['count'] == 200
                assert 'reset' in loss['reason'] or 'recreated' in loss['reason'], loss
                assert _numbers(app, 'feed') == {a1.pid: list(range(100)) +
                                                 list(range(300, 400))}
            assert _bridge(c)['lost'] == 200
            assert 'WARNING channels.broker: the bridge lost 200 messages' in c.log
            assert _losses(a1) == []        # machine A missed nothing
    finally:
        server.stop()


def test_a_broker_back_after_the_stream_was_trimmed_past_it_tells_its_processes(engine):
    with machines(engine.url, 2, CHANNELS_BRIDGE_RETENTION_ENTRIES='20') as (a, c), \
            app_processes(a.address, 1) as (a1,), app_processes(c.address, 2) as (c1, c2):
        _subscribed(c, [c1, c2], 'feed', LOST)
        _wait_bridged([a, c])
        a1.send_many('feed', 5)
        for app in (c1, c2):
            _wait_count(app, 'feed', 5)
        _wait_saved(c, a, 5)
        c.kill()
        a1.call('send_paced', 'feed', 400, 500, 5, {})   # an entry each: ~20 are kept
        wait_until(lambda: _bridge(a)['sent'] == 405, 15, what='the engine to take 405')
        c.start()
        for app in (c1, c2):
            wait_until(lambda: _losses(app), 20, what=f'the loss told to pid {app.pid}')
            [loss] = _losses(app)
            assert 'trimmed' in loss['reason'] or 'removed' in loss['reason'], loss
            wait_until(lambda: len(_user(app.received('feed'))) - 5 + loss['count'] == 400,
                       15, what='the messages kept after the trimmed ones')
            [numbers] = _numbers(app, 'feed').values()
            kept = len(numbers) - 5
            assert 0 < loss['count'] and numbers == list(range(5)) + list(range(405 - kept,
                                                                              405))
        assert _bridge(c)['lost'] == loss['count']
        assert f'WARNING channels.broker: the bridge lost {loss["count"]} messages' in c.log


def _wait_saved(broker: BrokerProcess, heard: BrokerProcess, last: int) -> None:
    """Until *broker*'s bridge has saved a state in which it had routed the first *last*
    messages of *heard*'s broker."""
    path = broker.address + '.bridge'
    name = _bridge(heard)['broker']

    def saved() -> bool:
        try:
            with open(path) as file:
                state = json.load(file)
        except (OSError, ValueError):
            return False
        return state['origins'].get(name, [0, 0])[1] >= last
    wait_until(saved, 15, what=f'the bridge state saved in {path}')


# 3. a broker restart on a bridged machine -------------------------------------------------

@pytest.mark.parametrize('how', ['killed', 'stopped'])
def test_a_restarted_broker_reads_on_where_it_was_and_its_processes_miss_nothing(engine, how):
    with machines(engine.url, 2) as (a, b), app_processes(a.address, 1) as (a1,), \
            app_processes(b.address, 2) as (b1, b2):
        _subscribed(b, [b1, b2], 'feed', LOST)
        _wait_bridged([a, b])
        a1.send_many('feed', 10)
        for app in (b1, b2):
            _wait_count(app, 'feed', 10)
        _wait_saved(b, a, 10)
        b.kill() if how == 'killed' else b.stop()
        a1.send_many('feed', 500, start=10)
        wait_until(lambda: _bridge(a)['sent'] == 510, 15, what='the engine to take 510')
        b.start()                         # b1, b2 reconnect by themselves
        a1.send_many('feed', 1, start=510)   # a marker behind the 500
        for app in (b1, b2):
            _wait_count(app, 'feed', 511)
            assert _numbers(app, 'feed') == {a1.pid: list(range(511))}
            assert _losses(app) == []
        assert _bridge(b)['lost'] == 0


@pytest.mark.parametrize('engine', ['redis'], indirect=True)
def test_the_bridge_state_file_is_private_and_a_corrupt_one_is_logged_and_ignored(engine):
    with machines(engine.url, 2) as (a, b), app_processes(a.address, 1) as (a1,), \
            app_processes(b.address, 1) as (b1,):
        _subscribed(b, [b1], 'feed')
        _wait_bridged([a, b])
        a1.send_many('feed', 1)
        _wait_saved(b, a, 1)
        path = b.address + '.bridge'
        assert os.stat(path).st_mode & 0o777 == 0o600
        b.kill()
        with open(path, 'w') as file:
            file.write('{"engine": "redis", "namespace": "mpchannels", "position": [1], '
                       '"origins": {}}')
        b.start()
        wait_until(lambda: 'ignoring the bridge state file' in b.log, 10, what='a warning')
        assert 'is not one a bridge saves' in b.log
        _wait_bridged([a, b])
        a1.send_many('feed', 1, start=1)
        _wait_count(b1, 'feed', 2)


# 4. liveness ----------------------------------------------------------------------------------

@pytest.mark.parametrize('outage', ['paused', 'killed'])
def test_an_engine_outage_is_seen_within_seconds_local_routing_goes_on_and_it_recovers(
        engine, outage):
    with machines(engine.url, 2) as (a, b), app_processes(a.address, 2) as (a1, a2), \
            app_processes(b.address, 1) as (b1,):
        _subscribed(a, [a2], 'here')
        _subscribed(b, [b1], 'there')
        _wait_bridged([a, b])
        engine.pause() if outage == 'paused' else engine.kill()
        try:
            began = time.monotonic()
            wait_until(lambda: not _bridge(a)['connected'] and not _bridge(b)['connected'],
                       10, what='both bridges shown not connected')
            noticed = time.monotonic() - began
            assert noticed < 8, noticed
            assert _stats_json(a)['bridge']['connected'] is False
            for broker in (a, b):
                assert 'WARNING channels.bridge' in broker.log and 'not connected' in broker.log
            a1.send_many('there', 20)             # waits for the engine
            a1.send_many('here', 20)              # local routing goes on meanwhile
            _wait_count(a2, 'here', 20, 10)
        finally:
            engine.resume() if outage == 'paused' else engine.start()
        wait_until(lambda: _bridge(a)['connected'] and _bridge(b)['connected'], 15,
                   what='both bridges connected again')
        _wait_count(b1, 'there', 20, 15)
        assert _numbers(b1, 'there') == {a1.pid: list(range(20))}
        assert 'connected again' in a.log


# 5. bounded -------------------------------------------------------------------------------

def test_past_the_bridge_bound_messages_are_dropped_counted_and_reported_lost_elsewhere(
        engine):
    with machines(engine.url, 2, CHANNELS_BRIDGE_MAX_PENDING_BYTES='20000') as (a, b), \
            app_processes(a.address, 2) as (a1, a2), app_processes(b.address, 2) as (b1, b2):
        _subscribed(a, [a2], 'burst', LOST)
        _subscribed(b, [b1, b2], 'burst', LOST)
        _wait_bridged([a, b])
        engine.kill()
        try:
            wait_until(lambda: not _bridge(a)['connected'], 10, what='A not connected')
            a1.send_many('burst', 1000)
            _wait_count(a2, 'burst', 1000)        # this machine's process gets them all
            wait_until(lambda: _bridge(a)['dropped'] > 0, 10, what='drops counted')
            dropped = _bridge(a)['dropped']
            assert 0 < dropped < 1000 and _bridge(a)['pending_bytes'] <= 20000
        finally:
            engine.start()
        assert f'{dropped} messages from this machine not sent' in a.log
        assert 'over its bound of 20000 bytes' in a.log
        for app in (b1, b2):
            _wait_count(app, 'burst', 1000 - dropped, 20)
            wait_until(lambda: _losses(app), 15, what=f'the loss told to pid {app.pid}')
            assert sum(loss['count'] for loss in _losses(app)) == dropped
            [numbers] = _numbers(app, 'burst').values()
            assert numbers == sorted(numbers) and len(numbers) == 1000 - dropped
        assert _bridge(b)['lost'] == dropped
        assert _losses(a2) == []                # nothing was lost for machine A


# what else holds across machines --------------------------------------------------------------

@pytest.mark.parametrize('engine', ['nats'], indirect=True)
def test_a_message_that_expires_while_the_engine_is_down_is_dropped_on_arrival(engine):
    with machines(engine.url, 2) as (a, b), app_processes(a.address, 1) as (a1,), \
            app_processes(b.address, 1) as (b1,):
        _subscribed(b, [b1], 'news')
        _wait_bridged([a, b])
        engine.kill()
        try:
            wait_until(lambda: not _bridge(a)['connected'], 10, what='A not connected')
            a1.send_many('news', 1, expiry=timedelta(seconds=0.5))
            deadline = time.time() + 0.5
            a1.send_many('news', 1, start=1)
            wait_until(lambda: _bridge(a)['pending_messages'] == 2, 10, what='both waiting')
            wait_until(lambda: time.time() > deadline + 0.1, 5, what='the expiry to pass')
        finally:
            engine.start()
        _wait_count(b1, 'news', 1, 20)
        assert _numbers(b1, 'news') == {a1.pid: [1]}
        assert b.stats()['expired'] == 1           # dropped by B's broker, not only by b1


@pytest.mark.parametrize('engine', ['redis'], indirect=True)
def test_internal_topics_from_another_machine_are_never_routed(engine):
    from channels import wire
    from channels.bridge import Bridge
    with machines(engine.url, 1) as (b,), app_processes(b.address, 1) as (b1,):
        _subscribed(b, [b1], '*', LOST)
        forger = Bridge.from_url(engine.url, broker_id='forger', on_frames=lambda _: None,
                                 on_lost=lambda *_: None)
        forger.start()
        try:
            wait_until(lambda: _bridge(b)['peers'], 15, what='B to hear the forger')
            frames = [wire.encode_message(topic, f'{n}-{"0" * 16}-1', time.time(), None,
                                          False, b'\x80\x04}\x94.')
                      for n, topic in ((7, LOST), (8, 'lona.channels.other'), (9, 'x'))]
            forger.publish(b''.join(frames), 3)
            wait_until(lambda: _bridge(b)['received'] == 3, 15, what='the three at B')
            wait_until(lambda: _user(b1.received('*')), 15, what="'x' in b1")
        finally:
            forger.stop()
        topics = [topic for topic, _ in b1.received('*')]
        assert [topic for topic, _ in _user(b1.received('*'))] == ['x']
        assert 'lona.channels.other' not in topics and LOST not in topics
        assert _losses(b1) == []
        [process] = b.stats()['processes']
        assert process['messages_out'] == 1       # B's broker routed only 'x'


def test_a_graceful_stop_with_the_engine_down_is_bounded_and_logs_what_was_not_sent(engine):
    with machines(engine.url, 1, '--stop-timeout', '4') as (a,), \
            app_processes(a.address, 1) as (a1,):
        _wait_bridged([a])
        engine.pause()
        try:
            a1.send_many('feed', 30)
            wait_until(lambda: _bridge(a)['pending_messages'] == 30, 10, what='30 pending')
            began = time.monotonic()
            a.process.send_signal(signal.SIGTERM)
            a.process.wait(15)
            took = time.monotonic() - began
        finally:
            engine.resume()
        assert took < 4 + 1, took
        assert 'WARNING channels.bridge' in a.log
        assert '30 messages from this machine not sent to the other machines: the broker ' \
               'stopped before' in a.log
