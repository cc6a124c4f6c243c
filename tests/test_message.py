"""Message data, ids, expiry and serialization, as send() promises them."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from brokers import BrokerProcess
from support import Recorder, wait_until

import channels
from channels import Channel, Message, SerializationError


@pytest.fixture(params=['embedded', 'broker'])
def mode(request, broker_address):
    """Run the test within one process, and again through a real broker."""
    if request.param == 'embedded':
        yield request.param
        return
    broker = BrokerProcess(broker_address)
    try:
        broker.start()
        channels.configure(BROKER_ADDRESS=broker_address)
        yield request.param
    finally:
        broker.stop()


def test_send_returns_a_message_with_the_spec_attributes():
    message = Channel('chat.rooms.lona').send({'text': 'hi'}, droppable=True)
    assert message.topic == 'chat.rooms.lona'
    assert message.data == {'text': 'hi'}
    assert message.expiry is None
    assert message.local is False and message.droppable is True
    assert isinstance(message.id, str) and message.id
    assert abs(message.timestamp - time.time()) < 5
    assert not message.is_expired() and not message.is_dropped()


def test_send_without_data_gives_an_empty_dict():
    received = Recorder()
    Channel('chat', received)
    assert Channel('chat').send().data == {}
    received.wait_for(1)
    assert received.data == [{}]


@pytest.mark.parametrize('data', [[1, 2], 'text', 42, ('a', 1)])
def test_data_that_is_not_a_dict_raises_type_error(data):
    with pytest.raises(TypeError, match='message_data must be a dict or None'):
        Channel('chat').send(data)


def test_send_copies_the_data_shallowly():
    data = {'text': 'hi'}
    message = Channel('chat').send(data)
    data['text'] = 'changed'
    assert message.data == {'text': 'hi'}


def test_each_handler_gets_its_own_copy_of_the_data():
    first, second = Recorder(), Recorder()
    Channel('chat', first)
    Channel('chat', second)
    sent = Channel('chat').send({'items': [1]})
    first.wait_for(1)
    second.wait_for(1)
    a, b = first.messages[0], second.messages[0]
    a.data['items'].append(2)
    assert b.data == {'items': [1]} and sent.data == {'items': [1]}


def test_local_messages_are_shallow_copied_per_handler():
    first, second = Recorder(), Recorder()
    Channel('chat', first)
    Channel('chat', second)
    Channel('chat').send({'n': 1}, local=True)
    first.wait_for(1)
    second.wait_for(1)
    first.messages[0].data['n'] = 2
    assert second.messages[0].data == {'n': 1}


def test_every_copy_shares_the_id_and_timestamp_of_the_sent_message():
    first, second = Recorder(), Recorder()
    Channel('chat', first)
    Channel('chat', second)
    sent = Channel('chat').send({'n': 1})
    first.wait_for(1)
    second.wait_for(1)
    for received in (first.messages[0], second.messages[0]):
        assert received.id == sent.id
        assert received.timestamp == sent.timestamp


def test_message_ids_are_unique():
    ids = {Channel('chat').send().id for _ in range(1000)}
    assert len(ids) == 1000


def test_data_that_cannot_be_pickled_raises_at_send_in_the_callers_thread():
    with pytest.raises(SerializationError, match='cannot be pickled') as info:
        Channel('chat').send({'lock': threading.Lock()})
    assert isinstance(info.value, TypeError)


def test_unpicklable_data_is_fine_for_a_local_message():
    received = Recorder()
    Channel('chat', received)
    lock = threading.Lock()
    Channel('chat').send({'lock': lock}, local=True)
    received.wait_for(1)
    assert received.messages[0].data['lock'] is lock


@pytest.mark.parametrize('flag', ['local', 'droppable'])
@pytest.mark.parametrize('value', [1, 'yes', None])
def test_flags_must_be_bools(flag, value):
    with pytest.raises(TypeError, match=f'{flag} must be a bool'):
        Channel('chat').send({}, **{flag: value})


# -- expiry -----------------------------------------------------------------------------

def test_timedelta_expiry_is_relative_to_send():
    before = datetime.now()
    message = Channel('chat').send(expiry=timedelta(seconds=30))
    assert before + timedelta(seconds=29) < message.expiry <= datetime.now() + \
        timedelta(seconds=30)
    assert not message.is_expired()


def test_naive_datetime_expiry_is_local_time():
    message = Channel('chat').send(expiry=datetime.now() + timedelta(seconds=30))
    assert not message.is_expired()
    assert Channel('chat').send(expiry=datetime.now() - timedelta(seconds=1)).is_expired()


def test_aware_datetime_expiry_works():
    future = datetime.now(timezone(timedelta(hours=-7))) + timedelta(seconds=30)
    assert not Channel('chat').send(expiry=future).is_expired()
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    assert Channel('chat').send(expiry=past).is_expired()


@pytest.mark.parametrize('expiry', [5, 1.5, '2030-01-01', datetime.now().date()])
def test_bad_expiry_raises_type_error(expiry):
    with pytest.raises(TypeError, match='expiry must be a datetime, a timedelta or None'):
        Channel('chat').send(expiry=expiry)


def test_expired_message_is_dropped_before_routing():
    received = Recorder()
    Channel('chat', received)
    expired = Channel('chat').send({'n': 0}, expiry=timedelta(seconds=-1))
    Channel('chat').send({'n': 1})
    received.wait_for(1)
    wait_until(expired.is_dropped, what='the expired message to be dropped')
    assert received.data == [{'n': 1}]


def test_message_expiry_as_lona_tests_it(mode):
    # lona's tests/test_channels.py::test_message_expiry, in both modes
    messages = Recorder()
    channel = Channel('channel.1', messages)
    message_1 = channel.send(message_data={'message': 'test1'}, expiry=datetime(1970, 1, 1))
    wait_until(message_1.is_dropped, what='the expired message to say it was dropped')
    assert len(messages) == 0
    message_2 = channel.send(message_data={'message': 'test2'}, expiry=timedelta(hours=1))
    messages.wait_for(1)
    assert messages.data == [{'message': 'test2'}]
    assert not message_2.is_dropped()


def test_a_message_expired_at_send_is_dropped_there_and_never_routed(mode):
    received = Recorder()
    Channel('chat', received)
    expired = Channel('chat').send({'n': 0}, expiry=datetime(1970, 1, 1))
    assert expired.is_dropped()                     # at once: send() dropped it
    Channel('chat').send({'n': 1})
    received.wait_for(1)
    assert received.data == [{'n': 1}]


def test_message_that_expires_while_queued_is_dropped_before_its_handler():
    release = threading.Event()
    received = Recorder()

    def blocking(message):
        release.wait(10)
        received(message)

    Channel('chat', blocking)
    Channel('chat').send({'n': 0})                                   # holds the channel
    doomed = Channel('chat').send({'n': 1}, expiry=timedelta(milliseconds=50))
    wait_until(doomed.is_expired, what='the message to expire')
    release.set()
    wait_until(doomed.is_dropped, what='the expired message to be dropped')
    assert received.data == [{'n': 0}]


def test_message_constructed_directly_has_empty_data():
    assert Message('chat').data == {}


def test_timedelta_expiry_follows_the_clock_not_local_wall_time(monkeypatch):
    from channels import message as message_module

    class RepeatedHour(datetime):
        """Local wall time an hour behind the clock, as when DST ends."""
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) - timedelta(hours=1)

    monkeypatch.setattr(message_module, 'datetime', RepeatedHour)
    message = Channel('chat').send(expiry=timedelta(seconds=30))
    assert 25 < message.deadline - time.time() <= 30
    assert not message.is_expired()


def test_a_message_and_its_copies_form_no_reference_cycle():
    # freed by reference counting as soon as the last handler is done with it, not left
    # for the cycle collector (which, at 100,000 messages/s, costs about a tenth of the
    # work of a process that receives them)
    import gc
    message = Message.create('chat', {'text': 'hi'}, None, False, False)
    copy = message.copy()
    assert message not in gc.get_referents(message)
    assert copy not in gc.get_referents(message)
    copy.drop()
    assert message.is_dropped() and copy.is_dropped()
    assert copy.id == message.id
