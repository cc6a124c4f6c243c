"""Helpers shared by the tests: waiting with a deadline, and recording handlers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, *,
               what: str = 'condition', interval: float = 0.005) -> None:
    """Poll *predicate* until it is true; fail the test naming *what* after *timeout* s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout}s waiting for {what}')
        time.sleep(interval)


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
