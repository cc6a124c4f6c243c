"""The bridge's NATS engine: one JetStream stream per namespace, through nats-py.

* The stream ``{ns}`` (file storage) holds the subject ``{ns}.entries``, limited to the
  retention's entries (``max_msgs``) and seconds (``max_age``), discarding the oldest.
* Sending: a JetStream publish per entry, its reply subject one of this engine's own
  inbox (``{inbox}.{n}``, one subscription for all); the PubAck on it is the
  acknowledgement. A data entry carries ``Nats-Msg-Id``, so JetStream itself drops most
  resends within its duplicate window (the receivers drop the rest).
* Reading: a push consumer of our own (ephemeral, in memory, no acks; flow control and
  idle heartbeats) from the stream sequence after the last one read, onto a plain
  subscription. nats-py's ordered consumer would do the same, but answers the server's
  flow control requests from a task that looks every 250 ms, and the server holds back
  deliveries meanwhile (stalls of 60 to 350 ms at 2,000 entries/s); here each is
  answered as it comes, after the entries before it. A delivery whose consumer sequence
  is not the next one (nats-py dropped some: its pending limits), a heartbeat that says
  the consumer sent more than was received, or one that says it is gone, makes the
  reader subscribe again from the last stream sequence read. After every reconnect the
  bridge checks the stream: recreated (another ``created`` time, or its sequence went
  back) means the server lost its data; a first sequence beyond the last one read means
  entries were removed by the limits before this broker read them.
* Liveness: nats-py pings the server every second and gives up on the connection after
  two unanswered pings; an idle reader also flushes (a round trip) once a second, and
  counts as down when the consumer has sent nothing, not even a heartbeat, for
  ``LIVENESS_SECONDS``. A consumer that sends heartbeats but no entry for that long,
  while the stream holds entries past the last one read, is made again (every bridge
  appends an entry each idle second, so a working consumer is never that quiet).

nats-py does reconnecting, TLS (``tls://``) and user/password or token auth from the URL.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from typing import Any
from urllib.parse import SplitResult

from .engine import LIVENESS_SECONDS, Retention, Watchdog, missing_extra, redact_url
from .errors import ConfigurationError

__all__ = ['NatsEngine']

logger = logging.getLogger(__name__)

_DUPLICATE_WINDOW = 120.0
_HEARTBEAT_SECONDS = 1.0      # the consumer's idle heartbeat
_STATUS = 'Status'


class NatsEngine:
    """One JetStream stream as the bridge's engine (used by :class:`channels.bridge.Bridge`)."""

    name = 'nats'

    def __init__(self, url: str, parts: SplitResult, namespace: str,
                 retention: Retention) -> None:
        try:
            import nats
            import nats.errors
            import nats.js.api
            import nats.js.errors
        except ImportError as exc:
            raise missing_extra('nats', 'nats-py', exc, 'nats-py') from None
        self._nats = nats
        self.url = url
        self.shown = redact_url(url)
        self.host = parts.hostname
        self.port = parts.port or 4222
        self.retention = retention
        self.stream = namespace
        self.subject = f'{namespace}.entries'
        self.max_entry_bytes = 1024 * 1024 - 4096
        self.position: int | None = None      # the last stream sequence read
        self.created: str | None = None       # the stream's creation time, as last seen
        self.since: float | None = None       # when open() found no server
        self.nc: Any = None
        self.js: Any = None
        self.sub: Any = None                  # the consumer's deliveries
        self._acks: Any = None                # PubAcks, for every publish
        self._ack_prefix = ''
        self._ack_futures: dict[str, asyncio.Future] = {}
        self._ack_numbers = itertools.count(1)
        self._delivered = 0                   # the consumer sequence of the last delivery
        self._heard = 0.0                     # when the consumer last sent something
        self._entry_heard = 0.0               # ... last delivered an entry
        self._next_probe = 0.0                # when the stream may be looked at again
        self._broken: str | None = None       # why the consumer must be made again
        self._buffer: list[bytes] = []
        self._publishing = Watchdog(LIVENESS_SECONDS)
        self._ticker: asyncio.TimerHandle | None = None
        self._ticked = False                  # a second passed (the reader's idle checks)
        self._arrived = asyncio.Event()
        self._down = False
        self._recent_cause: tuple[float, str] | None = None
        self._gap_cause: str | None = None
        self._connecting = asyncio.Lock()

    # connecting ------------------------------------------------------------------------

    async def open(self) -> bool:
        """Connect and make sure of the stream: True when up, False when nothing
        answers; ConfigurationError when something else answers."""
        up = await self._connect()
        if not up:
            self.since = time.time()
        return up

    async def _probe(self) -> bool:
        """False if nothing listens; ConfigurationError if what listens is not NATS (a
        NATS server sends ``INFO`` first, in plain text even for TLS)."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), 2.0)
        except (OSError, TimeoutError):
            return False
        try:
            greeting = await asyncio.wait_for(reader.read(5), 2.0)
        except (OSError, TimeoutError):
            greeting = b''
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
        if greeting != b'INFO ':
            raise ConfigurationError(
                f'{self.shown} answered, but not as a NATS server (it sent {greeting!r} '
                f'instead of INFO); check the host and port of the bridge URL (a Redis '
                f'server takes redis://)')
        return True

    async def _connect(self) -> bool:
        async with self._connecting:
            if self.nc is not None and not self.nc.is_closed:
                return self.nc.is_connected
            if not await self._probe():
                return False
            nats = self._nats
            nc = nats.NATS()
            try:
                # The first attempt fails at once (a wrong password is not retried for
                # ever); once connected, nats-py reconnects without end.
                await nc.connect(
                    self.url, name='mpchannels-bridge', connect_timeout=2,
                    allow_reconnect=False, max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25, ping_interval=1, max_outstanding_pings=2,
                    error_cb=self._error, disconnected_cb=self._disconnected,
                    reconnected_cb=self._reconnected)
            except (OSError, TimeoutError, nats.errors.Error) as exc:
                await self._discard(nc)
                if isinstance(exc, nats.errors.Error) and \
                        not isinstance(exc, nats.errors.NoServersError):
                    if 'authorization' in str(exc).lower():
                        raise self._auth_error(exc) from None
                    raise ConfigurationError(f'NATS at {self.shown} refused the '
                                             f'connection: {exc}') from None
                return False
            nc.options['allow_reconnect'] = True
            self.nc = nc
            self.js = self.nc.jetstream(timeout=2.0)
            self.max_entry_bytes = min(self.max_entry_bytes, self.nc.max_payload - 4096)
            await self._ensure_stream()
            # one subscription for the PubAcks of every publish (nats-py renews it
            # after a reconnect): a request of nats-py's makes a task per publish
            self._ack_prefix = nc.new_inbox() + '.'
            self._acks = await nc.subscribe(self._ack_prefix + '*', cb=self._on_ack)
            self._down = False
            return True

    @staticmethod
    async def _discard(nc: Any) -> None:
        """Close what a failed first connect left open (nats-py leaves its socket)."""
        transport = getattr(nc, '_transport', None)
        try:
            if transport is not None:
                transport.close()
                await asyncio.wait_for(transport.wait_closed(), 1.0)
        except Exception:
            pass
        try:
            await asyncio.wait_for(nc.close(), 1.0)
        except Exception:
            pass

    def _auth_error(self, exc: BaseException) -> ConfigurationError:
        return ConfigurationError(
            f'NATS at {self.shown} refused the credentials ({exc}); put the right ones in '
            f'the bridge URL: nats://user:password@host:port or nats://token@host:port')

    async def _ensure_stream(self) -> Any:
        api = self._nats.js.api
        config = api.StreamConfig(
            name=self.stream, subjects=[self.subject], storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS, discard=api.DiscardPolicy.OLD,
            max_msgs=self.retention.entries, max_age=float(self.retention.seconds),
            duplicate_window=min(_DUPLICATE_WINDOW, float(self.retention.seconds)))
        errors = self._nats.js.errors
        try:
            return await self.js.add_stream(config)
        except errors.BadRequestError:          # it exists with other limits: ours now
            return await self.js.update_stream(config)
        except (errors.NoStreamResponseError, self._nats.errors.NoRespondersError,
                errors.ServiceUnavailableError) as exc:
            raise ConfigurationError(
                f'NATS at {self.shown} has no JetStream ({exc!r}); start nats-server with '
                f'-js (and a store directory, -sd DIR)') from None
        except errors.APIError as exc:
            raise ConfigurationError(f'NATS at {self.shown} refused the stream '
                                     f'{self.stream!r} ({exc}); check the retention and the '
                                     f'account\'s JetStream limits') from None

    async def _error(self, exc: Exception) -> None:
        logger.debug('nats: %r', exc)

    async def _disconnected(self) -> None:
        self._down = True
        self._arrived.set()

    async def _reconnected(self) -> None:
        self._arrived.set()

    # sending and reading ---------------------------------------------------------------

    async def append(self, data: bytes, key: str | None) -> None:
        """Publish one entry; returns once JetStream acknowledged it."""
        if self.nc is None or self.nc.is_closed:
            if not await self._connect():
                raise ConnectionError(f'{self.shown} does not answer')
        if not self.nc.is_connected:
            raise ConnectionError(f'not connected to {self.shown}')
        token = str(next(self._ack_numbers))
        future = self._ack_futures[token] = asyncio.get_running_loop().create_future()
        try:
            with self._publishing:
                await self.nc.publish(self.subject, data, reply=self._ack_prefix + token,
                                      headers={'Nats-Msg-Id': key} if key else None)
                await future
        except self._nats.js.errors.NoStreamResponseError:
            await self._ensure_stream()        # the server lost the stream: make it again
            raise
        finally:
            self._ack_futures.pop(token, None)

    async def _on_ack(self, msg: Any) -> None:
        future = self._ack_futures.get(msg.subject[len(self._ack_prefix):])
        if future is None or future.done():
            return                             # given up on (a timeout)
        if msg.headers and msg.headers.get(_STATUS) == '503':
            future.set_exception(self._nats.js.errors.NoStreamResponseError())
        elif b'"error"' in msg.data:
            error = json.loads(msg.data).get('error') or {}
            future.set_exception(self._nats.js.errors.APIError.from_error(error))
        else:
            future.set_result(None)            # {"stream": ..., "seq": ...}

    async def resync(self) -> str | None:
        """After (re)connecting: check the stream, subscribe after the last sequence read."""
        if self.nc is None or self.nc.is_closed:
            if not await self._connect():
                raise ConnectionError(f'{self.shown} does not answer')
        if not self.nc.is_connected:
            raise ConnectionError(f'not connected to {self.shown}')
        if self.sub is not None:
            sub, self.sub = self.sub, None
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        info = await self._ensure_stream()
        api = self._nats.js.api
        state = info.state
        created = str(info.created)
        cause = None
        start = {'deliver_policy': api.DeliverPolicy.BY_START_SEQUENCE}
        if self.position is None and self.since is not None:
            # Started while the server was away: what was appended since then is ours.
            start = {'deliver_policy': api.DeliverPolicy.BY_START_TIME,
                     'opt_start_time': time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(
                         self.since - 1)) + 'Z'}
        elif self.position is None:
            self.position = state.last_seq
        elif (self.created is not None and created != self.created) \
                or state.last_seq < self.position:
            cause = ('the JetStream stream was recreated (the NATS server lost its store, or '
                     'the stream was deleted)')
            self.position = 0
        elif state.messages and state.first_seq > self.position + 1:
            cause = self._trimmed(state.first_seq - self.position - 1)
        self.created = created
        self._down = False            # (what _buffer holds is read: position is past it)
        if self.position is not None:
            start['opt_start_seq'] = self.position + 1
        await self._consume(start)
        if cause:
            self._recent_cause = (time.monotonic(), cause)
        return cause

    async def _consume(self, start: dict) -> None:
        """Subscribe to a new inbox, then make the consumer that delivers there."""
        api = self._nats.js.api
        deliver = self.nc.new_inbox()

        async def on_delivery(msg: Any) -> None:    # (one call at a time, in order)
            if sub is self.sub:                      # not one left from before a resync
                await self._on_delivery(msg)

        self._delivered = 0
        self._broken = None
        self._heard = self._entry_heard = time.monotonic()
        sub = self.sub = await self.nc.subscribe(deliver, cb=on_delivery)
        await self.js.add_consumer(self.stream, api.ConsumerConfig(
            deliver_subject=deliver, filter_subject=self.subject,
            ack_policy=api.AckPolicy.NONE, max_deliver=1, flow_control=True,
            idle_heartbeat=_HEARTBEAT_SECONDS, mem_storage=True, num_replicas=1, **start))

    def _trimmed(self, entries: int) -> str:
        return (f'{entries} stream entries were removed by the stream limits before this '
                f'broker read them (it keeps {self.retention.entries} entries for '
                f'{self.retention.seconds:g}s: raise the retention)')

    async def _on_delivery(self, msg: Any) -> None:
        self._heard = time.monotonic()
        headers = msg.headers
        if headers and _STATUS in headers:
            await self._on_status(msg, headers)
            return
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>
        # (or with <domain>.<account hash> after ACK, and a token at the end)
        tokens = msg.reply.split('.')
        if len(tokens) >= 11:
            del tokens[2:4]
        sequence, delivered = int(tokens[5]), int(tokens[6])
        if delivered != self._delivered + 1:
            self._break(f'the consumer delivered {delivered} after {self._delivered}')
            return
        self._delivered = delivered
        self._entry_heard = self._heard
        if self.position is not None:
            if sequence <= self.position:
                return                           # delivered again after a consumer reset
            if sequence > self.position + 1:
                self._gap_cause = self._trimmed(sequence - self.position - 1)
        self.position = sequence
        self._buffer.append(msg.data)
        self._arrived.set()

    async def _on_status(self, msg: Any, headers: dict) -> None:
        """A flow control request (answered now: the entries before it are read), an
        idle heartbeat (checked against what was delivered), or the consumer's end."""
        if headers[_STATUS] != '100':
            self._break(f'the consumer ended: {headers[_STATUS]} '
                        f'{headers.get("Description", "")}'.rstrip())
        elif msg.reply:
            await self.nc.publish(msg.reply)
        else:
            stalled = headers.get('Nats-Consumer-Stalled')
            if stalled:
                await self.nc.publish(stalled)
            last = headers.get('Nats-Last-Consumer')
            if last is not None and int(last) != self._delivered:
                self._break(f'the consumer delivered {last} entries, {self._delivered} '
                            f'arrived')

    def _break(self, why: str) -> None:
        """The consumer lost deliveries or is gone: the reader subscribes again."""
        if self._broken is None:
            self._broken = why
            self._arrived.set()

    async def read(self) -> list[bytes]:
        """The entries delivered since the last call (waiting up to a second for some)."""
        self._check()
        if self._ticker is None:
            self._tick()
        while not self._buffer:
            await self._arrived.wait()
            self._arrived.clear()
            self._check()
            if not self._buffer and self._ticked:      # about once a second: back to
                self._ticked = False                   # the bridge, for its on_tick
                quiet = time.monotonic() - self._heard
                if quiet > LIVENESS_SECONDS:
                    self._break(f'the consumer sent nothing for {LIVENESS_SECONDS:g}s')
                    self._check()
                if quiet >= 1.0:                       # not even a heartbeat:
                    await self.nc.flush(timeout=LIVENESS_SECONDS)    # is the link alive?
                else:
                    await self._probe_stream()
                    self._check()
                return []
        self._ticked = False
        entries, self._buffer = self._buffer, []
        return entries

    def _tick(self) -> None:
        """About once a second, wake the reader for its idle checks (one timer, not a
        timeout per wait)."""
        self._ticked = True
        self._arrived.set()
        self._ticker = asyncio.get_running_loop().call_later(1.0, self._tick)

    async def _probe_stream(self) -> None:
        """A consumer that sends heartbeats but no entries while the stream has entries
        past the last one read (seen after an operator deleted the consumer and the
        stream in turn) is made again. Every bridge appends a heartbeat entry each idle
        second, so a working consumer delivers at least that often: the stream is looked
        at only after LIVENESS_SECONDS without an entry, and at most that often."""
        now = time.monotonic()
        if now - self._entry_heard < LIVENESS_SECONDS or now < self._next_probe \
                or self.position is None:
            return
        self._next_probe = now + LIVENESS_SECONDS
        info = await asyncio.wait_for(self.js.stream_info(self.stream), LIVENESS_SECONDS)
        if info.state.last_seq > self.position:
            self._break(f'the stream holds entries up to {info.state.last_seq} and the '
                        f'consumer sent none after {self.position} for '
                        f'{now - self._entry_heard:.1f}s')

    def _check(self) -> None:
        if self._down or self.nc is None or not self.nc.is_connected:
            raise ConnectionError(f'disconnected from {self.shown}')
        if self._broken is not None:
            raise ConnectionError(f'reading from {self.shown} again: {self._broken}')

    async def loss_cause(self) -> str | None:
        """Why entries are missing, as far as JetStream can tell."""
        cause, self._gap_cause = self._gap_cause, None
        if cause:
            return cause
        if self._recent_cause and time.monotonic() - self._recent_cause[0] < 30:
            return self._recent_cause[1]
        return None

    async def close(self) -> None:
        """Close the connection (without waiting for a server that does not answer)."""
        self._publishing.close()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for sub in (self.sub, self._acks):
            if sub is not None:
                try:
                    await asyncio.wait_for(sub.unsubscribe(), 0.5)
                except Exception:
                    pass
        self.sub = self._acks = None
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()

    def position_text(self) -> str:
        """The last stream sequence read (stats)."""
        return str(self.position) if self.position is not None else '$'

    def save_position(self) -> Any:
        """The sequence and the stream's creation time, for a restarted broker."""
        return {'seq': self.position, 'created': self.created}

    def load_position(self, saved: Any) -> None:
        """Resume from what save_position() returned (ValueError if it is not that)."""
        if isinstance(saved, dict) and saved.get('seq') is not None:
            sequence, created = saved['seq'], saved.get('created')
            if type(sequence) is not int or sequence < 0 or not isinstance(created, str | None):
                raise ValueError(f'not a JetStream position: {saved!r:.100}')
            self.position = sequence
            self.created = created
