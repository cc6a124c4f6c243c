"""Lona's channels across processes: a message broker class for Lona's settings.

::

    # in the Lona app's settings (settings.py, or app.settings.NAME = ... in app.py)
    CHANNEL_MESSAGE_BROKER_CLASS = 'channels.lona.MessageBroker'

    # and every Lona process runs with CHANNELS_BROKER_ADDRESS set (see the README)

Lona's own channels reach one process. ``lona.Channel.send()`` puts a message into a
queue of the process; message broker threads (``MAX_CHANNEL_MESSAGE_BROKER_THREADS``
instances of ``CHANNEL_MESSAGE_BROKER_CLASS``, started by Lona's server) take each from
there and schedule one task per matching channel; task worker threads
(``CHANNEL_TASK_WORKER_CLASS``) run the handlers. :class:`MessageBroker` replaces
Lona's broker class and changes only where a message goes; Lona's ``Channel``, task
workers and views stay as they are:

* A message that is not ``local`` goes to mpchannels (``channels.Channel(topic).send()``),
  which carries it to every process, this one included, where it arrives through the
  subscriptions below. ``local`` messages and Lona's internal topics
  (``lona.channels.*``) are routed in the process, as Lona's own broker does.
* For every distinct topic that this process's Lona channels subscribe to, it keeps one
  mpchannels channel, following Lona's ``lona.channels.subscribe`` and
  ``lona.channels.unsubscribe`` messages. What arrives on one is scheduled, as a
  :class:`Message` (a ``lona.channels.Message``), for the Lona channels of exactly that
  topic, so each of them gets it once.
* mpchannels' ``lona.channels.lost`` (messages this process missed, with their count
  and why) is sent on to Lona's channels as a local message.

The broker threads share one :class:`_Link` per process: the first one that starts sets
it up, and the last one that Lona's server shuts down ends its mpchannels channels.
Lona is imported by this module only; ``import channels`` does not import it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from .errors import ChannelsError, install_hint

try:
    import lona.channels as _lona
except ImportError as exc:                   # the extra is missing
    raise ImportError(f'channels.lona needs Lona ({exc}); '
                      f'{install_hint("lona", "lona")}') from exc

from .channel import Channel as _Channel
from .client import LOST_TOPIC
from .message import Message as _ChannelsMessage
from .runtime import FLUSH_TIMEOUT, runtime as _runtime
from .wire import INTERNAL_PREFIX

__all__ = ['MessageBroker', 'Message', 'flush']

logger = logging.getLogger(__name__)

_SUBSCRIBE = INTERNAL_PREFIX + 'subscribe'          # Lona's internal topics
_UNSUBSCRIBE = INTERNAL_PREFIX + 'unsubscribe'
_FENCE = INTERNAL_PREFIX + 'mpchannels.fence'       # flush()'s, never handed to a channel


class Message(_lona.Message):
    """A ``lona.channels.Message`` that came through mpchannels.

    It has Lona's attributes, ``topic`` (the sender's), ``data`` (a dict of this
    handler's own), ``expiry`` (a naive local datetime or None), ``local`` (always
    False: local messages never leave Lona's routing) and ``droppable``, and Lona's
    methods. It adds what Lona's message does not have: mpchannels' ``id``, the same
    in every process and unique across them, and ``timestamp``, ``time.time()`` when
    the sending process's broker thread handed the message to mpchannels.
    """

    def __init__(self, topic: str, data: dict, expiry: datetime | None = None,
                 local: bool = False, droppable: bool = False, *, id: str = '',
                 timestamp: float = 0.0) -> None:
        super().__init__(topic=topic, data=data, expiry=expiry, local=local,
                         droppable=droppable)
        self.id = id
        self.timestamp = timestamp

    @classmethod
    def received(cls, message: _ChannelsMessage) -> Message:
        """The Lona message for one that arrived on an mpchannels channel."""
        return cls(message.topic, message.data, expiry=message.expiry,
                   droppable=message.droppable, id=message.id, timestamp=message.timestamp)

    def copy(self) -> Message:
        """A copy for one channel, as Lona's ``copy()``: its own shallow copy of the data,
        the dropped state shared with the original; and the same id and timestamp."""
        message = type(self)(self.topic, self.data, expiry=self.expiry, local=self.local,
                             droppable=self.droppable, id=self.id, timestamp=self.timestamp)
        message._original_message = self._original_message or self
        return message


class _Link:
    """What the Lona broker threads of this process share: the mpchannels channels that
    stand for the Lona channels' topics, the fences of :func:`flush`, and the brokers
    that run. Its mpchannels channels live from the first broker's start to the last
    broker's shutdown."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.brokers: list[MessageBroker] = []
        self.channels: dict[str, _Channel] = {}     # Lona topic -> its mpchannels channel
        self.lost: _Channel | None = None
        self.fences: dict[int, threading.Event] = {}
        self.tokens = itertools.count(1)

    def __repr__(self) -> str:
        return (f'<channels.lona link: {len(self.brokers)} brokers, '
                f'{len(self.channels)} topics, {len(self.fences)} fences waiting>')

    # brokers --------------------------------------------------------------------------

    def attach(self, broker: MessageBroker) -> None:
        """*broker* starts; the first one subscribes what Lona's channels subscribe now."""
        with self.lock:
            self.brokers.append(broker)
            if len(self.brokers) > 1:
                return
            self.lost = _Channel(LOST_TOPIC, self._on_lost)
            # a topic still subscribed from an earlier start (Lona's test helpers clear its
            # queues, unsubscribe messages included) is dropped here if Lona has none
            topics = {channel.topic for channel in _lona.Channel.get_channels(topic='*')}
            for topic in topics | set(self.channels):
                self._follow(topic)

    def detach(self, broker: MessageBroker) -> None:
        """*broker* shuts down; after the last one, nothing arrives from other processes."""
        with self.lock:
            if broker not in self.brokers:
                return
            self.brokers.remove(broker)
            if self.brokers:
                return
            ending = [*self.channels.values(), self.lost]
            self.channels.clear()
            self.lost = None
            for channel in ending:
                if channel is not None:
                    channel.unsubscribe()

    # routing --------------------------------------------------------------------------

    def route(self, broker: MessageBroker, message: _lona.Message) -> None:
        """Where *message*, taken from Lona's queue by *broker*, goes."""
        topic = message.topic
        if topic == _FENCE:
            with self.lock:
                event = self.fences.pop(message.data.get('fence'), None)
            if event is not None:
                event.set()
            return
        if message.local or topic.startswith(INTERNAL_PREFIX):
            for channel in _lona.Channel.get_channels(topic=topic):
                broker.schedule_task(channel=channel, message=message)
            if topic == _SUBSCRIBE or topic == _UNSUBSCRIBE:
                self.follow(message.data.get('topic'))
            return
        try:
            _Channel(topic).send(message.data, expiry=message.expiry,
                                 droppable=message.droppable)
        except (ChannelsError, TypeError, ValueError) as exc:
            logger.error('a Lona message to %r reached no channel, in this process or '
                         'another, since mpchannels refused it: %s', topic, exc)

    def follow(self, topic: object) -> None:
        """Subscribe or unsubscribe *topic* at mpchannels, as Lona's channels on it now
        say. Called after every change, so the state is right after the last one,
        whatever the order in which several broker threads take the changes."""
        if not isinstance(topic, str):
            return
        with self.lock:
            if self.brokers:
                self._follow(topic)

    def _follow(self, topic: str) -> None:
        wanted = not topic.startswith(INTERNAL_PREFIX) and any(
            channel.topic == topic for channel in _lona.Channel.get_channels(topic=topic))
        channel = self.channels.get(topic)
        if wanted and channel is None:
            try:
                self.channels[topic] = _Channel(topic, functools.partial(self._arrived, topic))
            except (ChannelsError, TypeError, ValueError) as exc:
                logger.error('Lona channels on topic %r get no messages that are not local, '
                             'since mpchannels refused the subscription: %s', topic, exc)
        elif not wanted and channel is not None:
            del self.channels[topic]
            channel.unsubscribe()

    def _arrived(self, topic: str, message: _ChannelsMessage) -> None:
        """An mpchannels handler (a task worker thread of mpchannels): schedule *message*
        for the Lona channels on *topic*, for Lona's task workers."""
        if message.topic.startswith(INTERNAL_PREFIX):
            return      # this process's own events: Lona routes its own; lost: _on_lost
        brokers = self.brokers[:1]
        if not brokers:
            return
        # Lona's public lookup scans every topic, as Lona's own broker does per message
        channels = [channel for channel in _lona.Channel.get_channels(topic=topic)
                    if channel.topic == topic]
        if channels:
            received = Message.received(message)
            for channel in channels:
                brokers[0].schedule_task(channel=channel, message=received)

    def _on_lost(self, message: _ChannelsMessage) -> None:
        _lona.Channel(LOST_TOPIC).send(dict(message.data), local=True)

    # flush ----------------------------------------------------------------------------

    def fence(self, timeout: float) -> bool:
        """Wait until the broker threads took every Lona message sent before the call."""
        with self.lock:
            if not self.brokers:
                raise RuntimeError(
                    'channels.lona.flush() waits for channels.lona.MessageBroker, and none '
                    'runs in this process: set CHANNEL_MESSAGE_BROKER_CLASS = '
                    "'channels.lona.MessageBroker' in the Lona settings, and flush once "
                    "Lona's server has started (in a view, say)")
            token = next(self.tokens)
            event = self.fences[token] = threading.Event()
        _lona.Channel(_FENCE).send({'fence': token}, local=True)
        if event.wait(timeout):
            return True
        with self.lock:
            self.fences.pop(token, None)
        return False


_link = _Link()


class MessageBroker(_lona.MessageBroker):
    """Lona's message broker, routed through mpchannels.

    Set ``CHANNEL_MESSAGE_BROKER_CLASS = 'channels.lona.MessageBroker'`` in the Lona
    settings; Lona's server creates ``MAX_CHANNEL_MESSAGE_BROKER_THREADS`` of them (one by
    default), each running on a thread of Lona's channel worker pool, and shuts them
    down when it stops. Messages that are not ``local`` go through mpchannels to every
    process (see the module's docstring); a message whose data cannot be pickled, or
    sent while mpchannels buffers more than ``MAX_BUFFER_BYTES``, is logged as an error
    here, in the broker thread, since Lona's ``send()`` returned already.

    Each sender's order and :func:`flush` hold with one broker thread, Lona's default:
    several threads take messages from Lona's queue side by side, so they may hand them
    on out of order (as Lona's own broker threads do).
    """

    def __init__(self, server: Any, executor: ThreadPoolExecutor, timeout: float) -> None:
        threads = getattr(getattr(server, 'settings', None),
                          'MAX_CHANNEL_MESSAGE_BROKER_THREADS', 1)
        if threads != 1 and not _link.brokers:
            logger.warning(
                'MAX_CHANNEL_MESSAGE_BROKER_THREADS is %r: with several broker threads a '
                "sender's messages may reach mpchannels out of order, and "
                'channels.lona.flush() may return before an earlier subscription is in '
                'force. Set it to 1 (the default) to keep both', threads)
        _link.attach(self)
        try:
            super().__init__(server=server, executor=executor, timeout=timeout)
        except BaseException:
            _link.detach(self)
            raise

    def shutdown(self) -> None:
        """Lona's server stops: this broker drains Lona's queue and ends; after the last
        broker of the process, nothing more arrives from other processes."""
        _link.detach(self)
        super().shutdown()

    def run(self) -> None:
        """Take one message from Lona's queue and send it on (Lona calls this in a loop)."""
        message = self.get_message()
        try:
            _link.route(self, message)
        except Exception:
            # Lona's Worker loop ends its thread on any exception: log it and go on
            logger.exception('channels.lona could not route %r', message)


def flush(timeout: float = FLUSH_TIMEOUT) -> bool:
    """Wait until the Lona subscriptions and messages of this process made before the call
    are in force at the mpchannels broker, as :func:`channels.flush` does for mpchannels'
    own channels: once it returns True, every message that any process sends afterwards
    reaches the Lona channels this process subscribed before the call.

    ``lona.Channel(topic, handler)`` returns before this process's broker thread has
    subscribed the topic at mpchannels, and that before the broker has the subscription;
    so a message that another process sends right after it (say, a request landing on
    another server) can miss it. Call it in a view after subscribing, where that
    matters. False if *timeout* seconds passed first. Raises ``RuntimeError`` where no
    :class:`MessageBroker` runs.
    """
    deadline = time.monotonic() + timeout
    if not _link.fence(timeout):
        return False
    return _runtime.flush(max(0.0, deadline - time.monotonic()))
