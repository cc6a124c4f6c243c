"""The process's machinery: lazy start, the queues, scheduling, shutdown, fork safety.

::

    Channel.send() --put--> messages --> MessageBroker thread(s): get_channels(topic),
                                           schedule_task(channel, message)
                                                  |
                     per-channel mailboxes <------+   a channel with pending tasks
                            |                         sits once in `ready`
                            v
                          ready --> TaskWorker thread(s): one channel at a time each

:class:`Runtime` is the one per process: it owns the registry of subscribed channels,
which lives as long as the process, and the current :class:`Machinery`, which lives from
the first use after a start to ``shutdown()``. Every start builds a new ``Machinery``
from the settings of that moment, so a restart shares nothing with the run before it,
not even with a thread that a handler which never returns still holds.

Shutdown is an ordered protocol: refuse new sends -> mark workers not running (so
droppable work is dropped) -> wait until every message and task is settled or the
timeout passes -> one sentinel per thread -> join with the time left -> release.

``flush()`` is a fence: it waits until this process's brokers have routed the local
messages sent before it and, with a broker, until the broker has applied (routed)
every SUB, UNSUB and message this process sent before it (a FENCE frame behind them,
see :mod:`channels.client`). ``fence_async()`` is its form for event loops, which
``listen()`` awaits (for the subscriptions only).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any

from . import settings
from .client import BrokerLink
from .connection import load_authkey, parse_address
from .errors import ConfigurationError, ShutdownError, SubscriptionLimitError
from .handlers import (CoroutineRunner, LoopRunner, backlog as handler_backlog,
                       busy_coroutine_runners, coroutine_runners_idle, make_runner)
from .message import Message
from .ordering import STOP, Mailbox, Sequencer
from .prefork import prefork_server
from .registry import registry as _registry
from .topics import TopicIndex, is_pattern, is_unanchored, too_long
from .wire import INTERNAL_PREFIX as _INTERNAL

if TYPE_CHECKING:
    from .channel import Channel
    from .workers import Worker

__all__ = ['Runtime', 'Machinery', 'runtime', 'SUBSCRIBE_TOPIC', 'UNSUBSCRIBE_TOPIC',
           'FLUSH_TIMEOUT']

logger = logging.getLogger(__name__)

SUBSCRIBE_TOPIC = 'lona.channels.subscribe'
UNSUBSCRIBE_TOPIC = 'lona.channels.unsubscribe'

RUNNING, DRAINING, STOPPING = 'running', 'draining', 'stopping'

FLUSH_TIMEOUT = 10.0
"""Seconds ``flush()`` and entering ``listen()`` wait by default: enough for a broker
restart, including its hold of ``REJOIN_TIMEOUT`` (5 s by default)."""


class Machinery:
    """The queues and threads of one run, from start to ``shutdown()``.

    The hot path takes no lock that two of its threads contend for (under the GIL a
    contended lock turns every later acquire into a context switch): the queues are
    ``SimpleQueue``s, a mailbox is claimed with a non-blocking acquire, and each thread
    counts its own work. Only senders share ``send_lock``, which makes "not shutting
    down" and "counted" one step.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.send_lock = threading.Lock()
        self.box_lock = threading.Lock()      # creating mailboxes (once per channel and run)
        self.state = RUNNING
        self.submitted = 0                    # messages accepted by submit()
        self.messages: SimpleQueue = SimpleQueue()
        self.ready: SimpleQueue = SimpleQueue()
        self.brokers: list[Worker] = []
        self.task_workers: list[Worker] = []
        self.schedulers: list[Any] = []       # objects with a `scheduled` count: brokers, ...
        self.sequencer: Sequencer | None = None
        self.readers_run_handlers = False
        self.link: BrokerLink | None = None   # the broker connection, in broker mode
        self.max_topic_length: int = settings.get('MAX_TOPIC_LENGTH')
        self.max_subscriptions: int = settings.get('MAX_SUBSCRIPTIONS')
        self.max_unanchored: int = settings.get('MAX_UNANCHORED_PATTERNS')
        self.max_patterns: int = settings.get('MAX_PATTERNS')

    def __repr__(self) -> str:
        return (f'<Machinery {self.state} brokers={len(self.brokers)} '
                f'task_workers={len(self.task_workers)} submitted={self.submitted}>')

    def start(self) -> None:
        """Read the settings, then create and start the worker threads (and the link)."""
        broker_class = settings.get('CHANNEL_MESSAGE_BROKER_CLASS')
        task_class = settings.get('CHANNEL_TASK_WORKER_CLASS')
        brokers = settings.get('MAX_CHANNEL_MESSAGE_BROKER_THREADS')
        tasks = settings.get('MAX_CHANNEL_TASK_WORKER_THREADS')
        timeout = settings.get('CHANNEL_WORKER_TIMEOUT')
        if brokers > 1:
            self.sequencer = Sequencer(STOP)
        self.brokers = [broker_class(self, n, timeout) for n in range(brokers)]
        self.task_workers = [task_class(self, n, timeout) for n in range(tasks)]
        self.schedulers = list(self.brokers)
        # the broker link's reader may run a handler itself where the task workers are
        # ours: a custom TaskWorker's run() decides how handlers run, so it runs them all
        from .workers import TaskWorker
        self.readers_run_handlers = bool(self.task_workers) and all(
            type(worker) is TaskWorker for worker in self.task_workers)
        address = settings.get('BROKER_ADDRESS')
        if address is not None:
            parsed, authkey = parse_address(address), load_authkey()
            if isinstance(parsed, tuple) and authkey is None:
                raise ConfigurationError(
                    f'BROKER_ADDRESS {address!r} is TCP, which requires an authkey: set '
                    f'CHANNELS_AUTHKEY or CHANNELS_AUTHKEY_FILE to the broker\'s')
            self.link = BrokerLink(self, parsed, authkey,
                                   max_buffer=settings.get('MAX_BUFFER_BYTES'),
                                   max_frame=settings.get('MAX_FRAME_BYTES'),
                                   max_pending_tasks=settings.get('MAX_PENDING_TASKS'),
                                   handshake_timeout=settings.get('HANDSHAKE_TIMEOUT'))
        elif Runtime.told_embedded != os.getpid():
            Runtime.told_embedded = os.getpid()     # a forked child tells on its own
            server = prefork_server()
            if server is not None:
                logger.warning(
                    'no broker is configured (CHANNELS_BROKER_ADDRESS is unset), and this '
                    'process (pid %d) is a worker of %s: every worker has channels of its '
                    'own, and a message reaches only the channels of the worker that sent '
                    "it. Run the server under 'channels-broker -- <command>' to reach "
                    'every worker.', os.getpid(), server)
            else:
                logger.info('no broker is configured (CHANNELS_BROKER_ADDRESS is unset): '
                            'messages reach the channels of this process only. To reach '
                            "every worker process, run the server under 'channels-broker "
                            "-- <command>'.")
        for worker in self.workers:
            worker.start()
        if self.link is not None:
            self.link.start()
        logger.debug('started %d broker and %d task worker threads%s', brokers, tasks,
                     f' for the broker on {self.link.address_text}' if self.link else '')

    def is_running(self) -> bool:
        """False once shutdown has begun (droppable messages are dropped then)."""
        return self.state is RUNNING

    def runs_handlers_here(self) -> bool:
        """True on a thread of this run that runs plain handlers: a worker's, or the
        broker link's reader (which may run one itself)."""
        current = threading.current_thread()
        if current in {w.thread for w in self.workers}:
            return True
        return self.link is not None and current in self.link.threads

    @property
    def workers(self) -> list[Worker]:
        """Every worker of this run, brokers first."""
        return self.brokers + self.task_workers

    # the hot path ----------------------------------------------------------------------

    def submit(self, message: Message) -> None:
        """Accept *message*: local ones go to this process's brokers, others to the broker.
        One that has expired already is dropped here, in either mode."""
        with self.send_lock:
            if self.state is not RUNNING:
                raise ShutdownError(
                    f'cannot send {message!r}: channels is shutting down. Messages are '
                    f'accepted again once channels.shutdown() has returned.')
            if message.deadline is not None and message.is_expired():
                message.drop()
                logger.debug('dropped %r at send(): it had expired', message)
                return
            # internal topics (lona.channels.*) are local to each process in any mode
            if self.link is None or message.local or message.topic.startswith(_INTERNAL):
                self.submitted += 1
                self.messages.put(message)
            else:
                self.link.put_message(message)

    def schedule(self, channel: Channel, message: Message, copy: bool = True,
                 keep: bool = False) -> bool | Mailbox:
        """Queue a task of *channel* with a copy of *message* (or *message* itself, if
        nobody else holds it); False if no task was queued: the channel is not
        subscribed, or its subscription runs on an event loop (a coroutine handler, an
        inbox), which is handed *message* now instead (``LoopRunner.handoff``, which
        copies it where its handler takes it; shutdown waits for the loops' runners as it
        does for tasks). With *keep*, a mailbox this call claims is returned instead of
        put into the ready queue: the caller runs it (``workers.run_mailbox``) or puts
        it there."""
        subscription = channel._subscription
        if subscription is None:
            return False
        runner = subscription[0]
        if isinstance(runner, LoopRunner):
            runner.handoff(message)
            return False
        box = channel._mailbox
        if box is None or box.machinery is not self:
            box = self._mailbox_of(channel)
        box.tasks.append((message.copy() if copy else message, subscription))
        if box.claim.acquire(False):
            if keep:
                return box
            self.ready.put(box)
        return True

    def _mailbox_of(self, channel: Channel) -> Any:
        with self.box_lock:
            box = channel._mailbox
            if box is None or box.machinery is not self:
                box = channel._mailbox = Mailbox(self, channel)
            return box

    # flush -----------------------------------------------------------------------------

    def _check_flush_thread(self) -> None:
        if self.runs_handlers_here():
            raise RuntimeError('channels.flush() was called from a channels worker thread '
                               '(a handler); it would hold up the delivery it waits for. '
                               'Call it from another thread, or in a coroutine handler '
                               'await channels.flush_async().')

    def _fence(self, callback: Callable[[bool], None]) -> int | None:
        """Ask the broker for a fence (None without one); ShutdownError while stopping."""
        if self.state is not RUNNING:
            raise ShutdownError('cannot flush: channels is shutting down (shutdown() waits '
                                'for the broker itself)')
        if self.link is None:
            return None
        try:
            return self.link.fence(callback)
        except RuntimeError as exc:          # closed between the check and the fence
            raise ShutdownError(f'cannot flush: channels is shutting down ({exc})') from None

    def _unrouted(self, mark: int) -> int:
        """How many of the first *mark* local messages are not routed yet (about)."""
        return max(mark - sum(broker.routed for broker in self.brokers), 0)

    def _not_answered(self, what: str, timeout: float) -> None:
        link = self.link
        if link is None:
            logger.warning('channels.flush(): %s within %.3gs', what, timeout)
        elif link.closing:
            logger.warning('channels.flush(): channels shut down before the broker on %s '
                           'answered', link.address_text)
        elif not link.connected.is_set():
            why = link.last_failure or f'is it running at {link.address_text}?'
            logger.warning('channels.flush(): not connected to the broker on %s (%s); no '
                           'answer within %.3gs', link.address_text, why, timeout)
        else:
            logger.warning('channels.flush(): the broker on %s did not answer within %.3gs '
                           '(it is busy, or holds messages back after a restart for up to '
                           'REJOIN_TIMEOUT)', link.address_text, timeout)

    def flush(self, timeout: float) -> bool:
        """See :func:`channels.flush`."""
        self._check_flush_thread()
        deadline = time.monotonic() + timeout
        mark = self.submitted
        answer = threading.Event()
        results: list[bool] = []

        def answered(ok: bool) -> None:
            results.append(ok)
            answer.set()
        token = self._fence(answered)
        try:
            if not _poll(lambda: not self._unrouted(mark), deadline):
                self._not_answered(f'{self._unrouted(mark)} local messages were not '
                                   f'routed', timeout)
                return False
            if token is None:
                return True
            if answer.wait(max(deadline - time.monotonic(), 0)) and results[0]:
                return True
        finally:
            if token is not None:
                self.link.forget_fence(token)
        self._not_answered('the fence was not answered', timeout)
        return False

    async def fence_async(self, timeout: float, local: bool) -> bool:
        """See :func:`channels.flush_async`; with *local* False, only the broker's part
        (no broker: True at once, without yielding to the loop)."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        mark = self.submitted
        future = loop.create_future()

        def answered(ok: bool) -> None:
            try:
                loop.call_soon_threadsafe(_resolve, future, ok)
            except RuntimeError:             # the loop has closed: nobody waits
                pass
        token = self._fence(answered)
        try:
            if local:
                delay = 0.0002
                while self._unrouted(mark):
                    if time.monotonic() >= deadline:
                        self._not_answered(f'{self._unrouted(mark)} local messages were '
                                           f'not routed', timeout)
                        return False
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.01)
            if token is None:
                return True
            try:
                if await asyncio.wait_for(future, max(deadline - time.monotonic(), 0)):
                    return True
            except TimeoutError:
                pass
        finally:
            if token is not None:
                self.link.forget_fence(token)
        self._not_answered('the fence was not answered', timeout)
        return False

    # shutdown --------------------------------------------------------------------------

    def _routed(self) -> bool:
        return sum(broker.routed for broker in self.brokers) >= self.submitted

    def backlog(self) -> int:
        """Tasks scheduled and not yet run (read without a lock: approximate)."""
        return sum(s.scheduled for s in self.schedulers) \
            - sum(w.settled for w in self.task_workers)

    def _settled(self) -> bool:
        scheduled = sum(scheduler.scheduled for scheduler in self.schedulers)
        return sum(worker.settled for worker in self.task_workers) >= scheduled

    def stop(self, timeout: float) -> bool:
        """Drain and stop (see the module docstring); True if all went in time."""
        deadline = time.monotonic() + timeout
        with self.send_lock:
            self.state = DRAINING
        for worker in self.workers:
            worker.running = False
        # Once every accepted message is routed no task can be added, so the scheduled
        # counts are final before the settled counts are compared with them. In broker
        # mode, a PING/PONG barrier first brings back what this process sent.
        drained = _poll(self._routed, deadline)
        link = self.link
        if link is not None:
            flushed = link.flush(deadline)
            link.stop_accepting()
            if not flushed:
                logger.warning('shutdown: the broker on %s did not confirm within %.3gs that it '
                               'routed what this process sent (%d bytes still buffered)',
                               link.address_text, timeout, link.buffered_bytes)
            drained = drained and flushed
        drained = _poll(self._settled, deadline) and drained
        # coroutine handlers run on their event loops, after their task has settled here
        drained = _poll(coroutine_runners_idle, deadline) and drained
        self.state = STOPPING
        if not drained:
            left = self.submitted - sum(broker.routed for broker in self.brokers)
            tasks = sum(s.scheduled for s in self.schedulers) \
                - sum(w.settled for w in self.task_workers)
            if left or tasks:
                logger.warning('shutdown: %d messages and %d tasks were not handled within '
                               '%.3gs; they are lost', left, tasks, timeout)
        movable, stuck = busy_coroutine_runners()
        if movable:
            logger.warning('shutdown: coroutine handlers did not finish %d messages within '
                           '%.3gs; they go on running on their event loops',
                           handler_backlog(movable), timeout)
        if stuck:
            drained = False
            logger.warning('shutdown: %d messages wait for coroutine handlers on an event '
                           'loop that is not running or is the one calling shutdown(); '
                           'they run once that loop runs again', handler_backlog(stuck))
        for worker in self.workers:
            worker.stop()
        for _ in self.brokers:
            self.messages.put(STOP)
        for _ in self.task_workers:
            self.ready.put(STOP)
        stuck = [worker.name for worker in self.workers
                 if not worker.join(max(deadline - time.monotonic(), 0.05))]
        if link is not None and not link.close(deadline):
            drained = False
            logger.warning('shutdown: threads %s did not stop within %.3gs; the link is %s',
                           [t.name for t in link.threads if t.is_alive()], timeout,
                           link.state)
        if stuck:
            logger.warning('shutdown: threads %s did not stop within %.3gs (a handler that '
                           'does not return?); each ends once its handler returns',
                           stuck, timeout)
        return drained and not stuck


def _resolve(future: asyncio.Future, value: bool) -> None:
    if not future.done():
        future.set_result(value)


def _check_timeout(timeout: object) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not 0 <= timeout < float('inf'):
        raise ValueError(f'timeout must be a finite number of seconds >= 0, got {timeout!r}')


def _poll(predicate: Callable[[], bool], deadline: float) -> bool:
    """Wait until *predicate()* or *deadline*; polls, as the counters have no waiters."""
    delay = 0.0002
    while not predicate():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.01)
    return True


class Runtime:
    """The channels machinery of this process: registry, lazy start, shutdown."""

    told_embedded: int | bool = False
    """The pid that logged the line about the embedded default (once per process)."""

    def __init__(self) -> None:
        self.state_lock = threading.RLock()
        self.machinery: Machinery | None = None
        self.unanchored = 0     # distinct subscribed topics that topics.is_unanchored
        self.patterns = 0       # distinct subscribed topics that topics.is_pattern
        self._atexit_registered = False
        self._finalized_pid = 0
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f'<Runtime pid={self._pid} channels={len(self.registry)} {self.machinery!r}>'

    @property
    def registry(self) -> TopicIndex[Channel]:
        """The subscribed channels of this process (``channels.registry``'s index)."""
        return _registry.index

    @property
    def registry_lock(self) -> Any:
        """Held while a subscription changes."""
        return _registry.lock

    def is_running(self) -> bool:
        """True from the first use until ``shutdown()`` returns."""
        return self.machinery is not None

    # lifecycle ------------------------------------------------------------------------

    def max_topic_length(self) -> int:
        """``MAX_TOPIC_LENGTH``: as the running machinery read it, else as set now."""
        machinery = self.machinery
        return machinery.max_topic_length if machinery is not None \
            else settings.get('MAX_TOPIC_LENGTH')

    def ensure_running(self) -> Machinery:
        """The current machinery, started from the settings if it is not running."""
        machinery = self.machinery
        if machinery is not None:
            return machinery
        with self.state_lock:
            if self.machinery is None:
                machinery = Machinery(self)
                machinery.start()
                self.machinery = machinery
                if not self._atexit_registered:
                    atexit.register(self._shutdown_at_exit)
                    self._atexit_registered = True
                self._finalize_in_multiprocessing_child()
            return self.machinery

    def _finalize_in_multiprocessing_child(self) -> None:
        """A child started by multiprocessing ends with os._exit() after running its
        finalizers, not atexit: register one there, once per process."""
        util = sys.modules.get('multiprocessing.util')
        process = sys.modules.get('multiprocessing.process')
        if util is None or process is None or self._finalized_pid == os.getpid():
            return
        if process.current_process().name == 'MainProcess':
            return
        util.Finalize(self, Runtime._shutdown_at_exit, args=(self,), exitpriority=100)
        self._finalized_pid = os.getpid()

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Drain and stop; True if everything was handled and every thread stopped in time."""
        _check_timeout(timeout)
        with self.state_lock:
            machinery = self.machinery
            if machinery is None:
                return True
            if machinery.runs_handlers_here():
                raise RuntimeError('channels.shutdown() was called from a channels worker '
                                   'thread (a handler); it would wait for itself. Call it '
                                   'from another thread.')
            try:
                return machinery.stop(timeout)
            finally:
                self.machinery = None

    def _flushable(self) -> Machinery | None:
        """The machinery to flush; None if there is nothing to flush (it never ran, or
        it stopped and no channel is subscribed: nothing is sent nor subscribed)."""
        machinery = self.machinery
        if machinery is None and len(self.registry):
            machinery = self.ensure_running()     # their SUBs go out as it connects
        return machinery

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """See :func:`channels.flush`."""
        _check_timeout(timeout)
        machinery = self._flushable()
        return True if machinery is None else machinery.flush(timeout)

    async def fence_async(self, timeout: float = FLUSH_TIMEOUT, local: bool = True) -> bool:
        """See :func:`channels.flush_async` (*local*: also wait for local routing)."""
        _check_timeout(timeout)
        machinery = self._flushable()
        return True if machinery is None else await machinery.fence_async(timeout, local)

    def _shutdown_at_exit(self) -> None:
        # Also in a forked child, for its own machinery. multiprocessing's children end
        # with os._exit(), which skips atexit: they get a Finalize (see ensure_running).
        if self.machinery is not None:
            self.shutdown(settings.get('CHANNEL_SHUTDOWN_TIMEOUT'))

    def _before_fork(self) -> None:
        self.registry_lock.acquire()

    def _after_fork_in_parent(self) -> None:
        self.registry_lock.release()

    def _after_fork_in_child(self) -> None:
        # The child inherits the subscriptions, not the threads, queues, locks or
        # connection: it closes its copy of the parent's socket (the parent's stays open)
        # and, in broker mode, connects on its own at once, so that inherited
        # subscriptions (gunicorn --preload) reach the broker without waiting for a send.
        _registry.reset_lock()
        self.state_lock = threading.RLock()
        inherited, self.machinery = self.machinery, None
        self._pid = os.getpid()
        if inherited is not None and inherited.link is not None:
            inherited.link.abandon()
        if len(self.registry):
            try:
                if settings.get('BROKER_ADDRESS') is not None:
                    self.ensure_running()
            except Exception:
                logger.exception('could not start channels in the forked child %d', self._pid)

    # channels ---------------------------------------------------------------------------

    def subscribe(self, channel: Channel, handler: Callable[[Message], Any],
                  loop: Any = None, on_error: Any = None) -> None:
        """Register *channel* with *handler*; RuntimeError if it is subscribed already.

        *loop* and *on_error* are those of :meth:`Channel.subscribe`.
        """
        runner = make_runner(channel, handler, loop, on_error)
        machinery = self.machinery or self.ensure_running()
        topic = channel.topic
        if channel._size > machinery.max_topic_length:    # the limit changed since Channel()
            raise ValueError(too_long(topic, machinery.max_topic_length))
        with self.registry_lock:
            if channel._subscription is not None:
                raise RuntimeError(f'{channel!r} is already subscribed; call unsubscribe() '
                                   f'before subscribing it again')
            if len(self.registry) >= machinery.max_subscriptions \
                    and topic not in self.registry:
                raise SubscriptionLimitError(
                    f'cannot subscribe {channel!r}: this process subscribes '
                    f'{len(self.registry)} distinct topics, and MAX_SUBSCRIPTIONS is '
                    f'{machinery.max_subscriptions}. Unsubscribe channels you no longer '
                    f'need, or raise the setting (in every process and the broker)')
            pattern = is_pattern(topic) and topic not in self.registry
            if pattern and self.patterns >= machinery.max_patterns:
                raise SubscriptionLimitError(
                    f'cannot subscribe {channel!r}: this process subscribes '
                    f'{self.patterns} patterns, and MAX_PATTERNS is '
                    f'{machinery.max_patterns}. Unsubscribe patterns you no longer need, '
                    f'subscribe plain topics, or raise the setting (in every process and the '
                    f'broker)')
            unanchored = pattern and is_unanchored(topic)
            if unanchored and self.unanchored >= machinery.max_unanchored:
                raise SubscriptionLimitError(
                    f'cannot subscribe {channel!r}: this process subscribes '
                    f'{self.unanchored} patterns with neither a literal prefix nor a literal '
                    f'suffix, each tried for every message, and MAX_UNANCHORED_PATTERNS is '
                    f'{machinery.max_unanchored}. Give the pattern a literal start or end '
                    f"('chat.*', '*.created'), or raise the setting (in every process and "
                    f'the broker)')
            self.unanchored += unanchored
            self.patterns += pattern
            # a new tuple per subscription: tasks of an earlier one are told apart and dropped
            subscription = (runner, handler)
            entry: Any = channel        # what the index holds: the channel, or its group
            if isinstance(runner, CoroutineRunner):
                entry = runner.attach(subscription)
            channel._subscription = subscription
            if self.registry.add(channel.topic, entry) and machinery.link is not None:
                machinery.link.subscribe(channel.topic)
        self._send_event(machinery, SUBSCRIBE_TOPIC, channel.topic)

    def unsubscribe(self, channel: Channel) -> None:
        """Unregister *channel*; its pending tasks are dropped. A no-op if not subscribed."""
        with self.registry_lock:
            subscription = channel._subscription
            if subscription is None:
                return
            channel._subscription = None
            machinery = self.machinery
            entry = subscription[0].detach() if isinstance(subscription[0], CoroutineRunner) \
                else channel            # a group leaves the index with its last channel
            if entry is not None and self.registry.remove(channel.topic, entry):
                self.unanchored -= is_unanchored(channel.topic)
                self.patterns -= is_pattern(channel.topic)
                if machinery is not None and machinery.link is not None:
                    machinery.link.unsubscribe(channel.topic)
        if machinery is not None:
            self._send_event(machinery, UNSUBSCRIBE_TOPIC, channel.topic)

    def send_event(self, event_topic: str, data: dict) -> None:
        """Send a local internal event (no-op while not running or shutting down)."""
        machinery = self.machinery
        if machinery is not None and machinery.state is RUNNING:
            try:
                machinery.submit(Message.event(event_topic, data))
            except ShutdownError:
                pass

    def _send_event(self, machinery: Machinery, event_topic: str, topic: str) -> None:
        if machinery.state is not RUNNING:
            return   # no internal events while draining: nothing may start new work
        try:
            machinery.submit(Message.event(event_topic, {'topic': topic}))
        except ShutdownError:
            logger.debug('%s for %r not sent: shutting down', event_topic, topic)


runtime = Runtime()
"""This process's runtime."""

settings._is_running = runtime.is_running
os.register_at_fork(before=runtime._before_fork,
                    after_in_parent=runtime._after_fork_in_parent,
                    after_in_child=runtime._after_fork_in_child)
