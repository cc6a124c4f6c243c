"""``channels.asgi`` in this process, driven through ASGI messages (no server, no broker):
SSE streams, websocket relays, and ending them when the server stops.

``tests/test_asgi_shutdown.py`` stops real servers holding real streams;
``tests/test_fastapi_feed.py`` runs the FastAPI example across workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest

import channels
from channels import Channel
from channels.asgi import (SSE_HEADERS, EndStreamsOnShutdown, end_streams,
                           end_streams_on_shutdown, relay_websocket, sse_event, sse_events)

TIMEOUT = 10.0


def run(coroutine) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def http_scope(method: str = 'GET', path: str = '/events',
               spec_version: str = '2.3') -> dict[str, Any]:
    return {'type': 'http', 'asgi': {'version': '3.0', 'spec_version': spec_version},
            'http_version': '1.1', 'method': method, 'path': path, 'raw_path': path.encode(),
            'root_path': '', 'query_string': b'', 'headers': [], 'scheme': 'http',
            'server': ('127.0.0.1', 8000), 'client': ('127.0.0.1', 50000)}


class Client:
    """One HTTP request to an ASGI app, held open: reads the response as it comes."""

    def __init__(self, app: Callable, scope: dict[str, Any] | None = None,
                 gate: asyncio.Event | None = None) -> None:
        self._inbound: asyncio.Queue = asyncio.Queue()
        self._inbound.put_nowait({'type': 'http.request', 'body': b'', 'more_body': False})
        self._chunks: asyncio.Queue = asyncio.Queue()
        self._gate = gate              # while not set, writes after the first two wait
        self._writes = 0
        self.buffer = b''
        self.ended = False
        self.start: dict | None = None
        self.task = asyncio.ensure_future(app(scope or http_scope(), self._receive, self._send))

    async def _receive(self) -> dict:
        return await self._inbound.get()

    async def _send(self, event: dict) -> None:
        if event['type'] == 'http.response.start':
            self.start = event
            return
        self._writes += 1
        if self._gate is not None and self._writes > 2:
            await self._gate.wait()
        await self._chunks.put(event)

    async def block(self) -> bytes | None:
        """The next event block (``...\\n\\n``) as bytes; None once the response ended."""
        while b'\n\n' not in self.buffer:
            if self.ended:
                return None
            event = await asyncio.wait_for(self._chunks.get(), TIMEOUT)
            self.buffer += event.get('body', b'')
            self.ended = not event.get('more_body', False)
        block, self.buffer = self.buffer.split(b'\n\n', 1)
        return block + b'\n\n'

    async def event(self) -> tuple[str, Any] | None:
        """The next (event name, JSON data), skipping comments and fields alone."""
        while (block := await self.block()) is not None:
            fields = dict(line.split(': ', 1) for line in block.decode().splitlines()
                          if line and not line.startswith(':'))
            if 'data' in fields:
                return fields.get('event', 'message'), json.loads(fields['data'])
        return None

    async def rest(self) -> list[tuple[str, Any]]:
        """Every event until the response ends."""
        events = []
        while (event := await self.event()) is not None:
            events.append(event)
        return events

    def disconnect(self) -> None:
        self._inbound.put_nowait({'type': 'http.disconnect'})

    async def finished(self) -> None:
        await asyncio.wait_for(self.task, TIMEOUT)


def stream_app(*topics: str, **options: Any) -> Callable:
    """A plain ASGI app whose every request is ``sse_events(*topics, **options)``."""
    async def app(scope, receive, send):
        await sse_events(*topics, **options)(scope, receive, send)
    return app


READY = sse_event({'ready': True}, event='ready')


async def opened(client: Client) -> None:
    """Wait for the stream's ready event: its subscription is in force."""
    assert await client.event() == ('ready', {'ready': True})


def send(topic: str, **data: Any) -> None:
    Channel(topic).send(data)


async def overflowed(topic: str) -> None:
    """Wait until the only inbox on *topic* overflowed: it unsubscribes at once."""
    async def gone() -> None:
        while Channel.get_channels(topic):
            await asyncio.sleep(0.005)
    await asyncio.wait_for(gone(), TIMEOUT)


# SSE -------------------------------------------------------------------------------------

def test_sse_event_encodes_its_fields_and_json_or_text_data():
    assert sse_event({'a': 1}, event='note') == b'event: note\ndata: {"a": 1}\n\n'
    assert sse_event('two\nlines') == b'data: two\ndata: lines\n\n'
    assert sse_event('x', id='7', retry=2000) == b'id: 7\nretry: 2000\ndata: x\n\n'
    assert sse_event(retry=500) == b'retry: 500\n\n'
    for bad in ({'event': 'a\nb'}, {'id': 'a\rb'}, {'retry': -1}, {'retry': 1.5}):
        with pytest.raises(ValueError):
            sse_event('x', **bad)


def test_a_stream_sends_each_message_as_an_event_once_subscribed_and_ends_when_the_client_leaves():
    async def main():
        client = Client(stream_app('feed.*', ready=READY, retry=1500))
        assert await client.block() == b'retry: 1500\n\n'
        await opened(client)
        assert client.start['status'] == 200 and client.start['headers'] == SSE_HEADERS
        for n in range(3):
            send('feed.a', n=n)
        assert [await client.event() for _ in range(3)] == \
            [('message', {'n': n}) for n in range(3)]
        client.disconnect()
        await client.finished()
        assert Channel.get_channels('feed.a') == []         # it unsubscribed
    run(main())


def test_data_makes_each_messages_event_and_none_skips_it():
    def only_odd(message):
        n = message.data['n']
        return {'odd': n, 'topic': message.topic} if n % 2 else None

    async def main():
        client = Client(stream_app('feed', ready=READY, data=only_odd, event='note'))
        await opened(client)
        for n in range(5):
            send('feed', n=n)
        assert [await client.event() for _ in range(2)] == \
            [('note', {'odd': 1, 'topic': 'feed'}), ('note', {'odd': 3, 'topic': 'feed'})]
        client.disconnect()
        await client.finished()
    run(main())


def test_data_that_returns_bytes_sends_a_whole_event_of_its_own():
    def own(message):
        return sse_event(message.data, event='note', id=message.id)

    async def main():
        client = Client(stream_app('feed', ready=READY, data=own))
        await opened(client)
        sent = Channel('feed').send({'n': 1})
        assert await client.block() == \
            f'event: note\nid: {sent.id}\ndata: {{"n": 1}}\n\n'.encode()
        client.disconnect()
        await client.finished()
    run(main())


def test_an_idle_stream_writes_keepalive_comments():
    async def main():
        client = Client(stream_app('feed', ready=READY, keepalive=0.05))
        await opened(client)
        assert await client.block() == b': keepalive\n\n'
        assert await client.block() == b': keepalive\n\n'
        send('feed', n=1)
        while (block := await client.block()) == b': keepalive\n\n':
            pass
        assert block == b'event: message\ndata: {"n": 1}\n\n'
        client.disconnect()
        await client.finished()
    run(main())


def test_a_stream_that_falls_behind_is_told_how_many_it_missed_and_ends():
    async def main():
        gate = asyncio.Event()
        client = Client(stream_app('feed', ready=READY, retry=100, maxsize=3), gate=gate)
        await client.block()
        await opened(client)
        for n in range(10):            # the writes wait at the gate: the inbox overflows
            send('feed', n=n)
        await overflowed('feed')
        gate.set()
        *messages, last = await client.rest()
        assert [data['n'] for _, data in messages] in ([0, 1, 2], [0, 1, 2, 3])
        assert last[0] == 'lagged' and last[1]['missed'] >= 1, last
        await client.finished()
    run(main())


def test_a_head_request_gets_the_headers_and_no_stream():
    async def main():
        client = Client(stream_app('feed'), http_scope('HEAD'))
        assert await client.block() is None
        await client.finished()
        assert client.start['headers'] == SSE_HEADERS
        assert Channel.get_channels('feed') == []
    run(main())


def test_a_stream_the_broker_does_not_confirm_ends_after_its_retry_field(tmp_path):
    channels.configure(BROKER_ADDRESS=str(tmp_path / 'nobody.sock'))

    async def main():
        client = Client(stream_app('feed', retry=3000, ready_timeout=0.2))
        assert await client.block() == b'retry: 3000\n\n'
        assert await client.block() is None                  # ended; EventSource retries
        await client.finished()
    run(main())


def test_bad_arguments_raise_at_the_call():
    with pytest.raises(TypeError):
        sse_events()
    with pytest.raises(ValueError):
        sse_events('feed', keepalive=0)
    with pytest.raises(TypeError):
        sse_events('feed', data='text')
    with pytest.raises(TypeError):
        sse_events('feed', ready='not bytes')
    with pytest.raises(ValueError):
        sse_events('feed', event='two\nlines')
    with pytest.raises(ValueError):
        sse_events('feed', overflow='never')


def test_a_stream_is_consumed_once():
    async def main():
        stream = sse_events('feed')
        iterator = aiter(stream)
        with pytest.raises(RuntimeError, match='consumed already'):
            aiter(stream)
        await iterator.aclose()
    run(main())


def test_the_stream_suits_starlettes_streaming_response():
    from starlette.responses import StreamingResponse

    async def app(scope, receive, send):
        await StreamingResponse(sse_events('feed', ready=READY),
                                media_type='text/event-stream')(scope, receive, send)

    async def main():
        client = Client(app)
        await opened(client)
        send('feed', n=1)
        assert await client.event() == ('message', {'n': 1})
        client.disconnect()                  # Starlette's own watch ends the stream
        await client.finished()
        assert Channel.get_channels('feed') == []
    run(main())


def test_the_stream_ends_at_once_on_disconnect_with_receive_where_starlette_does_not_watch():
    from starlette.requests import Request
    from starlette.responses import StreamingResponse

    async def app(scope, receive, send):       # ASGI spec 2.4: StreamingResponse only writes
        stream = sse_events('feed', ready=READY, request=Request(scope, receive))
        await StreamingResponse(stream, media_type='text/event-stream')(scope, receive, send)

    async def main():
        client = Client(app, http_scope(spec_version='2.4'))
        await opened(client)
        client.disconnect()
        await client.finished()
        assert Channel.get_channels('feed') == []
    run(main())


def test_sse_starlette_passes_the_events_on_unchanged():
    from sse_starlette import EventSourceResponse

    async def app(scope, receive, send):
        await EventSourceResponse(sse_events('feed', ready=READY), ping=600)(
            scope, receive, send)

    async def main():
        client = Client(app)
        await opened(client)
        send('feed', n=1, text='a\nb')
        assert await client.block() == b'event: message\ndata: {"n": 1, "text": "a\\nb"}\n\n'
        client.disconnect()
        await client.finished()
    run(main())


# ending streams when the server stops --------------------------------------------------------

def _user_stream(topic: str) -> Callable:
    """A stream written by hand over listen(), no helper: ends when its inbox ends."""
    async def app(scope, receive, send):
        await send({'type': 'http.response.start', 'status': 200, 'headers': SSE_HEADERS})
        async with channels.listen(topic) as inbox:
            await send({'type': 'http.response.body', 'body': READY, 'more_body': True})
            async for message in inbox:
                await send({'type': 'http.response.body', 'more_body': True,
                            'body': sse_event(message.data)})
        await send({'type': 'http.response.body', 'body': b'', 'more_body': False})
    return app


class Lifespan:
    """An ASGI app's lifespan, started and (always) shut down."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __aenter__(self) -> Lifespan:
        self.inbound: asyncio.Queue = asyncio.Queue()
        self.outbound: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.ensure_future(self.app(
            {'type': 'lifespan', 'asgi': {'version': '3.0'}}, self.inbound.get,
            self.outbound.put))
        self.inbound.put_nowait({'type': 'lifespan.startup'})
        assert (await asyncio.wait_for(self.outbound.get(), TIMEOUT))['type'] == \
            'lifespan.startup.complete'
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.inbound.put_nowait({'type': 'lifespan.shutdown'})
        assert (await asyncio.wait_for(self.outbound.get(), TIMEOUT))['type'] == \
            'lifespan.shutdown.complete'
        await asyncio.wait_for(self.task, TIMEOUT)


def routed(lifespan_events: bool = True, **routes: Callable) -> Callable:
    """A plain ASGI app: ``routes[path]`` for HTTP, a bare lifespan."""
    async def app(scope, receive, send):
        if scope['type'] == 'lifespan':
            while lifespan_events:
                event = await receive()
                await send({'type': event['type'] + '.complete'})
                if event['type'] == 'lifespan.shutdown':
                    return
            return
        await routes[scope['path'].strip('/')](scope, receive, send)
    return app


@pytest.fixture
def server_handler():
    """A SIGTERM handler standing for the server's; its calls; put back afterwards."""
    calls: list[int] = []

    def handle_exit(number, frame):
        calls.append(number)
    previous = signal.signal(signal.SIGTERM, handle_exit)
    try:
        yield handle_exit, calls
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_ends_every_open_stream_then_runs_the_servers_handler(server_handler):
    handle_exit, calls = server_handler
    app = EndStreamsOnShutdown(routed(helper=stream_app('feed', ready=READY),
                                      own=_user_stream('feed')))

    async def main():
        async with Lifespan(app):
            assert signal.getsignal(signal.SIGTERM) is not handle_exit   # chained
            clients = [Client(app, http_scope(path=path)) for path in ('helper', 'own')]
            for client in clients:
                await opened(client)
            send('feed', n=1)
            for client in clients:
                assert await client.event() == ('message', {'n': 1})
            os.kill(os.getpid(), signal.SIGTERM)
            for client in clients:
                assert await client.rest() == []        # the response ended
                await client.finished()
            assert calls == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is handle_exit           # put back
    run(main())


def test_streams_opened_after_the_stop_end_at_once(server_handler):
    app = EndStreamsOnShutdown(routed(helper=stream_app('feed', ready=READY),
                                      own=_user_stream('feed')))

    async def main():
        async with Lifespan(app):
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0)                   # let the loop run the handler's step
            helper = Client(app, http_scope(path='helper'))
            assert await helper.rest() == []
            own = Client(app, http_scope(path='own'))   # ended by the next sweep
            await opened(own)
            assert await own.rest() == []
            for client in (helper, own):
                await client.finished()
    run(main())


def test_the_lifespan_helper_chains_the_handlers_and_ends_streams_on_the_way_out(
        server_handler):
    handle_exit, calls = server_handler
    app = stream_app('feed', ready=READY)

    async def main():
        async with end_streams_on_shutdown():
            assert signal.getsignal(signal.SIGTERM) is not handle_exit
            client = Client(app)
            await opened(client)
        assert await client.rest() == []
        await client.finished()
        assert signal.getsignal(signal.SIGTERM) is handle_exit and calls == []
    run(main())


def test_without_a_lifespan_the_middleware_chains_the_handlers_at_the_first_request(
        server_handler):
    handle_exit, calls = server_handler
    app = EndStreamsOnShutdown(routed(lifespan_events=False,
                                      helper=stream_app('feed', ready=READY)))

    async def main():
        client = Client(app, http_scope(path='helper'))
        await opened(client)
        assert signal.getsignal(signal.SIGTERM) is not handle_exit
        os.kill(os.getpid(), signal.SIGTERM)
        assert await client.rest() == []
        await client.finished()
        assert calls == [signal.SIGTERM]
    run(main())


def test_end_streams_ends_the_streams_of_this_loop_now():
    async def main():
        client = Client(stream_app('feed', ready=READY))
        await opened(client)
        assert end_streams() == 1
        assert await client.rest() == []
        await client.finished()
    run(main())


class FakeUvicornServer:
    """What the helper looks at in uvicorn's ``Server``: ``should_exit`` and the listening
    ``servers``; its ``handle_exit`` is the SIGTERM handler."""

    def __init__(self) -> None:
        self.should_exit = False
        self.servers: list = []

    def handle_exit(self, number, frame) -> None:
        self.should_exit = True


@pytest.mark.parametrize('how', ['should_exit', 'servers closed'])
def test_under_uvicorn_streams_end_when_the_server_stops_without_a_signal(how):
    server = FakeUvicornServer()
    previous = signal.signal(signal.SIGTERM, server.handle_exit)

    async def main():
        listening = await asyncio.get_running_loop().create_server(asyncio.Protocol,
                                                                   '127.0.0.1', 0)
        server.servers.append(listening)
        try:
            async with end_streams_on_shutdown():
                client = Client(stream_app('feed', ready=READY))
                await opened(client)
                if how == 'should_exit':
                    server.should_exit = True
                else:                       # as uvicorn's --limit-max-requests does
                    listening.close()
                assert await client.rest() == []
                await client.finished()
        finally:
            listening.close()
    try:
        run(main())
    finally:
        signal.signal(signal.SIGTERM, previous)


# websockets ------------------------------------------------------------------------------------

class WebSocketClient:
    """One ASGI websocket connection to a relay, driven as a client."""

    def __init__(self, relay: Callable[[tuple], Any], gate: asyncio.Event | None = None
                 ) -> None:
        self._inbound: asyncio.Queue = asyncio.Queue()
        self._inbound.put_nowait({'type': 'websocket.connect'})
        self.outbound: asyncio.Queue = asyncio.Queue()
        self._gate = gate              # while not set, frames after the first one wait
        self._frames = 0
        self.task = asyncio.ensure_future(relay((self._inbound.get, self._send)))

    async def _send(self, event: dict) -> None:
        if event['type'] == 'websocket.send':
            self._frames += 1
            if self._gate is not None and self._frames > 1:
                await self._gate.wait()
        await self.outbound.put(event)

    async def next(self) -> dict:
        return await asyncio.wait_for(self.outbound.get(), TIMEOUT)

    async def frame(self) -> str | bytes:
        event = await self.next()
        assert event['type'] == 'websocket.send', event
        return event['text'] if event.get('text') is not None else event['bytes']

    def say(self, text: str) -> None:
        self._inbound.put_nowait({'type': 'websocket.receive', 'text': text})

    def disconnect(self) -> None:
        self._inbound.put_nowait({'type': 'websocket.disconnect', 'code': 1000})

    async def finished(self) -> None:
        await asyncio.wait_for(self.task, TIMEOUT)


def test_a_relay_sends_each_message_as_json_text_or_bytes_and_stops_on_disconnect():
    def frame(message):
        return message.data.get('raw', message.data)

    async def main():
        client = WebSocketClient(lambda ws: relay_websocket(ws, 'feed', ready='ready',
                                                            data=frame))
        assert (await client.next())['type'] == 'websocket.accept'
        assert await client.frame() == 'ready'
        send('feed', n=1)
        send('feed', raw='plain text')
        send('feed', raw=b'\x00bytes')
        assert [await client.frame() for _ in range(3)] == \
            ['{"n": 1}', 'plain text', b'\x00bytes']
        client.disconnect()
        await client.finished()
        assert Channel.get_channels('feed') == []
    run(main())


def test_a_relay_hands_what_the_client_sends_to_on_receive():
    async def publish(text):
        Channel('feed').send(json.loads(text))

    async def main():
        client = WebSocketClient(lambda ws: relay_websocket(ws, 'feed', ready='ready',
                                                            on_receive=publish))
        await client.next()
        await client.frame()
        client.say('{"said": "hi"}')
        assert json.loads(await client.frame()) == {'said': 'hi'}
        client.disconnect()
        await client.finished()
    run(main())


def test_a_relay_closes_with_1001_when_the_server_stops():
    async def main():
        client = WebSocketClient(lambda ws: relay_websocket(ws, 'feed', ready='ready'))
        await client.next()
        await client.frame()
        end_streams()
        assert await client.next() == {'type': 'websocket.close', 'code': 1001,
                                       'reason': 'the server is stopping'}
        await client.finished()
    run(main())


def test_a_relay_closes_with_1013_when_the_client_falls_behind():
    async def main():
        gate = asyncio.Event()
        client = WebSocketClient(lambda ws: relay_websocket(ws, 'feed', ready='ready',
                                                            maxsize=2), gate=gate)
        await client.next()
        await client.frame()
        for n in range(10):            # the frames wait at the gate: the inbox overflows
            send('feed', n=n)
        await overflowed('feed')
        gate.set()
        events = []
        while (event := await client.next())['type'] == 'websocket.send':
            events.append(event)
        assert event['type'] == 'websocket.close' and event['code'] == 1013, event
        assert event['reason'].startswith('fell behind: missed ')
        await client.finished()
    run(main())


def test_a_relay_serves_a_starlette_websocket_and_accepts_it():
    from starlette.websockets import WebSocket

    async def main():
        def relay(pair):
            receive, send_ = pair
            scope = {'type': 'websocket', 'path': '/ws', 'headers': [], 'query_string': b'',
                     'subprotocols': []}
            return relay_websocket(WebSocket(scope, receive, send_), 'feed', ready={'ok': 1})
        client = WebSocketClient(relay)
        assert (await client.next())['type'] == 'websocket.accept'
        assert await client.frame() == '{"ok": 1}'
        send('feed', n=2)
        assert await client.frame() == '{"n": 2}'
        client.disconnect()
        await client.finished()
    run(main())


def test_relay_refuses_what_is_not_a_websocket():
    with pytest.raises(TypeError, match='Starlette/FastAPI WebSocket'):
        run(relay_websocket(object(), 'feed'))


def test_importing_channels_asgi_imports_no_framework():
    code = ('import sys, channels, channels.asgi; '
            'print([m for m in ("starlette", "fastapi", "sse_starlette", "uvicorn") '
            'if m in sys.modules])')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == '[]'


# one bad message ------------------------------------------------------------------------------

def test_a_message_that_is_not_json_is_skipped_and_the_stream_goes_on(caplog):
    async def main():
        client = Client(stream_app('feed', ready=READY))
        await opened(client)
        send('feed', bad={1, 2})                 # a set: JSON has no form for it
        send('feed', nan=float('nan'))           # JSON.parse refuses NaN
        send('feed', n=1)
        assert await client.event() == ('message', {'n': 1})
        client.disconnect()
        await client.finished()
    run(main())
    assert sum('cannot be sent as JSON' in r.getMessage() for r in caplog.records
               if r.levelname == 'ERROR') == 2


def test_a_message_that_is_not_json_is_logged_once_whatever_the_streams_it_reaches(caplog):
    async def main():
        clients = [Client(stream_app('feed', ready=READY)) for _ in range(3)]
        for client in clients:
            await opened(client)
        send('feed', bad={1, 2})
        send('feed', n=1)
        for client in clients:
            assert await client.event() == ('message', {'n': 1})
            client.disconnect()
            await client.finished()
    run(main())
    assert sum('cannot be sent as JSON' in r.getMessage() for r in caplog.records) == 1


def test_a_relay_skips_a_message_that_is_not_json_and_goes_on(caplog):
    async def main():
        client = WebSocketClient(lambda ws: relay_websocket(ws, 'feed', ready='ready'))
        assert (await client.next())['type'] == 'websocket.accept'
        assert await client.frame() == 'ready'
        send('feed', bad={1, 2})
        send('feed', n=1)
        assert await client.frame() == '{"n": 1}'
        client.disconnect()
        await client.finished()
    run(main())
    assert any('cannot be sent as JSON' in r.getMessage() for r in caplog.records
               if r.levelname == 'ERROR')


# a client that reads nothing ------------------------------------------------------------------

class StuckConnection:
    """A server's connection whose client takes nothing: after the first writes, send()
    waits until the transport is aborted (then, as uvicorn's, it ignores what follows)."""

    def __init__(self) -> None:
        self.transport = self               # uvicorn's cycle: send.__self__.transport
        self.aborted = asyncio.Event()
        self.writes = 0

    def abort(self) -> None:
        self.aborted.set()

    async def receive(self) -> dict:
        await asyncio.Event().wait()        # the client says nothing, and stays
        return {}

    async def send(self, event: dict) -> None:
        self.writes += 1
        if self.writes > 2 and not self.aborted.is_set():
            await self.aborted.wait()


def test_a_stream_whose_client_reads_nothing_is_cut_off_soon_after_the_stop(
        server_handler, monkeypatch):
    monkeypatch.setattr(channels.asgi, 'STUCK_GRACE', 0.2)
    app = EndStreamsOnShutdown(routed(helper=stream_app('feed', ready=READY)))

    async def main():
        async with Lifespan(app):
            connection = StuckConnection()
            request = asyncio.ensure_future(app(http_scope(path='helper'),
                                                connection.receive, connection.send))
            await _until(lambda: Channel.get_channels('feed'), 'the stream to subscribe')
            send('feed', n=1)                       # its write waits for ever
            await _until(lambda: connection.writes == 3, 'the write to wait')
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(request, TIMEOUT)   # the abort let the write return
            assert connection.aborted.is_set()
    run(main())


def test_without_the_middleware_a_stuck_stream_is_cancelled_soon_after_the_stop(
        server_handler, monkeypatch):
    monkeypatch.setattr(channels.asgi, 'STUCK_GRACE', 0.2)

    async def main():
        async with end_streams_on_shutdown():
            connection = StuckConnection()
            request = asyncio.ensure_future(stream_app('feed', ready=READY)(
                http_scope(), connection.receive, connection.send))
            await _until(lambda: Channel.get_channels('feed'), 'the stream to subscribe')
            send('feed', n=1)
            await _until(lambda: connection.writes == 3, 'the write to wait')
            os.kill(os.getpid(), signal.SIGTERM)
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(request, TIMEOUT)
            assert not connection.aborted.is_set()
    run(main())


class UnflushedTransport:
    """A websocket connection whose client took nothing: whatever is sent (the close
    frame too) stays in the transport's buffer until it is aborted."""

    def __init__(self) -> None:
        self.transport = self
        self.aborted = False
        self.inbound: asyncio.Queue = asyncio.Queue()
        self.inbound.put_nowait({'type': 'websocket.connect'})
        self.sent: list[dict] = []

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0 if self.aborted else 4096

    async def send(self, event: dict) -> None:
        self.sent.append(event)


def test_a_relay_whose_close_the_client_never_takes_is_aborted_soon_after_the_stop(
        server_handler, monkeypatch):
    monkeypatch.setattr(channels.asgi, 'STUCK_GRACE', 0.2)

    async def relay(scope, receive, send):
        await relay_websocket((receive, send), 'feed', ready='ready')
    app = EndStreamsOnShutdown(routed(ws=relay))

    async def main():
        async with Lifespan(app):
            connection = UnflushedTransport()
            request = asyncio.ensure_future(app({'type': 'websocket', 'path': '/ws'},
                                                connection.inbound.get, connection.send))
            await _until(lambda: len(connection.sent) == 2, 'the ready frame')
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(request, TIMEOUT)       # closed with 1001 ...
            assert connection.sent[-1]['code'] == 1001 and not connection.aborted
            await _until(lambda: connection.aborted, 'the abort')  # ... never written
    run(main())


def test_under_uvicorn_a_stuck_stream_without_the_middleware_has_its_connection_aborted(
        monkeypatch):
    monkeypatch.setattr(channels.asgi, 'STUCK_GRACE', 0.2)
    server = FakeUvicornServer()
    connection = StuckConnection()
    server.server_state = types.SimpleNamespace(connections={connection})
    previous = signal.signal(signal.SIGTERM, server.handle_exit)
    connection.get_write_buffer_size = lambda: 0 if connection.aborted.is_set() else 65536

    async def main():
        async with end_streams_on_shutdown():
            request = asyncio.ensure_future(stream_app('feed', ready=READY)(
                http_scope(), connection.receive, connection.send))
            await _until(lambda: Channel.get_channels('feed'), 'the stream to subscribe')
            send('feed', n=1)
            await _until(lambda: connection.writes == 3, 'the write to wait')
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(request, TIMEOUT)     # not cancelled: the write returned
            assert connection.aborted.is_set()
    try:
        run(main())
    finally:
        signal.signal(signal.SIGTERM, previous)


async def _until(predicate: Callable[[], Any], what: str) -> None:
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.005)
    try:
        await asyncio.wait_for(wait(), TIMEOUT)
    except TimeoutError:
        raise AssertionError(f'timed out after {TIMEOUT}s waiting for {what}') from None


class LeavingConnection:
    """A server's connection as uvicorn's: the client takes nothing after the first writes
    (send() waits), then leaves: receive() says ``http.disconnect`` and send() returns at
    once, writing nothing, as uvicorn's does once the client is gone."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.writes = 0
        self.after_gone = 0

    async def receive(self) -> dict:
        await self.gone.wait()
        return {'type': 'http.disconnect'}

    async def send(self, event: dict) -> None:
        if self.gone.is_set():
            self.after_gone += 1
            return
        self.writes += 1
        if self.writes > 2:
            await self.gone.wait()


def test_a_stream_whose_client_left_stops_at_once_and_does_not_write_its_backlog():
    """A stream of a slow client holds a backlog in its inbox; once the client leaves,
    uvicorn's send() returns without suspending, so a stream that never yields to the
    event loop would JSON-encode and 'write' its whole backlog to nobody while the
    worker's loop (every other request) waits, and its stop runs far past STUCK_GRACE."""
    backlog = 300

    async def main():
        connection = LeavingConnection()
        stream = sse_events('feed', ready=READY)
        request = asyncio.ensure_future(stream(http_scope(), connection.receive,
                                               connection.send))
        await _until(lambda: Channel.get_channels('feed'), 'the stream to subscribe')
        send('feed', n=0)                                  # this write waits
        await _until(lambda: connection.writes == 3, 'the write to wait')
        for n in range(1, backlog + 1):
            send('feed', n=n)
        await _until(lambda: len(stream.inbox) == backlog, 'the backlog')
        connection.gone.set()
        await asyncio.wait_for(request, TIMEOUT)
        assert stream.disconnected
        assert connection.after_gone < 10, \
            f'{connection.after_gone} writes of a backlog of {backlog} after the client left'
    run(main())


def _refuse_to_unpickle() -> None:
    raise ModuleNotFoundError("No module named 'only_in_the_sender'")


class Unloadable:
    """Data that pickles in the sender and cannot be unpickled where it arrives (its
    class lives in a module that only the sender has)."""

    def __reduce__(self):
        return _refuse_to_unpickle, ()


def test_a_message_that_cannot_be_unpickled_is_skipped_and_the_stream_goes_on(caplog):
    async def main():
        client = Client(stream_app('feed', ready=READY))
        await opened(client)
        send('feed', thing=Unloadable())
        send('feed', n=2)
        assert await client.event() == ('message', {'n': 2})
        client.disconnect()
        await client.finished()
    with caplog.at_level(logging.ERROR, logger='channels.asgi'):
        run(main())
    assert any('only_in_the_sender' in r.getMessage() for r in caplog.records
               if r.name == 'channels.asgi')


def test_a_relay_skips_a_message_that_cannot_be_unpickled_and_goes_on(caplog):
    async def main():
        inbound: asyncio.Queue = asyncio.Queue()
        inbound.put_nowait({'type': 'websocket.connect'})
        sent: list[dict] = []
        relay = asyncio.ensure_future(relay_websocket((inbound.get, _append(sent)), 'feed',
                                                      ready='ready'))
        await _until(lambda: len(sent) == 2, 'the ready frame')
        send('feed', thing=Unloadable())
        send('feed', n=2)
        await _until(lambda: len(sent) == 3, 'the message after the bad one')
        assert json.loads(sent[2]['text']) == {'n': 2}
        inbound.put_nowait({'type': 'websocket.disconnect'})
        await asyncio.wait_for(relay, TIMEOUT)
    with caplog.at_level(logging.ERROR, logger='channels.asgi'):
        run(main())
    assert any('only_in_the_sender' in r.getMessage() for r in caplog.records
               if r.name == 'channels.asgi')


def _append(sent: list) -> Callable:
    async def send(event: dict) -> None:
        sent.append(event)
    return send


def test_a_relay_refuses_a_ready_frame_that_is_not_json_before_it_accepts():
    async def main():
        inbound: asyncio.Queue = asyncio.Queue()
        inbound.put_nowait({'type': 'websocket.connect'})
        sent: list[dict] = []
        with pytest.raises(TypeError, match='not JSON serializable'):
            await asyncio.wait_for(relay_websocket((inbound.get, _append(sent)), 'feed',
                                                   ready={'a set'}), TIMEOUT)
        assert sent == []                     # neither accepted nor closed with 1011
        assert not Channel.get_channels('feed')
    run(main())
