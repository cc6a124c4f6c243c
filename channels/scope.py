"""``Scope``: several subscriptions that end together.

Lona's ``View.subscribe`` ties channels to the life of a view. A :class:`Scope` does
the same for any owner (a request, a websocket, a worker's lifespan)::

    with channels.Scope(on_error=report) as scope:
        scope.subscribe('chat.rooms.lobby', on_chat)          # plain or async def
        scope.subscribe('chat.members', on_members)
        ...
    # every channel of the scope is unsubscribed here, also after an exception

Handler errors of the scope's channels go to ``on_error(exception, message)`` when one
is given (they are only logged otherwise).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from .channel import Channel
from .handlers import ErrorCallback, check_error_callback
from .message import Message

__all__ = ['Scope']


class Scope:
    """Owns channels and unsubscribes them all when closed or when its block ends.

    Usable with ``with`` and ``async with``, or closed explicitly with :meth:`close`.
    Thread safe. A closed scope refuses new subscriptions.
    """

    def __init__(self, on_error: ErrorCallback | None = None) -> None:
        check_error_callback(on_error)
        self.on_error = on_error
        self._channels: list[Channel] = []
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        state = 'closed' if self._closed else f'{len(self._channels)} channels'
        return f'<Scope {state}>'

    @property
    def channels(self) -> tuple[Channel, ...]:
        """The channels the scope owns, in the order they subscribed."""
        with self._lock:
            return tuple(self._channels)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    def subscribe(self, topic: str, handler: Callable[[Message], Any], *,
                  loop: asyncio.AbstractEventLoop | None = None) -> Channel:
        """Subscribe *handler* to *topic* in a new channel that the scope owns.

        As :meth:`Channel.subscribe`, with the scope's ``on_error``. Raises
        ``RuntimeError`` once the scope is closed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError(f'{self!r} is closed: it takes no new subscriptions')
            channel = Channel(topic, handler, loop=loop, on_error=self.on_error)
            self._channels.append(channel)
        return channel

    def close(self) -> None:
        """Unsubscribe every channel of the scope (idempotent)."""
        with self._lock:
            self._closed = True
            channels, self._channels = self._channels, []
        for channel in channels:
            channel.unsubscribe()

    def __enter__(self) -> Scope:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> Scope:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        self.close()
