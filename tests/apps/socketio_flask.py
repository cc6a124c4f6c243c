"""A Flask-SocketIO app for the tests: ``SocketIO(app, client_manager=Manager())``.

Run as ``channels-broker -- gunicorn -w 4 --threads 50 --chdir tests/apps
socketio_flask:app`` (threads: Flask-SocketIO's ``async_mode='threading'`` with
simple-websocket). The Socket.IO events and ``GET /pid`` are those of
``socketio_async`` (see its docstring), written with Flask-SocketIO's API.
"""

from __future__ import annotations

import os

from flask import Flask, request
from flask_socketio import SocketIO, close_room, disconnect, emit, join_room, leave_room

import channels
import channels.socketio

app = Flask(__name__)
socketio = SocketIO(app, client_manager=channels.socketio.Manager(), async_mode='threading',
                    transports=['websocket'])


@app.route('/pid')
def pid():
    return f'{os.getpid()}\n', 200, {'Content-Type': 'text/plain'}


@socketio.on('connect')
def on_connect(auth=None):
    for room in (auth or {}).get('rooms', []):
        join_room(room)


@socketio.on('whoami')
def whoami(_=None):
    return {'pid': os.getpid(), 'sid': request.sid}


@socketio.on('emit')
def on_emit(asked):
    emit(asked['event'], {**asked.get('data', {}), 'by': os.getpid()},
         to=asked.get('to'), skip_sid=asked.get('skip_sid'),
         namespace=asked.get('namespace') or '/', broadcast=asked.get('to') is None)
    return os.getpid()


@socketio.on('join')
def on_join(asked):
    join_room(asked['room'], sid=asked.get('sid') or request.sid)
    return os.getpid()


@socketio.on('leave')
def on_leave(asked):
    leave_room(asked['room'], sid=asked.get('sid') or request.sid)
    return os.getpid()


@socketio.on('close_room')
def on_close_room(asked):
    close_room(asked['room'])
    return os.getpid()


@socketio.on('disconnect_sid')
def on_disconnect_sid(asked):
    disconnect(asked['sid'])
    return os.getpid()


@socketio.on('call')
def on_call(asked):
    answer = socketio.call(asked['event'], asked.get('data'), to=asked['sid'], timeout=5)
    return {'pid': os.getpid(), 'answer': answer}


@socketio.on('subscriptions')
def subscriptions(_=None):
    return len(channels.Channel.get_channels(socketio.server.manager.topic))


@socketio.on('connect', namespace='/other')
def on_connect_other(auth=None):
    pass


@socketio.on('whoami', namespace='/other')
def whoami_other(_=None):
    return {'pid': os.getpid(), 'sid': request.sid}
