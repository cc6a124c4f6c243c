"""Connections at the broker's door: handshakes, stalls, stats connections, stopping.

Raw sockets against a real broker started by its script; the broker's thread count is
read with psutil.
"""

from __future__ import annotations

import logging
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import psutil
import pytest
from brokers import BROKER_SCRIPT, BrokerProcess
from support import Recorder, app_hello, wait_until

import channels
from channels import BrokerUnavailableError, Channel, wire
from channels.cli import fetch_stats
from channels.connection import connect, parse_address


def _env(**settings: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith('CHANNELS_')}
    env.update({f'CHANNELS_{name}': value for name, value in settings.items()})
    return env


def _silent(address: str) -> socket.socket:
    """A connection that never says anything (connect() waits while the backlog is full)."""
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the other end closes *sock* within *timeout* (what it sent is skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([sock], [], [], max(deadline - time.monotonic(), 0))[0]:
            try:
                if not sock.recv(65536):
                    return True
            except ConnectionResetError:
                return True
    return False


def _hello(pid: int, role: str = 'app') -> bytes:
    if role == 'app':
        return app_hello(pid)
    return wire.encode_json(wire.HELLO, {'pid': pid, 'role': role})


def _stats_connection(address: str):
    """A stats connection that got one answer and stays open, idle."""
    connection = connect(parse_address(address), None)
    connection.send_bytes(_hello(1, 'stats'))
    connection.send_bytes(wire.encode(wire.STATS))
    assert connection.poll(10)
    connection.recv_bytes()
    return connection


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def _threads(broker: BrokerProcess) -> int:
    return psutil.Process(broker.process.pid).num_threads()


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / 'authkey'
    path.write_bytes(b'sesame\n')
    return path


@pytest.fixture
def silent_port():
    """A TCP port that accepts connections (in its backlog) and never speaks."""
    server = socket.create_server(('127.0.0.1', 0), backlog=16)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


# B16: stalled handshakes ------------------------------------------------------------------

def test_600_silent_connections_keep_no_honest_process_out_and_cost_no_threads(
        broker_address):
    _raise_fd_limit(4096)                       # the broker inherits the limit
    broker = BrokerProcess(broker_address).start()
    silent: list[socket.socket] = []
    try:
        for _ in range(600):
            silent.append(_silent(broker_address))
        assert _threads(broker) < 50
        began = time.monotonic()
        channels.configure(BROKER_ADDRESS=broker_address)
        received = Recorder()
        Channel('honest', received)
        Channel('honest').send({'n': 1})
        received.wait_for(1, timeout=2)
        assert time.monotonic() - began < 2
        assert received.data == [{'n': 1}]
        assert _threads(broker) < 50
    finally:
        channels.shutdown(10)
        for sock in silent:
            sock.close()
        broker.stop()


def test_a_silent_connection_is_dropped_after_the_handshake_timeout(broker_address):
    broker = BrokerProcess(broker_address, env=_env(HANDSHAKE_TIMEOUT='0.5')).start()
    try:
        with _silent(broker_address) as sock:
            assert _closed_by_peer(sock, 4)
        wait_until(lambda: 'did not finish its handshake within 0.5s' in broker.log,
                   what='the timeout in the broker log')
    finally:
        broker.stop()


def test_past_max_handshakes_the_oldest_pending_connection_is_dropped(broker_address):
    broker = BrokerProcess(broker_address, env=_env(MAX_HANDSHAKES='3')).start()
    socks = []
    try:
        for _ in range(3):
            socks.append(_silent(broker_address))
            socks[-1].recv(4)        # its greeting has begun: it is in the gate, in order
        newest = _silent(broker_address)
        socks.append(newest)
        newest.recv(4)
        assert _closed_by_peer(socks[0], 4)
        assert not _closed_by_peer(socks[1], 0.2)
        wait_until(lambda: 'MAX_HANDSHAKES' in broker.log, what='the eviction in the log')
    finally:
        for sock in socks:
            sock.close()
        broker.stop()


# B15: stats connections ---------------------------------------------------------------

def test_an_idle_stats_connection_is_closed_after_the_handshake_timeout(broker_address):
    broker = BrokerProcess(broker_address, env=_env(HANDSHAKE_TIMEOUT='0.5')).start()
    try:
        connection = _stats_connection(broker_address)
        try:
            assert connection.poll(4)
            with pytest.raises(EOFError):
                connection.recv_bytes()
        finally:
            connection.close()
    finally:
        broker.stop()


def test_stats_connections_hold_no_thread_and_count_against_max_handshakes(broker_address):
    broker = BrokerProcess(broker_address, env=_env(MAX_HANDSHAKES='4')).start()
    connections = []
    try:
        threads = _threads(broker)
        for _ in range(6):
            connections.append(_stats_connection(broker_address))
        assert _threads(broker) <= threads
        for connection in connections[:2]:          # the oldest made room for the newest
            assert connection.poll(4)
            with pytest.raises(EOFError):
                connection.recv_bytes()
        connection = connections[-1]
        connection.send_bytes(wire.encode(wire.STATS))
        assert connection.poll(4)
        assert connection.recv_bytes()[5] == wire.STATS
    finally:
        for connection in connections:
            connection.close()
        broker.stop()


# B11: batch buffers and stalls after the handshake -------------------------------------

def test_a_batch_reader_allocates_as_bytes_arrive_not_as_a_header_claims():
    import tracemalloc
    left, right = socket.socketpair()
    with left, right:
        left.sendall(struct.pack('!i', 64 * 1024 * 1024) + b'x' * 10)
        reader = wire.BatchReader(right.fileno(), 65 * 1024 * 1024, stall_timeout=0.2)
        tracemalloc.start()
        try:
            with pytest.raises(channels.ProtocolError, match='nothing more came'):
                reader.read()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 1024 * 1024


def test_batch_headers_claiming_64_mib_reserve_no_memory_at_the_broker(broker):
    rss = psutil.Process(broker.process.pid).memory_info().rss
    connections = []
    try:
        for n in range(4):
            connection = connect(parse_address(broker.address), None)
            connections.append(connection)
            connection.send_bytes(_hello(5000 + n) + wire.encode(wire.SUB, f't{n}'.encode()))
            # in one write: a whole batch, then 4 bytes announcing 64 MiB and a few more
            os.write(connection.fileno(), struct.pack('!i', 64 * 1024 * 1024) + b'x' * 10)
        for n in range(4):          # the reader has read past the SUB, into the big batch
            broker.wait_subscribed(5000 + n, [f't{n}'])
        peak = rss
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            peak = max(peak, psutil.Process(broker.process.pid).memory_info().rss)
            time.sleep(0.05)
        assert peak - rss < 48 * 1024 * 1024
    finally:
        for connection in connections:
            connection.close()


def test_a_connection_that_stalls_mid_frame_is_dropped_after_partial_frame_timeout(
        broker_address):
    broker = BrokerProcess(broker_address, env=_env(PARTIAL_FRAME_TIMEOUT='0.5')).start()
    try:
        connection = connect(parse_address(broker_address), None)
        try:
            connection.send_bytes(_hello(4711))
            batch = wire.connection_bytes(wire.encode(wire.SUB, b'chat'))
            os.write(connection.fileno(), batch[:7])
            assert connection.poll(4)
            with pytest.raises(EOFError):
                connection.recv_bytes()
        finally:
            connection.close()
        wait_until(lambda: 'dropped the connection of process 4711' in broker.log
                   and 'PARTIAL_FRAME_TIMEOUT' in broker.log, what='the drop in the log')
        wait_until(lambda: broker.process_stats(4711) is None, what='no ghost process')
    finally:
        broker.stop()


# C20, C21: the client's side of the handshake ------------------------------------------

def test_stats_against_a_port_that_never_speaks_fails_naming_the_cause(silent_port,
                                                                       key_file):
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(BROKER_SCRIPT), 'stats', '--address',
         f'127.0.0.1:{silent_port}', '--authkey-file', str(key_file)],
        capture_output=True, text=True, timeout=30, env=_env(HANDSHAKE_TIMEOUT='0.5'))
    assert result.returncode == 1
    assert 'did not finish the handshake within 0.5s' in result.stderr
    assert time.monotonic() - began < 10


def test_an_app_process_facing_a_port_that_never_speaks_logs_why_and_stops_promptly(
        silent_port, caplog):
    channels.configure(BROKER_ADDRESS=f'127.0.0.1:{silent_port}', AUTHKEY='sesame',
                       HANDSHAKE_TIMEOUT=0.3)
    with caplog.at_level(logging.WARNING, logger='channels'):
        Channel('chat').send({'n': 1})
        wait_until(lambda: any('did not finish the handshake' in r.getMessage()
                               for r in caplog.records), 5, what='the cause in the log')
        began = time.monotonic()
        channels.shutdown(timeout=1)
        assert time.monotonic() - began < 2
    assert not any('handler' in r.getMessage() for r in caplog.records)


def test_stats_without_a_key_against_a_keyed_broker_says_a_key_is_required(key_file):
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    broker = BrokerProcess(f'127.0.0.1:{port}', '--authkey-file', str(key_file)).start()
    try:
        result = subprocess.run([sys.executable, str(BROKER_SCRIPT), 'stats', '--address',
                                 broker.address], capture_output=True, text=True,
                                timeout=30, env=_env())
        assert result.returncode == 1
        assert 'requires an authkey' in result.stderr
        assert '--authkey-file' in result.stderr
        assert 'JSON' not in result.stderr
    finally:
        broker.stop()


def test_flush_with_a_wrong_authkey_says_the_broker_refused_it_not_that_it_is_down(
        key_file, caplog):
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    broker = BrokerProcess(f'127.0.0.1:{port}', '--authkey-file', str(key_file)).start()
    try:
        channels.configure(BROKER_ADDRESS=broker.address, AUTHKEY=b'wrong')
        Channel('chat', Recorder())
        with caplog.at_level(logging.WARNING, logger='channels'):
            assert channels.flush(1) is False
        said = [r.getMessage() for r in caplog.records if 'channels.flush()' in r.getMessage()]
        assert said and "refused this process's authkey" in said[-1], caplog.text
        assert 'is it running' not in said[-1]
    finally:
        channels.shutdown(2)
        broker.stop()


@pytest.mark.parametrize('greeting, authkey, error', [
    (b'mpchannels-1 open', b'sesame', 'does not use an authkey'),
    (b'HTTP/1.1 400 Bad', None, 'not an mpchannels broker'),
    (b'', None, 'not an mpchannels broker'),
], ids=['keyed-process-open-broker', 'another-program', 'garbage-length'])
def test_a_process_says_why_the_program_on_the_port_is_not_its_broker(greeting, authkey,
                                                                      error):
    server = socket.create_server(('127.0.0.1', 0))

    def speak() -> None:
        sock, _ = server.accept()
        with sock:
            sock.sendall(struct.pack('!i', len(greeting)) + greeting if greeting
                         else b'\xff' * 8)
            try:
                sock.recv(100)
            except OSError:
                pass                    # the process hung up: it had heard enough

    speaker = threading.Thread(target=speak, name='fake-broker')
    speaker.start()
    try:
        with pytest.raises(BrokerUnavailableError, match=error):
            connect(server.getsockname()[:2], authkey, 5).close()
    finally:
        speaker.join(10)
        server.close()


# C22, C23 --------------------------------------------------------------------------------

def test_a_refused_second_broker_makes_the_running_one_log_no_warning(broker):
    for _ in range(2):
        result = subprocess.run([sys.executable, str(BROKER_SCRIPT), '--address',
                                 broker.address], capture_output=True, text=True, timeout=30)
        assert result.returncode == 1
    assert fetch_stats(broker.address)['processes'] == []   # served after the probes
    assert 'WARNING' not in broker.log


def test_an_idle_broker_exits_within_half_a_second_of_sigterm(broker):
    assert fetch_stats(broker.address)['processes'] == []
    began = time.monotonic()
    broker.process.send_signal(signal.SIGTERM)
    assert broker.process.wait(10) == 0
    assert time.monotonic() - began < 0.5
