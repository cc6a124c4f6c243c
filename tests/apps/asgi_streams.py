"""A Starlette app that holds SSE streams open, for stopping real servers under it.

Three apps, one per way of ending streams at shutdown (``uvicorn asgi_streams:NAME``):

- ``app_with_middleware``: ``EndStreamsOnShutdown`` added as Starlette middleware;
- ``app_with_lifespan``: ``end_streams_on_shutdown()`` in the app's lifespan;
- ``app_without``: neither (what the helper fixes: the server waits for the streams).

Routes: ``GET /pid``; ``GET /events``, a ``StreamingResponse`` of
``sse_events('feed.*')`` that says ``event: ready`` with the worker's pid once it
listens. At lifespan startup each worker subscribes a channel to ``chat.*`` (what
``tests/servers.py`` looks for at the broker to know the worker is up).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

import channels
from channels.asgi import EndStreamsOnShutdown, end_streams_on_shutdown, sse_event, sse_events


async def pid(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f'{os.getpid()}\n')


async def events(request: Request) -> StreamingResponse:
    ready = sse_event({'pid': os.getpid()}, event='ready')
    return StreamingResponse(sse_events('feed.*', ready=ready, request=request),
                             media_type='text/event-stream')


def _ignore(message: channels.Message) -> None:
    pass


@contextlib.asynccontextmanager
async def _worker(app: Starlette, end_streams: bool) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        if end_streams:
            await stack.enter_async_context(end_streams_on_shutdown())
        scope = stack.enter_context(channels.Scope())
        scope.subscribe('chat.*', _ignore)
        yield


def _app(*, middleware: bool = False, lifespan: bool = False) -> Starlette:
    return Starlette(
        routes=[Route('/pid', pid), Route('/events', events)],
        middleware=[Middleware(EndStreamsOnShutdown)] if middleware else [],
        lifespan=lambda app: _worker(app, end_streams=lifespan))


app_with_middleware = _app(middleware=True)
app_with_lifespan = _app(lifespan=True)
app_without = _app()
