"""``channels.flush()`` and ``listen()``: a subscription is in force once they return.

The reproduction of the race (issue 10, A1) runs two real processes against a real
broker: in each round the receiver subscribes, fences (``flush()``, or by entering
``listen()``), and tells the sender directly, over a pipe, to send; the message must
arrive, in every one of 300 rounds (see ``fence_agents``). Without the fence, the
sender's message reaches the broker before the receiver's SUB now and then, and the
broker routes it to nobody.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from brokers import BrokerProcess, stop_process
from support import Recorder, wait_until

import channels
from channels import Channel

ROUNDS = 300


@contextmanager
def race(address: str, mode: str, rounds: int, **settings) -> Iterator[object]:
    """The receiver and sender processes of the race; yields the receiver's result pipe.
    Both are always stopped."""
    from fence_agents import run_receiver, run_sender
    context = multiprocessing.get_context('spawn')
    settings = {'BROKER_ADDRESS': address, **settings}
    to_sender, sender_end = context.Pipe()
    results, receiver_end = context.Pipe()
    sender = context.Process(target=run_sender, args=(sender_end, settings), daemon=True)
    receiver = context.Process(target=run_receiver, daemon=True,
                               args=(to_sender, receiver_end, settings, mode, rounds))
    try:
        sender.start()
        receiver.start()
        sender_end.close()
        receiver_end.close()
        yield results
    finally:
        for process in (receiver, sender):
            process.join(15)
            stop_process(process)
        for conn in (to_sender, results):
            conn.close()


def play(address: str, mode: str, rounds: int = ROUNDS, **settings) -> list[int]:
    """The rounds the receiver missed (it stops after a few)."""
    with race(address, mode, rounds, **settings) as results:
        assert results.poll(240), f'the receiver did not finish {rounds} rounds in 240s'
        status, value = results.recv()
    assert status == 'ok', value
    return value


@pytest.fixture(params=[1, 2], ids=['1-broker-thread', '2-broker-threads'])
def routing_broker(request, broker_address):
    """A real broker with one routing thread (and its shortcuts) or two."""
    process = BrokerProcess(broker_address, '--broker-threads', str(request.param))
    try:
        yield process.start(), request.param
    finally:
        process.stop()


# -- the race ----------------------------------------------------------------------------

def test_a_subscription_is_in_force_for_every_process_once_flush_returns(routing_broker):
    broker, threads = routing_broker
    missed = play(broker.address, 'flush', MAX_CHANNEL_MESSAGE_BROKER_THREADS=threads)
    assert missed == [], f'rounds whose message missed the receiver: {missed}'


def test_listen_enters_only_once_the_broker_applied_the_subscription(routing_broker):
    broker, threads = routing_broker
    missed = play(broker.address, 'listen', MAX_CHANNEL_MESSAGE_BROKER_THREADS=threads)
    assert missed == [], f'rounds whose message missed the inbox: {missed}'


# -- what flush() waits for, and when it gives up -----------------------------------------

def test_flush_without_a_broker_returns_true_once_earlier_local_messages_are_routed():
    channels.configure(MAX_CHANNEL_MESSAGE_BROKER_THREADS=2)
    received = Recorder()
    Channel('chat', received)
    for n in range(2000):
        Channel('chat').send({'n': n})
    assert channels.flush(5) is True
    machinery = channels.runtime.runtime.machinery
    assert sum(broker.routed for broker in machinery.brokers) >= machinery.submitted


def test_flush_in_a_process_that_never_used_channels_returns_true_without_starting_it():
    assert channels.flush(0) is True
    assert not channels.is_running()


def test_flush_gives_up_after_its_timeout_when_no_broker_answers(broker_address, caplog):
    channels.configure(BROKER_ADDRESS=broker_address)         # nobody listens there
    Channel('chat', Recorder())
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger='channels'):
        assert channels.flush(0.3) is False
    assert 0.3 <= time.monotonic() - started < 3
    assert any('channels.flush(): not connected to the broker' in r.getMessage()
               for r in caplog.records), caplog.text


def test_a_fence_outstanding_when_the_broker_dies_is_answered_by_the_next_one(broker):
    channels.configure(BROKER_ADDRESS=broker.address, REJOIN_TIMEOUT=0.5)
    assert channels.flush(10)
    broker.process.send_signal(signal.SIGSTOP)     # the fence reaches it, no answer comes
    result: list[bool] = []
    try:
        Channel('chat', Recorder())
        flusher = threading.Thread(target=lambda: result.append(channels.flush(20)))
        flusher.start()
        time.sleep(0.2)
        assert not result, 'flush() returned while the broker was stopped'
    finally:
        broker.kill()                              # SIGKILL works on a stopped process
    broker.start()
    flusher.join(25)
    assert result == [True]
    assert 'chat' in broker.process_stats(os.getpid())['subscriptions']


def test_flush_from_a_handler_raises_instead_of_holding_up_delivery():
    errors: list[BaseException] = []

    def handler(message):
        try:
            channels.flush(1)
        except RuntimeError as exc:
            errors.append(exc)
    Channel('chat', handler)
    Channel('chat').send()
    wait_until(lambda: errors, what='the handler to call flush()')
    assert 'worker thread' in str(errors[0])


def test_flush_async_awaits_the_broker_without_blocking_the_event_loop(broker):
    channels.configure(BROKER_ADDRESS=broker.address)

    async def main():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)
        ticker = asyncio.ensure_future(tick())
        broker.process.send_signal(signal.SIGSTOP)
        try:
            Channel('chat', Recorder())
            flushed = asyncio.ensure_future(channels.flush_async(10))
            await asyncio.sleep(0.3)
            assert not flushed.done() and ticks >= 3      # the loop ran meanwhile
        finally:
            broker.process.send_signal(signal.SIGCONT)
        assert await flushed is True
        ticker.cancel()
    asyncio.run(main())


def test_listen_raises_when_the_broker_does_not_confirm_in_time(broker_address):
    channels.configure(BROKER_ADDRESS=broker_address)         # nobody listens there

    async def main():
        with pytest.raises(channels.BrokerUnavailableError, match='did not confirm'):
            async with channels.listen('chat', ready_timeout=0.2):
                pass
    asyncio.run(main())
    assert Channel.get_channels('chat') == []        # it unsubscribed again


def test_a_flush_waiting_when_shutdown_closes_the_link_returns_false(broker):
    channels.configure(BROKER_ADDRESS=broker.address)
    assert channels.flush(10)
    broker.process.send_signal(signal.SIGSTOP)         # no answer will come
    result: list[tuple[bool, float]] = []

    def flush() -> None:
        started = time.monotonic()
        result.append((channels.flush(60), time.monotonic() - started))
    try:
        Channel('chat', Recorder())
        flusher = threading.Thread(target=flush)
        flusher.start()
        time.sleep(0.1)
        channels.shutdown(timeout=0.5)
        flusher.join(30)
    finally:
        broker.process.send_signal(signal.SIGCONT)
    assert result and result[0][0] is False and result[0][1] < 30, result
