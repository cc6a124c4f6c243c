"""Topic length and subscription limits, and matching whose cost stays bounded
(hostile patterns, many subscriptions), in a process and at the broker."""

from __future__ import annotations

import os
import time

import pytest
from brokers import BrokerProcess, app_processes
from support import Recorder, app_hello, wait_until

import channels
from channels import Channel, ConfigurationError, SubscriptionLimitError, listen, wire
from channels import topics
from channels.connection import connect, parse_address
from channels.topics import TopicIndex, matches


def _elapsed(work) -> float:
    began = time.perf_counter()
    work()
    return time.perf_counter() - began


# -- matching in bounded time --------------------------------------------------------

def test_a_pattern_of_many_brackets_is_compiled_in_linear_time():
    # fnmatch.translate looks for a closing ']' after each '[': quadratic, about 25 s
    # for this one; one pass takes milliseconds
    pattern = '[' * 20_000
    index = TopicIndex()
    assert _elapsed(lambda: index.add(pattern, 'p')) < 2.0
    assert index.match(pattern) == ['p']
    assert index.match('[' * 19_999) == []


# the worst shapes at the default MAX_TOPIC_LENGTH, as subscription and as sent topic
_LIMIT = 4096
_PATTERNS = ['[' * _LIMIT, '*a' * (_LIMIT // 2), '*a' * (_LIMIT // 2 - 1) + '*b',
             '*' + '?' * (_LIMIT - 2) + 'b', '*' + 'a' * (_LIMIT // 2) + 'b*',
             '*' + '?' * (_LIMIT // 2) + 'b*', '*[ab]' * (_LIMIT // 5), '[!a]' * (_LIMIT // 4)]
_TOPICS = ['a' * _LIMIT, 'b' * _LIMIT, '[' * _LIMIT, 'ab' * (_LIMIT // 2), '?' * _LIMIT]


def test_matching_at_the_topic_length_limit_is_bounded_in_its_worst_cases():
    # each pattern compiled once, then matched both ways against each topic: a few
    # hundred milliseconds in all (fnmatch took over a second for '[' * 4096 alone)
    expected = [(matches(p, t), matches(t, p)) for p in _PATTERNS for t in _TOPICS]
    got = []

    def work():
        for pattern in _PATTERNS:
            index = TopicIndex()
            index.add(pattern, 'sub')
            for topic in _TOPICS:
                reverse = TopicIndex()
                reverse.add(topic, 'sub')
                got.append((index.match(topic) == ['sub'], reverse.match(pattern) == ['sub']))
    topics.pattern_matcher.cache_clear()
    elapsed = _elapsed(work)
    assert got == expected
    assert elapsed < 1.5, f'{elapsed:.2f}s'


def test_patterns_with_an_empty_prefix_are_narrowed_by_their_suffix():
    # 5,000 patterns like '*a*a*a*b17', each tried for every message, took seconds per
    # thousand messages; only those whose literal suffix ends the topic are tried
    index = TopicIndex()
    for n in range(5_000):
        index.add('*a' * 5 + f'*b{n}', n)
    index.add('chat.room1', 'honest')

    def honest_traffic():
        for _ in range(1000):
            assert index.match('chat.room1') == ['honest']
    elapsed = _elapsed(honest_traffic)
    assert elapsed < 1.0, f'{elapsed:.2f}s for 1000 messages'
    assert index.match('aaaaab17') == [17]


def test_a_star_send_sorts_nothing(monkeypatch):
    def no_sort(*args, **kwargs):
        raise AssertionError('a lookup sorted the topics')

    index = TopicIndex()
    for n in range(1000):
        index.add(f'room.{n}', n)
    monkeypatch.setattr(topics, 'sorted', no_sort, raising=False)
    for n in range(1000, 1010):
        index.add(f'room.{n}', n)                  # a change before each '*' send
        assert len(index.match('*')) == n + 1


def test_patterns_sent_with_a_prefix_sort_the_topics_once_not_after_every_change(
        monkeypatch):
    calls = []

    def counting_sorted(iterable):
        calls.append(1)
        return sorted(iterable)

    index = TopicIndex()
    for n in range(1000):
        index.add(f'room.{n}', n)
    monkeypatch.setattr(topics, 'sorted', counting_sorted, raising=False)
    for n in range(1000, 1050):
        index.add(f'room.{n}', n)
        assert len(index.match('room.*')) == n + 1
    assert len(calls) <= 1


# -- the topic length limit ----------------------------------------------------------

def test_a_topic_over_max_topic_length_raises_at_channel():
    Channel('x' * 4096)
    with pytest.raises(ValueError, match='4097 bytes long in UTF-8, over MAX_TOPIC_LENGTH=4096'):
        Channel('x' * 4097)


def test_max_topic_length_counts_utf8_bytes():
    Channel('é' * 2048)                                 # 4096 bytes
    with pytest.raises(ValueError, match='4098 bytes'):
        Channel('é' * 2049)


def test_a_topic_over_max_topic_length_raises_at_listen():
    channels.configure(MAX_TOPIC_LENGTH=10)
    listen('0123456789')
    with pytest.raises(ValueError, match='MAX_TOPIC_LENGTH=10'):
        listen('chat', '0123456789a')


def test_a_limit_lowered_after_channel_is_checked_at_subscribe():
    channel = Channel('x' * 100)
    channels.configure(MAX_TOPIC_LENGTH=50)
    with pytest.raises(ValueError, match='MAX_TOPIC_LENGTH=50'):
        channel.subscribe(Recorder())
    assert channel.handler is None


def test_a_limit_lowered_after_channel_is_checked_at_send():
    channel = Channel('x' * 100)
    channels.configure(MAX_TOPIC_LENGTH=50)
    with pytest.raises(ValueError, match='MAX_TOPIC_LENGTH=50'):
        channel.send({})


def test_max_topic_length_cannot_exceed_what_the_wire_carries():
    with pytest.raises(ConfigurationError, match='at most 65535'):
        channels.configure(MAX_TOPIC_LENGTH=70_000)


# -- the subscription limit ----------------------------------------------------------

def test_subscribing_past_max_subscriptions_raises():
    channels.configure(MAX_SUBSCRIPTIONS=3)
    kept = [Channel(f'room.{n}', Recorder()) for n in range(3)]
    with pytest.raises(SubscriptionLimitError, match='MAX_SUBSCRIPTIONS is 3'):
        Channel('room.3', Recorder())
    assert isinstance(SubscriptionLimitError('x'), RuntimeError)


def test_a_channel_on_a_topic_already_subscribed_does_not_count_against_the_limit():
    channels.configure(MAX_SUBSCRIPTIONS=2)
    kept = [Channel('room.1', Recorder()), Channel('room.2', Recorder()),
            Channel('room.2', Recorder())]
    kept[0].unsubscribe()
    kept.append(Channel('room.3', Recorder()))          # room.1 is free again
    assert all(channel.handler is not None for channel in kept[1:])


def test_subscribing_past_max_patterns_raises():
    channels.configure(MAX_PATTERNS=2)
    kept = [Channel('a.*', Recorder()), Channel('b.?', Recorder()), Channel('a.*', Recorder()),
            Channel('plain', Recorder())]
    with pytest.raises(SubscriptionLimitError, match='MAX_PATTERNS is 2'):
        Channel('c.*', Recorder())
    kept[1].unsubscribe()
    kept.append(Channel('c.*', Recorder()))          # 'b.?' is gone: room for one
    assert kept[-1].handler is not None


def test_subscribing_past_max_unanchored_patterns_raises():
    # '*x*' has neither a literal start nor end: each is tried for every message
    channels.configure(MAX_UNANCHORED_PATTERNS=2)
    kept = [Channel('*a*', Recorder()), Channel('*b?', Recorder()), Channel('*a*', Recorder())]
    with pytest.raises(SubscriptionLimitError, match='MAX_UNANCHORED_PATTERNS is 2'):
        Channel('*c*', Recorder())
    kept += [Channel('chat.*', Recorder()), Channel('*.created', Recorder())]   # anchored
    kept[0].unsubscribe()
    with pytest.raises(SubscriptionLimitError):      # '*a*' still has kept[2]
        Channel('*c*', Recorder())
    kept[2].unsubscribe()
    kept.append(Channel('*c*', Recorder()))          # '*a*' is gone: room for one
    assert kept[-1].handler is not None


# -- at the broker -------------------------------------------------------------------

def _raw_app(address: str, pid: int):
    raw = connect(parse_address(address), None)
    raw.send_bytes(app_hello(pid))
    return raw


def test_a_huge_pattern_from_one_process_does_not_stall_routing_for_others(broker):
    # one SUB of '[' * 60_000 (under the wire's 0xFFFF) stalled routing for minutes
    with app_processes(broker.address, 2) as (a, b):
        b.subscribe('honest')
        broker.wait_subscribed(b.pid, ['honest'])
        raw = _raw_app(broker.address, 7)
        try:
            raw.send_bytes(wire.encode(wire.SUB, b'[' * 60_000))
            wait_until(lambda: 'dropped the connection of process 7: SUB topic of 60000 '
                               'bytes, over MAX_TOPIC_LENGTH=4096' in broker.log,
                       what='the over-long SUB to be refused')
            a.send_many('honest', 200)
            assert len(b.wait_received('honest', 200)) == 200
        finally:
            raw.close()


def test_a_message_to_an_over_long_topic_drops_that_connection(broker):
    with app_processes(broker.address, 2) as (a, b):
        b.subscribe('*')
        broker.wait_subscribed(b.pid, ['*'])
        raw = _raw_app(broker.address, 8)
        try:
            raw.send_bytes(wire.encode_message('*a' * 3000, '8-1', 0.0, None, False, b''))
            wait_until(lambda: 'dropped the connection of process 8: MESSAGE topic of '
                               '6000 bytes' in broker.log, what='the message to be refused')
            a.send_many('honest', 20)
            wait_until(lambda: [t for t, _ in b.received('*')].count('honest') == 20,
                       what='the honest messages')
            assert not [t for t, _ in b.received('*') if t.startswith('*a')]
        finally:
            raw.close()


@pytest.mark.parametrize('setting, topic', [
    ('MAX_SUBSCRIPTIONS', 'spam.{n}'),
    ('MAX_PATTERNS', 'spam.{n}.*'),
    ('MAX_UNANCHORED_PATTERNS', '*a*b{n}*'),
])
def test_subscriptions_past_a_limit_drop_that_connection(broker_address, setting, topic):
    broker = BrokerProcess(broker_address,
                           env=dict(os.environ, **{f'CHANNELS_{setting}': '10'})).start()
    try:
        with app_processes(broker.address, 2) as (a, b):
            b.subscribe('honest')
            broker.wait_subscribed(b.pid, ['honest'])
            raw = _raw_app(broker.address, 9)
            try:
                raw.send_bytes(b''.join(wire.encode(wire.SUB, topic.format(n=n).encode())
                                        for n in range(15)))
                wait_until(lambda: 'dropped the connection of process 9: it subscribed '
                                   f'more than {setting}=10' in broker.log,
                           what='the process over the limit to be dropped')
                wait_until(lambda: broker.process_stats(9) is None,
                           what='its subscriptions to go')
                a.send_many('honest', 20)
                assert len(b.wait_received('honest', 20)) == 20
            finally:
                raw.close()
    finally:
        broker.stop()


def test_a_star_send_reaches_every_subscribed_process_once(broker):
    with app_processes(broker.address, 3) as (a, b, c):
        b.subscribe('room.1')
        b.subscribe('room.2')
        c.subscribe('*')
        broker.wait_subscribed(b.pid, ['room.1', 'room.2'])
        broker.wait_subscribed(c.pid, ['*'])
        a.send_many('**', 5)
        a.send_many('room.1', 1, start=5)         # behind them, from the same sender
        b.wait_received('room.1', 6)
        wait_until(lambda: any(t == 'room.1' for t, _ in c.received('*')), what='the marker')
        sent = [('**', n) for n in range(5)]
        assert [(t, d['n']) for t, d in b.received('room.1')] == sent + [('room.1', 5)]
        assert [(t, d['n']) for t, d in b.received('room.2')] == sent
        assert [(t, d['n']) for t, d in c.received('*') if t.startswith(('*', 'room'))] \
            == sent + [('room.1', 5)]
