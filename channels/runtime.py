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
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any

from . import settings
from .errors import ConfigurationError, ShutdownError
from .handlers import (CoroutineRunner, backlog as handler_backlog, busy_coroutine_runners,
                       coroutine_runners_idle, make_runner)
from .message import Message
from .topics import TopicIndex
from .wire import INTERNAL_PREFIX as _INTERNAL

if TYPE_CHECKING:
    from .channel import Channel
    from .client import BrokerLink
    from .workers import Worker

__all__ = ['Runtime', 'Machinery', 'runtime', 'SUBSCRIBE_TOPIC', 'UNSUBSCRIBE_TOPIC']

logger = logging.getLogger(__name__)

SUBSCRIBE_TOPIC = 'lona.channels.subscribe'
UNSUBSCRIBE_TOPIC = 'lona.channels.unsubscribe'

RUNNING, DRAINING, STOPPING = 'running', 'draining', 'stopping'


class _Sequencer:
    """Keeps the scheduling order of several broker threads equal to the sending order."""

    def __init__(self, stop_token: object) -> None:
        self._stop_token = stop_token
        self._take_lock = threading.Lock()
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._turn = 0
        self._done: set[int] = set()

    def take(self, messages: SimpleQueue, timeout: float, worker: Worker) -> Any:
        """The next item of *messages*, and (for a message) its ticket for *worker*."""
        # taking the message and its ticket is one step, so tickets follow queue order
        if not self._take_lock.acquire(timeout=timeout):
            raise Empty
        try:
            item = messages.get(timeout=timeout)
            if item is not self._stop_token:
                worker._ticket = self._next_ticket
                self._next_ticket += 1
            return item
        finally:
            self._take_lock.release()

    def wait_all_done(self) -> None:
        """Wait until every message taken so far was scheduled (the caller holds the
        take lock, inside ``messages.get()``)."""
        self.wait_turn(self._next_ticket)

    def wait_turn(self, ticket: int) -> None:
        """Wait until every message with an earlier ticket was scheduled."""
        with self._cond:
            self._cond.wait_for(lambda: self._turn == ticket)

    def done(self, ticket: int) -> None:
        """The message with *ticket* is scheduled: let the next one go."""
        with self._cond:
            self._done.add(ticket)
            while self._turn in self._done:
                self._done.discard(self._turn)
                self._turn += 1
            self._cond.notify_all()


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
        self.sequencer: _Sequencer | None = None
        self.link: BrokerLink | None = None   # the broker connection, in broker mode

    def __repr__(self) -> str:
        return (f'<Machinery {self.state} brokers={len(self.brokers)} '
                f'task_workers={len(self.task_workers)} submitted={self.submitted}>')

    def start(self) -> None:
        """Read the settings, then create and start the worker threads (and the link)."""
        from . import workers    # imported here: workers imports channel, which imports us
        broker_class = settings.get('CHANNEL_MESSAGE_BROKER_CLASS')
        task_class = settings.get('CHANNEL_TASK_WORKER_CLASS')
        brokers = settings.get('MAX_CHANNEL_MESSAGE_BROKER_THREADS')
        tasks = settings.get('MAX_CHANNEL_TASK_WORKER_THREADS')
        timeout = settings.get('CHANNEL_WORKER_TIMEOUT')
        if brokers > 1:
            self.sequencer = _Sequencer(workers.STOP)
        self._stop_token = workers.STOP
        self._mailbox_class = workers.Mailbox
        self.brokers = [broker_class(self, n, timeout) for n in range(brokers)]
        self.task_workers = [task_class(self, n, timeout) for n in range(tasks)]
        self.schedulers = list(self.brokers)
        address = settings.get('BROKER_ADDRESS')
        if address is not None:
            from .client import BrokerLink
            from .connection import load_authkey, parse_address
            parsed, authkey = parse_address(address), load_authkey()
            if isinstance(parsed, tuple) and authkey is None:
                raise ConfigurationError(
                    f'BROKER_ADDRESS {address!r} is TCP, which requires an authkey: set '
                    f'CHANNELS_AUTHKEY or CHANNELS_AUTHKEY_FILE to the broker\'s')
            self.link = BrokerLink(self, parsed, authkey,
                                   max_buffer=settings.get('MAX_BUFFER_BYTES'),
                                   max_frame=settings.get('MAX_FRAME_BYTES'),
                                   max_pending_tasks=settings.get('MAX_PENDING_TASKS'))
        elif not Runtime.told_embedded:
            Runtime.told_embedded = True
            logger.info('no broker is configured (CHANNELS_BROKER_ADDRESS is unset): messages '
                        'reach the channels of this process only. To reach every worker '
                        "process, run the server under 'channels-broker -- <command>'.")
        for worker in self.workers:
            worker.start()
        if self.link is not None:
            self.link.start()
        logger.debug('started %d broker and %d task worker threads%s', brokers, tasks,
                     f' for the broker on {self.link.address_text}' if self.link else '')

    @property
    def workers(self) -> list[Worker]:
        """Every worker of this run, brokers first."""
        return self.brokers + self.task_workers

    # the hot path ----------------------------------------------------------------------

    def submit(self, message: Message) -> None:
        """Accept *message*: local ones go to this process's brokers, others to the broker."""
        with self.send_lock:
            if self.state is not RUNNING:
                raise ShutdownError(
                    f'cannot send {message!r}: channels is shutting down. Messages are '
                    f'accepted again once channels.shutdown() has returned.')
            # internal topics (lona.channels.*) are local to each process in any mode
            if self.link is None or message.local or message.topic.startswith(_INTERNAL):
                self.submitted += 1
                self.messages.put(message)
            else:
                self.link.put_message(message)

    def schedule(self, channel: Channel, message: Message, copy: bool = True) -> bool:
        """Queue a task of *channel* with a copy of *message* (or *message* itself, if
        nobody else holds it); False if the channel is not subscribed."""
        subscription = channel._subscription
        if subscription is None:
            return False
        box = channel._mailbox
        if box is None or box.machinery is not self:
            box = self._mailbox_of(channel)
        box.tasks.append((message.copy() if copy else message, subscription))
        if box.claim.acquire(False):
            self.ready.put(box)
        return True

    def _mailbox_of(self, channel: Channel) -> Any:
        with self.box_lock:
            box = channel._mailbox
            if box is None or box.machinery is not self:
                box = channel._mailbox = self._mailbox_class(self, channel)
            return box

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
            self.messages.put(self._stop_token)
        for _ in self.task_workers:
            self.ready.put(self._stop_token)
        stuck = [worker.name for worker in self.workers
                 if not worker.join(max(deadline - time.monotonic(), 0.05))]
        if link is not None and not link.close(deadline):
            stuck.extend(thread.name for thread in link.threads if thread.is_alive())
        if stuck:
            logger.warning('shutdown: threads %s did not stop within %.3gs (a handler that '
                           'does not return?); each ends once its handler returns',
                           stuck, timeout)
        return drained and not stuck


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

    told_embedded = False   # the INFO line about the embedded default is logged once

    def __init__(self) -> None:
        self.registry: TopicIndex[Channel] = TopicIndex()
        self.registry_lock = threading.Lock()
        self.state_lock = threading.RLock()
        self.machinery: Machinery | None = None
        self._atexit_registered = False
        self._finalized_pid = 0
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f'<Runtime pid={self._pid} channels={len(self.registry)} {self.machinery!r}>'

    def is_running(self) -> bool:
        """True from the first use until ``shutdown()`` returns."""
        return self.machinery is not None

    # lifecycle ------------------------------------------------------------------------

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
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not 0 <= timeout < float('inf'):
            raise ValueError(f'timeout must be a finite number of seconds >= 0, got '
                             f'{timeout!r}')
        with self.state_lock:
            machinery = self.machinery
            if machinery is None:
                return True
            if threading.current_thread() in {w.thread for w in machinery.workers}:
                raise RuntimeError('channels.shutdown() was called from a channels worker '
                                   'thread (a handler); it would wait for itself. Call it '
                                   'from another thread.')
            try:
                return machinery.stop(timeout)
            finally:
                self.machinery = None

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
        self.registry_lock = threading.Lock()
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
        with self.registry_lock:
            if channel._subscription is not None:
                raise RuntimeError(f'{channel!r} is already subscribed; call unsubscribe() '
                                   f'before subscribing it again')
            # a new tuple per subscription: tasks of an earlier one are told apart and dropped
            subscription = (runner, handler)
            if isinstance(runner, CoroutineRunner):
                runner.attach(subscription)
            channel._subscription = subscription
            if self.registry.add(channel.topic, channel) and machinery.link is not None:
                machinery.link.subscribe(channel.topic)
        self._send_event(machinery, SUBSCRIBE_TOPIC, channel.topic)

    def unsubscribe(self, channel: Channel) -> None:
        """Unregister *channel*; its pending tasks are dropped. A no-op if not subscribed."""
        with self.registry_lock:
            if channel._subscription is None:
                return
            channel._subscription = None
            machinery = self.machinery
            if self.registry.remove(channel.topic, channel) and machinery is not None \
                    and machinery.link is not None:
                machinery.link.unsubscribe(channel.topic)
        if machinery is not None:
            self._send_event(machinery, UNSUBSCRIBE_TOPIC, channel.topic)

    def use_registry(self, registry: TopicIndex, lock: Any) -> None:
        """Make ``Channel.get_channels()`` search *registry* (the broker process does
        this: its "channels" are the subscriptions of every connected process)."""
        self.registry, self.registry_lock = registry, lock

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
