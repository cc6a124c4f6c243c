"""``Channel``: subscribe a handler to a topic, and send messages to a topic.

The channels of a process live in one registry (a :class:`~channels.topics.TopicIndex`
owned by the runtime), so ``Channel.get_channels(topic)`` finds the matching ones
without scanning every subscription. The coroutine channels of one event loop on one
topic are one entry there (a :class:`~channels.handlers.LoopGroup`), which
``get_channels`` lists as its channels.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from . import runtime as _runtime
from .handlers import ErrorCallback, LoopGroup
from .message import Message
from .registry import registry as _registry
from .topics import too_long, topic_size, validate_topic

__all__ = ['Channel']

Handler = Callable[[Message], Any]


class Channel:
    """A topic, and optionally a handler subscribed to it.

    ``Channel(topic, handler)`` subscribes; ``Channel(topic)`` alone does not. A channel
    has one topic and at most one handler at a time; it may subscribe again after
    ``unsubscribe()``. Thread safe.
    """

    __slots__ = ('_topic', '_size', '_subscription', '_mailbox', '__weakref__')

    def __init__(self, topic: str, handler: Handler | None = None, *,
                 loop: asyncio.AbstractEventLoop | None = None,
                 on_error: ErrorCallback | None = None) -> None:
        self._topic = validate_topic(topic, max_length=_runtime.runtime.max_topic_length())
        self._size = topic_size(self._topic)     # in UTF-8 bytes, for MAX_TOPIC_LENGTH
        # (runner, handler) while subscribed: a new tuple per subscription, replaced in
        # one step, so a task can tell its own subscription from a later one by identity
        self._subscription: tuple[Handler, Handler] | None = None
        self._mailbox: Any = None  # pending tasks, owned by the runtime
        if handler is not None:
            self.subscribe(handler, loop=loop, on_error=on_error)
        elif loop is not None or on_error is not None:
            raise TypeError('loop= and on_error= belong to a subscription: pass a handler too')

    def __repr__(self) -> str:
        return f'<Channel(topic={self._topic!r}, handler={self.handler!r})>'

    @property
    def topic(self) -> str:
        """The channel's topic; may contain wildcards (``*``, ``?``, ``[...]``)."""
        return self._topic

    @property
    def handler(self) -> Handler | None:
        """The subscribed handler, or None when the channel is not subscribed."""
        subscription = self._subscription
        return None if subscription is None else subscription[1]

    @classmethod
    def get_channels(cls, topic: str) -> list[Channel]:
        """The subscribed channels of this process whose topic matches *topic*."""
        if type(topic) is not str or not topic:
            topic = validate_topic(topic)
        found = _registry.index.match(topic)    # lookups take no lock
        if any(type(item) is LoopGroup for item in found):
            # the coroutine channels of one loop and topic are one entry: list each
            found = [channel for item in found for channel in
                     (item.channels() if type(item) is LoopGroup else (item,))]
        return found

    def subscribe(self, handler: Handler, *,
                  loop: asyncio.AbstractEventLoop | None = None,
                  on_error: ErrorCallback | None = None) -> None:
        """Call *handler* with every matching message from now on, in order, one at a time.

        A plain function runs on a task worker thread. A coroutine function (``async
        def``) runs on *loop*, by default the event loop running when it subscribes;
        the next message is not started before the previous call has finished.

        What the handler raises is logged, or, with *on_error*, passed to
        ``on_error(exception, message)`` instead.

        Raises ``RuntimeError`` if the channel is subscribed already, or for a coroutine
        function with no loop to run on; ``TypeError`` if *handler* or *on_error* is not
        callable; :class:`~channels.errors.SubscriptionLimitError` if this process
        subscribes ``MAX_SUBSCRIPTIONS`` distinct topics already and this one is new;
        ``ValueError`` if the topic is longer than ``MAX_TOPIC_LENGTH``. Sends
        ``lona.channels.subscribe`` locally.
        """
        if not callable(handler):
            raise TypeError(f'handler must be callable (it is called with a Message), got '
                            f'{type(handler).__name__} {handler!r}')
        _runtime.runtime.subscribe(self, handler, loop, on_error)

    def unsubscribe(self) -> None:
        """Stop calling the handler; pending calls are dropped. A no-op if not subscribed.

        Sends ``lona.channels.unsubscribe`` locally.
        """
        _runtime.runtime.unsubscribe(self)

    def send(self, message_data: dict | None = None,
             expiry: datetime | timedelta | None = None,
             local: bool = False, droppable: bool = False) -> Message:
        """Send a message to every channel subscribed to a matching topic.

        :message_data: a dict (shallow-copied) or None for ``{}``. Unless *local*, it
            is pickled here, so data that cannot cross processes raises
            :class:`~channels.errors.SerializationError` (a ``TypeError``) here.
        :expiry: a ``datetime`` (naive: local time) or a ``timedelta`` from now; the
            message is dropped if it expires before it is routed or handled.
        :local: handle it in this process only; it never reaches the broker.
        :droppable: it may be dropped to shut down faster.

        Never blocks. Raises :class:`~channels.errors.ShutdownError` while
        ``channels.shutdown()`` drains, and ``ValueError`` if the topic is longer than
        ``MAX_TOPIC_LENGTH`` (which may have been lowered since ``Channel()``).
        """
        message = Message.create(self._topic, message_data, expiry, local, droppable)
        runtime = _runtime.runtime
        machinery = runtime.machinery or runtime.ensure_running()
        if self._size > machinery.max_topic_length:
            raise ValueError(too_long(self._topic, machinery.max_topic_length))
        machinery.submit(message)
        return message
