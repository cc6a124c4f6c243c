"""A tiny WSGI chat app for the server tests (no framework).

``GET /publish?n=N`` sends ``{'n': N, 'sender': pid}`` to ``chat.room`` and returns the
worker's pid; ``GET /pid`` returns the worker's pid. Importing it subscribes a channel to
``chat.*`` that records what it receives (see ``_chat_common``); under ``gunicorn
--preload`` that happens in the master, and each forked worker inherits the subscription.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs

from _chat_common import publish


def app(environ, start_response):
    path = environ.get('PATH_INFO', '')
    if path == '/publish':
        query = parse_qs(environ.get('QUERY_STRING', ''))
        try:
            n = int(query['n'][0])
        except (KeyError, ValueError):
            return _reply(start_response, '400 Bad Request', 'n=<int> is required\n')
        return _reply(start_response, '200 OK', f'{publish(n)}\n')
    if path == '/pid':
        return _reply(start_response, '200 OK', f'{os.getpid()}\n')
    return _reply(start_response, '404 Not Found', 'not found\n')


def _reply(start_response, status: str, text: str):
    body = text.encode()
    start_response(status, [('Content-Type', 'text/plain'),
                            ('Content-Length', str(len(body)))])
    return [body]
