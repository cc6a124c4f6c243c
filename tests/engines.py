"""Real Redis and NATS JetStream servers for the bridge tests: own ports, own data
directories, killed and restarted at will, always stopped."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REDIS_SERVER = '/usr/bin/redis-server'
NATS_SERVER = '/usr/sbin/nats-server'
_RESERVED = {6379, 4222}          # the machine's own Redis and NATS: never touched


def free_port() -> int:
    """A TCP port nothing listens on now (not the machine's own Redis/NATS ports)."""
    while True:
        with socket.socket() as sock:
            sock.bind(('127.0.0.1', 0))
            port = sock.getsockname()[1]
        if port not in _RESERVED:
            return port


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=0.2):
            return True
    except OSError:
        return False


class EngineServer:
    """One redis-server or nats-server process, with its data in a directory of its own.

    ``start()`` waits until it accepts connections; ``kill()`` SIGKILLs it;
    ``restart()`` starts it again on the same port and data (``persist=False`` wipes
    the data first, as a server without persistence comes back empty);
    ``pause()``/``resume()`` SIGSTOP/SIGCONT it (a half-open connection).
    """

    def __init__(self, kind: str, *, persist: bool = True, password: str | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.persist = persist
        self.password = password
        self.extra = extra
        self.port = free_port()
        self.data = tempfile.mkdtemp(prefix=f'mpch-{kind}-')
        self.process: subprocess.Popen | None = None
        self.log = Path(self.data) / 'server.log'

    @property
    def url(self) -> str:
        auth = f':{self.password}@' if self.password else ''
        if self.kind == 'redis':
            return f'redis://{auth}127.0.0.1:{self.port}/0'
        return f'nats://{auth}127.0.0.1:{self.port}'

    def _command(self) -> list[str]:
        if self.kind == 'redis':
            command = [REDIS_SERVER, '--port', str(self.port), '--bind', '127.0.0.1',
                       '--dir', self.data, '--save', '',
                       '--appendonly', 'yes' if self.persist else 'no']
            if self.password:
                command += ['--requirepass', self.password]
            return command + list(self.extra)
        store = os.path.join(self.data, 'js')
        command = [NATS_SERVER, '-js', '-a', '127.0.0.1', '-p', str(self.port), '-sd', store]
        if self.password:
            command += ['--pass', self.password, '--user', 'u']
        return command + list(self.extra)

    def start(self, timeout: float = 15.0) -> EngineServer:
        with open(self.log, 'ab') as log:
            self.process = subprocess.Popen(self._command(), stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _answers(self.port):
            if self.process.poll() is not None:
                raise AssertionError(f'{self.kind} server exited with {self.process.returncode}: '
                                     f'{self.log.read_text()[-2000:]}')
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f'{self.kind} server did not listen on {self.port} '
                                     f'within {timeout}s')
            time.sleep(0.02)
        if self.kind == 'nats':
            self._wait_jetstream(deadline)
        return self

    def _wait_jetstream(self, deadline: float) -> None:
        # JetStream answers once it has recovered its store: poll its info endpoint.
        while time.monotonic() < deadline:
            if 'Server is ready' in self.log.read_text(errors='replace').split(
                    'Starting nats-server')[-1]:
                return
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def restart(self, *, persist: bool | None = None) -> None:
        """Kill it and start it again on the same port; without persistence it comes
        back empty."""
        self.kill()
        if persist is False or (persist is None and not self.persist):
            for name in os.listdir(self.data):
                if name != 'server.log':
                    path = os.path.join(self.data, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (half-open)."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop it (even paused) and remove its data."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        shutil.rmtree(self.data, ignore_errors=True)

    def redis_cli(self, *args: str) -> str:
        """Run a redis-cli command against this server (Redis only)."""
        command = ['redis-cli', '-p', str(self.port)]
        if self.password:
            command += ['-a', self.password, '--no-auth-warning']
        return subprocess.run(command + list(args), capture_output=True, text=True,
                              timeout=10, check=True).stdout
