"""``channels.listen()``: an inbox consumed with ``async for``, bounded, and always
unsubscribed when its ``async with`` block ends."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest
from brokers import app_processes
from support import Recorder, eventually, numbers, send, take

import channels
from channels import Channel

TIMEOUT = 10.0


# -- what arrives ------------------------------------------------------------------------

def test_messages_of_the_inbox_topic_arrive_in_the_order_they_were_sent():
    async def main():
        async with channels.listen('chat.rooms.lona') as inbox:
            send('chat.rooms.lona', *range(200))
            received = await take(inbox, 200)
        assert numbers(received) == list(range(200))
        assert {message.topic for message in received} == {'chat.rooms.lona'}

    asyncio.run(main())


def test_a_wildcard_inbox_receives_every_matching_topic_in_send_order():
    async def main():
        async with channels.listen('chat.rooms.*') as inbox:
            for n in range(60):
                Channel(f'chat.rooms.{("lona", "django", "flask")[n % 3]}').send({'n': n})
            received = await take(inbox, 60)
        assert numbers(received) == list(range(60))
        assert [message.topic for message in received[:3]] == \
            ['chat.rooms.lona', 'chat.rooms.django', 'chat.rooms.flask']

    asyncio.run(main())


def test_a_message_sent_to_a_wildcard_topic_reaches_a_matching_inbox():
    async def main():
        async with channels.listen('chat.rooms.lona') as inbox:
            Channel('chat.rooms.l?na').send({'n': 1})
            (message,) = await take(inbox, 1)
        assert message.topic == 'chat.rooms.l?na' and message.data == {'n': 1}

    asyncio.run(main())


def test_one_inbox_receives_the_messages_of_several_topics():
    async def main():
        async with channels.listen('chat.rooms.lona', 'news.*') as inbox:
            for n in range(100):
                Channel('chat.rooms.lona' if n % 2 else 'news.sport').send({'n': n})
            received = await take(inbox, 100)
            assert len(inbox) == 0
        by_topic: dict[str, list[int]] = {}
        for message in received:
            by_topic.setdefault(message.topic, []).append(message.data['n'])
        assert by_topic == {'chat.rooms.lona': list(range(1, 100, 2)),
                            'news.sport': list(range(0, 100, 2))}

    asyncio.run(main())


def test_messages_of_other_topics_do_not_arrive():
    async def main():
        async with channels.listen('chat.rooms.*') as inbox:
            # Were they delivered, they would come before what is sent after them.
            send('chat.members', 1)
            send('news', 2)
            send('chat.room', 3)
            send('chat.rooms.lona', 4)
            received = await take(inbox, 1)
            assert numbers(received) == [4]
            assert len(inbox) == 0

    asyncio.run(main())


def test_a_message_is_delivered_to_the_inbox_and_to_other_channels_alike():
    recorder = Recorder()
    Channel('chat', recorder)

    async def main():
        async with channels.listen('chat') as inbox:
            send('chat', 1, 2)
            assert numbers(await take(inbox, 2)) == [1, 2]

    asyncio.run(main())
    recorder.wait_for(2, TIMEOUT)
    assert recorder.data == [{'n': 1}, {'n': 2}]


# -- the inbox unsubscribes when its block ends --------------------------------------------

def test_the_inbox_subscribes_on_entering_its_block_and_unsubscribes_when_it_ends():
    inbox = channels.listen('chat.rooms.lona', 'news')
    assert Channel.get_channels('chat.rooms.lona') == []

    async def main():
        async with inbox:
            assert len(Channel.get_channels('chat.rooms.lona')) == 1
            assert len(Channel.get_channels('news')) == 1
            assert not inbox.closed
        assert inbox.closed

    asyncio.run(main())
    assert Channel.get_channels('chat.rooms.lona') == []
    assert Channel.get_channels('news') == []


def test_the_inbox_unsubscribes_when_its_block_exits_by_an_exception():
    async def main():
        with pytest.raises(ZeroDivisionError):
            async with channels.listen('chat', 'news') as inbox:
                assert len(Channel.get_channels('chat')) == 1
                1 / 0
        assert inbox.closed
        assert Channel.get_channels('chat') == []
        assert Channel.get_channels('news') == []

    asyncio.run(main())


def test_the_inbox_unsubscribes_when_its_task_is_cancelled_while_it_awaits():
    inboxes = []

    async def consume(entered):
        async with channels.listen('chat') as inbox:
            inboxes.append(inbox)
            entered.set()
            await inbox.get()          # the task yields only here, waiting for a message
        raise AssertionError('get() returned without a message')

    async def main():
        entered = asyncio.Event()
        task = asyncio.create_task(consume(entered))
        await asyncio.wait_for(entered.wait(), TIMEOUT)
        assert len(Channel.get_channels('chat')) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, TIMEOUT)
        assert Channel.get_channels('chat') == []
        assert inboxes[0].closed

    asyncio.run(main())


# -- the end of iteration ------------------------------------------------------------------

def test_async_for_ends_after_close_once_the_queue_is_empty():
    async def main():
        async with channels.listen('chat') as inbox:
            send('chat', 0, 1, 2)
            await eventually(lambda: len(inbox) == 3, 'three queued messages')
            inbox.close()
            assert Channel.get_channels('chat') == []

            async def drain():
                return [message async for message in inbox]

            received = await asyncio.wait_for(drain(), TIMEOUT)
        assert numbers(received) == [0, 1, 2]

    asyncio.run(main())


def test_close_ends_an_async_for_that_waits_for_a_message():
    async def main():
        async with channels.listen('chat') as inbox:
            got_one = asyncio.Event()

            async def drain():
                received = []
                async for message in inbox:
                    received.append(message)
                    got_one.set()      # then it yields only to wait for the next message
                return received

            consumer = asyncio.create_task(drain())
            send('chat', 0)
            await asyncio.wait_for(got_one.wait(), TIMEOUT)
            assert not consumer.done()
            inbox.close()
            received = await asyncio.wait_for(consumer, TIMEOUT)
        assert numbers(received) == [0]

    asyncio.run(main())


def test_get_after_the_block_ended_and_the_queue_is_empty_stops_iteration():
    async def main():
        async with channels.listen('chat') as inbox:
            pass
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(inbox.get(), TIMEOUT)

    asyncio.run(main())


# -- overflow ----------------------------------------------------------------------------

def test_overflow_error_is_the_default():
    assert channels.listen('chat').overflow == 'error'


def test_overflow_error_gives_the_queued_messages_then_inbox_overflow_error():
    async def main():
        async with channels.listen('chat', maxsize=3) as inbox:
            send('chat', *range(10))
            await eventually(lambda: inbox.closed, 'the inbox to overflow')
            assert Channel.get_channels('chat') == []      # unsubscribed at once
            assert numbers(await take(inbox, 3)) == [0, 1, 2]
            with pytest.raises(channels.InboxOverflowError) as caught:
                await asyncio.wait_for(inbox.get(), TIMEOUT)
        assert 1 <= caught.value.dropped <= 7
        assert Channel.get_channels('chat') == []

    asyncio.run(main())


def test_overflow_error_ends_an_async_for_with_the_error_after_the_queued_messages():
    async def main():
        received = []
        with pytest.raises(channels.InboxOverflowError) as caught:
            async with channels.listen('chat', maxsize=3, overflow='error') as inbox:
                send('chat', *range(5))
                await eventually(lambda: inbox.closed, 'the inbox to overflow')

                async def drain():
                    async for message in inbox:
                        received.append(message)

                await asyncio.wait_for(drain(), TIMEOUT)
        assert numbers(received) == [0, 1, 2]
        assert caught.value.dropped >= 1
        assert isinstance(caught.value, channels.ChannelsError)
        assert Channel.get_channels('chat') == []

    asyncio.run(main())


def test_overflow_drop_oldest_keeps_the_newest_maxsize_messages():
    async def main():
        async with channels.listen('chat', maxsize=3, overflow='drop-oldest') as inbox:
            send('chat', *range(6))
            await eventually(lambda: inbox.dropped == 3, 'three dropped messages')
            assert numbers(await take(inbox, 3)) == [3, 4, 5]
            assert len(inbox) == 0 and inbox.dropped == 3
            assert len(Channel.get_channels('chat')) == 1     # still subscribed
            send('chat', 6)
            assert numbers(await take(inbox, 1)) == [6]

    asyncio.run(main())


def test_overflow_drop_newest_keeps_the_oldest_maxsize_messages():
    async def main():
        async with channels.listen('chat', maxsize=3, overflow='drop-newest') as inbox:
            send('chat', *range(6))
            await eventually(lambda: inbox.dropped == 3, 'three dropped messages')
            assert numbers(await take(inbox, 3)) == [0, 1, 2]
            assert len(inbox) == 0 and inbox.dropped == 3
            assert len(Channel.get_channels('chat')) == 1     # still subscribed
            send('chat', 6)
            assert numbers(await take(inbox, 1)) == [6]

    asyncio.run(main())


@pytest.mark.parametrize('overflow', ['drop-oldest', 'drop-newest'])
def test_the_first_drop_is_logged_as_a_warning_and_the_total_when_the_inbox_closes(
        caplog, overflow):
    async def main():
        async with channels.listen('chat', maxsize=2, overflow=overflow) as inbox:
            send('chat', *range(6))
            await eventually(lambda: inbox.dropped == 4, 'four dropped messages')
            full = [r for r in caplog.records if 'is full' in r.getMessage()]
            assert len(full) == 1
            assert full[0].levelno == logging.WARNING and full[0].name == 'channels.inbox'
            assert overflow in full[0].getMessage()
        closing = [r for r in caplog.records if 'closed;' in r.getMessage()]
        assert len(closing) == 1 and closing[0].levelno == logging.WARNING
        assert 'dropped 4' in closing[0].getMessage()

    with caplog.at_level(logging.WARNING, logger='channels.inbox'):
        asyncio.run(main())


@pytest.mark.parametrize('overflow, dropped', [('drop-oldest', 0), ('drop-newest', 2),
                                               ('error', 2)])
def test_the_drop_warning_names_the_message_that_was_dropped(caplog, overflow, dropped):
    # maxsize=2, messages 0, 1, 2: drop-oldest drops 0 (2 is queued), the others drop 2
    async def main():
        async with channels.listen('chat', maxsize=2, overflow=overflow) as inbox:
            sent = [Channel('chat').send({'n': n}) for n in range(3)]
            await eventually(lambda: inbox.dropped == 1, 'one dropped message')
            kept = [n for n in range(3) if n != dropped]
            assert numbers(await take(inbox, 2)) == kept
        return sent

    with caplog.at_level(logging.WARNING, logger='channels.inbox'):
        sent = asyncio.run(main())
    (full,) = [r.getMessage() for r in caplog.records if 'is full' in r.getMessage()]
    assert repr(sent[dropped]) in full
    for n in range(3):
        if n != dropped:
            assert repr(sent[n]) not in full, f'message {n} was not dropped'


def test_closing_an_inbox_explicitly_and_by_its_block_logs_the_total_once(caplog):
    async def main():
        async with channels.listen('chat', maxsize=1, overflow='drop-newest') as inbox:
            send('chat', 0, 1)
            await eventually(lambda: inbox.dropped == 1, 'one dropped message')
            inbox.close()               # close() is idempotent: the block closes it again

    with caplog.at_level(logging.WARNING, logger='channels.inbox'):
        asyncio.run(main())
    closing = [r for r in caplog.records if 'closed;' in r.getMessage()]
    assert len(closing) == 1, [r.getMessage() for r in closing]


def test_an_inbox_that_drops_nothing_logs_no_warning(caplog):
    async def main():
        async with channels.listen('chat', maxsize=3) as inbox:
            send('chat', 0, 1, 2)
            assert numbers(await take(inbox, 3)) == [0, 1, 2]
        assert inbox.dropped == 0

    with caplog.at_level(logging.WARNING, logger='channels.inbox'):
        asyncio.run(main())
    assert [r for r in caplog.records if r.name == 'channels.inbox'] == []


# -- bad arguments and misuse raise at the call ---------------------------------------------

def test_listen_without_a_topic_raises_type_error():
    with pytest.raises(TypeError, match='at least one topic'):
        channels.listen()


@pytest.mark.parametrize('maxsize', [0, -1, 1.5, '3', None, True])
def test_listen_with_a_bad_maxsize_raises_value_error(maxsize):
    with pytest.raises(ValueError, match='maxsize'):
        channels.listen('chat', maxsize=maxsize)


@pytest.mark.parametrize('overflow', ['drop', 'ERROR', '', None])
def test_listen_with_an_unknown_overflow_policy_raises_value_error(overflow):
    with pytest.raises(ValueError, match='overflow'):
        channels.listen('chat', overflow=overflow)


@pytest.mark.parametrize('topic, error', [('', ValueError), (None, TypeError),
                                          (42, TypeError), (b'chat', TypeError),
                                          ('\udcff', ValueError)])
def test_listen_with_a_bad_topic_raises(topic, error):
    with pytest.raises(error, match='topic'):
        channels.listen('chat', topic)


def test_bad_arguments_subscribe_nothing():
    with pytest.raises(ValueError):
        channels.listen('chat', maxsize=0)
    assert Channel.get_channels('chat') == []


def test_get_outside_the_async_with_block_raises_runtime_error():
    async def main():
        inbox = channels.listen('chat')
        with pytest.raises(RuntimeError, match='async with'):
            await asyncio.wait_for(inbox.get(), TIMEOUT)
        assert Channel.get_channels('chat') == []

    asyncio.run(main())


def test_entering_an_inbox_twice_raises_and_leaves_it_working():
    async def main():
        inbox = channels.listen('chat')
        async with inbox:
            with pytest.raises(RuntimeError, match='entered already'):
                async with inbox:
                    pass
            assert len(Channel.get_channels('chat')) == 1
            send('chat', 1)
            assert numbers(await take(inbox, 1)) == [1]
        with pytest.raises(RuntimeError, match='entered already'):
            async with inbox:
                pass
        assert Channel.get_channels('chat') == []

    asyncio.run(main())


# -- across processes --------------------------------------------------------------------

def test_an_inbox_receives_the_messages_of_another_process_once_and_in_order(broker):
    channels.configure(BROKER_ADDRESS=broker.address)
    count = 300

    async def main(sender):
        async with channels.listen('chat.rooms.*', maxsize=count + 10) as inbox:
            await asyncio.to_thread(broker.wait_subscribed, os.getpid(), ['chat.rooms.*'])
            await asyncio.to_thread(sender.send_many, 'chat.rooms.lona', count)
            received = await take(inbox, count, timeout=20)
            # one more message from the same sender: had any of the first ones come
            # twice, a duplicate would arrive before it
            await asyncio.to_thread(sender.send_many, 'chat.rooms.lona', 1, count)
            (last,) = await take(inbox, 1, timeout=20)
            assert len(inbox) == 0 and inbox.dropped == 0
        return received, last

    with app_processes(broker.address, 1) as (sender,):
        received, last = asyncio.run(main(sender))
    assert numbers(received) == list(range(count))
    assert {(m.topic, m.data['pid']) for m in received} == {('chat.rooms.lona', sender.pid)}
    assert last.data == {'n': count, 'pid': sender.pid}
    assert Channel.get_channels('chat.rooms.lona') == []


def test_two_tasks_awaiting_one_inbox_are_each_woken():
    async def main():
        async with channels.listen('room') as inbox:
            first = asyncio.ensure_future(inbox.get())
            second = asyncio.ensure_future(inbox.get())
            await asyncio.sleep(0)       # both are waiting now
            send('room', 0, 1)
            done = await asyncio.wait_for(asyncio.gather(first, second), TIMEOUT)
            return sorted(numbers(done))

    assert asyncio.run(main()) == [0, 1]


def test_close_from_another_thread_wakes_a_waiting_consumer():
    async def main():
        async with channels.listen('room') as inbox:
            waiting = asyncio.ensure_future(inbox.get())
            await asyncio.sleep(0)
            await asyncio.to_thread(inbox.close)
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(waiting, TIMEOUT)

    asyncio.run(main())


def test_a_message_that_expires_while_it_waits_in_the_inbox_is_dropped():
    from datetime import timedelta

    async def main():
        async with channels.listen('room') as inbox:
            Channel('room').send({'n': 0}, expiry=timedelta(milliseconds=50))
            Channel('room').send({'n': 1})
            await eventually(lambda: len(inbox) == 2, 'both messages in the inbox')
            await asyncio.sleep(0.1)           # n=0 expires while it waits
            return numbers(await take(inbox, 1))

    assert asyncio.run(main()) == [1]
