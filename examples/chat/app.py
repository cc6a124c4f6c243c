"""A chat room over Server-Sent Events, one channel topic per room, as a plain ASGI app.

Run it from the repository root, with one broker for the workers::

    channels-broker -- uvicorn examples.chat.app:app --workers 4

Each browser tab streams its room from ``GET /events?room=R`` (an ``EventSource``), which
``channels.listen('chat.rooms.R')`` feeds, and sends with ``POST /send``. Whichever worker
takes the POST sends the message to ``chat.rooms.R``; the broker carries it to every
worker, and each worker writes it to the streams it holds. So two tabs whose streams sit
in different workers still see the same messages, in the same order. The page says which
worker served it, which holds its stream, and which one took each message. Bridged
(``channels-broker --bridge URL -- uvicorn ...`` on several hosts), each message also
says which machine took it: the host name and port of the server that took the POST.

Routes:

- ``GET /?room=R``: the page (room ``lobby`` by default).
- ``GET /events?room=R``: the stream: an ``event: hello`` with this worker's pid once it
  listens (``listen()`` enters only once the broker has applied the stream's
  subscription, so whatever any worker sends after ``hello`` reaches it), then an ``event: message`` per chat message (JSON: ``id``, ``room``, ``name``,
  ``text``, ``pid`` of the worker that took the POST, ``machine``, its ``host:port``,
  ``timestamp``), and a comment line
  every ``KEEPALIVE`` seconds. A tab that falls ``INBOX_SIZE`` messages behind gets an
  ``event: lagged`` with the count it missed, and its stream ends (``EventSource``
  reconnects).
- ``POST /send``: JSON ``{"room", "name", "text"}`` (or a form post, answered with a
  redirect back to the room); answers JSON ``{"id", "pid"}``.
- ``GET /stats``: this worker's pid, open streams and messages seen per room.

Per worker, a :class:`channels.Scope` opened at lifespan startup and closed at lifespan
shutdown counts the messages of every room (the "seen" figure on the page). The
streams do not rely on it: each has its own subscription, in force before ``hello``.

The streams are :func:`channels.asgi.sse_events`, and they never hold up a shutdown:
``http.disconnect`` ends a stream, and :class:`channels.asgi.EndStreamsOnShutdown`,
around the app, ends every stream of the worker when the server starts to stop (uvicorn
waits for open responses to finish *before* it sends the lifespan shutdown event, and a
stream never finishes by itself); the browser's ``EventSource`` reconnects to whatever
runs next.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import socket
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, quote

import channels
from channels.asgi import EndStreamsOnShutdown, sse_event, sse_events

__all__ = ['app', 'TOPIC_PREFIX', 'ROOMS']

logger = logging.getLogger(__name__)

ASGIScope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

TOPIC_PREFIX = 'chat.rooms.'
ROOMS = ('lobby', 'random', 'python')      # the rooms the page links to; any valid name works
DEFAULT_ROOM = 'lobby'
ROOM_NAME = re.compile(r'[a-z0-9][a-z0-9-]{0,31}')
MAX_TEXT = 500
MAX_NAME = 32
MAX_BODY = 16 * 1024
KEEPALIVE = 15.0          # seconds between comment lines on an idle stream
INBOX_SIZE = 1000         # messages a stream may fall behind by
PAGE = (Path(__file__).with_name('index.html')).read_text(encoding='utf-8')


class Worker:
    """This worker process's state: its scope and its open streams."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.seen: Counter[str] = Counter()      # messages per room since the scope opened
        self.streams = 0
        self.scope: channels.Scope | None = None

    async def start(self) -> None:
        """Lifespan startup: open the scope."""
        self.pid = os.getpid()
        self.seen.clear()
        self.scope = channels.Scope(on_error=self._on_error)
        self.scope.subscribe(TOPIC_PREFIX + '*', self._count)
        logger.info('chat worker %d ready', self.pid)

    async def stop(self) -> None:
        """Lifespan shutdown (the streams have ended): close the scope."""
        if self.scope is not None:
            self.scope.close()
            self.scope = None
        logger.info('chat worker %d stopped', self.pid)

    async def _count(self, message: channels.Message) -> None:
        self.seen[message.topic[len(TOPIC_PREFIX):]] += 1

    def _on_error(self, exc: BaseException, message: channels.Message) -> None:
        logger.error('chat worker %d: handler failed on %s: %r', self.pid, message.topic, exc)


worker = Worker()


async def _app(scope: ASGIScope, receive: Receive, send: Send) -> None:
    if scope['type'] == 'lifespan':
        await _lifespan(receive, send)
        return
    if scope['type'] != 'http':
        return
    method, path = scope['method'], scope['path']
    if path == '/' and method in ('GET', 'HEAD'):
        await _page(scope, send)
    elif path == '/events' and method == 'GET':
        await _events(scope, receive, send)
    elif path == '/send' and method == 'POST':
        await _send_message(scope, receive, send)
    elif path == '/stats' and method == 'GET':
        await _json(send, 200, {'pid': worker.pid, 'streams': worker.streams,
                                'seen': dict(worker.seen)})
    elif path in ('/', '/events', '/send', '/stats'):
        await _text(send, 405, 'method not allowed\n')
    else:
        await _text(send, 404, 'not found\n')


app = EndStreamsOnShutdown(_app)
"""The ASGI application: its open streams end when the server starts to stop."""


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        event = await receive()
        if event['type'] == 'lifespan.startup':
            try:
                await worker.start()
            except Exception as exc:
                logger.exception('chat worker failed to start')
                await send({'type': 'lifespan.startup.failed', 'message': repr(exc)})
                return
            await send({'type': 'lifespan.startup.complete'})
        elif event['type'] == 'lifespan.shutdown':
            await worker.stop()
            await send({'type': 'lifespan.shutdown.complete'})
            return


def _room(scope: ASGIScope) -> str | None:
    """The ``room`` query parameter if it is a valid room name, else None."""
    query = parse_qs(scope.get('query_string', b'').decode('latin-1'))
    room = query.get('room', [DEFAULT_ROOM])[0]
    return room if ROOM_NAME.fullmatch(room) else None


async def _page(scope: ASGIScope, send: Send) -> None:
    room = _room(scope)
    if room is None:
        await _text(send, 400, 'room: 1 to 32 of a-z, 0-9 and -\n')
        return
    links = ' '.join(
        f'<a href="/?room={quote(name)}"{" aria-current=page" if name == room else ""}>'
        f'#{html.escape(name)}</a>' for name in dict.fromkeys((*ROOMS, room)))
    values = {'room': room, 'pid': str(worker.pid), 'seen': str(worker.seen[room]),
              'rooms': links, 'machine': _machine(scope)}
    body = re.sub(r'\{\{ (\w+) \}\}',
                  lambda m: values[m[1]] if m[1] == 'rooms' else html.escape(values[m[1]]),
                  PAGE).encode()
    await send({'type': 'http.response.start', 'status': 200,
                'headers': [(b'content-type', b'text/html; charset=utf-8'),
                            (b'content-length', str(len(body)).encode()),
                            (b'cache-control', b'no-store')]})
    await send({'type': 'http.response.body', 'body': body})


async def _events(scope: ASGIScope, receive: Receive, send: Send) -> None:
    """The room's stream, until the client goes away or the worker stops."""
    room = _room(scope)
    if room is None:
        await _text(send, 400, 'room: 1 to 32 of a-z, 0-9 and -\n')
        return
    # "hello" once listening: what any worker sends after the page sees it reaches it.
    # A tab INBOX_SIZE messages behind gets "lagged" and the stream ends; it reconnects.
    stream = sse_events(TOPIC_PREFIX + room, data=_public, retry=2000, keepalive=KEEPALIVE,
                        ready=sse_event({'pid': worker.pid, 'room': room}, event='hello'),
                        maxsize=INBOX_SIZE)
    worker.streams += 1
    try:
        await stream(scope, receive, send)
    finally:
        worker.streams -= 1


def _public(message: channels.Message) -> dict[str, Any]:
    data = message.data
    return {'id': message.id, 'room': message.topic[len(TOPIC_PREFIX):],
            'name': data.get('name', ''), 'text': data.get('text', ''),
            'pid': data.get('pid'), 'machine': data.get('machine'),
            'timestamp': message.timestamp}


def _machine(scope: ASGIScope) -> str:
    """This machine as the page shows it: the host name, and the port that took the
    request (two servers on one host, as in a demo, differ by it)."""
    server = scope.get('server') or (None, None)
    host = socket.gethostname()
    return f'{host}:{server[1]}' if server[1] is not None else host


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or None if it is over ``MAX_BODY`` or the client left."""
    body = b''
    while True:
        event = await receive()
        if event['type'] == 'http.disconnect':
            return None
        body += event.get('body', b'')
        if len(body) > MAX_BODY:
            return None
        if not event.get('more_body', False):
            return body


async def _send_message(scope: ASGIScope, receive: Receive, send: Send) -> None:
    """``POST /send``: publish one message to its room from this worker."""
    headers = dict(scope['headers'])
    content_type = headers.get(b'content-type', b'').split(b';')[0].strip().lower()
    body = await _read_body(receive)
    if body is None:
        await _text(send, 413, 'request body too large\n')
        return
    form = content_type == b'application/x-www-form-urlencoded'
    try:
        if form:
            fields = {k: v[0] for k, v in parse_qs(body.decode('utf-8')).items()}
        else:
            fields = json.loads(body)
            if not isinstance(fields, dict):
                raise ValueError('not a JSON object')
    except ValueError as exc:       # also UnicodeDecodeError and JSONDecodeError
        await _json(send, 400, {'error': f'a JSON object or a form is required: {exc}'})
        return
    room = fields.get('room', DEFAULT_ROOM)
    name = fields.get('name') or 'anonymous'
    text = fields.get('text', '')
    if not (isinstance(room, str) and ROOM_NAME.fullmatch(room)):
        error = 'room: 1 to 32 of a-z, 0-9 and -'
    elif not isinstance(name, str) or len(name) > MAX_NAME:
        error = f'name: at most {MAX_NAME} characters'
    elif not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
        error = f'text: 1 to {MAX_TEXT} characters'
    else:
        error = None
    if error is not None:
        await _json(send, 400, {'error': error})
        return
    message = channels.Channel(TOPIC_PREFIX + room).send(
        {'name': name.strip() or 'anonymous', 'text': text, 'pid': worker.pid,
         'machine': _machine(scope)})
    if form:
        await send({'type': 'http.response.start', 'status': 303,
                    'headers': [(b'location', f'/?room={room}'.encode()),
                                (b'content-length', b'0')]})
        await send({'type': 'http.response.body', 'body': b''})
    else:
        await _json(send, 200, {'id': message.id, 'pid': worker.pid})


async def _json(send: Send, status: int, data: dict[str, Any]) -> None:
    await _reply(send, status, b'application/json', json.dumps(data).encode())


async def _text(send: Send, status: int, text: str) -> None:
    await _reply(send, status, b'text/plain; charset=utf-8', text.encode())


async def _reply(send: Send, status: int, content_type: bytes, body: bytes) -> None:
    await send({'type': 'http.response.start', 'status': status,
                'headers': [(b'content-type', content_type),
                            (b'content-length', str(len(body)).encode())]})
    await send({'type': 'http.response.body', 'body': body})
