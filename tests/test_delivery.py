"""Delivery in one process: exactly once, in order, one call at a time, errors contained."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from support import Overlaps, Recorder, wait_until

import channels
from channels import Channel, MessageBroker, TaskWorker


def test_every_matching_channel_gets_the_message_once():
    exact, wildcard, everything, other = Recorder(), Recorder(), Recorder(), Recorder()
    Channel('chat.rooms.lona', exact)
    Channel('chat.rooms.*', wildcard)
    Channel('*', everything)
    Channel('other', other)
    Channel('chat.rooms.lona').send({'n': 1})
    for recorder in (exact, wildcard):
        recorder.wait_for(1)
    wait_until(lambda: 'chat.rooms.lona' in everything.topics, what='the * subscriber')
    time.sleep(0.05)          # give a duplicate the chance to show up
    assert exact.data == [{'n': 1}] and wildcard.data == [{'n': 1}]
    assert everything.topics.count('chat.rooms.lona') == 1
    assert len(other) == 0


def test_sender_may_use_a_wildcard_topic():
    lona, releases, other = Recorder(), Recorder(), Recorder()
    Channel('chat.rooms.lona', lona)
    Channel('chat.rooms.lona-releases', releases)
    Channel('other.lona', other)
    Channel('chat.rooms.lona-*').send({'v': '2.0'})
    releases.wait_for(1)
    time.sleep(0.05)
    assert releases.topics == ['chat.rooms.lona-*'] and len(lona) == 0 and len(other) == 0


@pytest.mark.parametrize('task_threads', [1, 4, 8])
def test_a_channel_handles_messages_in_the_order_they_were_sent(task_threads):
    channels.configure(MAX_CHANNEL_TASK_WORKER_THREADS=task_threads)
    recorders = [Recorder() for _ in range(6)]
    for number, recorder in enumerate(recorders):
        Channel(f'room.{number}' if number < 4 else 'room.*', recorder)
    count = 3000
    for n in range(count):
        Channel(f'room.{n % 4}').send({'n': n})
    for number, recorder in enumerate(recorders):
        expected = [n for n in range(count) if number >= 4 or n % 4 == number]
        recorder.wait_for(len(expected))
        assert [d['n'] for d in recorder.data] == expected


def test_a_handler_never_runs_concurrently_with_itself():
    channels.configure(MAX_CHANNEL_TASK_WORKER_THREADS=8)
    handler = Overlaps(0.0005)
    Channel('chat', handler)
    for n in range(400):
        Channel('chat').send({'n': n})
    wait_until(lambda: handler.calls == 400, what='400 calls')
    assert handler.overlaps == 0


def test_different_channels_run_in_parallel():
    channels.configure(MAX_CHANNEL_TASK_WORKER_THREADS=4)
    barrier = threading.Barrier(3, timeout=10)
    passed = Recorder()

    def meet(message):
        barrier.wait()          # only returns if three handlers run at the same time
        passed(message)

    for name in ('a', 'b', 'c'):
        Channel(name, meet)
    for name in ('a', 'b', 'c'):
        Channel(name).send()
    passed.wait_for(3)


def test_a_slow_handler_holds_up_only_its_own_channel():
    channels.configure(MAX_CHANNEL_TASK_WORKER_THREADS=2)
    release = threading.Event()
    fast = Recorder()
    Channel('slow', lambda message: release.wait(10))
    Channel('fast', fast)
    Channel('slow').send()
    Channel('slow').send()
    for n in range(50):
        Channel('fast').send({'n': n})
    try:
        fast.wait_for(50, timeout=5)
    finally:
        release.set()


def test_no_call_starts_after_unsubscribe_returns():
    calls_after = []
    unsubscribed = threading.Event()
    first_call = threading.Event()

    def handler(message):
        first_call.set()
        if unsubscribed.is_set():
            calls_after.append(message)
        time.sleep(0.001)

    channel = Channel('chat', handler)
    for n in range(200):
        Channel('chat').send({'n': n})
    first_call.wait(5)
    channel.unsubscribe()
    unsubscribed.set()
    time.sleep(0.2)
    assert calls_after == []


def test_messages_sent_before_a_subscription_do_not_reach_it_afterwards():
    channels.configure(MAX_CHANNEL_TASK_WORKER_THREADS=1)
    release = threading.Event()
    Channel('gate', lambda message: release.wait(10))
    Channel('gate').send()
    received = Recorder()
    channel = Channel('chat', received)
    Channel('chat').send({'n': 1})           # scheduled, waits behind the gate
    wait_until(lambda: channel._mailbox is not None and channel._mailbox.tasks,
               what='the task to be queued')
    channel.unsubscribe()
    channel.subscribe(received)              # a new subscription: the old task is void
    release.set()
    Channel('chat').send({'n': 2})
    received.wait_for(1)
    time.sleep(0.05)
    assert received.data == [{'n': 2}]


# -- internal topics -------------------------------------------------------------------

def test_subscribe_and_unsubscribe_send_internal_events_locally():
    events = Recorder()
    Channel('lona.channels.*', events)
    channel = Channel('chat.rooms.lona', Recorder())
    channel.unsubscribe()
    wait_until(lambda: len(events) >= 3, what='three internal events')
    assert [(m.topic, m.data) for m in events.messages] == [
        ('lona.channels.subscribe', {'topic': 'lona.channels.*'}),
        ('lona.channels.subscribe', {'topic': 'chat.rooms.lona'}),
        ('lona.channels.unsubscribe', {'topic': 'chat.rooms.lona'}),
    ]
    assert all(message.local for message in events.messages)


def test_star_subscribers_receive_internal_events():
    everything = Recorder()
    Channel('*', everything)
    Channel('chat', Recorder())
    wait_until(lambda: 'lona.channels.subscribe' in everything.topics and
               {'topic': 'chat'} in everything.data, what='the subscribe event')


def test_second_subscribe_sends_no_event():
    events = Recorder()
    Channel('lona.channels.subscribe', events)
    channel = Channel('chat', Recorder())
    with pytest.raises(RuntimeError):
        channel.subscribe(Recorder())
    Channel('chat').unsubscribe()
    Channel('lona.channels.subscribe').send({'topic': 'marker'}, local=True)
    wait_until(lambda: {'topic': 'marker'} in events.data, what='the marker')
    assert events.data.count({'topic': 'chat'}) == 1


# -- errors are logged and contained -----------------------------------------------------

def test_handler_error_is_logged_and_the_channel_stays_subscribed(caplog):
    received = Recorder()

    def handler(message):
        if message.data['n'] == 0:
            raise ValueError('boom in handler')
        received(message)

    channel = Channel('chat', handler)
    with caplog.at_level(logging.ERROR, logger='channels'):
        Channel('chat').send({'n': 0})
        Channel('chat').send({'n': 1})
        received.wait_for(1)
    assert channel.handler is handler
    errors = [r for r in caplog.records if r.exc_info and 'boom in handler' in
              str(r.exc_info[1])]
    assert errors and errors[0].name.startswith('channels')


class CountingBroker(MessageBroker):
    """A user's broker: routes like the default and counts."""
    routed: list = []

    def run(self):
        message = self.get_message()
        CountingBroker.routed.append(message.topic)
        for channel in channels.Channel.get_channels(topic=message.topic):
            self.schedule_task(channel=channel, message=message)


class UppercaseWorker(TaskWorker):
    """A user's task worker: marks the data it passes to handlers."""

    def run(self):
        task = self.get_task()
        task.message.data['seen_by'] = 'custom'
        if task.channel.handler is not None:
            task.channel.handler(task.message)


def test_custom_broker_and_worker_classes_by_import_string():
    CountingBroker.routed = []
    channels.configure(CHANNEL_MESSAGE_BROKER_CLASS=f'{__name__}.CountingBroker',
                       CHANNEL_TASK_WORKER_CLASS=f'{__name__}.UppercaseWorker')
    received = Recorder()
    Channel('chat', received)
    Channel('chat').send({'n': 1})
    received.wait_for(1)
    assert received.data == [{'n': 1, 'seen_by': 'custom'}]
    assert 'chat' in CountingBroker.routed


class FlakyBroker(MessageBroker):
    """Raises on every other message; must be logged, and the worker must go on."""
    calls = 0

    def run(self):
        message = self.get_message()
        FlakyBroker.calls += 1
        if message.data.get('fail'):
            raise RuntimeError('broker exploded')
        for channel in Channel.get_channels(topic=message.topic):
            self.schedule_task(channel=channel, message=message)


def test_exception_in_a_workers_run_is_logged_and_the_worker_goes_on(caplog):
    channels.configure(CHANNEL_MESSAGE_BROKER_CLASS=FlakyBroker)
    received = Recorder()
    Channel('chat', received)
    with caplog.at_level(logging.ERROR, logger='channels'):
        Channel('chat').send({'fail': True})
        Channel('chat').send({'n': 2})
        received.wait_for(1)
    assert received.data == [{'n': 2}]
    assert any('FlakyBroker.run() raised' in r.getMessage() for r in caplog.records)
    assert channels.runtime.runtime.machinery.brokers[0].errors == 1


def test_several_broker_threads_keep_per_channel_order():
    channels.configure(MAX_CHANNEL_MESSAGE_BROKER_THREADS=4,
                       MAX_CHANNEL_TASK_WORKER_THREADS=4)
    received = Recorder()
    Channel('chat.*', received)
    for n in range(2000):
        Channel(f'chat.{n % 3}').send({'n': n})
    received.wait_for(2000)
    assert [d['n'] for d in received.data] == list(range(2000))


def test_a_handler_that_raises_system_exit_is_logged_and_the_channel_goes_on(caplog):
    received = Recorder()

    def handler(message):
        if message.data['n'] == 0:
            raise SystemExit('handler called sys.exit()')
        received(message)

    Channel('chat', handler)
    with caplog.at_level(logging.ERROR, logger='channels'):
        for n in range(3):
            Channel('chat').send({'n': n})
        received.wait_for(2)
    assert received.data == [{'n': 1}, {'n': 2}]
    assert 'handler called sys.exit()' in caplog.text
    assert channels.shutdown(timeout=5) is True


def test_a_task_keeps_the_handler_of_the_subscription_it_was_scheduled_for():
    first, second = Recorder(), Recorder()
    channel = Channel('chat', first)
    task = channels.Task(channel, channels.Message('chat'))
    channel.unsubscribe()
    channel.subscribe(second)
    assert task.handler is first           # never the later subscription's handler
    assert task.subscription is not channel._subscription


def test_a_reader_whose_connection_closed_before_it_ran_still_hands_the_link_back():
    import socket
    from multiprocessing.connection import Connection
    from types import SimpleNamespace

    from channels.client import _Reader

    calls = []
    link = SimpleNamespace(machinery=None, max_pending_tasks=1, max_batch=1024, closing=True,
                           address_text='-', retire=lambda reader: calls.append('retire'),
                           connection_lost=lambda connection: calls.append('lost'))
    ours, theirs = socket.socketpair()
    theirs.close()
    connection = Connection(ours.detach())
    connection.close()
    _Reader(link, connection, 1)._loop()       # in this thread: returns, never raises
    assert calls == ['retire', 'lost']
