"""python-socketio client managers over mpchannels: Socket.IO across worker processes.

::

    import socketio
    import channels.socketio

    sio = socketio.AsyncServer(async_mode='asgi', transports=['websocket'],
                               client_manager=channels.socketio.AsyncManager())
    sio = socketio.Server(async_mode='threading', transports=['websocket'],
                          client_manager=channels.socketio.Manager())

python-socketio keeps its clients and rooms in the memory of the process that accepted
them, so an emit reaches only that process's clients unless a *pub/sub client manager*
carries it to the others. Its own managers (``AsyncRedisManager``, ``KombuManager``,
``ZmqManager``, ...) implement two methods of ``AsyncPubSubManager``/``PubSubManager``:
``_publish(message)`` and ``_listen()``; python-socketio does everything else (emits to
all, to a room, to a sid, ``skip_sid``, namespaces, ``close_room``, ``enter_room`` and
``disconnect`` of a sid in another process, and acks of ``call()``/``emit(callback=)``
sent back to the process that asked). These two managers implement them over channels:

- ``_publish`` sends the message dict to the topic ``socketio.<channel>``
  (:attr:`topic`); channels pickles it, as ``Channel.send()`` does any data.
- ``_listen`` yields the message dicts of that topic: **one subscription per process**,
  whatever the number of its clients. :class:`AsyncManager` reads an inbox of
  :func:`channels.listen` on the server's event loop; :class:`Manager` a bounded
  ``queue.Queue`` that a plain handler (a channels task thread) fills, read by
  python-socketio's listening thread.
- Every process receives its own messages too and skips them by ``host_id``, as
  python-socketio does with every backend. The ``host_id`` is drawn again in a forked
  child (``gunicorn --preload`` creates the server in the master), so workers never
  mistake each other's messages for their own.
- The subscription starts with the server's first connection (python-socketio calls
  ``initialize()`` then); that connection, and every later one, completes only once it
  is in force at the broker, so an emit made after a client connected reaches it,
  from any process. A process that emits with a callback (``call()``) before it has any
  client subscribes first, so the answer comes back to it.
- ``write_only=True`` makes an emitter that never listens: a script, a job queue
  worker, any process started with the broker's address (``CHANNELS_BROKER_ADDRESS``)
  can emit to the clients of every worker.

What python-socketio does not carry across processes stays local here too: the list of
a room's participants (``get_participants``), sessions, and whether a sid is connected.

Threads, not greenlets: :class:`Manager` supports python-socketio's ``'threading'``
async mode (gunicorn ``--threads``, Flask-SocketIO's default without eventlet/gevent),
and refuses ``'eventlet'`` and ``'gevent'``: channels runs real threads and blocking
sockets, which monkey-patching turns into greenlets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from .errors import (BrokerUnavailableError, InboxOverflowError, ShutdownError,
                     install_hint)

try:
    from socketio.async_pubsub_manager import AsyncPubSubManager
    from socketio.pubsub_manager import PubSubManager
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f'channels.socketio needs python-socketio ({exc}); '
                      f'{install_hint("socketio", "python-socketio simple-websocket")}'
                      ) from exc

from .channel import Channel
from . import inbox as _inbox_module
from . import settings as _settings
from .inbox import Inbox
from .message import Message
from .runtime import FLUSH_TIMEOUT, runtime as _runtime
from .topics import is_pattern, validate_topic

__all__ = ['AsyncManager', 'Manager', 'TOPIC_PREFIX', 'MAXSIZE']

logger = logging.getLogger(__name__)

TOPIC_PREFIX = 'socketio.'
"""A manager's topic is this prefix and its python-socketio ``channel`` name."""

MAXSIZE = 10_000
"""Messages a process's manager holds for python-socketio's listener when it is behind."""

_UNSUPPORTED_MODES = ('eventlet', 'gevent', 'gevent_uwsgi')
_RETRY_INTERVAL = 1.0     # seconds from one attempt to listen to the next, at least


class _ListenerInbox(Inbox):
    """The async manager's inbox. It is the server's own subscription, not a stream of a
    client, so :func:`channels.inbox.close_all` leaves it open: ``end_streams()`` and
    ``EndStreamsOnShutdown`` (which end the worker's open streams when the server starts
    to stop, while its Socket.IO clients are still connected) must not make it miss
    messages."""

    def __init__(self, topic: str, *, maxsize: int, ready_timeout: float) -> None:
        super().__init__((topic,), maxsize=maxsize, ready_timeout=ready_timeout)
        with _inbox_module._inboxes_lock:       # the module's lock (made anew after fork)
            _inbox_module._inboxes.discard(self)


class _ChannelsPubSub:
    """What both managers share: the arguments, the topic, a fork-safe ``host_id``, and
    listening early for the answer to a callback."""

    name = 'mpchannels'
    topic: str
    maxsize: int
    ready_timeout: float

    def __init__(self, channel: str = 'socketio', write_only: bool = False,
                 logger: Any = None, json: Any = None, *, maxsize: int = MAXSIZE,
                 ready_timeout: float = FLUSH_TIMEOUT) -> None:
        self._configure(channel, maxsize, ready_timeout)
        # python-socketio's AsyncPubSubManager or PubSubManager, next in the MRO
        super().__init__(channel=channel, write_only=write_only, logger=logger, json=json)
        self._init_listener()
        if write_only and _settings.get('BROKER_ADDRESS') is None:
            # (the argument *logger* is python-socketio's; this is the module's)
            logging.getLogger(__name__).warning(
                'a write-only Socket.IO manager of %r with no broker configured '
                '(CHANNELS_BROKER_ADDRESS is unset): its emits reach only this process, '
                'which has no clients. Start this process with the address of the '
                "broker that the server's workers use.", self.topic)

    def _init_listener(self) -> None:
        """Set up what the manager's own listening needs (after python-socketio's
        ``__init__``)."""
        raise NotImplementedError

    def _configure(self, channel: str, maxsize: int, ready_timeout: float) -> None:
        if not isinstance(channel, str) or not channel or is_pattern(channel):
            raise ValueError(f"channel must be a non-empty str without '*', '?' or '[' "
                             f"(it names the topic {TOPIC_PREFIX}<channel>), got {channel!r}")
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f'maxsize must be an int >= 1, got {maxsize!r}')
        if isinstance(ready_timeout, bool) or not isinstance(ready_timeout, (int, float)) \
                or not 0 <= ready_timeout < float('inf'):
            raise ValueError(f'ready_timeout must be a finite number of seconds >= 0, got '
                             f'{ready_timeout!r}')
        self.topic = validate_topic(TOPIC_PREFIX + channel, 'channel',
                                    max_length=_runtime.max_topic_length())
        self.maxsize = maxsize
        self.ready_timeout = float(ready_timeout)
        self._sender = Channel(self.topic)
        self._lock = threading.Lock()
        self._started = False

    # python-socketio assigns host_id in its __init__; a forked child gets a new one
    @property
    def host_id(self) -> str:
        """This process's id in the messages (which it skips when they come back)."""
        if self._host_pid != os.getpid():
            self._host_id = uuid.uuid4().hex
            self._host_pid = os.getpid()
        return self._host_id

    @host_id.setter
    def host_id(self, value: str) -> None:
        self._host_id = value
        self._host_pid = os.getpid()

    def _check_server(self, server: Any, asyncio_based: bool) -> None:
        """Refuse a server of the other kind: an async manager's coroutines are never
        awaited by a sync server (its emits would vanish without a word), and a sync
        manager would block an async server's event loop."""
        is_async = getattr(server, 'is_asyncio_based', None)
        if callable(is_async) and bool(is_async()) != asyncio_based:
            mine, theirs = (('AsyncManager', 'socketio.AsyncServer') if asyncio_based else
                            ('Manager', 'socketio.Server or Flask-SocketIO'))
            raise ValueError(f'channels.socketio.{mine} is for {theirs}, not for '
                             f'{type(server).__module__}.{type(server).__qualname__}: use '
                             f'channels.socketio.{"Manager" if asyncio_based else "AsyncManager"}'
                             f'() with it')

    def _first_start(self) -> bool:
        """True the first time only: ``initialize()`` may be called by the server and by
        :meth:`_start_for_callback` at once, and must listen once."""
        with self._lock:
            started, self._started = self._started, True
        return not started

    def _start_for_callback(self) -> None:
        """Start listening if the server has not yet (no client connected to this process),
        so that the answer to a callback can come back."""
        server = self.server
        if not (self.write_only or server is None or self._started):
            server.manager_initialized = True
            self.initialize()

    def __repr__(self) -> str:
        return (f'<{type(self).__module__}.{type(self).__qualname__} topic={self.topic!r} '
                f'write_only={self.write_only}>')


class AsyncManager(_ChannelsPubSub, AsyncPubSubManager):
    """A client manager for ``socketio.AsyncServer`` that shares clients across processes
    (python-socketio's ``AsyncPubSubManager`` over channels).

    ``socketio.AsyncServer(client_manager=AsyncManager())`` in every worker of the server
    (``channels-broker -- uvicorn app:app --workers 4``).

    :channel: the python-socketio channel name, the same in every process; the topic is
        ``socketio.<channel>``.
    :write_only: only emit, never listen (an emitter outside the server).
    :logger: python-socketio's ``logger`` (by default the server's).
    :json: python-socketio's ``json`` argument, accepted as its managers accept it; the
        messages between processes are pickled by channels, not JSON.
    :maxsize: how many messages the process's inbox holds for the listener when it is
        behind. Past it the inbox is closed and opened again; the messages missed are
        logged as an error with their count.
    :ready_timeout: seconds a connection waits for the subscription to be in force at
        the broker before it goes on regardless (with a warning).

    Raises ``ValueError`` for a channel with wildcards and for bad numbers, and when
    given to a sync server (``socketio.Server``, Flask-SocketIO: use :class:`Manager`).
    """

    def _init_listener(self) -> None:
        self._ready: asyncio.Event | None = None

    def set_server(self, server: Any) -> None:
        """Called by ``socketio.AsyncServer``; raises ``ValueError`` for a sync server."""
        self._check_server(server, asyncio_based=True)
        super().set_server(server)

    def initialize(self) -> None:
        """Start listening (python-socketio calls this on the first connection)."""
        if not self._first_start():
            return
        if not self.write_only:
            self._ready = asyncio.Event()
        super().initialize()

    async def _listening(self) -> None:
        """Wait until the subscription is in force (at most ``ready_timeout`` s)."""
        ready = self._ready
        if ready is None or ready.is_set():
            return
        try:
            await asyncio.wait_for(ready.wait(), self.ready_timeout)
        except asyncio.TimeoutError:
            logger.warning('the Socket.IO subscription to %r is not in force after %.1fs; '
                           'a connection goes on regardless and may miss emits of other '
                           'processes until it is', self.topic, self.ready_timeout)

    async def pre_connect(self, eio_sid: str, namespace: str) -> str | None:
        await self._listening()
        return await super().pre_connect(eio_sid, namespace)

    async def emit(self, event: str, data: Any, namespace: str | None = None,
                   room: Any = None, skip_sid: Any = None, callback: Any = None,
                   to: Any = None, **kwargs: Any) -> None:
        if callback is not None and not kwargs.get('ignore_queue'):
            self._start_for_callback()
            await self._listening()
        return await super().emit(event, data, namespace=namespace, room=room,
                                  skip_sid=skip_sid, callback=callback, to=to, **kwargs)

    async def _publish(self, data: dict) -> None:
        self._sender.send(data)

    async def _listen(self) -> AsyncIterator[dict]:
        """The messages of :attr:`topic`, from one inbox on the server's loop."""
        while True:
            started = asyncio.get_running_loop().time()
            try:
                async with _ListenerInbox(self.topic, maxsize=self.maxsize,
                                          ready_timeout=self.ready_timeout) as inbox:
                    self._ready.set()
                    async for message in inbox:
                        data = _data_of(self.topic, message)
                        if data is not None:
                            yield data
                logger.warning('the Socket.IO listener of %r was closed; listening again '
                               '(what was sent meanwhile is missed)', self.topic)
            except InboxOverflowError as exc:
                logger.error('the Socket.IO listener of %r fell %d messages behind and '
                             'missed them (their clients did not get them); listening '
                             'again. A larger maxsize= lets it catch up after bursts.',
                             self.topic, exc.dropped)
            except BrokerUnavailableError as exc:
                logger.warning('cannot listen to %r yet (%s); trying again', self.topic, exc)
                # an attempt fails at once with ready_timeout=0: retry at a measured pace,
                # not in a loop that holds the worker's event loop and floods the log
                waited = asyncio.get_running_loop().time() - started
                await asyncio.sleep(max(0.0, _RETRY_INTERVAL - waited))
            except ShutdownError:
                logger.info('channels is shutting down: the Socket.IO listener of %r stops',
                            self.topic)
                return


class Manager(_ChannelsPubSub, PubSubManager):
    """A client manager for ``socketio.Server`` (and Flask-SocketIO) that shares clients
    across processes (python-socketio's ``PubSubManager`` over channels).

    ``socketio.Server(client_manager=Manager())`` or ``SocketIO(app,
    client_manager=Manager())`` in every worker of the server (``channels-broker --
    gunicorn -w 4 --threads 50 app:app``). Arguments as for :class:`AsyncManager`;
    *maxsize* bounds the queue between the channel's handler and python-socketio's
    listening thread: a message that finds it full is dropped, and the drops are logged
    as an error with their count.

    Raises ``ValueError`` for a channel with wildcards and for bad numbers, and when
    given to an async server (``socketio.AsyncServer``: use :class:`AsyncManager`) or
    to a server whose async mode is eventlet or gevent.
    """

    def _init_listener(self) -> None:
        self._queue: queue.Queue[dict] | None = None
        self._receiver: Channel | None = None
        self._in_force = threading.Event()
        self.dropped = 0
        self._dropping = 0

    def set_server(self, server: Any) -> None:
        """Called by ``socketio.Server``; raises ``ValueError`` for an async server, or for
        a server in eventlet or gevent mode."""
        self._check_server(server, asyncio_based=False)
        mode = getattr(server, 'async_mode', None)
        if mode in _UNSUPPORTED_MODES:
            raise ValueError(
                f"channels.socketio.Manager runs on plain threads, not with async_mode="
                f"{mode!r} (channels' threads and sockets do not work under its monkey-"
                f"patching): pass async_mode='threading' (and run gunicorn with --threads), "
                f"or use socketio.AsyncServer with channels.socketio.AsyncManager")
        super().set_server(server)

    def initialize(self) -> None:
        """Subscribe and start listening (python-socketio calls this on the first
        connection, in Engine.IO's handshake). The wait for the subscription to be in
        force at the broker is on a thread of its own, and each Socket.IO connection
        waits for it in :meth:`pre_connect`: blocking here would hold the websocket's
        handshake, which clients give up on (websocket-client after 5 s) while the
        broker is slow or away."""
        if not self._first_start():
            return
        if not self.write_only:
            self._queue = queue.Queue(self.maxsize)
            self._receiver = Channel(self.topic, self._enqueue)
            threading.Thread(target=self._confirm, name='channels-socketio-subscribe',
                             daemon=True).start()
        super().initialize()

    def _confirm(self) -> None:
        """Wait for the subscription to be in force (on its own thread); then let the
        connections waiting in :meth:`pre_connect` go on."""
        if not _runtime.flush(self.ready_timeout):
            logger.warning('the Socket.IO subscription to %r is not in force after %.1fs; '
                           'going on regardless', self.topic, self.ready_timeout)
        self._in_force.set()

    def _listening(self) -> None:
        """Wait until the subscription is in force (at most ``ready_timeout`` s)."""
        if self._receiver is not None and not self._in_force.is_set():
            self._in_force.wait(self.ready_timeout)

    def pre_connect(self, eio_sid: str, namespace: str) -> str | None:
        self._listening()         # every connection: once the subscription is in force
        return super().pre_connect(eio_sid, namespace)

    def emit(self, event: str, data: Any, namespace: str | None = None, room: Any = None,
             skip_sid: Any = None, callback: Any = None, to: Any = None,
             **kwargs: Any) -> None:
        if callback is not None and not kwargs.get('ignore_queue'):
            self._start_for_callback()
            self._listening()
        return super().emit(event, data, namespace=namespace, room=room,
                            skip_sid=skip_sid, callback=callback, to=to, **kwargs)

    def _enqueue(self, message: Message) -> None:
        """The channel's handler, on a channels task thread."""
        data = _data_of(self.topic, message)
        if data is None:
            return
        try:
            self._queue.put_nowait(data)
        except queue.Full:
            self.dropped += 1
            self._dropping += 1
            if self._dropping == 1:
                logger.error('the Socket.IO listener of %r is %d messages behind: dropping '
                             'what arrives until it catches up (their clients do not get '
                             'them). A larger maxsize= absorbs longer bursts.',
                             self.topic, self.maxsize)
            return
        if self._dropping:
            logger.error('the Socket.IO listener of %r caught up after dropping %d '
                         'messages (%d in all)', self.topic, self._dropping, self.dropped)
            self._dropping = 0

    def _publish(self, data: dict) -> None:
        self._sender.send(data)

    def _listen(self) -> Iterator[dict]:
        """The messages of :attr:`topic`, from the queue the channel's handler fills."""
        while True:
            yield self._queue.get()


def _data_of(topic: str, message: Message) -> dict | None:
    """*message*'s data, or None where it cannot be unpickled in this process (its class
    is in a module only the sender has, say): logged and skipped, so that one such
    message neither ends the listener (losing what is queued behind it) nor goes
    unnoticed (python-socketio's own logger is off by default)."""
    try:
        return message.data
    except Exception as error:
        logger.error('the Socket.IO listener of %r skipped message %s: its data cannot be '
                     'unpickled in this process (%r); its clients do not get it', topic,
                     message.id, error)
        return None
