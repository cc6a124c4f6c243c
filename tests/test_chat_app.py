"""The chat demo's ASGI app in this process (no server, no broker): its routes, its
streams' ends (client gone, stop signal, falling behind) and its lifespan scope.

``tests/test_chat_demo.py`` runs it for real, across workers, in a browser.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from channels import Channel
from examples.chat import app as chat

TIMEOUT = 10.0


def http_scope(method: str, path: str, query: str = '',
               headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {'type': 'http', 'asgi': {'version': '3.0'}, 'http_version': '1.1',
            'method': method, 'path': path, 'query_string': query.encode(),
            'headers': headers or [], 'server': ('127.0.0.1', 8000),
            'client': ('127.0.0.1', 50000), 'scheme': 'http'}


@asynccontextmanager
async def lifespan() -> AsyncIterator[None]:
    """The app between lifespan startup and shutdown (always shut down)."""
    inbound: asyncio.Queue = asyncio.Queue()
    outbound: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(chat.app({'type': 'lifespan', 'asgi': {'version': '3.0'}},
                                          inbound.get, outbound.put))
    inbound.put_nowait({'type': 'lifespan.startup'})
    assert (await asyncio.wait_for(outbound.get(), TIMEOUT))['type'] == \
        'lifespan.startup.complete'
    try:
        yield
    finally:
        inbound.put_nowait({'type': 'lifespan.shutdown'})
        assert (await asyncio.wait_for(outbound.get(), TIMEOUT))['type'] == \
            'lifespan.shutdown.complete'
        await asyncio.wait_for(task, TIMEOUT)


async def request(method: str, path: str, body: bytes = b'', query: str = '',
                  content_type: bytes = b'application/json') -> tuple[int, dict, bytes]:
    """One whole request: status, headers, body."""
    events = [{'type': 'http.request', 'body': body, 'more_body': False}]
    sent: list[dict] = []

    async def receive() -> dict:
        return events.pop(0) if events else {'type': 'http.disconnect'}

    async def send(event: dict) -> None:
        sent.append(event)
    await asyncio.wait_for(chat.app(http_scope(method, path, query,
                                               [(b'content-type', content_type)]),
                                    receive, send), TIMEOUT)
    start = sent[0]
    return (start['status'], dict(start['headers']),
            b''.join(event.get('body', b'') for event in sent[1:]))


async def post(text: str, room: str = 'lobby', name: str = 'ann') -> dict:
    status, _, body = await request('POST', '/send', json.dumps(
        {'room': room, 'name': name, 'text': text}).encode())
    assert status == 200, body
    return json.loads(body)


class Stream:
    """``GET /events`` held open; reads its events as a browser would."""

    def __init__(self, room: str = 'lobby', gate: asyncio.Event | None = None) -> None:
        self._inbound: asyncio.Queue = asyncio.Queue()
        self._inbound.put_nowait({'type': 'http.request', 'body': b'', 'more_body': False})
        self._chunks: asyncio.Queue = asyncio.Queue()
        self._gate = gate             # while not set, writes after the first ones wait
        self._writes = 0
        self._buffer = ''
        self.ended = False
        self.status: int | None = None
        self.task = asyncio.ensure_future(chat.app(
            http_scope('GET', '/events', f'room={room}'), self._inbound.get, self._send))

    async def _send(self, event: dict) -> None:
        if event['type'] == 'http.response.start':
            self.status = event['status']
            return
        self._writes += 1
        if self._gate is not None and self._writes > 2:     # after retry + hello
            await self._gate.wait()
        await self._chunks.put(event)

    async def next_event(self) -> tuple[str, dict] | None:
        """The next (event name, data), skipping comments; None once the response ended."""
        while '\n\n' not in self._buffer:
            if self.ended:
                return None
            event = await asyncio.wait_for(self._chunks.get(), TIMEOUT)
            self._buffer += event.get('body', b'').decode()
            self.ended = not event.get('more_body', False)
        block, self._buffer = self._buffer.split('\n\n', 1)
        fields = dict(line.split(': ', 1) for line in block.splitlines()
                      if line and not line.startswith(':'))
        if 'event' not in fields:
            return await self.next_event()
        return fields['event'], json.loads(fields['data'])

    async def hello(self) -> dict:
        name, data = await self.next_event()
        assert name == 'hello', (name, data)
        return data

    async def messages(self, count: int) -> list[dict]:
        got = []
        for _ in range(count):
            name, data = await self.next_event()
            assert name == 'message', (name, data)
            got.append(data)
        return got

    def disconnect(self) -> None:
        self._inbound.put_nowait({'type': 'http.disconnect'})

    async def finished(self) -> None:
        await asyncio.wait_for(self.task, TIMEOUT)


def run(coroutine) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def test_every_open_stream_gets_each_posted_message_once_in_order():
    async def main():
        async with lifespan():
            streams = [Stream(), Stream()]
            for stream in streams:
                assert (await stream.hello())['pid'] == os.getpid()
                assert stream.status == 200
            sent = [await post(f'message {n}') for n in range(3)]
            for stream in streams:
                got = await stream.messages(3)
                assert [m['text'] for m in got] == ['message 0', 'message 1', 'message 2']
                assert [m['id'] for m in got] == [s['id'] for s in sent]
                assert {m['pid'] for m in got} == {os.getpid()}
                assert {m['name'] for m in got} == {'ann'}
                stream.disconnect()
                await stream.finished()
    run(main())


def test_a_stream_sees_only_its_own_room():
    async def main():
        async with lifespan():
            lobby, python = Stream('lobby'), Stream('python')
            await lobby.hello()
            await python.hello()
            await post('in python', room='python')
            await post('in lobby', room='lobby')
            assert [m['text'] for m in await lobby.messages(1)] == ['in lobby']
            assert [m['text'] for m in await python.messages(1)] == ['in python']
            for stream in (lobby, python):
                stream.disconnect()
                await stream.finished()
    run(main())


def test_a_client_that_leaves_ends_its_stream_and_its_subscription():
    async def main():
        async with lifespan():
            stream = Stream()
            await stream.hello()
            assert any(c.topic == 'chat.rooms.lobby' for c in
                       Channel.get_channels('chat.rooms.lobby'))
            stream.disconnect()
            await stream.finished()
            topics = [c.topic for c in Channel.get_channels('chat.rooms.lobby')]
            assert topics == ['chat.rooms.*'], topics       # only the worker's scope
            assert json.loads((await request('GET', '/stats'))[2])['streams'] == 0
    run(main())


def test_a_stop_signal_ends_every_open_stream_then_runs_the_servers_handler():
    """What lets ``uvicorn`` stop on Ctrl-C or SIGTERM while browsers hold streams."""
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: calls.append(number))

    async def main():
        async with lifespan():
            streams = [Stream(), Stream('random')]
            for stream in streams:
                await stream.hello()
            os.kill(os.getpid(), signal.SIGTERM)
            for stream in streams:
                assert await stream.next_event() is None        # the response ended
                await stream.finished()
            assert calls == [signal.SIGTERM]
    try:
        run(main())
        # lifespan shutdown put the server's handler back
        assert signal.getsignal(signal.SIGTERM) is not previous
        assert signal.getsignal(signal.SIGTERM).__name__ == '<lambda>'
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_stream_that_falls_behind_is_told_how_many_it_missed_and_ends(monkeypatch):
    monkeypatch.setattr(chat, 'INBOX_SIZE', 3)

    async def main():
        async with lifespan():
            gate = asyncio.Event()
            stream = Stream(gate=gate)
            await stream.hello()
            # writes wait at the gate: the inbox (3) fills, and the rest overflow it
            for n in range(10):
                await post(f'm{n}')
            await asyncio.wait_for(_until(lambda: chat.worker.seen['lobby'] == 10), TIMEOUT)
            gate.set()
            events = []
            while (event := await stream.next_event()) is not None:
                events.append(event)
            *messages, (name, data) = events
            texts = [m['text'] for _, m in messages]
            # what was queued (plus the one being written, if taken yet), in order
            assert texts in (['m0', 'm1', 'm2'], ['m0', 'm1', 'm2', 'm3']), events
            assert name == 'lagged' and data['missed'] >= 1, events
            await stream.finished()
    run(main())


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def test_the_lifespan_scope_counts_each_rooms_messages_and_closes_at_shutdown():
    async def main():
        async with lifespan():
            stream = Stream()
            await stream.hello()
            for n in range(3):
                await post(f'{n}')
            await post('x', room='random')
            await stream.messages(3)        # the scope's handler ran for each, too
            await asyncio.wait_for(_until(lambda: chat.worker.seen['random'] == 1), TIMEOUT)
            stats = json.loads((await request('GET', '/stats'))[2])
            assert stats == {'pid': os.getpid(), 'streams': 1,
                             'seen': {'lobby': 3, 'random': 1}}
            status, _, page = await request('GET', '/', query='room=lobby')
            assert status == 200
            assert f'worker {os.getpid()} had carried 3 message(s) in #lobby' in page.decode()
            stream.disconnect()
            await stream.finished()
        assert chat.worker.scope is None
        assert Channel.get_channels('chat.rooms.lobby') == []
    run(main())


def test_the_page_names_its_room_and_worker():
    async def main():
        async with lifespan():
            status, headers, body = await request('GET', '/', query='room=python')
            assert status == 200
            assert headers[b'content-type'] == b'text/html; charset=utf-8'
            page = body.decode()
            assert f'data-page-pid="{os.getpid()}"' in page
            assert 'data-room="python"' in page and '<h1>#python' in page
            assert '{{' not in page
            assert (await request('GET', '/', query='room=<b>'))[0] == 400
    run(main())


@pytest.mark.parametrize('fields, error', [
    ({'room': 'lobby', 'text': ''}, 'text'),
    ({'room': 'lobby', 'text': '   '}, 'text'),
    ({'room': 'lobby', 'text': 'x' * 501}, 'text'),
    ({'room': 'Lobby!', 'text': 'hi'}, 'room'),
    ({'room': 'lobby', 'name': 'n' * 33, 'text': 'hi'}, 'name'),
    ({'room': 'lobby', 'text': 5}, 'text'),
])
def test_post_refuses_bad_fields_and_sends_nothing(fields, error):
    async def main():
        async with lifespan():
            status, _, body = await request('POST', '/send', json.dumps(fields).encode())
            assert status == 400
            assert json.loads(body)['error'].startswith(error)
            assert chat.worker.seen == {}
    run(main())


def test_post_refuses_what_is_not_a_json_object_or_too_large():
    async def main():
        async with lifespan():
            assert (await request('POST', '/send', b'[1, 2]'))[0] == 400
            assert (await request('POST', '/send', b'{"text": '))[0] == 400
            assert (await request('POST', '/send', b'\xff'))[0] == 400
            assert (await request('POST', '/send', b'x' * (chat.MAX_BODY + 1)))[0] == 413
            assert (await request('GET', '/send'))[0] == 405
            assert (await request('GET', '/nope'))[0] == 404
    run(main())


def test_a_form_post_sends_and_redirects_back_to_the_room():
    async def main():
        async with lifespan():
            stream = Stream('random')
            await stream.hello()
            status, headers, _ = await request(
                'POST', '/send', b'room=random&name=bo&text=a+%3Cform%3E+post',
                content_type=b'application/x-www-form-urlencoded')
            assert status == 303 and headers[b'location'] == b'/?room=random'
            [message] = await stream.messages(1)
            assert (message['name'], message['text']) == ('bo', 'a <form> post')
            stream.disconnect()
            await stream.finished()
    run(main())
