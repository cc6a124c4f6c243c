"""How a subscription calls its handler: directly, guarded by an error callback, or as a
coroutine on its event loop.

A subscription is stored on its channel as the tuple ``(runner, handler)``: task worker
threads call ``runner(message)``; ``handler`` is what the user subscribed. For a plain
function without an error callback the runner is the handler itself, so the common case
costs nothing extra.

A coroutine function never runs on a task worker thread. Its runner, a
:class:`CoroutineRunner`, appends the message to the subscription's own queue and, when
no drain task is running, starts one on the subscription's event loop with
``call_soon_threadsafe``; the drain task awaits one handler call after another. So the
next message of a channel is not started before the previous coroutine finished, and a
task worker thread never waits for an event loop.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
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

__all__ = ['ErrorCallback', 'CoroutineRunner', 'GuardedHandler', 'is_coroutine_handler',
           'check_error_callback', 'make_runner', 'coroutine_runners_idle', 'busy_coroutine_runners', 'backlog']

logger = logging.getLogger(__name__)

ErrorCallback = Callable[[BaseException, 'Message'], Any]
"""``on_error(error, message)``: called with what a handler raised and the message it was
handling, instead of only logging it."""

_runners: weakref.WeakSet[CoroutineRunner] = weakref.WeakSet()
_runners_lock = threading.Lock()
# id(channel) -> its latest coroutine runner, while that runner lives (it holds the
# channel, so the id cannot be reused meanwhile)
_latest: weakref.WeakValueDictionary[int, CoroutineRunner] = weakref.WeakValueDictionary()


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


class CoroutineRunner:
    """Runs a coroutine handler on its event loop, one message at a time, in order.

    Called on a task worker thread with each message of the subscription; never blocks.
    ``errors`` counts what the handler raised; ``lost`` counts messages that could not
    be handled because the loop closed or cancelled the drain task (each is logged).
    """

    __slots__ = ('channel', 'handler', 'loop', 'on_error', 'subscription', 'errors',
                 'lost', 'orphaned', 'dead', 'previous', '_pending', '_lock', '_draining',
                 '_task', '__weakref__')

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
        self._lock = threading.Lock()
        self._draining = False       # a drain task is scheduled or running
        self._task: asyncio.Task | None = None
        with _runners_lock:
            _runners.add(self)

    def __repr__(self) -> str:
        return (f'<CoroutineRunner {self.handler!r} topic={self.channel.topic!r} '
                f'pending={len(self._pending)}>')

    def attach(self, subscription: tuple) -> None:
        """Become the runner of *subscription*, now the channel's (the runtime calls this)."""
        self.subscription = subscription
        with _runners_lock:
            previous = _latest.get(id(self.channel))
            _latest[id(self.channel)] = self
        self.previous = None if previous is None else weakref.ref(previous)

    @property
    def idle(self) -> bool:
        """True when no message waits for or runs in the handler."""
        return not self._draining

    def __call__(self, message: Message) -> None:
        if self.orphaned:
            self._pending.append(message)
            self._give_up('the subscription was inherited from the parent process, whose '
                          'event loop runs its handler; subscribe again in this process')
            return
        with self._lock:
            self._pending.append(message)
            if self._draining and not self.loop.is_closed():
                return
            self._draining = True
        try:
            self.loop.call_soon_threadsafe(self._start)
        except RuntimeError:         # the loop is closed: nothing can run the handler
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
        task = self.loop.create_task(self._drain(), name=f'channels handler '
                                                        f'{self.channel.topic}')
        task.add_done_callback(self._drained)
        self._task = task

    def _drained(self, task: asyncio.Task) -> None:
        # Runs however the task ended, even if it was cancelled before its first step
        # (asyncio.run's final cancellation does that), so the runner never stays busy.
        self._task = None
        if task.cancelled():
            self._give_up('the event loop cancelled the task that runs the handler '
                          '(is the loop shutting down?)')
        elif task.exception() is not None:      # not expected: the drain catches errors
            logger.error('the task running %r ended with an error', self.handler,
                         exc_info=task.exception())
            self._give_up('the task running the handler failed')

    def _give_up(self, why: str) -> None:
        with self._lock:
            lost = len(self._pending)
            self._pending.clear()
            self._draining = False
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
        pending, lock, channel = self._pending, self._lock, self.channel
        while True:
            with lock:
                if not pending:
                    self._draining = False
                    return
                message = pending.popleft()
            if self.subscription is not channel._subscription:
                continue              # unsubscribed: no new call starts
            if message.deadline is not None and message.is_expired():
                message.drop()
                continue
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
        runner._lock = threading.Lock()
        runner._draining = False
        runner._pending.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def busy_coroutine_runners() -> tuple[list[CoroutineRunner], list[CoroutineRunner]]:
    """The runners with work left: those that can make progress while the caller waits,
    and those that cannot (their loop is the caller's own, or is not running)."""
    try:
        own_loop = asyncio.get_running_loop()
    except RuntimeError:
        own_loop = None
    with _runners_lock:
        runners = [runner for runner in _runners if not runner.idle]
    movable, stuck = [], []
    for runner in runners:
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


def backlog(runners: list[CoroutineRunner]) -> int:
    """Messages waiting for or running in the handlers of *runners* (approximate)."""
    return sum(len(runner._pending) + (runner._task is not None) for runner in runners)


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
