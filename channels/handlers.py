"""How a subscription calls its handler: directly, guarded by an error callback, or as a
coroutine on its event loop.

A subscription is stored on its channel as the tuple ``(runner, handler)``: task worker
threads call ``runner(message)``; ``handler`` is what the user subscribed. For a plain
function without an error callback the runner is the handler itself, so the common case
costs nothing extra.

A coroutine function never runs on a task worker thread. Its runner, a
:class:`CoroutineRunner`, is a :class:`LoopRunner`: the routing thread hands each message
to it directly (``handoff()``, no task worker in between), and it appends the message to
the subscription's own queue and, when no drain task is running, asks the loop to start
one; the drain task awaits one handler call after another. So the next message of a
channel is not started before the previous coroutine finished, and no channels thread
ever waits for an event loop.

Every loop has one :class:`LoopDispatcher`, which carries what the threads hand to
that loop's runners: they append to its queue, and only the first of a batch wakes the
loop (one ``call_soon_threadsafe``, a write to the loop's self-pipe); the loop then runs
all that arrived in one callback. So a thousand channels (or inboxes, see
:mod:`channels.inbox`) of one loop that get a message cost the loop one wake-up, not a
thousand. Shutdown waits for the dispatchers as for the runners.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .channel import Channel
    from .message import Message

__all__ = ['ErrorCallback', 'LoopRunner', 'LoopDispatcher', 'LoopGroup', 'CoroutineRunner',
           'GuardedHandler',
           'is_coroutine_handler', 'check_error_callback', 'make_runner', 'dispatcher_of',
           'coroutine_runners_idle', 'busy_coroutine_runners', 'backlog']

logger = logging.getLogger(__name__)

ErrorCallback = Callable[[BaseException, 'Message'], Any]
"""``on_error(error, message)``: called with what a handler raised and the message it was
handling, instead of only logging it."""

_runners: weakref.WeakSet[CoroutineRunner] = weakref.WeakSet()
_runners_lock = threading.Lock()       # also guards _dispatchers and _by_loop
_dispatchers: weakref.WeakSet[LoopDispatcher] = weakref.WeakSet()
# id(loop) -> its dispatcher, while a runner holds it (a new loop may reuse the id of a
# closed one: dispatcher_of checks that the dispatcher is the loop's)
_by_loop: weakref.WeakValueDictionary[int, LoopDispatcher] = weakref.WeakValueDictionary()

# id(channel) -> its latest coroutine runner, while that runner lives (it holds the
# channel, so the id cannot be reused meanwhile)
_latest: weakref.WeakValueDictionary[int, CoroutineRunner] = weakref.WeakValueDictionary()
# (loop, topic) -> the LoopGroup of the coroutine channels of that loop on that topic
_groups: dict[tuple[asyncio.AbstractEventLoop, str], LoopGroup] = {}

DISPATCH_BUDGET = 32768
"""Deliveries a dispatcher makes in one callback (a few ms of appending to queues) before
it lets the loop run the rest (the consumers, other callbacks) and goes on in the next
callback. Larger batches cost fewer wake-ups of each consumer per message."""


def is_coroutine_handler(handler: Any) -> bool:
    """True if calling *handler* returns a coroutine: an ``async def`` function, a
    ``functools.partial`` of one, an object whose ``__call__`` is one, or a wrapper
    made with ``functools.wraps`` around one."""
    if inspect.iscoroutinefunction(handler):
        return True
    if isinstance(handler, functools.partial):
        return is_coroutine_handler(handler.func)
    if not inspect.isroutine(handler) and not isinstance(handler, functools.partial) \
            and inspect.iscoroutinefunction(getattr(handler, '__call__', None)):
        return True
    try:        # a decorator made with functools.wraps around an async def
        unwrapped = inspect.unwrap(handler)
    except ValueError:
        return False
    return unwrapped is not handler and inspect.iscoroutinefunction(unwrapped)


def check_error_callback(on_error: Any) -> None:
    """Raise ``TypeError`` unless *on_error* is None or a plain (not async) callable."""
    if on_error is None:
        return
    if not callable(on_error):
        raise TypeError(f'on_error must be callable (it is called with the exception and '
                        f'the message), got {type(on_error).__name__} {on_error!r}')
    if is_coroutine_handler(on_error):
        raise TypeError(f'on_error must be a plain function: it is called where the error '
                        f'happened, on a task thread or inside the event loop, and is not '
                        f'awaited; got the coroutine function {on_error!r}')


def make_runner(channel: Channel, handler: Callable[[Message], Any],
                loop: asyncio.AbstractEventLoop | None,
                on_error: ErrorCallback | None) -> Callable[[Message], Any]:
    """What a task worker thread calls for each message of a new subscription.

    Raises ``RuntimeError`` for a coroutine handler with no event loop to run on, and
    ``TypeError`` for a *loop* given with a plain handler or a non-callable *on_error*.
    """
    check_error_callback(on_error)
    if isinstance(handler, LoopRunner):       # the library's own (an inbox's group)
        return handler
    if is_coroutine_handler(handler):
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    f'{handler!r} is a coroutine function, which runs on an event loop: '
                    f'subscribe it from a coroutine (it then runs on the running loop) '
                    f'or pass loop=') from None
        elif not isinstance(loop, asyncio.AbstractEventLoop):
            raise TypeError(f'loop must be an asyncio event loop, got '
                            f'{type(loop).__name__} {loop!r}')
        return CoroutineRunner(channel, handler, loop, on_error)
    if loop is not None:
        raise TypeError(f'loop= is for coroutine handlers; {handler!r} is a plain callable, '
                        f'which runs on a task worker thread')
    if on_error is not None:
        return GuardedHandler(handler, on_error)
    return handler


def _report(error: BaseException, handler: Any, message: Message,
            on_error: ErrorCallback | None, where: str) -> None:
    if on_error is None:
        logger.error('exception was raised while running %r for %r %s', handler, message,
                     where, exc_info=error)
        return
    try:
        on_error(error, message)
    except BaseException:
        logger.exception('the error callback %r raised while handling %r from %r for %r',
                         on_error, error, handler, message)


class GuardedHandler:
    """A plain handler whose exceptions go to an error callback (run on the task thread)."""

    __slots__ = ('handler', 'on_error')

    def __init__(self, handler: Callable[[Message], Any], on_error: ErrorCallback) -> None:
        self.handler = handler
        self.on_error = on_error

    def __repr__(self) -> str:
        return f'<GuardedHandler {self.handler!r} on_error={self.on_error!r}>'

    def __call__(self, message: Message) -> None:
        try:
            result = self.handler(message)
            if result is not None:
                unawaited(self.handler, result, message)
        except BaseException as error:   # as a task worker does: the channel goes on
            _report(error, self.handler, message, self.on_error, 'on a task worker thread')


class LoopRunner:
    """A subscription's runner whose work runs on an event loop.

    The machinery hands it each message on the routing thread with :meth:`handoff`
    instead of queuing a task (see ``Machinery.schedule``); it must not block there.
    What it puts into its :class:`LoopDispatcher` runs on the loop as ``_arrive(item)``,
    which returns how many deliveries it made (None: one), for the dispatcher's budget.
    :meth:`loop_closed` is called once the dispatcher finds the loop closed.
    """

    __slots__ = ()

    def handoff(self, message: Message) -> None:
        """Take *message* on a routing thread. Others may hold the same message: the
        runner gives its handler a copy of its own (``message.copy()``), made as late as
        it can (a copy that lives only for the call is cheap to collect)."""
        raise NotImplementedError

    def __call__(self, message: Message) -> None:
        self.handoff(message)         # a task worker that runs it anyway (a custom one)

    def _arrive(self, item: Any) -> int | None:
        """On the loop: what this runner put into the dispatcher; the deliveries made."""
        raise NotImplementedError

    def _dropped(self, item: Any, dispatcher: LoopDispatcher) -> None:
        """What this runner put will not run: its loop closed, or runs in the parent
        process of this forked child (``dispatcher.orphaned``)."""

    def loop_closed(self) -> None:
        """The loop has closed: nothing put for it will run."""

    @property
    def idle(self) -> bool:
        """True when nothing waits for or runs on the loop for this runner."""
        return True

    def backlog(self) -> int:
        """Messages waiting for or running on the loop (approximate)."""
        return 0


class LoopDispatcher:
    """What the channels threads hand to the runners of one event loop, in order.

    ``put()`` (any thread) appends to the queue and, if no callback is due, schedules one
    with ``call_soon_threadsafe``: one wake-up of the loop per batch, however many
    runners it is for. The callback runs what arrived, in order, up to
    ``DISPATCH_BUDGET`` deliveries, then lets the loop run and goes on in the next
    callback (``call_soon``). A closed loop is found at the next ``put()`` (or by
    shutdown): every runner of it is told (``loop_closed()``) and what waited is dropped.
    """

    __slots__ = ('loop', 'orphaned', 'closed', '_pending', '_scheduled', '_running',
                 '_runners', '__weakref__')

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.orphaned = False        # inherited by a forked child: its loop runs elsewhere
        self.closed = False          # its loop was found closed
        self._pending: deque[tuple[LoopRunner, Any]] = deque()
        self._scheduled = False      # a callback is due (set by put, reset by the callback)
        self._running = False
        self._runners: weakref.WeakSet[LoopRunner] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f'<LoopDispatcher {self.loop!r} pending={len(self._pending)}>'

    def register(self, runner: LoopRunner) -> None:
        """*runner* puts its work here (it is told if the loop closes)."""
        self._runners.add(runner)

    def put(self, runner: LoopRunner, item: Any) -> None:
        """Have the loop call ``runner._arrive(item)`` after what was put before (any
        thread; never blocks)."""
        if self.orphaned or self.closed:
            runner._dropped(item, self)
            return
        self._pending.append((runner, item))
        # The flag is reset by the callback before it takes the queue, so an item
        # appended meanwhile is either taken by it or seen by a put that schedules the
        # next one; two threads may both schedule one: the second finds little or nothing.
        if self._scheduled and not self.loop.is_closed():
            return
        self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._run)
        except RuntimeError:         # the loop is closed: nothing will run
            self._close_down()

    def _run(self) -> None:
        self._scheduled = False
        self._running = True
        pending = self._pending
        budget = DISPATCH_BUDGET
        try:
            while pending:
                runner, item = pending.popleft()
                try:
                    budget -= runner._arrive(item) or 1
                except Exception:                   # not expected: a bug of the runner
                    logger.exception('delivering to %r failed', runner)
                if budget <= 0 and pending:
                    self._scheduled = True
                    self.loop.call_soon(self._run)  # the rest after what waits meanwhile
                    return
        finally:
            self._running = False

    def _close_down(self) -> None:
        """The loop is closed: drop what waits and tell every runner of it (once)."""
        self.closed = True
        pending, self._pending = self._pending, deque()
        for runner, item in pending:
            runner._dropped(item, self)
        for runner in list(self._runners):
            try:
                runner.loop_closed()
            except Exception:
                logger.exception('%r failed to close down for its closed loop', runner)

    @property
    def idle(self) -> bool:
        """True when nothing waits for the loop here (a closed loop's is dropped)."""
        if not self._pending and not self._running:
            return True
        if self.loop.is_closed() and not self.closed:
            self._close_down()
            return True
        return self.closed

    def backlog(self) -> int:
        """Items waiting here (approximate)."""
        return len(self._pending)


def dispatcher_of(loop: asyncio.AbstractEventLoop) -> LoopDispatcher:
    """The dispatcher of *loop* (made on first use; one per loop)."""
    with _runners_lock:
        dispatcher = _by_loop.get(id(loop))
        if dispatcher is None or dispatcher.loop is not loop:
            dispatcher = _by_loop[id(loop)] = LoopDispatcher(loop)
            _dispatchers.add(dispatcher)
        return dispatcher


class LoopGroup(LoopRunner):
    """The coroutine channels of one event loop on one topic, as one entry in the index.

    The routing threads find this entry, not each channel, so a message costs them one
    hand-off (to the loop's dispatcher) however many channels of the loop match; on the
    loop, :meth:`_arrive` gives it to each member's runner, which starts a drain task
    unless one runs. ``Channel.get_channels()`` lists the members' channels instead
    (and a custom ``MessageBroker`` that routes through it schedules each channel, whose
    runner then takes the message itself). It looks like a channel to the routing:
    ``topic``, and ``_subscription`` whose runner is itself.

    Each message handed over gets a number; a runner that joins takes one too, and gets
    only the messages numbered after it: those routed before it subscribed (to the
    channel's earlier subscription, say) do not reach it, as they would not reach a
    channel of its own.
    """

    __slots__ = ('topic', 'loop', 'dispatcher', '_subscription', '_mailbox', '_runners',
                 '_joining', '_members', '_numbers', '_queue', '_claim', '__weakref__')

    def __init__(self, dispatcher: LoopDispatcher, topic: str) -> None:
        self.topic = topic
        self.loop = dispatcher.loop
        self.dispatcher = dispatcher
        self._subscription = (self, None)
        self._mailbox = None
        self._runners: dict[CoroutineRunner, None] = {}    # in the order they joined
        self._joining: dict[CoroutineRunner, int] = {}     # -> its number: not yet given any
        self._members: tuple[CoroutineRunner, ...] | None = ()   # None: to build again
        self._numbers = itertools.count()          # next() is one step: any thread
        # (number, message) handed over and not yet given to the members. The claim is
        # held while the dispatcher has this group to run (taken as a runner's is): one
        # item in the dispatcher per batch, and the members count as busy meanwhile.
        self._queue: deque[tuple[int, Message]] = deque()
        self._claim = threading.Lock()

    def __repr__(self) -> str:
        return f'<coroutine channels {self.topic!r} x{len(self._runners)} on {self.loop!r}>'

    def channels(self) -> list[Channel]:
        """The member channels, in the order they subscribed."""
        with _runners_lock:
            return [runner.channel for runner in self._runners]

    def unsubscribe(self) -> None:
        """Unsubscribe every member channel."""
        for channel in self.channels():
            channel.unsubscribe()

    def join(self, runner: CoroutineRunner) -> None:
        """Add *runner* (under ``_runners_lock``): it gets what is handed over from now."""
        self._runners[runner] = None
        self._joining[runner] = next(self._numbers)
        self._members = None

    def leave(self, runner: CoroutineRunner) -> bool:
        """Take *runner* out (under ``_runners_lock``); False if it was not in."""
        if self._runners.pop(runner, 0) is not None:
            return False
        self._joining.pop(runner, None)
        self._members = None
        return True

    def _snapshot(self, number: int = -1) -> tuple[CoroutineRunner, ...]:
        """The members that get message *number* (those that joined before it)."""
        with _runners_lock:
            for runner, since in list(self._joining.items()):
                if since < number:
                    del self._joining[runner]
                    self._members = None
            members = self._members
            if members is None:
                joining = self._joining
                members = self._members = tuple(runner for runner in self._runners
                                                if runner not in joining)
        return members

    def handoff(self, message: Message) -> None:
        queue = self._queue
        queue.append((next(self._numbers), message))
        if self._claim.acquire(False):
            self.dispatcher.put(self, None)
        elif not len(queue) % 1024 and self.loop.is_closed():
            self.dispatcher.put(self, None)     # finds the loop closed: drops, unsubscribes

    def _arrive(self, item: None) -> int:
        members = self._snapshot()
        queue, claim = self._queue, self._claim
        most = max(DISPATCH_BUDGET // max(len(members), 1), 1)     # messages in this call
        done = delivered = 0
        while True:
            if done == most:                 # the rest after the loop ran a while
                self.dispatcher._pending.append((self, None))      # still claimed
                break
            try:
                number, message = queue.popleft()
            except IndexError:
                claim.release()              # then look again, as a drain does
                if queue and claim.acquire(False):
                    continue
                break
            if self._joining or self._members is None:
                members = self._snapshot(number)
            for runner in members:       # runner._take(message), inline
                runner._pending.append(message)
                if runner._claim.acquire(False):
                    runner._start()
            done += 1
            delivered += len(members)
        return delivered

    def _dropped(self, item: None, dispatcher: LoopDispatcher) -> None:
        # each member counts what it would have got as lost (see CoroutineRunner._dropped)
        queue = self._queue
        runners: dict[CoroutineRunner, None] = {}
        while queue:
            number, message = queue.popleft()
            for runner in self._snapshot(number):
                runner._pending.append(message)
                runners[runner] = None
        if self._claim.locked():
            self._claim.release()
        for runner in runners:
            runner._dropped(None, dispatcher)


class CoroutineRunner(LoopRunner):
    """Runs a coroutine handler on its event loop, one message at a time, in order.

    Handed each message of the subscription on a routing thread (``handoff()``); never
    blocks. ``errors`` counts what the handler raised; ``lost`` counts messages that
    could not be handled because the loop closed or cancelled the drain task (each is
    logged).
    """

    __slots__ = ('channel', 'handler', 'loop', 'on_error', 'subscription', 'errors',
                 'lost', 'orphaned', 'dead', 'previous', 'dispatcher', 'group', '_pending',
                 '_claim', '_task', '__weakref__')

    def __init__(self, channel: Channel, handler: Callable[[Message], Any],
                 loop: asyncio.AbstractEventLoop, on_error: ErrorCallback | None) -> None:
        self.channel = channel
        self.handler = handler
        self.loop = loop
        self.on_error = on_error
        self.subscription: tuple | None = None   # set by the runtime once it exists
        self.errors = 0
        self.lost = 0
        self.orphaned = False        # inherited by a forked child: its loop runs elsewhere
        self.dead = False            # its loop closed: it unsubscribed
        # the channel's runner before this one, whose last call may still be running
        self.previous: weakref.ref[CoroutineRunner] | None = None
        self._pending: deque[Message] = deque()
        # Held while a drain task is scheduled or running; taken and released only with
        # non-blocking acquires (as a Mailbox's claim), so the routing thread never waits
        # for the loop's thread, nor contends with it for a lock.
        self._claim = threading.Lock()
        self.group: LoopGroup | None = None        # its loop's group on its topic
        self._task: asyncio.Task | None = None
        self.dispatcher = dispatcher_of(loop)
        self.dispatcher.register(self)
        with _runners_lock:
            _runners.add(self)

    def __repr__(self) -> str:
        return (f'<CoroutineRunner {self.handler!r} topic={self.channel.topic!r} '
                f'pending={len(self._pending)}>')

    def attach(self, subscription: tuple) -> LoopGroup:
        """Become the runner of *subscription*, now the channel's, and join the group of
        its loop and topic; return the group, which the index holds for all of them (the
        runtime calls this, holding the registry's lock)."""
        self.subscription = subscription
        key = (self.loop, self.channel.topic)
        with _runners_lock:
            previous = _latest.get(id(self.channel))
            _latest[id(self.channel)] = self
            group = _groups.get(key)
            if group is None or group.dispatcher is not self.dispatcher:
                group = _groups[key] = LoopGroup(self.dispatcher, self.channel.topic)
            group.join(self)
            self.group = group
        self.previous = None if previous is None else weakref.ref(previous)
        return group

    def detach(self) -> LoopGroup | None:
        """Leave the group (the runtime calls this when the channel unsubscribes, holding
        the registry's lock); the group if it is left empty, to take out of the index."""
        key = (self.loop, self.channel.topic)
        with _runners_lock:
            group = _groups.get(key)
            if group is None or not group.leave(self):
                return None       # not a member
            if group._runners:
                return None
            del _groups[key]
            return group

    @property
    def idle(self) -> bool:
        """True when no message waits for or runs in the handler."""
        return not self._draining

    @property
    def _draining(self) -> bool:
        """A drain task is scheduled or running, or its group has a message for it."""
        group = self.group
        return self._claim.locked() or (group is not None and group._claim.locked())

    def backlog(self) -> int:
        """Messages waiting for or running in the handler (approximate)."""
        return len(self._pending) + (self._task is not None)

    def handoff(self, message: Message) -> None:
        """Queue *message* for the handler; start a drain task unless one runs (any
        thread: the routing thread, or a task worker's)."""
        if self.orphaned:
            self._pending.append(message)
            self._give_up('the subscription was inherited from the parent process, whose '
                          'event loop runs its handler; subscribe again in this process')
            return
        pending = self._pending
        pending.append(message)
        if self._claim.acquire(False):
            self.dispatcher.put(self, None)      # the loop calls _arrive: start a drain
        elif not len(pending) % 1024 and self.loop.is_closed():
            self._close_down()                   # the drain that holds it will never run

    __call__ = handoff

    def _arrive(self, item: None) -> None:
        self._start()

    def _take(self, message: Message) -> None:
        """On the loop: queue *message*, and start a drain unless one runs."""
        self._pending.append(message)
        if self._claim.acquire(False):
            self._start()

    def _dropped(self, item: None, dispatcher: LoopDispatcher) -> None:
        if dispatcher.orphaned:
            self._give_up('the subscription was inherited from the parent process, whose '
                          'event loop runs its handler; subscribe again in this process')
        else:
            self._close_down()

    def loop_closed(self) -> None:
        """The loop is closed: give up what waits, and unsubscribe (once)."""
        self._close_down()

    def _close_down(self) -> None:
        """The loop has closed: give up what waits, and unsubscribe (once)."""
        self._give_up('its event loop is closed')
        if not self.dead:
            self.dead = True
            logger.warning('unsubscribing %r: the event loop of its coroutine handler %r '
                           'is closed', self.channel, self.handler)
            if self.channel._subscription is self.subscription:
                self.channel.unsubscribe()

    def _start(self) -> None:
        if not self._claim.locked():
            return                # given up meanwhile (its loop closed)
        task = self.loop.create_task(self._drain(), name=f'channels handler '
                                                        f'{self.channel.topic}')
        task.add_done_callback(self._drained)
        self._task = task

    def _drained(self, task: asyncio.Task) -> None:
        # Runs however the task ended, even if it was cancelled before its first step
        # (asyncio.run's final cancellation does that), so the runner never stays busy.
        if self._task is task:        # not a later drain's, started before this callback
            self._task = None
        if task.cancelled():
            self._give_up('the event loop cancelled the task that runs the handler '
                          '(is the loop shutting down?)')
        elif task.exception() is not None:      # not expected: the drain catches errors
            logger.error('the task running %r ended with an error', self.handler,
                         exc_info=task.exception())
            self._give_up('the task running the handler failed')

    def _give_up(self, why: str) -> None:
        lost = len(self._pending)
        self._pending.clear()
        if self._claim.locked():
            self._claim.release()
        if lost:
            self.lost += lost
            logger.warning('%d messages for %r were not handled: %s', lost, self.channel, why)

    async def _drain(self) -> None:
        previous = self.previous and self.previous()
        self.previous = None
        if previous is not None:
            task = previous._task
            if task is not None and previous.loop is self.loop and not task.done():
                # an earlier subscription's call is still running: one call at a time
                await asyncio.wait([task])
        pending, claim, channel = self._pending, self._claim, self.channel
        popleft = pending.popleft
        while True:
            try:
                message = popleft()   # only this task takes
            except IndexError:
                # Let go, then look again: a message appended before the release is seen
                # here; one appended after it takes the claim itself and starts a drain.
                claim.release()
                if pending and claim.acquire(False):
                    continue
                return
            if self.subscription is not channel._subscription:
                continue              # unsubscribed: no new call starts
            if message.deadline is not None and message.is_expired():
                message.drop()
                continue
            message = message.copy()      # the handler's own (see LoopRunner.handoff)
            try:
                await self.handler(message)
            except asyncio.CancelledError as error:
                if asyncio.current_task().cancelling():
                    raise             # this drain task is being cancelled
                self.errors += 1      # the handler's own: an error like any other
                _report(error, self.handler, message, self.on_error, 'on its event loop')
            except GeneratorExit:
                raise                 # the task is being destroyed
            except BaseException as error:   # as a task worker does: the channel goes on
                self.errors += 1
                _report(error, self.handler, message, self.on_error, 'on its event loop')


def _after_fork_in_child() -> None:
    # The child has the parent's subscriptions but not its running loops: their handlers
    # cannot run here, and what arrives for them is counted lost and logged.
    global _runners_lock
    _runners_lock = threading.Lock()
    _latest.clear()
    for runner in list(_runners):
        runner.orphaned = True
        runner._claim = threading.Lock()
        runner._pending.clear()
    for group in list(_groups.values()):
        # a batch pending for the parent's loop at the fork left the claim held: what
        # reached the group here would wait behind it for ever, uncounted, and keep its
        # members busy for shutdown
        group._claim = threading.Lock()
        group._queue.clear()
    for dispatcher in list(_dispatchers):
        dispatcher.orphaned = True
        dispatcher._pending.clear()
        dispatcher._scheduled = dispatcher._running = False


os.register_at_fork(after_in_child=_after_fork_in_child)


def busy_coroutine_runners() -> tuple[list[Any], list[Any]]:
    """The runners and dispatchers with work left: those that can make progress while the
    caller waits, and those that cannot (their loop is the caller's own, or is not
    running).

    The dispatchers are asked first: what one delivers to a runner makes the runner
    busy before the dispatcher is idle, so nothing in between is missed. A dispatcher
    of a closed loop drops what waited and unsubscribes its runners (see
    :class:`LoopDispatcher`), outside the lock that subscribing takes too.
    """
    try:
        own_loop = asyncio.get_running_loop()
    except RuntimeError:
        own_loop = None
    with _runners_lock:
        dispatchers = list(_dispatchers)
    busy: list[Any] = [dispatcher for dispatcher in dispatchers if not dispatcher.idle]
    with _runners_lock:
        runners = list(_runners)
    busy += [runner for runner in runners if not runner.idle]
    movable, stuck = [], []
    for runner in busy:
        if runner.loop is not own_loop and runner.loop.is_running():
            movable.append(runner)
        else:
            stuck.append(runner)
    return movable, stuck


def coroutine_runners_idle() -> bool:
    """True when every coroutine handler that can make progress has nothing left to do.

    Runners whose loop is not running, or is the caller's own loop (which cannot run
    while its thread waits here), do not count: waiting for them could never end.
    """
    return not busy_coroutine_runners()[0]


def backlog(runners: list[Any]) -> int:
    """Messages waiting for or running in the handlers of *runners*, or in dispatchers
    (as :func:`busy_coroutine_runners` returns them; approximate)."""
    return sum(runner.backlog() for runner in runners)


def unawaited(handler: Any, result: Any, message: Message) -> bool:
    """Log and close *result* if a plain *handler* returned a coroutine; True if it did.

    Such a handler's work would never run (a wrapper around an ``async def`` that is
    not itself one, or a lambda calling one).
    """
    if not inspect.iscoroutine(result):
        return False
    result.close()
    logger.error('%r returned a coroutine for %r, which was never awaited: subscribe the '
                 'async def itself, make the wrapper async def, or mark it with '
                 'inspect.markcoroutinefunction (3.12+)', handler, message)
    return True
