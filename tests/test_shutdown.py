"""shutdown(): drain what was sent, refuse new sends, leave no thread, restart cleanly."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from support import Recorder, wait_until

import channels
from channels import Channel, ShutdownError


def _channel_threads():
    return [t for t in threading.enumerate() if t.name.startswith('channels-')]


def test_shutdown_handles_every_non_droppable_message_before_it_returns():
    received = Recorder(delay=0.0005)
    Channel('chat', received)
    for n in range(500):
        Channel('chat').send({'n': n})
    assert channels.shutdown(timeout=30) is True
    assert [d['n'] for d in received.data] == list(range(500))


def test_shutdown_leaves_no_thread_running():
    Channel('chat', Recorder())
    assert _channel_threads()
    channels.shutdown()
    assert _channel_threads() == []
    assert not channels.is_running()


def test_sends_while_draining_raise_a_clear_error():
    release = threading.Event()
    errors = []
    Channel('slow', lambda message: release.wait(10))
    Channel('slow').send()

    def shut():
        channels.shutdown(timeout=10)

    stopper = threading.Thread(target=shut)
    stopper.start()
    try:
        def refused():
            try:
                Channel('chat').send()
            except ShutdownError as error:
                errors.append(error)
                return True
            return False
        wait_until(refused, what='a send to be refused while draining')
    finally:
        release.set()
        stopper.join(10)
    assert 'shutting down' in str(errors[0])
    assert isinstance(errors[0], RuntimeError)


def test_droppable_messages_may_be_dropped_at_shutdown():
    release = threading.Event()
    received = Recorder()

    def gate(message):
        release.wait(10)
        received(message)

    Channel('chat', gate)
    Channel('chat').send({'n': 0})
    droppable = [Channel('chat').send({'n': n}, droppable=True) for n in range(1, 50)]
    Channel('chat').send({'n': 50})
    threading.Timer(0.1, release.set).start()
    assert channels.shutdown(timeout=10) is True
    kept = [d['n'] for d in received.data]
    assert kept[0] == 0 and kept[-1] == 50
    assert all(message.is_dropped() for message in droppable if
               message.data['n'] not in kept)
    assert len(kept) < 51


def test_shutdown_timeout_logs_what_was_not_handled(caplog):
    release = threading.Event()
    Channel('stuck', lambda message: release.wait(10))
    for _ in range(3):
        Channel('stuck').send()
    try:
        with caplog.at_level(logging.WARNING, logger='channels'):
            assert channels.shutdown(timeout=0.2) is False
    finally:
        release.set()
    text = caplog.text
    assert 'were not handled within' in text
    assert 'did not stop within' in text
    wait_until(lambda: not _channel_threads(), what='the stuck thread to end')


def test_next_use_after_shutdown_starts_afresh():
    received = Recorder()
    Channel('chat', received)
    channels.shutdown()
    Channel('chat').send({'n': 1})
    received.wait_for(1)
    assert channels.is_running()


def test_shutdown_when_not_running_returns_true():
    assert channels.shutdown() is True


@pytest.mark.parametrize('timeout', [-1, 'soon', None, float('inf'), float('nan')])
def test_shutdown_rejects_a_bad_timeout(timeout):
    with pytest.raises(ValueError, match='timeout must be a finite number of seconds >= 0'):
        channels.shutdown(timeout)


def test_shutdown_from_a_handler_raises_instead_of_waiting_for_itself():
    errors = Recorder()

    def handler(message):
        try:
            channels.shutdown()
        except RuntimeError as error:
            errors(error)

    Channel('chat', handler)
    Channel('chat').send()
    errors.wait_for(1)
    assert 'from a channels worker thread' in str(errors.messages[0])


def test_interpreter_exit_drains_what_was_sent():
    script = textwrap.dedent('''
        import atexit, time
        from channels import Channel
        count = [0]
        # atexit runs handlers last-in first-out: this one runs after channels' shutdown
        atexit.register(lambda: print('handled', count[0], flush=True))
        def handler(message):
            time.sleep(0.001)
            count[0] += 1
        Channel('chat', handler)
        for n in range(300):
            Channel('chat').send({'n': n})
    ''')
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'handled 300'
