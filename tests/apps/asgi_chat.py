"""The chat app of ``wsgi_chat`` as a plain ASGI app, for ``uvicorn --workers N``.

uvicorn starts its workers with multiprocessing spawn, so each worker imports this module
(and subscribes its own channel to ``chat.*``).
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs

from _chat_common import publish


async def app(scope, receive, send):
    if scope['type'] == 'lifespan':
        while True:
            event = await receive()
            if event['type'] == 'lifespan.startup':
                await send({'type': 'lifespan.startup.complete'})
            elif event['type'] == 'lifespan.shutdown':
                await send({'type': 'lifespan.shutdown.complete'})
                return
    if scope['type'] != 'http':
        return
    path = scope['path']
    if path == '/publish':
        query = parse_qs(scope.get('query_string', b'').decode())
        try:
            n = int(query['n'][0])
        except (KeyError, ValueError):
            return await _reply(send, 400, 'n=<int> is required\n')
        return await _reply(send, 200, f'{publish(n)}\n')
    if path == '/pid':
        return await _reply(send, 200, f'{os.getpid()}\n')
    return await _reply(send, 404, 'not found\n')


async def _reply(send, status: int, text: str) -> None:
    body = text.encode()
    await send({'type': 'http.response.start', 'status': status,
                'headers': [(b'content-type', b'text/plain'),
                            (b'content-length', str(len(body)).encode())]})
    await send({'type': 'http.response.body', 'body': body})
