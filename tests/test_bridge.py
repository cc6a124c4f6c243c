"""The bridge between brokers on different machines, against real Redis and NATS servers.

Each :class:`Bridge` here stands for the broker of one machine; the engines are
redis-server and nats-server -js started by the test on free ports (tests/engines.py).
"""

from __future__ import annotations

import builtins
import contextlib
import http.server
import logging
import sys
import threading
import time

import pytest
from engines import EngineServer
from support import wait_until

from channels import wire
from channels.bridge import Bridge, Retention
from channels.errors import ConfigurationError

ENGINES = ['redis', 'nats']


@pytest.fixture(params=ENGINES)
def engine(request):
    """A fresh engine server with persistence, always stopped."""
    server = EngineServer(request.param)
    try:
        yield server.start()
    finally:
        server.stop()


class Machine:
    """What a broker would do with its bridge: record the frames and the losses."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.ids: list[str] = []
        self.losses: list[tuple[int, str]] = []
        self.threads: set[str] = set()

    def on_frames(self, data: bytes) -> None:
        self.threads.add(threading.current_thread().name)
        ids = []
        for kind, start, end in wire.iter_frames(data, 1 << 30):
            assert kind == wire.MESSAGE
            _, message_id, *_ = wire.decode_message(data, start + wire.HEADER.size, end)
            ids.append(message_id)
        with self.lock:
            self.ids.extend(ids)

    def on_lost(self, count: int, reason: str) -> None:
        self.threads.add(threading.current_thread().name)
        with self.lock:
            self.losses.append((count, reason))

    @property
    def lost(self) -> int:
        with self.lock:
            return sum(count for count, _ in self.losses)

    def received(self) -> list[str]:
        with self.lock:
            return list(self.ids)

    def from_origin(self, origin: str) -> list[int]:
        """The numbers of *origin*'s messages, in the order they arrived."""
        return [int(i[len(origin) + 1:]) for i in self.received()
                if i.startswith(origin + '.')]


@pytest.fixture
def bridges():
    """make(url, name, **options) -> (Bridge, Machine), started; every one stopped after."""
    made: list[Bridge] = []

    def make(url: str, name: str, *, start: bool = True, **options):
        machine = Machine(name)
        bridge = Bridge.from_url(url, options.pop('namespace', 'test'), broker_id=name,
                                 on_frames=machine.on_frames, on_lost=machine.on_lost,
                                 **options)
        made.append(bridge)
        if start:
            bridge.start()
        return bridge, machine

    yield make
    for bridge in made:
        assert bridge.stop(10), f'{bridge!r} did not stop'


def frames(origin: str, numbers: range, payload: bytes = b'p' * 40) -> bytes:
    """MESSAGE frames with ids 'origin.n', as a broker would batch them."""
    return b''.join(wire.encode_message('chat.room', f'{origin}.{n}', 1.0, None, False,
                                        payload) for n in numbers)


def publish(bridge: Bridge, origin: str, total: int, batch: int = 10, start: int = 0,
            pause_every: int = 0) -> None:
    for first in range(start, start + total, batch):
        numbers = range(first, min(first + batch, start + total))
        assert bridge.publish(frames(origin, numbers), len(numbers))
        if pause_every and first % pause_every == 0:
            time.sleep(0.001)


def settled(bridge: Bridge) -> bool:
    return bridge.stats()['pending_messages'] == 0


# delivery -----------------------------------------------------------------------------

def test_messages_reach_every_other_bridge_once_in_each_senders_order(engine, bridges):
    machines = {name: bridges(engine.url, name) for name in 'abc'}
    for name, (bridge, _) in machines.items():
        publish(bridge, name, 600, batch=7)
    for name, (_, machine) in machines.items():
        others = [o for o in 'abc' if o != name]
        wait_until(lambda: len(machine.received()) >= 1200, 20,
                   what=f'{name} to receive 1200 messages (got {len(machine.received())})')
        for origin in others:
            assert machine.from_origin(origin) == list(range(600))
    for name, (bridge, machine) in machines.items():
        assert len(machine.received()) == 1200 and machine.losses == []
        # (the engine's acknowledgement may reach the sender after its readers had it)
        wait_until(lambda: bridge.stats()['sent'] == 600, 10, what=f'{name} to count 600 sent')
        assert bridge.stats()['received'] == 1200


def test_a_bridge_skips_its_own_entries(engine, bridges):
    alone, alone_seen = bridges(engine.url, 'a')
    other, other_seen = bridges(engine.url, 'b')
    publish(alone, 'a', 50)
    wait_until(lambda: len(other_seen.received()) == 50, 10, what='b to get a\'s 50')
    wait_until(lambda: alone.stats()['entries_received'] >= 1, 5, what='a to read its own')
    assert alone_seen.received() == []


def test_echo_hands_a_bridge_its_own_entries_in_stream_order(engine, bridges):
    bridge, seen = bridges(engine.url, 'a', echo=True)
    publish(bridge, 'a', 30, batch=3)
    wait_until(lambda: len(seen.received()) == 30, 10, what='a to get its own 30')
    assert seen.from_origin('a') == list(range(30))


def test_callbacks_run_on_the_bridge_thread(engine, bridges):
    sender, _ = bridges(engine.url, 'a')
    _, seen = bridges(engine.url, 'b')
    publish(sender, 'a', 5)
    wait_until(lambda: len(seen.received()) == 5, 10, what='5 messages')
    assert seen.threads == {'channels-bridge'}


def test_stats_show_the_url_without_password_and_the_peers(bridges):
    server = EngineServer('redis', password='s3cret').start()
    try:
        a, _ = bridges(server.url, 'a')
        b, seen = bridges(server.url, 'b')
        publish(a, 'a', 10)
        wait_until(lambda: len(seen.received()) == 10, 10, what='10 messages')
        stats = b.stats()
        assert 's3cret' not in repr(stats) and stats['url'] == \
            f'redis://:***@127.0.0.1:{server.port}/0'
        assert stats['connected'] is True and stats['received'] == 10
        assert [peer['broker'] for peer in stats['peers']] == ['a']
        assert 0 <= stats['peers'][0]['last_heard_s'] < 5
        assert {'sent', 'lost', 'position', 'pending_bytes', 'reconnects',
                'lost_reasons'} <= stats.keys()
    finally:
        server.stop()


# outages ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_nothing_lost_or_repeated_when_the_engine_is_killed_and_restarted_twice(engine,
                                                                             bridges):
    senders = [bridges(engine.url, name)[0] for name in ('s1', 's2')]
    receivers = [bridges(engine.url, name)[1] for name in ('r1', 'r2')]
    per_sender = 10_000

    def stream(bridge: Bridge, origin: str) -> None:
        for first in range(0, per_sender, 20):
            assert bridge.publish(frames(origin, range(first, first + 20)), 20)
            time.sleep(0.003)

    threads = [threading.Thread(target=stream, args=(bridge, name))
               for bridge, name in zip(senders, ('s1', 's2'))]
    for thread in threads:
        thread.start()
    try:
        for _ in range(2):
            time.sleep(0.3)
            assert all(thread.is_alive() for thread in threads), 'the kill missed the stream'
            engine.kill()
            engine.restart()
    finally:
        for thread in threads:
            thread.join()
    for machine in receivers:
        wait_until(lambda: len(machine.received()) >= 2 * per_sender, 60,
                   what=f'{machine.name} to get {2 * per_sender} (got '
                        f'{len(machine.received())})')
    time.sleep(0.5)                      # anything repeated would arrive by now
    for machine in receivers:
        for origin in ('s1', 's2'):
            assert machine.from_origin(origin) == list(range(per_sender))
        assert machine.losses == [] and len(machine.received()) == 2 * per_sender
    assert all(settled(bridge) for bridge in senders)


@pytest.mark.parametrize('engine_kind', ENGINES)
def test_engine_restarted_without_persistence_reports_the_lost_messages(engine_kind, bridges):
    server = EngineServer(engine_kind, persist=False).start()
    try:
        sender, _ = bridges(server.url, 'a')
        receiver, seen = bridges(server.url, 'b')
        publish(sender, 'a', 100)
        wait_until(lambda: len(seen.received()) == 100, 10, what='the first 100')
        state = receiver.stats() and receiver.state()
        receiver.stop()                  # machine b is down ...
        publish(sender, 'a', 50, start=100)
        wait_until(lambda: settled(sender), 10, what='the engine to take 50 more')
        server.restart(persist=False)    # ... while the engine loses them
        back, seen_back = bridges(server.url, 'b', state=state)
        wait_until(lambda: seen_back.losses, 15, what='on_lost after the reset')
        publish(sender, 'a', 10, start=150)
        wait_until(lambda: len(seen_back.received()) == 10, 15, what='new messages')
        assert seen_back.losses[0][0] == 50
        assert 'reset' in seen_back.losses[0][1] or 'recreated' in seen_back.losses[0][1]
        assert seen_back.from_origin('a') == list(range(150, 160))
        assert back.stats()['lost'] == 50
    finally:
        server.stop()


def test_a_bridge_resuming_after_the_stream_was_trimmed_past_it_reports_the_loss(
        engine, bridges):
    retention = Retention(entries=20)
    sender, _ = bridges(engine.url, 'a', retention=retention)
    receiver, seen = bridges(engine.url, 'b', retention=retention)
    publish(sender, 'a', 5)
    wait_until(lambda: len(seen.received()) == 5, 10, what='the first 5')
    state = receiver.state()
    receiver.stop()
    for n in range(5, 405):              # one entry each: the stream keeps ~20 of 400
        sender.publish(frames('a', range(n, n + 1)), 1)
        wait_until(lambda: settled(sender), 10, what='the engine to take it', interval=0.0005)
    back, seen_back = bridges(engine.url, 'b', retention=retention, state=state)
    wait_until(lambda: seen_back.received() and seen_back.lost + len(seen_back.received())
               == 400, 15, what='the kept messages and a loss report')
    arrived = seen_back.from_origin('a')
    assert arrived == list(range(405 - len(arrived), 405))
    assert sum(count for count, _ in seen_back.losses) == 400 - len(arrived)
    assert 'trimmed' in seen_back.losses[0][1] or 'removed' in seen_back.losses[0][1]


def test_entries_older_than_the_retention_are_reported_lost_to_a_resuming_bridge(
        engine, bridges):
    retention = Retention(seconds=1.0)
    sender, _ = bridges(engine.url, 'a', retention=retention)
    receiver, seen = bridges(engine.url, 'b', retention=retention)
    publish(sender, 'a', 5)
    wait_until(lambda: len(seen.received()) == 5, 10, what='the first 5')
    state = receiver.state()
    receiver.stop()
    publish(sender, 'a', 30, start=5)
    wait_until(lambda: settled(sender), 10, what='the engine to take 30')
    time.sleep(2.5)                      # the max age passes (and a trim runs)
    back, seen_back = bridges(engine.url, 'b', retention=retention, state=state)
    wait_until(lambda: seen_back.losses, 15, what='a loss report')
    assert seen_back.losses[0][0] == 30 and seen_back.received() == []


# liveness -------------------------------------------------------------------------------

def _warned(caplog, text: str) -> bool:
    return any(record.levelno == logging.WARNING and text in record.getMessage()
               for record in caplog.records)


def test_an_engine_that_stops_is_noticed_within_seconds_and_the_bridge_recovers(
        engine, bridges, caplog):
    caplog.set_level(logging.WARNING, logger='channels.bridge')
    sender, _ = bridges(engine.url, 'a')
    receiver, seen = bridges(engine.url, 'b')
    engine.kill()
    started = time.monotonic()
    wait_until(lambda: not receiver.stats()['connected'], 6, what='connected False')
    assert time.monotonic() - started < 6
    assert _warned(caplog, 'not connected')
    publish(sender, 'a', 20)             # kept while the engine is down
    engine.restart()
    wait_until(lambda: receiver.stats()['connected'], 10, what='connected again')
    wait_until(lambda: len(seen.received()) == 20, 15, what='the 20 sent during the outage')
    assert seen.from_origin('a') == list(range(20)) and seen.losses == []
    assert receiver.stats()['reconnects'] >= 1


def test_a_half_open_connection_is_noticed_within_seconds(engine, bridges, caplog):
    caplog.set_level(logging.WARNING, logger='channels.bridge')
    receiver, seen = bridges(engine.url, 'b')
    sender, _ = bridges(engine.url, 'a')
    engine.pause()                       # sockets open, nothing answers
    try:
        wait_until(lambda: not receiver.stats()['connected'], 8, what='connected False')
        assert _warned(caplog, 'not connected')
    finally:
        engine.resume()
    wait_until(lambda: receiver.stats()['connected'], 15, what='connected again')
    publish(sender, 'a', 10)
    wait_until(lambda: len(seen.received()) == 10, 15, what='messages after the pause')


def _delete_consumers(url: str, stream: str) -> list[str]:
    """Delete every JetStream consumer of *stream*, as an operator might; their names."""
    import asyncio

    import nats

    async def delete() -> list[str]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            names = [info.name for info in await js.consumers_info(stream)]
            for name in names:
                await js.delete_consumer(stream, name)
            return names
        finally:
            await nc.close()
    return asyncio.run(delete())


@contextlib.contextmanager
def ten_through_an_engine_of_our_own(bridges, kind: str):
    """A *kind* server of this test's, bridge a sending to bridge b through it, and a's
    first 10 messages at b: (server, sender, receiver, what b saw); the server always
    stopped (the bridges by their fixture)."""
    server = EngineServer(kind).start()
    try:
        sender, _ = bridges(server.url, 'a')
        receiver, seen = bridges(server.url, 'b')
        publish(sender, 'a', 10)
        wait_until(lambda: len(seen.received()) == 10, 10, what='the first 10')
        yield server, sender, receiver, seen
    finally:
        server.stop()


def ten_more_arrive_and_none_is_lost(sender: Bridge, seen: Machine) -> None:
    publish(sender, 'a', 10, start=10)
    wait_until(lambda: len(seen.received()) == 20, 10, what='the next 10')
    assert seen.from_origin('a') == list(range(20)) and seen.losses == []


def test_a_consumer_deleted_on_the_nats_server_is_made_again_and_nothing_is_lost(bridges):
    with ten_through_an_engine_of_our_own(bridges, 'nats') as (server, sender, _, seen):
        assert len(_delete_consumers(server.url, 'test')) == 2      # a's and b's
        ten_more_arrive_and_none_is_lost(sender, seen)


def test_a_nats_consumer_that_sends_heartbeats_and_no_entries_is_made_again(bridges, caplog):
    # As a consumer the server stopped delivering was seen to do (after an operator
    # deleted the consumer and the stream in turn): alive to every other check
    caplog.set_level(logging.WARNING, logger='channels.bridge')
    with ten_through_an_engine_of_our_own(bridges, 'nats') as (_, sender, receiver, seen):
        engine = receiver.engine

        async def deaf(msg) -> None:      # takes everything, heartbeats too; reads nothing
            engine._heard = time.monotonic()
        engine._on_delivery = deaf
        publish(sender, 'a', 5, start=10)
        wait_until(lambda: _warned(caplog, 'the stream holds entries'), 10,
                   what='the silent consumer noticed')
        del engine._on_delivery           # the consumer made again delivers
        publish(sender, 'a', 5, start=15)
        wait_until(lambda: len(seen.received()) == 20, 10, what='the 10 sent since')
        assert seen.from_origin('a') == list(range(20)) and seen.losses == []


def test_a_reading_connection_killed_by_redis_is_noticed_and_resumed(bridges, caplog):
    caplog.set_level(logging.WARNING, logger='channels.bridge')
    with ten_through_an_engine_of_our_own(bridges, 'redis') as (server, sender, receiver,
                                                                 seen):
        server.redis_cli('CLIENT', 'KILL', 'TYPE', 'normal')
        wait_until(lambda: receiver.stats()['reconnects'] >= 1, 8, what='a reconnect')
        assert _warned(caplog, 'not connected')
        ten_more_arrive_and_none_is_lost(sender, seen)


def test_replies_over_the_redis_output_buffer_limit_are_read_in_smaller_parts(bridges):
    server = EngineServer('redis', extra=('--client-output-buffer-limit',
                                          'normal 1mb 0 0')).start()
    try:
        sender, _ = bridges(server.url, 'a')
        receiver, seen = bridges(server.url, 'b')
        receiver_stats = receiver.stats
        big = b'x' * 100_000                 # 64 of these in one reply: over 1 MB
        for n in range(60):
            assert sender.publish(frames('a', range(n, n + 1), big), 1)
        wait_until(lambda: len(seen.received()) == 60, 30,
                   what=f'60 large messages (got {len(seen.received())})')
        assert seen.from_origin('a') == list(range(60)) and seen.losses == []
        assert receiver_stats()['connected']
    finally:
        server.stop()


# bounds -------------------------------------------------------------------------------------

def test_what_waits_for_the_engine_is_bounded_and_the_excess_counted_dropped(engine, bridges,
                                                                             caplog):
    caplog.set_level(logging.WARNING, logger='channels.bridge')
    bridge, machine = bridges(engine.url, 'a', max_pending_bytes=20_000)
    engine.kill()
    wait_until(lambda: not bridge.stats()['connected'], 6, what='connected False')
    results = [bridge.publish(frames('a', range(n, n + 10)), 10) for n in range(0, 500, 10)]
    assert results[0] is True and results[-1] is False
    dropped = 500 - bridge.stats()['pending_messages']        # (the first that fit are kept)
    assert 0 < dropped < 500 and bridge.stats()['pending_bytes'] <= 20_000
    wait_until(lambda: bridge.stats()['dropped'] == dropped, 5, what=f'{dropped} counted')
    assert any('bound' in reason for reason in bridge.stats()['dropped_reasons'])
    assert _warned(caplog, f'{dropped} messages from this machine not sent')
    # this machine's processes had them: its own on_lost is for what it missed
    assert machine.losses == [] and bridge.stats()['lost'] == 0


def test_receivers_count_what_a_sender_dropped_over_its_bound(engine, bridges):
    sender, _ = bridges(engine.url, 'a', max_pending_bytes=20_000)
    receiver, seen = bridges(engine.url, 'b')
    engine.pause()
    try:
        wait_until(lambda: not sender.stats()['connected'], 8, what='sender disconnected')
        for n in range(0, 500, 10):
            sender.publish(frames('a', range(n, n + 10)), 10)
        kept = sender.stats()['pending_messages']
    finally:
        engine.resume()
    assert 0 < kept < 500
    wait_until(lambda: len(seen.received()) == kept, 20, what='what was kept')
    # the sender's next entry (a heartbeat at the latest) shows the gap
    wait_until(lambda: seen.lost == 500 - kept, 10, what='the receiver to count the gap')
    assert seen.from_origin('a') == list(range(kept))


def test_stop_is_bounded_when_the_engine_does_not_answer(engine, bridges):
    bridge, _ = bridges(engine.url, 'a')
    publish(bridge, 'a', 10)
    engine.pause()
    try:
        started = time.monotonic()
        assert bridge.stop(timeout=5) is True
        assert time.monotonic() - started < 5
    finally:
        engine.resume()


def test_an_engine_not_answering_at_start_is_joined_when_it_comes(bridges):
    server = EngineServer('redis')       # not started yet
    try:
        receiver, seen = bridges(server.url, 'b')
        assert receiver.stats()['connected'] is False
        sender, _ = bridges(server.url, 'a')
        publish(sender, 'a', 5)
        server.start()
        wait_until(lambda: len(seen.received()) == 5, 15, what='5 after the engine came')
    finally:
        server.stop()


# bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize('url, match', [
    ('http://127.0.0.1:1', 'scheme'),
    ('redis://', 'no host'),
    ('redis://127.0.0.1:99999/0', 'not valid'),
    ('redis://127.0.0.1:6380/zero', 'database must be a number'),
    ('nats://127.0.0.1:4223/x', 'no path'),
    ('', 'non-empty'),
])
def test_a_bad_url_is_a_configuration_error(url, match):
    with pytest.raises(ConfigurationError, match=match):
        Bridge.from_url(url, broker_id='a', on_frames=print, on_lost=print)


def test_a_bad_namespace_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match='namespace'):
        Bridge.from_url('redis://127.0.0.1:1/0', 'a.b', broker_id='a', on_frames=print,
                        on_lost=print)


@pytest.mark.parametrize('engine_kind', ENGINES)
def test_a_wrong_password_is_a_clear_error_at_start(engine_kind, bridges):
    server = EngineServer(engine_kind, password='right').start()
    try:
        wrong = server.url.replace(':right@', ':wrong@')
        bridge, _ = bridges(wrong, 'a', start=False)
        with pytest.raises(ConfigurationError, match='credentials|password'):
            bridge.start()
    finally:
        server.stop()


def test_a_missing_redis_password_is_a_clear_error_at_start(bridges):
    server = EngineServer('redis', password='right').start()
    try:
        bridge, _ = bridges(server.url.replace(':right@', ''), 'a', start=False)
        with pytest.raises(ConfigurationError, match='needs a password'):
            bridge.start()
    finally:
        server.stop()


@pytest.fixture
def http_port():
    """An HTTP server: something that listens and is neither Redis nor NATS."""
    server = http.server.HTTPServer(('127.0.0.1', 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.mark.parametrize('scheme', ['redis', 'nats'])
def test_an_http_server_is_not_taken_for_an_engine(scheme, http_port, bridges):
    bridge, _ = bridges(f'{scheme}://127.0.0.1:{http_port}', 'a', start=False)
    with pytest.raises(ConfigurationError, match=f'not as a {scheme.capitalize()}|not as a '
                                                 f'{scheme.upper()}'):
        bridge.start()


@pytest.mark.parametrize('scheme, other', [('redis', 'nats'), ('nats', 'redis')])
def test_the_other_engines_url_scheme_is_a_clear_error(scheme, other, bridges):
    server = EngineServer(other).start()
    try:
        bridge, _ = bridges(f'{scheme}://127.0.0.1:{server.port}', 'a', start=False)
        with pytest.raises(ConfigurationError, match=f'{other}://'):
            bridge.start()
    finally:
        server.stop()


def test_nats_without_jetstream_is_a_clear_error(bridges):
    server = EngineServer('nats')
    server._command = lambda: ['/usr/sbin/nats-server', '-a', '127.0.0.1', '-p',
                               str(server.port)]
    server.start()
    try:
        bridge, _ = bridges(server.url, 'a', start=False)
        with pytest.raises(ConfigurationError, match='-js'):
            bridge.start()
    finally:
        server.stop()


@pytest.mark.parametrize('scheme, module, extra', [('redis', 'redis', 'redis'),
                                                   ('nats', 'nats', 'nats')])
def test_a_missing_extra_names_what_to_install(scheme, module, extra, monkeypatch):
    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name == module or name.startswith(module + '.'):
            raise ImportError(f'No module named {module!r}')
        return real_import(name, *args, **kwargs)

    for name in list(sys.modules):
        if name == module or name.startswith(module + '.'):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, '__import__', without)
    with pytest.raises(ConfigurationError, match=rf"pip install 'mpchannels\[{extra}\]'"):
        Bridge.from_url(f'{scheme}://127.0.0.1:1', broker_id='a', on_frames=print,
                        on_lost=print)


# the event loop ----------------------------------------------------------------------------

@pytest.mark.parametrize('with_uvloop', [True, False])
def test_the_bridge_runs_on_uvloop_where_installed_else_on_asyncios_loop(with_uvloop, bridges,
                                                                         monkeypatch):
    import asyncio

    import uvloop                        # in the redis, nats and test extras
    if not with_uvloop:
        real_import = builtins.__import__

        def without(name, *args, **kwargs):
            if name == 'uvloop':
                raise ImportError("No module named 'uvloop'")
            return real_import(name, *args, **kwargs)
        monkeypatch.setattr(builtins, '__import__', without)
    server = EngineServer('redis').start()
    try:
        sender, _ = bridges(server.url, 'a')
        _, seen = bridges(server.url, 'b')
        publish(sender, 'a', 5)
        wait_until(lambda: len(seen.received()) == 5, 10, what='5 messages')
        assert isinstance(sender._loop, uvloop.Loop if with_uvloop
                          else asyncio.SelectorEventLoop)
    finally:
        server.stop()
