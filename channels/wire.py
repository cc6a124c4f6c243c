"""The wire format: the one place where frames are encoded and decoded.

::

    bytes on a socket -> batches (multiprocessing.connection's length-prefixed messages)
                      -> frames (this module) -> messages and control (client, broker)

A batch is one ``Connection.send_bytes()``: either up to ``BATCH_BYTES`` of whole
frames, or a single larger frame. A writer that bypasses ``send_bytes()`` (to write
without blocking) sends the same bytes: :func:`connection_bytes`. Every frame is::

    !IBB   body length (u32, not counting these 6 bytes), version (u8), kind (u8)
    body   kind-specific, below

=========  ========================================================================
kind       body
=========  ========================================================================
HELLO      JSON: ``{"pid": int, "role": "app" | "stats", "name": str, "secret": hex,
           "subscriptions": int}``; an app process's secret gives its origin
           (``message.origin_of``), which starts the id of every MESSAGE it sends
SUB        the topic, UTF-8 (a process's first channel on that topic)
UNSUB      the topic, UTF-8 (its last channel on that topic left)
MESSAGE    ``!BddHH`` flags (bit 0 droppable, bit 1 has deadline), deadline,
           timestamp (POSIX times within years 1 to 9999), topic length, id length;
           then topic, id (UTF-8: the sender's origin, then its decimal sequence),
           then the payload (pickled data) to the end. The broker forwards it
           unchanged, if its id has the origin of the connection it came on
PING       ``!Q`` token; the broker answers PONG with the token after everything the
           process sent before it was routed (a barrier, used at shutdown)
PONG       ``!Q`` token
FENCE      ``!Q`` token; the broker sends the same frame back once it has applied (routed)
           everything the process sent before it, without waiting for any process's
           writes (``channels.flush()``: a subscription is in force once it returns)
STATS      empty (request) or JSON (reply)
NOTICE     JSON: something the broker tells a process (``{"error": ...}``)
=========  ========================================================================

Topics that start with ``INTERNAL_PREFIX`` (``lona.channels.``) are local to each
process: no SUB or MESSAGE for one crosses the wire (the broker ignores and drops them).

Compatibility: ``VERSION`` changes whenever a layout changes; a peer that sees another
version drops the connection with a :class:`~channels.errors.ProtocolError`. The broker
never unpickles: it reads MESSAGE headers and passes the payload through as bytes.
Every length is checked against the bytes present and the size limit before anything
is decoded or allocated.
"""

from __future__ import annotations

import json
import os
import select
import struct
from collections.abc import Iterator
from typing import Any

from .errors import ProtocolError

__all__ = ['VERSION', 'HELLO', 'SUB', 'UNSUB', 'MESSAGE', 'PING', 'PONG', 'STATS', 'NOTICE',
           'FENCE',
           'HEADER', 'MESSAGE_HEADER', 'BATCH_BYTES', 'encode', 'encode_json',
           'encode_message', 'decode_message', 'decode_json', 'decode_ping', 'iter_frames',
           'group_frames', 'connection_bytes', 'encode_ping', 'decode_topic', 'BatchReader',
           'INTERNAL_PREFIX', 'is_internal']

VERSION = 2
HELLO, SUB, UNSUB, MESSAGE, PING, PONG, STATS, NOTICE = range(1, 9)
FENCE = 9
KINDS = frozenset(range(1, 10))
KIND_NAMES = {HELLO: 'HELLO', SUB: 'SUB', UNSUB: 'UNSUB', MESSAGE: 'MESSAGE', PING: 'PING',
              PONG: 'PONG', STATS: 'STATS', NOTICE: 'NOTICE', FENCE: 'FENCE'}

HEADER = struct.Struct('!IBB')
MESSAGE_HEADER = struct.Struct('!BddHH')
_TOKEN = struct.Struct('!Q')
_FLAG_DROPPABLE = 1
_FLAG_DEADLINE = 2

BATCH_BYTES = 256 * 1024
"""Frames are gathered into batches of about this size per write."""

_MAX_TOPIC = 0xFFFF
_MAX_ID = 0xFFFF
# the POSIX times of datetime(1, 1, 1) and datetime(9999, 12, 31), two days wider (any
# time zone): a deadline or timestamp outside cannot come from datetime.timestamp()
# or time.time(), and a receiver could not turn it into a datetime
_EARLIEST, _LATEST = -62135596800.0 - 172800.0, 253402300800.0 + 172800.0

INTERNAL_PREFIX = 'lona.channels.'
"""Topics starting with this are internal: only ever local to one process."""


def is_internal(topic: str) -> bool:
    """True for an internal topic (``lona.channels.lost``), or a pattern that matches only
    internal topics (``lona.channels.*``): neither crosses the wire."""
    return topic.startswith(INTERNAL_PREFIX)


def encode(kind: int, body: bytes = b'') -> bytes:
    """One frame of *kind* around *body*."""
    return HEADER.pack(len(body), VERSION, kind) + body


def encode_json(kind: int, obj: Any) -> bytes:
    """One frame whose body is *obj* as JSON."""
    return encode(kind, json.dumps(obj, separators=(',', ':')).encode())


def encode_ping(kind: int, token: int) -> bytes:
    """A PING, PONG or FENCE frame carrying *token*."""
    return encode(kind, _TOKEN.pack(token))


_MESSAGE_FRAME = struct.Struct('!IBBBddHH')      # HEADER and MESSAGE_HEADER in one
_pack_message_frame = _MESSAGE_FRAME.pack
_MESSAGE_FIXED = MESSAGE_HEADER.size


def encode_message(topic: str | bytes, message_id: str | bytes, timestamp: float,
                   deadline: float | None, droppable: bool, payload: bytes) -> bytes:
    """A MESSAGE frame (topic and id as ``str``, or already UTF-8 encoded)."""
    topic_bytes = topic.encode() if type(topic) is str else topic
    id_bytes = message_id.encode() if type(message_id) is str else message_id
    topic_length = len(topic_bytes)
    if topic_length > _MAX_TOPIC or len(id_bytes) > _MAX_ID:
        raise ValueError(f'topic ({topic_length} bytes) and id ({len(id_bytes)} bytes) must '
                         f'each be at most {_MAX_TOPIC} bytes in UTF-8')
    if deadline is None:
        flags, deadline = (_FLAG_DROPPABLE if droppable else 0), 0.0
    else:
        flags = (_FLAG_DROPPABLE | _FLAG_DEADLINE) if droppable else _FLAG_DEADLINE
    return _pack_message_frame(
        _MESSAGE_FIXED + topic_length + len(id_bytes) + len(payload), VERSION, MESSAGE,
        flags, deadline, timestamp, topic_length, len(id_bytes)) \
        + topic_bytes + id_bytes + payload


def decode_message(frame: bytes, body_start: int = HEADER.size, end: int | None = None
                   ) -> tuple[str, str, float, float | None, bool, int]:
    """Decode the MESSAGE frame in ``frame[body_start - HEADER.size:end]``: (topic, id,
    timestamp, deadline, droppable, payload offset); the payload is ``frame[offset:end]``."""
    if end is None:
        end = len(frame)
    if end - body_start < _MESSAGE_FIXED:
        raise ProtocolError(f'MESSAGE frame of {end - body_start} bytes is shorter than its '
                            f'{_MESSAGE_FIXED}-byte header')
    flags, deadline, timestamp, topic_length, id_length = \
        MESSAGE_HEADER.unpack_from(frame, body_start)
    start = body_start + _MESSAGE_FIXED
    payload_at = start + topic_length + id_length
    if payload_at > end:
        raise ProtocolError(f'MESSAGE frame declares {topic_length}+{id_length} bytes of topic '
                            f'and id but has {end - start}')
    try:
        topic = frame[start:start + topic_length].decode()
        message_id = frame[start + topic_length:payload_at].decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError(f'MESSAGE frame has a topic or id that is not UTF-8: {exc}') from exc
    if not topic:
        raise ProtocolError('MESSAGE frame has an empty topic')
    if flags & ~(_FLAG_DROPPABLE | _FLAG_DEADLINE):
        raise ProtocolError(f'MESSAGE frame has unknown flags {flags:#x}')
    if not (_EARLIEST <= deadline <= _LATEST and _EARLIEST <= timestamp <= _LATEST):
        raise ProtocolError(f'MESSAGE frame has a deadline ({deadline!r}) or timestamp '
                            f'({timestamp!r}) that is NaN or not within years 1 to 9999')
    return (topic, message_id, timestamp, deadline if flags & _FLAG_DEADLINE else None,
            bool(flags & _FLAG_DROPPABLE), payload_at)


def decode_json(body: bytes | memoryview) -> Any:
    """The JSON object in a frame body."""
    try:
        return json.loads(bytes(body))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f'frame body is not valid JSON: {exc}') from exc
    except RecursionError:
        raise ProtocolError('frame body is JSON nested too deeply') from None


def decode_topic(body: bytes | memoryview) -> str:
    """The topic in a SUB or UNSUB body."""
    try:
        topic = bytes(body).decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError(f'SUB/UNSUB topic is not UTF-8: {exc}') from exc
    if not topic:
        raise ProtocolError('SUB/UNSUB frame has an empty topic')
    return topic


def decode_ping(body: bytes | memoryview) -> int:
    """The token of a PING, PONG or FENCE body."""
    if len(body) != _TOKEN.size:
        raise ProtocolError(f'PING/PONG body is {len(body)} bytes, expected {_TOKEN.size}')
    return _TOKEN.unpack(body)[0]


def iter_frames(batch: bytes, limit: int) -> Iterator[tuple[int, int, int]]:
    """Split a batch into frames: yields (kind, start, end) with ``batch[start:end]``
    the whole frame and the body at ``start + HEADER.size``.

    Raises :class:`ProtocolError` for a truncated frame, a wrong version, an unknown
    kind, or a frame longer than *limit* bytes, before looking at its body.
    """
    offset, size = 0, len(batch)
    unpack = HEADER.unpack_from
    header = HEADER.size
    while offset < size:
        if size - offset < header:
            raise ProtocolError(f'truncated frame header: {size - offset} bytes left')
        length, version, kind = unpack(batch, offset)
        if version != VERSION:
            raise ProtocolError(f'frame has wire version {version}, expected {VERSION}; '
                                f'are client and broker the same mpchannels version?')
        if kind not in KINDS:
            raise ProtocolError(f'frame has unknown kind {kind}')
        end = offset + header + length
        if length > limit:
            raise ProtocolError(f'frame of {length} bytes is over the limit of {limit}')
        if end > size:
            raise ProtocolError(f'truncated frame: {length} bytes declared, '
                                f'{size - offset - header} present')
        yield kind, offset, end
        offset = end


def decode_batch(batch: bytes, limit: int) -> list[tuple]:
    """Split and decode a batch in one pass (the hot path of both readers).

    Returns one tuple per frame: for MESSAGE ``(MESSAGE, start, end, topic, message_id,
    timestamp, deadline, droppable, payload_at)``; for the other kinds ``(kind, start,
    end)`` with the body at ``start + HEADER.size``. Raises :class:`ProtocolError` as
    :func:`iter_frames` and :func:`decode_message` do.
    """
    frames: list[tuple] = []
    append = frames.append
    offset, size = 0, len(batch)
    unpack = HEADER.unpack_from
    unpack_message = MESSAGE_HEADER.unpack_from
    unpack_whole = _MESSAGE_FRAME.unpack_from
    whole = _MESSAGE_FRAME.size
    header = HEADER.size
    fixed = _MESSAGE_FIXED
    known = _FLAG_DROPPABLE | _FLAG_DEADLINE
    earliest, latest = _EARLIEST, _LATEST
    while offset < size:
        if size - offset < header:
            raise ProtocolError(f'truncated frame header: {size - offset} bytes left')
        if size - offset >= whole:      # most frames are messages: one unpack for both
            length, version, kind, flags, deadline, timestamp, topic_length, id_length = \
                unpack_whole(batch, offset)
        else:
            length, version, kind = unpack(batch, offset)
        end = offset + header + length
        if version != VERSION or kind not in KINDS or length > limit or end > size:
            list(iter_frames(batch[offset:], limit))    # raises the precise error
            raise ProtocolError('invalid frame')        # pragma: no cover
        if kind == MESSAGE:
            start = offset + header + fixed
            if length < fixed:
                raise ProtocolError(f'MESSAGE frame of {length} bytes is shorter than its '
                                    f'{fixed}-byte header')
            if size - offset < whole:   # pragma: no cover (length >= fixed implies it)
                flags, deadline, timestamp, topic_length, id_length = \
                    unpack_message(batch, offset + header)
            payload_at = start + topic_length + id_length
            if payload_at > end or not topic_length or flags & ~known \
                    or not earliest <= deadline <= latest \
                    or not earliest <= timestamp <= latest:
                decode_message(batch, offset + header, end)   # raises the precise error
            try:
                topic = batch[start:start + topic_length].decode()
                message_id = batch[start + topic_length:payload_at].decode()
            except UnicodeDecodeError as exc:
                raise ProtocolError(f'MESSAGE frame has a topic or id that is not UTF-8: '
                                    f'{exc}') from exc
            append((MESSAGE, offset, end, topic, message_id, timestamp,
                    deadline if flags & _FLAG_DEADLINE else None, bool(flags & 1), payload_at))
        else:
            append((kind, offset, end))
        offset = end
    return frames


_CONNECTION_LENGTH = struct.Struct('!i')


def connection_bytes(batch: bytes) -> bytes:
    """*batch* as ``multiprocessing.connection.Connection.send_bytes()`` puts it on the
    wire (a signed 32-bit length, then the bytes), for writing to the socket directly."""
    return _CONNECTION_LENGTH.pack(len(batch)) + batch


_READ_SIZE = 64 * 1024
_LARGE = 1024 * 1024


class BatchReader:
    """Reads the batches that :func:`connection_bytes` (or ``send_bytes()``) wrote to
    the socket *fd*, several at a time: one ``read()`` takes whatever has arrived, so a
    reader that fell behind catches up with one system call (and one wake-up) for many
    batches instead of two for each, as ``Connection.recv_bytes()`` makes.

    Memory follows the bytes that have arrived, never the length a batch announces: a
    large batch's buffer grows (doubling) as it fills. With *stall_timeout*, a batch
    begun and not continued for that many seconds raises :class:`ProtocolError`, so
    that a peer cannot hold a reader mid-batch for ever (between batches it may be
    silent as long as it likes). Nothing is read ahead of what the peer sent; the caller
    owns *fd*.
    """

    __slots__ = ('fd', 'max_batch', 'stall_timeout', '_rest', '_view', '_poll')

    def __init__(self, fd: int, max_batch: int, stall_timeout: float | None = None) -> None:
        self.fd = fd
        self.max_batch = max_batch
        self.stall_timeout = stall_timeout
        self._rest = b''
        # read into one buffer, then copy out what came: a fresh 64 KiB bytes object
        # per read, shrunk to size, fragments the heap of a process with many readers
        self._view = memoryview(bytearray(_READ_SIZE))
        self._poll: Any = None

    def read(self, size: int = _READ_SIZE) -> list[bytes]:
        """The next whole batches (at least one); blocks until one has arrived. Each
        system call reads at most *size* bytes (at most 64 KiB).

        Raises ``EOFError`` at the end of the stream and :class:`ProtocolError` for a
        batch length that is negative or over *max_batch*, or for a batch that stalled
        (see *stall_timeout*).
        """
        readv, fd, view = os.readv, self.fd, self._view
        buffers = [view if size >= _READ_SIZE else view[:size]]
        data = self._rest
        stall = self.stall_timeout
        while True:
            if len(data) >= 4:
                length = _CONNECTION_LENGTH.unpack_from(data)[0]
                if length < 0 or length > self.max_batch:
                    raise ProtocolError(f'batch of {length} bytes announced; the limit is '
                                        f'{self.max_batch}')
                if length >= _LARGE and len(data) - 4 < length:
                    data = self._read_large(data, length)
                if len(data) - 4 >= length:
                    break
            if data and stall is not None:      # inside a batch: it must go on
                self._wait_for_more(len(data))
            count = readv(fd, buffers)
            if not count:
                self._rest = b''
                raise EOFError('the connection was closed')
            data = data + view[:count] if data else view[:count].tobytes()
        batches: list[bytes] = []
        offset, size = 0, len(data)
        unpack = _CONNECTION_LENGTH.unpack_from
        while size - offset >= 4:
            length = unpack(data, offset)[0]
            if length < 0 or length > self.max_batch:
                raise ProtocolError(f'batch of {length} bytes announced; the limit is '
                                    f'{self.max_batch}')
            end = offset + 4 + length
            if end > size:
                break
            batches.append(data[offset + 4:end])
            offset = end
        self._rest = data[offset:]
        return batches

    def _wait_for_more(self, have: int) -> None:
        """Wait until more bytes of the batch begun can be read (*have* arrived so far)."""
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self.fd, select.POLLIN)
        timeout = self.stall_timeout
        assert timeout is not None
        if not self._poll.poll(timeout * 1000):
            raise ProtocolError(f'a batch was begun ({have} bytes arrived) and nothing more '
                                f'came for {timeout:.3g}s (PARTIAL_FRAME_TIMEOUT)')

    def _read_large(self, data: bytes, length: int) -> bytes:
        """Read the rest of a large batch straight into its buffer (appending chunks
        to bytes would copy it over and over). The buffer starts at twice what has
        arrived and doubles as it fills, up to the batch's length: the length alone,
        a few bytes from anyone, reserves nothing."""
        total = 4 + length
        buffer = bytearray(min(total, max(2 * len(data), _READ_SIZE)))
        buffer[:len(data)] = data
        filled = len(data)
        readv, fd = os.readv, self.fd
        stall = self.stall_timeout
        while filled < total:
            if filled == len(buffer):
                grown = bytearray(min(total, 2 * len(buffer)))
                grown[:filled] = buffer
                buffer = grown
            if stall is not None:
                self._wait_for_more(filled)
            with memoryview(buffer) as view:
                count = readv(fd, [view[filled:]])
            if not count:
                self._rest = b''
                raise EOFError('the connection was closed')
            filled += count
        return bytes(buffer)


def group_frames(frames: list[bytes]) -> Iterator[list[bytes]]:
    """Group *frames* into batches of about ``BATCH_BYTES``; a larger frame goes alone.

    Each group is written as one ``b''.join(group)``.
    """
    group: list[bytes] = []
    size = 0
    for frame in frames:
        if size and size + len(frame) > BATCH_BYTES:
            yield group
            group, size = [], 0
        group.append(frame)
        size += len(frame)
    if group:
        yield group
