"""channels-broker: the three ways to run it, readiness, signals, the launcher, stats."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import psutil
import pytest
from brokers import BROKER_SCRIPT, ROOT, BrokerProcess, _read_line, stop_process
from support import wait_until

from channels.cli import fetch_stats
from channels.errors import ChannelsError

CONSOLE_SCRIPT = Path(sysconfig.get_path('scripts')) / 'channels-broker'


@pytest.mark.parametrize('command', [
    [str(CONSOLE_SCRIPT)],
    [sys.executable, str(BROKER_SCRIPT)],
    [sys.executable, '-m', 'channels'],
], ids=['console-script', 'scripts/channels-broker', 'python -m channels'])
def test_every_form_of_the_command_serves_and_stops_on_sigterm(broker_address, command):
    process = subprocess.Popen([*command, '--address', broker_address],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _read_line(process, 15) == f'channels-broker: listening on {broker_address}\n'
        assert fetch_stats(broker_address)['processes'] == []
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert not os.path.exists(broker_address)
    finally:
        stop_process(process)
        process.stdout.close()
        process.stderr.close()


def test_sigint_stops_it_gracefully_too(broker_address):
    broker = BrokerProcess(broker_address).start()
    broker.process.send_signal(signal.SIGINT)
    assert broker.process.wait(10) == 0
    broker.stop()


def test_the_readiness_line_is_printed_once_signals_are_handled(broker_address):
    for _ in range(5):          # SIGTERM the moment the line is read: always a clean exit
        broker = BrokerProcess(broker_address).start()
        broker.process.send_signal(signal.SIGTERM)
        assert broker.process.wait(10) == 0
        broker.stop()


def test_a_stale_socket_file_is_replaced(broker_address):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(broker_address)
    stale.close()                      # the file stays, nobody listens: a dead broker's
    broker = BrokerProcess(broker_address).start()
    try:
        assert fetch_stats(broker_address)['processes'] == []
    finally:
        broker.stop()


def test_a_live_broker_on_the_same_address_is_an_error(broker):
    result = subprocess.run([sys.executable, str(BROKER_SCRIPT), '--address', broker.address],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert 'already listening' in result.stderr
    assert fetch_stats(broker.address)['processes'] == []     # the first one is unharmed


def test_the_default_address_is_a_private_socket(tmp_path):
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    env.pop('CHANNELS_BROKER_ADDRESS', None)
    process = subprocess.Popen([sys.executable, str(BROKER_SCRIPT)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, env=env)
    try:
        line = _read_line(process, 15)
        address = line.split('listening on ', 1)[1].strip()
        assert address == str(tmp_path / f'mpchannels-{os.getuid()}' / 'broker.sock')
        assert os.stat(os.path.dirname(address)).st_mode & 0o777 == 0o700
        assert os.stat(address).st_mode & 0o777 == 0o600
    finally:
        stop_process(process)
        process.stdout.close()


def test_stats_prints_the_documented_json(broker):
    from brokers import app_processes
    with app_processes(broker.address, 1) as (app,):
        app.subscribe('chat.*')
        broker.wait_subscribed(app.pid, ['chat.*'])
        app.send_many('chat.x', 3)
        app.wait_received('chat.*', 3)
        result = subprocess.run([sys.executable, str(BROKER_SCRIPT), 'stats', '--address',
                                 broker.address, '--json'], capture_output=True, text=True,
                                timeout=30)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert isinstance(stats['uptime_s'], float)
    (process,) = stats['processes']
    assert process['pid'] == app.pid and process['subscriptions'] == ['chat.*']
    assert process['messages_in'] == 3 and process['messages_out'] == 3
    assert process['pending'] == 0 and process['dropped'] == 0
    assert stats['totals'] == {'messages_in': 3, 'messages_out': 3, 'dropped': 0,
                               'pending': 0}


def test_stats_without_a_broker_says_how_to_start_one(broker_address):
    result = subprocess.run([sys.executable, str(BROKER_SCRIPT), 'stats', '--address',
                             broker_address], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"start one with 'channels-broker --address {broker_address}'" in result.stderr


def test_the_launcher_runs_the_command_with_the_address_and_exits_with_its_status(
        broker_address):
    script = 'import os, sys; print(os.environ["CHANNELS_BROKER_ADDRESS"]); sys.exit(3)'
    result = subprocess.run([sys.executable, str(BROKER_SCRIPT), '--address', broker_address,
                             '--', sys.executable, '-c', script],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 3
    assert result.stdout.splitlines() == [f'channels-broker: listening on {broker_address}',
                                          broker_address]
    assert not os.path.exists(broker_address)


def test_the_launcher_forwards_sigterm_to_the_command(broker_address, tmp_path):
    marker = tmp_path / 'got-sigterm'
    script = textwrap.dedent(f'''
        import signal, sys, time
        def on_term(signum, frame):
            open({str(marker)!r}, 'w').close()
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        print('child ready', flush=True)
        time.sleep(60)
    ''')
    process = subprocess.Popen([sys.executable, str(BROKER_SCRIPT), '--address',
                                broker_address, '--', sys.executable, '-c', script],
                               stdout=subprocess.PIPE)
    try:
        assert _read_line(process, 15).startswith('channels-broker: listening on')
        assert _read_line(process, 15) == 'child ready\n'
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        assert marker.exists()
    finally:
        stop_process(process)
        process.stdout.close()


def test_the_launcher_reports_a_command_that_cannot_run(broker_address):
    result = subprocess.run([sys.executable, str(BROKER_SCRIPT), '--address', broker_address,
                             '--', '/no/such/command'], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 127
    assert "cannot run '/no/such/command'" in result.stderr


@pytest.mark.parametrize('args, message', [
    (['--broker-threads', '0'], '--broker-threads must be >= 1'),
    (['--broker-class', 'channels.TaskWorker'], 'subclass of channels.MessageBroker'),
    (['--broker-class', 'nowhere.Broker'], 'cannot import module'),
    (['--', ], "'--' must be followed by the command"),
])
def test_bad_options_are_refused_with_a_clear_message(broker_address, args, message):
    result = subprocess.run([sys.executable, str(BROKER_SCRIPT), '--address', broker_address,
                             *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr


def test_a_custom_broker_class_routes_in_the_broker_process(broker_address, tmp_path):
    (tmp_path / 'mybroker.py').write_text(textwrap.dedent('''
        from channels import Channel, MessageBroker

        class UpperOnly(MessageBroker):
            """Routes only topics that are upper case."""
            def run(self):
                message = self.get_message()
                if message.topic.isupper():
                    for channel in Channel.get_channels(topic=message.topic):
                        self.schedule_task(channel=channel, message=message)
    '''))
    env = dict(os.environ, PYTHONPATH=f'{tmp_path}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
    broker = BrokerProcess(broker_address, '--broker-class', 'mybroker.UpperOnly', env=env)
    broker.start()
    try:
        from brokers import app_processes
        with app_processes(broker_address, 1) as (app,):
            app.subscribe('*')
            broker.wait_subscribed(app.pid, ['*'])
            app.call('send', 'quiet', {'n': 0}, {})
            app.call('send', 'LOUD', {'n': 1}, {})
            received = app.wait_received('*', 2)
            wait_until(lambda: any(t == 'LOUD' for t, _ in app.received('*')),
                       what='the LOUD message')
            topics = [t for t, _ in app.received('*') if not t.startswith('lona.')]
            assert topics == ['LOUD']
    finally:
        broker.stop()


def test_sigterm_before_the_command_started_stops_the_launcher_at_once(broker_address):
    process = subprocess.Popen([sys.executable, str(BROKER_SCRIPT), '--address',
                                broker_address, '--', sys.executable, '-c',
                                'import time; time.sleep(30)'], stdout=subprocess.PIPE)
    try:
        assert _read_line(process, 15).startswith('channels-broker: listening on')
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 128 + signal.SIGTERM
    finally:
        stop_process(process)
        process.stdout.close()


def _blocked_signals(pid: int, tid: int) -> set[int]:
    with open(f'/proc/{pid}/task/{tid}/status') as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith('SigBlk:'))
    return {number for number in range(1, 65) if mask & (1 << (number - 1))}


@pytest.mark.skipif(not os.path.isdir('/proc/self/task'), reason='reads /proc (Linux)')
def test_only_the_brokers_main_thread_takes_sigterm_and_sigint(broker_address):
    # The kernel gives a process's signal to any thread that does not block it; one
    # that went to a reader thread left the main thread asleep in its wait, and a
    # graceful stop waited for it (seen: over 15 s, once in 25 stops under load)
    from brokers import app_processes
    broker = BrokerProcess(broker_address).start()
    try:
        with app_processes(broker_address, 1) as (app,):
            app.subscribe('chat')
            broker.wait_subscribed(app.pid, ['chat'])
            pid = broker.process.pid
            threads = [thread.id for thread in psutil.Process(pid).threads()]
            assert len(threads) >= 4           # the router, the gate, a reader, a writer
            for tid in threads:
                blocked = _blocked_signals(pid, tid) & {signal.SIGTERM, signal.SIGINT}
                assert blocked == (set() if tid == pid else
                                   {signal.SIGTERM, signal.SIGINT}), (tid, blocked)
    finally:
        broker.stop()


def test_a_graceful_stop_delivers_everything_the_broker_had_read(broker_address, tmp_path):
    (tmp_path / 'slowbroker.py').write_text(textwrap.dedent('''
        import time
        from channels import Channel, MessageBroker

        class Slow(MessageBroker):
            """Routes like the default, a millisecond per message: a backlog builds."""
            def run(self):
                message = self.get_message()
                time.sleep(0.001)
                for channel in Channel.get_channels(topic=message.topic):
                    self.schedule_task(channel=channel, message=message)
    '''))
    env = dict(os.environ, PYTHONPATH=f'{tmp_path}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
    broker = BrokerProcess(broker_address, '--broker-class', 'slowbroker.Slow', env=env)
    broker.start()
    try:
        from brokers import app_processes
        with app_processes(broker_address, 2) as (sender, receiver):
            receiver.subscribe('chat')
            broker.wait_subscribed(receiver.pid, ['chat'])
            sender.send_many('chat', 1000)
            wait_until(lambda: (broker.process_stats(sender.pid) or {}).get('messages_in') == 1000,
                       what='the broker to read all 1000 messages')
            broker.process.send_signal(signal.SIGTERM)
            assert broker.process.wait(20) == 0
            assert [d['n'] for _, d in receiver.wait_received('chat', 1000)] == \
                list(range(1000))
    finally:
        broker.stop()


@pytest.mark.parametrize('kind', ['regular file', 'directory', 'symlink to a file',
                                  'symlink to a stale socket'])
def test_only_a_stale_socket_is_replaced_at_the_address(broker_address, kind):
    target = broker_address + '.target'
    if kind == 'regular file':
        Path(broker_address).write_text('precious')
    elif kind == 'directory':
        os.mkdir(broker_address)
    elif kind == 'symlink to a file':
        Path(target).write_text('precious')
        os.symlink(target, broker_address)
    else:
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(target)
        stale.close()
        os.symlink(target, broker_address)
    before = os.lstat(broker_address)
    result = subprocess.run([sys.executable, str(BROKER_SCRIPT), '--address', broker_address],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f'{broker_address} exists and is a' in result.stderr
    assert 'not a socket' in result.stderr
    after = os.lstat(broker_address)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    if kind in ('regular file', 'symlink to a file'):
        assert Path(broker_address).read_text() == 'precious'


@pytest.mark.parametrize('address, problem', [
    ('localhost:abc', "the port 'abc' is not a number"),
    (':9999', 'there is no host before the ":"'),
    ('localhost:', 'there is no port after the ":"'),
    ('::1:9999', 'an IPv6 host must be in brackets'),
    ('', 'the broker address is empty'),
])
@pytest.mark.parametrize('subcommand', [[], ['stats']], ids=['serve', 'stats'])
def test_a_malformed_address_is_refused_saying_what_an_address_looks_like(
        tmp_path, address, problem, subcommand):
    result = subprocess.run([sys.executable, str(BROKER_SCRIPT), *subcommand, '--address',
                             address], capture_output=True, text=True, timeout=30,
                            cwd=tmp_path)
    assert result.returncode == (1 if subcommand else 2)
    assert problem in result.stderr
    assert 'host:port, e.g. 127.0.0.1:5555' in result.stderr
    assert list(tmp_path.iterdir()) == []           # no socket file in the working directory


def test_a_path_with_a_colon_is_a_socket_path_when_it_has_a_slash(tmp_path, monkeypatch):
    from channels.connection import parse_address
    monkeypatch.chdir(tmp_path)
    assert parse_address('./a:b.sock') == str(tmp_path / 'a:b.sock')
    assert parse_address('b.sock') == str(tmp_path / 'b.sock')
    assert parse_address('127.0.0.1:5555') == ('127.0.0.1', 5555)
    assert parse_address('[::1]:5555') == ('::1', 5555)


def test_the_log_level_is_accepted_in_any_case(broker_address):
    broker = BrokerProcess(broker_address, '--log-level', 'info')
    try:
        broker.start()
        assert fetch_stats(broker_address)['processes'] == []
    finally:
        assert broker.stop() == 0


def test_the_usage_line_shows_serving_launching_and_stats():
    result = subprocess.run([sys.executable, str(BROKER_SCRIPT), '--no-such-option'],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    usage = result.stderr.split('channels-broker: error:')[0]
    assert 'channels-broker [--address ADDR]' in usage
    assert '[-- COMMAND ARGS...]' in usage
    assert 'channels-broker stats [--address ADDR]' in usage


def _gone(process: psutil.Process) -> bool:
    """It exited (a zombie that its new parent has not reaped yet counts as gone)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(120)
def test_killing_the_launcher_stops_the_server_and_its_workers(broker_address, tmp_path):
    from servers import Launched, free_port
    from test_servers import APPS
    port = free_port()
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    command = [sys.executable, '-m', 'uvicorn', 'asgi_chat:app', '--workers', '2',
               '--host', '127.0.0.1', '--port', str(port), '--app-dir', str(APPS),
               '--no-access-log']
    server = Launched(broker_address, command, port, 2, out_dir, tmp_path)
    try:
        server.wait_listening()
        server.wait_http()
        server.wait_workers()
        tree = server.tree()
        assert len(tree) >= 4, tree          # launcher, uvicorn, its 2 workers
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
        wait_until(lambda: all(_gone(p) for p in tree), timeout=30,
                   what=f'the server and its workers to stop after the launcher died: '
                        f'{[p for p in tree if not _gone(p)]}')
        with pytest.raises(ChannelsError):      # the broker went with the launcher
            fetch_stats(broker_address)
    finally:
        server.stop()


def test_without_pdeathsig_a_watchdog_stops_the_command_when_the_launcher_dies(
        broker_address, tmp_path):
    launcher = ('import sys; import channels.cli as cli; cli._PDEATHSIG = False; '
                'sys.exit(cli.main(sys.argv[1:]))')
    script = 'import time; print("child ready", flush=True); time.sleep(60)'
    process = subprocess.Popen([sys.executable, '-c', launcher, '--address', broker_address,
                                '--', sys.executable, '-c', script], stdout=subprocess.PIPE,
                               cwd=ROOT)
    tree: list[psutil.Process] = []
    try:
        assert _read_line(process, 15).startswith('channels-broker: listening on')
        assert _read_line(process, 15) == 'child ready\n'
        tree = psutil.Process(process.pid).children(recursive=True)
        assert len(tree) == 2, tree          # the command and its watchdog
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        wait_until(lambda: all(_gone(p) for p in tree), timeout=20,
                   what='the command and the watchdog to stop after the launcher died')
    finally:
        stop_process(process)
        process.stdout.close()
        for left in tree:
            if not _gone(left):
                left.kill()


def test_the_watchdog_leaves_a_command_that_ended_by_itself_alone(broker_address):
    launcher = ('import sys; import channels.cli as cli; cli._PDEATHSIG = False; '
                'sys.exit(cli.main(sys.argv[1:]))')
    result = subprocess.run([sys.executable, '-c', launcher, '--address', broker_address,
                             '--', sys.executable, '-c', 'import sys; sys.exit(5)'],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 5, result.stderr
    assert 'Traceback' not in result.stderr


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='PR_SET_PDEATHSIG is Linux')
def test_a_command_whose_launcher_died_before_it_was_tied_to_it_does_not_run(tmp_path):
    from channels.cli import _CHILD_GUARD
    marker = tmp_path / 'ran'
    not_my_parent = os.getppid()
    result = subprocess.run([sys.executable, '-I', '-S', '-c', _CHILD_GUARD,
                             str(not_my_parent), 'touch', str(marker)], timeout=30)
    assert result.returncode == 128 + signal.SIGTERM
    assert not marker.exists()


def test_a_broker_from_settings_takes_every_limit_and_the_bridge_from_the_settings(tmp_path):
    import channels
    from channels.broker import _SETTING_OF, Broker
    channels.configure(MAX_CONNECTIONS=7, MAX_PENDING_BYTES=123_456, STALL_TIMEOUT=3.5,
                       BRIDGE_NAMESPACE='elsewhere', BRIDGE_RETENTION_ENTRIES=5000)
    broker = Broker.from_settings(str(tmp_path / 'b.sock'), broker_threads=2)
    assert (broker.max_connections, broker.bridge_namespace, broker.broker_threads) == \
        (7, 'elsewhere', 2)
    assert broker.bridge_retention.entries == 5000
    assert broker.max_pending == 123_456 and broker.stall_timeout == 3.5
    assert set(_SETTING_OF.values()) <= set(channels.settings.names())
