"""Handlers run by the broker link's reader: an app process's two reader threads take
turns, and the one that routed a message to a free channel runs its handler itself while
the other reads on. The promises are those of the task workers."""

from __future__ import annotations

import threading
import time

import pytest
from support import Blocked, Overlaps, Recorder, wait_until

import channels
from channels import Channel, TaskWorker


@pytest.fixture
def through(broker):
    """Configure this process for the broker; channels stop before the broker does."""
    def configure(**settings) -> None:
        channels.configure(BROKER_ADDRESS=broker.address, **settings)
    yield configure
    channels.shutdown(timeout=10)


def _send_paced(topic: str, count: int, **data) -> None:
    """Send *count* messages, pausing now and then so that the readers take turns."""
    for n in range(count):
        Channel(topic).send({'n': n, **data})
        if n % 8 == 7:
            time.sleep(0.0003)


def test_a_reader_thread_runs_a_handler_itself_when_the_other_one_waits(through):
    through()
    threads = set()
    recorder = Recorder()

    def handler(message):
        threads.add(threading.current_thread().name)
        recorder(message)

    Channel('chat', handler)
    channels.flush(5)
    _send_paced('chat', 200)
    recorder.wait_for(200)
    assert [d['n'] for d in recorder.data] == list(range(200))
    assert any(name.startswith('channels-reader-') for name in threads), threads


def test_a_slow_handler_on_a_reader_thread_holds_up_only_its_own_channel(through):
    through()
    slow = Blocked()
    release, started = slow.release, slow.started
    other = Recorder()

    Channel('slow', slow)
    Channel('other', other)
    channels.flush(5)
    try:
        Channel('slow').send({'n': 0})
        assert started.wait(5)
        _send_paced('other', 100)
        other.wait_for(100)        # while the slow handler still runs
        assert not release.is_set()
        assert [d['n'] for d in other.data] == list(range(100))
    finally:
        release.set()


def test_each_channel_keeps_its_order_and_gets_each_message_once_while_readers_take_turns(
        through):
    through()
    recorders = [Recorder() for _ in range(4)]
    for number, recorder in enumerate(recorders):
        Channel(f'room.{number}', recorder)
    everything = Recorder()
    Channel('room.*', everything)
    channels.flush(5)
    count = 2000
    for n in range(count):
        Channel(f'room.{n % 4}').send({'n': n})
        if n % 16 == 15:
            time.sleep(0.0002)
    for number, recorder in enumerate(recorders):
        recorder.wait_for(count // 4)
        assert [d['n'] for d in recorder.data] == list(range(number, count, 4))
    everything.wait_for(count)
    assert [d['n'] for d in everything.data] == list(range(count))


def test_a_handler_run_by_readers_and_task_workers_never_runs_concurrently_with_itself(through):
    through(MAX_CHANNEL_TASK_WORKER_THREADS=8)
    handler = Overlaps(0.0002)
    Channel('chat', handler)
    channels.flush(5)
    _send_paced('chat', 400)
    wait_until(lambda: handler.calls == 400, what='400 calls')
    assert handler.overlaps == 0


def test_custom_task_workers_run_every_handler(through):
    ran_by = []

    class Counting(TaskWorker):
        def run(self):
            task = self.get_task()
            ran_by.append(threading.current_thread().name)
            task.handler(task.message)

    through(CHANNEL_TASK_WORKER_CLASS=Counting)
    recorder = Recorder()
    Channel('chat', recorder)
    channels.flush(5)
    _send_paced('chat', 100)
    recorder.wait_for(100)
    assert len(ran_by) == 100 and all(name.startswith('channels-task-') for name in ran_by)


def test_flush_from_a_handler_on_a_reader_thread_raises(through):
    through()
    outcomes = []

    def handler(message):
        try:
            channels.flush(1)
            outcomes.append((threading.current_thread().name, 'returned'))
        except RuntimeError as exc:
            outcomes.append((threading.current_thread().name, str(exc)))

    Channel('chat', handler)
    channels.flush(5)
    _send_paced('chat', 40)
    wait_until(lambda: len(outcomes) == 40, what='40 calls')
    assert all('worker thread (a handler)' in outcome for _, outcome in outcomes), outcomes
    assert any(name.startswith('channels-reader-') for name, _ in outcomes)


def test_shutdown_waits_for_a_handler_that_a_reader_thread_runs(through):
    through()
    started, finished = threading.Event(), []

    def slow(message):
        started.set()
        time.sleep(0.3)
        finished.append(message.data['n'])

    Channel('slow', slow)
    channels.flush(5)
    Channel('slow').send({'n': 0})
    assert started.wait(5)
    assert channels.shutdown(5) is True
    assert finished == [0]


def test_delivery_goes_on_after_the_connection_is_lost_while_a_reader_thread_runs_a_handler(
        through):
    through()
    slow = Blocked()
    release, started = slow.release, slow.started
    after = Recorder()

    Channel('slow', slow)
    Channel('after', after)
    channels.flush(5)
    Channel('slow').send({'n': 0})
    assert started.wait(5)
    machinery = channels.runtime.runtime.machinery
    first = machinery.link.readers[0]
    try:
        from channels.client import _shutdown_socket
        _shutdown_socket(machinery.link._connection)    # as if the broker had gone away
        wait_until(lambda: machinery.link.readers and machinery.link.readers[-1] is not first
                   and machinery.link.connected.is_set(), what='the next connection')
        channels.flush(5)
        _send_paced('after', 50)
        after.wait_for(50)
        assert [d['n'] for d in after.data] == list(range(50))
    finally:
        release.set()
    wait_until(lambda: first not in machinery.link.readers, what='the old reader to retire')
    assert channels.shutdown(5) is True


def test_a_reader_held_back_by_slow_handlers_stops_reading_a_connection_the_sender_dropped(
        through, caplog):
    through(MAX_PENDING_TASKS=5)
    slow = Blocked()
    release, started = slow.release, slow.started
    after = Recorder()

    Channel('slow', slow)
    Channel('after', after)
    channels.flush(5)
    machinery = channels.runtime.runtime.machinery
    link = machinery.link
    try:
        for n in range(20):
            Channel('slow').send({'n': n})
        assert started.wait(5)
        wait_until(lambda: machinery.backlog() > 5, what='the handlers to fall behind')
        first = link.readers[0]
        with link.machinery.send_lock:     # as _write() does when a write fails
            link._lost = link._connection
        link.doorbell.put(None)
        # before the sender closes the descriptor, which a new connection may reuse
        assert first.stopped_reading.wait(1.5)
        wait_until(lambda: link.connected.is_set() and link.readers[-1] is not first,
                   what='the next connection')
    finally:
        release.set()
    channels.flush(5)
    _send_paced('after', 100)
    after.wait_for(100)
    assert [d['n'] for d in after.data] == list(range(100))
    assert 'invalid frame' not in caplog.text
