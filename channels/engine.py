"""What the bridge and its engines (:mod:`channels.bridge_redis`,
:mod:`channels.bridge_nats`) share: the stream's retention, the liveness bound, and how
URLs and missing extras are told. Below all three, so that the bridge can import an
engine only when one is configured without either importing the other back.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigurationError

__all__ = ['LIVENESS_SECONDS', 'Retention', 'redact_url', 'missing_extra']

LIVENESS_SECONDS = 3.0
"""A reading connection that has not answered for this long counts as down."""

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


def missing_extra(extra: str, module: str, exc: ImportError) -> ConfigurationError:
    """The error for a bridge whose engine's client package is not installed."""
    return ConfigurationError(
        f'a {extra} bridge needs the {module!r} package, which is not installed ({exc}); '
        f"install it with: pip install 'mpchannels[{extra}]'")
