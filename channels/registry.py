"""The process's registry: the index that ``Channel.get_channels(topic)`` searches.

In an app process it holds the process's subscribed channels (the runtime adds and
removes them). The broker process installs its own index instead, whose "channels" are
the subscriptions of every connected process, so that a ``MessageBroker`` subclass
written against the spec (``Channel.get_channels(topic=message.topic)``) routes there
too. Neither side imports the other: both meet here.
"""

from __future__ import annotations

import threading
from typing import Any

from .topics import TopicIndex

__all__ = ['Registry', 'registry', 'get_channels']


class Registry:
    """A topic index and the lock that its writers take; lookups take no lock."""

    __slots__ = ('index', 'lock')

    def __init__(self) -> None:
        self.index: TopicIndex = TopicIndex()
        self.lock: Any = threading.Lock()

    def __repr__(self) -> str:
        return f'<Registry {len(self.index)} subscriptions>'

    def use(self, index: TopicIndex, lock: Any) -> None:
        """Search *index* from now on, with *lock* guarding its changes (the broker
        process does this at start)."""
        self.index, self.lock = index, lock

    def reset_lock(self) -> None:
        """A fresh lock, in a forked child (the parent's may have been held at the fork)."""
        self.lock = threading.Lock()


registry = Registry()
"""This process's registry."""


def get_channels(topic: str) -> list:
    """What is subscribed to a topic matching *topic* (no lock is taken)."""
    return registry.index.match(topic)
