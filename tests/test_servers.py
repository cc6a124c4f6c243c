"""Real servers under ``channels-broker -- ...``: gunicorn (forked workers, with and
without ``--preload``) and ``uvicorn --workers`` (spawned workers).

Each test starts ``scripts/channels-broker --address A -- <server>`` with the chat app of
``tests/apps``, waits until the server answers HTTP and every worker is subscribed at the
broker, publishes messages through HTTP requests (each on a new connection, so they land
on whatever worker accepts it), and checks that every worker's channel received every
message exactly once: each sender's messages in publish order, and all of them in the
same order in every worker (see ``publish_and_check`` for why that is not necessarily
the HTTP order across senders). The launcher is always stopped with SIGTERM
(which it forwards to the server), and whatever of its process tree is left is killed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from brokers import BROKER_SCRIPT, ROOT
from support import wait_until

from channels.cli import fetch_stats
from channels.errors import ChannelsError

APPS = ROOT / 'tests' / 'apps'
MESSAGES = 200
SUBSCRIPTION = 'chat.*'


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 5.0) -> str:
    """The body of ``GET path`` on a new connection (``Connection: close``)."""
    request = urllib.request.Request(f'http://127.0.0.1:{port}{path}',
                                     headers={'Connection': 'close'})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.status == 200, (path, response.status)
        return response.read().decode()


class Launched:
    """``channels-broker --address A -- COMMAND`` running, with its output in files."""

    def __init__(self, address: str, command: list[str], port: int, workers: int,
                 out_dir: Path, log_dir: Path) -> None:
        self.address = address
        self.port = port
        self.workers = workers
        self.out_dir = out_dir
        self.stdout_path = log_dir / 'launcher.stdout'
        self.stderr_path = log_dir / 'launcher.stderr'
        self.known: dict[int, psutil.Process] = {}    # every process seen in the tree
        env = {name: value for name, value in os.environ.items()
               if not name.startswith('CHANNELS_')}
        env['MPCH_OUT_DIR'] = str(out_dir)
        env['PYTHONUNBUFFERED'] = '1'
        with open(self.stdout_path, 'wb') as stdout, open(self.stderr_path, 'wb') as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(BROKER_SCRIPT), '--address', address, '--', *command],
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env,
                cwd=ROOT)
        self._remember(psutil.Process(self.process.pid))

    # what it says ---------------------------------------------------------------------

    @property
    def log(self) -> str:
        """Its stdout and stderr so far (the launcher's, the broker's and the server's)."""
        parts = []
        for path in (self.stdout_path, self.stderr_path):
            text = path.read_text(errors='replace') if path.exists() else ''
            parts.append(f'--- {path.name} ---\n{text[-6000:]}')
        return '\n'.join(parts)

    def _remember(self, process: psutil.Process) -> None:
        self.known.setdefault(process.pid, process)

    def tree(self) -> list[psutil.Process]:
        """The launcher and its descendants now (remembered for the final clean-up)."""
        try:
            launcher = psutil.Process(self.process.pid)
            processes = [launcher, *launcher.children(recursive=True)]
        except psutil.Error:
            return []
        for process in processes:
            self._remember(process)
        return processes

    def server(self) -> psutil.Process:
        """The server's master process: the launcher's one child."""
        children = psutil.Process(self.process.pid).children()
        assert len(children) == 1, f'the launcher has children {children}\n{self.log}'
        self._remember(children[0])
        return children[0]

    # waiting --------------------------------------------------------------------------

    def _alive(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f'the launcher exited with status {self.process.returncode}'
                                 f'\n{self.log}')
        return True

    def wait_listening(self, timeout: float = 15.0) -> None:
        """Wait for the launcher's readiness line."""
        expected = f'channels-broker: listening on {self.address}\n'

        def said() -> bool:
            self._alive()
            return self.stdout_path.read_text().startswith(expected)
        wait_until(said, timeout, what=f'{expected!r} from the launcher', interval=0.02)

    def wait_http(self, timeout: float = 20.0) -> None:
        """Wait until the server answers ``GET /pid``."""
        def answers() -> bool:
            self._alive()
            try:
                http_get(self.port, '/pid', timeout=1.0)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                return False
            return True
        try:
            wait_until(answers, timeout, what=f'the server to answer on port {self.port}',
                       interval=0.05)
        except AssertionError as exc:
            raise AssertionError(f'{exc}\n{self.log}') from None

    def subscribed_workers(self) -> set[int]:
        """The server's worker processes that the broker lists as subscribed to chat.*."""
        self.tree()
        workers = {child.pid for child in self.server().children()}
        try:
            stats = fetch_stats(self.address)
        except ChannelsError:
            return set()
        return {line['pid'] for line in stats['processes']
                if line['pid'] in workers and SUBSCRIPTION in line['subscriptions']}

    def wait_workers(self, timeout: float = 20.0) -> set[int]:
        """Wait until ``self.workers`` workers are connected and subscribed; their pids."""
        found: set[int] = set()

        def ready() -> bool:
            nonlocal found
            self._alive()
            found = self.subscribed_workers()
            return len(found) >= self.workers
        try:
            wait_until(ready, timeout, interval=0.05,
                       what=f'{self.workers} workers subscribed to {SUBSCRIPTION!r} at the '
                            f'broker')
        except AssertionError as exc:
            raise AssertionError(f'{exc}; subscribed workers: {sorted(found)}; broker: '
                                 f'{_stats_or_error(self.address)}\n{self.log}') from None
        assert len(found) == self.workers, (found, self.log)
        return found

    # stopping -------------------------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to the launcher (it forwards it to the server) and wait; then kill
        whatever is left of the process tree. The launcher's exit status (None if it had
        to be killed)."""
        self.tree()
        status = self.process.poll()
        if status is None:
            try:
                self.process.send_signal(signal.SIGTERM)
                status = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                status = None
        self.tree()
        rest = [p for p in self.known.values() if p.pid != self.process.pid]
        _, alive = psutil.wait_procs(rest, timeout=5 if status is not None else 0)
        if status is None:
            alive.append(self.known[self.process.pid])
        for process in alive:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        if self.process.poll() is None:
            self.process.wait(10)
        self.left_behind = [p.pid for p in alive if p.pid != self.process.pid]
        return status


def _stats_or_error(address: str) -> object:
    try:
        return fetch_stats(address)
    except ChannelsError as exc:
        return exc


@contextmanager
def launched(address: str, command: list[str], port: int, workers: int,
             tmp_path: Path) -> Iterator[Launched]:
    """A launched server, stopped (and its process tree killed) whatever happens."""
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    server = Launched(address, command, port, workers, out_dir, tmp_path)
    try:
        server.wait_listening()
        server.wait_http()
        yield server
    finally:
        server.stop()


def read_received(out_dir: Path, pid: int) -> list[dict]:
    """The complete JSON lines that worker *pid* wrote so far."""
    path = out_dir / f'{pid}.jsonl'
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith('\n')]


def publish_and_check(server: Launched, workers: set[int]) -> list[int]:
    """Publish MESSAGES messages over HTTP; every worker gets each once, in order.
    Returns the pid that served each publish."""
    senders = []
    for n in range(MESSAGES):
        senders.append(int(http_get(server.port, f'/publish?n={n}')))
    assert set(senders) <= workers, f'publishes served by {set(senders) - workers}, not ' \
                                    f'by a worker {sorted(workers)}'
    assert len(set(senders)) >= 2, f'every publish landed on pid {senders[0]}'

    def complete() -> bool:
        return all(len(read_received(server.out_dir, pid)) >= MESSAGES for pid in workers)
    try:
        wait_until(complete, 20, interval=0.05, what=f'{MESSAGES} messages in every worker')
    except AssertionError as exc:
        counts = {pid: len(read_received(server.out_dir, pid)) for pid in workers}
        raise AssertionError(f'{exc}: received {counts}; broker: '
                             f'{_stats_or_error(server.address)}\n{server.log}') from None

    # One broker routing thread: a single global order, the same in every worker.
    # Each sender's messages keep its publish order. Across senders the order is the
    # broker's arrival order, which need not be the HTTP order: send() returns (and the
    # response goes out) before the link's sender thread has written the frame.
    sent_by: dict[int, list[int]] = {}
    for n, sender in enumerate(senders):
        sent_by.setdefault(sender, []).append(n)
    sequences = {}
    for pid in sorted(workers):
        lines = read_received(server.out_dir, pid)
        assert all(line['pid'] == pid for line in lines), lines
        assert all(line['sender'] == senders[line['n']] for line in lines), \
            f'worker {pid} received a message with the wrong sender: {lines}'
        ns = [line['n'] for line in lines]
        assert sorted(ns) == list(range(MESSAGES)), \
            f'worker {pid} did not receive each message exactly once: {ns}'
        for sender, published in sent_by.items():
            got = [n for n in ns if senders[n] == sender]
            assert got == published, \
                f'worker {pid} received the messages of sender {sender} out of order: {got}'
        sequences[pid] = ns
    first = sequences[min(sequences)]
    for pid, ns in sequences.items():
        assert ns == first, f'workers {min(sequences)} and {pid} received the messages in ' \
                            f'different orders:\n{first}\n{ns}'
    return senders


def run_server_test(broker_address: str, tmp_path: Path, command: list[str], port: int,
                    workers: int) -> None:
    with launched(broker_address, command, port, workers, tmp_path) as server:
        started = time.monotonic()
        pids = server.wait_workers()
        senders = publish_and_check(server, pids)
        elapsed = time.monotonic() - started
        status = server.stop()
        assert status == 0, f'the launcher exited with status {status} after SIGTERM ' \
                            f'(left behind: {server.left_behind})\n{server.log}'
        assert not server.left_behind, f'processes outlived the launcher: ' \
                                       f'{server.left_behind}\n{server.log}'
        # nothing more arrived while the workers shut down (no late duplicate)
        for pid in pids:
            assert len(read_received(server.out_dir, pid)) == MESSAGES, pid
        served = {pid: senders.count(pid) for pid in sorted(pids)}
        print(f'{workers} workers, {MESSAGES} messages (served {served}): {elapsed:.2f}s')


def _gunicorn_has_control_socket() -> bool:
    from gunicorn.config import KNOWN_SETTINGS
    return any(setting.name == 'control_socket_disable' for setting in KNOWN_SETTINGS)


def gunicorn_command(port: int, *extra: str) -> list[str]:
    # --no-control-socket: gunicorn 27 otherwise creates ~/.gunicorn/gunicorn.ctl, one
    # path shared by every gunicorn of the user (older versions have no such option)
    quiet = ['--no-control-socket'] if _gunicorn_has_control_socket() else []
    return [sys.executable, '-m', 'gunicorn', '-w', '4', '-b', f'127.0.0.1:{port}',
            '--chdir', str(APPS), *quiet, *extra, 'wsgi_chat:app']


@pytest.mark.timeout(120)
def test_gunicorn_workers_each_receive_every_message(broker_address, tmp_path):
    port = free_port()
    run_server_test(broker_address, tmp_path, gunicorn_command(port), port, workers=4)


@pytest.mark.timeout(120)
def test_gunicorn_preload_workers_inherit_the_subscription(broker_address, tmp_path):
    port = free_port()
    run_server_test(broker_address, tmp_path, gunicorn_command(port, '--preload'), port,
                    workers=4)


@pytest.mark.timeout(120)
def test_uvicorn_spawned_workers_each_receive_every_message(broker_address, tmp_path):
    port = free_port()
    command = [sys.executable, '-m', 'uvicorn', 'asgi_chat:app', '--workers', '2',
               '--host', '127.0.0.1', '--port', str(port), '--app-dir', str(APPS),
               '--no-access-log']
    run_server_test(broker_address, tmp_path, command, port, workers=2)
