"""What a process says when channels starts: without a broker under a pre-forked server
(a WARNING, issue 10 A4), and when it connects for the first time with messages
buffered before the broker was up (a WARNING with their count, A3)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from brokers import ROOT, BrokerProcess
from servers import free_port
from support import Recorder, wait_until
from test_servers import APPS, gunicorn_command

import channels
from channels import Channel
from channels.prefork import prefork_server

WORKER_WARNING = 'no broker is configured (CHANNELS_BROKER_ADDRESS is unset), and this ' \
                 'process (pid '


def _env(tmp_path: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith('CHANNELS_') and name != 'SERVER_SOFTWARE'}
    env['MPCH_OUT_DIR'] = str(tmp_path)
    env['PYTHONUNBUFFERED'] = '1'
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
    return env


def _stop_tree(process: subprocess.Popen) -> None:
    """SIGTERM the server's master and wait; kill whatever of its tree is left."""
    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
    except psutil.Error:
        tree = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            pass
    _, alive = psutil.wait_procs(tree, timeout=5)
    for left in alive:
        try:
            left.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    if process.poll() is None:
        process.wait(10)


def _warned_workers(command: list[str], tmp_path: Path, workers: int) -> tuple[set[int], str]:
    """Run *command* without a broker until *workers* processes logged the WARNING; the
    pids that said it (from the message) and the server's stderr."""
    stderr_path = tmp_path / 'server.stderr'
    with open(stderr_path, 'wb') as stderr:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=stderr,
                                   env=_env(tmp_path), cwd=ROOT)
    try:
        def warned() -> set[int]:
            text = stderr_path.read_text(errors='replace')
            return {int(line.split(WORKER_WARNING, 1)[1].split(')', 1)[0])
                    for line in text.splitlines() if WORKER_WARNING in line}
        try:
            wait_until(lambda: len(warned()) >= workers or process.poll() is not None,
                       30, interval=0.05, what=f'{workers} workers to warn')
        except AssertionError:
            pass
        pids = warned()
        master = psutil.Process(process.pid)
        children = {child.pid for child in master.children()}
    finally:
        _stop_tree(process)
    return pids & children, stderr_path.read_text(errors='replace')


@pytest.mark.timeout(90)
def test_gunicorn_workers_without_a_broker_each_log_a_warning(tmp_path):
    port = free_port()
    command = gunicorn_command(port)
    command[command.index('-w') + 1] = '2'
    pids, log = _warned_workers(command, tmp_path, workers=2)
    assert len(pids) == 2, log
    assert 'is a worker of gunicorn/' in log and "'channels-broker -- <command>'" in log


@pytest.mark.timeout(90)
def test_uvicorn_workers_without_a_broker_each_log_a_warning(tmp_path):
    port = free_port()
    command = [sys.executable, '-m', 'uvicorn', 'asgi_chat:app', '--workers', '2',
               '--host', '127.0.0.1', '--port', str(port), '--app-dir', str(APPS),
               '--no-access-log']
    pids, log = _warned_workers(command, tmp_path, workers=2)
    assert len(pids) == 2, log
    assert 'is a worker of uvicorn (master pid ' in log


def test_a_plain_script_without_a_broker_does_not_warn(tmp_path):
    script = ("import channels\n"
              "channels.Channel('chat', lambda message: None)\n"
              "channels.Channel('chat').send({})\n"
              "assert channels.flush(5)\n"
              "channels.shutdown(5)\n"
              "print('done')\n")
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            env=_env(tmp_path), cwd=ROOT, timeout=60)
    assert result.returncode == 0 and result.stdout == 'done\n', result
    assert result.stderr == '', result.stderr       # WARNINGs would show (lastResort)


def test_gunicorns_environment_marks_a_process_as_its_worker(monkeypatch):
    monkeypatch.setenv('SERVER_SOFTWARE', 'gunicorn/27.0.1')
    assert prefork_server() == 'gunicorn/27.0.1'
    monkeypatch.setenv('SERVER_SOFTWARE', 'Apache/2.4')
    assert prefork_server() is None


def test_messages_buffered_before_the_first_connection_are_counted_in_one_warning(
        broker_address, caplog):
    channels.configure(BROKER_ADDRESS=broker_address)
    Channel('chat', Recorder())
    for n in range(3):
        Channel('chat').send({'n': n})
    broker = BrokerProcess(broker_address)
    try:
        with caplog.at_level(logging.INFO, logger='channels'):
            broker.start()
            assert channels.flush(20)
            broker.kill()                     # and a restart: that is no first connection
            broker.start()
            Channel('chat').send({'n': 3})
            assert channels.flush(20)
    finally:
        broker.stop()
    first = [r for r in caplog.records if 'for the first time' in r.getMessage()]
    assert len(first) == 1 and first[0].levelno == logging.WARNING, caplog.text
    assert 'sent it 3 messages buffered before' in first[0].getMessage()
    assert 'not those that connect later' in first[0].getMessage()


def test_a_first_send_to_a_broker_that_is_up_gives_no_warning(broker, caplog):
    # the first send starts the link, which connects a moment later: those messages were
    # buffered, but every process that is connected gets them; nothing to warn of
    channels.configure(BROKER_ADDRESS=broker.address)
    with caplog.at_level(logging.INFO, logger='channels'):
        for n in range(3):
            Channel('chat').send({'n': n})
        assert channels.flush(20)
    assert 'for the first time' not in caplog.text
