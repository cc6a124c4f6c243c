"""A python-socketio ``AsyncServer`` app (ASGI) for the tests, and for a benchmark.

Run as ``channels-broker -- uvicorn socketio_async:app --workers 4 --app-dir tests/apps``.
Websocket transport only, so no sticky sessions are needed. The client manager is
``channels.socketio.AsyncManager()``, or, with ``MPCH_SOCKETIO_MANAGER=redis://...``,
python-socketio's own ``AsyncRedisManager`` on that Redis (to measure against).

Socket.IO events (the same in ``socketio_sync`` and ``socketio_flask``; each answers
with an ack):

- ``connect`` with ``auth={'rooms': [...]}`` enters those rooms;
- ``whoami`` -> ``{'pid', 'sid'}`` (also on the namespace ``/other``);
- ``emit`` ``{'event', 'data', 'to', 'skip_sid', 'namespace'}``: this worker emits
  ``data`` plus ``'by': pid``; -> pid;
- ``join`` and ``leave`` ``{'room', 'sid'}``: ``enter_room``/``leave_room`` for *sid*
  (default: the caller), which may be connected to another worker; -> pid;
- ``close_room`` ``{'room'}``, ``disconnect_sid`` ``{'sid'}`` (a sid anywhere); -> pid;
- ``call`` ``{'sid', 'event', 'data'}``: ``sio.call()`` to *sid*; -> ``{'pid', 'answer'}``;
- ``subscriptions`` -> how many channels this worker has on the manager's topic.

HTTP: ``GET /pid`` (the worker's pid), ``GET /`` (``socketio_page.html``) and ``GET
/socket.io.min.js`` (the file named by ``MPCH_SOCKETIO_CLIENT_JS``, when set).
"""

from __future__ import annotations

import os
from pathlib import Path

import socketio

import channels
import channels.socketio

HERE = Path(__file__).resolve().parent
MANAGER = os.environ.get('MPCH_SOCKETIO_MANAGER', 'channels')


def _manager() -> socketio.AsyncManager:
    if MANAGER.startswith(('redis://', 'unix://')):
        return socketio.AsyncRedisManager(MANAGER)
    return channels.socketio.AsyncManager()


sio = socketio.AsyncServer(async_mode='asgi', transports=['websocket'],
                           client_manager=_manager())


@sio.event
async def connect(sid, environ, auth=None):
    for room in (auth or {}).get('rooms', []):
        await sio.enter_room(sid, room)


@sio.event
async def whoami(sid, _=None):
    return {'pid': os.getpid(), 'sid': sid}


@sio.on('emit')
async def on_emit(sid, request):
    await sio.emit(request['event'], {**request.get('data', {}), 'by': os.getpid()},
                   to=request.get('to'), skip_sid=request.get('skip_sid'),
                   namespace=request.get('namespace'))
    return os.getpid()


@sio.event
async def join(sid, request):
    await sio.enter_room(request.get('sid') or sid, request['room'])
    return os.getpid()


@sio.event
async def leave(sid, request):
    await sio.leave_room(request.get('sid') or sid, request['room'])
    return os.getpid()


@sio.on('close_room')
async def on_close_room(sid, request):
    await sio.close_room(request['room'])
    return os.getpid()


@sio.on('disconnect_sid')
async def on_disconnect_sid(sid, request):
    await sio.disconnect(request['sid'])
    return os.getpid()


@sio.on('call')
async def on_call(sid, request):
    answer = await sio.call(request['event'], request.get('data'), to=request['sid'],
                            timeout=5)
    return {'pid': os.getpid(), 'answer': answer}


@sio.event
async def subscriptions(sid, _=None):
    return len(channels.Channel.get_channels(sio.manager.topic)) \
        if MANAGER == 'channels' else None


@sio.on('connect', namespace='/other')
async def connect_other(sid, environ, auth=None):
    pass


@sio.on('whoami', namespace='/other')
async def whoami_other(sid, _=None):
    return {'pid': os.getpid(), 'sid': sid}


async def http(scope, receive, send):
    """``GET /pid``; everything else is 404 (ASGIApp handles the lifespan)."""
    if scope['path'] == '/pid':
        status, body = 200, f'{os.getpid()}\n'.encode()
    else:
        status, body = 404, b'not found\n'
    await send({'type': 'http.response.start', 'status': status,
                'headers': [(b'content-type', b'text/plain'),
                            (b'content-length', str(len(body)).encode())]})
    await send({'type': 'http.response.body', 'body': body})


_static = {'/': {'filename': str(HERE / 'socketio_page.html'), 'content_type': 'text/html'}}
if os.environ.get('MPCH_SOCKETIO_CLIENT_JS'):
    _static['/socket.io.min.js'] = {'filename': os.environ['MPCH_SOCKETIO_CLIENT_JS'],
                                    'content_type': 'application/javascript'}

app = socketio.ASGIApp(sio, other_asgi_app=http, static_files=_static)
