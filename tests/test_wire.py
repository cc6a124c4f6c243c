"""The wire format: round trips, and garbage that must only ever raise ProtocolError."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given, settings, strategies as st

from channels import ProtocolError, wire

LIMIT = 4096


def test_a_message_frame_round_trips():
    frame = wire.encode_message('chat.rooms.lona', 'p-1', 12.5, 99.0, True, b'payload')
    (decoded,) = wire.decode_batch(frame, LIMIT)
    kind, start, end, topic, message_id, timestamp, deadline, droppable, at = decoded
    assert (kind, start, end) == (wire.MESSAGE, 0, len(frame))
    assert (topic, message_id, timestamp, deadline, droppable) == \
        ('chat.rooms.lona', 'p-1', 12.5, 99.0, True)
    assert frame[at:end] == b'payload'


def test_frames_round_trip_through_a_stream_of_batches():
    frames = [wire.encode_message(f'topic.{n}', f'id-{n}', float(n), None, False,
                                  bytes([n]) * n) for n in range(50)]
    frames.insert(10, wire.encode(wire.SUB, b'chat.*'))
    frames.insert(20, wire.encode_ping(wire.PING, 7))
    stream = io.BytesIO()
    for group in wire.group_frames(frames):
        stream.write(wire.connection_bytes(b''.join(group)))
    stream.seek(0)
    decoded = []
    while header := stream.read(4):
        batch = stream.read(struct.unpack('!i', header)[0])
        decoded.extend((f[0], batch[f[1]:f[2]]) for f in wire.decode_batch(batch, LIMIT))
    assert [frame for _, frame in decoded] == frames
    assert [kind for kind, _ in decoded].count(wire.MESSAGE) == 50


def test_a_frame_over_the_limit_is_refused_before_its_body_is_read():
    header = wire.HEADER.pack(LIMIT + 1, wire.VERSION, wire.MESSAGE)
    with pytest.raises(ProtocolError, match='over the limit'):
        wire.decode_batch(header + b'x' * (LIMIT + 1), LIMIT)


@pytest.mark.parametrize('batch, message', [
    (b'\x00\x00', 'truncated frame header'),
    (wire.HEADER.pack(10, wire.VERSION, wire.SUB) + b'abc', 'truncated frame'),
    (wire.HEADER.pack(0, 99, wire.SUB), 'wire version 99'),
    (wire.HEADER.pack(0, wire.VERSION, 200), 'unknown kind 200'),
    (wire.HEADER.pack(3, wire.VERSION, wire.MESSAGE) + b'abc', 'shorter than its'),
])
def test_malformed_batches_raise_a_protocol_error_that_says_what_is_wrong(batch, message):
    with pytest.raises(ProtocolError, match=message):
        wire.decode_batch(batch, LIMIT)


@pytest.mark.parametrize('timestamp, deadline', [
    (1.0, float('inf')), (1.0, -float('inf')), (1.0, 1e300), (1.0, float('nan')),
    (float('inf'), None), (-1e20, None), (float('nan'), 5.0),
])
def test_a_time_no_datetime_can_hold_is_a_protocol_error(timestamp, deadline):
    frame = wire.encode_message('t', 'p-1', timestamp, deadline, False, b'')
    with pytest.raises(ProtocolError, match='not within years 1 to 9999'):
        wire.decode_batch(frame, LIMIT)


def test_the_earliest_and_latest_expiry_a_sender_can_give_pass_the_wire():
    from datetime import datetime
    for expiry in (datetime(1, 1, 2), datetime(9999, 12, 30, 23, 59, 59)):
        frame = wire.encode_message('t', 'p-1', 1.0, expiry.timestamp(), False, b'')
        assert wire.decode_batch(frame, LIMIT)[0][6] == expiry.timestamp()


def _valid_batch(draw_frames: list[bytes]) -> bytes:
    return b''.join(draw_frames)


_frames = st.lists(st.one_of(
    st.builds(lambda t, i, p, d, drop: wire.encode_message(t, i, 1.0, d, drop, p),
              st.text(min_size=1, max_size=20), st.text(max_size=10),
              st.binary(max_size=50), st.one_of(st.none(), st.floats(0, 1e9)),
              st.booleans()),
    st.builds(lambda t: wire.encode(wire.SUB, t.encode()), st.text(min_size=1, max_size=20)),
    st.builds(lambda n: wire.encode_ping(wire.PING, n), st.integers(0, 2**64 - 1)),
), min_size=1, max_size=5)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_only_ever_raise_protocol_error(data):
    try:
        wire.decode_batch(data, LIMIT)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(frames=_frames, position=st.integers(min_value=0), byte=st.integers(0, 255),
       cut=st.integers(min_value=0))
def test_mutated_and_truncated_valid_batches_only_ever_raise_protocol_error(frames, position,
                                                                          byte, cut):
    batch = bytearray(b''.join(frames))
    batch[position % len(batch)] = byte
    batch = bytes(batch[:len(batch) - cut % len(batch)])
    try:
        decoded = wire.decode_batch(batch, LIMIT)
    except ProtocolError:
        return
    for frame in decoded:                  # whatever decodes lies inside the batch
        assert 0 <= frame[1] < frame[2] <= len(batch)
        assert frame[2] - frame[1] - wire.HEADER.size <= LIMIT


def _pair():
    import socket
    return socket.socketpair()


def test_batch_reader_takes_every_batch_that_has_arrived_in_one_read():
    from multiprocessing.connection import Connection
    left, right = _pair()
    with left, right:
        sender = Connection(left.detach())
        for batch in (b'', b'one', b'x' * 1000):
            sender.send_bytes(batch)                    # as the senders write them
        reader = wire.BatchReader(right.fileno(), 1 << 20)
        assert reader.read() == [b'', b'one', b'x' * 1000]
        batches = [bytes(range(256)) * 300, b'x' * 70_000]     # more than one read takes
        for batch in batches:
            sender.send_bytes(batch)
        got = []
        while len(got) < len(batches):
            got.extend(reader.read())
        assert got == batches
        sender.send_bytes(b'tail')
        assert reader.read() == [b'tail']
        sender.close()
        with pytest.raises(EOFError):
            reader.read()


def test_batch_reader_waits_for_the_rest_of_a_batch_split_across_reads():
    import threading
    left, right = _pair()
    with left, right:
        data = wire.connection_bytes(b'a' * 5000) + wire.connection_bytes(b'b' * 3)
        left.sendall(data[:2])                    # not even the whole length yet
        reader = wire.BatchReader(right.fileno(), 1 << 20)
        writer = threading.Thread(target=lambda: [left.sendall(data[i:i + 777])
                                                  for i in range(2, len(data), 777)])
        writer.start()
        got = []
        while len(got) < 2:
            got.extend(reader.read())
        writer.join()
        assert got == [b'a' * 5000, b'b' * 3]


def test_batch_reader_reads_a_large_batch_whole():
    import threading
    left, right = _pair()
    with left, right:
        big = bytes(range(256)) * (3 * 4096)     # 3 MiB, over the large-batch threshold
        writer = threading.Thread(target=left.sendall,
                                  args=(wire.connection_bytes(big) + wire.connection_bytes(b'z'),))
        writer.start()
        reader = wire.BatchReader(right.fileno(), 4 << 20)
        got = []
        while len(got) < 2:
            got.extend(reader.read())
        writer.join()
        assert got[0] == big and got[1] == b'z'


@pytest.mark.parametrize('length', [-1, 1001])
def test_batch_reader_refuses_a_length_out_of_bounds_before_reading_it(length):
    left, right = _pair()
    with left, right:
        left.sendall(struct.pack('!i', length))
        with pytest.raises(ProtocolError, match=f'batch of {length} bytes'):
            wire.BatchReader(right.fileno(), 1000).read()


def test_batch_reader_raises_eof_error_when_the_stream_ends_inside_a_batch():
    left, right = _pair()
    with left, right:
        left.sendall(wire.connection_bytes(b'abcdef')[:-2])
        left.shutdown(2)
        with pytest.raises(EOFError):
            wire.BatchReader(right.fileno(), 1000).read()
