"""A python-socketio ``Server`` app (WSGI, threads) for the tests, and for a benchmark.

Run as ``channels-broker -- gunicorn -w 4 --threads 50 --chdir tests/apps
socketio_sync:app``: gunicorn's threaded workers run the websockets with
simple-websocket (python-socketio's ``async_mode='threading'``). Websocket transport
only, so no sticky sessions are needed. The Socket.IO events and ``GET /pid`` are those
of ``socketio_async`` (see its docstring); the client manager is
``channels.socketio.Manager()``, or python-socketio's ``RedisManager`` with
``MPCH_SOCKETIO_MANAGER=redis://...``.
"""

from __future__ import annotations

import os

import socketio

import channels
import channels.socketio

MANAGER = os.environ.get('MPCH_SOCKETIO_MANAGER', 'channels')


def _manager() -> socketio.Manager:
    if MANAGER.startswith(('redis://', 'unix://')):
        return socketio.RedisManager(MANAGER)
    return channels.socketio.Manager()


sio = socketio.Server(async_mode='threading', transports=['websocket'],
                      client_manager=_manager())


@sio.event
def connect(sid, environ, auth=None):
    for room in (auth or {}).get('rooms', []):
        sio.enter_room(sid, room)


@sio.event
def whoami(sid, _=None):
    return {'pid': os.getpid(), 'sid': sid}


@sio.on('emit')
def on_emit(sid, request):
    sio.emit(request['event'], {**request.get('data', {}), 'by': os.getpid()},
             to=request.get('to'), skip_sid=request.get('skip_sid'),
             namespace=request.get('namespace'))
    return os.getpid()


@sio.event
def join(sid, request):
    sio.enter_room(request.get('sid') or sid, request['room'])
    return os.getpid()


@sio.event
def leave(sid, request):
    sio.leave_room(request.get('sid') or sid, request['room'])
    return os.getpid()


@sio.on('close_room')
def on_close_room(sid, request):
    sio.close_room(request['room'])
    return os.getpid()


@sio.on('disconnect_sid')
def on_disconnect_sid(sid, request):
    sio.disconnect(request['sid'])
    return os.getpid()


@sio.on('call')
def on_call(sid, request):
    answer = sio.call(request['event'], request.get('data'), to=request['sid'], timeout=5)
    return {'pid': os.getpid(), 'answer': answer}


@sio.event
def subscriptions(sid, _=None):
    return len(channels.Channel.get_channels(sio.manager.topic)) \
        if MANAGER == 'channels' else None


@sio.on('connect', namespace='/other')
def connect_other(sid, environ, auth=None):
    pass


@sio.on('whoami', namespace='/other')
def whoami_other(sid, _=None):
    return {'pid': os.getpid(), 'sid': sid}


def http(environ, start_response):
    """``GET /pid``; everything else is 404."""
    if environ.get('PATH_INFO') == '/pid':
        status, body = '200 OK', f'{os.getpid()}\n'.encode()
    else:
        status, body = '404 Not Found', b'not found\n'
    start_response(status, [('Content-Type', 'text/plain'),
                            ('Content-Length', str(len(body)))])
    return [body]


app = socketio.WSGIApp(sio, http)
