"""The broker process: one listener, a connection per app process, routing between them.

::

    app process --conn--> reader thread ---+
    app process --conn--> reader thread ---+--> inbound queue (one) --> MessageBroker
                                                                         thread(s):
          +---------------------------------------------------------------+ get_channels
          v                                                                 schedule_task
    result queue (outbox) per process --> writer thread --conn--> app process

* The gate (:mod:`channels.gate`, one thread) accepts connections and runs every
  handshake without blocking; a connection gets its reader and writer threads only once
  it has authenticated and said HELLO as an app process (and is admitted).
* A reader reads batches, decodes frame headers (never the
  payload: the broker does not unpickle application data) and puts each batch on the
  inbound queue as one item: MESSAGE frames become :class:`RoutedMessage`, and SUB,
  UNSUB, PING and the end of the connection travel the same queue, so each process's
  subscriptions change in order with its messages.
* A connection's *origin* comes from its HELLO (``message.origin_of``: pid and a digest
  of the process's secret, which only the broker sees). A MESSAGE whose id is not that
  origin and a decimal sequence, or whose topic is internal (``lona.channels.``), is
  dropped by the reader, counted and logged once per connection: no process can speak
  for another, or send what a receiver could not parse.
* The MessageBroker threads are the same class as in an app process (or the user's
  ``--broker-class``). Here ``Channel.get_channels(topic)`` returns
  :class:`RemoteChannel`\\ s: one per process and subscribed topic. ``schedule_task``
  appends the message's frame, unchanged, to the outbox of the channel's process, once
  per message and process however many of its topics match.
* A writer drains its outbox and writes batches. A process that disconnects, even by
  SIGKILL, is noticed by its reader at once (end of file) and its subscriptions go. A
  process that takes none of what is written to it for ``stall_timeout`` seconds (it
  stopped reading) is cut off, so the confirmations of others do not wait for it.

Shutdown (``stop()``, on SIGTERM/SIGINT in the CLI): stop accepting (the gate is woken
through its pipe, no poll waited out) -> stop reading ->
route what the inbound queue holds -> let every writer write its outbox -> close.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from queue import Empty, SimpleQueue
from typing import Any

import psutil

from . import settings, statefile, wire
from .connection import Address, format_address, listen
from .errors import ChannelsError, ConfigurationError, ProtocolError
from .bridge import Bridge, Retention
from .gate import Gate
from .ordering import STOP, Sequencer
from .registry import registry
from .topics import (TopicIndex, is_match_all, is_pattern, is_unanchored, pattern_matcher,
                     topic_size)
from .workers import MessageBroker, Worker
from .message import SECRET_BYTES, origin_of

__all__ = ['Broker', 'BatchRouter', 'RemoteChannel', 'RoutedMessage', 'Peer']

logger = logging.getLogger(__name__)

_SUB, _UNSUB, _PING, _GONE = 'sub', 'unsub', 'ping', 'gone'
_FENCE = 'fence'
_LOST = 'lost'                  # messages from other machines gone for good (the bridge's)

_ROLES = ('app', 'stats')
_MAX_PID = 2 ** 31 - 1          # pid_t is a signed 32-bit int
_MAX_NAME = 200                 # characters of a process name (the client sends argv)
_MAX_SEQUENCE_DIGITS = 19       # receivers parse a sequence as an int: keep it short
_INTERNAL = wire.INTERNAL_PREFIX


class _Hello:
    """The validated fields of a connection's HELLO (unknown keys are ignored, so that a
    newer process can say more)."""

    __slots__ = ('pid', 'role', 'name', 'subscriptions', 'origin')

    def __init__(self, obj: object) -> None:
        if not isinstance(obj, dict):
            raise ProtocolError(f'HELLO must be a JSON object, got {obj!r:.100}')
        pid = obj.get('pid')
        if type(pid) is not int or not 0 < pid <= _MAX_PID:
            raise ProtocolError(f'HELLO pid must be an int from 1 to {_MAX_PID}, got '
                                f'{pid!r:.100}')
        role = obj.get('role')
        if role not in _ROLES:
            raise ProtocolError(f"HELLO role must be one of {', '.join(_ROLES)}, got "
                                f'{role!r:.100}')
        name = obj.get('name', '')
        if type(name) is not str or len(name) > _MAX_NAME:
            raise ProtocolError(f'HELLO name must be a str of at most {_MAX_NAME} '
                                f'characters, got {name!r:.100}')
        subscriptions = obj.get('subscriptions', 0)
        if type(subscriptions) is not int or not 0 <= subscriptions <= 2 ** 31:
            raise ProtocolError(f'HELLO subscriptions must be an int >= 0, got '
                                f'{subscriptions!r:.100}')
        self.pid = pid
        self.role = role
        # printable only: it goes into log lines
        self.name = name if name.isprintable() else \
            ''.join(c if c.isprintable() else '?' for c in name)
        self.subscriptions = subscriptions
        self.origin = ''
        if role == 'app':
            secret = obj.get('secret')
            if type(secret) is not str or len(secret) != 2 * SECRET_BYTES:
                raise ProtocolError(f'HELLO of an app process must carry its secret, '
                                    f'{SECRET_BYTES} bytes in hex; got {secret!r:.100}')
            try:
                self.origin = origin_of(pid, bytes.fromhex(secret))
            except ValueError:
                raise ProtocolError(f'HELLO secret is not hex: {secret!r:.100}') from None


class RoutedMessage:
    """A message as the broker sees it: its header, and its frame as opaque bytes.

    Has the attributes of :class:`~channels.Message` that routing needs; ``data`` is not
    available here, by design (the broker never unpickles application data).
    """

    __slots__ = ('topic', 'id', 'timestamp', 'deadline', 'droppable', 'frame', 'sender',
                 '_dropped')
    local = False

    def __init__(self, topic: str, message_id: str, timestamp: float,
                 deadline: float | None, droppable: bool, frame: bytes, sender: Peer) -> None:
        self.topic = topic
        self.id = message_id
        self.timestamp = timestamp
        self.deadline = deadline
        self.droppable = droppable
        self.frame = frame
        self.sender = sender
        self._dropped = False

    def __repr__(self) -> str:
        return f'<RoutedMessage id={self.id!r} topic={self.topic!r} from pid {self.sender.pid}>'

    @property
    def data(self) -> dict:
        """Not available in the broker."""
        raise ChannelsError('the broker does not unpickle application data: route on '
                            'message.topic (and id, timestamp, expiry, droppable) only')

    @property
    def payload(self) -> bytes:
        """The whole MESSAGE frame, header and pickled data, as bytes (forwarded as it
        is; the broker never unpickles the data)."""
        return self.frame

    @property
    def expiry(self) -> Any:
        """The expiry as a local naive datetime, or None."""
        from datetime import datetime
        return None if self.deadline is None else datetime.fromtimestamp(self.deadline)

    def is_expired(self) -> bool:
        """True once the sender's expiry has passed."""
        return self.deadline is not None and time.time() >= self.deadline

    def is_dropped(self) -> bool:
        """True if the broker dropped it."""
        return self._dropped

    def drop(self) -> None:
        """Mark it dropped."""
        self._dropped = True


class RemoteChannel:
    """One process's subscription to one topic: a "channel" in the broker process."""

    __slots__ = ('topic', 'peer', '__weakref__')

    def __init__(self, topic: str, peer: Peer) -> None:
        self.topic = topic
        self.peer = peer

    def __repr__(self) -> str:
        return f'<RemoteChannel topic={self.topic!r} pid={self.peer.pid}>'

    @property
    def handler(self) -> Peer | None:
        """The process that receives the messages, while it is connected."""
        return None if self.peer.closed else self.peer


class Peer:
    """A connected app process: its connection, subscriptions, outbox and counters."""

    def __init__(self, broker: Broker, sock: socket.socket, number: int) -> None:
        self.broker = broker
        self.sock = sock
        self.number = number
        self.pid = 0
        self.name = ''
        self.role = ''
        self.origin = ''            # what the id of every MESSAGE it sends starts with
        self.rejected = 0           # MESSAGE frames dropped: not its origin, or internal
        self.topics: dict[str, RemoteChannel] = {}
        self.unanchored = 0         # of its topics, those that topics.is_unanchored
        self.patterns = 0           # of its topics, those that topics.is_pattern
        self.outbox: SimpleQueue = SimpleQueue()
        self.messages_in = 0        # MESSAGE frames received (reader thread)
        self.messages_out = 0       # MESSAGE frames written (writer thread)
        self.queued_out = 0         # MESSAGE frames put in the outbox (routing)
        self.direct_out = 0         # MESSAGE frames written at once by routing
        self.dropped = 0            # frames that could not be written (writer thread)
        # Routing writes to an idle connection itself, without waking the writer thread,
        # only while nothing of this process is queued or being written: items_put
        # (routing) equals items_written (writer), and write_claim is free.
        self.write_claim = threading.Lock()
        self.items_put = 0
        self.items_written = 0
        # Likewise the reader routes its own batch when none of its earlier batches
        # waits for a router: batches_put (reader) equals batches_routed (router).
        self.batches_put = 0
        self.batches_routed = 0
        self.subscriptions_announced = 0    # in its HELLO: SUBs that follow at once
        self.subscriptions_applied = 0
        self.overflow_dropped = 0           # droppable messages dropped: it was too slow
        self.bytes_put = 0                  # bytes put in the outbox (routing)
        self.bytes_done = 0                 # ... written or dropped (writer thread)
        self.closed = False
        self.last: RoutedMessage | None = None   # the message last scheduled here
        self.connected_at = time.time()
        self._first = b''                   # the frames that came with HELLO
        self.reader = threading.Thread(target=self._read_loop, daemon=True,
                                       name=f'channels-peer-{number}-reader')
        self.writer = threading.Thread(target=self._write_loop, daemon=True,
                                       name=f'channels-peer-{number}-writer')

    def __repr__(self) -> str:
        return f'<Peer #{self.number} pid={self.pid} topics={len(self.topics)}>'

    @property
    def pending(self) -> int:
        """Messages in the outbox, not yet written."""
        return max(self.queued_out - self.messages_out - self.dropped, 0)

    def stats(self) -> dict[str, Any]:
        """This process's line of ``channels-broker stats``."""
        return {'pid': self.pid, 'name': self.name, 'subscriptions': sorted(self.topics),
                'messages_in': self.messages_in,
                'messages_out': self.messages_out + self.direct_out,
                'pending': self.pending,
                'dropped': self.dropped + self.overflow_dropped,
                'connected_s': round(time.time() - self.connected_at, 3)}

    def deliver(self, data: bytes, count: int) -> None:
        """Send *data* (whole frames, *count* of them messages) to this process: at once
        if its connection is idle and can take it without blocking, else through its
        outbox and writer thread. Called by routing only (one thread at a time)."""
        if self.closed:
            return
        framed = wire.connection_bytes(data)
        if self.items_put == self.items_written and self.write_claim.acquire(False):
            try:
                try:
                    sent = self.sock.send(framed, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self.closed = True       # its reader will notice, and say goodbye
                    return
                if sent == len(framed):
                    self.direct_out += count
                    return
                framed = framed[sent:]       # the rest goes first, through the writer
            finally:
                self.write_claim.release()
        self.items_put += 1
        self.queued_out += count
        self.bytes_put += len(framed)
        self.outbox.put((framed, count))

    def shutdown_reading(self) -> None:
        """Make the reader see the end of the stream (used when the broker stops)."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def close(self) -> None:
        """Close the connection (after both threads are done with it)."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    # the gate's thread, then the reader thread ---------------------------------------

    def take_hello(self, batch: bytes) -> bytes:
        """Read the HELLO that begins *batch*, the connection's first; returns the frames
        that follow it in the batch. Called by the gate."""
        frames = list(wire.iter_frames(batch, self.broker.max_frame))
        if not frames or frames[0][0] != wire.HELLO:
            raise ProtocolError('the first frame of a connection must be HELLO')
        kind, start, end = frames[0]
        hello = _Hello(wire.decode_json(batch[start + wire.HEADER.size:end]))
        self.pid = hello.pid
        self.name = hello.name
        self.role = hello.role
        self.origin = hello.origin
        self.subscriptions_announced = hello.subscriptions
        return batch[end:]

    def start(self, first: bytes) -> None:
        """Start the writer and the reader of an admitted process; *first*: the frames
        that came with its HELLO."""
        self._first = first
        self.writer.start()
        self.reader.start()

    def _read_loop(self) -> None:
        broker = self.broker
        try:
            self._welcome()
            logger.info('process %d connected (%s)', self.pid, self.name or 'no name')
            limit = broker.max_frame
            reader = wire.BatchReader(self.sock.fileno(), broker.max_batch,
                                      broker.partial_frame_timeout)
            while True:
                self._hand_over(self._read(reader, limit))
        except ProtocolError as exc:
            logger.warning('dropped the connection of process %s: %s', self.pid or '?', exc)
        except (EOFError, OSError):
            pass
        except Exception:
            logger.exception('reader of process %s failed; its connection is dropped',
                             self.pid or '?')
        finally:
            if not broker.stopping:     # else the broker closes all once delivered
                self.queue([(_GONE, self, None)])

    def _welcome(self) -> None:
        """What an admitted process is told first, and the frames that came with HELLO."""
        broker = self.broker
        lost, reason = broker.lost.pop(self.origin, (0, ''))
        if lost:
            with broker.route_lock:
                self.deliver(wire.encode_json(wire.NOTICE, {
                    'lost': lost, 'reason': f'this process was cut off: {reason}'}), 0)
        if broker.holding and broker.awaits(self) and not self.subscriptions_announced:
            with broker.route_lock:
                broker._rejoined(self)
        first, self._first = self._first, b''
        if first:
            self.queue(self._decode(first, broker.max_frame))

    def queue(self, items: list[Any]) -> None:
        """Put decoded *items* on the inbound queue, for the routing threads."""
        if items:
            self.batches_put += 1
            self.broker.inbound.queue.put((self, items))

    def _read(self, reader: wire.BatchReader, limit: int) -> list[Any]:
        """The items of the batches that have arrived, decoded (blocks for one)."""
        batches = reader.read()
        if len(batches) == 1:
            return self._decode(batches[0], limit)
        items: list[Any] = []
        for batch in batches:
            items.extend(self._decode(batch, limit))
        return items

    def _hand_over(self, items: list[Any]) -> None:
        """Route *items* now if nothing of ours waits and nobody routes, else queue them."""
        broker = self.broker
        if broker.fast_routing and not broker.holding \
                and self.batches_put == self.batches_routed \
                and broker.route_lock.acquire(False):
            try:        # nothing of ours waits and nobody routes: save a hand-off
                broker.route(items, True)
            finally:
                broker.route_lock.release()
        else:
            self.queue(items)

    def _decode(self, batch: bytes, limit: int) -> list[Any]:
        items: list[Any] = []
        append = items.append
        header = wire.HEADER.size
        messages = 0
        short = self.broker.short_topic
        origin = self.origin
        skip = len(origin)
        longest = skip + _MAX_SEQUENCE_DIGITS
        topic = None
        internal = False
        for frame in wire.decode_batch(batch, limit):
            kind, start, end = frame[0], frame[1], frame[2]
            if kind == wire.MESSAGE:
                messages += 1
                if frame[3] != topic:       # consecutive messages mostly share a topic
                    topic = frame[3]
                    if len(topic) > short:
                        self._check_topic(topic, 'MESSAGE')
                    internal = topic.startswith(_INTERNAL)      # wire.is_internal
                message_id = frame[4]
                if message_id.startswith(origin) and len(message_id) <= longest \
                        and message_id[skip:].isdecimal() and not internal:
                    append(RoutedMessage(topic, message_id, frame[5], frame[6], frame[7],
                                         batch[start:end], self))
                else:
                    self._reject(topic, message_id)
            elif kind == wire.SUB:
                topic_text = wire.decode_topic(batch[start + header:end])
                self._check_topic(topic_text, 'SUB')
                append((_SUB, self, topic_text))
            elif kind == wire.UNSUB:
                topic_text = wire.decode_topic(batch[start + header:end])
                self._check_topic(topic_text, 'UNSUB')
                append((_UNSUB, self, topic_text))
            elif kind == wire.PING:
                append((_PING, self, wire.decode_ping(batch[start + header:end])))
            elif kind == wire.FENCE:
                append((_FENCE, self, wire.decode_ping(batch[start + header:end])))
            else:
                raise ProtocolError(f'unexpected {wire.KIND_NAMES[kind]} frame from an app '
                                    f'process')
        self.messages_in += messages
        return items

    def _check_topic(self, topic: str, kind: str) -> None:
        """Raise ProtocolError for a topic over MAX_TOPIC_LENGTH (the app side refuses
        those before they are sent); else compile a pattern here, in the reader, so that
        routing finds it compiled."""
        size = topic_size(topic)
        if size > self.broker.max_topic:
            raise ProtocolError(f'{kind} topic of {size} bytes, over '
                                f'MAX_TOPIC_LENGTH={self.broker.max_topic}')
        if kind != 'UNSUB' and is_pattern(topic):
            pattern_matcher(topic)

    def _reject(self, topic: str, message_id: str) -> None:
        """Drop a MESSAGE this process may not send (reader thread)."""
        self.rejected += 1
        self.broker.rejected += 1
        if self.rejected == 1:
            why = f'its topic {topic!r:.100} is internal (local to each process)' \
                if wire.is_internal(topic) else \
                f'its id {message_id!r:.100} is not {self.origin!r} and a sequence number'
            logger.warning('dropped a message from process %d: %s; its later ones like it '
                           'are dropped and counted without a word', self.pid, why)


    # the writer thread -------------------------------------------------------------------

    def _write_loop(self) -> None:
        # outbox items: (bytes as Connection.send_bytes writes them, messages in them)
        outbox = self.outbox
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLOUT)
        stop = False
        while not stop:
            items = [outbox.get()]
            while len(items) < 1024:
                try:
                    items.append(outbox.get_nowait())
                except Empty:
                    break
            if any(item is STOP for item in items):
                stop = True
                items = [item for item in items if item is not STOP]
            unwritten = items
            stalled: int | None = None       # messages lost, if it stalled
            with self.write_claim:
                if not self.closed:
                    try:
                        for group in _group(items):
                            if not self._write(group[0][0] if len(group) == 1 else
                                               b''.join([data for data, _ in group]),
                                               poller):
                                stalled = self.pending
                                break
                            self.messages_out += sum([count for _, count in group])
                            unwritten = unwritten[len(group):]
                    except OSError as exc:
                        if not self.broker.stopping:
                            logger.info('writing to process %d failed (%s); it is going '
                                        'away', self.pid, exc)
                        self.closed = True
                self.dropped += sum([count for _, count in unwritten])
                self.items_written += len(items)
                self.bytes_done += sum([len(data) for data, _ in items])
            if stalled is not None:
                with self.broker.route_lock:
                    self.broker.cut_off(self, stalled, f'it left what the broker wrote to '
                                        f'it unread for STALL_TIMEOUT='
                                        f'{self.broker.stall_timeout:.3g}s')
            self.broker.written()
        if not self.broker.stopping:
            self.close()      # the process is gone and its reader is done

    def _write(self, data: bytes, poller: select.poll) -> bool:
        """Write all of *data*; False if the process took none of it for the broker's
        stall timeout. Non-blocking sends, not a socket timeout (which would make the
        descriptor non-blocking for the reader thread too), tried again every
        ``_STALL_POLL_MS`` even if poll() says no: a Unix socket polls writable only
        once three quarters of its buffer are free, but takes more as soon as its
        reader has consumed one of the (up to 36 KiB) pieces queued in the kernel."""
        sock = self.sock
        view = memoryview(data)
        stuck_since = 0.0
        while view:
            try:
                sent = sock.send(view, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            if sent:
                view = view[sent:]
                stuck_since = 0.0
                continue
            now = time.monotonic()
            if not stuck_since:
                stuck_since = now
            elif now - stuck_since >= self.broker.stall_timeout:
                return False
            poller.poll(_STALL_POLL_MS)
        return True


_STALL_POLL_MS = 50
"""Milliseconds between attempts to write to a process that takes nothing."""


def _group(items: list[tuple[bytes, int]]) -> list[list[tuple[bytes, int]]]:
    """Group outbox items into writes of about ``wire.BATCH_BYTES``."""
    groups: list[list[tuple[bytes, int]]] = []
    group: list[tuple[bytes, int]] = []
    size = 0
    for item in items:
        if size and size + len(item[0]) > wire.BATCH_BYTES:
            groups.append(group)
            group, size = [], 0
        group.append(item)
        size += len(item[0])
    if group:
        groups.append(group)
    return groups


class _OtherMachines:
    """The sender of what the bridge brings in (the brokers of other machines), in the
    bookkeeping that routing keeps per sender, as a :class:`Peer` is for a process."""

    pid = 0
    name = 'bridge'

    def __init__(self) -> None:
        self.batches_put = 0
        self.batches_routed = 0

    def __repr__(self) -> str:
        return '<other machines, through the bridge>'


BRIDGE_ORDERS = ('local', 'engine')
"""``local``: a message reaches this machine's processes at once, and the others through
the engine. ``engine``: every message, this machine's too, is routed when it comes back
from the engine, so every channel on every machine sees one order."""


class _Inbound:
    """The one inbound queue: batches of items from every reader, in arrival order.

    ``get()`` hands out the next :class:`RoutedMessage` and applies SUB, UNSUB, PING
    and disconnects on the way, in order with the messages around them.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.queue: SimpleQueue = SimpleQueue()
        self.current: deque[Any] = deque()
        self.sequencer: Sequencer | None = None

    def get(self, timeout: float | None = None) -> Any:
        """The next message (or the STOP sentinel); ``queue.Empty`` after *timeout*."""
        current = self.current
        while True:
            if not current:
                batch = self.queue.get(timeout=timeout)
                if batch is STOP:
                    return STOP
                current.extend(batch[1])
            item = current.popleft()
            if type(item) is RoutedMessage:
                return item
            if self.sequencer is not None:
                self.sequencer.wait_all_done()   # control follows every earlier message
            with self.broker.route_lock:
                self.broker.apply(*item)


class _BrokerMachinery:
    """What the broker process's MessageBroker threads work with (see workers.Worker)."""

    def __init__(self, broker: Broker, sequencer: Sequencer | None) -> None:
        self.broker = broker
        self.messages = broker.inbound
        self.sequencer = sequencer
        broker.inbound.sequencer = sequencer

    def schedule(self, channel: RemoteChannel, message: RoutedMessage) -> bool:
        """Put *message* in the outbox of *channel*'s process, once per message."""
        peer = channel.peer
        if peer.closed or peer.last is message:
            return False
        peer.last = message
        with self.broker.route_lock:
            peer.deliver(message.frame, 1)
        return True


class BatchRouter(MessageBroker):
    """The broker process's default routing: :class:`MessageBroker`'s, a batch at a time.

    Each ``run()`` takes every batch the readers have queued (at least one), routes
    every message in them exactly as ``MessageBroker.run()`` would (the channels
    matching its topic, once per process), and hands each target process its share as
    one chunk (split at ``BATCH_BYTES``), so a writer makes one write where it would
    make hundreds. Used when the broker class is the default and there is
    one routing thread; a user's subclass runs as written, a message at a time.
    """

    def run(self) -> None:
        """Route the inbound batches that wait."""
        machinery = self.machinery
        broker = machinery.broker
        if broker.holding and time.monotonic() > broker.hold_deadline:
            with broker.route_lock:
                broker.end_hold(f'{len(broker._awaited)} processes did not come back '
                                f'within {broker.rejoin_timeout:.3g}s')
        batch = machinery.messages.queue.get(timeout=min(self.timeout, 0.1)
                                             if broker.holding else self.timeout)
        if batch is STOP:
            self._stopping = True
            raise Empty
        # Route every batch that waits as one: each process's share of them goes out in
        # one write, so a router that fell behind catches up with fewer, larger writes.
        batches = [batch]
        queue = machinery.messages.queue
        while len(batches) < _MAX_BATCHES:
            try:
                batch = queue.get_nowait()
            except Empty:
                break
            if batch is STOP:
                self._stopping = True
                break
            batches.append(batch)
        if len(batches) == 1:
            items = batches[0][1]
        else:
            items = []
            for _, more in batches:
                items.extend(more)
        with broker.route_lock:
            self.routed += broker.route(items, self.running)
            for peer, _ in batches:
                peer.batches_routed += 1


_MAX_BATCHES = 256
"""Inbound batches a router takes at once, at most."""


def _hand_out(shares: dict[Peer, list[bytes]]) -> None:
    for peer, frames in shares.items():
        if len(frames) == 1:
            peer.deliver(frames[0], 1)
            continue
        data = b''.join(frames)
        if len(data) <= wire.BATCH_BYTES:
            peer.deliver(data, len(frames))
        else:       # a batch the process can take: under its limit, as senders make them
            for group in wire.group_frames(frames):
                peer.deliver(b''.join(group), len(group))


_SETTING_OF = {
    'max_frame': 'MAX_FRAME_BYTES', 'max_connections': 'MAX_CONNECTIONS',
    'rejoin_timeout': 'REJOIN_TIMEOUT', 'max_pending': 'MAX_PENDING_BYTES',
    'max_handshakes': 'MAX_HANDSHAKES', 'handshake_timeout': 'HANDSHAKE_TIMEOUT',
    'partial_frame_timeout': 'PARTIAL_FRAME_TIMEOUT', 'max_topic': 'MAX_TOPIC_LENGTH',
    'max_subscriptions': 'MAX_SUBSCRIPTIONS', 'max_patterns': 'MAX_PATTERNS',
    'max_unanchored': 'MAX_UNANCHORED_PATTERNS', 'stall_timeout': 'STALL_TIMEOUT',
    'bridge_url': 'BRIDGE_URL', 'bridge_namespace': 'BRIDGE_NAMESPACE',
    'bridge_order': 'BRIDGE_ORDER', 'bridge_max_pending': 'BRIDGE_MAX_PENDING_BYTES',
}
"""The keyword of :class:`Broker` that each setting gives (``Broker.from_settings``)."""


class Broker:
    """The broker: listens on *address* and routes between the processes that connect.

    ``start()`` binds and starts the threads (raising ``OSError`` if a live broker holds
    the address); ``stop(timeout)`` delivers what it holds and releases everything. A
    context manager does both.
    """

    @classmethod
    def from_settings(cls, address: Address, authkey: bytes | None = None,
                      **arguments: Any) -> Broker:
        """A broker on *address* whose limits and bridge are this process's settings
        (``channels.settings``, from ``CHANNELS_*`` and ``configure()``), as
        ``channels-broker`` starts it; *arguments* are passed on and take precedence
        (``broker_threads=``, ``broker_class=``, ``state_file=``, ...)."""
        from_settings: dict[str, Any] = {
            keyword: settings.get(name) for keyword, name in _SETTING_OF.items()}
        from_settings['bridge_retention'] = Retention(
            settings.get('BRIDGE_RETENTION_ENTRIES'), settings.get('BRIDGE_RETENTION_SECONDS'))
        return cls(address, authkey, **{**from_settings, **arguments})

    def __init__(self, address: Address, authkey: bytes | None = None, *,
                 broker_threads: int = 1, broker_class: type[Worker] = MessageBroker,
                 max_frame: int = 64 * 1024 * 1024, max_connections: int = 1024,
                 rejoin_timeout: float = 5.0, max_pending: int = 64 * 1024 * 1024,
                 worker_timeout: float = 0.5, max_handshakes: int = 256,
                 handshake_timeout: float = 5.0, partial_frame_timeout: float = 10.0,
                 state_file: str | None = None, max_topic: int = 4096,
                 max_subscriptions: int = 250_000, max_patterns: int = 10_000,
                 max_unanchored: int = 1000,
                 stall_timeout: float = 2.0, bridge_url: str | None = None,
                 bridge_namespace: str = 'mpchannels', bridge_order: str = 'local',
                 bridge_max_pending: int = 64 * 1024 * 1024,
                 bridge_retention: Retention = Retention()) -> None:
        if isinstance(address, tuple) and authkey is None:
            raise ChannelsError(
                f'a TCP address ({format_address(address)}) requires an authkey: anyone who '
                f'can reach the port could otherwise publish and subscribe. Pass '
                f'--authkey-file (or set CHANNELS_AUTHKEY), or use a Unix socket path.')
        if not (isinstance(broker_class, type) and issubclass(broker_class, MessageBroker)):
            raise TypeError(f'broker_class must be a subclass of channels.MessageBroker, got '
                            f'{broker_class!r}')
        self.address = address
        self.authkey = authkey
        self.broker_threads = broker_threads
        self.broker_class = broker_class
        self.max_frame = max_frame
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes            # connections in the gate, at most
        self.handshake_timeout = handshake_timeout
        self.partial_frame_timeout = partial_frame_timeout
        self.max_topic = max_topic                  # MAX_TOPIC_LENGTH, in UTF-8 bytes
        self.max_subscriptions = max_subscriptions  # MAX_SUBSCRIPTIONS, per process
        self.max_unanchored = max_unanchored        # MAX_UNANCHORED_PATTERNS, per process
        self.max_patterns = max_patterns            # MAX_PATTERNS, per process
        if bridge_order not in BRIDGE_ORDERS:
            raise ConfigurationError(f'the bridge order must be one of '
                                     f'{", ".join(BRIDGE_ORDERS)}, got {bridge_order!r}')
        if bridge_url is not None and not (broker_class is MessageBroker
                                           and broker_threads == 1):
            raise ConfigurationError('a bridge routes with the default broker: one routing '
                                     'thread and no --broker-class')
        self.bridge_url = bridge_url
        self.bridge_namespace = bridge_namespace
        self.bridge_order = bridge_order
        self.bridge_max_pending = bridge_max_pending
        self.bridge_retention = bridge_retention
        self.bridge: Bridge | None = None
        # (bridge state, batches from the bridge put by then): saved once all are routed
        self._bridge_snapshot: tuple[dict, int] | None = None
        self._bridge_missed = False     # the bridge handed over messages while stopping
        self._bridge_warned = False
        self._other_machines = _OtherMachines()
        # a topic of at most this many characters is within max_topic bytes for sure
        self.short_topic = min(64, max_topic // 4)
        self.max_batch = max(max_frame + wire.HEADER.size, wire.BATCH_BYTES) + 1024
        self.worker_timeout = worker_timeout
        self.index: TopicIndex[RemoteChannel] = TopicIndex()
        self.index_lock = threading.Lock()
        self.inbound = _Inbound(self)
        self.peers: dict[int, Peer] = {}
        self.stopping = False
        self.started_at = 0.0
        self.expired = 0                # messages dropped (expired, or droppable at stop)
        self.route_lock = threading.Lock()
        self.fast_routing = broker_class is MessageBroker and broker_threads == 1
        self._barriers: deque[tuple[Peer, int, list[tuple[Peer, int]]]] = deque()
        self.max_pending = max_pending
        self.dropped = 0                # droppable messages dropped for slow processes
        self.rejected = 0               # messages dropped: not of their sender, or internal
        # origin -> (messages lost when it was cut off, why): told when it is back
        self.lost: dict[str, tuple[int, str]] = {}
        self.lost_total = 0
        self.stall_timeout = stall_timeout
        self.rejoin_timeout = rejoin_timeout
        self.holding = False            # after a restart, until processes are back
        self.hold_deadline = 0.0
        self._held: list[Any] = []        # messages and PINGs, in order
        # the processes a restarted broker waits for: origins (or, from a state file
        # written by hand, pids): a HELLO with an awaited pid but another secret is not one
        self._awaited: set[statefile.Entry] = set()
        self.state_file = state_file    # None: statefile.default_path(address) at start()
        self._statefile_lock = threading.Lock()
        self._statefile_owned = False   # True while this broker owns the state file
        self._statefile_warned = False
        self.workers: list[Worker] = []
        self._listener: socket.socket | None = None
        self._gate: Gate | None = None
        self._numbers = itertools.count(1)
        self._peers_lock = threading.Lock()
        self._state = 'new'

    def __repr__(self) -> str:
        return (f'<Broker {format_address(self.address)} {self._state} '
                f'processes={len(self.peers)} topics={len(self.index)}>')

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def address_text(self) -> str:
        """The address as text."""
        return format_address(self.address)

    # lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the address and start accepting, reading and routing."""
        if self._state != 'new':
            raise RuntimeError(f'{self!r} was started already')
        self._listener = listen(self.address)
        if isinstance(self.address, tuple) and self.address[1] == 0:
            self.address = self._listener.getsockname()[:2]
        self._find_state_file()           # (the bridge resumes from the state beside it)
        if self.bridge_url is not None:
            try:
                self._start_bridge()
            except BaseException:
                self._listener.close()
                if isinstance(self.address, str):
                    os.unlink(self.address)
                raise
        self._state = 'running'
        self.started_at = time.time()
        if self.fast_routing:
            self._awaited = self._load_awaited()
            if self._awaited:
                self.holding = True
                self.hold_deadline = time.monotonic() + self.rejoin_timeout
                logger.info('holding messages until the %d processes connected before '
                            'this start are back (at most %.3gs)', len(self._awaited),
                            self.rejoin_timeout)
        registry.use(self.index, self.index_lock)
        sequencer = Sequencer(STOP) if self.broker_threads > 1 else None
        machinery = _BrokerMachinery(self, sequencer)
        broker_class = self.broker_class
        if broker_class is MessageBroker and self.broker_threads == 1:
            broker_class = BatchRouter
        self.workers = [broker_class(machinery, n, self.worker_timeout)   # type: ignore
                        for n in range(self.broker_threads)]
        for worker in self.workers:
            worker.start()
        self._gate = Gate(self._listener, self.authkey, max_pending=self.max_handshakes,
                          timeout=self.handshake_timeout, on_hello=self._arrived,
                          on_stats=self.stats)
        self._gate.start()
        logger.info('listening on %s', self.address_text)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop accepting, deliver what is held, close; True if it all ended in time."""
        if self._state != 'running':
            return True
        self._state = 'stopping'
        deadline = time.monotonic() + timeout
        self.stopping = True
        if self._gate is not None:      # no connection comes in, nor out of the gate
            self._gate.stop(max(deadline - time.monotonic(), 0.05))
        with self._peers_lock:
            peers = list(self.peers.values())
        for peer in peers:
            peer.shutdown_reading()
        for peer in peers:
            if peer.reader.is_alive():
                peer.reader.join(max(deadline - time.monotonic(), 0.05))
        for _ in self.workers:
            self.inbound.queue.put(STOP)      # behind everything the readers queued
        for worker in self.workers:
            worker.join(max(deadline - time.monotonic(), 0.05))
        for worker in self.workers:
            worker.stop()                     # only stragglers are still running
        if self.bridge is not None:           # what was routed here is on its way out
            if self.bridge.stop(max(deadline - time.monotonic(), 0.1)):
                self._save_final_bridge_state()
        for peer in peers:
            peer.outbox.put(STOP)
        for peer in peers:
            if peer.writer.is_alive():
                peer.writer.join(max(deadline - time.monotonic(), 0.05))
            peer.close()
        if isinstance(self.address, str):
            try:
                os.unlink(self.address)
            except OSError:
                pass
        if self.bridge is None:
            self._remove_state_file()
        # (a bridged broker keeps it: what other machines send while it is down reaches
        # its processes when they are back, so its next start waits for them too)
        threads = [self._gate and self._gate.thread, *(w.thread for w in self.workers),
                   self.bridge and self.bridge.thread,
                   *(p.reader for p in peers), *(p.writer for p in peers)]
        alive = [t.name for t in threads if t is not None and t.is_alive()]
        self._state = 'stopped'
        if alive:
            logger.warning('threads %s did not stop within %.3gs', alive, timeout)
        logger.info('stopped')
        return not alive

    def _arrived(self, sock: socket.socket, batch: bytes) -> bool:
        """The gate's hand-over of an authenticated connection and its first batch:
        True if it is an app process (started, or refused for want of room), False for
        a stats client (the gate serves it)."""
        peer = Peer(self, sock, next(self._numbers))
        first = peer.take_hello(batch)
        if peer.role == 'stats':
            return False
        if not self.admit(peer):
            limit = self.max_connections
            logger.warning('refused process %d: %d processes are connected, and '
                           'MAX_CONNECTIONS is %d', peer.pid, limit, limit)
            try:
                sock.send(wire.connection_bytes(wire.encode_json(wire.NOTICE, {
                    'error': f'the broker refused this process: it serves {limit} '
                             f'processes, its MAX_CONNECTIONS; raise it (channels-broker '
                             f'--max-connections N) or connect fewer processes'})),
                    socket.MSG_DONTWAIT)
            except OSError:
                pass
            sock.close()
            return True
        peer.start(first)
        return True

    # called by readers and by the routing threads ---------------------------------------

    def admit(self, peer: Peer) -> bool:
        """A peer finished its handshake as an app process: False if there is no room."""
        with self._peers_lock:
            if len(self.peers) >= self.max_connections:
                return False
            self.peers[peer.number] = peer
        self._save_peers()
        return True

    def apply(self, kind: str, peer: Peer, value: Any) -> None:
        """Apply a control item from the inbound queue (routing, under ``route_lock``)."""
        if kind == _SUB:
            # an internal topic is local to each process: never routed to (but counted
            # as applied, for the hold after a restart)
            if value not in peer.topics and not peer.closed \
                    and not wire.is_internal(value):
                pattern = is_pattern(value)
                unanchored = pattern and is_unanchored(value)
                if len(peer.topics) >= self.max_subscriptions:
                    self._drop_for_breaking_a_limit(
                        peer, f'it subscribed more than MAX_SUBSCRIPTIONS='
                              f'{self.max_subscriptions} distinct topics')
                elif pattern and peer.patterns >= self.max_patterns:
                    self._drop_for_breaking_a_limit(
                        peer, f'it subscribed more than MAX_PATTERNS={self.max_patterns} '
                              f'patterns')
                elif unanchored and peer.unanchored >= self.max_unanchored:
                    self._drop_for_breaking_a_limit(
                        peer, f'it subscribed more than MAX_UNANCHORED_PATTERNS='
                              f'{self.max_unanchored} patterns with neither a literal prefix '
                              f'nor a literal suffix')
                else:
                    peer.unanchored += unanchored
                    peer.patterns += pattern
                    channel = peer.topics[value] = RemoteChannel(value, peer)
                    with self.index_lock:
                        self.index.add(value, channel)
            peer.subscriptions_applied += 1
            if self.holding and self.awaits(peer) \
                    and peer.subscriptions_applied >= peer.subscriptions_announced:
                self._rejoined(peer)
        elif kind == _UNSUB:
            channel = peer.topics.pop(value, None)
            if channel is not None:
                peer.unanchored -= is_unanchored(value)
                peer.patterns -= is_pattern(value)
                with self.index_lock:
                    self.index.remove(value, channel)
        elif kind == _PING:
            # PONG once every process has been written what was routed before the PING:
            # the sender may then forget those messages (see client.BrokerLink)
            waits = [(p, p.items_put) for p in list(self.peers.values())
                     if p.items_put > p.items_written and not p.closed]
            if waits:
                self._barriers.append((peer, value, waits))
                self._check_barriers()     # a writer may have finished meanwhile
            else:
                peer.deliver(wire.encode_ping(wire.PONG, value), 0)
        elif kind == _FENCE:
            # everything the process sent before the FENCE is applied (its SUBs are in
            # the index, its messages are in their receivers' shares): answer at once,
            # behind what was routed to it, whatever other processes' writers do
            peer.deliver(wire.encode_ping(wire.FENCE, value), 0)
        elif kind == _LOST:
            count, reason = value
            self.lost_total += count
            notice = wire.encode_json(wire.NOTICE, {
                'lost': count, 'reason': f'messages between machines were lost: {reason}'})
            for other in list(self.peers.values()):
                if not other.closed:
                    other.deliver(notice, 0)
        elif kind == _GONE:
            with self.index_lock:
                for topic, channel in peer.topics.items():
                    self.index.remove(topic, channel)
            peer.topics.clear()
            peer.closed = True
            peer.outbox.put(STOP)
            with self._peers_lock:
                self.peers.pop(peer.number, None)
            self._save_peers()
            logger.info('process %d disconnected', peer.pid)
            self._check_barriers()

    # the bridge ------------------------------------------------------------------------

    def _start_bridge(self) -> None:
        """Connect the bridge (raises ConfigurationError or BridgeError saying what is
        wrong with the URL, the engine or the extra)."""
        self.bridge = Bridge.from_url(
            self.bridge_url, self.bridge_namespace, broker_id=self.broker_id,
            on_frames=self._from_other_machines, on_lost=self._lost_on_the_bridge,
            max_pending_bytes=self.bridge_max_pending, retention=self.bridge_retention,
            echo=self.bridge_order == 'engine', state=self._load_bridge_state(),
            on_tick=self._bridge_tick)
        self.bridge.start()
        logger.info('bridged through %s (namespace %r, %s order) as %r', self.bridge.url,
                    self.bridge_namespace, self.bridge_order, self.broker_id)

    @property
    def broker_id(self) -> str:
        """This broker's name to the other machines' brokers: host and address."""
        return f'{socket.gethostname()}/{self.address_text}'[:255]

    def _from_other_machines(self, frames: bytes) -> None:
        """The bridge's thread: MESSAGE frames from other machines, routed as a batch from
        a process is (expiry is checked again there; internal topics never come in).
        Frames it cannot read raise ProtocolError before any is routed (the bridge then
        hands over its entries one by one, and tells the bad one's messages lost)."""
        sender = self._other_machines
        items = [RoutedMessage(frame[3], frame[4], frame[5], frame[6], frame[7],
                               frames[frame[1]:frame[2]], sender)
                 for frame in wire.decode_batch(frames, len(frames))
                 if frame[0] == wire.MESSAGE and not wire.is_internal(frame[3])]
        if items:
            self._put_from_other_machines(items)

    def _put_from_other_machines(self, items: list[Any]) -> None:
        if self.stopping:
            self._bridge_missed = True     # read, never routed: not in the saved state
            return
        sender = self._other_machines
        sender.batches_put += 1
        self.inbound.queue.put((sender, items))

    def _lost_on_the_bridge(self, count: int, reason: str) -> None:
        """The bridge's thread: messages gone for good; every process here is told, with
        ``lona.channels.lost``, in order with the messages around the gap (and, after a
        restart, once the processes connected before are back: the hold keeps it)."""
        logger.warning('the bridge lost %d messages: %s; telling every process', count,
                       reason)
        self._put_from_other_machines([(_LOST, self._other_machines, (count, reason))])

    # the bridge's state, for a restart: where it read in the stream, and the last number
    # of every other broker, so that a restarted broker reads on (and sees gaps)

    def _bridge_state_path(self) -> str | None:
        return statefile.bridge_path(self.state_file) if self._statefile_owned else None

    def _load_bridge_state(self) -> dict | None:
        path = self._bridge_state_path()
        if path is None:
            return None
        try:
            return statefile.read_bridge_state(path)
        except FileNotFoundError:
            return None
        except (OSError, statefile.StateFileError) as exc:
            logger.warning('ignoring the bridge state file %s: %s; the bridge reads from '
                           'the stream\'s end', path, exc)
            return None

    def _save_bridge_state(self, state: dict) -> None:
        path = self._bridge_state_path()
        if path is None:
            return
        with self._statefile_lock:
            try:
                statefile.write_bridge_state(path, state)
            except OSError as exc:
                if not self._bridge_warned:
                    self._bridge_warned = True
                    logger.warning('cannot write the bridge state file %s (%s): a restart '
                                   'will read the stream from its end', path, exc)

    def _bridge_tick(self) -> None:
        """The bridge's thread, about once a second: save its state one tick late, once
        every message it had handed over by then is routed (in its processes' outboxes).
        A broker killed now reads again what it had not routed; its processes drop what
        they had already (by each sender's sequence)."""
        if self.holding or self.stopping:   # held messages are not routed yet
            return
        ready = self._bridge_snapshot
        sender = self._other_machines
        if ready is not None and sender.batches_routed >= ready[1]:
            self._save_bridge_state(ready[0])
            ready = None
        if ready is None:
            self._bridge_snapshot = (self.bridge.state(), sender.batches_put)

    def _save_final_bridge_state(self) -> None:
        """At stop, the bridge thread ended: its state now if all it handed over was
        routed, else the last one that was."""
        ready = self._bridge_snapshot
        if not self._bridge_missed and not self.holding and \
                self._other_machines.batches_routed >= self._other_machines.batches_put:
            self._save_bridge_state(self.bridge.state())
        elif ready is not None and self._other_machines.batches_routed >= ready[1]:
            self._save_bridge_state(ready[0])

    def _drop_for_breaking_a_limit(self, peer: Peer, why: str) -> None:
        """Drop *peer*'s connection for breaking a limit (routing, under ``route_lock``):
        nothing more is routed to it or applied from it; its reader ends and says goodbye."""
        logger.warning('dropped the connection of process %d: %s', peer.pid, why)
        peer.deliver(wire.encode_json(wire.NOTICE, {
            'error': f'the broker dropped this connection: {why}'}), 0)
        peer.closed = True
        peer.shutdown_reading()

    def _check_barriers(self) -> None:
        """Answer the PINGs whose messages every process has been written (or left).
        The caller holds ``route_lock``.

        They become answerable in the order they came: a later PING waits, for each
        process an earlier one waits for, for at least as much (the counters only
        grow), or for nothing if that process had all it was put written by then. So
        only the oldest ones are looked at, and a flood of PINGs costs each one once."""
        barriers = self._barriers
        while barriers:
            peer, token, waits = barriers[0]
            if not all(p.items_written >= n or p.closed for p, n in waits):
                return
            barriers.popleft()
            peer.deliver(wire.encode_ping(wire.PONG, token), 0)

    def written(self) -> None:
        """A writer wrote: maybe a PING can be answered now."""
        if self._barriers:
            with self.route_lock:
                self._check_barriers()

    # restarts: processes that were connected to the broker before get a moment to
    # reconnect and subscribe again before anything is routed, so that what their
    # peers send again after the restart reaches them

    def _find_state_file(self) -> None:
        if self.state_file is None:
            try:
                self.state_file = statefile.default_path(self.address)
            except (ChannelsError, OSError) as exc:
                logger.warning('no state file, so a restart cannot wait for the processes '
                               'connected before: %s', exc)
                return
        self._statefile_owned = True

    def _save_peers(self) -> None:
        with self._statefile_lock:
            if not self._statefile_owned:
                return
            # the processes still awaited after a restart stay listed: if this broker
            # dies before they are back, the next one waits for them too
            pids = sorted({p.origin for p in list(self.peers.values())} | self._awaited,
                          key=str)
            try:
                statefile.write_pids(self.state_file, pids)
            except OSError as exc:
                if not self._statefile_warned:
                    self._statefile_warned = True
                    logger.warning('cannot write the state file %s (%s): a restart will not '
                                   'wait for the processes connected now', self.state_file,
                                   exc)

    def _remove_state_file(self) -> None:
        """A graceful stop leaves no state file: the next start waits for nobody."""
        with self._statefile_lock:
            if self._statefile_owned:
                self._statefile_owned = False
                try:
                    os.unlink(self.state_file)
                except OSError:
                    pass

    def _load_awaited(self) -> set[statefile.Entry]:
        path = self.state_file
        if not self._statefile_owned:
            return set()
        try:
            pids = statefile.read_pids(path)
        except FileNotFoundError:
            return set()
        except (OSError, statefile.StateFileError) as exc:
            logger.warning('ignoring the state file %s: %s', path, exc)
            return set()
        return {entry for entry in pids if (pid := statefile.pid_of(entry)) != os.getpid()
                and psutil.pid_exists(pid)}

    def awaits(self, peer: Peer) -> bool:
        """True if a restarted broker waits for *peer*: its origin (which only it can
        prove) is in the state file, or its pid where the file names a bare pid."""
        return peer.origin in self._awaited or peer.pid in self._awaited

    def _rejoined(self, peer: Peer) -> None:
        self._awaited.discard(peer.origin)
        self._awaited.discard(peer.pid)
        if not self._awaited:
            self.end_hold('every process that was connected before is back')

    def end_hold(self, why: str) -> None:
        """Stop holding messages back after a restart and route what was held.
        The caller holds ``route_lock``."""
        if not self.holding:
            return
        self.holding = False
        held, self._held = self._held, []
        logger.info('routing again (%s); %d messages were held', why,
                    sum(1 for item in held if type(item) is RoutedMessage))
        if held:
            self.route(held, True)

    def route(self, items: list[Any], running: bool) -> int:
        """Route a reader's batch as ``MessageBroker.run()`` routes a message: each
        message to the processes with a channel on a matching topic, once per process,
        each process's share in one piece. The caller holds ``route_lock``. Returns
        the number of messages (routed or dropped)."""
        match = self.index.match
        limit = self.max_pending
        # past half the bound droppable messages are dropped, so that what is left of
        # it is room for the others: only past the whole bound is a process cut off
        soft_limit = limit // 2
        shares: dict[Peer, list[bytes]] = {}
        routed = 0
        bridge = self.bridge
        outgoing: list[bytes] = []        # for the other machines, through the bridge
        from_bridge = self._other_machines
        engine_order = self.bridge_order == 'engine'
        # consecutive messages mostly share a topic: its processes are found once for
        # the run of them (a control item may change them: it ends the run)
        last_topic: str | None = None
        peers: list[Peer] = []
        for item in items:
            if type(item) is not RoutedMessage:
                if self.holding and (item[0] == _PING or item[0] == _FENCE
                                     or item[0] == _LOST):
                    # a PONG now would confirm held messages; a FENCE would claim them
                    # routed; a loss is for the processes that are coming back
                    self._held.append(item)
                    continue
                _hand_out(shares)          # what came before a control item goes first
                shares = {}
                self.apply(*item)
                last_topic = None
                continue
            routed += 1
            if self.holding:
                self._held.append(item)
                continue
            if (item.deadline is not None and item.is_expired()) \
                    or (item.droppable and not running):
                item.drop()
                self.expired += 1
                continue
            if bridge is not None and item.sender is not from_bridge:
                outgoing.append(item.frame)
                if engine_order:
                    continue              # routed here too when the engine hands it back
            if item.topic != last_topic:
                last_topic = item.topic
                if is_match_all(last_topic):     # every subscription matches: no scan
                    peers = [peer for peer in list(self.peers.values()) if peer.topics]
                else:
                    peers = list({channel.peer: None for channel in match(last_topic)})
            for peer in peers:            # once per process, however many topics match
                if peer.closed:
                    continue
                backlog = peer.bytes_put - peer.bytes_done
                if backlog > soft_limit and not self._room_for(peer, item, backlog > limit):
                    continue
                share = shares.get(peer)
                if share is None:
                    shares[peer] = [item.frame]
                else:
                    share.append(item.frame)
        _hand_out(shares)
        if outgoing:
            bridge.publish(b''.join(outgoing), len(outgoing))
        return routed

    def _room_for(self, peer: Peer, message: RoutedMessage, full: bool) -> bool:
        """*peer* holds more than half of MAX_PENDING_BYTES unwritten (all of it if
        *full*): drop *message* for it if droppable; if not, and *full*, cut the process
        off (it is told on reconnect). False: don't add."""
        if message.droppable:
            peer.overflow_dropped += 1
            self.dropped += 1
            if peer.overflow_dropped == 1 or peer.overflow_dropped % 1000 == 0:
                logger.warning('process %d is slow: %d droppable messages dropped for it so '
                               'far (over half of MAX_PENDING_BYTES=%d)', peer.pid,
                               peer.overflow_dropped, self.max_pending)
            return False
        if not full:
            return True
        lost = peer.pending + 1
        self.cut_off(peer, lost, f'it fell more than MAX_PENDING_BYTES={self.max_pending} '
                                 f'bytes behind')
        return False

    def cut_off(self, peer: Peer, lost: int, reason: str) -> None:
        """Disconnect a process that fell behind; it learns about *lost* and *reason*
        when it connects again. The caller holds ``route_lock``."""
        peer.closed = True
        self.lost[peer.origin] = (self.lost.get(peer.origin, (0, ''))[0] + lost, reason)
        self.lost_total += lost
        logger.warning('cut off process %d: %s; about %d messages for it are lost',
                       peer.pid, reason, lost)
        try:
            peer.sock.shutdown(socket.SHUT_RDWR)      # its reader sees the end: gone
        except OSError:
            pass

    def stats(self) -> dict[str, Any]:
        """The live state, as ``channels-broker stats --json`` prints it."""
        with self._peers_lock:
            peers = sorted(self.peers.values(), key=lambda p: p.number)
        processes = [peer.stats() for peer in peers]
        return {
            'address': self.address_text,
            'pid': os.getpid(),
            'uptime_s': round(time.time() - self.started_at, 3),
            'processes': processes,
            'topics': len(self.index),
            'totals': {key: sum(p[key] for p in processes)
                       for key in ('messages_in', 'messages_out', 'dropped', 'pending')},
            'errors': sum(worker.errors for worker in self.workers),
            'expired': self.expired,
            'dropped_slow': self.dropped,
            'lost_cut_off': self.lost_total,
            'rejected': self.rejected,
            'bridge': None if self.bridge is None else self.bridge.stats(),
        }
