"""An app process's side of the broker: one connection, a sender and a reader thread.

::

    Channel.send() -> encode MESSAGE frame -> the frames list (or straight to an idle
        socket) -> sender thread: connects lazily, (re)registers subscriptions, takes
        the list and writes it in batches -> broker
    broker -> reader thread: decodes MESSAGE frames, finds this process's matching
        channels and schedules one task per channel (the task workers run them)

Internal topics (``lona.channels.*``) stay in the process: no SUB is sent for one, and
the reader never hands a message from the broker to a channel on one (a ``*`` sent by
another process reaches a user's ``*`` channel, not ``lona.channels.lost``). HELLO
carries this process's secret, from which the broker derives the origin that every id
it sends must start with (see ``message.origin_of``).

The link starts with the machinery, so the first use connects. While the broker is
unreachable, frames wait in the list (at most ``MAX_BUFFER_BYTES`` of messages, past
which ``send()`` raises :class:`~channels.errors.BufferFullError`), and the sender
retries with backoff, logging a warning. Every (re)connection first sends HELLO and
one SUB per topic this process subscribes to, then the messages; the subscriptions and
the queue are taken together (see ``BrokerLink._connect``), so no message goes before
the SUB of a channel that subscribed before sending it.

``fence()`` (behind ``channels.flush()`` and ``listen()``) puts a FENCE frame in the
same stream; the broker sends it back once it has applied everything before it. Fences
that are not answered when a connection ends are sent again on the next one, after its
SUBs and the messages sent again, so the answer always comes from a broker that holds
this process's current subscriptions.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
import os
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection
from queue import Empty, SimpleQueue
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import wire
from .connection import Address, connect, format_address
from .errors import BufferFullError, ChannelsError, MessageTooLargeError, ProtocolError
from .message import Message, _identity
from .ordering import Mailbox
from .workers import HandlerTally, run_mailbox

if TYPE_CHECKING:
    from .runtime import Machinery

__all__ = ['BrokerLink', 'LOST_TOPIC']

LOST_TOPIC = 'lona.channels.lost'
"""Sent locally when messages for this process were lost for good (the broker had cut it
off for being too slow, or messages from other machines went missing on the bridge):
``data == {'count': <messages lost>, 'reason': <text>}``."""

logger = logging.getLogger(__name__)

_encode_message = wire.encode_message
_INTERNAL = wire.INTERNAL_PREFIX      # the reader tests it inline: wire.is_internal
_monotonic = time.monotonic
_PING_INTERVAL = 0.01
"""Seconds between confirming PINGs while messages flow (shutdown's flush pings at once)."""
_DIRECT_INTERVAL = 0.0001
"""Seconds after a direct write during which senders queue instead (see put_message)."""
_STOP = object()
_READ_SIZE = 64 * 1024
_BEHIND_READ_SIZE = 1024
"""Bytes a reader reads at once: while the handlers are behind, a little at a time."""


class _Raw:
    """The unwritten rest of a direct write: bytes to write as they are, first."""

    __slots__ = ('data',)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _groups(frames: list[Any]) -> list[Any]:
    """Frames grouped into batches, with each raw leftover on its own."""
    if not any(type(frame) is _Raw for frame in frames):
        return list(wire.group_frames(frames))
    groups: list[Any] = []
    run: list[bytes] = []
    for frame in frames:
        if type(frame) is _Raw:
            groups.extend(wire.group_frames(run))
            groups.append(frame)
            run = []
        else:
            run.append(frame)
    groups.extend(wire.group_frames(run))
    return groups
_WAKE = object()      # the reader lost the connection: reconnect even with nothing to send
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 2.0


def _shutdown_socket(connection: Connection) -> None:
    """Unblock a thread reading *connection* (close() alone does not, on Linux)."""
    try:
        sock = socket.socket(fileno=connection.fileno())
    except (OSError, ValueError):
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


class _Reader:
    """One connection's two reader threads, which take turns (leader and follower).

    The thread that holds ``_lead`` reads the socket and routes what it read: one thread
    at a time, so messages are routed in the order of the stream. When routing a batch
    claimed a free channel's mailbox and the other thread is waiting for the lead, the
    leader hands the lead over and runs that channel's handler itself
    (``workers.run_mailbox``), then waits for the lead in turn: the message reaches its
    handler without a task worker being woken for it, one wake-up fewer on its way,
    while the other thread goes on reading, so a slow handler still holds up only its
    own channel. Otherwise (nobody waiting, handlers behind, or custom task workers,
    ``Machinery.readers_run_handlers``) the mailbox goes to the task workers.

    Counts the tasks it schedules, less those it ran itself (for shutdown).
    """

    def __init__(self, link: BrokerLink, connection: Connection, number: int) -> None:
        self.link = link
        self.connection = connection
        self.threads = [threading.Thread(target=self._loop, args=(me,), daemon=True,
                                         name=f'channels-reader-{number}{"ab"[me]}')
                        for me in (0, 1)]
        self.stopped_reading = threading.Event()     # no thread reads the socket again
        self._batches: wire.BatchReader | None = None     # made by the first to lead
        self._size = _READ_SIZE
        self._lead = threading.Lock()
        self._wants = [False, False]    # each thread's: it waits for the lead
        self._ended = False             # the stream ended: each thread stops
        self._held: Mailbox | None = None    # claimed by the routing of the lead holder
        self._scheduled = 0             # written by the lead holder only
        # each thread's count of the tasks it ran itself (and its handlers' errors)
        self.tallies = [HandlerTally(link.machinery, thread.name) for thread in self.threads]
        self._alive = 2                 # under link._readers_lock

    @property
    def scheduled(self) -> int:
        """Tasks scheduled and not run by these threads themselves (approximate)."""
        return self._scheduled - self.tallies[0].settled - self.tallies[1].settled

    def start(self) -> None:
        """Start both threads."""
        for thread in self.threads:
            thread.start()

    def _loop(self, me: int = 0) -> None:
        link = self.link
        machinery = link.machinery
        lead, wants, other = self._lead, self._wants, 1 - me
        tally = self.tallies[me]
        ended_it = False
        try:
            while True:
                wants[me] = True
                lead.acquire()
                wants[me] = False
                if self._ended:
                    lead.release()
                    return
                try:
                    held = self._read_until_held(other)
                except BaseException:
                    ended_it = self._ended = True
                    self.stopped_reading.set()
                    held, self._held = self._held, None
                    if held is not None:
                        machinery.ready.put(held)
                    raise
                finally:
                    lead.release()
                run_mailbox(held, tally)
        except (EOFError, OSError) as exc:
            if not link.closing:
                logger.warning('lost the connection to the broker on %s (%s); reconnecting',
                               link.address_text, exc or type(exc).__name__)
        except ProtocolError as exc:
            logger.error('the broker on %s sent an invalid frame (%s); reconnecting',
                         link.address_text, exc)
        except Exception:
            logger.exception('reader of the broker connection failed; reconnecting')
        finally:
            link.retire(self)
            if ended_it:
                link.connection_lost(self.connection)

    def _read_until_held(self, other: int) -> Mailbox:
        """Read and route batches (holding the lead) until routing claimed a mailbox and
        the other thread waits to take over; that mailbox, to run."""
        if self._batches is None:
            self._batches = wire.BatchReader(self.connection.fileno(), self.link.max_batch)
        link = self.link
        machinery = link.machinery
        ready = machinery.ready
        limit = link.max_pending_tasks
        handle, read = self._handle, self._batches.read
        wants = self._wants
        while True:
            for batch in read(self._size):
                handle(batch)
            held = self._held
            if machinery.backlog() > limit:
                # handlers are behind: stop reading, so the broker holds (and bounds)
                # what is on its way instead of this process's memory growing; then
                # read a little at a time while they are behind, so that the end of
                # the connection (cut off by the broker) is seen soon
                if held is not None:
                    self._held = None
                    ready.put(held)
                self._size = _BEHIND_READ_SIZE
                connection = self.connection
                while machinery.backlog() > limit and not link.closing:
                    if link._connection is not connection:
                        # the sender dropped this connection (a write failed): stop now,
                        # before it closes the descriptor (which it does at the latest
                        # 2 s on): a new connection may get the same number, and this
                        # thread would read (and garble) that connection's stream
                        raise EOFError('the connection was dropped')
                    time.sleep(0.002)
                continue
            if self._size != _READ_SIZE and machinery.backlog() <= limit // 2:
                self._size = _READ_SIZE
            if held is not None:
                self._held = None
                if wants[other]:
                    return held
                ready.put(held)       # nobody would read meanwhile: the task workers

    def _handle(self, batch: bytes) -> None:
        link = self.link
        machinery = link.machinery
        match = machinery.runtime.registry.match       # lookups take no lock
        schedule = machinery.schedule
        received = Message.received
        seen = link.seen
        header = wire.HEADER.size
        # consecutive messages mostly share a topic: match it once for the run of them (a
        # channel that subscribes meanwhile gets what is read after it; schedule() skips
        # one that unsubscribed)
        last_topic = None
        channels: list = []
        keep = self._held is None and machinery.readers_run_handlers
        for frame in wire.decode_batch(batch, link.max_frame):
            kind = frame[0]
            if kind == wire.MESSAGE:
                link.received += 1
                if not link.accepting:
                    link.ignored += 1
                    continue
                _, start, end, topic, message_id, timestamp, deadline, droppable, at = frame
                sender, _, sequence = message_id.rpartition('-')
                try:
                    sequence = int(sequence)
                except ValueError:      # the broker drops such ids: never from a sender
                    link.unparsable(message_id)
                    continue
                if sequence <= seen.get(sender, 0):
                    link.duplicates += 1           # sent again after a broker restart
                    continue
                seen[sender] = sequence
                message = received(topic, message_id, timestamp, deadline, droppable,
                                   batch[at:end])
                if deadline is not None and message.is_expired():
                    message.drop()
                    continue
                if topic != last_topic:
                    channels = match(topic)
                    last_topic = topic
                    if channels and ('*' in topic or '?' in topic or '[' in topic
                                     or topic.startswith(_INTERNAL)):
                        # a pattern sent by another process reaches no internal channel
                        # (nor does an internal topic, which the broker never routes)
                        channels = [channel for channel in channels
                                    if not channel.topic.startswith(_INTERNAL)]
                if channels:
                    # counted before the task exists: shutdown may never see fewer; the
                    # first channel may have the message itself: nobody else holds it;
                    # the first mailbox claimed is kept, for this thread to run
                    self._scheduled += len(channels)
                    queued = schedule(channels[0], message, False, keep)
                    if queued is not True:
                        if queued is False:
                            self._scheduled -= 1
                        else:
                            self._held = queued
                            keep = False
                    for channel in channels[1:]:
                        self._scheduled -= not schedule(channel, message)
            elif kind == wire.PONG:
                link.pong(wire.decode_ping(batch[frame[1] + header:frame[2]]))
            elif kind == wire.FENCE:
                link.fenced(wire.decode_ping(batch[frame[1] + header:frame[2]]))
            elif kind == wire.NOTICE:
                notice = wire.decode_json(batch[frame[1] + header:frame[2]])
                if isinstance(notice, dict) and isinstance(notice.get('lost'), int):
                    logger.warning('the broker says %d messages for this process were '
                                   'lost: %s', notice['lost'], notice.get('reason'))
                    machinery.runtime.send_event(LOST_TOPIC, {
                        'count': notice['lost'], 'reason': str(notice.get('reason', ''))})
                else:
                    logger.warning('the broker says: %s', notice)
            else:
                raise ProtocolError(f'unexpected {wire.KIND_NAMES[kind]} frame from the broker')


class BrokerLink:
    """The connection of this process's machinery to the broker, and its two threads."""

    def __init__(self, machinery: Machinery, address: Address, authkey: bytes | None, *,
                 max_buffer: int, max_frame: int, max_pending_tasks: int = 100_000,
                 handshake_timeout: float = 5.0) -> None:
        self.machinery = machinery
        self.address = address
        self.address_text = format_address(address)
        self.authkey = authkey
        self.max_buffer = max_buffer
        self.max_frame = max_frame
        self.max_pending_tasks = max_pending_tasks
        self.handshake_timeout = handshake_timeout
        self._connecting: socket.socket | None = None  # the socket of a connect() under way
        self.max_frame_size = max_frame + wire.HEADER.size
        self.max_batch = max(max_frame + wire.HEADER.size, wire.BATCH_BYTES) + 1024
        # Frames to write, appended under the machinery's send_lock; the sender thread
        # takes the whole list at once (under the same lock) when the doorbell rings,
        # which a sender does when it makes the list non-empty. Cheaper per frame than a
        # queue. The doorbell also carries _WAKE (reconnect) and _STOP.
        self._frames: list[Any] = []
        self.doorbell: SimpleQueue = SimpleQueue()
        # Every MESSAGE frame is retained until the broker confirms (PONG to a PING sent
        # after it) that it wrote it to every process it was for; after a reconnect the
        # retained frames are sent again and receivers drop what they saw (by sender and
        # sequence). Appends happen under send_lock, confirmations in the reader.
        self._retained: deque[bytes] = deque()
        self._retained_in = 0              # frames retained so far (send_lock)
        self._retained_out = 0             # frames confirmed so far (reader)
        self._retained_bytes_in = 0
        self._retained_bytes_out = 0
        self._marks: dict[int, int] = {}   # PING token -> _retained_in when it was sent
        self._confirming = 0.0             # when the confirming PING on its way left
        self._last_ping = 0.0
        self.seen: dict[str, int] = {}     # sender -> last sequence handled (reader)
        self.duplicates = 0                # messages dropped as seen before (reader)
        self.unparsed = 0                  # messages dropped: an id without a sequence
        # A sender of a message writes it itself when nothing is queued or being written
        # (items_put, under send_lock, equals items_done, sender thread) and it can take
        # write_claim, which the sender thread holds while it writes.
        self.items_put = 0
        self.items_done = 0
        self.write_claim = threading.Lock()
        self._sock: socket.socket | None = None
        self._last_direct = 0.0
        self.received = 0              # MESSAGE frames from the broker (current reader)
        self.ignored = 0               # ... that arrived after shutdown stopped taking them
        self.accepting = True
        self.closing = False
        self.connected = threading.Event()
        self.last_failure: str | None = None   # why the last try to connect failed
        self.readers: list[_Reader] = []    # live readers (one, or two while switching)
        self._retired_scheduled = 0         # tasks scheduled by readers that have ended
        self._readers_lock = threading.Lock()
        self._connection: Connection | None = None
        self._lost: Connection | None = None
        self._stop = threading.Event()
        self._pongs: dict[int, threading.Event] = {}
        # FENCE token -> called with True when the broker answers it (reader thread), or
        # with False when the link closes; added and taken out under send_lock
        self._fences: dict[int, Callable[[bool], None]] = {}
        self._tokens = itertools.count(1)
        self._sender: threading.Thread | None = None
        self._pid = os.getpid()
        self._connections = 0
        self._connected_at = 0.0

    def __repr__(self) -> str:
        state = 'connected' if self.connected.is_set() else 'disconnected'
        return f'<BrokerLink {self.address_text} {state} buffered={self.buffered_bytes}>'

    @property
    def buffered_bytes(self) -> int:
        """Bytes of messages sent but not yet confirmed by the broker."""
        return self._retained_bytes_in - self._retained_bytes_out

    @property
    def unconfirmed(self) -> int:
        """Messages sent but not yet confirmed by the broker."""
        return self._retained_in - self._retained_out

    @property
    def scheduled(self) -> int:
        """Tasks scheduled by this link's readers (shutdown compares it with what ran)."""
        with self._readers_lock:
            return self._retired_scheduled + sum(r.scheduled for r in self.readers)

    def unparsable(self, message_id: str) -> None:
        """The broker forwarded a message whose id has no sequence number: dropped
        (reader thread; logged once)."""
        self.unparsed += 1
        if self.unparsed == 1:
            logger.warning('dropped a message from the broker on %s whose id %.100r has '
                           'no sequence number; later ones are dropped without a word',
                           self.address_text, message_id)

    def retire(self, reader: _Reader) -> None:
        """A thread of *reader* ended; once both have, keep its count, forget it."""
        with self._readers_lock:
            reader._alive -= 1
            if reader._alive == 0 and reader in self.readers:
                self.readers.remove(reader)
                self._retired_scheduled += reader.scheduled

    @property
    def threads(self) -> list[threading.Thread]:
        """The sender thread and the reader threads, started or not."""
        # a copy first (one step under the GIL): a reader that retires meanwhile, removed
        # from the list under iteration, would make the iteration skip the next reader,
        # and a handler on its thread would not be seen as one (flush()/shutdown() from
        # it would not raise)
        threads = [thread for reader in list(self.readers) for thread in reader.threads]
        return threads if self._sender is None else [self._sender, *threads]

    # called by the machinery --------------------------------------------------------------

    def start(self) -> None:
        """Start the sender thread, which connects."""
        self._sender = threading.Thread(target=self._send_loop, name='channels-sender',
                                        daemon=True)
        self._sender.start()

    def put_message(self, message: Message) -> None:
        """Queue *message* for the broker. The caller holds the machinery's send_lock."""
        message.renumber()      # ids follow the stream's order: receivers rely on it
        frame = _encode_message(message.topic, message.id_bytes(), message.timestamp,
                                message.deadline, message.droppable, message._payload)
        size = len(frame)
        if size > self.max_frame_size:
            raise MessageTooLargeError(
                f'message to {message.topic!r} is {size} bytes on the wire, over '
                f'MAX_FRAME_BYTES={self.max_frame}; send less data, or raise the setting '
                f'(for the broker too)')
        if self._retained_bytes_in + size - self._retained_bytes_out > self.max_buffer:
            raise BufferFullError(
                f'cannot send {message!r}: {self.buffered_bytes} bytes of messages wait for '
                f'the broker on {self.address_text} to confirm them, and MAX_BUFFER_BYTES is '
                f'{self.max_buffer}. Is the broker running? (channels-broker --address '
                f'{self.address_text})')
        self._retained.append(frame)
        self._retained_in += 1
        self._retained_bytes_in += size
        if self.items_put == self.items_done and self._sock is not None:
            now = _monotonic()
            # An idle connection (nothing queued or being written): write it ourselves,
            # without waking the sender thread, unless we did a moment ago: under load
            # the sender thread batches, which is cheaper per message.
            if now - self._last_direct > _DIRECT_INTERVAL and self.write_claim.acquire(False):
                try:
                    batch = frame if self._awaiting_confirmation(now) \
                        else frame + self._confirmation()
                    rest = self._write_now(batch)
                finally:
                    self.write_claim.release()
                self._last_direct = now
                if rest is None:
                    return
                frame = rest                        # written first, as it is
        self.items_put += 1
        frames = self._frames
        frames.append(frame)
        if len(frames) == 1:
            self.doorbell.put(None)

    def _confirmation(self, mark: int | None = None) -> bytes:
        """A PING whose PONG confirms the retained frames up to *mark* (default: all)."""
        token = next(self._tokens)
        self._marks[token] = self._retained_in if mark is None else mark
        self._confirming = self._last_ping = _monotonic()
        return wire.encode_ping(wire.PING, token)

    def _awaiting_confirmation(self, now: float) -> bool:
        """True while no PING should be sent: one was sent less than _PING_INTERVAL ago,
        or one is on its way (for at most a second: a later PING confirms as much, so
        one that takes long, or got lost, is not waited for). Confirming every message
        would double the broker's work at moderate rates."""
        return (bool(self._confirming) and now - self._confirming < 1.0) \
            or now - self._last_ping < _PING_INTERVAL

    def _confirm(self, token: int) -> None:
        """The PONG of *token* came: forget the frames it confirms (reader thread)."""
        mark = self._marks.pop(token, None)
        if mark is None:
            return
        self._confirming = 0.0
        retained = self._retained
        while self._retained_out < mark and retained:
            self._retained_bytes_out += len(retained.popleft())
            self._retained_out += 1

    def _write_now(self, frame: bytes) -> _Raw | None:
        """Write *frame* without blocking; None if all went, else what is left (as raw
        bytes, which must be written before anything else)."""
        framed = wire.connection_bytes(frame)
        try:
            sent = self._sock.send(framed, socket.MSG_DONTWAIT)
        except OSError:          # BlockingIOError, or a connection going away
            sent = 0
        if sent == len(framed):
            return None
        return _Raw(framed[sent:])

    def subscribe(self, topic: str) -> None:
        """Tell the broker this process wants *topic* (its first channel on it), unless
        the topic is internal."""
        if not wire.is_internal(topic):
            self._put_control(wire.encode(wire.SUB, topic.encode()))

    def unsubscribe(self, topic: str) -> None:
        """Tell the broker this process no longer wants *topic*."""
        if not wire.is_internal(topic):
            self._put_control(wire.encode(wire.UNSUB, topic.encode()))

    def _put_control(self, frame: bytes) -> None:
        with self.machinery.send_lock:
            self.items_put += 1
            frames = self._frames
            frames.append(frame)
            if len(frames) == 1:
                self.doorbell.put(None)

    def flush(self, deadline: float) -> bool:
        """Wait until everything sent so far was routed by the broker and this process's
        share of it was scheduled here; False if *deadline* passed first.

        Without a connection and with no message buffered there is nothing to wait for:
        what was written went to a broker that is gone.
        """
        if not self.connected.is_set() and not self.unconfirmed:
            return True
        with self.machinery.send_lock:
            ping = self._confirmation()
            token = wire.decode_ping(ping[wire.HEADER.size:])
            event = self._pongs[token] = threading.Event()
        self._put_control(ping)
        try:
            return event.wait(max(deadline - time.monotonic(), 0))
        finally:
            self._pongs.pop(token, None)

    def fence(self, callback: Callable[[bool], None]) -> int:
        """Ask the broker to confirm that it applied everything sent so far: a FENCE
        after every SUB, UNSUB and message queued before it. *callback(True)* runs on
        the reader thread when the answer comes (it must be quick), *callback(False)*
        if the link closes first. Returns the token for :meth:`forget_fence`."""
        with self.machinery.send_lock:
            if self.closing:
                raise RuntimeError('the broker link is closed')
            token = next(self._tokens)
            # registered and queued in one step: _connect either sees it registered (and
            # sends it again itself) or finds its frame queued after its snapshot
            self._fences[token] = callback
            self.items_put += 1
            frames = self._frames
            frames.append(wire.encode_ping(wire.FENCE, token))
            if len(frames) == 1:
                self.doorbell.put(None)
        return token

    def forget_fence(self, token: int) -> None:
        """Stop waiting for the answer to *token* (it timed out, or the waiter left)."""
        self._fences.pop(token, None)

    def fenced(self, token: int) -> None:
        """The broker answered the FENCE with *token* (reader thread)."""
        callback = self._fences.pop(token, None)
        if callback is not None:
            callback(True)

    def pong(self, token: int) -> None:
        """The broker answered the PING with *token*: all before it was written."""
        self._confirm(token)
        event = self._pongs.get(token)
        if event is not None:
            event.set()

    def stop_accepting(self) -> None:
        """From now on, messages from the broker are ignored (shutdown has flushed)."""
        self.accepting = False

    def close(self, deadline: float) -> bool:
        """Stop both threads and close the connection; True if they ended in time."""
        self.closing = True
        with self.machinery.send_lock:
            fences, self._fences = self._fences, {}
        for callback in fences.values():        # nobody will answer them now
            callback(False)
        self._stop.set()
        self.doorbell.put(_STOP)
        connecting = self._connecting
        if connecting is not None:        # a handshake under way ends now, not at its timeout
            try:
                connecting.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        sender = self._sender
        if sender is not None:
            sender.join(max(deadline - time.monotonic(), 0.05))
        connection = self._connection
        if connection is not None:
            _shutdown_socket(connection)
        for thread in [thread for reader in list(self.readers) for thread in reader.threads]:
            thread.join(max(deadline - time.monotonic(), 0.05))
        if connection is not None:
            connection.close()
        return not any(thread.is_alive() for thread in self.threads)

    def abandon(self) -> None:
        """In a forked child: close the inherited descriptor without touching the
        parent's connection (no shutdown, nothing sent)."""
        for connection in (self._connection, self._lost):
            if connection is not None:
                try:
                    connection.close()
                except OSError:
                    pass
        self._connection = self._lost = None

    def connection_lost(self, connection: Connection) -> None:
        """Called by a reader whose connection ended: wake the sender to reconnect."""
        if connection is self._connection:
            self.connected.clear()
            self._lost = connection
            self.doorbell.put(_WAKE)

    # the sender thread ----------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            try:
                self._send()
                return
            except Exception:      # a bug must not silently end delivery
                logger.exception('the sender thread of the broker connection failed; '
                                 'restarting it')
                if self._stop.wait(_BACKOFF_MAX):
                    return

    def _send(self) -> None:
        pending: list[Any] = []
        backoff = _BACKOFF_FIRST
        failures = 0
        while not self._stop.is_set():
            if self._lost is not None and self._lost is self._connection:
                self._drop_connection()
            if self._connection is None:
                if self._connected_at:
                    lived = time.monotonic() - self._connected_at
                    self._connected_at = 0.0
                    if lived >= 1.0:
                        backoff = _BACKOFF_FIRST
                    else:       # the last connection died young: do not hammer the broker
                        if self._stop.wait(backoff):
                            break
                        backoff = min(backoff * 2, _BACKOFF_MAX)
                try:
                    self._connect(pending, unreachable_before=failures > 0)
                    pending = []
                except ChannelsError as exc:
                    failures += 1
                    self.last_failure = str(exc)
                    if failures == 1 and not self.closing:
                        logger.warning('%s; buffering up to %d bytes of messages and retrying',
                                       exc, self.max_buffer)
                    if self._stop.wait(backoff):
                        break
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                    continue
                if failures:
                    logger.warning('connected to the broker on %s after %d failed attempts',
                                   self.address_text, failures)
                failures = 0
                self.last_failure = None
            signals = [] if pending else [self.doorbell.get()]
            while True:
                try:
                    signals.append(self.doorbell.get_nowait())
                except Empty:
                    break
            with self.machinery.send_lock:
                taken, self._frames = self._frames, []
                mark = self._retained_in       # what the taken frames bring up to
                ping = None if self._awaiting_confirmation(_monotonic()) \
                    or self._retained_out >= mark else self._confirmation(mark)
                if ping is not None:
                    self.items_put += 1        # _write counts it done: count it put
            pending.extend(taken)
            if ping is not None:
                pending.append(ping)
            pending = self._write(pending)
            if _STOP in signals:
                break
        if self.unconfirmed:
            logger.warning('%d messages sent to the broker on %s were not confirmed before '
                           'the connection closed; they may be lost', self.unconfirmed,
                           self.address_text)
        self._drop_connection()

    def _write(self, frames: list[Any]) -> list[Any]:
        """Write *frames* (and raw leftovers of direct writes); return those not written
        (the connection failed)."""
        connection = self._connection
        if connection is None or not frames:
            return frames
        written = 0
        with self.write_claim:
            try:
                for group in _groups(frames):
                    if type(group) is _Raw:
                        self._sock.sendall(group.data)
                        written += 1
                        self.items_done += 1
                        continue
                    connection.send_bytes(group[0] if len(group) == 1 else b''.join(group))
                    written += len(group)
                    self.items_done += len(group)
            except OSError as exc:
                if not self.closing:
                    logger.warning('writing to the broker on %s failed (%s); reconnecting',
                                   self.address_text, exc)
                self._lost = connection
        return frames[written:]

    def _connect(self, pending: list[Any], unreachable_before: bool = False) -> None:
        """Connect, register every subscription, then send again what the broker has not
        confirmed, then the PINGs still queued (*pending*: what the sender had taken and
        not written). *unreachable_before*: earlier attempts of this connection failed."""
        try:
            connection = connect(self.address, self.authkey, self.handshake_timeout,
                                 opened=self._opened)
        finally:
            self._connecting = None
        runtime = self.machinery.runtime
        try:
            # The subscriptions and the frames to send are taken in one step (the locks
            # in the order subscribe() takes them): a channel that subscribes and then
            # sends while this runs either is in `topics`, whose SUBs go before every
            # message, or finds its SUB and message queued for after the handshake.
            # Taken apart, its message could be in `again` and its SUB only in the
            # queue, written after the message: the broker would route the message
            # before it knew of the subscription, to nobody, and confirm it.
            with runtime.registry_lock, self.machinery.send_lock:
                topics = [topic for topic in runtime.registry.topics()
                          if not wire.is_internal(topic)]
                queued, self._frames = self._frames, []
                self.items_done = self.items_put          # all of it is handled here
                again = list(self._retained)
                self._marks = {}
                self._confirming = 0.0
                ping = self._confirmation() if again else None
                # fences not answered yet, whether queued, taken or written to the last
                # connection: sent again last, so that they cover all of the above
                fences = [wire.encode_ping(wire.FENCE, token)     # tuple(): taken at once,
                          for token in tuple(self._fences)]     # waiters pop unlocked
                first = self._connections == 0
            connection.send_bytes(wire.encode_json(
                wire.HELLO, {**_identity.hello(), 'role': 'app', 'name': _process_name(),
                             'subscriptions': len(topics)}))
            subs = [wire.encode(wire.SUB, topic.encode()) for topic in topics]
            for group in wire.group_frames(subs):
                connection.send_bytes(b''.join(group))
            # queued SUBs and UNSUBs are in `topics` already: only PINGs are left to send
            controls = [frame for frame in pending + queued
                        if type(frame) is not _Raw and frame[5] == wire.PING]
            waiting = [wire.encode_ping(wire.PING, token) for token in list(self._pongs)]
            for token in list(self._pongs):       # shutdown's barrier, whose PONG was lost
                self._marks.setdefault(token, self._retained_in)
            frames = again + controls + waiting + ([ping] if ping else []) + fences
            for group in wire.group_frames(frames):
                connection.send_bytes(b''.join(group))
            if again and first and unreachable_before:
                # the broker was not there when these were sent: processes that connect
                # after this one never get them (a first connect that merely takes a
                # moment, with every process connected already, is nothing to warn of)
                logger.warning('connected to the broker on %s for the first time and sent '
                               'it %d messages buffered before: they reach only the '
                               'processes that are connected and subscribed by now, not '
                               'those that connect later', self.address_text, len(again))
            elif again:
                logger.info('sent %d unconfirmed messages again to the broker on %s',
                            len(again), self.address_text)
        except OSError as exc:
            connection.close()
            raise ChannelsError(f'the broker on {self.address_text} closed the connection '
                                f'during the handshake: {exc}') from exc
        self._sock = socket.socket(fileno=os.dup(connection.fileno()))
        self._connection = connection
        self._lost = None
        self._connections += 1
        reader = _Reader(self, connection, self._connections)
        with self._readers_lock:
            self.readers.append(reader)
        if self not in self.machinery.schedulers:
            self.machinery.schedulers.append(self)
        reader.start()
        self._connected_at = time.monotonic()
        self.connected.set()
        logger.debug('connected to the broker on %s with %d subscriptions',
                     self.address_text, len(topics))

    def _opened(self, sock: socket.socket) -> None:
        self._connecting = sock
        if self.closing:
            self._connecting = None
            raise ChannelsError('the link is closing')

    @property
    def state(self) -> str:
        """What the link is doing, for a shutdown that waits for it."""
        if self._connecting is not None:
            return f'connecting to the broker on {self.address_text} (handshake under way)'
        if self.connected.is_set():
            return f'connected to the broker on {self.address_text}'
        return f'not connected to the broker on {self.address_text}'

    def _drop_connection(self) -> None:
        with self.write_claim:          # no direct write is under way, nor starts
            connection, self._connection = self._connection, None
            sock, self._sock = self._sock, None
        self.connected.clear()
        if sock is not None:
            sock.close()
        if connection is not None:
            _shutdown_socket(connection)        # the reader sees the end and stops ...
            with self._readers_lock:
                readers = [r for r in self.readers if r.connection is connection]
            for reader in readers:
                reader.stopped_reading.wait(2.0)    # ... before its descriptor is closed
            connection.close()


def _process_name() -> str:
    return ' '.join(sys.argv)[:200]
