"""The Channel API of the spec: subscribing, unsubscribing, attributes, bad input."""

from __future__ import annotations

import pytest
from support import Recorder

import channels
from channels import Channel


def test_channel_with_a_handler_subscribes():
    channel = Channel('chat.rooms.lona', Recorder())
    assert Channel.get_channels('chat.rooms.lona') == [channel]


def test_channel_without_a_handler_does_not_subscribe():
    channel = Channel('chat.rooms.lona')
    assert channel.handler is None
    assert Channel.get_channels('chat.rooms.lona') == []


def test_channel_exposes_its_topic_and_handler():
    handler = Recorder()
    channel = Channel('chat.rooms.lona', handler)
    assert channel.topic == 'chat.rooms.lona'
    assert channel.handler is handler
    channel.unsubscribe()
    assert channel.handler is None


def test_second_subscribe_raises_runtime_error():
    channel = Channel('chat.rooms.lona', Recorder())
    with pytest.raises(RuntimeError, match='already subscribed'):
        channel.subscribe(Recorder())


def test_second_unsubscribe_is_a_no_op():
    channel = Channel('chat.rooms.lona', Recorder())
    channel.unsubscribe()
    channel.unsubscribe()
    assert Channel.get_channels('chat.rooms.lona') == []


def test_unsubscribing_a_channel_that_never_subscribed_is_a_no_op():
    Channel('chat.rooms.lona').unsubscribe()


def test_channel_may_subscribe_again_after_unsubscribe():
    received = Recorder()
    channel = Channel('chat', Recorder())
    channel.unsubscribe()
    channel.subscribe(received)
    Channel('chat').send({'n': 1})
    received.wait_for(1)
    assert received.data == [{'n': 1}]


def test_get_channels_returns_the_matching_channels_of_this_process():
    exact = Channel('chat.rooms.lona', Recorder())
    wildcard = Channel('chat.rooms.*', Recorder())
    everything = Channel('*', Recorder())
    Channel('other', Recorder())
    found = Channel.get_channels(topic='chat.rooms.lona')
    assert sorted(found, key=id) == sorted([exact, wildcard, everything], key=id)


@pytest.mark.parametrize('topic, error', [('', ValueError), (None, TypeError),
                                          (3, TypeError), (b'x', TypeError)])
def test_bad_topic_raises_at_construction(topic, error):
    with pytest.raises(error, match='topic must be a non-empty str'):
        Channel(topic)


@pytest.mark.parametrize('handler', ['not callable', 42, object()])
def test_handler_that_is_not_callable_raises_type_error(handler):
    channel = Channel('chat')
    with pytest.raises(TypeError, match='handler must be callable'):
        channel.subscribe(handler)
    assert channel.handler is None


def test_get_channels_rejects_a_bad_topic():
    with pytest.raises(TypeError, match='topic must be a non-empty str'):
        Channel.get_channels(None)


def test_public_names_are_exported():
    for name in ['Channel', 'Message', 'Worker', 'MessageBroker', 'TaskWorker',
                 'configure', 'settings', 'shutdown']:
        assert name in channels.__all__
        assert getattr(channels, name) is not None


def test_machinery_starts_lazily_on_first_use():
    assert not channels.is_running()
    Channel('chat')                       # no handler: nothing to start
    assert not channels.is_running()
    Channel('chat', Recorder())
    assert channels.is_running()
