"""The exceptions of ``channels``: one base class, each subclass also a built-in.

Every error the library raises on purpose derives from :class:`ChannelsError`, and
also from the built-in exception that fits, so code written as
``except ValueError`` or ``except ConnectionError`` keeps working.

Bad arguments (a topic that is not a non-empty ``str``, a handler that is not
callable, non-dict data, a bad expiry) raise plain :class:`TypeError` or
:class:`ValueError` at the call, as the standard library does.
"""

from __future__ import annotations

__all__ = [
    'ChannelsError',
    'ConfigurationError',
    'SerializationError',
    'ShutdownError',
    'BufferFullError',
    'ProtocolError',
    'BrokerUnavailableError',
    'MessageTooLargeError',
    'InboxOverflowError',
    'SubscriptionLimitError',
    'install_hint',
]


class ChannelsError(Exception):
    """Base class of every error that ``channels`` raises on purpose."""


class ConfigurationError(ChannelsError, ValueError):
    """A setting has a value that is not allowed, or was changed at the wrong time."""


class SerializationError(ChannelsError, TypeError):
    """Message data could not be serialized to cross a process boundary."""


class ShutdownError(ChannelsError, RuntimeError):
    """The machinery is shutting down and refuses new messages until it has stopped."""


class BufferFullError(ChannelsError):
    """The process buffered as much as its bound allows while the broker was unreachable."""


class ProtocolError(ChannelsError):
    """Bytes on a connection do not form a valid frame of the ``channels`` wire format."""


class BrokerUnavailableError(ChannelsError, ConnectionError):
    """No broker is listening at the configured address."""


class MessageTooLargeError(ChannelsError, ValueError):
    """A message is larger than ``MAX_FRAME_BYTES`` on the wire."""


class InboxOverflowError(ChannelsError):
    """An inbox of :func:`channels.listen` with ``overflow='error'`` was full when a
    message arrived; ``dropped`` is how many messages its consumer missed."""

    def __init__(self, text: str, dropped: int) -> None:
        super().__init__(text)
        self.dropped = dropped


class SubscriptionLimitError(ChannelsError, RuntimeError):
    """A process tried to subscribe more distinct topics than ``MAX_SUBSCRIPTIONS``."""


def install_hint(extra: str, packages: str) -> str:
    """How to install the extra *extra* (which brings *packages*), for error messages:
    from the package index, from a checkout of this repository, or the packages alone."""
    return (f"install it with: pip install 'mpchannels[{extra}]' (from a checkout of "
            f"mpchannels: pip install -e '.[{extra}]'; or the packages alone: "
            f"pip install {packages})")
