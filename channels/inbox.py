"""``listen()``: consume messages in async code, ``async for message in inbox``.

::

    async with channels.listen('chat.rooms.*', maxsize=1000) as inbox:
        async for message in inbox:
            ...

An :class:`Inbox` subscribes one channel per topic when its ``async with`` block starts
and unsubscribes them when it ends, also when the block is left by an exception or by
cancellation of the task that runs it. The block is entered only once the broker has
applied the subscriptions (a fence, see :func:`channels.flush`; at once without a
broker): from then on, every message that any process sends to those topics reaches
the inbox. The channels' handler runs on a task worker
thread and only appends to the inbox's bounded queue; the consumer awaits on its own
event loop.

The queue holds at most *maxsize* messages. What happens when a message arrives and it
is full is the *overflow* policy:

``'error'`` (the default)
    The inbox unsubscribes at once. The consumer first gets every message that was
    queued before the overflow, then :class:`~channels.errors.InboxOverflowError`, whose
    ``dropped`` counts the messages it missed that reached the inbox (at least 1;
    messages already on their way to it when it unsubscribed are not counted). Nothing
    is lost without the consumer knowing.
``'drop-oldest'``
    The oldest queued message is dropped to make room: a consumer that falls behind
    skips to recent messages (right for live views).
``'drop-newest'``
    The arriving message is dropped: what is queued stays.

Every drop is counted in ``inbox.dropped``; the first one of an inbox is logged as a
warning and the total when it closes. A message that expires while it waits in the
inbox is dropped, not handed out.

Each topic of an inbox is a channel of its own, as with ``Channel``: messages of one
topic come in order, and a message that matches two of its topics (``listen('a.*',
'a.b')``) comes twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING

from .channel import Channel
from .errors import BrokerUnavailableError, InboxOverflowError
from .runtime import FLUSH_TIMEOUT, runtime as _runtime
from .topics import validate_topic

if TYPE_CHECKING:
    from .message import Message

__all__ = ['Inbox', 'listen', 'close_all', 'OVERFLOW_POLICIES']

logger = logging.getLogger(__name__)

_inboxes: weakref.WeakSet[Inbox] = weakref.WeakSet()
_inboxes_lock = threading.Lock()       # inboxes may be made on several threads' loops

OVERFLOW_POLICIES = ('error', 'drop-oldest', 'drop-newest')
"""The values of ``listen(overflow=...)``; see the module's documentation."""


def listen(*topics: str, maxsize: int = 1000, overflow: str = 'error',
           ready_timeout: float = FLUSH_TIMEOUT) -> Inbox:
    """An inbox for the messages of *topics* (wildcards allowed), for ``async with``.

    :maxsize: how many messages the inbox holds for a consumer that is behind (>= 1).
    :overflow: what to do when it is full: ``'error'``, ``'drop-oldest'`` or
        ``'drop-newest'`` (see :mod:`channels.inbox`).
    :ready_timeout: seconds entering the block may wait for the broker to apply the
        subscriptions; past it, entering unsubscribes and raises
        :class:`~channels.errors.BrokerUnavailableError`.

    Raises ``TypeError``/``ValueError`` here for bad arguments. Subscribes on entering
    the ``async with`` block, on the running event loop, and enters once the
    subscriptions are in force (awaiting the broker without blocking the loop).
    """
    return Inbox(topics, maxsize=maxsize, overflow=overflow, ready_timeout=ready_timeout)


class Inbox:
    """A bounded queue of the messages of some topics, consumed with ``async for``.

    Use it as ``async with listen(...) as inbox``. ``await inbox.get()`` returns the
    next message; ``async for`` ends once the inbox is closed and empty. ``dropped``
    counts the messages it dropped by its overflow policy.
    """

    def __init__(self, topics: tuple[str, ...], *, maxsize: int = 1000,
                 overflow: str = 'error', ready_timeout: float = FLUSH_TIMEOUT) -> None:
        if not topics:
            raise TypeError("listen() needs at least one topic, e.g. listen('chat.rooms.*')")
        limit = _runtime.max_topic_length()
        self.topics = tuple(validate_topic(topic, max_length=limit) for topic in topics)
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f'maxsize must be an int >= 1, got {maxsize!r}')
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f'overflow must be one of {", ".join(map(repr, OVERFLOW_POLICIES))}'
                             f', got {overflow!r}')
        if isinstance(ready_timeout, bool) or not isinstance(ready_timeout, (int, float)) \
                or not 0 <= ready_timeout < float('inf'):
            raise ValueError(f'ready_timeout must be a finite number of seconds >= 0, got '
                             f'{ready_timeout!r}')
        self.maxsize = maxsize
        self.overflow = overflow
        self.ready_timeout = ready_timeout
        self.dropped = 0
        self._queue: deque[Message] = deque()
        self._lock = threading.Lock()
        self._channels: list[Channel] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[asyncio.Future] = []    # consumers awaiting a message
        self._overflowed = False
        self._closed = False
        self._entered = False
        with _inboxes_lock:
            _inboxes.add(self)

    def __repr__(self) -> str:
        state = 'closed' if self._closed else 'open' if self._entered else 'new'
        return (f'<Inbox {", ".join(self.topics)} {state} queued={len(self._queue)} '
                f'dropped={self.dropped}>')

    def __len__(self) -> int:
        """Messages queued and not yet taken."""
        return len(self._queue)

    @property
    def closed(self) -> bool:
        """True once the inbox has unsubscribed (its block ended, or it overflowed)."""
        return self._closed or self._overflowed

    # lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Inbox:
        if self._entered:
            raise RuntimeError(f'{self!r} was entered already; call listen() for a new one')
        self._entered = True
        self._loop = asyncio.get_running_loop()
        try:
            for topic in self.topics:
                self._channels.append(Channel(topic, self._put))
            if not await _runtime.fence_async(self.ready_timeout, local=False):
                link = _runtime.machinery and _runtime.machinery.link
                where = f' on {link.address_text}' if link is not None else ''
                raise BrokerUnavailableError(
                    f'listen({", ".join(map(repr, self.topics))}): the broker{where} did not '
                    f'confirm the subscriptions within {self.ready_timeout:.3g}s, so '
                    f'messages sent now might not reach the inbox. Is the broker running? '
                    f'Retry, or raise ready_timeout.')
        except BaseException:           # also cancellation while awaiting the broker
            self.close()
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Unsubscribe and end iteration once the queue is empty (idempotent)."""
        self._unsubscribe()
        with self._lock:
            first_close, self._closed = not self._closed, True
            waiters, self._waiters = self._waiters, []
        if waiters:
            _wake_all_from_any_thread(self._loop, waiters)
        if self.dropped and first_close:
            logger.warning('%r closed; it dropped %d messages by its overflow policy %r',
                           self, self.dropped, self.overflow)

    def _unsubscribe(self) -> None:
        channels, self._channels = self._channels, []
        for channel in channels:
            channel.unsubscribe()

    # the producer side: a task worker thread ----------------------------------------------

    def _put(self, message: Message) -> None:
        with self._lock:
            if self._closed or self._overflowed:
                if self._overflowed:
                    self.dropped += 1
                return
            queue = self._queue
            dropped = message
            if len(queue) >= self.maxsize:
                self.dropped += 1
                first = self.dropped == 1
                if self.overflow == 'drop-oldest':
                    dropped = queue.popleft()
                    queue.append(message)
                elif self.overflow == 'error':
                    self._overflowed = True
                # 'drop-newest': the message is not queued
            else:
                queue.append(message)
                first = False
            waiters, self._waiters = self._waiters, []
        if first:
            logger.warning('%r is full (maxsize=%d): it dropped %s by its overflow policy %r; '
                           'the consumer is slower than its messages', self, self.maxsize,
                           dropped, self.overflow)
        if self._overflowed and self.overflow == 'error':
            # No more deliveries: the consumer learns of the gap from InboxOverflowError.
            # Unsubscribing here is safe: the channel's handler is this very call.
            self._unsubscribe()
        if waiters:
            _wake_all_from_any_thread(self._loop, waiters)

    # the consumer side: the event loop ------------------------------------------------------

    async def get(self) -> Message:
        """The next message; waits for one. Raises :class:`InboxOverflowError` after the
        messages queued before an overflow (policy ``'error'``), and
        ``StopAsyncIteration`` once the inbox is closed and empty."""
        if not self._entered:
            raise RuntimeError('use the inbox in an async with block: '
                               'async with channels.listen(...) as inbox')
        while True:
            with self._lock:
                while self._queue:
                    message = self._queue.popleft()
                    if message.deadline is None or not message.is_expired():
                        return message
                    message.drop()       # it expired while it waited here
                if self._overflowed and self.overflow == 'error':
                    raise InboxOverflowError(
                        f'{self!r} overflowed: its consumer fell {self.maxsize} messages '
                        f'behind and missed {self.dropped} (so far); it has unsubscribed. '
                        f'Consume faster, raise maxsize, or choose a drop-* overflow policy',
                        dropped=self.dropped)
                if self._closed:
                    raise StopAsyncIteration
                waiter = self._loop.create_future()
                self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)

    def __aiter__(self) -> Inbox:
        return self

    async def __anext__(self) -> Message:
        return await self.get()


def close_all(loop: asyncio.AbstractEventLoop | None = None) -> int:
    """Close every open inbox (entered, not yet closed), or only those consumed on *loop*.

    Each unsubscribes at once; its consumer gets what is queued, then the end of
    iteration (``async for`` ends), so a request handler that streams an inbox finishes.
    Returns how many it closed. Works from any thread. :mod:`channels.asgi` calls it when
    the server starts to stop.
    """
    with _inboxes_lock:
        inboxes = list(_inboxes)
    closed = 0
    for inbox in inboxes:
        if inbox._entered and not inbox._closed and (loop is None or inbox._loop is loop):
            inbox.close()
            closed += 1
    return closed


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _wake_all(waiters: list[asyncio.Future]) -> None:
    for waiter in waiters:
        _wake(waiter)


def _wake_all_from_any_thread(loop: asyncio.AbstractEventLoop,
                              waiters: list[asyncio.Future]) -> None:
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        _wake_all(waiters)
        return
    try:
        loop.call_soon_threadsafe(_wake_all, waiters)
    except RuntimeError:         # the consumer's loop is closed: nobody waits
        pass


def _after_fork_in_child() -> None:
    # An inherited inbox's consumer runs on a loop of the parent: in the child it takes
    # nothing more (and its lock may have been held by a parent thread at the fork).
    global _inboxes_lock
    _inboxes_lock = threading.Lock()
    for inbox in list(_inboxes):
        inbox._lock = threading.Lock()
        inbox._closed = True
        inbox._waiters = []
        inbox._queue.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
