"""``Worker``, ``MessageBroker`` and ``TaskWorker``: the threads that deliver messages.

As in Lona, a worker's ``run()`` is called again and again; it blocks for at most
``CHANNEL_WORKER_TIMEOUT`` seconds in ``get_message()`` / ``get_task()``, which raise
``queue.Empty`` when nothing came. Subclass either class and name it in the settings
``CHANNEL_MESSAGE_BROKER_CLASS`` / ``CHANNEL_TASK_WORKER_CLASS`` to change routing or
how handlers run.

What the base class adds to Lona's contract, so that every subclass keeps the spec's
promises:

* **Per-channel order, one call at a time.** ``schedule_task()`` appends to the
  channel's own mailbox; a channel with pending tasks is handed to one task worker at a
  time, which keeps it until its mailbox is empty (or it has run a few tasks in a row,
  for fairness), so a channel's handler never runs concurrently with itself and sees
  messages in order, however many task threads there are. Other channels run on the
  other threads meanwhile.
* **Order across several broker threads.** Each message taken by ``get_message()`` gets
  a ticket; ``schedule_task()`` waits until every earlier message has been scheduled.
* **No silent death.** An exception from ``run()`` is logged with its traceback,
  counted in ``errors``, and the loop goes on.
* **Lifecycle.** Threads are named ``channels-broker-N`` / ``channels-task-N``, started
  and stopped by their owner (the runtime), stopped by one sentinel each and joined
  with a timeout. Nothing starts in ``__init__``.
"""

from __future__ import annotations

import logging
import threading
from queue import Empty
from typing import TYPE_CHECKING, Any

from . import settings
from .handlers import unawaited
from .message import Message
from .ordering import STOP, Mailbox
from .registry import get_channels

if TYPE_CHECKING:
    from .channel import Channel
    from .runtime import Machinery

__all__ = ['Task', 'Worker', 'MessageBroker', 'TaskWorker', 'Mailbox', 'STOP']

logger = logging.getLogger(__name__)

_STREAK = 16
"""Tasks of one channel a task worker runs in a row before it lets other waiting channels
go first (with none waiting it keeps the channel: handing it on would only wake a thread)."""


class Task:
    """One handler call to make: ``task.handler(task.message)``.

    ``handler`` is the handler of the subscription the task was scheduled for, which
    ``task.channel.handler`` no longer is if the channel unsubscribed (None) or
    subscribed again meanwhile.
    """

    __slots__ = ('channel', 'message', 'subscription')

    def __init__(self, channel: Channel, message: Message,
                 subscription: tuple[Any] | None = None) -> None:
        self.channel = channel
        self.message = message
        self.subscription = subscription if subscription is not None \
            else channel._subscription

    @property
    def handler(self) -> Any:
        """What to call with the message for the subscription this task belongs to: the
        subscribed handler itself, or (for a coroutine function, or with an error
        callback) a wrapper that hands the call on (see :mod:`channels.handlers`)."""
        return None if self.subscription is None else self.subscription[0]

    def __repr__(self) -> str:
        return f'<Task {self.channel!r} {self.message!r}>'


class Worker:
    """Base class: a named thread that calls ``run()`` until it is stopped.

    ``running`` is False once shutdown has begun: droppable messages are then dropped.
    ``timeout`` is how long ``get_message()`` / ``get_task()`` wait before raising
    ``queue.Empty``. ``errors`` counts exceptions from ``run()`` and, in a TaskWorker,
    from handlers. Subclasses implement :meth:`run`.

    The counters ``routed``, ``scheduled`` and ``settled`` are written by the worker's
    own thread only; shutdown reads them to know when everything has been handled.
    """

    kind = 'worker'

    def __init__(self, machinery: Machinery, number: int, timeout: float) -> None:
        self.machinery = machinery
        self.number = number
        self.timeout = timeout
        self.name = f'channels-{self.kind}-{number}'
        self.running = True
        self.errors = 0
        self.routed = 0       # messages taken and settled (routed or dropped)
        self.scheduled = 0    # tasks scheduled
        self.settled = 0      # tasks run or dropped
        self._stopping = False
        self._thread: threading.Thread | None = None
        # what the current run() took, settled when run() returns
        self._message: Message | None = None
        self._ticket: int | None = None
        self._box: Mailbox | None = None
        self._task: Task | None = None
        self._streak = 0

    def __repr__(self) -> str:
        state = 'alive' if self.is_alive() else 'not running'
        return f'<{type(self).__name__} {self.name} {state} errors={self.errors}>'

    # lifecycle, driven by the runtime ---------------------------------------------------

    def start(self) -> None:
        """Start the worker's thread (once)."""
        if self._thread is not None:
            raise RuntimeError(f'{self.name} was started already')
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the loop to end after the current ``run()``; the owner also sends a sentinel."""
        self._stopping = True

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; True if it did."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.is_alive()

    def is_alive(self) -> bool:
        """True while the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def thread(self) -> threading.Thread | None:
        """The worker's thread, once started."""
        return self._thread

    def _loop(self) -> None:
        try:
            while not self._stopping:
                try:
                    self.run()
                except (Empty, TimeoutError):
                    pass
                except BaseException:     # SystemExit from a handler must not end us either
                    self.errors += 1
                    logger.exception('%s.run() raised in %s; the worker goes on',
                                     type(self).__name__, self.name)
                finally:
                    if self._message is not None:
                        self._finish_message()
                    if self._task is not None:
                        self._finish_task()
        finally:
            if self._box is not None:     # hand a held channel on; nothing is dropped here
                self.machinery.ready.put(self._box)
                self._box = None

    # the spec's API -------------------------------------------------------------------

    def run(self) -> None:
        """One unit of work; called again and again. Subclasses implement it."""
        raise NotImplementedError(f'{type(self).__name__} must implement run()')

    def get_message(self) -> Message:
        """The next message sent in (or to) this process; ``queue.Empty`` after ``timeout``.

        Expired messages, and droppable ones during shutdown, are dropped here and
        reported as ``queue.Empty``.
        """
        if self._message is not None:
            self._finish_message()
        machinery = self.machinery
        sequencer = machinery.sequencer
        if sequencer is None:
            message = machinery.messages.get(timeout=self.timeout)
        else:
            message = sequencer.take(machinery.messages, self.timeout, self)
        if message is STOP:
            self._stopping = True
            raise Empty
        self._message = message
        if (message.deadline is not None and message.is_expired()) \
                or (message.droppable and not self.running):
            message.drop()
            logger.debug('%s dropped %r before routing', self.name, message)
            raise Empty
        return message

    def schedule_task(self, channel: Channel, message: Message) -> None:
        """Queue a call of *channel*'s handler with its own copy of *message*."""
        if self._ticket is not None:
            self.machinery.sequencer.wait_turn(self._ticket)
        self.scheduled += 1      # before the task exists: shutdown may never see fewer
        if not self.machinery.schedule(channel, message):
            self.scheduled -= 1

    def get_task(self) -> Task:
        """The next handler call to make; ``queue.Empty`` after ``timeout``.

        While the caller runs the task, no other worker gets a task of the same channel.
        """
        if self._task is not None:
            self._finish_task()
        box = self._box
        while True:
            if box is None:
                box = self.machinery.ready.get(timeout=self.timeout)
                if box is STOP:
                    self._stopping = True
                    raise Empty
                self._box = box
                self._streak = 0
            try:
                message, subscription = box.tasks.popleft()
                break
            except IndexError:
                if not box.release():
                    self._box = box = None
        self._task = task = Task(box.channel, message, subscription)
        self._streak += 1
        message = task.message
        channel = task.channel
        if task.subscription is not channel._subscription \
                or (message._origin or message)._dropped \
                or (message.deadline is not None and message.is_expired()) \
                or (message.droppable and not self.running):
            if task.subscription is channel._subscription:     # not merely unsubscribed
                message.drop()
                logger.debug('%s dropped %r before its handler', self.name, message)
            raise Empty
        return task

    # settling what run() took ----------------------------------------------------------

    def _finish_message(self) -> None:
        self._message = None
        if self._ticket is not None:
            self.machinery.sequencer.done(self._ticket)
            self._ticket = None
        self.routed += 1

    def _finish_task(self) -> None:
        self._task = None
        self.settled += 1
        box = self._box
        if box is not None and self._streak >= _STREAK and box.tasks \
                and not self.machinery.ready.empty():
            self._box = None
            self.machinery.ready.put(box)   # others wait: to the back of the line, claimed


class MessageBroker(Worker):
    """Routes each message to the channels subscribed to a matching topic (the spec's)."""

    kind = 'broker'

    def run(self) -> None:
        """Take a message, find its channels, schedule a task for each."""
        message = self.get_message()
        channels = get_channels(message.topic)
        for channel in channels:
            self.schedule_task(channel=channel, message=message)


class TaskWorker(Worker):
    """Runs handlers (the spec's); a handler's exception is logged and the worker goes on."""

    kind = 'task'

    def run(self) -> None:
        """Take a task and call its subscription's handler with its message."""
        task = self.get_task()
        handler = task.handler
        try:
            result = handler(task.message)
            if result is not None and unawaited(handler, result, task.message):
                self.errors += 1
        except BaseException:
            self.errors += 1
            logger.exception('exception was raised while running %r for %r on %s',
                             handler, task.message, self.name)

    def _loop(self) -> None:
        if type(self).run is not TaskWorker.run:
            return super()._loop()        # a subclass's run() runs as written
        try:
            self._run_tasks()
        finally:
            if self._box is not None:     # hand a held channel on; nothing is dropped here
                self.machinery.ready.put(self._box)
                self._box = None

    def _run_tasks(self) -> None:
        # What run() does, with get_task() and the settling inlined (run_mailbox): the
        # per-task cost of this loop is most of a subscriber's CPU. Same checks, same order.
        ready = self.machinery.ready
        timeout = self.timeout
        while not self._stopping:
            try:
                box = ready.get(timeout=timeout)
            except Empty:
                continue
            if box is STOP:
                return
            self._box = box
            run_mailbox(box, self, only_if_others_wait=True)
            self._box = None


class HandlerTally:
    """What :func:`run_mailbox` counts for a thread that is not a :class:`Worker`:
    ``settled`` tasks and handlers' ``errors``; ``running`` is False once shutdown has
    begun (its machinery's state), when droppable messages are dropped."""

    __slots__ = ('machinery', 'name', 'settled', 'errors')

    def __init__(self, machinery: Any, name: str) -> None:
        self.machinery = machinery
        self.name = name
        self.settled = 0
        self.errors = 0

    @property
    def running(self) -> bool:
        """False once shutdown has begun."""
        return self.machinery.is_running()


def run_mailbox(box: Mailbox, owner: Worker | HandlerTally, *,
                only_if_others_wait: bool = False) -> None:
    """Run the tasks of *box*, which the caller has claimed (and not put in the ready
    queue), the one way they run: each task's checks (unsubscribed, dropped, expired,
    droppable during shutdown), then its handler, its errors logged; counted in
    *owner*'s ``settled`` and ``errors`` as they go (shutdown reads ``settled``).

    After ``_STREAK`` tasks with more left, the box goes to the back of the ready queue,
    still claimed, where a task worker goes on with it; with *only_if_others_wait*
    (a task worker's own loop) only if other channels wait there. Otherwise the box is
    let go once it is empty. Used by :class:`TaskWorker` and by an app process's broker
    reader, which runs the channel it routed a message to (``owner`` a
    :class:`HandlerTally`).
    """
    tasks = box.tasks
    channel = box.channel
    ready = box.machinery.ready
    streak = 0
    while True:
        try:
            message, subscription = tasks.popleft()
        except IndexError:
            if box.release():
                continue
            return
        if subscription is not channel._subscription \
                or (message._origin or message)._dropped \
                or (message.deadline is not None and message.is_expired()) \
                or (message.droppable and not owner.running):
            if subscription is channel._subscription:
                message.drop()
        else:
            handler = subscription[0]
            try:
                result = handler(message)
                if result is not None and unawaited(handler, result, message):
                    owner.errors += 1
            except BaseException:
                owner.errors += 1
                logger.exception('exception was raised while running %r for %r on %s',
                                 handler, message, owner.name)
        owner.settled += 1
        streak += 1
        if streak >= _STREAK and tasks and not (only_if_others_wait and ready.empty()):
            ready.put(box)      # to the back of the line, still claimed
            return


settings.require_subclass(MessageBroker)
settings.require_subclass(TaskWorker)
