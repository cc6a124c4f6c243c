"""The bridge: this machine's broker and the other machines' brokers, through an engine.

::

    routing thread --publish(frames)--> pending chunks --sender task--> engine stream
                                                                   (Redis Stream, JetStream)
    on_frames(frames) <--reader task-- drop own, drop seen, find gaps <--------+

Both tasks run on one asyncio loop, on the thread ``channels-bridge`` that the
:class:`Bridge` owns (started by ``start()``, stopped and joined by ``stop()``);
``on_frames`` and ``on_lost`` are always called on that thread. The engine's client
(redis-py, nats-py) is imported only when a bridge is configured
(:mod:`channels.bridge_redis`, :mod:`channels.bridge_nats`).

The engine carries *entries*: the bytes of whole MESSAGE frames (our wire format, never
decoded here) behind a header naming the origin broker, its incarnation (random, new at
every start) and the number of its first message::

    !2sBBQQI   magic b'MB', version, origin length, incarnation, first number, count
    origin     the broker id, UTF-8
    frames     count MESSAGE frames, concatenated (nothing when count is 0: a heartbeat)

Every message a broker publishes gets the next number, dropped ones too, so a receiver
that sees an origin's numbers jump knows exactly how many of its messages it will never
get (trimmed from the stream, lost by an engine without persistence, dropped by the
sender over its bound) and reports them through ``on_lost``; numbers it has seen are
duplicates (an entry sent again after a reconnect) and are dropped. An entry, once made,
is sent unchanged until the engine acknowledges it, one at a time, so each origin's
entries are in the stream in order. A broker that sends nothing for a second appends a
heartbeat (count 0): its peers see it is alive and, from its number, whether they missed
something.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

from . import wire
from .engine import Retention, redact_url
from .errors import ChannelsError, ConfigurationError

__all__ = ['Bridge', 'Retention', 'redact_url', 'BridgeError']

logger = logging.getLogger(__name__)

_ENTRY = struct.Struct('!2sBBQQI')
_MIN_FRAME = wire.HEADER.size + wire.MESSAGE_HEADER.size    # the smallest MESSAGE frame
_MAGIC = b'MB'
_VERSION = 1

HEARTBEAT_SECONDS = 1.0
"""A broker that sent nothing for this long appends a heartbeat entry."""

TICK_SECONDS = 1.0
"""``on_tick`` is called about this often."""

MAX_ENTRY_BYTES = 256 * 1024
"""Publish calls are coalesced into entries of up to about this size."""

_NAMESPACE = re.compile(r'[A-Za-z0-9_-]{1,64}\Z')
_ENGINES = {'redis': 'redis', 'rediss': 'redis', 'nats': 'nats', 'tls': 'nats'}


class BridgeError(ChannelsError, ConnectionError):
    """The engine answered, but not as a usable Redis or NATS JetStream server would."""


def _parse_url(url: str) -> tuple[str, SplitResult]:
    """(engine name, the split URL), or ConfigurationError saying what is wrong."""
    if not isinstance(url, str) or not url:
        raise ConfigurationError(f'bridge URL must be a non-empty str, got {url!r}')
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f'bridge URL {shown!r} is not valid ({exc}); use '
                                 f'redis://[user:password@]host:port/db, rediss://..., '
                                 f'nats://host:port or tls://host:port') from None
    engine = _ENGINES.get(parts.scheme)
    if engine is None:
        raise ConfigurationError(f'bridge URL {shown!r} has scheme {parts.scheme!r}; use '
                                 f'redis://, rediss:// (Redis) or nats://, tls:// (NATS)')
    if not parts.hostname:
        raise ConfigurationError(f'bridge URL {shown!r} names no host; write it as '
                                 f'{parts.scheme}://host:port')
    if port == 0:
        raise ConfigurationError(f'bridge URL {shown!r} has port 0')
    if engine == 'redis':
        db = parts.path.lstrip('/')
        if db and not db.isdigit():
            raise ConfigurationError(f'bridge URL {shown!r}: the Redis database must be a '
                                     f'number (redis://host:port/0), got {db!r}')
    elif parts.path not in ('', '/'):
        raise ConfigurationError(f'bridge URL {shown!r}: a NATS URL has no path; the '
                                 f'namespace names the stream')
    return engine, parts


def _new_loop() -> asyncio.AbstractEventLoop:
    """The bridge thread's event loop: uvloop's where it is installed (the ``redis`` and
    ``nats`` extras bring it), else asyncio's. At a few thousand entries a second each
    entry is a few wake-ups of the loop, and uvloop's take about a quarter less of the
    bridge's CPU per entry (its loop, timers and transports are C)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _fitting(frames: bytes, room: int) -> tuple[int, int]:
    """How many of the first whole *frames* fit in *room* bytes, and their size."""
    count = size = 0
    for _, _, end in wire.iter_frames(frames, len(frames)):
        if end > room:
            break
        count, size = count + 1, end
    return count, size


@dataclass
class _Entry:
    first: int
    count: int
    data: bytes          # header + frames, as it goes to the engine
    size: int            # bytes of frames it holds (counted in the pending bound)


class _Origin:
    __slots__ = ('incarnation', 'last', 'heard')

    def __init__(self, incarnation: int, last: int) -> None:
        self.incarnation = incarnation
        self.last = last
        self.heard = time.monotonic()


class Bridge:
    """This broker's link to the other machines' brokers through a Redis Stream or a
    NATS JetStream stream named after *namespace*. Make one with :meth:`from_url`.

    ``publish()`` never blocks; ``on_frames(frames)`` gets the other brokers' MESSAGE
    frames in stream order, each origin's messages exactly once and in its order;
    ``on_lost(count, reason)`` is called once per loss (messages gone for good), and
    ``on_lost`` / ``on_frames`` run on the bridge's own thread, one call at a time.
    ``on_frames`` raises (having taken none of them) for frames it cannot read: the
    entries are then handed over one at a time, and the messages of each entry that
    fails again are told lost through ``on_lost``. Exceptions ``on_lost`` raises are
    logged and the bridge goes on. Thread-safe: ``publish``,
    ``stats`` and ``state`` may be called from any thread.
    """

    def __init__(self, engine: Any, url: str, namespace: str, *, broker_id: str,
                 on_frames: Callable[[bytes], None], on_lost: Callable[[int, str], None],
                 max_pending_bytes: int, retention: Retention, echo: bool,
                 state: dict | None, on_tick: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.url = redact_url(url)
        self.namespace = namespace
        self.broker_id = broker_id
        self.on_frames = on_frames
        self.on_lost = on_lost
        self.on_tick = on_tick
        self.max_pending_bytes = max_pending_bytes
        self.retention = retention
        self.echo = echo
        self.incarnation = int.from_bytes(os.urandom(8), 'big')
        self._origin_bytes = broker_id.encode()
        self._lock = threading.Lock()
        self._chunks: deque[tuple[int, int, bytes]] = deque()
        self._next = 1                  # the number of this broker's next message
        self._pending_bytes = 0         # frames published and not yet acknowledged
        self._pending_messages = 0
        self._sender_idle = False
        self._drops = 0                 # dropped over the bound, not yet reported
        self._inflight: _Entry | None = None
        self._origins: dict[str, _Origin] = {}
        self._own_read = False          # an entry of this incarnation was read back
        self._twins: set[int] = set()   # incarnations of others using this id, logged
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake: asyncio.Event | None = None
        self._last_sent = 0.0             # when the engine last acknowledged an entry
        self._beat_timer: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self._halting = False             # the loop's own view of stopping
        self._drain_until = 0.0           # stop(): until when pending messages may go out
        self._started = False
        self._connected = False
        self._failing: set[str] = set()   # 'send', 'read': the sides failing now
        self._down_since: float | None = None
        self._last_error = ''
        self.sent = 0
        self.received = 0
        self.lost = 0
        self.dropped = 0                # this broker's messages never sent (bound, size, stop)
        self.dropped_reasons: dict[str, int] = {}
        self.duplicates = 0
        self.entries_sent = 0
        self.entries_received = 0
        self.reconnects = 0
        self.lost_reasons: dict[str, int] = {}
        if state:
            self._load_state(state)

    # construction ------------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, namespace: str = 'mpchannels', *, broker_id: str,
                 on_frames: Callable[[bytes], None], on_lost: Callable[[int, str], None],
                 max_pending_bytes: int = 64 * 1024 * 1024,
                 retention: Retention = Retention(), echo: bool = False,
                 state: dict | None = None,
                 on_tick: Callable[[], None] | None = None) -> Bridge:
        """A bridge to the engine at *url* (``redis://[user:password@]host:port/db``,
        ``rediss://...``, ``nats://[user:password@]host:port``, ``tls://...``).

        *broker_id* names this broker to the others (unique per machine); *echo* also
        hands this broker's own entries to ``on_frames``, in the stream's order (for
        routing every message in the engine's one order); *state* is what
        :meth:`state` returned before a restart, to resume from that position;
        *on_tick* is called on the bridge thread about once a second, between reads
        (where :meth:`state` is consistent: the broker saves it there).
        Raises :class:`ConfigurationError` for a bad URL, namespace or bound, or when
        the engine's client package (the ``redis`` or ``nats`` extra) is missing.
        """
        engine_name, parts = _parse_url(url)
        if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
            raise ConfigurationError(f'bridge namespace must be 1-64 letters, digits, "_" '
                                     f'or "-", got {namespace!r}')
        if not isinstance(broker_id, str) or not broker_id or len(broker_id.encode()) > 255:
            raise ConfigurationError(f'broker_id must be a non-empty str of at most 255 '
                                     f'bytes, got {broker_id!r}')
        if type(max_pending_bytes) is not int or max_pending_bytes < 1:
            raise ConfigurationError(f'max_pending_bytes must be an int >= 1, got '
                                     f'{max_pending_bytes!r}')
        if engine_name == 'redis':
            from .bridge_redis import RedisEngine as engine_class
        else:
            from .bridge_nats import NatsEngine as engine_class
        engine = engine_class(url, parts, namespace, retention)   # checks the import
        return cls(engine, url, namespace, broker_id=broker_id, on_frames=on_frames,
                   on_lost=on_lost, max_pending_bytes=max_pending_bytes,
                   retention=retention, echo=echo, state=state, on_tick=on_tick)

    def __repr__(self) -> str:
        state = 'connected' if self._connected else 'disconnected'
        return (f'<Bridge {self.url} {self.namespace!r} {state} sent={self.sent} '
                f'received={self.received} lost={self.lost}>')

    def __enter__(self) -> Bridge:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def thread(self) -> threading.Thread | None:
        """The bridge's thread, once started (it runs the engine client's event loop)."""
        return self._thread

    # lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Connect and start the bridge thread.

        Raises :class:`ConfigurationError` (a wrong password, a server that is not
        Redis / NATS with JetStream) or :class:`BridgeError`, and leaves nothing
        running. An engine that does not answer at all (nothing listening, unreachable)
        is not an error: the bridge logs a WARNING and keeps connecting in the background
        while publish() keeps what it is given, up to its bound.
        """
        if self._started:
            raise RuntimeError('a Bridge can be started once')
        self._started = True
        ready = threading.Event()
        outcome: list[BaseException | None] = []
        self._thread = threading.Thread(target=self._run, args=(ready, outcome),
                                        name='channels-bridge', daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or not outcome:
            self.stop(timeout=5)
            raise BridgeError(f'the bridge to {self.url} did not start within {timeout}s')
        error = outcome[0]
        if error is not None:
            self._thread.join(5)
            raise error

    def _run(self, ready: threading.Event, outcome: list) -> None:
        loop = _new_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main(ready, outcome))
        finally:
            try:
                # What the clients left behind (nats-py's consumer checks): cancelled.
                left = asyncio.all_tasks(loop)
                for task in left:
                    task.cancel()
                loop.run_until_complete(asyncio.wait_for(
                    asyncio.gather(*left, return_exceptions=True), 1.0))
            except BaseException:
                logger.debug('tasks left on the bridge loop did not end', exc_info=True)
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
            if not ready.is_set():
                outcome.append(BridgeError('the bridge thread ended before it started'))
                ready.set()

    async def _main(self, ready: threading.Event, outcome: list) -> None:
        self._wake = asyncio.Event()
        self._stop_event = asyncio.Event()
        try:
            up = await self.engine.open()
        except ChannelsError as exc:
            outcome.append(exc)
            ready.set()
            await self._close_engine()
            return
        except BaseException as exc:  # an unexpected failure: still report it at start
            outcome.append(BridgeError(f'the bridge to {self.url} failed to start: '
                                       f'{exc!r}'))
            ready.set()
            await self._close_engine()
            return
        resynced = False
        if up:
            try:    # a fresh bridge reads what is appended after start() returns
                await self._resync()
                resynced = True
                self._mark_up()
            except Exception as exc:
                if self._halting:
                    return
                self._mark_down(f'reading failed: {exc!r}')
        else:
            self._mark_down(f'{self.url} does not answer')
        outcome.append(None)
        ready.set()
        self._tasks = [asyncio.create_task(self._send_loop(), name='bridge-send'),
                       asyncio.create_task(self._read_loop(not resynced), name='bridge-read')]
        await self._stop_event.wait()
        await self._drain()
        self._halting = True
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=1.0)
        await self._close_engine()
        self._report_unsent()

    async def _drain(self) -> None:
        """At stop: while connected, until the drain deadline, let the sender have the
        engine acknowledge what waits (an engine that does not answer ends it soon: the
        sender's timeout marks the bridge down)."""
        while time.monotonic() < self._drain_until and self._connected and (
                self._inflight is not None or self._pending_messages):
            self._wake.set()
            await asyncio.sleep(0.005)

    def _report_unsent(self) -> None:
        with self._lock:
            unsent = self._pending_messages + self._drops
            self._pending_messages = self._pending_bytes = self._drops = 0
            self._chunks.clear()
        self._inflight = None
        if unsent:
            self._drop(unsent, f'the broker stopped before {self.url} acknowledged them')

    async def _close_engine(self) -> None:
        try:
            await asyncio.wait_for(self.engine.close(), 1.5)
        except BaseException:
            logger.debug('closing the bridge engine failed', exc_info=True)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the tasks, close the engine's connections and join the thread, within
        *timeout* seconds; True if the thread ended. What was published and not yet
        acknowledged gets up to half of *timeout* (less 3 s, the engine's answer time)
        to be sent while the engine answers; what is left is dropped: logged as a
        WARNING with its count and counted in ``stats()['dropped']`` (the other
        machines cannot see that gap: this incarnation sends no more). Idempotent."""
        if not self._stopping:
            self._drain_until = time.monotonic() + max(0.0, min(timeout / 2, timeout - 3.0))
        self._stopping = True
        loop, thread = self._loop, self._thread
        if thread is None:
            return True
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._request_stop)
            except RuntimeError:      # the loop is already closed
                pass
        thread.join(timeout)
        if thread.is_alive():
            logger.warning('the bridge thread did not stop within %.3gs', timeout)
            return False
        return True

    def _request_stop(self) -> None:
        stop_event = getattr(self, '_stop_event', None)
        if stop_event is not None:
            stop_event.set()

    # publishing (routing thread) -----------------------------------------------------------

    def publish(self, frames: bytes, count: int) -> bool:
        """Queue *count* whole MESSAGE frames (*frames*, concatenated) for the other
        brokers; never blocks. False if some were dropped because what waits for the
        engine would exceed ``max_pending_bytes`` (the first frames that fit are kept):
        logged, counted in ``stats()['dropped']``, and seen as a gap by the receivers,
        which report them through their ``on_lost`` (not through this bridge's: this
        machine's processes had them, or, with *echo*, see the same gap)."""
        size = len(frames)
        with self._lock:
            first = self._next
            self._next = first + count
            kept = count
            if self._pending_bytes + size > self.max_pending_bytes or self._stopping:
                kept, size = (0, 0) if self._stopping else \
                    _fitting(frames, self.max_pending_bytes - self._pending_bytes)
                frames = frames[:size]
                self._drops += count - kept
                report = self._drops == count - kept
            else:
                report = False
            wake = False
            if kept:
                self._chunks.append((first, kept, frames))
                self._pending_bytes += size
                self._pending_messages += kept
                wake = self._sender_idle
                self._sender_idle = False
        loop = self._loop
        if (report or wake) and loop is not None:
            try:
                loop.call_soon_threadsafe(self._report_drops if report else self._wake.set)
            except RuntimeError:
                pass
        return kept == count

    def _report_drops(self) -> None:
        # Called soon after the first drop of an episode: gathers what was dropped by then.
        self._wake.set()
        self._loop.call_later(0.05, self._report_drops_now)

    def _report_drops_now(self) -> None:
        with self._lock:
            count, self._drops = self._drops, 0
        if count:
            self._drop(count, f'the bridge backlog was over its bound of '
                              f'{self.max_pending_bytes} bytes while {self.url} was slow '
                              f'or unreachable')

    # the sender task ---------------------------------------------------------------------

    def _make_entry(self) -> _Entry | None:
        """The next entry from the pending chunks: consecutive numbers, up to
        MAX_ENTRY_BYTES (at least one chunk). None when nothing waits."""
        limit = self.engine.max_entry_bytes
        with self._lock:
            chunks = self._chunks
            if not chunks:
                self._sender_idle = True
                return None
            first, count, frames = chunks.popleft()
            parts = [frames]
            size = len(frames)
            while chunks:
                next_first, next_count, next_frames = chunks[0]
                if next_first != first + count or size + len(next_frames) > MAX_ENTRY_BYTES:
                    break
                chunks.popleft()
                parts.append(next_frames)
                count += next_count
                size += len(next_frames)
        data = b''.join([self._header(first, count), *parts])
        if len(data) > limit:
            with self._lock:
                self._pending_bytes -= size
                self._pending_messages -= count
            self._drop(count, f'a message of {size} bytes is larger than what {self.url} '
                              f'takes in one entry ({limit} bytes)')
            return self._make_entry()
        return _Entry(first, count, data, size)

    def _header(self, first: int, count: int) -> bytes:
        return _ENTRY.pack(_MAGIC, _VERSION, len(self._origin_bytes), self.incarnation,
                           first, count) + self._origin_bytes

    async def _send_loop(self) -> None:
        self._last_sent = time.monotonic()
        self._beat_due()
        try:
            await self._sending()
        finally:
            if self._beat_timer is not None:
                self._beat_timer.cancel()

    def _beat_due(self) -> None:
        """The timer of the heartbeat: wakes the sender once nothing was sent for
        HEARTBEAT_SECONDS. One timer that moves itself on (a timeout per wait would be
        a timer scheduled and cancelled per entry)."""
        left = self._last_sent + HEARTBEAT_SECONDS - time.monotonic()
        if left <= 0:
            self._wake.set()
            left = HEARTBEAT_SECONDS
        self._beat_timer = self._loop.call_later(left, self._beat_due)

    async def _sending(self) -> None:
        backoff = 0.05
        while True:
            entry = self._inflight
            if entry is None:
                entry = self._make_entry()
                if entry is None:
                    if time.monotonic() < self._last_sent + HEARTBEAT_SECONDS:
                        await self._wake.wait()
                        self._wake.clear()
                        continue
                    with self._lock:
                        beat = self._next
                    entry = _Entry(beat, 0, self._header(beat, 0), 0)
                self._inflight = entry
            try:
                await self.engine.append(entry.data, entry.count and
                                         f'{self.broker_id}.{self.incarnation}.{entry.first}')
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._halting:       # a client may turn cancelling into its own error
                    return
                self._mark_down(f'sending failed: {exc!r}', 'send')
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            if self._failing:
                self._mark_up('send')
            self._last_sent = time.monotonic()
            self._inflight = None
            if entry.count:
                with self._lock:
                    self._pending_bytes -= entry.size
                    self._pending_messages -= entry.count
                self.sent += entry.count
                self.entries_sent += 1

    # the reader task ---------------------------------------------------------------------

    async def _resync(self) -> None:
        cause = await self.engine.resync()
        if cause:
            logger.warning('bridge %s: %s; what other brokers sent and this broker had not '
                           'read is lost (reported per broker as they are heard again)',
                           self.url, cause)

    async def _read_loop(self, resync: bool) -> None:
        backoff = 0.05
        next_tick = time.monotonic() + TICK_SECONDS
        while True:
            if self.on_tick is not None and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_SECONDS
                self._tick()
            try:
                if resync:
                    await self._resync()
                    resync = False
                entries = await self.engine.read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._halting:
                    return
                self._mark_down(f'reading failed: {exc!r}')
                resync = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            self._mark_up()
            if entries:
                await self._receive(entries)

    async def _receive(self, entries: list) -> None:
        frames: list = []
        gaps: list[tuple[str, int]] = []
        origins = self._origins
        now = time.monotonic()
        own = self.broker_id
        for raw in entries:
            view = memoryview(raw)
            try:
                magic, version, origin_length, incarnation, first, count = \
                    _ENTRY.unpack_from(view)
                start = _ENTRY.size + origin_length
                origin = bytes(view[_ENTRY.size:start]).decode()
            except (struct.error, UnicodeDecodeError):
                magic = None
            else:      # a header that claims more than the entry holds is not one of ours
                if start > len(view) or count * _MIN_FRAME > len(view) - start:
                    magic = None
            if magic != _MAGIC or version != _VERSION:
                logger.warning('bridge %s: dropped an entry that is not an mpchannels '
                               'entry of version %d (another program writing to namespace '
                               '%r?)', self.url, _VERSION, self.namespace)
                continue
            self.entries_received += 1
            if origin == own:
                if incarnation == self.incarnation:
                    self._own_read = True
                    if not self.echo:
                        continue
                elif self._own_read:
                    # after this incarnation's entries, so not the previous one's: another
                    # broker runs with this id; its messages are routed as any other's
                    self._another_with_my_id(incarnation)
                elif not self.echo:
                    continue        # (before: this broker's own, before a restart)
            known = origins.get(origin)
            if known is None or known.incarnation != incarnation:
                known = origins[origin] = _Origin(incarnation, first - 1)
            known.heard = now
            end = first + count - 1
            if end <= known.last:
                if count:
                    self.duplicates += count
                continue
            if first > known.last + 1:
                gaps.append((origin, first - known.last - 1))
            known.last = end
            if count:
                frames.append((view[start:], count, origin))
                self.received += count
        if gaps:
            cause = await self._loss_cause()
            for origin, missing in gaps:
                self._lose(missing, f'{missing} messages from broker {origin!r} are missing '
                                    f'from the stream ({cause})')
        if frames:
            data = frames[0][0].tobytes() if len(frames) == 1 else \
                b''.join([part for part, _, _ in frames])
            try:
                self.on_frames(data)
            except Exception as exc:
                # (it took none of them): each entry alone, so that one another program
                # wrote wrong costs only its own messages, which are told lost
                self._deliver_each(frames, exc)

    def _deliver_each(self, frames: list[tuple[memoryview, int, str]],
                      failure: Exception) -> None:
        for part, count, origin in frames:
            if len(frames) > 1:
                try:
                    self.on_frames(part.tobytes())
                    continue
                except Exception as exc:
                    failure = exc
            self.received -= count
            logger.warning('bridge %s: an entry of broker %r holds frames that cannot be '
                           'routed (%s)', self.url, origin, failure,
                           exc_info=not isinstance(failure, ChannelsError))
            self._lose(count, f'{count} messages from broker {origin!r} could not be read '
                              f'(an entry that is not whole MESSAGE frames: another program '
                              f'writing to namespace {self.namespace!r}?)')

    def _another_with_my_id(self, incarnation: int) -> None:
        if incarnation in self._twins:
            return
        if len(self._twins) > 100:
            self._twins.clear()
        self._twins.add(incarnation)
        self._last_error = f'another broker uses this broker\'s id {self.broker_id!r}'
        logger.error('bridge %s: another broker writes to namespace %r as %r, this broker\'s '
                     'id (the host name and socket path): each takes the other\'s messages '
                     'for its own; give each machine its own host name or --address',
                     self.url, self.namespace, self.broker_id)

    async def _loss_cause(self) -> str:
        try:
            cause = await self.engine.loss_cause()
        except Exception:
            cause = None
        return cause or ('trimmed or lost by the engine before this broker read them, '
                         'or dropped by their sender over its bound')

    # state, losses, liveness -----------------------------------------------------------

    def _lose(self, count: int, reason: str) -> None:
        self.lost += count
        self.lost_reasons[reason] = self.lost_reasons.get(reason, 0) + count
        logger.warning('bridge %s: %d messages lost: %s', self.url, count, reason)
        try:
            self.on_lost(count, reason)
        except Exception:
            logger.exception('the bridge on_lost callback failed')

    def _drop(self, count: int, reason: str) -> None:
        """This broker's messages that never go to the engine: other machines see the
        gap in its numbers (while this incarnation sends on) and report them lost."""
        self.dropped += count
        self.dropped_reasons[reason] = self.dropped_reasons.get(reason, 0) + count
        logger.warning('bridge %s: %d messages from this machine not sent to the other '
                       'machines: %s', self.url, count, reason)

    def _tick(self) -> None:
        try:
            self.on_tick()
        except Exception:
            logger.exception('the bridge on_tick callback failed')

    # Each change of state is logged before stats() can show it, so whoever sees
    # 'connected' change (an operator, a test) finds its WARNING already written.

    # The sender and the reader each mark their own side: the bridge is connected when
    # both work (an engine may answer reads and refuse writes: Redis out of memory), and
    # one side working does not hide the other's failure, retry after retry.

    def _mark_up(self, side: str = 'read') -> None:
        failing = self._failing
        if failing:
            failing.discard(side)
            if failing:
                return
        if not self._connected:
            if self._down_since is not None:
                self.reconnects += 1
                logger.warning('bridge %s: connected again after %.1fs', self.url,
                               time.monotonic() - self._down_since)
            self._down_since = None
            self._connected = True

    def _mark_down(self, why: str, side: str = 'read') -> None:
        self._last_error = why
        self._failing.add(side)
        if self._connected or self._down_since is None:
            logger.warning('bridge %s: not connected (%s); reconnecting', self.url, why)
            self._down_since = time.monotonic()
            self._connected = False

    def stats(self) -> dict[str, Any]:
        """What the bridge did so far, JSON-serializable (``channels-broker stats``)."""
        now = time.monotonic()
        with self._lock:
            pending_bytes, pending_messages = self._pending_bytes, self._pending_messages
        peers = [{'broker': name, 'last_heard_s': round(now - origin.heard, 3)}
                 for name, origin in list(self._origins.items()) if name != self.broker_id]
        return {'url': self.url, 'engine': self.engine.name, 'namespace': self.namespace,
                'broker': self.broker_id, 'connected': self._connected, 'sent': self.sent,
                'received': self.received, 'lost': self.lost,
                'lost_reasons': dict(self.lost_reasons), 'dropped': self.dropped,
                'dropped_reasons': dict(self.dropped_reasons), 'duplicates': self.duplicates,
                'peers': peers, 'position': self.engine.position_text(),
                'pending_messages': pending_messages, 'pending_bytes': pending_bytes,
                'entries_sent': self.entries_sent, 'entries_received': self.entries_received,
                'reconnects': self.reconnects,
                'down_for_s': (None if self._down_since is None
                               else round(now - self._down_since, 3)),
                'last_error': self._last_error}

    def state(self) -> dict[str, Any]:
        """What a restarted broker passes as ``state=`` to resume where this one read:
        the stream position and each origin's last number (JSON-serializable)."""
        return {'engine': self.engine.name, 'namespace': self.namespace,
                'position': self.engine.save_position(),
                'origins': {name: [origin.incarnation, origin.last]
                            for name, origin in list(self._origins.items())}}

    def _load_state(self, state: dict) -> None:
        if state.get('engine') != self.engine.name or state.get('namespace') != self.namespace:
            logger.warning('bridge %s: ignoring a saved state of another engine or '
                           'namespace', self.url)
            return
        try:
            origins = {name: _Origin(int(incarnation), int(last))
                       for name, (incarnation, last) in state.get('origins', {}).items()}
            self.engine.load_position(state.get('position'))
        except (TypeError, ValueError, AttributeError) as exc:
            logger.warning('bridge %s: ignoring a saved state that is not one a bridge '
                           'saves (%s): reading from the stream\'s end', self.url, exc)
            return
        self._origins.update(origins)
