"""Channels across real processes through a real broker started by its script."""

from __future__ import annotations

import time

import pytest
from brokers import AppProcess, app_processes
from support import wait_until


def _by_sender(received: list) -> dict[int, list[int]]:
    order: dict[int, list[int]] = {}
    for _, data in received:
        order.setdefault(data['pid'], []).append(data['n'])
    return order


def test_a_message_reaches_every_matching_channel_in_every_process_once_and_in_order(broker):
    with app_processes(broker.address, 4) as apps:
        publishers, subscribers = apps[:2], apps[2:]
        subscribers[0].subscribe('chat.rooms.lona')
        subscribers[0].subscribe('chat.*')
        subscribers[1].subscribe('*')
        subscribers[1].subscribe('chat.rooms.other')
        for app in subscribers:
            broker.wait_subscribed(app.pid, ['chat.*'] if app is subscribers[0] else ['*'])
        for publisher in publishers:
            publisher.send_many('chat.rooms.lona', 500)
        expected = {publisher.pid: list(range(500)) for publisher in publishers}
        for app, topic in [(subscribers[0], 'chat.rooms.lona'), (subscribers[0], 'chat.*'),
                           (subscribers[1], '*')]:
            received = app.wait_received(topic, 1000)
            time.sleep(0.1)
            received = [r for r in app.received(topic) if r[0] == 'chat.rooms.lona']
            assert _by_sender(received) == expected, topic
        assert subscribers[1].received('chat.rooms.other') == []


def test_with_one_broker_thread_every_channel_sees_one_order(broker):
    with app_processes(broker.address, 4) as apps:
        for app in apps:
            app.subscribe('room.*')
        for app in apps:
            broker.wait_subscribed(app.pid, ['room.*'])
        for app in apps[:3]:
            app.call('send_many', f'room.{app.pid}', 300, 0, {}, timeout=30)
        orders = [app.wait_received('room.*', 900) for app in apps]
        assert all(order == orders[0] for order in orders)


def test_wildcards_work_on_both_sides_across_processes(broker):
    with app_processes(broker.address, 2) as (sender, receiver):
        receiver.subscribe('chat.rooms.lona')
        receiver.subscribe('chat.rooms.*')
        broker.wait_subscribed(receiver.pid, ['chat.rooms.lona', 'chat.rooms.*'])
        sender.call('send', 'chat.rooms.l?na', {'n': 1}, {})
        assert receiver.wait_received('chat.rooms.lona', 1) == [('chat.rooms.l?na', {'n': 1})]
        assert receiver.wait_received('chat.rooms.*', 1) == [('chat.rooms.l?na', {'n': 1})]


def test_local_messages_never_reach_the_broker(broker):
    with app_processes(broker.address, 2) as (app, other):
        app.subscribe('chat')
        other.subscribe('chat')
        broker.wait_subscribed(app.pid, ['chat'])
        broker.wait_subscribed(other.pid, ['chat'])
        app.send_many('chat', 20, local=True)
        assert len(app.wait_received('chat', 20)) == 20
        time.sleep(0.2)
        assert broker.process_stats(app.pid)['messages_in'] == 0
        assert other.received('chat') == []


def test_internal_topics_stay_in_their_process(broker):
    with app_processes(broker.address, 2) as (watcher, other):
        watcher.subscribe('lona.channels.*')
        watcher.subscribe('ready')          # the broker never hears of the internal one
        broker.wait_subscribed(watcher.pid, ['ready'])
        assert broker.process_stats(watcher.pid)['subscriptions'] == ['ready']
        other.subscribe('chat')
        broker.wait_subscribed(other.pid, ['chat'])
        time.sleep(0.2)
        assert [data for _, data in watcher.received('lona.channels.*')] == \
            [{'topic': 'lona.channels.*'}, {'topic': 'ready'}]


def test_the_broker_sends_each_message_once_per_interested_process(broker):
    with app_processes(broker.address, 3) as (sender, keen, bored):
        for topic in ('news', 'news.*', '*'):
            keen.subscribe(topic)
        bored.subscribe('sport')
        broker.wait_subscribed(keen.pid, ['news', 'news.*', '*'])
        broker.wait_subscribed(bored.pid, ['sport'])
        sender.send_many('news', 50)
        keen.wait_received('news', 50)
        wait_until(lambda: broker.process_stats(keen.pid)['messages_out'] == 50,
                   what='50 frames written to the interested process')
        assert broker.process_stats(bored.pid)['messages_out'] == 0
        assert broker.process_stats(sender.pid)['messages_out'] == 0


def test_app_processes_connect_lazily_on_first_use(broker):
    with app_processes(broker.address, 1) as (app,):
        time.sleep(0.2)
        assert broker.process_stats(app.pid) is None
        assert app.call('running') is False
        app.subscribe('chat')
        broker.wait_subscribed(app.pid, ['chat'])


def test_a_dead_process_loses_its_subscriptions_within_a_second(broker):
    with app_processes(broker.address, 2) as (doomed, survivor):
        doomed.subscribe('chat')
        survivor.subscribe('chat')
        broker.wait_subscribed(doomed.pid, ['chat'])
        broker.wait_subscribed(survivor.pid, ['chat'])
        doomed.kill()
        wait_until(lambda: broker.process_stats(doomed.pid) is None, timeout=1.0,
                   what='the broker to forget the killed process')
        survivor.send_many('chat', 10)
        assert len(survivor.wait_received('chat', 10)) == 10


def test_expired_messages_are_not_delivered_across_processes(broker):
    from datetime import timedelta
    with app_processes(broker.address, 2) as (sender, receiver):
        receiver.subscribe('chat')
        broker.wait_subscribed(receiver.pid, ['chat'])
        sender.call('send', 'chat', {'n': 0}, {'expiry': timedelta(seconds=-1)})
        sender.call('send', 'chat', {'n': 1}, {'expiry': timedelta(seconds=30)})
        assert receiver.wait_received('chat', 1) == [('chat', {'n': 1})]
        time.sleep(0.1)
        assert len(receiver.received('chat')) == 1


@pytest.mark.parametrize('start_method', ['spawn', 'forkserver', 'fork'])
def test_children_of_every_start_method_take_part(broker, start_method):
    with app_processes(broker.address, 2, start_method=start_method) as (a, b):
        a.subscribe('chat')
        b.subscribe('chat')
        broker.wait_subscribed(a.pid, ['chat'])
        broker.wait_subscribed(b.pid, ['chat'])
        a.send_many('chat', 10)
        b.send_many('chat', 10, start=10)
        for app in (a, b):
            received = app.wait_received('chat', 20)
            assert sorted(data['n'] for _, data in received) == list(range(20))


def test_a_message_larger_than_the_socket_buffer_arrives_whole_and_in_order(broker):
    big = 'x' * 3_000_000           # far over a socket buffer: a direct write is partial
    with app_processes(broker.address, 2) as (sender, receiver):
        receiver.subscribe('chat')
        broker.wait_subscribed(receiver.pid, ['chat'])
        for n in range(3):
            sender.call('send', 'chat', {'n': n, 'blob': big}, {})
            sender.send_many('chat', 5, start=10 * (n + 1))
        received = receiver.wait_received('chat', 18)
        assert [data['n'] for _, data in received] == [
            0, 10, 11, 12, 13, 14, 1, 20, 21, 22, 23, 24, 2, 30, 31, 32, 33, 34]
        assert all(data['blob'] == big for _, data in received if 'blob' in data)


def test_a_share_larger_than_a_batch_is_handed_out_in_batches_in_order():
    from channels import wire
    from channels.broker import _hand_out

    class Peer:
        def __init__(self):
            self.writes = []

        def deliver(self, data, count):
            self.writes.append((data, count))

    frames = [wire.encode_message('t', f'p-{n}', 0.0, None, False, b'x' * 10_000)
              for n in range(100)]         # about 1 MB: four batches
    big, small = Peer(), Peer()
    _hand_out({big: frames, small: frames[:2]})
    assert len(big.writes) > 1
    assert all(len(data) <= wire.BATCH_BYTES for data, _ in big.writes)
    assert b''.join(data for data, _ in big.writes) == b''.join(frames)
    assert sum(count for _, count in big.writes) == 100
    assert small.writes == [(frames[0] + frames[1], 2)]
