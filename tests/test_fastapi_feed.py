"""The FastAPI example (``examples/fastapi_feed``) across the workers of a real
``channels-broker -- uvicorn examples.fastapi_feed.app:app --workers 4``, through real
HTTP and websocket clients: a note POSTed to whichever worker takes it reaches the SSE
streams and websockets held in every worker, once each, all in one order; notes to a
user reach only that user's feed. (``tests/test_asgi_shutdown.py`` times SIGTERM with 50
open streams.)
"""

from __future__ import annotations

import json
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from support import wait_until
from servers import Launched, SSEStreams, free_port, sse_events_in

WORKERS = 4


def _command(port: int) -> list[str]:
    """The example's command, on *port* (``channels-broker --`` is added by Launched)."""
    return [sys.executable, '-m', 'uvicorn', 'examples.fastapi_feed.app:app',
            '--workers', str(WORKERS), '--host', '127.0.0.1', '--port', str(port),
            '--no-access-log']


@pytest.fixture(scope='module')
def feed(tmp_path_factory) -> Iterator[Launched]:
    """The example under ``channels-broker``, every worker serving; shared by the module's tests
    (started before any test's own fixtures, so none sees it as left behind); always
    stopped."""
    directory = tmp_path_factory.mktemp('feed')
    port = free_port()
    server = Launched(tempfile.mktemp(prefix='feed-', suffix='.sock', dir='/tmp'),
                      _command(port), port, WORKERS, out_dir=directory, log_dir=directory)
    try:
        server.wait_listening()
        server.wait_http(30, path='/')
        # every worker serving (each logs this once its lifespan started), so that new
        # connections spread over all of them
        def started() -> bool:
            server._alive()
            return server.stderr_path.read_text().count('Application startup complete.') \
                >= WORKERS
        wait_until(started, 30, interval=0.05, what=f'{WORKERS} workers started')
        yield server
    finally:
        status = server.stop()
        assert status == 0, f'the launcher exited with {status}\n{server.log}'


def notify(port: int, text: str, user: str | None = None) -> dict:
    """``POST /notify`` on a new connection: the answer (``id``, ``pid``)."""
    request = urllib.request.Request(
        f'http://127.0.0.1:{port}/notify', method='POST',
        data=json.dumps({'text': text, 'user': user}).encode(),
        headers={'content-type': 'application/json', 'Connection': 'close'})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def open_streams(port: int, path: str, count: int, min_workers: int = 1) -> SSEStreams:
    """*count* streams of *path*, each ready, more until they sit in *min_workers*."""
    for tries in range(8):
        streams = SSEStreams(port, count, path)
        streams.read(lambda data: b'event: ready\n' in data, timeout=15)
        if len(set(streams.ready_pids())) >= min_workers:
            return streams
        streams.close()
    raise AssertionError(f'{count} streams of {path} never sat in {min_workers} workers')


def notes(streams: SSEStreams, count: int) -> list[list[dict]]:
    """Wait until every stream has *count* notes; each stream's notes."""
    streams.read(lambda data: sum(name == 'message' for name, _ in sse_events_in(data))
                 >= count, timeout=10)
    return [[data for name, data in events if name == 'message']
            for events in streams.events()]


def test_a_note_posted_to_one_worker_reaches_streams_held_in_the_others_once_in_order(feed):
    streams = open_streams(feed.port, '/events', 6, min_workers=2)
    try:
        sent = [notify(feed.port, f'note {n}') for n in range(5)]
        holders = streams.ready_pids()
        for sender in {note['pid'] for note in sent}:
            assert any(pid != sender for pid in holders), (sender, holders)
        expected = {(note['id'], f'note {n}', note['pid']) for n, note in enumerate(sent)}
        got = [[(n['id'], n['text'], n['pid']) for n in stream] for stream in notes(streams, 5)]
        for stream, holder in zip(got, holders):
            assert len(stream) == 5 and set(stream) == expected, (holder, stream, sent)
        # POSTs taken by different workers reach the broker in either order, but every
        # stream sees the one order in which they did
        assert all(stream == got[0] for stream in got), got
    finally:
        streams.close()


def test_a_note_to_one_user_reaches_only_that_users_feed(feed):
    ann = open_streams(feed.port, '/events?user=ann', 2)
    bob = open_streams(feed.port, '/events?user=bob', 2)
    try:
        to_ann = notify(feed.port, 'for ann', user='ann')
        to_all = notify(feed.port, 'for everyone')
        assert [[n['id'] for n in got] for got in notes(ann, 2)] == [[to_ann['id'],
                                                                      to_all['id']]] * 2
        assert [[n['id'] for n in got] for got in notes(bob, 1)] == [[to_all['id']]] * 2
    finally:
        ann.close()
        bob.close()


def test_a_websocket_gets_the_feed_and_what_it_sends_reaches_every_stream(feed):
    from websockets.sync.client import connect
    streams = open_streams(feed.port, '/events', 2)
    try:
        with connect(f'ws://127.0.0.1:{feed.port}/ws?user=ann', open_timeout=10) as socket:
            assert 'ready' in json.loads(socket.recv(timeout=10))
            sent = notify(feed.port, 'to the socket', user='ann')
            assert json.loads(socket.recv(timeout=10)) == {
                'id': sent['id'], 'text': 'to the socket', 'user': 'ann', 'pid': sent['pid']}
            socket.send('from the socket')
            echoed = json.loads(socket.recv(timeout=10))
            assert echoed['text'] == 'from the socket' and echoed['user'] is None
        assert [[n['text'] for n in got] for got in notes(streams, 1)] == \
            [['from the socket']] * 2
    finally:
        streams.close()


@pytest.mark.parametrize('note', [{'text': ''}, {'text': 'x' * 501},
                                  {'text': 'hi', 'user': 'Not A User'}, {'user': 'ann'}])
def test_a_bad_note_is_refused(feed, note):
    request = urllib.request.Request(
        f'http://127.0.0.1:{feed.port}/notify', method='POST', data=json.dumps(note).encode(),
        headers={'content-type': 'application/json', 'Connection': 'close'})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    refused.value.close()
    assert refused.value.code == 422
