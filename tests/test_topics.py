"""Topic validation, Lona's matching rule, and the index that must agree with it."""

from __future__ import annotations

import itertools
from fnmatch import fnmatchcase

import pytest
from hypothesis import given, settings, strategies as st

from channels.topics import (TopicIndex, is_pattern, literal_prefix, literal_suffix, matches,
                             pattern_matcher, validate_topic)


@pytest.mark.parametrize('subscription, topic, expected', [
    ('chat.rooms.lona', 'chat.rooms.lona', True),
    ('chat.rooms.lona', 'chat.rooms.other', False),
    ('chat.rooms.*', 'chat.rooms.lona', True),
    ('chat.rooms.lona-*', 'chat.rooms.lona-releases', True),
    ('chat.rooms.lona-*', 'chat.rooms.releases', False),
    ('*', 'anything.at.all', True),
    ('*', 'lona.channels.subscribe', True),
    ('chat.*', 'chat.rooms.lona', True),                 # * crosses dots
    ('chat.room?', 'chat.rooms', True),
    ('chat.room?', 'chat.room', False),
    ('chat.[ab]', 'chat.a', True),
    ('chat.[ab]', 'chat.c', False),
    ('chat.[!ab]', 'chat.c', True),
    # the sender may use wildcards
    ('chat.rooms.lona', 'chat.rooms.*', True),
    ('chat.rooms.lona', '*', True),
    ('chat.rooms.lona', 'chat.rooms.l?na', True),
    ('other.lona', 'chat.*', False),
    # wildcard against wildcard is the same string test, both ways
    ('chat.*', 'chat.rooms.*', True),
    ('chat.rooms.*', 'chat.*', True),
    ('chat.a*', 'chat.b*', False),
    # case-sensitive on every platform
    ('Chat.Rooms', 'chat.rooms', False),
    ('chat.*', 'CHAT.rooms', False),
])
def test_matching_follows_lonas_rule(subscription, topic, expected):
    assert matches(subscription, topic) is expected


@pytest.mark.parametrize('subscription, topic, expected', [
    ('chat.rooms.*', 'chat.rooms.lona', True),
    ('chat.rooms.lona', 'chat.rooms.*', True),
    ('chat.*', 'chat.rooms.*', True),
    ('chat.rooms.*', 'chat.*', True),
    ('Chat.*', 'chat.x', False),
    ('chat.[ab]', 'chat.b', True),
    ('a[b', 'a[b', True),
])
def test_index_agrees_with_the_rule_on_examples(subscription, topic, expected):
    index = TopicIndex()
    index.add(subscription, 'sub')
    assert (index.match(topic) == ['sub']) is expected


@pytest.mark.parametrize('topic', ['chat', 'a.b.c', '*', 'x' * 1000])
def test_validate_topic_accepts_non_empty_strings(topic):
    assert validate_topic(topic) == topic


@pytest.mark.parametrize('topic, error, message', [
    ('', ValueError, "non-empty str, got ''"),
    (None, TypeError, 'non-empty str, got NoneType None'),
    (b'chat', TypeError, "got bytes b'chat'"),
    (42, TypeError, 'got int 42'),
])
def test_validate_topic_rejects_everything_else(topic, error, message):
    with pytest.raises(error, match=message):
        validate_topic(topic)


@pytest.mark.parametrize('topic, pattern, prefix', [
    ('chat.rooms.lona', False, 'chat.rooms.lona'),
    ('chat.rooms.*', True, 'chat.rooms.'),
    ('chat.r?oms', True, 'chat.r'),
    ('[ab].x', True, ''),
])
def test_literal_prefix_stops_at_the_first_wildcard(topic, pattern, prefix):
    assert is_pattern(topic) is pattern
    assert literal_prefix(topic) == prefix


def test_index_returns_each_item_once_even_when_several_of_its_topics_match():
    index = TopicIndex()
    index.add('chat.*', 'p1')
    index.add('chat.rooms.*', 'p1')
    index.add('chat.rooms.lona', 'p2')
    assert sorted(index.match('chat.rooms.lona')) == ['p1', 'p2']


def test_index_forgets_topics_when_their_last_item_is_removed():
    index = TopicIndex()
    assert index.add('chat.*', 'a') is True
    assert index.add('chat.*', 'b') is False
    assert index.remove('chat.*', 'a') is False
    assert index.remove('chat.*', 'b') is True
    assert len(index) == 0 and index.match('chat.x') == []
    assert index.remove('chat.*', 'b') is False       # absent: a no-op


# -- the index against the plain rule, on random topics and patterns -----------------

_alphabet = st.sampled_from(list('ab.') + ['*', '?', '[', ']', '!', 'c'])
_topics = st.text(alphabet=_alphabet, min_size=1, max_size=8)


@settings(max_examples=400, deadline=None)
@given(subscriptions=st.lists(_topics, max_size=25), topics=st.lists(_topics, min_size=1,
                                                                     max_size=10),
       removed=st.sets(st.integers(min_value=0, max_value=24)))
def test_index_agrees_with_the_rule_on_random_topics(subscriptions, topics, removed):
    index = TopicIndex()
    for number, subscription in enumerate(subscriptions):
        index.add(subscription, number)
    for number in removed:
        if number < len(subscriptions):
            index.remove(subscriptions[number], number)
    live = {n: s for n, s in enumerate(subscriptions) if n not in removed}
    for topic in topics:
        expected = sorted(n for n, s in live.items() if matches(s, topic))
        got = index.match(topic)
        assert len(got) == len(set(got)), 'an item came back twice'
        assert sorted(got) == expected, (topic, live)


@settings(max_examples=300, deadline=None)
@given(first=st.lists(_topics, max_size=20), second=st.lists(_topics, max_size=20),
       topics=st.lists(_topics, min_size=1, max_size=8),
       removed=st.sets(st.integers(min_value=0, max_value=39)))
def test_index_agrees_with_the_rule_while_it_changes_between_lookups(first, second, topics,
                                                                     removed):
    # lookups between changes: the sorted topics kept for sent patterns are built
    # after the first lookup that wants them, and must follow every change after it
    index = TopicIndex()
    subscriptions = first + second
    live: dict[int, str] = {}

    def check():
        for topic in topics + ['*', 'a*', '[ab]*', '?*']:
            expected = sorted(n for n, s in live.items() if matches(s, topic))
            got = index.match(topic)
            assert len(got) == len(set(got)), 'an item came back twice'
            assert sorted(got) == expected, (topic, live)

    for number, subscription in enumerate(first):
        index.add(subscription, number)
        live[number] = subscription
    check()
    for number, subscription in enumerate(second, len(first)):
        index.add(subscription, number)
        live[number] = subscription
        if number % 4 == 0:
            check()
    for number in sorted(removed):
        if number in live:
            index.remove(live.pop(number), number)
            check()
    check()


_pattern_alphabet = st.sampled_from(list('ab.-!]^\\&\n') + ['*', '?', '[', 'z'])


@settings(max_examples=2000, deadline=None)
@given(pattern=st.text(alphabet=_pattern_alphabet, min_size=1, max_size=10),
       string=st.text(alphabet=_pattern_alphabet, max_size=10))
def test_pattern_matcher_agrees_with_fnmatchcase(pattern, string):
    assert bool(pattern_matcher(pattern)(string)) is fnmatchcase(string, pattern)
    if fnmatchcase(string, pattern):        # what the index's buckets rely on
        assert string.startswith(literal_prefix(pattern))
        assert string.endswith(literal_suffix(pattern))
        if is_pattern(pattern):
            assert len(string) >= len(literal_prefix(pattern)) + len(literal_suffix(pattern))


def test_a_lookup_racing_writers_finds_every_topic_that_stays_subscribed(monkeypatch):
    # a sent pattern scans the sorted topics; writers add and remove topics (splitting
    # and emptying chunks) between the steps of that scan, which must neither fail nor
    # miss a topic that was subscribed all along
    from channels import topics
    index = TopicIndex()
    for n in range(3000):
        index.add(f'room.{n:04}', n)
    index.match('room.*')              # a sent pattern with a prefix wants the topics
    index.add('other', 0)              # sorted: the next writer sorts them, once
    real = topics.pattern_matcher('room.*')
    steps = itertools.count()

    def matcher_while_writers_run(candidate):
        n = next(steps)
        if n < 3000:
            if n % 3 == 0:
                index.remove(f'room.{n:04}', n)       # one the scan has passed, or not
            index.add(f'room.{n:04}x', -n - 1)       # a new topic beside it
        return real(candidate)

    monkeypatch.setattr(topics, 'pattern_matcher', lambda pattern: matcher_while_writers_run)
    found = index.match('room.*')
    monkeypatch.undo()
    assert len(found) == len(set(found))
    stayed = {n for n in range(3000) if n % 3}
    assert stayed <= set(found)
    everything = [item for topic in index.topics() if topic.startswith('room.')
                  for item in index.items(topic)]
    assert sorted(index.match('room.*')) == sorted(everything)    # and it is consistent


def test_a_topic_that_is_not_valid_utf8_text_is_refused():
    with pytest.raises(ValueError, match='encodable as UTF-8'):
        validate_topic('room-\udcff')
