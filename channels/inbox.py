"""``listen()``: consume messages in async code, ``async for message in inbox``.

::

    async with channels.listen('chat.rooms.*', maxsize=1000) as inbox:
        async for message in inbox:
            ...

An :class:`Inbox` subscribes to its topics when its ``async with`` block starts and
unsubscribes when it ends, also when the block is left by an exception or by
cancellation of the task that runs it. The block is entered only once the broker has
applied the subscriptions (a fence, see :func:`channels.flush`; at once without a
broker): from then on, every message that any process sends to those topics reaches
the inbox. The consumer awaits on its own event loop.

The inboxes of one event loop on one topic share one channel (one entry in the index,
one subscription at the broker), whose runner, a :class:`_Group`, is handed each
message by the routing thread and passes it to the loop's dispatcher (see
:class:`channels.handlers.LoopDispatcher`): one wake-up of the loop for all that
arrived meanwhile, for every group of that loop. On the loop, the group appends the
message to the queue of each of its inboxes and wakes the consumers that wait; ``get()``
hands out a copy of its own. So a message costs the threads one hand-off per loop and
topic, not one task per consumer, and each consumer still gets its own copy.

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

Each topic of an inbox is subscribed on its own, as with one ``Channel`` per topic:
messages of one topic come in order, and a message that matches two of its topics
(``listen('a.*', 'a.b')``) comes twice (so does one of a topic given twice).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import weakref
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .channel import Channel
from .errors import BrokerUnavailableError, InboxOverflowError
from .handlers import LoopRunner, dispatcher_of
from .runtime import FLUSH_TIMEOUT, SUBSCRIBE_TOPIC, UNSUBSCRIBE_TOPIC, runtime as _runtime
from .topics import validate_topic

if TYPE_CHECKING:
    from .message import Message

__all__ = ['Inbox', 'listen', 'close_all', 'OVERFLOW_POLICIES']

logger = logging.getLogger(__name__)

_inboxes: weakref.WeakSet[Inbox] = weakref.WeakSet()
_inboxes_lock = threading.Lock()       # inboxes may be made on several threads' loops
_groups: dict[tuple[asyncio.AbstractEventLoop, str], _Group] = {}   # (loop, topic) -> group
_groups_lock = threading.Lock()      # joining and leaving groups; taken before the registry's

_RELEASE = object()
"""A group's marker in its loop's dispatcher: release what it held back."""

HOLD_SLACK = 16
"""A group holds messages back once more than twice its largest ``maxsize``, plus this
many, wait for its loop (a loop that is a few messages behind is not held up)."""

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
        # The queue and the waiters change on the inbox's loop only (its groups, get(),
        # close() there or by a callback there); the lock makes a close() from several
        # threads at once log its drops once.
        self._queue: deque[Message] = deque()
        self._lock = threading.Lock()
        self._groups: list[_Group] = []     # one per topic, while subscribed
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
                _join(self, self._loop, topic)
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
        """Unsubscribe and end iteration once the queue is empty (idempotent; any thread)."""
        self._unsubscribe()
        with self._lock:
            first_close, self._closed = not self._closed, True
        loop = self._loop
        if loop is not None:
            # the waiters as they are when this runs on the loop: one that get() adds
            # before it is woken too, and one added after sees the inbox closed
            _call_on(loop, self._wake_waiters)
        if self.dropped and first_close:
            logger.warning('%r closed; it dropped %d messages by its overflow policy %r',
                           self, self.dropped, self.overflow)

    def _unsubscribe(self) -> None:
        _leave(self)

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        _wake_all(waiters)

    # the producer side: its groups, on the inbox's loop ------------------------------------

    def _full(self, message: Message) -> None:
        """*message* arrived and the queue is full: apply the overflow policy."""
        queue = self._queue
        dropped = message
        if self.overflow == 'drop-oldest':
            dropped = queue.popleft()
            queue.append(message)
        # 'drop-newest': the message is not queued
        self._count_drops(1, dropped)

    def _lose(self, count: int) -> None:
        """*count* messages for it were dropped before they reached it (its loop fell
        more than its maxsize behind): count them as its overflow policy's."""
        if not self._overflowed:
            self._count_drops(count, f'{count} messages its event loop did not take in time')

    def _count_drops(self, count: int, what: object) -> None:
        self.dropped += count
        if self.overflow == 'error':
            self._overflowed = True
        if self.dropped == count:
            logger.warning('%r is full (maxsize=%d): it dropped %s by its overflow policy %r; '
                           'the consumer is slower than its messages', self, self.maxsize,
                           what, self.overflow)
        if self._overflowed:
            # No more deliveries: the consumer learns of the gap from InboxOverflowError
            # once it has taken what is queued.
            self._unsubscribe()
            waiters, self._waiters = self._waiters, []
            _wake_all(waiters)

    # the consumer side: the event loop ------------------------------------------------------

    async def get(self) -> Message:
        """The next message; waits for one. Raises :class:`InboxOverflowError` after the
        messages queued before an overflow (policy ``'error'``), and
        ``StopAsyncIteration`` once the inbox is closed and empty."""
        queue = self._queue
        while True:
            while queue:
                message = queue.popleft()
                if message.deadline is None or not message.is_expired():
                    return message.copy()     # the queued one is its group's, shared
                message.drop()       # it expired while it waited here
            if not self._entered:
                raise RuntimeError('use the inbox in an async with block: '
                                   'async with channels.listen(...) as inbox')
            if self._overflowed and self.overflow == 'error':
                raise InboxOverflowError(
                    f'{self!r} overflowed: its consumer fell {self.maxsize} messages '
                    f'behind and missed {self.dropped} (so far); it has unsubscribed. '
                    f'Consume faster, raise maxsize, or choose a drop-* overflow policy',
                    dropped=self.dropped)
            if self._closed:
                raise StopAsyncIteration
            waiter = self._loop.create_future()
            waiters = self._waiters
            waiters.append(waiter)
            try:
                await waiter
            finally:
                waiters = self._waiters      # woken: a new list; cancelled: maybe still in
                if waiters and waiter in waiters:
                    waiters.remove(waiter)

    def __aiter__(self) -> Inbox:
        return self

    __anext__ = get


class _Group(LoopRunner):
    """The inboxes of one event loop on one topic, and the one channel they share.

    Its channel's runner: the routing thread hands it each message (``handoff``), which
    it puts into its loop's dispatcher; on the loop, ``_arrive`` appends it to each
    member's queue (or applies the member's overflow policy) and wakes its consumers;
    each inbox hands out a copy of its own when it is taken (``get()``), so a queued
    message is one object for all the group's inboxes, and a copy lives only as long as
    its consumer keeps it. Members join and leave under ``_groups_lock``; the loop reads
    ``_members``, a tuple built again at the first arrival after a change (an inbox
    given a topic twice is in it twice).

    What waits for the loop is bounded. Once more than twice ``_cap`` messages (``_cap``:
    the largest ``maxsize`` of its members) and ``HOLD_SLACK`` wait, every member is far
    enough behind that its overflow policy will apply: the group then holds back what
    arrives, keeping only the newest ``_cap`` (for ``'drop-oldest'``) and counting the
    rest, and puts one marker in the dispatcher. When the loop reaches the marker, each
    member is told how many it lost (``Inbox._lose``) and the held messages follow, so a
    loop that stalled ends as it would have, had each message reached its inboxes at
    once: the oldest kept by ``'drop-newest'`` and ``'error'``, the newest by
    ``'drop-oldest'``, every drop counted; at most about three times ``_cap`` (and
    ``HOLD_SLACK``) messages wait meanwhile.
    """

    __slots__ = ('loop', 'topic', 'channel', 'dispatcher', 'orphaned', '_counts',
                 '_members', '_numbers', '_joining', '_cap', '_hold_after', '_arrived',
                 '_held_lock', '_holding', '_held', '_lost', '_first_lost', '__weakref__')

    def __init__(self, loop: asyncio.AbstractEventLoop, topic: str) -> None:
        self.loop = loop
        self.topic = topic
        self.orphaned = False        # inherited by a forked child: its loop runs elsewhere
        self._counts: dict[Inbox, int] = {}
        self._members: tuple[Inbox, ...] | None = ()
        # Each message handed over gets a number, and so does an inbox that joins: it
        # gets only those numbered after it, not those routed before it subscribed that
        # still wait for the loop (as a channel of its own would not)
        self._numbers = itertools.count()          # next() is one step: any thread
        self._joining: dict[Inbox, int] = {}       # -> its number: not yet given any
        self._cap = 1                # the largest maxsize of any member it has had
        self._hold_after = 2 + HOLD_SLACK           # 2 * _cap + HOLD_SLACK
        self._arrived = next(self._numbers)       # the number last taken on the loop
        self._held_lock = threading.Lock()
        self._holding = False        # the marker is in the dispatcher: hold what arrives
        self._held: deque[tuple[int, Message]] = deque()
        self._lost = 0               # held back and pushed out by newer ones
        self._first_lost = 0
        self.dispatcher = dispatcher_of(loop)
        self.dispatcher.register(self)
        self.channel = Channel(topic)

    def __repr__(self) -> str:
        return f'<inbox group {self.topic!r} inboxes={len(self._counts)}>'

    def _changed(self) -> None:
        # under _groups_lock: the next arrival builds the tuple (joining N inboxes costs
        # O(N), not O(N^2))
        self._members = None

    def handoff(self, message: Message) -> None:
        if self.orphaned:
            return
        number = next(self._numbers)
        # Past twice the cap and some: joins take numbers too, so what waits is counted
        # a little high, and at least the cap must wait ahead of the marker, so that
        # each member fills its queue from there before it loses any
        if self._holding or number - self._arrived > self._hold_after:
            with self._held_lock:
                if self._holding or number - self._arrived > self._hold_after:
                    self._hold(number, message)
                    return
        self.dispatcher.put(self, (number, message))

    __call__ = handoff

    def _hold(self, number: int, message: Message) -> None:
        """Under ``_held_lock``: keep *message* back from the loop, with the newest."""
        held = self._held
        if len(held) >= self._cap:
            lost_number, _ = held.popleft()
            if not self._lost:
                self._first_lost = lost_number
            self._lost += 1
        held.append((number, message))
        if not self._holding:
            self._holding = True
            self.dispatcher.put(self, _RELEASE)

    def _release(self) -> int:
        """On the loop, at the marker: tell each member what it lost, then deliver what
        was held back, in order."""
        with self._held_lock:
            held, self._held = self._held, deque()
            lost, self._lost = self._lost, 0
            self._holding = False
            if held:
                self._arrived = held[-1][0]
        deliveries = 0
        if lost:
            # the members as of the first message lost (one that joined later is not
            # told of those lost after it joined: the count is of whole stretches)
            for inbox in self._members_at(self._first_lost):
                inbox._lose(lost)
            deliveries += lost
        for item in held:
            deliveries += self._arrive(item)
        return deliveries

    def _members_at(self, number: int) -> tuple[Inbox, ...]:
        """The members that take message *number*: those that joined before it."""
        members = self._members
        if members is None or self._joining:
            with _groups_lock:
                joining = self._joining
                for inbox, since in list(joining.items()):
                    if since < number:
                        del joining[inbox]
                        self._members = None
                members = self._members
                if members is None:
                    members = self._members = tuple(
                        inbox for inbox, count in self._counts.items()
                        if inbox not in joining for _ in range(count))
        return members

    def _arrive(self, item: tuple[int, Message]) -> int:
        if item is _RELEASE:
            return self._release()
        number, message = item
        self._arrived = number
        members = self._members
        if members is None or self._joining:
            members = self._members_at(number)
        for inbox in members:
            queue = inbox._queue
            if len(queue) < inbox.maxsize:
                queue.append(message)
                waiters = inbox._waiters
                if waiters:
                    inbox._waiters = []
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_result(None)
            elif not inbox._overflowed:
                inbox._full(message)
        return len(members)

    def loop_closed(self) -> None:
        """The loop has closed: its inboxes can take nothing more; unsubscribe them."""
        for inbox in list(self._counts):
            inbox.close()


def _join(inbox: Inbox, loop: asyncio.AbstractEventLoop, topic: str) -> None:
    """Add *inbox* to the group of (*loop*, *topic*), subscribing a new group's channel.

    Raises what subscribing raises (``SubscriptionLimitError``, ...); the inbox is then
    not in that group."""
    with _groups_lock:
        group = _groups.get((loop, topic))
        if group is None or group.dispatcher.closed:
            group = _Group(loop, topic)
            group.channel.subscribe(group)       # sends lona.channels.subscribe
            _groups[loop, topic] = group
        else:       # each inbox's topic is a subscription of its own, as for the events
            _runtime.send_event(SUBSCRIBE_TOPIC, {'topic': topic})
        group._counts[inbox] = group._counts.get(inbox, 0) + 1
        group._joining.setdefault(inbox, next(group._numbers))
        if inbox.maxsize > group._cap:       # never lowered: a bound, not a policy
            group._cap = inbox.maxsize
            group._hold_after = 2 * inbox.maxsize + HOLD_SLACK
        group._changed()
        inbox._groups.append(group)


def _leave(inbox: Inbox) -> None:
    """Take *inbox* out of its groups; a group left empty unsubscribes its channel."""
    with _groups_lock:
        groups, inbox._groups = inbox._groups, []
        emptied = []
        for group in groups:             # once per topic (a topic given twice: twice)
            count = group._counts.get(inbox, 0)
            if not count:
                continue
            if count > 1:
                group._counts[inbox] = count - 1
            else:
                del group._counts[inbox]
                group._joining.pop(inbox, None)
            group._changed()
            if not group._counts:
                if _groups.get((group.loop, group.topic)) is group:
                    del _groups[group.loop, group.topic]
                emptied.append(group)
            else:
                _runtime.send_event(UNSUBSCRIBE_TOPIC, {'topic': group.topic})
        for group in emptied:
            group.channel.unsubscribe()          # sends lona.channels.unsubscribe


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


def _call_on(loop: asyncio.AbstractEventLoop, callback: Any) -> None:
    """Call *callback* on *loop*: now if this is its thread, else soon from the loop."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        callback()
        return
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:         # the consumer's loop is closed: nobody waits
        pass


def _after_fork_in_child() -> None:
    # An inherited inbox's consumer runs on a loop of the parent: in the child it takes
    # nothing more (and a lock may have been held by a parent thread at the fork). The
    # groups' channels stay subscribed, as the child's other inherited channels do; what
    # reaches them is dropped.
    global _inboxes_lock, _groups_lock
    _inboxes_lock = threading.Lock()
    _groups_lock = threading.Lock()
    for group in list(_groups.values()):
        group.orphaned = True
        group._counts.clear()
        group._joining.clear()
        group._held_lock = threading.Lock()      # maybe held by a routing thread at the fork
        group._held.clear()
        group._members = ()
    _groups.clear()
    for inbox in list(_inboxes):
        inbox._lock = threading.Lock()
        inbox._closed = True
        inbox._waiters = []
        inbox._groups = []
        inbox._queue.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
