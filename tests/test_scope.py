"""``channels.Scope``: subscriptions that end together, and whose handler errors go to
one ``on_error(exception, message)``."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from support import Recorder, eventually, wait_until

import channels
from channels import Channel, Scope

TIMEOUT = 10.0


def plain(message) -> None:
    pass


async def coroutine(message) -> None:
    pass


class ErrorLog:
    """An on_error callback that records (exception, message) pairs, thread-safely."""

    def __init__(self) -> None:
        self.calls: list[tuple[BaseException, channels.Message]] = []
        self.lock = threading.Lock()

    def __call__(self, error, message) -> None:
        with self.lock:
            self.calls.append((error, message))

    def wait_for(self, count: int) -> list:
        wait_until(lambda: len(self.calls) >= count, TIMEOUT,
                   what=f'{count} calls of on_error (got {len(self.calls)})')
        with self.lock:
            return list(self.calls)


# -- closing -------------------------------------------------------------------------------

def test_closing_a_scope_unsubscribes_all_its_channels():
    async def main():
        scope = Scope()
        scope.subscribe('chat.rooms.lona', plain)
        scope.subscribe('chat.rooms.*', coroutine)
        scope.subscribe('news', plain)
        scope.subscribe('news', coroutine)
        assert len(Channel.get_channels('chat.rooms.lona')) == 2
        assert len(Channel.get_channels('news')) == 2
        owned = scope.channels
        scope.close()
        assert scope.closed
        assert Channel.get_channels('chat.rooms.lona') == []
        assert Channel.get_channels('news') == []
        assert [channel.handler for channel in owned] == [None] * 4

    asyncio.run(main())


def test_closing_a_scope_leaves_channels_outside_it_subscribed():
    outside = Recorder()
    Channel('chat', outside)
    scope = Scope()
    scope.subscribe('chat', plain)
    scope.close()
    assert [channel.handler for channel in Channel.get_channels('chat')] == [outside]


def test_a_closed_scopes_handlers_get_no_more_messages():
    inside, outside = Recorder(), Recorder()
    scope = Scope()
    scope.subscribe('chat', inside)
    Channel('chat').send({'n': 0})
    inside.wait_for(1, TIMEOUT)
    scope.close()
    # a channel outside the scope gets both; routing follows the subscriptions, so the
    # scope's channel, unsubscribed before the send, is not given the second
    Channel('chat', outside)
    Channel('chat').send({'n': 1})
    outside.wait_for(1, TIMEOUT)
    assert inside.data == [{'n': 0}]
    assert Channel.get_channels('chat') != [] and \
        all(channel.handler is outside for channel in Channel.get_channels('chat'))


def test_close_is_idempotent():
    scope = Scope()
    scope.subscribe('chat', plain)
    scope.close()
    scope.close()
    assert scope.closed
    assert Channel.get_channels('chat') == []


def test_the_channels_property_lists_the_scopes_channels_in_subscription_order():
    async def main():
        scope = Scope()
        assert scope.channels == ()
        first = scope.subscribe('chat', plain)
        second = scope.subscribe('news.*', coroutine)
        assert isinstance(first, Channel) and isinstance(second, Channel)
        assert scope.channels == (first, second)
        assert (first.topic, first.handler) == ('chat', plain)
        assert (second.topic, second.handler) == ('news.*', coroutine)
        scope.close()
        assert scope.channels == ()

    asyncio.run(main())


def test_a_with_block_closes_the_scope():
    with Scope() as scope:
        scope.subscribe('chat', plain)
        scope.subscribe('news', plain)
        assert not scope.closed
    assert scope.closed
    assert Channel.get_channels('chat') == [] and Channel.get_channels('news') == []


def test_a_with_block_closes_the_scope_also_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with Scope() as scope:
            scope.subscribe('chat', plain)
            1 / 0
    assert scope.closed
    assert Channel.get_channels('chat') == []


def test_an_async_with_block_closes_the_scope():
    async def main():
        async with Scope() as scope:
            scope.subscribe('chat', plain)
            scope.subscribe('news', coroutine)
            assert not scope.closed
        assert scope.closed
        assert Channel.get_channels('chat') == [] and Channel.get_channels('news') == []

    asyncio.run(main())


def test_an_async_with_block_closes_the_scope_also_after_an_exception():
    async def main():
        with pytest.raises(ZeroDivisionError):
            async with Scope() as scope:
                scope.subscribe('chat', coroutine)
                1 / 0
        assert scope.closed
        assert Channel.get_channels('chat') == []

    asyncio.run(main())


def test_a_closed_scope_refuses_new_subscriptions():
    scope = Scope()
    scope.close()
    with pytest.raises(RuntimeError, match='closed'):
        scope.subscribe('chat', plain)
    assert Channel.get_channels('chat') == []
    assert scope.channels == ()


# -- errors --------------------------------------------------------------------------------

def test_on_error_receives_what_a_plain_handler_raised_and_the_message():
    raised, handled = [], Recorder()

    def handler(message):
        if message.data['n'] == 0:
            error = ValueError('boom')
            raised.append((error, message))
            raise error
        handled(message)

    errors = ErrorLog()
    with Scope(on_error=errors) as scope:
        scope.subscribe('chat', handler)
        Channel('chat').send({'n': 0})
        Channel('chat').send({'n': 1})
        handled.wait_for(1, TIMEOUT)
        ((error, message),) = errors.wait_for(1)
    assert error is raised[0][0]
    assert message is raised[0][1]
    assert message.data == {'n': 0} and message.topic == 'chat'
    assert handled.data == [{'n': 1}]        # the channel went on


def test_on_error_receives_what_a_coroutine_handler_raised_and_the_message():
    raised, handled = [], []

    async def handler(message):
        if message.data['n'] == 0:
            error = KeyError('boom')
            raised.append((error, message))
            raise error
        handled.append(message.data)

    errors = ErrorLog()

    async def main():
        async with Scope(on_error=errors) as scope:
            scope.subscribe('chat', handler)
            Channel('chat').send({'n': 0})
            Channel('chat').send({'n': 1})
            await eventually(lambda: handled and errors.calls,
                             'the second message and the error callback')

    asyncio.run(main())
    ((error, message),) = errors.calls
    assert error is raised[0][0]
    assert message is raised[0][1]
    assert message.data == {'n': 0} and message.topic == 'chat'
    assert handled == [{'n': 1}]


def test_on_error_runs_on_the_event_loop_of_a_coroutine_handler():
    threads = []

    async def handler(message):
        raise ValueError('boom')

    def on_error(error, message):
        threads.append(threading.current_thread())

    async def main():
        async with Scope(on_error=on_error) as scope:
            scope.subscribe('chat', handler)
            Channel('chat').send({'n': 0})
            await eventually(lambda: threads, 'the error callback')

    asyncio.run(main())
    assert threads == [threading.main_thread()]


class Abort(BaseException):
    """An exception that is not an ``Exception`` (as ``SystemExit`` is not)."""


# a handler's error, and one that is not an Exception (a handler's BaseException must
# not end its channel either: the task worker catches those too)
ERRORS = pytest.mark.parametrize('error', [ValueError, Abort], ids=['Exception',
                                                                    'BaseException'])


@ERRORS
def test_without_on_error_a_plain_handlers_error_is_logged_and_the_channel_goes_on(
        caplog, error):
    handled = Recorder()

    def handler(message):
        if message.data['n'] == 0:
            raise error('boom in a plain handler')
        handled(message)

    with caplog.at_level(logging.ERROR, logger='channels'):
        with Scope() as scope:
            channel = scope.subscribe('chat', handler)
            for n in range(3):
                Channel('chat').send({'n': n})
            handled.wait_for(2, TIMEOUT)
            assert channel.handler is handler
    assert handled.data == [{'n': 1}, {'n': 2}]
    logged = [r for r in caplog.records
              if r.exc_info and 'boom in a plain handler' in str(r.exc_info[1])]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR and logged[0].name.startswith('channels.')


@ERRORS
def test_without_on_error_a_coroutine_handlers_error_is_logged_and_the_channel_goes_on(
        caplog, error):
    handled = []

    async def handler(message):
        if message.data['n'] == 0:
            raise error('boom in a coroutine handler')
        handled.append(message.data)

    async def main():
        async with Scope() as scope:
            scope.subscribe('chat', handler)
            for n in range(3):
                Channel('chat').send({'n': n})
            await eventually(lambda: len(handled) == 2, 'two handled messages')

    with caplog.at_level(logging.ERROR, logger='channels'):
        asyncio.run(main())
    assert handled == [{'n': 1}, {'n': 2}]
    logged = [r for r in caplog.records
              if r.exc_info and 'boom in a coroutine handler' in str(r.exc_info[1])]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR and logged[0].name == 'channels.handlers'


def test_an_on_error_that_raises_is_logged_and_a_plain_handlers_channel_goes_on(caplog):
    handled = Recorder()

    def handler(message):
        if message.data['n'] == 0:
            raise ValueError('boom in the handler')
        handled(message)

    def on_error(error, message):
        raise RuntimeError('boom in on_error')

    with caplog.at_level(logging.ERROR, logger='channels'):
        with Scope(on_error=on_error) as scope:
            scope.subscribe('chat', handler)
            for n in range(3):
                Channel('chat').send({'n': n})
            handled.wait_for(2, TIMEOUT)
    assert handled.data == [{'n': 1}, {'n': 2}]
    logged = [r for r in caplog.records
              if r.exc_info and 'boom in on_error' in str(r.exc_info[1])]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR and logged[0].name == 'channels.handlers'
    assert 'boom in the handler' in logged[0].getMessage()


def test_an_on_error_that_raises_is_logged_and_a_coroutine_handlers_channel_goes_on(
        caplog):
    handled = []

    async def handler(message):
        if message.data['n'] == 0:
            raise ValueError('boom in the handler')
        handled.append(message.data)

    def on_error(error, message):
        raise RuntimeError('boom in on_error')

    async def main():
        async with Scope(on_error=on_error) as scope:
            scope.subscribe('chat', handler)
            for n in range(3):
                Channel('chat').send({'n': n})
            await eventually(lambda: len(handled) == 2, 'two handled messages')

    with caplog.at_level(logging.ERROR, logger='channels'):
        asyncio.run(main())
    assert handled == [{'n': 1}, {'n': 2}]
    logged = [r for r in caplog.records
              if r.exc_info and 'boom in on_error' in str(r.exc_info[1])]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR and logged[0].name == 'channels.handlers'


@pytest.mark.parametrize('on_error', [42, 'report', object()])
def test_a_non_callable_on_error_raises_type_error(on_error):
    with pytest.raises(TypeError, match='on_error must be callable'):
        Scope(on_error=on_error)


def test_each_channel_of_the_scope_reports_to_the_scopes_on_error():
    errors = ErrorLog()

    def failing(message):
        raise ValueError(message.topic)

    with Scope(on_error=errors) as scope:
        scope.subscribe('chat', failing)
        scope.subscribe('news', failing)
        Channel('chat').send()
        Channel('news').send()
        calls = errors.wait_for(2)
    assert sorted(str(error) for error, _ in calls) == ['chat', 'news']
    assert sorted(message.topic for _, message in calls) == ['chat', 'news']
