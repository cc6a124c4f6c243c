"""Lona's channels through mpchannels (``channels.lona``), with real Lona servers.

Two processes run the Lona app of ``tests/apps/lona_app.py`` on Lona's own server, with
``CHANNEL_MESSAGE_BROKER_CLASS = 'channels.lona.MessageBroker'``, as the README starts
them: one under ``channels-broker -- ...``, the other on another port with the broker's
address. An HTTP request to one sends with ``lona.Channel(topic).send()``, and what the
Lona channels of each received is read back over HTTP from that process. The last
tests run Lona's broker and task worker classes in this process, without a server or
a broker, for what one process shows (internal topics, the lost message, errors).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlencode

import pytest
from brokers import ROOT, stop_process
from servers import Launched, free_port, http_get
from support import Recorder, wait_until

import lona.channels as lona_channels

import channels
import channels.lona
from channels.cli import fetch_stats
from channels.runtime import runtime

APP = ROOT / 'tests' / 'apps' / 'lona_app.py'


class Lona:
    """One Lona process of ``tests/apps/lona_app.py``, through its HTTP routes."""

    def __init__(self, port: int, alive: Callable[[], None]) -> None:
        self.port = port
        self.alive = alive          # raises if the process is gone
        self.pid = 0

    def get(self, path: str, **query: object) -> object:
        """The JSON answer to ``GET path?query``."""
        return json.loads(http_get(self.port, f'{path}?{urlencode(query)}' if query else path))

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until it answers ``/pid``, and learn its pid."""
        def answers() -> bool:
            self.alive()
            try:
                self.pid = self.get('/pid')['pid']
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                return False
            return True
        wait_until(answers, timeout, what=f'the Lona server on port {self.port}', interval=0.05)

    def subscribe(self, topic: str) -> None:
        assert self.get('/subscribe', topic=topic) == {'pid': self.pid, 'flushed': True}

    def send(self, topic: str, n: int, **options: object) -> None:
        assert self.get('/send', topic=topic, n=n, **options) == {'pid': self.pid}

    def received(self, topic: str) -> list[dict]:
        return self.get('/received', topic=topic)

    def wait_received(self, topic: str, count: int) -> list[dict]:
        """What the channels on *topic* received, once that is at least *count* messages."""
        wait_until(lambda: len(self.received(topic)) >= count, 10, interval=0.02,
                   what=f'{count} messages on {topic!r} in Lona process {self.pid}: '
                        f'{self.received(topic)}')
        return self.received(topic)


def lona_command(port: int) -> list[str]:
    return [sys.executable, str(APP), '--host', '127.0.0.1', '--port', str(port)]


@pytest.fixture(scope='module')
def lona_pair():
    """The README's two Lona processes: ``channels-broker --address A -- <Lona app> --port
    P`` (``a``), and the same app on another port with ``CHANNELS_BROKER_ADDRESS=A``
    (``b``). Both always stopped."""
    directory = Path(tempfile.mkdtemp(prefix='mpch-'))
    address = str(directory / 'b.sock')
    port_a, port_b = free_port(), free_port()
    launched = Launched(address, lona_command(port_a), port_a, 1, directory, directory)
    other = None
    try:
        launched.wait_listening()
        env = {name: value for name, value in os.environ.items()
               if not name.startswith('CHANNELS_')}
        env.update(CHANNELS_BROKER_ADDRESS=address, PYTHONUNBUFFERED='1')
        with open(directory / 'lona-b.log', 'wb') as out:
            other = subprocess.Popen(lona_command(port_b), stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

        def other_alive() -> None:
            if other.poll() is not None:
                raise AssertionError(f'the Lona server b exited ({other.returncode}):\n'
                                     f'{(directory / "lona-b.log").read_text()[-4000:]}')
        a, b = Lona(port_a, launched._alive), Lona(port_b, other_alive)
        a.wait_ready()
        b.wait_ready()
        yield SimpleNamespace(address=address, a=a, b=b)
    finally:
        if other is not None and other.poll() is None:
            other.terminate()       # both stop at once
        launched.stop()
        if other is not None:
            stop_process(other)
        shutil.rmtree(directory, ignore_errors=True)


# two Lona processes ----------------------------------------------------------------------

def test_a_lona_message_reaches_every_matching_lona_channel_in_every_process_once(lona_pair):
    a, b = lona_pair.a, lona_pair.b
    b.subscribe('news.*')
    a.subscribe('news.*')
    for n in range(10):
        a.send('news.sports', n)
        b.send('news.weather', 10 + n)
    for server in (a, b):
        lines = server.wait_received('news.*', 20)
        assert {line['pid'] for line in lines} == {server.pid}
        by_sender = {pid: [line['data']['n'] for line in lines if line['data']['pid'] == pid]
                     for pid in (a.pid, b.pid)}
        assert by_sender == {a.pid: list(range(10)), b.pid: list(range(10, 20))}, \
            f'Lona process {server.pid} did not get each message once, in its order: {lines}'
        assert {line['topic'] for line in lines if line['data']['pid'] == a.pid} == \
            {'news.sports'}


def test_a_local_lona_message_stays_in_its_process(lona_pair):
    a, b = lona_pair.a, lona_pair.b
    b.subscribe('memo')
    a.subscribe('memo')
    a.send('memo', 0, local=1)
    a.send('memo', 1)
    # the second message follows the first from the same sender: had the first left
    # its process, it would have reached b before the second
    assert [line['data']['n'] for line in b.wait_received('memo', 1)] == [1]
    lines = a.wait_received('memo', 2)
    assert [(line['data']['n'], line['local'], line['type']) for line in lines] == \
        [(0, True, 'lona.channels.Message'), (1, False, 'channels.lona.Message')]


def test_a_lona_message_keeps_its_fields_across_processes(lona_pair):
    a, b = lona_pair.a, lona_pair.b
    b.subscribe('fields.*')
    a.subscribe('fields.*')
    before = time.time()
    a.send('fields.one', 7, expiry=60, droppable=1)
    (there,) = b.wait_received('fields.*', 1)
    (here,) = a.wait_received('fields.*', 1)
    assert there['type'] == 'channels.lona.Message'
    assert (there['topic'], there['data'], there['local'], there['droppable']) == \
        ('fields.one', {'n': 7, 'pid': a.pid}, False, True)
    assert before + 59 < there['expiry'] < time.time() + 60
    assert before - 1 < there['timestamp'] < time.time() + 1
    assert there['id'].startswith(f'{a.pid}-')
    assert {key: here[key] for key in ('id', 'timestamp', 'expiry')} == \
        {key: there[key] for key in ('id', 'timestamp', 'expiry')}


def test_unsubscribing_a_topics_lona_channels_ends_its_subscription_at_the_broker(lona_pair):
    a = lona_pair.a

    def subscriptions() -> list[str]:
        (line,) = [line for line in fetch_stats(lona_pair.address)['processes']
                   if line['pid'] == a.pid]
        return line['subscriptions']
    a.subscribe('gone')
    assert 'gone' in subscriptions()
    assert a.get('/unsubscribe', topic='gone') == {'pid': a.pid, 'flushed': True}
    assert 'gone' not in subscriptions()


# Lona's classes in this process, without a server --------------------------------------

@pytest.fixture
def lona_workers():
    """channels.lona's MessageBroker and Lona's TaskWorker on threads of this process,
    as Lona's server runs them; ``stop()`` shuts them down (also at the end)."""
    lona_channels.Channel._clear_state()
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix='LonaChannelWorker')
    workers = [channels.lona.MessageBroker(server=None, executor=executor, timeout=0.05),
               lona_channels.TaskWorker(server=None, executor=executor, timeout=0.05)]

    def stop() -> None:
        for worker in workers:
            worker.shutdown()
        executor.shutdown(wait=True)
    try:
        yield SimpleNamespace(stop=stop)
    finally:
        stop()
        lona_channels.Channel._clear_state()


# Lona's Channel() subscribes only a handler that is true, and a Recorder is false while
# empty (it has a length): the tests pass its bound __call__

def test_lonas_internal_topics_reach_a_lona_wildcard_channel_once(lona_workers):
    recorder = Recorder()
    lona_channels.Channel('*', recorder.__call__)
    assert channels.lona.flush(5)
    lona_channels.Channel('after').send({'n': 1})
    recorder.wait_for(2)
    # Lona's own subscribe event, not also the one mpchannels sends for its channel
    assert [(m.topic, m.data) for m in recorder.messages] == \
        [('lona.channels.subscribe', {'topic': '*'}), ('after', {'n': 1})]


def test_mpchannels_lost_message_reaches_lona_channels(lona_workers):
    recorder = Recorder()
    lona_channels.Channel('lona.channels.lost', recorder.__call__)
    assert channels.lona.flush(5)
    runtime.send_event('lona.channels.lost', {'count': 3, 'reason': 'cut off'})
    recorder.wait_for(1)
    ((topic, data, local),) = [(m.topic, m.data, m.local) for m in recorder.messages]
    assert (topic, data, local) == ('lona.channels.lost', {'count': 3, 'reason': 'cut off'},
                                    True)


def test_a_lona_message_mpchannels_refuses_is_logged_and_routing_goes_on(lona_workers,
                                                                          caplog):
    recorder = Recorder()
    lona_channels.Channel('pickles', recorder.__call__)
    assert channels.lona.flush(5)
    with caplog.at_level(logging.ERROR, logger='channels.lona'):
        lona_channels.Channel('pickles').send({'f': lambda: None})
        lona_channels.Channel('pickles').send({'n': 1})
        recorder.wait_for(1)
    assert recorder.data == [{'n': 1}]
    (record,) = [r for r in caplog.records if r.name == 'channels.lona']
    assert "'pickles'" in record.getMessage() and 'cannot be pickled' in record.getMessage()


def test_shutting_lonas_brokers_down_ends_their_mpchannels_channels(lona_workers):
    lona_channels.Channel('kept', Recorder().__call__)
    assert channels.lona.flush(5)
    assert [c.topic for c in channels.Channel.get_channels('kept')] == ['kept']
    lona_workers.stop()
    assert channels.Channel.get_channels('kept') == []


def test_flush_raises_where_no_lona_broker_of_channels_lona_runs():
    with pytest.raises(RuntimeError, match="CHANNEL_MESSAGE_BROKER_CLASS = "
                                           "'channels.lona.MessageBroker'"):
        channels.lona.flush(1)


def test_channels_lona_without_lona_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, 'lona.channels', None)     # as if Lona were missing
    monkeypatch.delitem(sys.modules, 'channels.lona')
    with pytest.raises(ImportError, match=r"pip install 'mpchannels\[lona\]'"):
        importlib.import_module('channels.lona')


def test_import_channels_does_not_import_lona():
    code = "import sys, channels; print(sorted(m for m in sys.modules if m.startswith('lona')))"
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            cwd=ROOT, timeout=30, check=True)
    assert result.stdout.strip() == '[]', result.stderr
