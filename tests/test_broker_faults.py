"""Connecting lazily, buffering, reconnecting, forking: app processes and the broker."""

from __future__ import annotations

import json
import logging
import threading

import pytest
from brokers import BrokerProcess, app_processes, tcp_broker_process
from support import Recorder, wait_until

import channels
from channels import Channel
from channels.runtime import Runtime


def test_a_process_started_before_the_broker_delivers_what_it_sent_once_it_is_up(
        broker_address):
    broker = BrokerProcess(broker_address)
    with app_processes(broker_address, 1) as (app,):
        app.subscribe('chat')
        app.send_many('chat', 20)
        assert app.received('chat') == []
        try:
            broker.start()
            received = app.wait_received('chat', 20)
            assert [data['n'] for _, data in received] == list(range(20))
        finally:
            broker.stop()


def test_after_a_broker_restart_processes_reconnect_and_carry_on(broker_address, caplog):
    broker = BrokerProcess(broker_address).start()
    try:
        channels.configure(BROKER_ADDRESS=broker_address)
        received = Recorder()
        Channel('chat', received)
        broker.wait_subscribed(__import__('os').getpid(), ['chat'])
        with caplog.at_level(logging.WARNING, logger='channels'):
            broker.kill()
            wait_until(lambda: 'lost the connection to the broker' in caplog.text,
                       what='a warning about the lost connection')
            broker = BrokerProcess(broker_address).start()
            broker.wait_subscribed(__import__('os').getpid(), ['chat'])
        Channel('chat').send({'n': 1})
        received.wait_for(1)
        assert received.data == [{'n': 1}]
    finally:
        broker.stop()


def test_a_forked_child_gets_its_own_connection_and_keeps_its_subscriptions(broker, tmp_path):
    with app_processes(broker.address, 2) as (parent, sender):
        parent.subscribe('chat')
        broker.wait_subscribed(parent.pid, ['chat'])
        out = tmp_path / 'child.json'
        child = parent.call('fork_recorder', 'chat', str(out), 10, 20.0)
        try:
            broker.wait_subscribed(child, ['chat'])
            sender.send_many('chat', 10)
            assert len(parent.wait_received('chat', 10)) == 10
            assert parent.call('wait_child', child) == 0
        finally:
            try:
                __import__('os').kill(child, 9)
            except ProcessLookupError:
                pass
        result = json.loads(out.read_text())
        assert result['pid'] == child
        assert [data['n'] for _, data in result['received']] == list(range(10))
        wait_until(lambda: broker.process_stats(child) is None,
                   what='the broker to forget the child')
        assert broker.process_stats(parent.pid) is not None    # the parent is untouched


def test_an_embedded_process_says_once_that_no_broker_is_configured(caplog, monkeypatch):
    monkeypatch.setattr(Runtime, 'told_embedded', False)
    with caplog.at_level(logging.INFO, logger='channels'):
        Channel('chat', Recorder())
        channels.shutdown()
        Channel('chat').send()
    lines = [r for r in caplog.records if 'no broker is configured' in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert 'channels-broker --' in lines[0].getMessage()


def test_sends_while_the_broker_is_unreachable_are_buffered_up_to_the_bound(broker_address):
    channels.configure(BROKER_ADDRESS=broker_address, MAX_BUFFER_BYTES=20_000)
    sent = 0
    with pytest.raises(channels.BufferFullError, match='MAX_BUFFER_BYTES is 20000'):
        for sent in range(10_000):
            Channel('chat').send({'text': 'x' * 100})
    assert 50 < sent < 500
    channels.shutdown(timeout=0.5)


def test_shutdown_waits_for_the_broker_to_route_what_this_process_sent(broker):
    channels.configure(BROKER_ADDRESS=broker.address)
    received = Recorder()
    Channel('chat', received)
    broker.wait_subscribed(__import__('os').getpid(), ['chat'])
    for n in range(300):
        Channel('chat').send({'n': n})
    assert channels.shutdown(timeout=20) is True
    assert [d['n'] for d in received.data] == list(range(300))


def test_a_message_sent_right_after_subscribing_during_the_first_handshake_arrives(
        broker, monkeypatch):
    # The sender thread has connected and is writing HELLO when the app subscribes and
    # sends. The SUB must reach the broker before the message: it once went after it
    # (the subscriptions were read before HELLO, the queue after), so the broker routed
    # the message to nobody and confirmed it, and it was lost without a word.
    from channels import client
    in_hello, go_on = threading.Event(), threading.Event()
    real_connect = client.connect

    class HeldAtHello:
        def __init__(self, connection):
            self._connection, self._first = connection, True

        def send_bytes(self, data):
            if self._first:
                self._first = False
                in_hello.set()
                go_on.wait(10)
            return self._connection.send_bytes(data)

        def __getattr__(self, name):
            return getattr(self._connection, name)

    monkeypatch.setattr(client, 'connect',
                        lambda *args, **kwargs: HeldAtHello(real_connect(*args, **kwargs)))
    channels.configure(BROKER_ADDRESS=broker.address)
    channels.runtime.runtime.ensure_running()
    assert in_hello.wait(10), 'the sender thread did not connect'
    received = Recorder()
    Channel('chat', received)
    Channel('chat').send({'n': 1})
    go_on.set()
    received.wait_for(1)
    assert received.data == [{'n': 1}]


def test_shutdown_leaves_no_thread_in_broker_mode(broker):
    channels.configure(BROKER_ADDRESS=broker.address)
    Channel('chat', Recorder())
    wait_until(lambda: channels.runtime.runtime.machinery.link.connected.is_set(),
               what='the connection')
    channels.shutdown()
    assert [t.name for t in threading.enumerate() if t.name.startswith('channels-')] == []


@pytest.mark.parametrize('start_method', ['fork', 'forkserver', 'spawn'])
def test_a_multiprocessing_child_that_returns_delivers_everything_it_sent(broker,
                                                                        start_method):
    import multiprocessing
    from agent import send_and_return
    channels.configure(BROKER_ADDRESS=broker.address)
    received = Recorder()
    Channel('chat', received)
    broker.wait_subscribed(__import__('os').getpid(), ['chat'])
    context = multiprocessing.get_context(start_method)
    child = context.Process(target=send_and_return,
                            args=({'BROKER_ADDRESS': broker.address}, 'chat', 5000))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    received.wait_for(5000)
    assert [d['n'] for d in received.data] == list(range(5000))
    assert channels.runtime.runtime.machinery.link.duplicates == 0


def test_thousands_of_subscriptions_are_registered_again_after_a_broker_restart(
        broker_address):
    broker = BrokerProcess(broker_address).start()
    try:
        channels.configure(BROKER_ADDRESS=broker_address)
        received = Recorder()
        topics = [f'chat.rooms.room-with-a-long-name-{n:05d}' for n in range(3000)]
        for topic in topics:
            Channel(topic, received)
        wait_until(lambda: broker.stats()['topics'] == 3000, what='3000 topics')
        broker.kill()
        broker = BrokerProcess(broker_address).start()
        wait_until(lambda: broker.stats()['topics'] == 3000, timeout=20,
                   what='3000 topics registered again')
        Channel(topics[-1]).send({'n': 1})
        received.wait_for(1)
        link = channels.runtime.runtime.machinery.link
        assert len(link.readers) == 1
    finally:
        broker.stop()


def test_a_tcp_broker_address_without_an_authkey_is_refused_at_first_use(monkeypatch):
    monkeypatch.delenv('CHANNELS_AUTHKEY', raising=False)
    channels.configure(BROKER_ADDRESS='127.0.0.1:9')
    with pytest.raises(channels.ConfigurationError, match='requires an authkey'):
        Channel('chat', Recorder())


def test_a_bad_broker_address_is_refused_by_configure():
    with pytest.raises(channels.ConfigurationError, match='BROKER_ADDRESS.*port must be'):
        channels.configure(BROKER_ADDRESS='localhost:99999')


@pytest.mark.timeout(180)
@pytest.mark.parametrize('kind', ['unix', 'tcp'])
def test_nothing_is_lost_or_repeated_when_the_broker_is_killed_and_restarted_twice(
        broker_address, tmp_path, kind):
    first = BrokerProcess(broker_address) if kind == 'unix' else tcp_broker_process(tmp_path)
    address, settings = first.address, {}
    if kind == 'tcp':
        settings['AUTHKEY_FILE'] = str(first.key_file)

    def restarted() -> BrokerProcess:
        again = BrokerProcess(address, *first.extra, env=first.env)
        again.stderr_path = first.stderr_path
        again.authkey = first.authkey
        return again.start()
    broker = first.start()
    try:
        with app_processes(address, 4, **settings) as apps:
            for app in apps:
                app.subscribe('chat.*')
            for app in apps:
                broker.wait_subscribed(app.pid, ['chat.*'])
            senders, watcher = apps[:2], apps[3]
            for sender in senders:       # 2 x 10,000 messages at 2,500/s each: ~4 s
                sender.conn.send(('send_paced', ('chat.room', 10_000, 2_500, 0, {})))
            for threshold in (3_000, 11_000):
                wait_until(lambda: len(watcher.received('chat.*')) > threshold, timeout=60,
                           what=f'{threshold} messages before killing the broker')
                broker.kill()
                broker = restarted()
            for sender in senders:
                assert sender.conn.poll(60), 'a sender did not finish'
                assert sender.conn.recv()[0] == 'ok'
            for app in apps:
                try:
                    app.wait_received('chat.*', 20_000, timeout=30)
                finally:
                    by_sender: dict[int, list[int]] = {}
                    for _, data in app.received('chat.*'):
                        by_sender.setdefault(data['pid'], []).append(data['n'])
                    for pid, numbers in by_sender.items():
                        missing = sorted(set(range(10_000)) - set(numbers))
                        print(f'{app.pid} from {pid}: {len(numbers)}, missing {missing[:3]}'
                              f'..{missing[-3:]} ({len(missing)})')
                assert by_sender == {sender.pid: list(range(10_000)) for sender in senders}
    finally:
        broker.stop()
