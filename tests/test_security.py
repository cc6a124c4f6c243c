"""Authkeys, TCP, garbage on the socket, frames over the size limit."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys

import pytest
from brokers import BROKER_SCRIPT, BrokerProcess, app_processes
from support import Recorder, app_hello, wait_until

import channels
from channels import BrokerUnavailableError, Channel, MessageTooLargeError
from channels.cli import fetch_stats
from channels.connection import connect, parse_address


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_a_tcp_address_requires_an_authkey(monkeypatch):
    monkeypatch.delenv('CHANNELS_AUTHKEY', raising=False)
    result = subprocess.run([sys.executable, str(BROKER_SCRIPT), '--address',
                             f'127.0.0.1:{_free_port()}'], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert 'requires an authkey' in result.stderr


@pytest.fixture
def tcp_broker(tmp_path):
    key_file = tmp_path / 'authkey'
    key_file.write_bytes(b'sesame\n')
    address = f'127.0.0.1:{_free_port()}'
    broker = BrokerProcess(address, '--authkey-file', str(key_file))
    broker.stderr_path = tmp_path / 'broker.stderr'
    broker.key_file = key_file
    try:
        yield broker.start()
    finally:
        broker.stop()


def test_processes_with_the_authkey_talk_over_tcp(tcp_broker):
    settings = {'AUTHKEY_FILE': str(tcp_broker.key_file)}
    with app_processes(tcp_broker.address, 2, **settings) as (a, b):
        b.subscribe('chat')
        wait_until(lambda: any(p['pid'] == b.pid and p['subscriptions'] == ['chat'] for p in
                               fetch_stats(tcp_broker.address, authkey=b'sesame')[
                                   'processes']), what='the subscription over TCP')
        a.send_many('chat', 5)
        assert len(b.wait_received('chat', 5)) == 5


def test_a_wrong_authkey_is_refused_and_logged(tcp_broker):
    with pytest.raises(BrokerUnavailableError, match='is the authkey'):
        connect(parse_address(tcp_broker.address), b'open sesame').close()
    wait_until(lambda: 'wrong authkey' in tcp_broker.log, what='the refusal in the log')
    assert fetch_stats(tcp_broker.address, authkey=b'sesame')['processes'] == []


def test_garbage_on_the_socket_drops_that_connection_only(broker):
    with app_processes(broker.address, 2) as (a, b):
        b.subscribe('chat')
        broker.wait_subscribed(b.pid, ['chat'])
        rng = random.Random(1)
        for size in (1, 3, 6, 100, 5000):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(broker.address)
                sock.sendall(bytes(rng.randrange(256) for _ in range(size)))
        # a well-framed batch whose frame is garbage, after a valid handshake
        raw = connect(parse_address(broker.address), None)
        from channels import wire
        raw.send_bytes(app_hello(1))
        raw.send_bytes(b'\x00\x00\x00\x05\x09\x04abc')
        raw.close()
        a.send_many('chat', 20)
        assert len(b.wait_received('chat', 20)) == 20
        assert broker.process.poll() is None
        assert 'dropped the connection of process 1' in broker.log


def test_a_message_over_the_size_limit_raises_at_send(broker):
    channels.configure(BROKER_ADDRESS=broker.address, MAX_FRAME_BYTES=10_000)
    received = Recorder()
    Channel('chat', received)
    with pytest.raises(MessageTooLargeError, match='over MAX_FRAME_BYTES=10000'):
        Channel('chat').send({'blob': 'x' * 20_000})
    Channel('chat').send({'blob': 'small'})
    received.wait_for(1)
    assert received.data == [{'blob': 'small'}]


def test_a_frame_over_the_brokers_limit_drops_that_connection(broker_address):
    broker = BrokerProcess(broker_address, env=dict(os.environ,
                                                    CHANNELS_MAX_FRAME_BYTES='1000'))
    broker.start()
    try:
        raw = connect(parse_address(broker_address), None)
        from channels import wire
        raw.send_bytes(app_hello(7))
        raw.send_bytes(wire.encode_message('chat', 'x-1', 0.0, None, False, b'y' * 5000))
        wait_until(lambda: 'dropped the connection of process 7' in broker.log,
                   what='the oversized frame to be refused')
        raw.close()
    finally:
        broker.stop()


def test_a_connection_that_fails_right_after_hello_leaves_no_process_behind(broker):
    from channels import wire
    raw = connect(parse_address(broker.address), None)
    raw.send_bytes(app_hello(4242)
                   + wire.encode(wire.SUB, b'\xff\xfe'))      # a topic that is not UTF-8
    wait_until(lambda: 'dropped the connection of process 4242' in broker.log,
               what='the bad connection to be dropped')
    raw.close()
    wait_until(lambda: broker.process_stats(4242) is None, what='no ghost process')


def test_the_broker_survives_garbage_a_silent_client_and_a_wrong_key_while_others_talk(
        tcp_broker):
    import threading
    from channels import wire
    address = parse_address(tcp_broker.address)
    rng = random.Random(7)
    stop = threading.Event()
    attacks = {'frames': 0, 'connections': 0}

    def garbage() -> None:
        while not stop.is_set() and attacks['frames'] < 10_000:
            connection = connect(address, b'sesame')
            attacks['connections'] += 1
            try:
                connection.send_bytes(app_hello(99))
                frames = []
                for _ in range(50):
                    frame = wire.encode_message('chat', 'x', 0.0, None, False,
                                                rng.randbytes(rng.randrange(40)))
                    if rng.random() < 0.5:
                        frame = frame[:rng.randrange(len(frame))]          # truncated
                    else:
                        frame = rng.randbytes(rng.randrange(1, 60))        # random
                    frames.append(frame)
                attacks['frames'] += len(frames)
                connection.send_bytes(b''.join(frames))
            except OSError:
                pass
            finally:
                connection.close()

    silent = socket.create_connection(address)          # never finishes a handshake
    with pytest.raises(BrokerUnavailableError):
        connect(address, b'wrong key').close()
    attacker = threading.Thread(target=garbage, name='garbage-client')
    settings = {'AUTHKEY_FILE': str(tcp_broker.key_file)}
    try:
        with app_processes(tcp_broker.address, 2, **settings) as (sender, receiver):
            receiver.subscribe('honest')
            wait_until(lambda: any(p['pid'] == receiver.pid for p in fetch_stats(
                tcp_broker.address, authkey=b'sesame')['processes']), what='the receiver')
            attacker.start()
            sender.send_many('honest', 2000)
            received = receiver.wait_received('honest', 2000, timeout=30)
            assert [data['n'] for _, data in received] == list(range(2000))
            attacker.join(60)
    finally:
        stop.set()
        if attacker.is_alive():
            attacker.join(10)
        silent.close()
    assert attacks['frames'] >= 10_000
    assert tcp_broker.process.poll() is None
    assert fetch_stats(tcp_broker.address, authkey=b'sesame')['processes'] == []
    assert 'wrong authkey' in tcp_broker.log
