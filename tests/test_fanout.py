"""Many consumers of one topic in one process: the inboxes (and coroutine channels) of one
event loop are delivered together, and every guarantee holds for each of them."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
from support import numbers, send, take, wait_until

import channels
from channels import Channel, handlers
from channels import inbox as inbox_module

TIMEOUT = 10.0


async def enter_all(inboxes: list[channels.Inbox]) -> None:
    for inbox in inboxes:
        await inbox.__aenter__()


def test_every_inbox_of_many_on_one_loop_gets_every_message_once_in_order():
    async def main():
        inboxes = [channels.listen('room', maxsize=500) for _ in range(300)]
        await enter_all(inboxes)
        assert len(Channel.get_channels('room')) == 1      # one channel for all of them
        send('room', *range(200))
        received = [await take(inbox, 200) for inbox in inboxes]
        assert all(len(inbox) == 0 for inbox in inboxes)
        for inbox in inboxes:
            inbox.close()
        return received

    received = asyncio.run(main())
    assert all(numbers(got) == list(range(200)) for got in received)
    # each consumer has a copy of its own
    assert len({id(got[0]) for got in received}) == 300
    assert len({id(got[0].data) for got in received}) == 300
    assert Channel.get_channels('room') == []


def test_many_coroutine_channels_on_one_loop_each_get_every_message_in_order_one_call_at_a_time():
    got: dict[int, list[int]] = {n: [] for n in range(200)}
    running = {n: 0 for n in range(200)}
    overlapped = []

    def handler_of(n: int):
        async def handler(message):
            running[n] += 1
            if running[n] > 1:
                overlapped.append(n)
            await asyncio.sleep(0)            # other channels' calls interleave here
            got[n].append(message.data['n'])
            running[n] -= 1
        return handler

    async def main():
        kept = [Channel('room', handler_of(n)) for n in range(200)]
        send('room', *range(100))
        while any(len(ns) < 100 for ns in got.values()):
            await asyncio.sleep(0.005)
        return kept

    asyncio.run(main())
    assert all(ns == list(range(100)) for ns in got.values())
    assert overlapped == []


def loops_in_threads(count: int):
    loops = [asyncio.new_event_loop() for _ in range(count)]
    threads = [threading.Thread(target=loop.run_forever, name=f'test-loop-{n}')
               for n, loop in enumerate(loops)]
    for thread in threads:
        thread.start()
    return loops, threads


def stop_loops(loops, threads) -> None:
    for loop in loops:
        loop.call_soon_threadsafe(loop.stop)
    for thread in threads:
        thread.join(TIMEOUT)
    for loop in loops:
        loop.close()


def test_inboxes_on_several_loops_in_threads_each_get_every_message_in_order():
    loops, threads = loops_in_threads(3)
    try:
        async def consume_all(count: int) -> list[list[int]]:
            inboxes = [channels.listen('room', maxsize=500) for _ in range(50)]
            await enter_all(inboxes)
            entered.release()
            received = [numbers(await take(inbox, count)) for inbox in inboxes]
            for inbox in inboxes:
                inbox.close()
            return received

        entered = threading.Semaphore(0)
        futures = [asyncio.run_coroutine_threadsafe(consume_all(300), loop) for loop in loops]

        async def here() -> list[list[int]]:
            result = consume_all(300)
            task = asyncio.ensure_future(result)
            for _ in range(len(loops) + 1):
                assert await asyncio.to_thread(entered.acquire, timeout=TIMEOUT)
            assert len(Channel.get_channels('room')) == len(loops) + 1   # one per loop
            # senders on two threads: each sender's messages arrive in its order
            await asyncio.gather(asyncio.to_thread(send, 'room', *range(0, 300, 2)),
                                 asyncio.to_thread(send, 'room', *range(1, 300, 2)))
            return await task

        received = asyncio.run(here())
        received += [n for future in futures for n in future.result(TIMEOUT)]
    finally:
        stop_loops(loops, threads)
    assert len(received) == 200
    for got in received:
        assert sorted(got) == list(range(300))
        assert [n for n in got if n % 2 == 0] == list(range(0, 300, 2))
        assert [n for n in got if n % 2] == list(range(1, 300, 2))
    assert Channel.get_channels('room') == []


def test_an_inbox_closed_while_a_batch_is_delivered_ends_and_the_others_get_it_all(monkeypatch):
    monkeypatch.setattr(handlers, 'DISPATCH_BUDGET', 40)    # the batch takes many callbacks

    async def main():
        inboxes = [channels.listen('room', maxsize=100) for _ in range(20)]
        await enter_all(inboxes)
        leaver, others = inboxes[0], inboxes[1:]
        kept = []

        async def leave_after_five():
            async for message in leaver:
                kept.append(message.data['n'])
                if len(kept) == 5:
                    leaver.close()          # the rest of the batch is on its way

        task = asyncio.ensure_future(leave_after_five())
        await asyncio.sleep(0)
        dispatcher = handlers.dispatcher_of(asyncio.get_running_loop())
        send('room', *range(50))
        # hold the loop until the whole batch waits for it
        wait_until(lambda: dispatcher.backlog() == 50, TIMEOUT, what='the batch')
        await asyncio.wait_for(task, TIMEOUT)
        received = [numbers(await take(inbox, 50)) for inbox in others]
        assert not any(len(inbox) for inbox in others)
        assert len(Channel.get_channels('room')) == 1       # the others are subscribed
        for inbox in others:
            inbox.close()
        return kept, received

    kept, received = asyncio.run(main())
    assert 5 <= len(kept) < 50 and kept == list(range(len(kept)))
    assert all(got == list(range(50)) for got in received)


def test_a_loop_closed_with_a_batch_pending_drops_it_and_unsubscribes_its_inboxes():
    loop = asyncio.new_event_loop()
    inboxes = [channels.listen('room') for _ in range(10)]
    loop.run_until_complete(enter_all(inboxes))     # entered; the loop stops running
    dispatcher = handlers.dispatcher_of(loop)
    send('room', *range(5))
    wait_until(lambda: dispatcher.backlog() == 5, TIMEOUT, what='the batch')
    loop.close()                                     # with the batch waiting for it
    assert channels.shutdown(timeout=TIMEOUT) is True   # nothing waits for that loop
    assert all(inbox.closed for inbox in inboxes)
    assert Channel.get_channels('room') == []
    assert dispatcher.backlog() == 0


def test_a_message_to_a_loop_that_closed_unsubscribes_every_inbox_of_that_loop():
    loop = asyncio.new_event_loop()
    inboxes = [channels.listen(topic) for topic in ('room', 'room', 'news')]
    loop.run_until_complete(enter_all(inboxes))
    loop.close()
    send('room', 1)
    wait_until(lambda: all(inbox.closed for inbox in inboxes), TIMEOUT,
               what='the inboxes to close')
    assert Channel.get_channels('room') == [] and Channel.get_channels('news') == []


def test_shutdown_waits_until_a_batch_for_another_loop_is_in_its_inboxes():
    loops, threads = loops_in_threads(1)
    (loop,) = loops
    try:
        inboxes = [channels.listen('room', maxsize=100) for _ in range(10)]
        asyncio.run_coroutine_threadsafe(enter_all(inboxes), loop).result(TIMEOUT)
        held = threading.Event()
        loop.call_soon_threadsafe(lambda: held.wait(TIMEOUT))   # the loop is busy
        send('room', *range(40))
        threading.Timer(0.3, held.set).start()
        assert channels.shutdown(timeout=TIMEOUT) is True
        assert [len(inbox) for inbox in inboxes] == [40] * 10
    finally:
        held.set()
        for inbox in inboxes:
            inbox.close()
        stop_loops(loops, threads)


def test_an_overflowing_inbox_among_many_leaves_the_others_whole():
    async def main():
        small = channels.listen('room', maxsize=3)
        oldest = channels.listen('room', maxsize=3, overflow='drop-oldest')
        others = [channels.listen('room', maxsize=100) for _ in range(100)]
        await enter_all([*others[:50], small, oldest, *others[50:]])
        send('room', *range(20))
        received = [numbers(await take(inbox, 20)) for inbox in others]
        assert small.closed and not oldest.closed
        assert numbers(await take(small, 3)) == [0, 1, 2]
        with pytest.raises(channels.InboxOverflowError) as caught:
            await asyncio.wait_for(small.get(), TIMEOUT)
        assert numbers(await take(oldest, 3)) == [17, 18, 19] and oldest.dropped == 17
        assert len(Channel.get_channels('room')) == 1
        for inbox in [oldest, *others]:
            inbox.close()
        return received, caught.value.dropped

    received, dropped = asyncio.run(main())
    assert all(got == list(range(20)) for got in received)
    assert dropped == 1         # it left its group at the first message it could not take
    assert Channel.get_channels('room') == []


def test_overlapping_topics_come_once_per_matching_topic_of_each_inbox():
    async def main():
        both = channels.listen('chat.*', 'chat.lobby')
        exact = channels.listen('chat.lobby')
        wild = channels.listen('chat.*')
        await enter_all([both, exact, wild])
        assert len(Channel.get_channels('chat.lobby')) == 2   # a group per topic
        send('chat.lobby', 1)
        send('chat.other', 2)
        got = [numbers(await take(both, 3)), numbers(await take(exact, 1)),
               numbers(await take(wild, 2))]
        assert [len(both), len(exact), len(wild)] == [0, 0, 0]
        for inbox in (both, exact, wild):
            inbox.close()
        return got

    both, exact, wild = asyncio.run(main())
    assert sorted(both) == [1, 1, 2] and exact == [1] and wild == [1, 2]


def test_closing_the_last_inbox_of_a_group_unsubscribes_at_the_broker(broker):
    channels.configure(BROKER_ADDRESS=broker.address)

    def topics() -> list[str]:
        line = broker.process_stats(os.getpid())
        return [] if line is None else line['subscriptions']

    async def main():
        inboxes = [channels.listen('room') for _ in range(3)]
        await enter_all(inboxes)
        assert topics().count('room') == 1      # entered: the broker applied the one SUB
        for inbox in inboxes[:2]:
            inbox.close()
        assert await channels.flush_async(TIMEOUT)
        assert topics().count('room') == 1      # one inbox is left
        inboxes[2].close()
        assert await channels.flush_async(TIMEOUT)
        assert 'room' not in topics()

    asyncio.run(main())


def test_each_inbox_of_a_group_sends_its_own_subscribe_and_unsubscribe_events():
    events = []
    Channel('lona.channels.*', lambda message: events.append((message.topic,
                                                               message.data['topic'])))

    async def main():
        inboxes = [channels.listen('room') for _ in range(3)]
        await enter_all(inboxes)
        for inbox in inboxes:
            inbox.close()
        assert await channels.flush_async(TIMEOUT)

    asyncio.run(main())
    wait_until(lambda: len(events) >= 7, TIMEOUT, what='the events')
    assert events[1:] == [('lona.channels.subscribe', 'room')] * 3 \
        + [('lona.channels.unsubscribe', 'room')] * 3


def test_get_channels_lists_each_coroutine_channel_of_a_loop_and_a_custom_broker_reaches_each():
    channels.configure(CHANNEL_MESSAGE_BROKER_CLASS=ChannelByChannelBroker)
    got: dict[int, list[int]] = {n: [] for n in range(5)}

    def handler_of(n: int):
        async def handler(message):
            got[n].append(message.data['n'])
        return handler

    async def main():
        subscribed = [Channel('room', handler_of(n)) for n in range(5)]
        assert Channel.get_channels('room') == subscribed    # each one, in order
        send('room', *range(50))
        while any(len(ns) < 50 for ns in got.values()):
            await asyncio.sleep(0.005)
        subscribed[0].unsubscribe()
        assert Channel.get_channels('room') == subscribed[1:]

    asyncio.run(main())
    assert all(ns == list(range(50)) for ns in got.values())


class ChannelByChannelBroker(channels.MessageBroker):
    """A user's broker as the spec writes it: every channel that get_channels lists."""

    def run(self):
        message = self.get_message()
        for channel in Channel.get_channels(topic=message.topic):
            self.schedule_task(channel=channel, message=message)


def test_a_forked_child_drops_what_reaches_an_inherited_inbox_and_listens_on_its_own():
    import multiprocessing

    def child(conn):
        Channel('room').send({'n': 1})          # reaches the inherited group: dropped
        assert channels.flush(TIMEOUT)          # routed before the child listens

        async def listen_here():
            async with channels.listen('room') as inbox:
                send('room', 2)
                return numbers(await take(inbox, 1))
        conn.send((asyncio.run(listen_here()), channels.shutdown(TIMEOUT)))

    async def main():
        async with channels.listen('room') as inbox:
            process = multiprocessing.get_context('fork').Process(target=child,
                                                                  args=(child_conn,))
            process.start()
            try:
                assert await asyncio.to_thread(parent_conn.poll, TIMEOUT)
                result = parent_conn.recv()
            finally:
                await asyncio.to_thread(process.join, TIMEOUT)
            assert len(inbox) == 0                # the child's messages stayed there
        return result, process.exitcode

    parent_conn, child_conn = multiprocessing.Pipe()
    assert asyncio.run(main()) == (([2], True), 0)


def test_a_coroutine_channel_subscribed_again_gets_nothing_routed_to_its_earlier_subscription():
    got: dict[str, list[int]] = {'again': [], 'other': []}

    def recorder(name: str):
        async def handler(message):
            got[name].append(message.data['n'])
        return handler

    async def main():
        Channel('room', recorder('other'))          # keeps the loop's group on the topic
        channel = Channel('room', recorder('again'))
        group = channel._subscription[0].group
        send('room', 1)
        # hold the loop until the message waits in the group for both channels
        wait_until(lambda: len(group._queue) == 1, TIMEOUT, what='the message')
        channel.unsubscribe()
        channel.subscribe(recorder('again'))
        send('room', 2)
        while len(got['other']) < 2 or not got['again']:
            await asyncio.sleep(0.002)

    asyncio.run(main())
    assert got == {'again': [2], 'other': [1, 2]}


def test_a_forked_child_counts_lost_what_reaches_an_inherited_coroutine_channel_whose_batch_was_pending_at_the_fork():
    import multiprocessing
    import time

    async def handler(message):
        pass

    def child(conn):
        runner = channel._subscription[0]
        Channel('room').send({'n': 2})          # reaches the inherited group: lost here
        assert channels.flush(TIMEOUT)
        try:
            wait_until(lambda: runner.lost == 1, TIMEOUT, what='the message counted lost')
        except AssertionError as error:
            conn.send(str(error))
            return
        started = time.monotonic()
        stopped = channels.shutdown(TIMEOUT)
        conn.send((runner.lost, stopped, time.monotonic() - started < TIMEOUT / 2))

    async def main():
        nonlocal channel
        channel = Channel('room', handler)
        group = channel._subscription[0].group
        send('room', 1)
        # hold the loop, so that the message waits in the group at the fork
        wait_until(lambda: len(group._queue) == 1, TIMEOUT, what='the message')
        process = multiprocessing.get_context('fork').Process(target=child,
                                                              args=(child_conn,))
        process.start()
        try:
            assert await asyncio.to_thread(parent_conn.poll, 3 * TIMEOUT)
            result = parent_conn.recv()
        finally:
            await asyncio.to_thread(process.join, TIMEOUT)
        channel.unsubscribe()
        return result, process.exitcode

    channel = None
    parent_conn, child_conn = multiprocessing.Pipe()
    assert asyncio.run(main()) == ((1, True, True), 0)


def test_an_inbox_that_joins_its_group_gets_nothing_routed_before_it_subscribed():
    async def main():
        first = channels.listen('room')
        await first.__aenter__()
        dispatcher = handlers.dispatcher_of(asyncio.get_running_loop())
        send('room', 1)
        # hold the loop until the message waits in the dispatcher for the group
        wait_until(lambda: dispatcher.backlog() == 1, TIMEOUT, what='the message')
        second = channels.listen('room')
        await second.__aenter__()       # no broker: entered without yielding to the loop
        send('room', 2)
        got = numbers(await take(first, 2)), numbers(await take(second, 1))
        left = len(second)
        for inbox in (first, second):
            inbox.close()
        return got, left

    (first, second), left = asyncio.run(main())
    assert first == [1, 2]
    assert (second, left) == ([2], 0)


def test_what_waits_for_an_inbox_whose_loop_does_not_run_is_bounded_by_its_maxsize():
    loop = asyncio.new_event_loop()
    try:
        inbox = channels.listen('room', maxsize=10)
        loop.run_until_complete(inbox.__aenter__())      # entered; the loop stops running
        dispatcher = handlers.dispatcher_of(loop)
        send('room', *range(1000))
        assert channels.flush(TIMEOUT)                   # all of it routed
        group, = inbox._groups
        # at most twice maxsize (and a little) wait in the dispatcher with the group's
        # marker, the newest maxsize are held back by the group, the rest are counted
        assert dispatcher.backlog() <= 2 * inbox.maxsize + inbox_module.HOLD_SLACK + 1
        assert len(group._held) <= inbox.maxsize
    finally:
        inbox.close()
        loop.close()


async def _drain(inbox: channels.Inbox) -> tuple[list[int], str]:
    """What *inbox* hands out until it raises or waits; and how it ended."""
    got = []
    while True:
        try:
            message = await asyncio.wait_for(inbox.get(), 0.5)
        except channels.InboxOverflowError:
            return got, 'overflow'
        except TimeoutError:
            return got, 'waiting'
        got.append(message.data['n'])


@pytest.mark.parametrize('overflow, kept, end, dropped', [
    ('error', range(10), 'overflow', 1),        # unsubscribed at the first one it missed
    ('drop-newest', range(10), 'waiting', 990),
    ('drop-oldest', range(990, 1000), 'waiting', 990),
])
def test_an_inbox_whose_loop_stalled_ends_as_its_overflow_policy_says_counting_every_drop(
        overflow, kept, end, dropped):
    loop = asyncio.new_event_loop()
    inbox = channels.listen('room', maxsize=10, overflow=overflow)
    try:
        loop.run_until_complete(inbox.__aenter__())      # entered; the loop stops running
        send('room', *range(1000))
        assert channels.flush(TIMEOUT)                   # all of it routed
        assert loop.run_until_complete(_drain(inbox)) == (list(kept), end)
        assert inbox.dropped == dropped
    finally:
        inbox.close()
        loop.close()


def test_inboxes_of_a_stalled_loop_each_keep_their_own_maxsize_and_policy():
    loop = asyncio.new_event_loop()
    small = channels.listen('room', maxsize=5, overflow='drop-oldest')
    large = channels.listen('room', maxsize=50, overflow='drop-newest')
    try:
        for inbox in (small, large):
            loop.run_until_complete(inbox.__aenter__())
        send('room', *range(200))
        assert channels.flush(TIMEOUT)
        assert loop.run_until_complete(_drain(small)) == (list(range(195, 200)), 'waiting')
        assert loop.run_until_complete(_drain(large)) == (list(range(50)), 'waiting')
        assert (small.dropped, large.dropped) == (195, 150)
    finally:
        small.close()
        large.close()
        loop.close()


def test_an_inbox_that_fell_behind_and_caught_up_gets_every_later_message():
    loop = asyncio.new_event_loop()
    inbox = channels.listen('room', maxsize=10, overflow='drop-oldest')
    try:
        loop.run_until_complete(inbox.__aenter__())
        send('room', *range(100))
        assert channels.flush(TIMEOUT)
        assert loop.run_until_complete(_drain(inbox)) == (list(range(90, 100)), 'waiting')
        send('room', *range(100, 105))                  # the loop runs now: none held
        assert channels.flush(TIMEOUT)
        assert loop.run_until_complete(_drain(inbox)) == (list(range(100, 105)), 'waiting')
        assert inbox.dropped == 90
    finally:
        inbox.close()
        loop.close()
