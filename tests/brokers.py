"""Start a real broker with its script, and real app processes, always stopping them."""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from support import wait_until

from channels.cli import fetch_stats

ROOT = Path(__file__).resolve().parent.parent
BROKER_SCRIPT = ROOT / 'scripts' / 'channels-broker'


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    """The next line of *process*'s stdout, or fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    line = b''
    while not line.endswith(b'\n'):
        left = deadline - time.monotonic()
        if left <= 0 or process.poll() is not None and not select.select(
                [process.stdout], [], [], 0)[0]:
            raise AssertionError(f'no line from the broker within {timeout}s '
                                 f'(exit status {process.poll()}); got {line!r}')
        if select.select([process.stdout], [], [], min(left, 0.1))[0]:
            chunk = os.read(process.stdout.fileno(), 1)
            if not chunk:
                raise AssertionError(f'the broker closed stdout; got {line!r}, exit status '
                                     f'{process.wait(5)}')
            line += chunk
    return line.decode()


def stop_process(process: subprocess.Popen | multiprocessing.Process, timeout: float = 10.0
                 ) -> None:
    """terminate -> wait -> kill -> wait."""
    if isinstance(process, subprocess.Popen):
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
    else:
        if process.is_alive():
            process.terminate()
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join(timeout)


class BrokerProcess:
    """A broker started by ``scripts/channels-broker``."""

    def __init__(self, address: str, *extra: str, env: dict[str, str] | None = None) -> None:
        self.address = address
        self.extra = extra
        self.env = env
        self.process: subprocess.Popen | None = None
        self.stderr_path = Path(address + '.stderr') if not ':' in address else None
        self.authkey: bytes | None = None      # for stats()

    def start(self, timeout: float = 15.0) -> BrokerProcess:
        """Start it and wait for its readiness line."""
        stderr = open(self.stderr_path, 'ab') if self.stderr_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                [sys.executable, str(BROKER_SCRIPT), '--address', self.address, *self.extra],
                stdout=subprocess.PIPE, stderr=stderr, env=self.env)
        finally:
            if self.stderr_path:
                stderr.close()
        line = _read_line(self.process, timeout)
        assert line.startswith('channels-broker: listening on '), line
        return self

    def stats(self, **kwargs: Any) -> dict[str, Any]:
        """The broker's live state."""
        kwargs.setdefault('authkey', self.authkey)
        return fetch_stats(self.address, **kwargs)

    def process_stats(self, pid: int) -> dict[str, Any] | None:
        """The stats line of app process *pid*, if it is connected."""
        for process in self.stats()['processes']:
            if process['pid'] == pid:
                return process
        return None

    def wait_subscribed(self, pid: int, topics: list[str], timeout: float = 10.0) -> None:
        """Wait until the broker knows that *pid* subscribes to every one of *topics*."""
        def known() -> bool:
            line = self.process_stats(pid)
            return line is not None and set(topics) <= set(line['subscriptions'])
        wait_until(known, timeout, what=f'the broker to know pid {pid} subscribes to {topics}')

    @property
    def log(self) -> str:
        """What the broker wrote to stderr so far."""
        return self.stderr_path.read_text() if self.stderr_path and \
            self.stderr_path.exists() else ''

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then wait (kill after *timeout*); the exit status."""
        if self.process is not None:
            stop_process(self.process, timeout)
            if self.process.stdout is not None:
                self.process.stdout.close()
            return self.process.returncode
        return None

    def kill(self) -> None:
        """SIGKILL, and wait."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait(10)
            if self.process.stdout is not None:
                self.process.stdout.close()


def tcp_broker_process(tmp_path: Path, *extra: str) -> BrokerProcess:
    """A TCP broker (not started) on a free port, with an authkey file (``key_file``) and
    its per-user private directory under *tmp_path* (``runtime_dir``)."""
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    key_file = tmp_path / 'authkey'
    key_file.write_bytes(b'sesame\n')
    runtime_dir = tmp_path / 'run'
    runtime_dir.mkdir(mode=0o700, exist_ok=True)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime_dir))
    broker = BrokerProcess(f'127.0.0.1:{port}', '--authkey-file', str(key_file), *extra,
                           env=env)
    broker.stderr_path = tmp_path / 'broker.stderr'
    broker.key_file = key_file
    broker.authkey = b'sesame'
    broker.runtime_dir = runtime_dir
    return broker


class AppProcess:
    """A real app process (``multiprocessing``, any start method) driven by commands."""

    def __init__(self, address: str | None, start_method: str = 'spawn', **settings: Any
                 ) -> None:
        context = multiprocessing.get_context(start_method)
        self.conn, child = context.Pipe()
        settings = dict(settings)
        if address is not None:
            settings['BROKER_ADDRESS'] = address
        from agent import run_agent
        self.process = context.Process(target=run_agent, args=(child, settings), daemon=True)
        self.process.start()
        child.close()
        self.pid = self.call('pid')

    def call(self, command: str, *args: Any, timeout: float = 30.0) -> Any:
        """Run *command* in the process and return its result (or raise its error)."""
        self.begin(command, *args)
        return self.finish(command, timeout)

    def begin(self, command: str, *args: Any) -> None:
        """Start *command* in the process; ``finish()`` waits for its result."""
        self.conn.send((command, args))

    def busy(self) -> bool:
        """True while the command begun last has not answered."""
        return not self.conn.poll(0)

    def finish(self, command: str = 'the command', timeout: float = 30.0) -> Any:
        """The result of the command begun last (or raise its error)."""
        if not self.conn.poll(timeout):
            raise AssertionError(f'app process {self.process.pid} did not answer {command!r} '
                                 f'within {timeout}s')
        status, value = self.conn.recv()
        if status == 'error':
            raise AssertionError(f'{command}{args!r} failed in the app process: {value}')
        return value

    def subscribe(self, topic: str, delay: float = 0.0) -> None:
        """Subscribe a recording channel to *topic* (one per topic)."""
        self.call('subscribe', topic, delay)

    def received(self, topic: str) -> list[tuple[str, dict]]:
        """(topic, data) of what the channel on *topic* received, in order."""
        return self.call('received', topic)

    def wait_received(self, topic: str, count: int, timeout: float = 20.0) -> list:
        """Wait until the channel on *topic* received *count* messages; return them."""
        wait_until(lambda: len(self.received(topic)) >= count, timeout,
                   what=f'{count} messages on {topic!r} in pid {self.pid} '
                        f'(got {len(self.received(topic))})', interval=0.05)
        return self.received(topic)

    def send_many(self, topic: str, count: int, start: int = 0, **kwargs: Any) -> None:
        """Send ``{'n': i, 'pid': pid}`` for i in range(start, start + count)."""
        self.call('send_many', topic, count, start, kwargs)

    def stop(self) -> None:
        """Shut channels down in the process, then end it."""
        if self.process.is_alive():
            try:
                self.call('exit', timeout=15)
            except (AssertionError, OSError, EOFError):
                pass
            self.process.join(10)
        stop_process(self.process)
        self.conn.close()

    def kill(self) -> None:
        """SIGKILL the process."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)


@contextmanager
def app_processes(address: str | None, count: int, start_method: str = 'spawn',
                  **settings: Any) -> Iterator[list[AppProcess]]:
    """*count* app processes, always stopped at the end."""
    apps: list[AppProcess] = []
    try:
        for _ in range(count):
            apps.append(AppProcess(address, start_method, **settings))
        yield apps
    finally:
        for app in apps:
            app.stop()
