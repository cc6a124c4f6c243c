"""The bridge's Redis engine: one Redis Stream per namespace, through redis-py's asyncio client.

* Sending: ``XADD {ns}:stream MAXLEN ~ N * d <entry>`` on its own connection; the reply
  (the entry's id) is the acknowledgement. ``XTRIM MINID`` once a second keeps no entry
  older than the retention's seconds.
* Reading: ``XREAD COUNT 64 BLOCK 1000 STREAMS {ns}:stream <last id>`` on a second
  connection, again and again: an answer (even an empty one) at least once a second
  proves the connection is alive; a command unanswered for ``LIVENESS_SECONDS`` catches
  a half-open one. A reply too large for the server's ``client-output-buffer-limit`` gets
  the connection killed: the next read asks for half as many entries.
* Reset and trimming: the key ``{ns}:epoch`` holds a random value set by the first
  bridge to connect; a Redis that lost its data (restarted without persistence, the keys
  deleted) has another one after the next bridge connects, and the readers start again
  from the stream's beginning. A stream whose first entry lies beyond the last id read
  was trimmed past it.

redis-py reconnects a dropped connection by itself on the next command, with TLS
(``rediss://``) and AUTH from the URL; the bridge only waits and tries again.

The two commands of every entry (``XADD`` on the writing connection, ``XREAD`` on the
reading one) go straight to redis-py's connection (``send_packed_command``,
``read_response``: hiredis parses the reply), packed here, each bounded by the
connection's :class:`~channels.engine.Watchdog`: the client's command layer (a lock,
retries, metrics, response callbacks, and a task of ``asyncio.wait_for`` per write
under a socket timeout) cost each bridge some 50 µs of CPU per command, more than the
rest of an entry's way. The rare commands (INFO, the epoch, XINFO, XTRIM) go through
the client, each under an ``asyncio.timeout``. Each connection has one user: the
writing one the sender task, the reading one the reader task.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any
from urllib.parse import SplitResult

from .engine import LIVENESS_SECONDS, Retention, Watchdog, missing_extra, redact_url
from .errors import ConfigurationError

__all__ = ['RedisEngine']

_READ_COUNT = 64
_BLOCK = b'1000'        # ms an XREAD waits for entries


def _pack(*args: bytes) -> bytes:
    """A command in RESP: an array of bulk strings."""
    return b''.join([b'*%d\r\n' % len(args),
                     *(b'$%d\r\n%s\r\n' % (len(arg), arg) for arg in args)])


def _id(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition('-')
    return int(ms), int(seq or 0)


class RedisEngine:
    """One Redis Stream as the bridge's engine (used by :class:`channels.bridge.Bridge`)."""

    name = 'redis'
    max_entry_bytes = 512 * 1024 * 1024 - 1024     # Redis's proto-max-bulk-len

    def __init__(self, url: str, parts: SplitResult, namespace: str,
                 retention: Retention) -> None:
        try:
            import redis.asyncio
            import redis.exceptions
        except ImportError as exc:
            raise missing_extra('redis', 'redis', exc, 'redis hiredis') from None
        self._redis = redis
        self.password = parts.password
        self.since: float | None = None       # when open() found no server
        self.url = url
        self.shown = redact_url(url)
        self.retention = retention
        self.key = f'{namespace}:stream'
        self.epoch_key = f'{namespace}:epoch'
        self.epoch: bytes | None = None
        self.position: str | None = None        # the last id read; None: the stream's end
        self._read_from = '0-0'
        self._recent_cause: tuple[float, str] | None = None
        self._last_trim = 0.0
        self._count = _READ_COUNT
        self.writer: Any = None
        self.reader: Any = None
        self._key = key = self.key.encode()
        self._writing = Watchdog(LIVENESS_SECONDS)      # the sender's commands
        self._reading = Watchdog(LIVENESS_SECONDS)      # the reader's
        # XADD key MAXLEN ~ N * d <entry>: all but the entry, packed once
        self._xadd_head = b'*8\r\n' + b''.join(
            b'$%d\r\n%s\r\n' % (len(arg), arg)
            for arg in (b'XADD', key, b'MAXLEN', b'~', b'%d' % retention.entries, b'*', b'd'))

    def _client(self, role: str) -> Any:
        from redis.backoff import NoBackoff
        from redis.asyncio.retry import Retry
        # No socket timeout of redis-py's (its writes would each make a task): every
        # command here is bounded by LIVENESS_SECONDS by a watchdog or asyncio.timeout.
        return self._redis.asyncio.Redis.from_url(
            self.url, socket_timeout=None, socket_connect_timeout=2.0,
            retry=Retry(NoBackoff(), 0), client_name=f'mpchannels-bridge-{role}',
            single_connection_client=True)

    @staticmethod
    async def _call(client: Any, packed: list[bytes], watchdog: Watchdog) -> Any:
        """Send one packed command on *client*'s connection and read its reply (a
        ResponseError raised; redis-py connects again first if the connection was
        dropped, and drops it on any failure, a timeout too)."""
        with watchdog:
            connection = client.connection or (await client.initialize()).connection
            await connection.send_packed_command(packed, check_health=False)
            return await connection.read_response()

    async def open(self) -> bool:
        """Connect and check the server: True when it answers as Redis >= 5 should,
        False when nothing answers; ConfigurationError when something else answers."""
        errors = self._redis.exceptions
        self.writer = self._client('write')
        self.reader = self._client('read')
        try:
            info = await self._timed(self.writer.info('server'))
        except errors.AuthenticationError as exc:
            if self.password is None:
                raise ConfigurationError(
                    f'Redis at {self.shown} needs a password ({exc}); put it in the bridge '
                    f'URL: redis://:password@host:port/db') from None
            raise ConfigurationError(
                f'Redis at {self.shown} refused the credentials ({exc}); put the right '
                f'user and password in the bridge URL: redis://user:password@host:port/db'
            ) from None
        except errors.ResponseError as exc:
            if 'NOAUTH' in str(exc) or 'WRONGPASS' in str(exc):
                raise ConfigurationError(
                    f'Redis at {self.shown} needs a password ({exc}); put it in the bridge '
                    f'URL: redis://:password@host:port/db') from None
            raise ConfigurationError(f'{self.shown} did not answer INFO as Redis does: '
                                     f'{exc}') from None
        except (errors.ConnectionError, errors.TimeoutError, OSError) as exc:
            if _unreachable(exc):
                self.since = time.time()
                return False
            raise ConfigurationError(
                f'{self.shown} answered, but not as a Redis server ({exc}); check the host '
                f'and port of the bridge URL (a NATS server takes nats://)') from None
        except errors.RedisError as exc:
            raise ConfigurationError(
                f'{self.shown} answered, but not as a Redis server ({exc!r}); check the host '
                f'and port of the bridge URL (a NATS server takes nats://)') from None
        version = str(info.get('redis_version', '0'))
        if int(version.split('.')[0] or 0) < 5:
            raise ConfigurationError(f'Redis at {self.shown} is version {version}; the bridge '
                                     f'needs Redis Streams (Redis 5 or newer)')
        return True

    @staticmethod
    async def _timed(awaitable: Any) -> Any:
        async with asyncio.timeout(LIVENESS_SECONDS):
            return await awaitable

    async def append(self, data: bytes, key: str | None) -> None:
        """XADD one entry; returns once Redis has it."""
        await self._call(self.writer, [self._xadd_head + b'$%d\r\n' % len(data), data,
                                       b'\r\n'], self._writing)
        now = time.time()
        if now - self._last_trim > 1.0:
            self._last_trim = now
            oldest = int((now - self.retention.seconds) * 1000)
            await self._timed(self.writer.xtrim(self.key, minid=f'{oldest}-0',
                                                approximate=False))

    async def resync(self) -> str | None:
        """After (re)connecting: find where to read from; a reason if data was lost."""
        await self._timed(self.reader.set(self.epoch_key, os.urandom(8).hex(), nx=True))
        epoch = await self._timed(self.reader.get(self.epoch_key))
        cause = None
        if self.epoch is not None and epoch != self.epoch:
            cause = ('the Redis stream was reset (Redis restarted without persistence, or '
                     'its keys were deleted)')
            self.position = '0-0'
        self.epoch = epoch
        info = await self._info()
        if self.position is None and self.since is not None:
            # Started while Redis was away: what was appended since then is ours (ids
            # are Redis's clock in ms; a second of margin for clocks that differ).
            self.position = f'{int((self.since - 1) * 1000)}-0'
        elif self.position is None:
            self.position = (info['last-generated-id'].decode()
                             if info else '0-0')
        elif cause is None and info and info.get('first-entry'):
            if _id(info['first-entry'][0]) > _id(self.position):
                cause = (f'the stream was trimmed past this broker\'s position (it keeps '
                         f'about {self.retention.entries} entries and '
                         f'{self.retention.seconds:g}s: raise the retention)')
        if cause:
            self._recent_cause = (time.monotonic(), cause)
        return cause

    async def _info(self) -> dict | None:
        try:
            return await self._timed(self.reader.xinfo_stream(self.key))
        except self._redis.exceptions.ResponseError:     # no such key
            return None

    async def read(self) -> list[bytes]:
        """The entries after the position (waiting up to a second for some)."""
        self._read_from = self.position
        count = self._count
        self._count = max(1, count // 2)     # until it succeeds: a reply too large for
        reply = await self._call(            # client-output-buffer-limit kills the link
            self.reader, [_pack(b'XREAD', b'COUNT', b'%d' % count, b'BLOCK', _BLOCK,
                               b'STREAMS', self._key, self.position.encode())],
            self._reading)
        self._count = min(_READ_COUNT, count * 2)
        if not reply:
            return []
        # [[key, [[id, [b'd', entry]], ...]]] (RESP3: {key: [...]})
        entries = (reply[0][1] if isinstance(reply, list) else next(iter(reply.values())))
        self.position = entries[-1][0].decode()
        return [fields[1] if fields[0] == b'd' else b'' for _, fields in entries]

    async def loss_cause(self) -> str | None:
        """Why entries are missing, as far as Redis can tell."""
        if self._recent_cause and time.monotonic() - self._recent_cause[0] < 30:
            return self._recent_cause[1]
        info = await self._info()
        if info and info.get('first-entry') and \
                _id(info['first-entry'][0]) > _id(self._read_from):
            return (f'the stream was trimmed past this broker\'s position (it keeps about '
                    f'{self.retention.entries} entries and {self.retention.seconds:g}s: '
                    f'raise the retention)')
        return None

    async def close(self) -> None:
        """Close both connections."""
        self._writing.close()
        self._reading.close()
        for client in (self.reader, self.writer):
            if client is not None:
                if client.connection is not None:     # also one that failed half-way
                    await client.connection.disconnect()
                await client.aclose()

    def position_text(self) -> str:
        """The last stream id read (stats)."""
        return self.position or '$'

    def save_position(self) -> Any:
        """The position and epoch, for a restarted broker (Bridge.state)."""
        return {'id': self.position, 'epoch': self.epoch.decode() if self.epoch else None}

    def load_position(self, saved: Any) -> None:
        """Resume from what save_position() returned (ValueError if it is not that)."""
        if isinstance(saved, dict) and saved.get('id'):
            position, epoch = saved['id'], saved.get('epoch')
            if not isinstance(position, str) or not isinstance(epoch, str | None):
                raise ValueError(f'not a Redis position: {saved!r:.100}')
            _id(position)                           # a stream id, or ValueError
            self.position = position
            self.epoch = epoch.encode() if epoch else None


def _unreachable(exc: BaseException) -> bool:
    """True for 'nothing listens there' (refused, no route, DNS), not for a wrong answer."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, (ConnectionRefusedError, ConnectionResetError)) or (
                isinstance(cause, OSError) and cause.errno in (111, 113, 101, 99, -2, -3)):
            return True
        cause = cause.__cause__ or cause.__context__
    text = str(exc)
    return any(s in text for s in ('Connection refused', 'Error 111', 'Error 113',
                                   'Name or service not known', 'No route to host',
                                   'Temporary failure in name resolution',
                                   'Timeout connecting'))
