"""Many processes at once, and the limit on connections."""

from __future__ import annotations

import time

import pytest
from brokers import BrokerProcess, app_processes
from support import wait_until


@pytest.mark.timeout(180)
def test_64_app_processes_connected_at_once_all_receive_every_message(broker):
    with app_processes(broker.address, 64, start_method='fork') as apps:
        for app in apps:
            app.subscribe('chat.*')
        wait_until(lambda: len(broker.stats()['processes']) == 64, timeout=60,
                   what='64 connected processes')
        for app in apps:
            broker.wait_subscribed(app.pid, ['chat.*'])
        apps[0].send_many('chat.all', 50)
        apps[1].send_many('chat.all', 50, start=50)
        for app in apps:
            received = app.wait_received('chat.*', 100, timeout=60)
            by_sender = {}
            for _, data in received:
                by_sender.setdefault(data['pid'], []).append(data['n'])
            assert by_sender == {apps[0].pid: list(range(50)),
                                 apps[1].pid: list(range(50, 100))}


def test_processes_past_the_connection_limit_are_refused_with_a_clear_error(broker_address):
    broker = BrokerProcess(broker_address, '--max-connections', '2').start()
    try:
        with app_processes(broker_address, 3) as apps:
            for app in apps[:2]:
                app.subscribe('chat')
                broker.wait_subscribed(app.pid, ['chat'])
            apps[2].subscribe('chat')
            wait_until(lambda: 'MAX_CONNECTIONS is 2' in broker.log,
                       what='the refusal in the broker log')
            time.sleep(0.2)
            assert sorted(p['pid'] for p in broker.stats()['processes']) == \
                sorted(app.pid for app in apps[:2])
            apps[0].send_many('chat', 5)
            assert len(apps[1].wait_received('chat', 5)) == 5
    finally:
        broker.stop()


def test_a_bad_connection_limit_is_refused(broker_address):
    import subprocess
    import sys
    from brokers import BROKER_SCRIPT
    result = subprocess.run([sys.executable, str(BROKER_SCRIPT), '--address', broker_address,
                             '--max-connections', '0'], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert 'MAX_CONNECTIONS must be an int >= 1' in result.stderr


def _rss(pid: int) -> int:
    import psutil
    return psutil.Process(pid).memory_info().rss


@pytest.mark.timeout(120)
def test_a_process_killed_mid_stream_is_freed_and_the_others_go_on(broker):
    # Two rounds: the first brings the broker's allocator to its working size, the second
    # must not keep what it held for its dead process (RSS within 10% of the first).
    from brokers import AppProcess
    with app_processes(broker.address, 2) as (sender, survivor):
        survivor.subscribe('chat')
        broker.wait_subscribed(survivor.pid, ['chat'])
        sent, after_first = 0, 0
        for round_ in range(2):
            doomed = AppProcess(broker.address)
            try:
                doomed.subscribe('chat')
                doomed.subscribe('slow', 0.05)
                broker.wait_subscribed(doomed.pid, ['chat', 'slow'])
                sender.call('send_many', 'slow', 20_000, 0, {}, timeout=60)
                sender.send_many('chat', 2000, start=sent)
                sent += 2000
                doomed.kill()
                wait_until(lambda: broker.process_stats(doomed.pid) is None, timeout=5,
                           what='the broker to forget the killed process')
            finally:
                doomed.stop()
            received = survivor.wait_received('chat', sent)
            assert [data['n'] for _, data in received] == list(range(sent))
            if round_ == 0:
                after_first = _rss(broker.process.pid)
        wait_until(lambda: _rss(broker.process.pid) < after_first * 1.1, timeout=10,
                   what=f'the broker RSS within 10% of {after_first}')


@pytest.mark.timeout(120)
def test_sigterm_while_messages_flow_stops_the_broker_cleanly_and_in_time(broker):
    import signal
    with app_processes(broker.address, 2) as (sender, receiver):
        receiver.subscribe('chat')
        broker.wait_subscribed(receiver.pid, ['chat'])
        sender.conn.send(('send_many', ('chat', 100_000, 0, {})))   # runs on, unanswered
        wait_until(lambda: (broker.process_stats(sender.pid) or {}).get('messages_in', 0)
                   > 1000, what='messages flowing')
        started = time.monotonic()
        broker.process.send_signal(signal.SIGTERM)
        assert broker.process.wait(15) == 0
        assert time.monotonic() - started < 11            # within its --stop-timeout (10 s)
        assert sender.conn.poll(60)                       # the sender's loop ended normally
        assert sender.conn.recv()[0] == 'ok'
        received = receiver.received('chat')
        assert [data['n'] for _, data in received] == list(range(len(received)))
        sender.kill()          # it holds what it sent since: no broker to drain it into


@pytest.mark.timeout(120)
def test_a_slow_process_is_bounded_at_the_broker_and_told_what_it_lost(broker_address):
    import os
    # its handlers take 500 messages/s, a tenth of the sender's rate, so what waits for it
    # at the broker grows by about 4,500 messages/s; a long STALL_TIMEOUT keeps this test
    # about the byte bound (tests/test_hostile.py has the stall timeout's). (At 100/s the
    # lost message came 20 s late: it waits behind what the socket's buffers hold.)
    env = dict(os.environ, CHANNELS_MAX_PENDING_BYTES='500000', CHANNELS_STALL_TIMEOUT='60')
    broker = BrokerProcess(broker_address, env=env).start()
    try:
        with app_processes(broker_address, 2) as (sender, fast), \
                app_processes(broker_address, 1, MAX_PENDING_TASKS=50) as (slow,):
            fast.subscribe('chat')
            slow.subscribe('chat', 0.002)                  # handles 500 messages/s
            slow.subscribe('lona.channels.lost')
            for app in (fast, slow):
                broker.wait_subscribed(app.pid, ['chat'])
            # 20,000 messages at 5,000/s, all droppable but every tenth: past half the
            # bound the droppable ones are dropped for the slow process
            sender.call('send_paced', 'chat', 20_000, 5_000, 0, {}, True, timeout=60)
            wait_until(lambda: broker.stats()['dropped_slow'] > 0, timeout=30,
                       what='droppable messages to be dropped for the slow process')
            assert 'droppable messages dropped' in broker.log
            # then 15,000 that are not droppable: past the whole bound it is cut off
            sender.call('send_paced', 'chat', 15_000, 5_000, 20_000, {}, timeout=60)
            received = fast.wait_received('chat', 35_000, timeout=60)
            assert [data['n'] for _, data in received] == list(range(35_000))
            wait_until(lambda: broker.stats()['lost_cut_off'] > 0, timeout=30,
                       what='the slow process to be cut off')
            assert 'cut off process' in broker.log
            (event,) = slow.wait_received('lona.channels.lost', 1, timeout=30)
            assert event[1]['count'] > 0 and 'MAX_PENDING_BYTES' in event[1]['reason']
            assert f'cut off process {fast.pid}:' not in broker.log
            assert f'cut off process {slow.pid}:' in broker.log
            slow.kill()            # its handlers are far behind: no need to wait for them
    finally:
        broker.stop()
