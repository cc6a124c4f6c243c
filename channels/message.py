"""``Message``: what ``Channel.send()`` returns and what every handler receives.

A message that is not ``local`` is pickled once, at ``send()``, so that data which
could not cross a process boundary fails there, in the caller's thread. Each handler
gets its own copy: unpickled from those bytes on first access of ``data`` (a deep
copy), or, for a ``local`` message, a shallow ``copy.copy`` as in Lona. Every copy
shares the ``id``, ``timestamp`` and dropped state of the message ``send()`` returned.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import os
import pickle
import secrets
import time
from datetime import datetime, timedelta
from typing import Any

from .errors import SerializationError

__all__ = ['Message', 'new_message_id', 'origin_of', 'SECRET_BYTES']

_UNSET: Any = object()


SECRET_BYTES = 16
"""Bytes of a process identity's secret (sent to the broker in HELLO, never forwarded)."""


def origin_of(pid: int, secret: bytes) -> str:
    """The origin of a process identity: the part of every message id before the
    sequence number, ``'<pid>-<digest of the secret>-'``.

    The broker computes it from the pid and secret of a connection's HELLO and drops a
    MESSAGE whose id is not this origin followed by a decimal sequence, so a process can
    only send under its own origin: receivers, which drop what they have seen by origin
    and sequence (after a broker restart), cannot be made to drop another's messages.
    The digest has 64 bits, too many to find a secret for someone else's origin.
    """
    return f'{pid}-{hashlib.blake2b(secret, digest_size=8).hexdigest()}-'


class _Identity:
    """This process's identity as a sender: a secret, the origin derived from it (the
    prefix of message ids) and the sequence; renewed in a forked child."""

    def __init__(self) -> None:
        self.renew()

    def renew(self) -> None:
        """A new secret, origin and sequence: at import and in a forked child."""
        self.pid = os.getpid()
        self.secret = secrets.token_bytes(SECRET_BYTES)
        self.prefix = origin_of(self.pid, self.secret)
        self.sequence = itertools.count(1)

    def hello(self) -> dict[str, Any]:
        """What HELLO says of this identity: the broker derives its origin from it."""
        return {'pid': self.pid, 'secret': self.secret.hex()}


_identity = _Identity()
os.register_at_fork(after_in_child=_identity.renew)


def new_message_id() -> str:
    """A message id unique across processes: the sender's origin and a sequence number."""
    return _identity.prefix + str(next(_identity.sequence))


def resolve_expiry(expiry: object) -> tuple[datetime | None, float | None]:
    """Validate *expiry* of ``send()``; return it as a datetime and as a POSIX deadline."""
    if expiry is None:
        return None, None
    if isinstance(expiry, timedelta):
        # the deadline from the clock, not from local wall time, which repeats an hour
        # when daylight saving time ends; the datetime is for display, as in Lona
        try:
            return datetime.now() + expiry, time.time() + expiry.total_seconds()
        except OverflowError as exc:
            raise ValueError(f'expiry {expiry!r} is out of range: {exc}') from exc
    if not isinstance(expiry, datetime):
        raise TypeError(f'expiry must be a datetime, a timedelta or None, got '
                        f'{type(expiry).__name__} {expiry!r}')
    try:
        deadline = expiry.timestamp()   # a naive datetime is local time; aware ones work too
    except (OverflowError, OSError, ValueError) as exc:
        raise ValueError(f'expiry {expiry!r} is out of range: {exc}') from exc
    return expiry, deadline


class Message:
    """A message sent to a topic.

    Attributes: ``topic`` (the sender's topic), ``data`` (a dict), ``expiry`` (a
    datetime or None), ``local``, ``droppable``, ``id`` (unique across processes) and
    ``timestamp`` (``time.time()`` at ``send()``).
    """

    __slots__ = ('topic', '_data', '_payload', 'expiry', 'deadline', 'local', 'droppable',
                 '_id', 'timestamp', '_origin', '_dropped')

    def __init__(self, topic: str, data: dict | None = None, *,
                 expiry: datetime | None = None, deadline: float | None = None,
                 local: bool = False, droppable: bool = False,
                 id: str | None = None, timestamp: float | None = None,
                 payload: bytes | None = None) -> None:
        self.topic = topic
        self._data = _UNSET if data is None else data
        self._payload = payload
        self.expiry = expiry
        self.deadline = deadline
        self.local = local
        self.droppable = droppable
        self._id = new_message_id() if id is None else id
        self.timestamp = time.time() if timestamp is None else timestamp
        self._origin: Message | None = None     # None: this is the message itself
        self._dropped = False

    @classmethod
    def create(cls, topic: str, data: object, expiry: object, local: object,
               droppable: object) -> Message:
        """Validate the arguments of ``send()`` and build the message it returns."""
        if data is None:
            data = {}
        elif not isinstance(data, dict):
            raise TypeError(f'message_data must be a dict or None, got '
                            f'{type(data).__name__} {data!r:.200}')
        if local is not False and local is not True:
            raise TypeError(f'local must be a bool, got {local!r}')
        if droppable is not False and droppable is not True:
            raise TypeError(f'droppable must be a bool, got {droppable!r}')
        if expiry is None:
            deadline = None
        else:
            expiry, deadline = resolve_expiry(expiry)
        if local:
            payload = None
        else:
            try:
                payload = _dumps(data, _PROTOCOL)
            except Exception as exc:
                raise SerializationError(
                    f'message_data for topic {topic!r} cannot be pickled, so it cannot reach '
                    f'other processes: {exc!r}. Send picklable data, or pass local=True to '
                    f'keep the message in this process.') from exc
        # built slot by slot: this runs once per send() and per handler
        message = _new(cls)
        message.topic = topic
        message._data = data.copy() if type(data) is dict else copy.copy(data)
        message._payload = payload
        message.expiry = expiry
        message.deadline = deadline
        message.local = local
        message.droppable = droppable
        message._id = (_identity.prefix, next(_identity.sequence))
        message.timestamp = _time()
        message._origin = None
        message._dropped = False
        return message

    # create(), event(), received() and copy() each set every slot themselves instead of
    # calling one helper: they run once per message (or per handler) on the hot path,
    # where an 11-argument call costs a few percent. Keep the four in step.

    @classmethod
    def event(cls, topic: str, data: dict) -> Message:
        """A ``local`` internal event (``lona.channels.subscribe`` and the like)."""
        message = _new(cls)
        message.topic = topic
        message._data = data
        message._payload = None
        message.expiry = message.deadline = None
        message.local = True
        message.droppable = False
        message._id = (_identity.prefix, next(_identity.sequence))
        message.timestamp = _time()
        message._origin = None
        message._dropped = False
        return message

    @classmethod
    def received(cls, topic: str, message_id: str, timestamp: float, deadline: float | None,
                 droppable: bool, payload: bytes) -> Message:
        """A message that arrived from the broker (its data is unpickled on first access)."""
        message = _new(cls)
        message.topic = topic
        message._data = _UNSET
        message._payload = payload
        message.expiry = None if deadline is None else _expiry_of(deadline)
        message.deadline = deadline
        message.local = False
        message.droppable = droppable
        message._id = message_id
        message.timestamp = timestamp
        message._origin = None
        message._dropped = False
        return message

    def renumber(self) -> None:
        """Give the message the next sequence number of this process (done under the
        lock that orders the frames sent to the broker, so that a receiver can tell a
        message sent again from a new one: the sequence only grows)."""
        self._id = (_identity.prefix, next(_identity.sequence))

    def id_bytes(self) -> bytes:
        """The id, UTF-8 encoded (cheaper than ``id.encode()`` before it was built)."""
        id = self._id
        if type(id) is tuple:
            return b'%b%d' % (id[0].encode(), id[1])
        return id.encode()

    @property
    def id(self) -> str:
        """Unique across processes: the sender's origin (its pid and a digest of its
        secret) and a sequence number, ``'<pid>-<digest>-<sequence>'``."""
        id = self._id
        if type(id) is tuple:
            id = self._id = f'{id[0]}{id[1]}'
            if self._origin is not None:
                self._origin._id = id
        return id

    @property
    def data(self) -> dict:
        """The message payload: a dict of this copy's own."""
        data = self._data
        if data is _UNSET:
            data = self._data = _loads(self._payload) if self._payload else {}
        return data

    @property
    def payload(self) -> bytes | None:
        """The pickled data, for a message that is not ``local``."""
        return self._payload

    def copy(self) -> Message:
        """A copy for one handler: same id, timestamp and dropped state, its own data."""
        message = _new(Message)
        if self._payload is not None:
            message._data = _UNSET          # unpickled on first access of .data
        else:
            data = self.data
            message._data = data.copy() if type(data) is dict else copy.copy(data)
        message.topic = self.topic
        message._payload = self._payload
        message.expiry = self.expiry
        message.deadline = self.deadline
        message.local = self.local
        message.droppable = self.droppable
        message._id = self._id
        message.timestamp = self.timestamp
        message._origin = self._origin or self
        message._dropped = False
        return message

    def is_expired(self) -> bool:
        """True once the expiry given to ``send()`` has passed."""
        return self.deadline is not None and _time() >= self.deadline

    def is_dropped(self) -> bool:
        """True if this message was dropped in this process (expired, or at shutdown)."""
        return (self._origin or self)._dropped

    def drop(self) -> None:
        """Mark this message, and every copy of it in this process, as dropped."""
        (self._origin or self)._dropped = True

    def __repr__(self) -> str:
        flags = ''.join(f' {name}' for name in ('local', 'droppable') if getattr(self, name))
        return f'<Message id={self.id!r} topic={self.topic!r}{flags}>'


def _expiry_of(deadline: float) -> datetime:
    """The local datetime of a *deadline* from another process (the latest or earliest
    one there is, for a deadline past what this machine's datetime can show)."""
    try:
        return datetime.fromtimestamp(deadline)
    except (OverflowError, OSError, ValueError):
        return datetime.max if deadline > 0 else datetime.min


_new = object.__new__
_time = time.time
_dumps = pickle.dumps
_loads = pickle.loads
_PROTOCOL = pickle.HIGHEST_PROTOCOL
