"""A Lona app whose channels go through mpchannels; ``tests/test_lona.py`` runs two of it.

    CHANNELS_BROKER_ADDRESS=ADDR python3 tests/apps/lona_app.py --host 127.0.0.1 --port N

It runs on Lona's own server (``App.run``) with ``CHANNEL_MESSAGE_BROKER_CLASS =
'channels.lona.MessageBroker'`` and one task worker thread, so that its handlers run in
the order messages arrive (and a short ``CHANNEL_WORKER_TIMEOUT``: on SIGTERM, Lona's server
waits up to that long for its channel threads). Its routes are not interactive and answer JSON:

* ``/pid``: this process's pid;
* ``/subscribe?topic=T``: a Lona channel on ``T`` that records what it receives, then
  ``channels.lona.flush()``; answers ``{"pid", "flushed"}``;
* ``/unsubscribe?topic=T``: unsubscribes this process's channels on ``T``, then
  ``channels.lona.flush()``; answers ``{"pid", "flushed"}``;
* ``/send?topic=T&n=N[&local=1][&droppable=1][&expiry=SECONDS]``:
  ``Channel(T).send({'n': N, 'pid': <pid>}, ...)``; answers ``{"pid"}``;
* ``/received?topic=T``: what the channels on ``T`` received, in order, each
  ``{"pid", "topic", "data", "type", "id", "timestamp", "local", "droppable",
  "expiry"}`` (the pid of the process that handled it, the type's qualified name, the
  expiry as a POSIX time or null).
"""

from __future__ import annotations

import os
import threading
from datetime import timedelta

from lona import App, Channel, View
from lona.responses import JsonResponse

import channels.lona

app = App(__file__)
app.settings.CHANNEL_MESSAGE_BROKER_CLASS = 'channels.lona.MessageBroker'
app.settings.MAX_CHANNEL_TASK_WORKER_THREADS = 1
app.settings.CHANNEL_WORKER_TIMEOUT = 0.2

_lock = threading.Lock()
_received: dict[str, list[dict]] = {}
_channels: list[Channel] = []


def _recorder(topic: str):
    def record(message) -> None:
        line = {'pid': os.getpid(), 'topic': message.topic, 'data': message.data,
                'type': f'{type(message).__module__}.{type(message).__qualname__}',
                'id': getattr(message, 'id', None),
                'timestamp': getattr(message, 'timestamp', None),
                'local': message.local, 'droppable': message.droppable,
                'expiry': message.expiry.timestamp() if message.expiry else None}
        with _lock:
            _received[topic].append(line)
    return record


@app.route('/pid', interactive=False)
class Pid(View):
    def handle_request(self, request):
        return JsonResponse({'pid': os.getpid()})


@app.route('/subscribe', interactive=False)
class Subscribe(View):
    def handle_request(self, request):
        topic = request.GET['topic']
        with _lock:
            _received.setdefault(topic, [])
            _channels.append(Channel(topic, _recorder(topic)))
        return JsonResponse({'pid': os.getpid(), 'flushed': channels.lona.flush(10.0)})


@app.route('/unsubscribe', interactive=False)
class Unsubscribe(View):
    def handle_request(self, request):
        topic = request.GET['topic']
        with _lock:
            for channel in [channel for channel in _channels if channel.topic == topic]:
                channel.unsubscribe()
                _channels.remove(channel)
        return JsonResponse({'pid': os.getpid(), 'flushed': channels.lona.flush(10.0)})


@app.route('/send', interactive=False)
class Send(View):
    def handle_request(self, request):
        query = request.GET
        expiry = timedelta(seconds=float(query['expiry'])) if 'expiry' in query else None
        Channel(query['topic']).send({'n': int(query['n']), 'pid': os.getpid()},
                                     expiry=expiry, local=query.get('local') == '1',
                                     droppable=query.get('droppable') == '1')
        return JsonResponse({'pid': os.getpid()})


@app.route('/received', interactive=False)
class Received(View):
    def handle_request(self, request):
        with _lock:
            return JsonResponse(list(_received.get(request.GET['topic'], [])))


if __name__ == '__main__':
    app.run()
