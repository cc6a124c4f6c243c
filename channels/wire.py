"""The wire format: the one place where frames are encoded and decoded.

::

    bytes on a socket -> batches (multiprocessing.connection's length-prefixed messages)
                      -> frames (this module) -> messages and control (client, broker)

A batch is one ``Connection.send_bytes()``: either up to ``BATCH_BYTES`` of whole
frames, or a single larger frame. Every frame is::

    !IBB   body length (u32, not counting these 6 bytes), version (u8), kind (u8)
    body   kind-specific, below

=========  ========================================================================
kind       body
=========  ========================================================================
HELLO      JSON: ``{"pid": int, "role": "app" | "stats", "name": str}``
SUB        the topic, UTF-8 (a process's first channel on that topic)
UNSUB      the topic, UTF-8 (its last channel on that topic left)
MESSAGE    ``!BddHH`` flags (bit 0 droppable, bit 1 has deadline), deadline,
           timestamp, topic length, id length; then topic, id (UTF-8), then the
           payload (pickled data) to the end. The broker forwards it unchanged.
PING       ``!Q`` token; the broker answers PONG with the token after everything the
           process sent before it was routed (a barrier, used at shutdown)
PONG       ``!Q`` token
STATS      empty (request) or JSON (reply)
NOTICE     JSON: something the broker tells a process (``{"error": ...}``)
=========  ========================================================================

Compatibility: ``VERSION`` changes whenever a layout changes; a peer that sees another
version drops the connection with a :class:`~channels.errors.ProtocolError`. The broker
never unpickles: it reads MESSAGE headers and passes the payload through as bytes.
Every length is checked against the bytes present and the size limit before anything
is decoded or allocated.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

from .errors import ProtocolError

__all__ = ['VERSION', 'HELLO', 'SUB', 'UNSUB', 'MESSAGE', 'PING', 'PONG', 'STATS', 'NOTICE',
           'HEADER', 'MESSAGE_HEADER', 'BATCH_BYTES', 'encode', 'encode_json',
           'encode_message', 'decode_message', 'decode_json', 'decode_ping', 'iter_frames',
           'frame_overhead', 'group_frames', 'encode_ping', 'decode_topic']

VERSION = 1
HELLO, SUB, UNSUB, MESSAGE, PING, PONG, STATS, NOTICE = range(1, 9)
KINDS = frozenset(range(1, 9))
KIND_NAMES = {HELLO: 'HELLO', SUB: 'SUB', UNSUB: 'UNSUB', MESSAGE: 'MESSAGE', PING: 'PING',
              PONG: 'PONG', STATS: 'STATS', NOTICE: 'NOTICE'}

HEADER = struct.Struct('!IBB')
MESSAGE_HEADER = struct.Struct('!BddHH')
_TOKEN = struct.Struct('!Q')
_FLAG_DROPPABLE = 1
_FLAG_DEADLINE = 2

BATCH_BYTES = 256 * 1024
"""Frames are gathered into batches of about this size per write."""

_MAX_TOPIC = 0xFFFF
_MAX_ID = 0xFFFF


def frame_overhead(topic: str, message_id: str) -> int:
    """Bytes a MESSAGE frame adds to its payload (for the size check at ``send()``)."""
    return HEADER.size + MESSAGE_HEADER.size + len(topic.encode()) + len(message_id.encode())


def encode(kind: int, body: bytes = b'') -> bytes:
    """One frame of *kind* around *body*."""
    return HEADER.pack(len(body), VERSION, kind) + body


def encode_json(kind: int, obj: Any) -> bytes:
    """One frame whose body is *obj* as JSON."""
    return encode(kind, json.dumps(obj, separators=(',', ':')).encode())


def encode_ping(kind: int, token: int) -> bytes:
    """A PING or PONG frame carrying *token*."""
    return encode(kind, _TOKEN.pack(token))


_pack_header = HEADER.pack
_pack_message = MESSAGE_HEADER.pack
_MESSAGE_FIXED = MESSAGE_HEADER.size


def encode_message(topic: str, message_id: str, timestamp: float, deadline: float | None,
                   droppable: bool, payload: bytes) -> bytes:
    """A MESSAGE frame."""
    topic_bytes = topic.encode()
    id_bytes = message_id.encode()
    if len(topic_bytes) > _MAX_TOPIC:
        raise ValueError(f'topic is {len(topic_bytes)} bytes long in UTF-8; the limit is '
                         f'{_MAX_TOPIC}')
    flags = _FLAG_DROPPABLE if droppable else 0
    if deadline is not None:
        flags |= _FLAG_DEADLINE
    else:
        deadline = 0.0
    size = _MESSAGE_FIXED + len(topic_bytes) + len(id_bytes) + len(payload)
    return b''.join((_pack_header(size, VERSION, MESSAGE),
                     _pack_message(flags, deadline, timestamp, len(topic_bytes), len(id_bytes)),
                     topic_bytes, id_bytes, payload))


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
    if deadline != deadline or timestamp != timestamp:     # NaN
        raise ProtocolError('MESSAGE frame has a NaN deadline or timestamp')
    return (topic, message_id, timestamp, deadline if flags & _FLAG_DEADLINE else None,
            bool(flags & _FLAG_DROPPABLE), payload_at)


def decode_json(body: bytes | memoryview) -> Any:
    """The JSON object in a frame body."""
    try:
        return json.loads(bytes(body))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f'frame body is not valid JSON: {exc}') from exc


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
    """The token of a PING or PONG body."""
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
