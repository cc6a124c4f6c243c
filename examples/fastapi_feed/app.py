"""A live notifications feed with FastAPI: SSE and websockets across the workers.

Run it from the repository root, with one broker for the workers::

    python3 -m pip install -e '.[demo]'
    channels-broker -- uvicorn examples.fastapi_feed.app:app --workers 4

Open ``http://127.0.0.1:8000/?user=ann`` in a few tabs (and ``?user=bob``), and
notify from any of them, or with ``curl``::

    curl -d '{"text": "deploy done"}' -H 'content-type: application/json' localhost:8000/notify
    curl -d '{"text": "your build", "user": "ann"}' -H 'content-type: application/json' \\
        localhost:8000/notify

Whichever worker takes the POST sends the note to ``feed.all`` (or to ``feed.users.ann``),
and the broker carries it to every worker holding a stream of it.

- ``POST /notify``: JSON ``{"text", "user"}`` (``user`` null: everyone); answers
  ``{"id", "pid"}``, the note's id and the pid of the worker that sent it.
- ``GET /events?user=ann``: Server-Sent Events, ``sse_events()`` in a
  ``StreamingResponse``: first ``event: ready`` with the pid of the worker holding the
  stream, once the stream's subscriptions are in force (whatever is notified after it
  reaches the stream), then an ``event: message`` per note (JSON ``{"id", "text",
  "user", "pid"}``), comment lines when idle.
- ``WS /ws?user=ann``: the same feed through ``relay_websocket()``: first ``{"ready":
  pid}``, then a JSON text frame per note; each text frame the client sends is
  notified to everyone.
- ``GET /``: a page showing the feed of ``?user=``.

``EndStreamsOnShutdown`` ends every open stream when the server starts to stop, so
Ctrl-C or SIGTERM stops the workers at once, whatever streams browsers hold.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, WebSocket
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, Field

import channels
from channels.asgi import EndStreamsOnShutdown, relay_websocket, sse_event, sse_events

__all__ = ['app']

USER = r'^[a-z0-9][a-z0-9-]{0,31}$'
MAX_TEXT = 500
PAGE = Path(__file__).with_name('index.html').read_text(encoding='utf-8')

app = FastAPI(title='mpchannels feed')
app.add_middleware(EndStreamsOnShutdown)

User = Annotated[str | None, Query(pattern=USER)]


class Note(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    user: str | None = Field(default=None, pattern=USER)


def topics(user: str | None) -> list[str]:
    """The feed of *user*: the notes to everyone, and to them."""
    return ['feed.all'] if user is None else ['feed.all', f'feed.users.{user}']


def notify_topic(user: str | None) -> str:
    return 'feed.all' if user is None else f'feed.users.{user}'


def public(message: channels.Message) -> dict[str, Any]:
    """A note as the clients get it."""
    return {'id': message.id, **message.data}


@app.post('/notify')
async def notify(note: Note) -> dict[str, Any]:
    message = channels.Channel(notify_topic(note.user)).send(
        {'text': note.text, 'user': note.user, 'pid': os.getpid()})
    return {'id': message.id, 'pid': os.getpid()}


@app.get('/events')
async def events(request: Request, user: User = None) -> StreamingResponse:
    ready = sse_event({'pid': os.getpid()}, event='ready')
    return StreamingResponse(sse_events(*topics(user), data=public, ready=ready,
                                        request=request),
                             media_type='text/event-stream',
                             headers={'Cache-Control': 'no-store', 'X-Accel-Buffering': 'no'})


@app.websocket('/ws')
async def feed_socket(websocket: WebSocket, user: User = None) -> None:
    def notify_everyone(text: str | bytes) -> None:
        if isinstance(text, str) and 0 < len(text) <= MAX_TEXT:
            channels.Channel('feed.all').send({'text': text, 'user': None,
                                               'pid': os.getpid()})
    await relay_websocket(websocket, *topics(user), data=public,
                          ready={'ready': os.getpid()}, on_receive=notify_everyone)


@app.get('/', response_class=HTMLResponse)
async def page() -> str:
    return PAGE
