"""The broker's state file (the pids a restarted broker waits for): where it lives, how
it is written, that a bad one never stops a start, and that a graceful stop removes it."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest
from brokers import BrokerProcess, app_processes, tcp_broker_process
from support import wait_until

from channels import statefile


def listed(path: str) -> list[int] | None:
    """The pids of the processes (origins) in the state file, or None while there is
    none (or it is mid-write)."""
    try:
        return [statefile.pid_of(entry) for entry in json.loads(Path(path).read_text())]
    except (OSError, ValueError):
        return None


def _too_large() -> bytes:
    return b'[' + b'1, ' * (statefile.MAX_BYTES // 3) + b'1]'


# (what the file is, how to make it at path; content names a live pid so that a file
# that is wrongly trusted makes the broker hold, as the log shows)
def _make_bad(kind: str, path: str, tmp_path: Path) -> str:
    live = json.dumps([os.getpid()])
    if kind == 'a pid out of range':
        Path(path).write_text(json.dumps([os.getpid(), 2 ** 31]))
        return '2147483648 is not a process id'
    if kind == 'a negative pid':
        Path(path).write_text('[-1]')
        return '-1 is not a process id'
    if kind == 'a pid that is not an int':
        Path(path).write_text('[true, "1"]')
        return 'True is not a process id'
    if kind == 'not JSON':
        Path(path).write_bytes(b'\xff\xfe[1')
        return 'it is not JSON'
    if kind == 'nested too deeply':
        Path(path).write_text('[' * 200_000)
        return 'it is not JSON'
    if kind == 'not a list':
        Path(path).write_text('{"pids": [1]}')
        return 'it holds a dict, not a list of process ids'
    if kind == 'too large':
        Path(path).write_bytes(_too_large())
        return f'it is larger than {statefile.MAX_BYTES} bytes'
    if kind == 'a symbolic link':
        target = tmp_path / 'elsewhere.json'
        target.write_text(live)
        os.symlink(target, path)
        return 'it is a symbolic link'
    if kind == 'writable by others':
        Path(path).write_text(live)
        os.chmod(path, 0o666)
        return 'others may write it (mode 666)'
    if kind == "another user's":
        if os.geteuid() != 0:
            pytest.skip('only root can give a file to another user')
        Path(path).write_text(live)
        os.chown(path, 65534, 65534)
        return 'it belongs to uid 65534, not to this user'
    if kind == 'a FIFO':
        os.mkfifo(path, 0o600)
        return 'it is not a regular file'
    if kind == 'a directory':
        os.mkdir(path)
        return 'it is not a regular file'
    raise AssertionError(kind)


@pytest.mark.parametrize('kind', [
    'a pid out of range', 'a negative pid', 'a pid that is not an int', 'not JSON',
    'nested too deeply', 'not a list', 'too large', 'a symbolic link', 'writable by others',
    "another user's", 'a FIFO', 'a directory'])
def test_a_bad_state_file_is_logged_and_ignored_and_the_broker_starts(
        broker_address, tmp_path, kind):
    path = broker_address + '.peers'
    problem = _make_bad(kind, path, tmp_path)
    broker = BrokerProcess(broker_address)
    try:
        broker.start()
        assert broker.stats()['processes'] == []
        assert f'WARNING channels.broker: ignoring the state file {path}: {problem}' \
            in broker.log
        assert 'holding messages' not in broker.log
    finally:
        broker.stop()


def test_a_good_state_file_makes_a_restarted_broker_wait_for_its_processes(broker_address):
    # the counterpart of the test above: the same content, trusted, holds
    Path(broker_address + '.peers').write_text(json.dumps([os.getpid()]))
    broker = BrokerProcess(broker_address)
    try:
        broker.start()
        wait_until(lambda: 'holding messages until the 1 processes' in broker.log,
                   what='the hold in the log')
        assert 'ignoring' not in broker.log
    finally:
        broker.stop()


def test_the_state_file_is_private_to_the_user(broker):
    path = broker.address + '.peers'
    with app_processes(broker.address, 1) as (app,):
        app.subscribe('chat')                      # connects
        wait_until(lambda: listed(path) == [app.pid], what='the app in the state file')
        info = os.lstat(path)
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()


def test_writing_the_state_file_follows_no_planted_symlink(broker_address, tmp_path):
    path = broker_address + '.peers'
    victims = [tmp_path / 'victim-1', tmp_path / 'victim-2']
    for victim in victims:
        victim.write_text('precious')
    os.symlink(victims[0], path + '.tmp')        # the name the broker once wrote through
    os.symlink(victims[1], path)
    broker = BrokerProcess(broker_address).start()
    try:
        with app_processes(broker_address, 1) as (app,):
            app.subscribe('chat')                  # connects
            wait_until(lambda: not os.path.islink(path) and listed(path) == [app.pid],
                       what='the state file replacing the link')
    finally:
        broker.stop()
    assert [victim.read_text() for victim in victims] == ['precious', 'precious']


def test_a_graceful_stop_removes_the_state_file(broker_address):
    path = broker_address + '.peers'
    broker = BrokerProcess(broker_address).start()
    try:
        with app_processes(broker_address, 1) as (app,):
            app.subscribe('chat')                  # connects
            wait_until(lambda: listed(path) == [app.pid], what='the app in the state file')
            broker.process.send_signal(signal.SIGTERM)
            assert broker.process.wait(15) == 0
        assert not os.path.exists(path)
        assert [name for name in os.listdir(os.path.dirname(path))
                if name.endswith('.tmp')] == []
    finally:
        broker.stop()


def test_a_tcp_broker_keeps_its_state_file_in_the_private_directory_by_host_and_port(
        tmp_path):
    broker = tcp_broker_process(tmp_path).start()
    port = broker.address.rsplit(':', 1)[1]
    path = broker.runtime_dir / f'mpchannels-{os.getuid()}' / f'tcp-127.0.0.1-{port}.peers'
    try:
        with app_processes(broker.address, 1, AUTHKEY_FILE=str(broker.key_file)) as (app,):
            app.subscribe('chat')                  # connects
            wait_until(lambda: listed(str(path)) == [app.pid],
                       what=f'the app in the state file {path}')
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    finally:
        broker.stop()


def test_state_file_names_the_state_file(tmp_path):
    path = tmp_path / 'custom' / 'broker.state'
    path.parent.mkdir(mode=0o700)
    broker = tcp_broker_process(tmp_path, '--state-file', str(path)).start()
    try:
        with app_processes(broker.address, 1, AUTHKEY_FILE=str(broker.key_file)) as (app,):
            app.subscribe('chat')                  # connects
            wait_until(lambda: listed(str(path)) == [app.pid],
                       what=f'the app in the state file {path}')
        assert not (broker.runtime_dir / f'mpchannels-{os.getuid()}').exists()
    finally:
        broker.stop()
