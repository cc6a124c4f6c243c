"""Coroutine handlers: they run on their event loop, in order, one call at a time."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
from brokers import app_processes
from support import wait_until

import channels
from channels import Channel

TIMEOUT = 10.0


@contextmanager
def loop_in_a_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in its own thread; stopped, joined and closed at the end."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name='test-loop')
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()
        assert not thread.is_alive()


async def until(predicate, what: str, timeout: float = TIMEOUT) -> None:
    """Await until *predicate()* is true, on the running loop; fail after *timeout*."""
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.002)
    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f'timed out after {timeout}s waiting for {what}') from None


def test_a_coroutine_handler_runs_on_the_loop_that_subscribed_it():
    calls = []

    async def handler(message):
        calls.append((asyncio.get_running_loop(), threading.get_ident(), message.data))

    async def main():
        Channel('room', handler)
        Channel('room').send({'n': 1})
        await until(lambda: calls, 'the handler call')
        return asyncio.get_running_loop()

    loop = asyncio.run(main())
    assert calls == [(loop, threading.get_ident(), {'n': 1})]


def test_a_coroutine_handler_runs_on_the_loop_it_is_given():
    calls = []

    async def handler(message):
        calls.append((asyncio.get_running_loop(), threading.current_thread().name))

    with loop_in_a_thread() as loop:
        Channel('room', handler, loop=loop)      # no loop runs in this thread
        Channel('room').send()
        wait_until(lambda: calls, TIMEOUT, what='the handler call')
    assert calls == [(loop, 'test-loop')]


def test_a_coroutine_handler_finishes_each_message_before_the_next_starts():
    channels.configure(MAX_CHANNEL_TASK_WORKER_THREADS=8)
    seen, running, overlaps = [], [0], [0]

    async def handler(message):
        running[0] += 1
        overlaps[0] += running[0] > 1
        for _ in range(3):
            await asyncio.sleep(0)       # let anything else that wants to run, run
        seen.append(message.data['n'])
        running[0] -= 1

    async def main():
        Channel('room.*', handler)
        for n in range(500):
            Channel(f'room.{n % 3}').send({'n': n})
        await until(lambda: len(seen) >= 500, '500 calls')

    asyncio.run(main())
    assert seen == list(range(500)) and overlaps == [0]


def test_coroutine_handlers_of_different_channels_run_at_the_same_time():
    # each handler waits for the other: run one after the other, they would never finish
    async def main():
        first_in, second_in, done = asyncio.Event(), asyncio.Event(), []

        async def first(message):
            first_in.set()
            await second_in.wait()
            done.append('first')

        async def second(message):
            second_in.set()
            await first_in.wait()
            done.append('second')

        Channel('a', first)
        Channel('b', second)
        Channel('a').send()
        Channel('b').send()
        await until(lambda: len(done) == 2, 'both handlers to finish')

    asyncio.run(main())


def test_every_matching_coroutine_channel_gets_each_message_exactly_once():
    received = {'exact': [], 'wildcard': [], 'all': []}

    def recorder(name):
        async def handler(message):
            received[name].append(message.data['n'])
        return handler

    with loop_in_a_thread() as loop:
        Channel('chat.rooms.lona', recorder('exact'), loop=loop)
        Channel('chat.rooms.*', recorder('wildcard'), loop=loop)
        Channel('chat.*', recorder('all'), loop=loop)
        Channel('other', recorder('all'), loop=loop)
        for n in range(200):
            Channel('chat.rooms.lona').send({'n': n})
        assert channels.shutdown(timeout=TIMEOUT)   # everything sent is handled by now
    assert received == {name: list(range(200)) for name in received}


def test_no_coroutine_call_starts_after_unsubscribe_returns():
    started, unsubscribed = [], threading.Event()
    late = []

    async def handler(message):
        if unsubscribed.is_set():
            late.append(message.data['n'])
        started.append(message.data['n'])
        await asyncio.sleep(0.001)

    with loop_in_a_thread() as loop:
        channel = Channel('room', handler, loop=loop)
        for n in range(300):
            Channel('room').send({'n': n})
        wait_until(lambda: started, TIMEOUT, what='the first call')
        channel.unsubscribe()
        unsubscribed.set()
        assert channels.shutdown(timeout=TIMEOUT)      # waits for the loop to settle
    assert late == [] and len(started) < 300


def test_shutdown_waits_for_coroutine_handlers_on_another_loop():
    handled = []

    async def handler(message):
        await asyncio.sleep(0.005)
        handled.append(message.data['n'])

    with loop_in_a_thread() as loop:
        Channel('room', handler, loop=loop)
        for n in range(40):
            Channel('room').send({'n': n})
        assert channels.shutdown(timeout=TIMEOUT) is True
        assert handled == list(range(40))


def test_a_coroutine_handler_never_gets_a_message_that_expired_while_it_was_busy():
    handled = []

    async def main():
        release = asyncio.Event()

        async def handler(message):
            handled.append(message.data['n'])
            if message.data['n'] == 0:
                await release.wait()

        Channel('room', handler)
        Channel('room').send({'n': 0})
        await until(lambda: handled == [0], 'the first call')
        Channel('room').send({'n': 1}, expiry=timedelta(milliseconds=20))
        Channel('room').send({'n': 2})
        await asyncio.sleep(0.1)        # n=1 expires while the handler still runs n=0
        release.set()
        await until(lambda: 2 in handled, 'the message after the expired one')

    asyncio.run(main())
    assert handled == [0, 2]


def test_send_is_safe_and_never_blocks_inside_a_coroutine_handler():
    # a handler that sends to its own channel: a send that blocked or waited for the
    # handler would stall the chain
    hops = []

    async def main():
        async def handler(message):
            hops.append(message.data['hop'])
            if message.data['hop'] < 100:
                Channel('relay').send({'hop': message.data['hop'] + 1})

        Channel('relay', handler)
        Channel('relay').send({'hop': 0})
        await until(lambda: len(hops) == 101, '101 hops')

    asyncio.run(main())
    assert hops == list(range(101))


def test_subscribing_a_coroutine_handler_with_no_running_loop_raises():
    async def handler(message):
        pass

    with pytest.raises(RuntimeError, match='event loop.*loop='):
        Channel('room', handler)
    assert Channel.get_channels('room') == []


def test_loop_is_refused_for_a_plain_handler():
    with loop_in_a_thread() as loop:
        with pytest.raises(TypeError, match='loop= is for coroutine handlers'):
            Channel('room', lambda message: None, loop=loop)
    assert Channel.get_channels('room') == []


def test_loop_must_be_an_event_loop():
    async def handler(message):
        pass

    with pytest.raises(TypeError, match='loop must be an asyncio event loop'):
        Channel('room', handler, loop='main')


@pytest.mark.parametrize('error', [ValueError('boom'), asyncio.CancelledError('boom')],
                         ids=['ValueError', 'its-own-CancelledError'])
def test_an_exception_in_a_coroutine_handler_is_logged_and_the_channel_goes_on(
        caplog, error):
    # a CancelledError a handler raises itself (awaiting a cancelled future, say) is an
    # error like any other: the task that runs the handlers was not cancelled
    handled = []

    async def handler(message):
        if message.data['n'] == 0:
            raise error
        handled.append(message.data['n'])

    async def main():
        Channel('room', handler)
        Channel('room').send({'n': 0})
        Channel('room').send({'n': 1})
        await until(lambda: handled, 'the next message')

    with caplog.at_level(logging.ERROR, logger='channels.handlers'):
        asyncio.run(main())
    assert handled == [1]
    [record] = [r for r in caplog.records if r.name == 'channels.handlers']
    assert type(error).__name__ in record.exc_text and 'boom' in record.exc_text
    assert 'on its event loop' in record.getMessage()


def test_messages_for_a_closed_loop_are_counted_as_lost_and_logged(caplog):
    async def handler(message):
        pass

    with loop_in_a_thread() as loop:
        channel = Channel('room', handler, loop=loop)
    runner = channel._subscription[0]
    with caplog.at_level(logging.WARNING, logger='channels.handlers'):
        Channel('room').send({'n': 1})
        wait_until(lambda: runner.lost == 1, TIMEOUT, what='the message to count as lost')
    assert any('event loop is closed' in r.getMessage() for r in caplog.records)
    channel.unsubscribe()


def test_a_coroutine_handler_receives_messages_from_other_processes_in_order(broker):
    channels.configure(BROKER_ADDRESS=broker.address)
    received = []

    async def handler(message):
        await asyncio.sleep(0)
        received.append((message.data['pid'], message.data['n']))

    async def main():
        Channel('chat.*', handler)
        broker.wait_subscribed(os.getpid(), ['chat.*'])
        with app_processes(broker.address, 2) as apps:
            for app in apps:
                app.send_many('chat.room', 300)
            await until(lambda: len(received) >= 600, '600 messages', timeout=30)
            return [app.pid for app in apps]

    pids = asyncio.run(main())
    for pid in pids:
        assert [n for sender, n in received if sender == pid] == list(range(300))
    assert len(received) == 600



def test_a_forked_child_counts_messages_for_inherited_coroutine_handlers_as_lost():
    # the child has no running loop of its parent: the handler cannot run there, and
    # nothing piles up unseen on a loop that never runs
    import multiprocessing

    async def handler(message):
        pass

    def child(conn):
        channel = Channel.get_channels('room')[0]
        Channel('room').send({'n': 1})
        runner = channel._subscription[0]
        wait_until(lambda: runner.lost == 1, TIMEOUT, what='the loss to be counted')
        conn.send(runner.lost)
        channels.shutdown()

    with loop_in_a_thread() as loop:
        Channel('room', handler, loop=loop)
        parent_conn, child_conn = multiprocessing.Pipe()
        process = multiprocessing.get_context('fork').Process(target=child,
                                                              args=(child_conn,))
        process.start()
        try:
            assert parent_conn.poll(TIMEOUT) and parent_conn.recv() == 1
        finally:
            process.join(TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join()
    assert process.exitcode == 0


def test_a_drain_cancelled_before_its_first_step_loses_its_messages_loudly_and_recovers(
        caplog):
    # asyncio.run's final cancellation, or a "cancel every other task" hook, may cancel
    # the task that runs a handler before it ever ran
    handled = []

    async def handler(message):
        handled.append(message.data['n'])

    async def main():
        channel = Channel('room', handler)
        runner = channel._subscription[0]
        Channel('room').send({'n': 0})
        # block the loop until the task thread has asked it to start the drain task
        wait_until(lambda: runner._draining, TIMEOUT, what='the drain to be requested')
        await asyncio.sleep(0)             # the drain task is created, not yet run
        for task in asyncio.all_tasks():
            if task.get_name().startswith('channels handler'):
                task.cancel()
        await until(lambda: runner.idle, 'the runner to give up')
        Channel('room').send({'n': 1})
        await until(lambda: handled, 'the next message')
        return runner

    with caplog.at_level(logging.WARNING, logger='channels.handlers'):
        runner = asyncio.run(main())
    assert handled == [1] and runner.lost == 1
    assert any('cancelled' in r.getMessage() for r in caplog.records)


def test_a_channel_whose_loop_closed_is_unsubscribed_with_one_warning(caplog):
    async def handler(message):
        pass

    with loop_in_a_thread() as loop:
        channel = Channel('room', handler, loop=loop)
    with caplog.at_level(logging.WARNING, logger='channels.handlers'):
        Channel('room').send({'n': 1})
        wait_until(lambda: channel.handler is None, TIMEOUT, what='the unsubscription')
    assert Channel.get_channels('room') == []
    assert sum('is closed' in r.getMessage() and 'unsubscribing' in r.getMessage()
               for r in caplog.records) == 1


def test_a_channel_subscribed_again_waits_for_the_last_call_of_its_previous_subscription():
    running, most, finished = [0], [0], []

    async def handler(message):
        running[0] += 1
        most[0] = max(most[0], running[0])
        await asyncio.sleep(0.05)
        running[0] -= 1
        finished.append(message.data['n'])

    async def main():
        channel = Channel('room', handler)
        Channel('room').send({'n': 0})
        await until(lambda: running[0] == 1, 'the first call to start')
        channel.unsubscribe()             # the first call goes on running
        channel.subscribe(handler)
        Channel('room').send({'n': 1})
        await until(lambda: len(finished) == 2, 'both calls to finish')

    asyncio.run(main())
    assert finished == [0, 1] and most == [1]


def test_a_coroutine_handler_wrapped_by_a_decorator_runs_on_the_loop():
    calls = []

    def logged(function):
        @functools.wraps(function)
        def wrapper(message):
            return function(message)
        return wrapper

    @logged
    async def handler(message):
        calls.append(threading.current_thread() is threading.main_thread())

    async def main():
        Channel('room', handler)
        Channel('room').send()
        await until(lambda: calls, 'the call')

    asyncio.run(main())
    assert calls == [True]


def test_a_plain_handler_that_returns_a_coroutine_is_logged_as_an_error(caplog):
    async def work(message):
        pass

    with caplog.at_level(logging.ERROR, logger='channels.handlers'):
        Channel('room', lambda message: work(message))
        Channel('room').send()
        wait_until(lambda: any('never awaited' in r.getMessage() for r in caplog.records),
                   TIMEOUT, what='the error')


def test_an_async_on_error_is_refused():
    async def on_error(error, message):
        pass

    with pytest.raises(TypeError, match='on_error must be a plain function'):
        Channel('room', lambda message: None, on_error=on_error)
    with pytest.raises(TypeError, match='on_error must be a plain function'):
        channels.Scope(on_error=on_error)


def test_shutdown_on_the_loop_of_pending_coroutine_handlers_says_it_did_not_finish(caplog):
    handled = []

    async def handler(message):
        handled.append(message.data['n'])

    async def main():
        channel = Channel('room', handler)
        runner = channel._subscription[0]
        Channel('room').send({'n': 0})
        wait_until(lambda: runner._draining, TIMEOUT, what='the message to reach the loop')
        with caplog.at_level(logging.WARNING, logger='channels.runtime'):
            finished = channels.shutdown(timeout=1)     # this loop cannot run meanwhile
        await until(lambda: handled, 'the call, once the loop runs again')
        return finished

    assert asyncio.run(main()) is False
    assert handled == [0]
    assert any('not running or is the one calling shutdown' in r.getMessage()
               for r in caplog.records)
