"""mpchannels: Lona-style pub/sub channels across the worker processes of a server.

::

    from channels import Channel

    Channel('chat.rooms.*', on_message)               # subscribe
    Channel('chat.rooms.lona').send({'text': 'hi'})   # publish

    async def on_chat(message): ...                   # coroutine handlers run on
    Channel('chat.rooms.*', on_chat)                  # the subscribing event loop

    async with channels.listen('chat.rooms.*') as inbox:   # or consume in async code
        async for message in inbox: ...

The machinery starts on first use; :func:`shutdown` drains and stops it.
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
from .runtime import SUBSCRIBE_TOPIC, UNSUBSCRIBE_TOPIC, runtime as _runtime
from .settings import configure
from .workers import MessageBroker, Task, TaskWorker, Worker

__all__ = [
    'Channel', 'Message', 'Worker', 'MessageBroker', 'TaskWorker', 'Task',
    'listen', 'Inbox', 'Scope',
    'configure', 'settings', 'shutdown', 'is_running',
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


def is_running() -> bool:
    """True while the machinery runs (from the first use until :func:`shutdown`)."""
    return _runtime.is_running()
