"""python-socketio and Flask-SocketIO across worker processes, through channels.socketio.

Three real servers, each started once for the module under ``channels-broker -- ...``
with its own broker address (``tests/apps`` has the apps; their docstrings list the
Socket.IO events the checks use):

``async``
    ``uvicorn socketio_async:app --workers 4``: ``socketio.AsyncServer`` (ASGI) with
    ``channels.socketio.AsyncManager()``, reached by socket.io JavaScript clients in
    Chromium (``socket.io-client`` from the npm registry, installed into a cache
    directory, never committed) and by python clients.
``sync``
    ``gunicorn -w 4 --threads 50 socketio_sync:app``: ``socketio.Server`` (WSGI,
    simple-websocket) with ``channels.socketio.Manager()``.
``flask``
    ``gunicorn -w 4 --threads 50 --preload socketio_flask:app``: Flask-SocketIO's
    ``SocketIO(app, client_manager=channels.socketio.Manager())``, created in the master
    and forked (each worker must still tell its own messages from the others').

Websocket transport only, clients and servers: no sticky sessions. The python clients
(``socketio.Client``) are connected until they sit in at least two workers, and every
check is about a client in another worker than the one that acts: each emit is asked
of the worker of some client (the ``emit`` event), so it comes from whichever worker
that is. Messages carry a tag of their test; what a client got before is ignored.
Where a check is that something does not arrive, a later emit of the same worker to
the same clients fences it: each sender's messages arrive in order.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import socketio
from brokers import ROOT
from servers import Launched, chromium, free_port, open_page
from support import wait_until

APPS = ROOT / 'tests' / 'apps'
WORKERS = 4
CLIENTS = 8                    # python clients per server, in at least 2 workers
MAX_CLIENTS = 24
OTHER = '/other'               # every other python client also joins this namespace
SOCKET_IO_CLIENT = '4.8.4'     # the npm package socket.io-client
CLIENT_CACHE = Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / \
    'mpchannels-tests' / f'socket.io-client-{SOCKET_IO_CLIENT}'
PAGES, MAX_PAGES = 4, 12
TIMEOUT = 10.0
_tags = itertools.count()


def _tag(what: str) -> str:
    return f'{what}-{next(_tags)}'


# the managers in one process ---------------------------------------------------------

def test_importing_channels_does_not_import_socketio():
    code = 'import sys, channels; print("socketio" in sys.modules, "engineio" in sys.modules)'
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          cwd=ROOT, timeout=30)
    assert done.stdout.split() == ['False', 'False'], done.stderr


@pytest.mark.parametrize('channel', ['', 'rooms.*', 'a?', '[ab]', None])
def test_a_channel_name_that_is_not_a_plain_topic_is_refused(channel):
    import channels.socketio
    for manager in (channels.socketio.Manager, channels.socketio.AsyncManager):
        with pytest.raises(ValueError, match="channel must be a non-empty str without"):
            manager(channel=channel)


@pytest.mark.parametrize('mode', ['eventlet', 'gevent', 'gevent_uwsgi'])
def test_the_sync_manager_refuses_green_threads(mode):
    import channels.socketio
    server = types.SimpleNamespace(async_mode=mode)
    with pytest.raises(ValueError, match="pass async_mode='threading'"):
        channels.socketio.Manager().set_server(server)


def test_a_manager_given_to_a_server_of_the_other_kind_is_refused():
    import channels.socketio
    with pytest.raises(ValueError, match=r'AsyncManager is for socketio.AsyncServer'):
        socketio.Server(async_mode='threading',
                        client_manager=channels.socketio.AsyncManager())
    with pytest.raises(ValueError, match=r'Manager is for socketio.Server'):
        socketio.AsyncServer(async_mode='asgi', client_manager=channels.socketio.Manager())


def test_a_write_only_manager_without_a_broker_warns_that_its_emits_reach_no_worker(caplog):
    import channels.socketio
    for manager in (channels.socketio.Manager, channels.socketio.AsyncManager):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger='channels.socketio'):
            manager(write_only=True)
        assert any('write-only' in r.getMessage() and 'CHANNELS_BROKER_ADDRESS' in
                   r.getMessage() for r in caplog.records), caplog.text


def test_a_listening_manager_without_a_broker_does_not_warn(caplog):
    import channels.socketio
    with caplog.at_level(logging.WARNING, logger='channels.socketio'):
        channels.socketio.Manager()
        channels.socketio.AsyncManager()
    assert not caplog.records, caplog.text


def test_the_topic_is_named_after_the_channel():
    import channels.socketio
    assert channels.socketio.Manager().topic == 'socketio.socketio'
    assert channels.socketio.AsyncManager(channel='chat').topic == 'socketio.chat'


def _emit_message(n: int) -> dict:
    return {'method': 'emit', 'event': 'news', 'data': [{'n': n}], 'binary': False,
            'namespace': '/', 'room': None, 'skip_sid': None, 'callback': None,
            'host_id': 'another process'}


def test_a_sync_listener_that_falls_behind_drops_counts_and_logs_once(caplog):
    import channels
    import channels.socketio
    manager = channels.socketio.Manager(maxsize=2)
    server = socketio.Server(async_mode='threading', client_manager=manager)
    server.start_background_task = lambda *args, **kwargs: None     # no listener runs
    manager.initialize()
    with caplog.at_level(logging.ERROR, logger='channels.socketio'):
        for n in range(5):
            channels.Channel(manager.topic).send(_emit_message(n))
        wait_until(lambda: manager.dropped == 3, TIMEOUT, what='3 messages dropped')
    assert [r.getMessage() for r in caplog.records if r.name == 'channels.socketio'] == [
        "the Socket.IO listener of 'socketio.socketio' is 2 messages behind: dropping what "
        "arrives until it catches up (their clients do not get them). A larger maxsize= "
        "absorbs longer bursts."]
    assert [manager._queue.get_nowait()['data'] for _ in range(2)] == [[{'n': 0}], [{'n': 1}]]


def _run_async(coroutine) -> object:
    """``asyncio.run(coroutine)`` on a thread of its own (Playwright's loop may be running
    on this one)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result(2 * TIMEOUT)


async def _until(predicate, what: str) -> None:
    import asyncio
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f'timed out after {TIMEOUT}s waiting for {what}'
        await asyncio.sleep(0.005)


def _recording_async_manager(**options) -> tuple[Any, list]:
    """An AsyncManager of an AsyncServer, and the list its remote emits' ``n`` go to
    (python-socketio's ``_handle_emit`` replaced)."""
    import channels.socketio
    manager = channels.socketio.AsyncManager(**options)
    socketio.AsyncServer(async_mode='asgi', client_manager=manager)
    handled: list = []

    async def handle_emit(message):            # python-socketio's, for a remote emit
        handled.append(message['data'][0]['n'])
    manager._handle_emit = handle_emit
    return manager, handled


def test_an_async_listener_that_falls_behind_logs_what_it_missed_and_listens_again(caplog):
    import asyncio
    import channels
    import channels.socketio
    from channels.handlers import dispatcher_of
    manager, handled = _recording_async_manager(maxsize=2)

    def logged(name: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == name]

    async def main():
        manager.initialize()
        await manager._listening()
        # the loop is held up until all five wait for it, so its inbox overflows when
        # they arrive together
        for n in range(5):
            channels.Channel(manager.topic).send(_emit_message(n))
        dispatcher = dispatcher_of(asyncio.get_running_loop())
        wait_until(lambda: dispatcher.backlog() == 5, TIMEOUT, what='the messages to wait')
        await _until(lambda: logged('channels.inbox'), 'the inbox to overflow')
        await _until(lambda: logged('channels.socketio') and
                     channels.Channel.get_channels(manager.topic), 'the listener to resume')
        channels.Channel(manager.topic).send(_emit_message(5))
        await _until(lambda: 5 in handled, 'the message sent after it resumed')

    with caplog.at_level(logging.WARNING):
        _run_async(main())
    assert handled == [0, 1, 5]
    [error] = logged('channels.socketio')
    assert re.fullmatch(r"the Socket.IO listener of 'socketio.socketio' fell \d+ messages "
                        r"behind and missed them \(their clients did not get them\); "
                        r"listening again. A larger maxsize= lets it catch up after bursts.",
                        error), error


def _callback_message(manager, sid: str, answer: str) -> dict:
    """What the worker of *sid* publishes when its client acks the first callback."""
    return {'method': 'callback', 'host_id': manager.host_id, 'sid': sid, 'namespace': '/',
            'id': 1, 'args': [answer]}


def test_a_sync_worker_without_clients_that_emits_with_a_callback_gets_the_answer():
    import channels
    import channels.socketio
    manager = channels.socketio.Manager()
    server = socketio.Server(async_mode='threading', client_manager=manager)
    answers = []
    server.emit('question', {'n': 1}, to='a sid elsewhere', callback=answers.append)
    assert server.manager_initialized     # it listens now, with no client of its own
    channels.Channel(manager.topic).send(_callback_message(manager, 'a sid elsewhere', 'yes'))
    wait_until(lambda: answers, TIMEOUT, what='the answer')
    assert answers == ['yes']


def test_the_sync_managers_first_connection_waits_for_the_broker_after_the_handshake(
        monkeypatch):
    import channels.socketio
    answered = threading.Event()
    monkeypatch.setattr(channels.socketio._runtime, 'flush',
                        lambda timeout: answered.wait(timeout))   # a broker that is slow
    manager = channels.socketio.Manager()
    server = socketio.Server(async_mode='threading', client_manager=manager)
    started = time.monotonic()
    server._handle_eio_connect('eio-1', {})       # Engine.IO's handshake: not held up
    assert time.monotonic() - started < 1.0
    connected = []
    connecting = threading.Thread(target=lambda: connected.append(
        manager.pre_connect('eio-1', '/')))       # Socket.IO's connect: waits
    connecting.start()
    connecting.join(0.1)
    assert connecting.is_alive() and not connected      # still waiting for the broker
    answered.set()
    connecting.join(TIMEOUT)
    assert connected and connected[0] is not None


def test_an_async_worker_without_clients_that_emits_with_a_callback_gets_the_answer():
    import channels
    import channels.socketio
    manager = channels.socketio.AsyncManager()
    server = socketio.AsyncServer(async_mode='asgi', client_manager=manager)
    answers = []

    async def main():
        await server.emit('question', {'n': 1}, to='a sid elsewhere',
                          callback=answers.append)
        assert server.manager_initialized
        channels.Channel(manager.topic).send(_callback_message(manager, 'a sid elsewhere',
                                                               'yes'))
        await _until(lambda: answers, 'the answer')

    _run_async(main())
    assert answers == ['yes']


def test_ending_the_streams_of_a_worker_leaves_its_async_listener_listening(caplog):
    import channels
    import channels.socketio
    from channels.asgi import end_streams
    manager, handled = _recording_async_manager()

    async def main():
        manager.initialize()
        await manager._listening()
        async with channels.listen('a.stream') as stream:
            assert end_streams() == 1             # the client's stream, not the listener
            assert stream.closed
            for n in range(3):
                channels.Channel(manager.topic).send(_emit_message(n))
            await _until(lambda: len(handled) == 3, 'the messages after end_streams()')
        manager.thread.cancel()

    with caplog.at_level(logging.WARNING):
        _run_async(main())
    assert handled == [0, 1, 2]
    assert not [r for r in caplog.records if r.name == 'channels.socketio']


def _refuse_to_unpickle() -> None:
    raise ModuleNotFoundError("No module named 'only_in_the_sender'")


class _Unloadable:
    """Data that pickles in the sender and cannot be unpickled where it arrives."""

    def __reduce__(self):
        return _refuse_to_unpickle, ()


def test_an_async_listener_skips_a_message_it_cannot_unpickle_and_loses_none_after_it(
        caplog):
    import channels
    import channels.socketio
    manager, handled = _recording_async_manager()

    async def main():
        manager.initialize()
        await manager._listening()
        channels.Channel(manager.topic).send({**_emit_message(0), 'x': _Unloadable()})
        for n in range(1, 4):
            channels.Channel(manager.topic).send(_emit_message(n))
        await _until(lambda: len(handled) == 3, 'the messages after the bad one')
        manager.thread.cancel()

    with caplog.at_level(logging.ERROR, logger='channels.socketio'):
        _run_async(main())
    assert handled == [1, 2, 3]
    assert any('only_in_the_sender' in r.getMessage() for r in caplog.records
               if r.name == 'channels.socketio')


def test_a_sync_listener_skips_a_message_it_cannot_unpickle_and_logs_it(caplog):
    import channels
    import channels.socketio
    manager = channels.socketio.Manager()
    server = socketio.Server(async_mode='threading', client_manager=manager)
    server.start_background_task = lambda *args, **kwargs: None     # no listener runs
    manager.initialize()
    with caplog.at_level(logging.ERROR, logger='channels.socketio'):
        channels.Channel(manager.topic).send({**_emit_message(0), 'x': _Unloadable()})
        channels.Channel(manager.topic).send(_emit_message(1))
        wait_until(lambda: manager._queue.qsize() == 1, TIMEOUT, what='the good message')
    assert manager._queue.get_nowait()['data'] == [{'n': 1}]
    assert any('only_in_the_sender' in r.getMessage() for r in caplog.records
               if r.name == 'channels.socketio')


def test_an_async_listener_that_cannot_reach_the_broker_retries_at_a_measured_pace(
        caplog, tmp_path):
    """ready_timeout=0 is allowed: then each failed attempt returns at once, and the
    listener must not spin the worker's event loop (and flood the log) retrying."""
    import asyncio
    import channels
    import channels.socketio
    channels.configure(BROKER_ADDRESS=str(tmp_path / 'nobody.sock'))
    manager = channels.socketio.AsyncManager(ready_timeout=0)
    socketio.AsyncServer(async_mode='asgi', client_manager=manager)

    def retries() -> int:
        return sum(1 for r in caplog.records if r.name == 'channels.socketio'
                   and 'cannot listen' in r.getMessage())

    async def main():
        manager.initialize()
        await _until(lambda: retries() >= 1, 'the first attempt to fail')
        await asyncio.sleep(1.0)       # how fast it retries is the point: a fixed window
        manager.thread.cancel()

    with caplog.at_level(logging.WARNING, logger='channels.socketio'):
        _run_async(main())
    assert retries() <= 3, f'{retries()} attempts in about 1s'


# the servers -------------------------------------------------------------------------

def _gunicorn(module: str, port: int, *extra: str) -> list[str]:
    from test_servers import gunicorn_command
    command = gunicorn_command(port, '--threads', '50', '--graceful-timeout', '5', *extra)
    return command[:-1] + [f'{module}:app']


def _command(kind: str, port: int) -> list[str]:
    if kind == 'async':
        return [sys.executable, '-m', 'uvicorn', 'socketio_async:app', '--workers',
                str(WORKERS), '--host', '127.0.0.1', '--port', str(port), '--app-dir',
                str(APPS), '--no-access-log', '--timeout-graceful-shutdown', '5']
    if kind == 'sync':
        return _gunicorn('socketio_sync', port)
    return _gunicorn('socketio_flask', port, '--preload')


@pytest.fixture(scope='module')
def client_js() -> Path:
    """The socket.io JavaScript client's dist file, from the npm registry (cached)."""
    dist = CLIENT_CACHE / 'node_modules' / 'socket.io-client' / 'dist' / 'socket.io.min.js'
    if not dist.exists():
        npm = shutil.which('npm')
        assert npm, 'npm is missing: apt-get install -y npm (it installs socket.io-client)'
        CLIENT_CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [npm, 'install', '--no-save', '--no-package-lock', '--no-audit', '--no-fund',
             '--prefix', str(CLIENT_CACHE), f'socket.io-client@{SOCKET_IO_CLIENT}'],
            capture_output=True, text=True, timeout=180)
        assert done.returncode == 0 and dist.exists(), \
            f'npm install socket.io-client@{SOCKET_IO_CLIENT} failed:\n{done.stderr[-3000:]}'
    return dist


@pytest.fixture(scope='module', params=['sync', 'flask', 'async'])
def server(request, tmp_path_factory) -> Iterator[Launched]:
    """One of the three servers under the launcher, answering HTTP; always stopped."""
    kind = request.param
    env = {'MPCH_SOCKETIO_CLIENT_JS': str(request.getfixturevalue('client_js'))} \
        if kind == 'async' else {}
    directory = tempfile.mkdtemp(prefix='mpch-')
    logs = tmp_path_factory.mktemp(f'socketio-{kind}')
    port = free_port()
    launched = Launched(os.path.join(directory, 'b.sock'), _command(kind, port), port,
                        WORKERS, out_dir=logs, log_dir=logs, env=env)
    launched.kind = kind
    try:
        launched.wait_listening()
        launched.wait_http(30)
        launched.wait_forked(30)    # all of them: the tests' clean-up counts new processes
        yield launched
    finally:
        launched.stop()
        shutil.rmtree(directory, ignore_errors=True)


# python clients ----------------------------------------------------------------------

class Client:
    """A ``socketio.Client`` over websocket that records every ``news`` event it gets."""

    def __init__(self, port: int, rooms: list[str], other: bool) -> None:
        self.rooms = rooms
        self.io = socketio.Client(reconnection=False)
        self.lock = threading.Lock()
        self.got: list[tuple[str, dict]] = []          # (namespace, data)
        self.disconnected = threading.Event()
        for namespace in ('/', OTHER):
            self.io.on('news', self._recorder(namespace), namespace=namespace)
        self.io.on('question', lambda data: {'answer': data['n'] + 1, 'sid': self.sid})
        self.io.on('disconnect', lambda *reason: self.disconnected.set())
        self.io.connect(f'http://127.0.0.1:{port}', transports=['websocket'],
                        auth={'rooms': rooms}, namespaces=['/', OTHER] if other else ['/'],
                        wait_timeout=TIMEOUT)
        me = self.call('whoami')
        self.pid, self.sid = me['pid'], me['sid']
        self.other_sid = self.io.call('whoami', namespace=OTHER, timeout=TIMEOUT)['sid'] \
            if other else None

    def _recorder(self, namespace: str):
        def record(data: dict) -> None:
            with self.lock:
                self.got.append((namespace, data))
        return record

    def call(self, event: str, data: object = None) -> object:
        return self.io.call(event, data, timeout=TIMEOUT)

    def emit_through(self, **request: object) -> int:
        """Ask this client's worker to emit; the worker's pid."""
        request.setdefault('event', 'news')
        return self.call('emit', request)

    def news(self, tag: str, namespace: str = '/') -> list[dict]:
        with self.lock:
            return [data for ns, data in self.got if ns == namespace and data['tag'] == tag]

    def wait_news(self, tag: str, count: int, namespace: str = '/') -> list[dict]:
        wait_until(lambda: len(self.news(tag, namespace)) >= count, TIMEOUT,
                   what=f'{count} {tag!r} messages on {namespace} in the client of worker '
                        f'{self.pid} (got {self.news(tag, namespace)})', interval=0.01)
        return self.news(tag, namespace)

    def close(self) -> None:
        self.io.disconnect()


@pytest.fixture(scope='module')
def clients(server) -> Iterator[list[Client]]:
    """CLIENTS connected clients, in at least two workers: client i is in the room
    ``odd`` or ``even`` and in ``closing``, and the odd ones are on /other too."""
    connected: list[Client] = []
    try:
        while len(connected) < CLIENTS or len({c.pid for c in connected}) < 2:
            assert len(connected) < MAX_CLIENTS, \
                f'{MAX_CLIENTS} clients, all in worker {connected[0].pid}\n{server.log}'
            i = len(connected)
            connected.append(Client(server.port, ['odd' if i % 2 else 'even', 'closing'],
                                    other=bool(i % 2)))
        workers = {child.pid for child in server.server().children()}
        assert {c.pid for c in connected} <= workers, ([c.pid for c in connected], workers)
        yield connected
    finally:
        for client in connected:
            client.close()


def _apart(clients: list[Client], where=lambda c: True) -> tuple[Client, Client]:
    """Two clients in different workers, the second one satisfying *where*."""
    for a, b in itertools.permutations(clients, 2):
        if a.pid != b.pid and where(b):
            return a, b
    raise AssertionError(f'no two clients in different workers: {[c.pid for c in clients]}')


def _emits_in_order(clients: list[Client], sent: list[tuple[int, int]],
                    got: dict[int, list[dict]]) -> None:
    """Every client got each of *sent* (sender index, seq) once, each sender's in order."""
    for index, client in enumerate(clients):
        seen = [(m['sender'], m['seq']) for m in got[index]]
        assert sorted(seen) == sorted(sent), \
            f'the client of worker {client.pid} did not get each message once: {seen}'
        for sender in {s for s, _ in sent}:
            assert [q for s, q in seen if s == sender] == [q for s, q in sent if s == sender], \
                f'the client of worker {client.pid} got sender {sender} out of order: {seen}'


# what holds across workers, with python clients ---------------------------------------

def test_emit_from_any_worker_reaches_every_client_once_in_order(server, clients):
    tag, sent, emitters = _tag('all'), [], set()
    for seq in range(5):
        for index, client in enumerate(clients):
            emitters.add(client.emit_through(data={'tag': tag, 'sender': index, 'seq': seq}))
            sent.append((index, seq))
    assert emitters == {c.pid for c in clients} and len(emitters) >= 2, emitters
    got = {i: c.wait_news(tag, len(sent)) for i, c in enumerate(clients)}
    _emits_in_order(clients, sent, got)
    assert all(m['by'] == clients[m['sender']].pid for ms in got.values() for m in ms)


def test_room_emit_reaches_only_that_room(server, clients):
    sender, member = _apart(clients, lambda c: 'odd' in c.rooms)
    tag = _tag('room')
    for seq in range(3):
        sender.emit_through(to='odd', data={'tag': tag, 'seq': seq})
    sender.emit_through(data={'tag': tag, 'seq': 'fence'})
    for client in clients:
        seqs = [m['seq'] for m in client.wait_news(tag, 4 if 'odd' in client.rooms else 1)]
        expected = [0, 1, 2, 'fence'] if 'odd' in client.rooms else ['fence']
        assert seqs == expected, f'the client of worker {client.pid} in {client.rooms} ' \
                                 f'got {seqs}'


def test_emit_to_a_sid_in_another_worker(server, clients):
    sender, target = _apart(clients)
    tag = _tag('sid')
    for seq in range(3):
        sender.emit_through(to=target.sid, data={'tag': tag, 'seq': seq})
    sender.emit_through(data={'tag': tag, 'seq': 'fence'})
    for client in clients:
        seqs = [m['seq'] for m in client.wait_news(tag, 4 if client is target else 1)]
        assert seqs == ([0, 1, 2, 'fence'] if client is target else ['fence']), \
            (client.pid, seqs)


def test_skip_sid_skips_that_client_in_another_worker(server, clients):
    sender, skipped = _apart(clients)
    tag = _tag('skip')
    sender.emit_through(skip_sid=skipped.sid, data={'tag': tag, 'seq': 0})
    sender.emit_through(to=skipped.sid, data={'tag': tag, 'seq': 'fence'})
    for client in clients:
        seqs = [m['seq'] for m in client.wait_news(tag, 1)]
        assert seqs == (['fence'] if client is skipped else [0]), (client.pid, seqs)


def test_namespace_emit_reaches_only_that_namespace(server, clients):
    sender, _ = _apart(clients, lambda c: c.other_sid is not None)
    members = [c for c in clients if c.other_sid is not None]
    assert len({c.pid for c in members} - {sender.pid}) >= 1, 'no /other client elsewhere'
    tag = _tag('namespace')
    sender.emit_through(namespace=OTHER, data={'tag': tag, 'seq': 0})
    sender.emit_through(data={'tag': tag, 'seq': 'fence'})
    for client in clients:
        assert [m['seq'] for m in client.wait_news(tag, 1)] == ['fence']
        if client in members:
            assert [m['seq'] for m in client.wait_news(tag, 1, OTHER)] == [0]
        else:
            assert client.news(tag, OTHER) == []


def test_enter_room_of_a_sid_in_another_worker(server, clients):
    asker, target = _apart(clients)
    room, tag = _tag('joined'), _tag('enter')
    assert asker.call('join', {'room': room, 'sid': target.sid}) == asker.pid
    # the join travels as a message of the asker's worker: its next emit comes after it
    asker.emit_through(to=room, data={'tag': tag, 'seq': 0})
    asker.emit_through(data={'tag': tag, 'seq': 'fence'})
    for client in clients:
        seqs = [m['seq'] for m in client.wait_news(tag, 2 if client is target else 1)]
        assert seqs == ([0, 'fence'] if client is target else ['fence']), (client.pid, seqs)


def test_leave_room_of_a_sid_in_another_worker(server, clients):
    asker, target = _apart(clients)
    room, tag = _tag('left'), _tag('leave')
    for member in (asker, target):
        assert member.call('join', {'room': room}) == member.pid
    assert asker.call('leave', {'room': room, 'sid': target.sid}) == asker.pid
    asker.emit_through(to=room, data={'tag': tag, 'seq': 0})
    asker.emit_through(data={'tag': tag, 'seq': 'fence'})
    for client in clients:
        seqs = [m['seq'] for m in client.wait_news(tag, 2 if client is asker else 1)]
        assert seqs == ([0, 'fence'] if client is asker else ['fence']), (client.pid, seqs)


def test_close_room_empties_it_in_every_worker(server, clients):
    closer, _ = _apart(clients)
    tag = _tag('close')
    closer.emit_through(to='closing', data={'tag': tag, 'seq': 'before'})
    assert closer.call('close_room', {'room': 'closing'}) == closer.pid
    closer.emit_through(to='closing', data={'tag': tag, 'seq': 'after'})
    closer.emit_through(data={'tag': tag, 'seq': 'fence'})
    for client in clients:
        assert [m['seq'] for m in client.wait_news(tag, 2)] == ['before', 'fence'], client.pid


def test_disconnect_of_a_sid_in_another_worker(server, clients):
    asker = clients[0]
    extra = []
    try:
        while not extra or extra[-1].pid == asker.pid:
            assert len(extra) < MAX_CLIENTS, f'every new client is in worker {asker.pid}'
            extra.append(Client(server.port, [], other=False))
        target = extra[-1]
        assert asker.call('disconnect_sid', {'sid': target.sid}) == asker.pid
        assert target.disconnected.wait(TIMEOUT), \
            f'the client in worker {target.pid} was not disconnected by worker {asker.pid}'
        assert not any(c.disconnected.is_set() for c in clients)
    finally:
        for client in extra:
            client.close()


def test_call_to_a_sid_in_another_worker_returns_its_answer(server, clients):
    asker, target = _apart(clients)
    answers = [asker.call('call', {'sid': target.sid, 'event': 'question', 'data': {'n': n}})
               for n in range(3)]
    assert answers == [{'pid': asker.pid, 'answer': {'answer': n + 1, 'sid': target.sid}}
                       for n in range(3)]


def test_each_worker_subscribes_once_whatever_its_clients(server, clients):
    by_worker: dict[int, int] = {}
    for client in clients:
        by_worker[client.pid] = by_worker.get(client.pid, 0) + 1
    assert max(by_worker.values()) >= 2, f'no worker holds two clients: {by_worker}'
    assert {c.pid: c.call('subscriptions') for c in clients} == dict.fromkeys(by_worker, 1)


def test_a_write_only_manager_in_another_process_emits_to_every_worker(server, clients):
    import channels
    import channels.socketio
    channels.configure(BROKER_ADDRESS=server.address)
    manager = (channels.socketio.AsyncManager if server.kind == 'async'
               else channels.socketio.Manager)(write_only=True)
    tag = _tag('outside')
    if server.kind != 'async':
        manager.emit('news', {'tag': tag, 'seq': 0}, to='even')
        manager.emit('news', {'tag': tag, 'seq': 'fence'})
    else:
        async def emit():
            await manager.emit('news', {'tag': tag, 'seq': 0}, to='even')
            await manager.emit('news', {'tag': tag, 'seq': 'fence'})
        _run_async(emit())
    for client in clients:
        seqs = [m['seq'] for m in client.wait_news(tag, 2 if 'even' in client.rooms else 1)]
        assert seqs == ([0, 'fence'] if 'even' in client.rooms else ['fence']), \
            (client.pid, client.rooms, seqs)


# the same in Chromium, with socket.io JavaScript clients -------------------------------

@pytest.fixture(scope='module')
def browser() -> Iterator[object]:
    """Headless Chromium driven by Playwright, for the module; always closed."""
    with chromium() as launched:
        yield launched


@pytest.fixture(scope='module')
def pages(server, browser) -> list[object]:
    """At least PAGES pages, one browser context each, in at least two workers; the
    even ones joined the room ``blue``."""
    opened = []
    while len(opened) < PAGES or len({p.pid for p in opened}) < 2:
        assert len(opened) < MAX_PAGES, \
            f'{MAX_PAGES} pages, all in worker {opened[0].pid}\n{server.log}'
        blue = len(opened) % 2 == 0
        url = f'http://127.0.0.1:{server.port}/' + ('?room=blue' if blue else '')
        page = open_page(browser, url, 'body[data-state=connected]', TIMEOUT)
        page.blue = blue
        page.pid = int(page.text_content('#pid'))
        opened.append(page)
    workers = {child.pid for child in server.server().children()}
    assert {p.pid for p in opened} <= workers, ([p.pid for p in opened], workers)
    return opened


def _page_news(page, tag: str, count: int) -> list[dict]:
    page.wait_for_function('([tag, n]) => window.received.filter(m => m.tag === tag)'
                           '.length >= n', arg=[tag, count])
    return page.evaluate('tag => window.received.filter(m => m.tag === tag)', tag)


@pytest.mark.parametrize('server', ['async'], indirect=True)
def test_emit_from_any_worker_reaches_every_page_once_in_order(server, pages):
    tag, sent, emitters = _tag('pages'), [], set()
    for index, page in enumerate(pages):
        requests = [{'event': 'news', 'data': {'tag': tag, 'sender': index, 'seq': seq}}
                    for seq in range(5)]
        emitters.update(page.evaluate('requests => window.emitEach(requests)', requests))
        sent.extend((index, seq) for seq in range(5))
    assert emitters == {page.pid for page in pages} and len(emitters) >= 2, emitters
    for page in pages:
        got = _page_news(page, tag, len(sent))
        seen = [(m['sender'], m['seq']) for m in got]
        assert sorted(seen) == sorted(sent), f'the page in worker {page.pid} got {seen}'
        for index, sender in enumerate(pages):
            assert [q for s, q in seen if s == index] == list(range(5)), \
                f'the page in worker {page.pid} got page {index} out of order: {seen}'
            assert all(m['by'] == sender.pid for m in got if m['sender'] == index)


@pytest.mark.parametrize('server', ['async'], indirect=True)
def test_room_emit_reaches_only_that_room_of_pages(server, pages):
    blue = [p for p in pages if p.blue]
    sender = next(p for p in pages if {b.pid for b in blue} - {p.pid})
    tag = _tag('blue')
    requests = [{'event': 'news', 'to': 'blue', 'data': {'tag': tag, 'seq': seq}}
                for seq in range(3)] + [{'event': 'news', 'data': {'tag': tag, 'seq': 'fence'}}]
    sender.evaluate('requests => window.emitEach(requests)', requests)
    for page in pages:
        seqs = [m['seq'] for m in _page_news(page, tag, 4 if page.blue else 1)]
        assert seqs == ([0, 1, 2, 'fence'] if page.blue else ['fence']), \
            f'the page in worker {page.pid} (blue: {page.blue}) got {seqs}'
