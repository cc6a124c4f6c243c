"""Helpers shared by the tests: waiting with a deadline, recording handlers, and sending
and taking numbered messages."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import channels


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, *,
               what: str = 'condition', interval: float = 0.005) -> None:
    """Poll *predicate* until it is true; fail the test naming *what* after *timeout* s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout}s waiting for {what}')
        time.sleep(interval)


async def eventually(predicate: Callable[[], object], what: str, timeout: float = 10.0
                     ) -> None:
    """Wait (off the event loop, so that it runs) until *predicate()* is true."""
    await asyncio.to_thread(wait_until, predicate, timeout, what=what)


def send(topic: str, *ns: int) -> None:
    """Send ``{'n': n}`` to *topic* for each of *ns*, in order."""
    from channels import Channel
    channel = Channel(topic)
    for n in ns:
        channel.send({'n': n})


def numbers(messages) -> list[int]:
    """The ``n`` of each message sent by :func:`send`."""
    return [message.data['n'] for message in messages]


async def take(inbox: channels.Inbox, count: int, timeout: float = 10.0) -> list:
    """The next *count* messages of *inbox*, within *timeout* s in all."""
    async def taken() -> list:
        return [await inbox.get() for _ in range(count)]
    return await asyncio.wait_for(taken(), timeout)


class Recorder:
    """A handler that records the messages it receives, thread-safely."""

    def __init__(self, delay: float = 0.0) -> None:
        self.messages: list = []
        self.lock = threading.Lock()
        self.delay = delay

    def __call__(self, message) -> None:
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.messages.append(message)

    @property
    def data(self) -> list[dict]:
        with self.lock:
            return [message.data for message in self.messages]

    @property
    def topics(self) -> list[str]:
        with self.lock:
            return [message.topic for message in self.messages]

    def __len__(self) -> int:
        with self.lock:
            return len(self.messages)

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        """Wait until at least *count* messages arrived."""
        wait_until(lambda: len(self) >= count, timeout,
                   what=f'{count} messages (got {len(self)})')


def app_hello(pid: int, secret: bytes = b'\x07' * 16, **fields: object) -> bytes:
    """The HELLO frame a raw test connection sends as app process *pid* (with the origin
    ``origin_of(pid, secret)``), plus *fields*."""
    from channels import wire
    return wire.encode_json(wire.HELLO, {'pid': pid, 'role': 'app', 'secret': secret.hex(),
                                         **fields})


class Overlaps:
    """A handler that counts its calls and how many began while another call ran."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.running = self.overlaps = self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, message: object) -> None:
        with self.lock:
            self.running += 1
            self.overlaps += self.running > 1
        time.sleep(self.delay)
        with self.lock:
            self.running -= 1
            self.calls += 1


class Blocked:
    """A handler that blocks until ``release`` is set (at most 10 s); ``started`` is set
    by its first call."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, message: object) -> None:
        self.started.set()
        self.release.wait(10)

