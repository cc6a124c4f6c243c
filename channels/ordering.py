"""The ordering machinery: per-channel mailboxes, the sequencer of several routing
threads, and the sentinel that stops a worker.

Both an app process's runtime and the broker process build on these; neither the
mailbox nor the sequencer knows what a channel is: a mailbox holds whatever it is
given as its channel, and the workers read that object's ``_subscription``.
"""

from __future__ import annotations

import threading
from collections import deque
from queue import Empty, SimpleQueue
from typing import Any

__all__ = ['STOP', 'Mailbox', 'Sequencer']

STOP = object()
"""The sentinel that stops one worker thread when it comes out of its queue."""


class Mailbox:
    """The pending tasks of one channel in one run of the machinery.

    ``claim`` is held while the mailbox is in the ready queue or held by a task worker,
    so at most one worker runs the channel's tasks. Whoever takes the claim puts the
    mailbox in the ready queue. Only non-blocking acquires are used: no thread ever
    waits for another here.
    """

    __slots__ = ('machinery', 'channel', 'tasks', 'claim')

    def __init__(self, machinery: Any, channel: Any) -> None:
        self.machinery = machinery
        self.channel = channel
        self.tasks: deque[tuple[Any, tuple]] = deque()   # (message, subscription)
        self.claim = threading.Lock()

    def __repr__(self) -> str:
        return f'<Mailbox {self.channel!r} tasks={len(self.tasks)}>'

    def release(self) -> bool:
        """Let the channel go; True if a task arrived meanwhile and the claim was retaken."""
        self.claim.release()
        return bool(self.tasks) and self.claim.acquire(False)


class Sequencer:
    """Keeps the scheduling order of several routing threads equal to the sending order.

    Each message taken from the queue gets a ticket in queue order; a thread waits for
    its ticket's turn before it schedules, and lets the next one go when it is done.
    """

    def __init__(self, stop_token: object = STOP) -> None:
        self._stop_token = stop_token
        self._take_lock = threading.Lock()
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._turn = 0
        self._done: set[int] = set()

    def take(self, messages: SimpleQueue, timeout: float, worker: Any) -> Any:
        """The next item of *messages*, and (for a message) its ticket, set as
        ``worker._ticket``; ``queue.Empty`` after *timeout*."""
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
