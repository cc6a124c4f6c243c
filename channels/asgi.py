"""Streams for ASGI apps (Starlette, FastAPI, or none): Server-Sent Events and websocket
relays fed by :func:`channels.listen`, and a clean stop while they are open.

::

    from channels.asgi import EndStreamsOnShutdown, relay_websocket, sse_events

    app.add_middleware(EndStreamsOnShutdown)        # streams end when the server stops

    @app.get('/events')                             # FastAPI or Starlette
    async def events():
        return StreamingResponse(sse_events('feed.*'), media_type='text/event-stream')

    @app.websocket('/ws')
    async def ws(websocket: WebSocket):
        await relay_websocket(websocket, 'feed.*')

    await sse_events('feed.*')(scope, receive, send)     # plain ASGI: it is an app too

**Why streams need ending.** uvicorn (alone or as gunicorn's worker) waits for every
open response to finish *before* it tells the app to stop (the lifespan shutdown
event), and a stream never finishes by itself: SIGTERM with open streams waits for
uvicorn's ``--timeout-graceful-shutdown`` (none by default) or gunicorn's
``--graceful-timeout`` (30 s), then cuts them. :class:`EndStreamsOnShutdown` (an ASGI
middleware) or :class:`end_streams_on_shutdown` (for a lifespan) chain a step in front
of the server's SIGINT/SIGTERM handlers that ends every open stream of the worker: it
closes every open inbox of the worker's event loop (:func:`channels.inbox.close_all`),
so every ``async for message in inbox`` ends, the helpers' and your own, and keeps
closing those opened later until the lifespan shutdown. Under uvicorn it also watches
the server, for the stops that come without a signal (``--limit-max-requests``, and
gunicorn's ``--max-requests``). A stream whose client takes nothing of what is written
(its write waits for ever) is cut off :data:`STUCK_GRACE` seconds (1) into the stop.
At the lifespan shutdown the handlers are put back.

Nothing here imports Starlette or FastAPI: Starlette's ``WebSocket`` and ``Request``
are used through the ASGI messages they pass on.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import logging
import signal
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from .errors import BrokerUnavailableError, InboxOverflowError
from .inbox import Inbox, close_all, listen
from .runtime import FLUSH_TIMEOUT

if TYPE_CHECKING:
    from .message import Message

__all__ = ['sse_events', 'sse_event', 'EventStream', 'relay_websocket',
           'EndStreamsOnShutdown', 'end_streams_on_shutdown', 'end_streams',
           'SSE_HEADERS', 'KEEPALIVE', 'STUCK_GRACE']

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

KEEPALIVE = 15.0
"""Seconds without a write after which an SSE stream writes a comment line (proxies and
browsers drop connections that stay silent for long)."""

SSE_HEADERS = [(b'content-type', b'text/event-stream; charset=utf-8'),
               (b'cache-control', b'no-store'),
               (b'x-accel-buffering', b'no')]      # nginx: pass each event on at once
"""The headers of an SSE response sent by :class:`EventStream` as an ASGI app."""

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_SWEEP_INTERVAL = 0.1         # while stopping: how often inboxes opened since are closed
_WATCH_INTERVAL = 0.1         # how often uvicorn's server is looked at (as uvicorn does)
STUCK_GRACE = 1.0
"""Seconds after the server starts to stop at which a stream that has still not ended
(its client takes nothing of what is written, so a write waits for ever) is cut off, so
that the stop does not wait for a client that does not read: under uvicorn (alone or
as gunicorn's worker) its connection is aborted, found through
:class:`EndStreamsOnShutdown` or among uvicorn's connections that still hold unwritten
bytes, so the write returns and the stream ends as for a client that left; elsewhere
its task is cancelled (the server may log that as an error)."""

# The request that passes through EndStreamsOnShutdown: its task and the server's send,
# from which the server's transport is found when needed (:func:`_transport_of`). A
# stuck stream aborts the transport, else cancels the task (Starlette's
# StreamingResponse iterates a stream in a child task of its own).
_request: contextvars.ContextVar[tuple[asyncio.Task | None, Any] | None] = \
    contextvars.ContextVar('channels.asgi request', default=None)
_KEEPALIVE_COMMENT = b': keepalive\n\n'


# Server-Sent Events ------------------------------------------------------------------------

def sse_event(data: Any = None, event: str | None = None, *, id: str | None = None,
              retry: int | None = None) -> bytes:
    """One Server-Sent Event, encoded: ``event:``, ``id:``, ``retry:`` and ``data:`` lines
    and the blank line that ends it.

    *data* that is a ``str`` is sent as it is (one ``data:`` line per line of it); any
    other value but ``None`` as JSON (``TypeError`` for what JSON has no form for, such
    as a set or a datetime, ``ValueError`` for ``NaN`` and infinities, which browsers'
    ``JSON.parse`` refuses). ``None`` sends no ``data:`` line (an event without one is
    not dispatched by browsers: use it for *retry* alone). *retry* is the reconnection
    delay in milliseconds that ``EventSource`` uses from then on.
    """
    lines = []
    for name, value in (('event', event), ('id', id)):
        if value is not None:
            if not isinstance(value, str) or '\n' in value or '\r' in value:
                raise ValueError(f'sse_event(): {name} must be a str without line breaks, '
                                 f'got {value!r}')
            lines.append(f'{name}: {value}')
    if retry is not None:
        if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
            raise ValueError(f'sse_event(): retry must be an int of milliseconds >= 0, got '
                             f'{retry!r}')
        lines.append(f'retry: {retry}')
    if data is not None:
        text = data if isinstance(data, str) else _json(data)
        lines.extend(f'data: {line}' for line in (text.splitlines() or ['']))
    return ('\n'.join(lines) + '\n\n').encode()


def sse_events(*topics: str, data: Callable[[Message], Any] | None = None,
               event: str = 'message', ready: bytes | None = None, retry: int | None = None,
               keepalive: float | None = KEEPALIVE, receive: Receive | None = None,
               request: Any = None, maxsize: int = 1000, overflow: str = 'error',
               ready_timeout: float = FLUSH_TIMEOUT) -> EventStream:
    """A Server-Sent Events stream of the messages of *topics* (wildcards allowed).

    The result is an async iterable of encoded events (``bytes``), for Starlette's
    ``StreamingResponse(..., media_type='text/event-stream')`` or sse-starlette's
    ``EventSourceResponse`` (which passes bytes on unchanged), and an ASGI app that
    sends it as the whole response, for plain ASGI: ``await sse_events(...)(scope,
    receive, send)``.

    :data: what a message becomes: ``data(message)``, by default ``message.data``, sent
        as JSON (a ``str`` as it is); ``bytes`` are a whole event, sent unchanged (say,
        ``sse_event(..., id=message.id)``); ``None`` skips the message (a filter).
    :event: the events' name (``'message'``: what ``EventSource.onmessage`` gets).
    :ready: bytes to send once the subscriptions are in force (say, ``sse_event({'pid':
        ...}, event='hello')``): from then on, every message any process sends to
        *topics* reaches the stream, so a client can wait for it before it sends.
    :retry: milliseconds; sent first, as the client's reconnection delay.
    :keepalive: seconds without a write before a comment line is written; None: never.
    :receive: the request's ASGI ``receive``, or *request*: a Starlette ``Request``,
        to end the stream as soon as the client disconnects. (Starlette's
        ``StreamingResponse`` under uvicorn, sse-starlette and the ASGI app form find
        out by themselves; without it the stream ends at its next write after the
        client left.)
    :maxsize, overflow, ready_timeout: as for :func:`channels.listen`. With
        ``overflow='error'``, a client that falls *maxsize* messages behind gets
        ``event: lagged`` with ``{"missed": N}`` and the stream ends (``EventSource``
        reconnects).

    A message whose event cannot be JSON (a set, a datetime, ``NaN``) is skipped and
    logged as an error; the stream goes on.

    The stream ends when the client disconnects, when the inbox overflows, when the
    server stops (with :class:`EndStreamsOnShutdown` or :class:`end_streams_on_shutdown`;
    what is queued is sent first), or, logged, when the broker does not confirm the
    subscriptions within *ready_timeout* (the client reconnects after *retry*). Bad
    arguments raise here.
    """
    if data is not None and not callable(data):
        raise TypeError(f'sse_events(): data must be a function of the message, got {data!r}')
    if ready is not None and not isinstance(ready, bytes):
        raise TypeError(f'sse_events(): ready must be bytes, such as sse_event(...), got '
                        f'{ready!r}')
    if keepalive is not None and (isinstance(keepalive, bool) or not isinstance(
            keepalive, (int, float)) or not 0 < keepalive < float('inf')):
        raise ValueError(f'sse_events(): keepalive must be a number of seconds > 0 or None, '
                         f'got {keepalive!r}')
    if receive is None and request is not None:
        receive = getattr(request, 'receive', None)
        if not callable(receive):
            raise TypeError(f'sse_events(): request must be a Starlette Request (with '
                            f'.receive), got {request!r}')
    if receive is not None and not callable(receive):
        raise TypeError(f'sse_events(): receive must be the ASGI receive callable, got '
                        f'{receive!r}')
    head = sse_event(retry=retry) if retry is not None else None
    sse_event(event=event)                           # the name is checked here
    inbox = listen(*topics, maxsize=maxsize, overflow=overflow, ready_timeout=ready_timeout)
    return EventStream(inbox, data=data, event=event, ready=ready, head=head,
                       keepalive=keepalive, receive=receive)


class EventStream:
    """What :func:`sse_events` returns: an async iterable of SSE-encoded ``bytes``, and
    an ASGI app that sends them as an HTTP response. Either use consumes it once.

    ``disconnected`` is True once the client was seen to go away.
    """

    def __init__(self, inbox: Inbox, *, data: Callable[[Message], Any] | None, event: str,
                 ready: bytes | None, head: bytes | None, keepalive: float | None,
                 receive: Receive | None) -> None:
        self.inbox = inbox
        self.disconnected = False
        self._data = data
        self._event = event
        self._ready = ready
        self._head = head
        self._keepalive = keepalive
        self._receive = receive
        self._used = False

    def __repr__(self) -> str:
        return f'<EventStream of {self.inbox!r}>'

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._start(self._receive)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the stream as the response to an HTTP request (status 200,
        :data:`SSE_HEADERS`), until it ends; then finish the response. A ``HEAD``
        request gets the headers alone."""
        if scope.get('type') != 'http':
            raise ValueError(f'an EventStream answers an HTTP request, not a '
                             f'{scope.get("type")!r} connection: use relay_websocket() for '
                             f'websockets')
        start = {'type': 'http.response.start', 'status': 200, 'headers': list(SSE_HEADERS)}
        if scope.get('method') == 'HEAD':       # the headers only: no stream to open
            self._used = True
            await send(start)
            await send({'type': 'http.response.body', 'body': b'', 'more_body': False})
            return
        events = self._start(self._receive or receive)
        try:
            await send(start)
            async for chunk in events:
                await send({'type': 'http.response.body', 'body': chunk, 'more_body': True})
            if not self.disconnected:
                await send({'type': 'http.response.body', 'body': b'', 'more_body': False})
        except OSError as exc:               # the client went away mid-write
            logger.debug('%r: the client went away: %r', self, exc)
            self.disconnected = True
        finally:
            await events.aclose()

    def _start(self, receive: Receive | None) -> AsyncIterator[bytes]:
        if self._used:
            raise RuntimeError(f'{self!r} was consumed already: call sse_events() for each '
                               f'response')
        self._used = True
        return self._events(receive)

    async def _events(self, receive: Receive | None) -> AsyncIterator[bytes]:
        inbox = self.inbox
        if self._head is not None:
            yield self._head
        try:
            await inbox.__aenter__()
        except BrokerUnavailableError as exc:
            logger.warning('SSE stream of %s not started: %s', ', '.join(inbox.topics), exc)
            return
        watcher: asyncio.Future | None = None
        loop = asyncio.get_running_loop()
        task = _track(loop)
        try:
            if _stopping(loop):
                return
            if receive is not None:
                watcher = asyncio.ensure_future(_until_disconnect(receive))
                watcher.add_done_callback(self._watched)
            if self._ready is not None:
                yield self._ready
            while not self.disconnected:
                try:
                    async with asyncio.timeout(self._keepalive):
                        message = await inbox.get()
                except TimeoutError:
                    yield _KEEPALIVE_COMMENT
                    continue
                except StopAsyncIteration:        # closed: the client left or the server stops
                    return
                except InboxOverflowError as exc:
                    logger.warning('SSE stream of %s fell %d messages behind and missed %d; '
                                   'ending it', ', '.join(inbox.topics), inbox.maxsize,
                                   exc.dropped)
                    yield sse_event({'missed': exc.dropped}, event='lagged')
                    return
                payload = (_data_of('SSE stream', inbox, message) if self._data is None
                           else self._data(message))
                if payload is None or self.disconnected:
                    continue
                if not isinstance(payload, bytes):
                    try:
                        payload = sse_event(payload, event=self._event)
                    except (TypeError, ValueError) as exc:   # not JSON: skip it, go on
                        _unsendable('SSE stream', inbox, message, exc)
                        continue
                yield payload
                if len(inbox):
                    # A backlog: get() returns without suspending, and so does uvicorn's
                    # send() once the client is gone. Let the loop run, so that the
                    # disconnect is seen (here and by the server's framework) before the
                    # whole backlog is encoded for nobody while the worker waits.
                    await asyncio.sleep(0)
        finally:
            if watcher is not None:
                watcher.cancel()
            inbox.close()
            _untrack(loop, task)

    def _watched(self, watcher: asyncio.Future) -> None:
        if watcher.cancelled():
            return
        error = watcher.exception()
        if error is not None and not _is_disconnect(error):
            logger.warning('%r: receive() failed: %r', self, error)
        self.disconnected = True
        self.inbox.close()


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())['type'] != 'http.disconnect':
        pass


def _is_disconnect(error: BaseException) -> bool:
    """Whether *error* says the client went away (by the servers' and Starlette's names for
    it, as Starlette is not imported here)."""
    return isinstance(error, OSError) or type(error).__name__ in (
        'WebSocketDisconnect', 'ClientDisconnect', 'ClientDisconnected')


# websockets -----------------------------------------------------------------------------------

async def relay_websocket(websocket: Any, *topics: str,
                          data: Callable[[Message], Any] | None = None, ready: Any = None,
                          on_receive: Callable[[str | bytes], Any] | None = None,
                          maxsize: int = 1000, overflow: str = 'error',
                          ready_timeout: float = FLUSH_TIMEOUT) -> None:
    """Send the messages of *topics* to a websocket client until it disconnects.

    *websocket* is a Starlette or FastAPI ``WebSocket`` (accepted here if it was not
    yet), or the ``(receive, send)`` pair of a plain ASGI websocket connection that is
    not accepted yet.

    :data: what a message becomes: ``data(message)``, by default ``message.data``; a
        ``str`` is sent as a text frame, ``bytes`` as a binary frame, anything else as
        JSON text; ``None`` skips the message.
    :ready: a frame (the same kinds) sent once the subscriptions are in force: from then
        on, every message any process sends to *topics* reaches this client. One that
        cannot be JSON raises here, before the connection is accepted.
    :on_receive: called with each frame the client sends (``str`` or ``bytes``; a
        coroutine function is awaited); None: they are ignored.
    :maxsize, overflow, ready_timeout: as for :func:`channels.listen`.

    Returns when the client disconnects. Closes the connection itself with code 1001
    when the server stops (with :class:`EndStreamsOnShutdown` or
    :class:`end_streams_on_shutdown`), 1013 when the client fell *maxsize* messages
    behind (``overflow='error'``) or the broker did not confirm the subscriptions in
    time, and 1011 when *data* or *on_receive* raised (the error is raised on). A message
    whose frame cannot be JSON (a set, a datetime, ``NaN``) is skipped and logged as an
    error; the relay goes on.
    """
    receive, send, accept = _websocket_io(websocket)
    if data is not None and not callable(data):
        raise TypeError(f'relay_websocket(): data must be a function of the message, got '
                        f'{data!r}')
    if on_receive is not None and not callable(on_receive):
        raise TypeError(f'relay_websocket(): on_receive must be callable, got {on_receive!r}')
    ready_frame = _frame(ready) if ready is not None else None  # not JSON: raises here
    inbox = listen(*topics, maxsize=maxsize, overflow=overflow, ready_timeout=ready_timeout)
    if not await accept():
        return                                # the client left before it was accepted
    try:
        await inbox.__aenter__()
    except BrokerUnavailableError as exc:
        logger.warning('websocket relay of %s not started: %s', ', '.join(topics), exc)
        await _close(send, 1013, 'the message broker is unavailable; retry')
        return
    loop = asyncio.get_running_loop()
    task = _track(loop)
    try:
        if _stopping(loop):
            await _close(send, 1001, 'the server is stopping')
            return
        if ready_frame is not None:
            await send(ready_frame)
        await _relay(inbox, receive, send, data, on_receive)
    except Exception as exc:
        if _is_disconnect(exc):               # the client went away mid-write
            logger.debug('websocket relay of %s: the client went away: %r',
                         ', '.join(topics), exc)
            return
        await _close(send, 1011, 'internal error')
        raise
    finally:
        inbox.close()
        _untrack(loop, task)


async def _relay(inbox: Inbox, receive: Receive, send: Send,
                 data: Callable[[Message], Any] | None,
                 on_receive: Callable[[str | bytes], Any] | None) -> None:
    async def forward() -> tuple[int, str]:
        try:
            async for message in inbox:
                payload = (_data_of('websocket relay', inbox, message) if data is None
                           else data(message))
                if payload is None:
                    continue
                try:
                    frame = _frame(payload)
                except (TypeError, ValueError) as exc:        # not JSON: skip it, go on
                    _unsendable('websocket relay', inbox, message, exc)
                    continue
                await send(frame)
        except InboxOverflowError as exc:
            logger.warning('websocket relay of %s fell %d messages behind and missed %d; '
                           'closing it', ', '.join(inbox.topics), inbox.maxsize, exc.dropped)
            return 1013, f'fell behind: missed {exc.dropped} messages'
        return 1001, 'the server is stopping'       # the inbox was closed

    async def from_client() -> None:
        while True:
            message = await receive()
            if message['type'] == 'websocket.disconnect':
                return
            if message['type'] == 'websocket.receive' and on_receive is not None:
                text = message.get('text')
                result = on_receive(text if text is not None else message.get('bytes', b''))
                if inspect.isawaitable(result):
                    await result

    sending = asyncio.ensure_future(forward())
    client = asyncio.ensure_future(from_client())
    try:
        await asyncio.wait((sending, client), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sending, client):
            task.cancel()
        await asyncio.gather(sending, client, return_exceptions=True)
    if client.done() and not client.cancelled():
        if client.exception() is not None:
            raise client.exception()
        return                                           # the client disconnected
    if sending.exception() is not None:
        raise sending.exception()
    code, reason = sending.result()
    await _close(send, code, reason)


def _websocket_io(websocket: Any) -> tuple[Receive, Send, Callable[[], Awaitable[bool]]]:
    """(receive, send, accept) of a Starlette WebSocket or an ASGI (receive, send) pair;
    ``await accept()`` is False if the client left before it could be accepted."""
    if isinstance(websocket, tuple) and len(websocket) == 2 and all(map(callable, websocket)):
        receive, send = websocket

        async def handshake() -> bool:
            message = await receive()
            if message['type'] == 'websocket.disconnect':
                return False
            if message['type'] != 'websocket.connect':
                raise RuntimeError(f'relay_websocket(): expected websocket.connect, got '
                                   f'{message["type"]!r}: pass a connection not accepted yet')
            await send({'type': 'websocket.accept'})
            return True
        return receive, send, handshake
    receive, send = getattr(websocket, 'receive', None), getattr(websocket, 'send', None)
    if not (callable(receive) and callable(send)):
        raise TypeError(f'relay_websocket() takes a Starlette/FastAPI WebSocket or the '
                        f'(receive, send) pair of an ASGI websocket connection, got '
                        f'{websocket!r}')
    state = getattr(getattr(websocket, 'application_state', None), 'name', None)

    async def accept() -> bool:
        if state == 'CONNECTING':               # Starlette's WebSocketState
            await websocket.accept()
        return True
    return receive, send, accept


def _frame(payload: Any) -> ASGIMessage:
    """The ``websocket.send`` event for *payload*; raises ``TypeError``/``ValueError``
    for what is not JSON."""
    if isinstance(payload, str):
        return {'type': 'websocket.send', 'text': payload}
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return {'type': 'websocket.send', 'bytes': bytes(payload)}
    return {'type': 'websocket.send', 'text': _json(payload)}


def _json(value: Any) -> str:
    """*value* as JSON that browsers parse: ``NaN`` and ``Infinity`` are refused
    (``ValueError``) as are sets, datetimes and other objects JSON has no form for
    (``TypeError``)."""
    return json.dumps(value, allow_nan=False)


_unsendable_ids: deque[str] = deque(maxlen=64)     # the messages logged as not JSON


def _unsendable(stream: str, inbox: Inbox, message: Message, error: Exception) -> None:
    """A message whose data is not JSON is skipped by the stream, which goes on: one bad
    message (from any process) must not end every open stream of every worker. It is
    logged once per process, not once per stream."""
    if message.id in _unsendable_ids:
        return
    _unsendable_ids.append(message.id)
    logger.error('%s of %s skipped message %s of %r (and so does every stream of this '
                 'process that gets it): its data cannot be sent as JSON (%s); send JSON-'
                 'able data, or pass data= to turn it into str or bytes', stream,
                 ', '.join(inbox.topics), message.id, message.topic, error)


def _data_of(stream: str, inbox: Inbox, message: Message) -> Any:
    """*message*'s data, or None (the message is skipped) where it cannot be unpickled
    in this process (its class is in a module only the sender has, say): one such
    message must not end every open stream of every worker. Logged once per process."""
    try:
        return message.data
    except Exception as error:
        if message.id not in _unsendable_ids:
            _unsendable_ids.append(message.id)
            logger.error('%s of %s skipped message %s of %r (and so does every stream of '
                         'this process that gets it): its data cannot be unpickled here: '
                         '%r', stream, ', '.join(inbox.topics), message.id, message.topic,
                         error)
        return None


async def _close(send: Send, code: int, reason: str) -> None:
    try:
        await send({'type': 'websocket.close', 'code': code, 'reason': reason})
    except Exception as exc:           # the client is gone already (or Starlette closed it)
        logger.debug('websocket close %d not sent: %r', code, exc)


# ending streams when the server stops ---------------------------------------------------

class _Chained:
    """A signal handler that ends the streams of *hook*'s loop, then calls *previous*."""

    def __init__(self, hook: _Hook, previous: Callable[[int, FrameType | None], Any]) -> None:
        self.hook = hook
        self.previous = previous
        self.active = True

    def __call__(self, number: int, frame: FrameType | None) -> None:
        if self.active:
            try:
                self.hook.loop.call_soon_threadsafe(self.hook.stop, signal.Signals(number).name)
            except RuntimeError:               # the loop is closed: nothing to end
                pass
        self.previous(number, frame)


class _Hook:
    """One event loop's stop state: how many installs, whether stopping, what it chained."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.installs = 0
        self.stopping = False
        self.chained: dict[int, _Chained] = {}
        self.sweeper: asyncio.TimerHandle | None = None
        self.canceller: asyncio.TimerHandle | None = None
        self.watcher: asyncio.Task | None = None
        # the tasks holding open streams: [how many, the request's send through the
        # middleware (to find the transport to abort) or None]
        self.streams: dict[asyncio.Task, list[Any]] = {}
        self.ended: list[Any] = []      # the transports of the streams ended while stopping
        self.server: Any = None         # uvicorn's Server, where its handler was chained

    def install(self) -> None:
        self.installs += 1
        if self.installs > 1:
            return
        self.stopping = False
        if threading.current_thread() is not threading.main_thread():
            logger.info('streams end at the lifespan shutdown only: signal handlers can be '
                        'chained on the main thread only')
            return
        for signum in STOP_SIGNALS:
            previous = signal.getsignal(signum)
            if callable(previous):      # a default or ignored disposition is left alone
                self.chained[signum] = chained = _Chained(self, previous)
                signal.signal(signum, chained)
        term = self.chained.get(signal.SIGTERM)
        server = getattr(term and term.previous, '__self__', None)  # uvicorn: handle_exit
        if hasattr(server, 'should_exit'):
            self.server = server
            self.watcher = self.loop.create_task(self._watch(server))

    def uninstall(self) -> None:
        self.installs -= 1
        if self.installs > 0:
            return
        for signum, chained in self.chained.items():
            chained.active = False
            if signal.getsignal(signum) is chained:   # else another handler wraps it now
                signal.signal(signum, chained.previous)
        self.chained.clear()
        for pending in (self.sweeper, self.canceller, self.watcher):
            if pending is not None:
                pending.cancel()
        self.sweeper = self.canceller = self.watcher = self.server = None
        self.stopping = False
        self.ended = []

    def stop(self, reason: str) -> int:
        ended = close_all(self.loop)
        if self.installs > 0 and not self.stopping:
            self.stopping = True
            self.sweeper = self.loop.call_later(_SWEEP_INTERVAL, self._sweep)
            self.canceller = self.loop.call_later(STUCK_GRACE, self._cancel_stuck)
            logger.info('the server is stopping (%s): ended %d open stream(s)', reason, ended)
        return ended

    def _cancel_stuck(self) -> None:
        """:data:`STUCK_GRACE` s into the stop: the streams still open wait on a write to a
        client that takes nothing: abort their connections (cancel their requests' tasks
        where the connection is not known); and abort the connections of streams that
        ended meanwhile but whose last bytes are still unwritten."""
        self.canceller = None
        stuck = [(task, _transport_of(send, task) if send else None)
                 for task, (_, send) in self.streams.items() if not task.done()]
        # Under uvicorn, its connections that still hold unwritten bytes this far into
        # the stop have clients that take nothing (the transports of streams that went
        # through no middleware among them): aborted, their writes return.
        state = getattr(self.server, 'server_state', None)
        clogged = [transport for transport in
                   (getattr(connection, 'transport', None)
                    for connection in list(getattr(state, 'connections', ())))
                   if transport is not None and _unwritten(transport)]
        # streams that ended during the stop, whose last writes (the response's end, the
        # websocket's close frame) the client never took: the server's close of the
        # transport waits for them to be written, for ever
        ended, self.ended = self.ended, []
        aborted = {id(transport): transport for transport in
                   [transport for _, transport in stuck if transport is not None] +
                   clogged + [transport for transport in ended if _unwritten(transport)]}
        for transport in aborted.values():
            transport.abort()
        cancelled = 0
        if not clogged:          # else the unknown ones are among the clogged, most likely
            for task, transport in stuck:
                if transport is None:
                    task.cancel()
                    cancelled += 1
        if aborted or cancelled:
            logger.warning('the server is stopping: cut off %d stream(s) still writing '
                           '%.1fs after the stop (their clients take nothing of what is '
                           'written)', len(aborted) + cancelled, STUCK_GRACE)

    def _sweep(self) -> None:
        if self.stopping:
            ended = close_all(self.loop)
            if ended:
                logger.info('the server is stopping: ended %d stream(s) opened since', ended)
            self.sweeper = self.loop.call_later(_SWEEP_INTERVAL, self._sweep)

    async def _watch(self, server: Any) -> None:
        """Stop when uvicorn's *server* does without a signal (its request limit), or when
        its own handler was reached around ours."""
        while True:
            await asyncio.sleep(_WATCH_INTERVAL)
            servers = getattr(server, 'servers', None) or ()
            if server.should_exit or any(not s.is_serving() for s in servers
                                         if hasattr(s, 'is_serving')):
                self.stop('the server stops')
                return


_hooks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Hook] = \
    weakref.WeakKeyDictionary()


def _hook(loop: asyncio.AbstractEventLoop) -> _Hook:
    hook = _hooks.get(loop)
    if hook is None:
        hook = _hooks[loop] = _Hook(loop)
    return hook


def _track(loop: asyncio.AbstractEventLoop) -> asyncio.Task | None:
    """Count an open stream against the task that a stuck stream cancels: its request's
    (see :data:`_request_task`), else the one running it."""
    task, send = _request.get() or (None, None)
    if task is None or task.done():
        task, send = asyncio.current_task(), None
    if task is not None:
        entry = _hook(loop).streams.setdefault(task, [0, send])
        entry[0] += 1
    return task


def _transport_of(send: Send, task: asyncio.Task | None) -> Any:
    """The server's transport of a request, where it shows (uvicorn's ``send`` is a method
    of its cycle or protocol, which has ``transport``; under Starlette's middleware the
    request's task runs that object's ``run_asgi``), else None."""
    for owner in (getattr(send, '__self__', None),
                  getattr(getattr(task and task.get_coro(), 'cr_frame', None), 'f_locals',
                          {}).get('self')):
        transport = getattr(owner, 'transport', None)
        if callable(getattr(transport, 'abort', None)):
            return transport
    return None


def _untrack(loop: asyncio.AbstractEventLoop, task: asyncio.Task | None) -> None:
    hook = _hooks.get(loop)
    if task is None or hook is None:
        return
    entry = hook.streams.get(task)
    if entry is not None and entry[0] > 1:
        entry[0] -= 1
    elif entry is not None:
        del hook.streams[task]
        transport = _transport_of(entry[1], task) if hook.stopping and entry[1] else None
        if transport is not None:
            hook.ended.append(transport)


def _unwritten(transport: Any) -> int:
    """Bytes *transport* holds that the client has not taken (0 where it cannot say)."""
    try:
        return int(transport.get_write_buffer_size())
    except Exception:              # not an asyncio transport, or closed already
        return 0


def _stopping(loop: asyncio.AbstractEventLoop) -> bool:
    hook = _hooks.get(loop)
    return hook is not None and hook.stopping


def end_streams() -> int:
    """End every open stream of the running event loop now: close every open inbox of the
    loop (see :func:`channels.inbox.close_all`). What the installed signal handlers do;
    call it from a coroutine or a loop callback. Returns how many inboxes it closed.

    While :class:`EndStreamsOnShutdown` or :class:`end_streams_on_shutdown` is installed,
    streams opened afterwards end too, until the lifespan shutdown."""
    loop = asyncio.get_running_loop()
    hook = _hooks.get(loop)
    return hook.stop('end_streams()') if hook is not None else close_all(loop)


class end_streams_on_shutdown:
    """``async with`` around a lifespan: while inside, SIGINT and SIGTERM end every open
    stream of the worker before the server's own handler runs; on the way out, streams
    end and the handlers are put back.

    ::

        @contextlib.asynccontextmanager
        async def lifespan(app):
            async with channels.asgi.end_streams_on_shutdown():
                yield

        app = FastAPI(lifespan=lifespan)

    Enter it on the server's event loop, in the main thread (where servers install their
    signal handlers; elsewhere only the way out ends streams). Nested or repeated
    installs on one loop chain the handlers once.
    """

    async def __aenter__(self) -> end_streams_on_shutdown:
        _hook(asyncio.get_running_loop()).install()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        hook = _hook(asyncio.get_running_loop())
        hook.stop('lifespan shutdown')
        hook.uninstall()


class EndStreamsOnShutdown:
    """ASGI middleware: open streams end when the server starts to stop.

    ::

        app.add_middleware(EndStreamsOnShutdown)       # FastAPI, Starlette
        app = EndStreamsOnShutdown(app)                # any ASGI app

    It does what :class:`end_streams_on_shutdown` does, from the lifespan startup to the
    lifespan shutdown that pass through it (or, if the server runs no lifespan, from the
    first request on), and passes everything else on unchanged.
    """

    def __init__(self, app: ASGIApp) -> None:
        if not callable(app):
            raise TypeError(f'EndStreamsOnShutdown(app): app must be an ASGI app, got {app!r}')
        self.app = app
        self._loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope['type'] == 'lifespan':
            await self.app(scope, self._lifespan_receive(receive), send)
            return
        loop = asyncio.get_running_loop()
        if loop not in self._loops:            # no lifespan: from the first request on
            self._loops.add(loop)
            _hook(loop).install()
        task = asyncio.current_task()
        token = _request.set((task, send))
        try:
            await self.app(scope, receive, send)
        finally:
            _request.reset(token)

    def _lifespan_receive(self, receive: Receive) -> Receive:
        async def wrapped() -> ASGIMessage:
            message = await receive()
            loop = asyncio.get_running_loop()
            if message['type'] == 'lifespan.startup' and loop not in self._loops:
                self._loops.add(loop)
                _hook(loop).install()
            elif message['type'] == 'lifespan.shutdown' and loop in self._loops:
                self._loops.discard(loop)
                hook = _hook(loop)
                hook.stop('lifespan shutdown')
                hook.uninstall()
            return message
        return wrapped
