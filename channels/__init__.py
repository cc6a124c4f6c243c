"""mpchannels: Lona-style pub/sub channels across the worker processes of a server.

::

    from channels import Channel

    Channel('chat.rooms.*', on_message)               # subscribe
    Channel('chat.rooms.lona').send({'text': 'hi'})   # publish

    async def on_chat(message): ...                   # coroutine handlers run on
    Channel('chat.rooms.*', on_chat)                  # the subscribing event loop

    async with channels.listen('chat.rooms.*') as inbox:   # or consume in async code
        async for message in inbox: ...

    Channel('chat.rooms.*', on_message); channels.flush()  # in force for all processes

The machinery starts on first use; :func:`shutdown` drains and stops it.

Layers: a module imports only modules of its own layer or below, never in a cycle
(imports under ``TYPE_CHECKING`` aside); ``tests/test_layers.py`` reads this table and
checks it. The broker process (``broker``) does not import the app process's runtime:
what both need (``registry``, ``ordering``) lies below both. ``lona`` (Lona's message broker
class, ``channels.lona.MessageBroker``) imports Lona, and ``socketio`` (python-socketio's
client managers) imports python-socketio; nothing here imports either.

    7  cli, __main__, __init__, asgi, lona, socketio
    6  channel, inbox, scope
    5  runtime, broker
    4  workers, client, handlers, gate, statefile, bridge, bridge_redis, bridge_nats
    3  registry, ordering, message, wire, connection, prefork, engine
    2  settings
    1  errors, topics, address
"""

from __future__ import annotations

from . import settings
from .channel import Channel
from .errors import (BrokerUnavailableError, BufferFullError, ChannelsError,
                     ConfigurationError, InboxOverflowError, MessageTooLargeError,
                     ProtocolError, SerializationError, ShutdownError,
                     SubscriptionLimitError)
from .inbox import Inbox, listen
from .message import Message
from .scope import Scope
from .runtime import FLUSH_TIMEOUT, SUBSCRIBE_TOPIC, UNSUBSCRIBE_TOPIC, runtime as _runtime
from .settings import configure
from .workers import MessageBroker, Task, TaskWorker, Worker

__all__ = [
    'Channel', 'Message', 'Worker', 'MessageBroker', 'TaskWorker', 'Task',
    'listen', 'Inbox', 'Scope',
    'configure', 'settings', 'shutdown', 'is_running', 'flush', 'flush_async',
    'SUBSCRIBE_TOPIC', 'UNSUBSCRIBE_TOPIC',
    'ChannelsError', 'ConfigurationError', 'SerializationError', 'ShutdownError',
    'BufferFullError', 'ProtocolError', 'BrokerUnavailableError', 'MessageTooLargeError',
    'InboxOverflowError', 'SubscriptionLimitError',
]

__version__ = '0.1.0'


def shutdown(timeout: float = 5.0) -> bool:
    """Drain and stop this process's channels machinery.

    New sends raise :class:`ShutdownError` meanwhile; every non-droppable message
    already sent is handled before it returns, within *timeout* seconds (what is left
    is logged with a count); droppable ones may be dropped. Returns True if everything
    was handled and every thread stopped in time. The next use starts it afresh.
    Also runs at interpreter exit, with ``CHANNEL_SHUTDOWN_TIMEOUT``.
    """
    return _runtime.shutdown(timeout)


def flush(timeout: float = FLUSH_TIMEOUT) -> bool:
    """Wait until every subscription change and message of this process made before the
    call has been applied: routed by the broker (a fence behind them, answered without
    waiting for other processes), and, for ``local`` messages (every message, without a
    broker), by this process's message broker threads.

    Once it returns True, every message that any process sends afterwards reaches the
    channels this process subscribed before the call. Without a broker that holds at once, and only the local routing is
    waited for. False if *timeout* seconds passed first (the broker is unreachable,
    restarting or busy; the reason is logged as a warning): the subscriptions then
    take effect later, as the broker gets them.

    Works from any thread. Raises ``RuntimeError`` on a channels worker thread (a
    plain handler), where waiting would hold up delivery, and
    :class:`ShutdownError` while :func:`shutdown` drains. In async code, ``await``
    :func:`flush_async` instead, which does not block the event loop.
    """
    return _runtime.flush(timeout)


async def flush_async(timeout: float = FLUSH_TIMEOUT) -> bool:
    """:func:`flush` for coroutines: awaits the broker's answer without blocking the event
    loop (a coroutine handler may await it too)."""
    return await _runtime.fence_async(timeout, local=True)


def is_running() -> bool:
    """True while the machinery runs (from the first use until :func:`shutdown`)."""
    return _runtime.is_running()
