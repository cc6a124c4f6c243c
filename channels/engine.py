"""What the bridge and its engines (:mod:`channels.bridge_redis`,
:mod:`channels.bridge_nats`) share: the stream's retention, the liveness bound and the
watchdog that keeps it, and how URLs and missing extras are told. Below all three, so
that the bridge can import an engine only when one is configured without either
importing the other back.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigurationError, install_hint

__all__ = ['LIVENESS_SECONDS', 'Retention', 'Watchdog', 'redact_url', 'missing_extra']

LIVENESS_SECONDS = 3.0
"""A reading connection that has not answered for this long counts as down."""


class Watchdog:
    """Bounds each block of one task to *limit* seconds: ``with watchdog:`` around the
    awaits of one command; a block still running *limit* seconds after it began has its
    task cancelled there and raises TimeoutError.

    As ``asyncio.timeout()`` does, but with one timer that moves itself on, not one
    scheduled and cancelled per block: a block only stores its deadline, and the timer
    fires at most about once per *limit*. At a few thousand commands a second the
    event loop's heap of cancelled timers (ordered by a comparison written in Python)
    cost the bridge about as much CPU as the commands themselves. Not reentrant; one
    task at a time.
    """

    __slots__ = ('limit', '_deadline', '_task', '_cancelling', '_handle', '_fired')

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._deadline: float | None = None      # of the block running now
        self._task: asyncio.Task | None = None
        self._cancelling = 0
        self._handle: asyncio.TimerHandle | None = None
        self._fired = False

    def __enter__(self) -> Watchdog:
        task = self._task = asyncio.current_task()
        loop = task.get_loop()
        self._deadline = deadline = loop.time() + self.limit
        self._cancelling = task.cancelling()
        self._fired = False
        if self._handle is None:
            self._handle = loop.call_at(deadline, self._check)
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> None:
        self._deadline = None
        if self._fired:                 # (our cancel is spent, whatever came of it)
            self._fired = False
            if self._task.uncancel() <= self._cancelling and \
                    kind is asyncio.CancelledError:
                raise TimeoutError(f'no answer within {self.limit:g}s') from exc

    def _check(self) -> None:
        self._handle = None
        deadline = self._deadline
        if deadline is None:            # between blocks: the next one sets it again
            return
        loop = self._task.get_loop()
        if loop.time() >= deadline:
            self._fired = True
            self._task.cancel()
        else:
            self._handle = loop.call_at(deadline, self._check)

    def close(self) -> None:
        """Cancel the timer (the engine is closed)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

@dataclass(frozen=True)
class Retention:
    """How much of the stream the engine keeps: at most *entries* entries (Redis
    ``XADD MAXLEN ~``, JetStream ``max_msgs``), none older than *seconds* (JetStream
    ``max_age``; Redis ``XTRIM MINID`` once a second). An entry holds up to
    ``MAX_ENTRY_BYTES`` of messages (one message at low rates)."""

    entries: int = 100_000
    seconds: float = 3600.0

    def __post_init__(self) -> None:
        if type(self.entries) is not int or self.entries < 1:
            raise ConfigurationError(f'retention entries must be an int >= 1, got '
                                     f'{self.entries!r}')
        if not isinstance(self.seconds, int | float) or not self.seconds > 0:
            raise ConfigurationError(f'retention seconds must be > 0, got {self.seconds!r}')


def redact_url(url: str) -> str:
    """*url* with its password (if any) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return '<unparsable URL>'
    if parts.password is None and not (parts.username and '@' in parts.netloc):
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition('@')
    user = userinfo.split(':', 1)[0] if parts.password is not None else ''
    # A NATS token URL (nats://TOKEN@host) carries the secret as the user name.
    if parts.password is None:
        user = '***'
        return urlunsplit(parts._replace(netloc=f'{user}@{hostinfo}'))
    return urlunsplit(parts._replace(netloc=f'{user}:***@{hostinfo}'))


def missing_extra(extra: str, module: str, exc: ImportError,
                  packages: str) -> ConfigurationError:
    """The error for a bridge whose engine's client package is not installed."""
    return ConfigurationError(
        f'a {extra} bridge needs the {module!r} package, which is not installed ({exc}); '
        f'{install_hint(extra, packages)}')
