"""A ``redis-server`` or ``nats-server -js`` of our own: for the bridged cases, and for the
tests (``tests/engines.py`` builds its :class:`EngineServer` on :class:`Engine`).

Each one starts on a free port (never the machine's own 6379 or 4222), with its data in a
temporary directory, and is always stopped (the benchmark: ``Cluster.close()``). Both
keep what the bridge's promises need: Redis with ``appendonly yes`` (fsync every second,
its default), NATS with JetStream on file storage.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REDIS_SERVER = '/usr/bin/redis-server'
NATS_SERVER = '/usr/sbin/nats-server'
KINDS = ('redis', 'nats')
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


class Engine:
    """One ``redis-server`` or ``nats-server -js`` process with a data directory of its own.

    ``start()`` returns once it accepts connections (NATS: once JetStream is ready);
    ``stop()`` stops it and removes its data. ``url`` is what the clients connect to.
    *persist* ``False`` runs Redis without its append-only file; *password* makes the
    server ask for one (NATS: user ``u``); *extra* goes at the end of its command line.
    """

    DATA_PREFIX = 'mpch-bench-'
    """How the names of the data directories start."""

    def __init__(self, kind: str, *, persist: bool = True, password: str | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        if kind not in KINDS:
            raise ValueError(f'unknown engine {kind!r}; one of {KINDS}')
        self.kind = kind
        self.persist = persist
        self.password = password
        self.extra = extra
        self.port = free_port()
        self.data = tempfile.mkdtemp(prefix=f'{self.DATA_PREFIX}{kind}-')
        self.log = Path(self.data) / 'server.log'
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` or ``nats://127.0.0.1:PORT`` (with the password)."""
        auth = f':{self.password}@' if self.password else ''
        if self.kind == 'redis':
            return f'redis://{auth}127.0.0.1:{self.port}/0'
        return f'nats://{auth}127.0.0.1:{self.port}'

    @property
    def pid(self) -> int:
        """The server's pid (it must be started)."""
        assert self.process is not None, 'the engine is not started'
        return self.process.pid

    def _command(self) -> list[str]:
        if self.kind == 'redis':
            command = [REDIS_SERVER, '--port', str(self.port), '--bind', '127.0.0.1',
                       '--dir', self.data, '--save', '',
                       '--appendonly', 'yes' if self.persist else 'no']
            if self.password:
                command += ['--requirepass', self.password]
            return command + list(self.extra)
        command = [NATS_SERVER, '-js', '-a', '127.0.0.1', '-p', str(self.port),
                   '-sd', str(Path(self.data) / 'js')]
        if self.password:
            command += ['--pass', self.password, '--user', 'u']
        return command + list(self.extra)

    def start(self, timeout: float = 15.0) -> Engine:
        """Start the server; return once it is ready, or raise ``RuntimeError`` saying why
        not (stopping it if it did not get ready in time)."""
        server = self._command()[0]
        if not Path(server).exists():
            raise RuntimeError(f'{server} is missing: apt-get install redis-server '
                               f'nats-server (or see .ci/run)')
        with open(self.log, 'ab') as log:
            self.process = subprocess.Popen(self._command(), stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.process.poll() is not None:
                raise RuntimeError(f'{self.kind} server exited with {self.process.returncode}:'
                                   f' {self.log.read_text(errors="replace")[-2000:]}')
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f'{self.kind} server not ready on port {self.port} within '
                                   f'{timeout:g} s')
            time.sleep(0.02)
        return self

    def _ready(self) -> bool:
        if not _answers(self.port):
            return False
        if self.kind == 'redis':
            return True
        # JetStream is ready once it has recovered its store; only this start's lines
        # count (a restarted server appends to the same log)
        this_start = self.log.read_text(errors='replace').split('Starting nats-server')[-1]
        return 'Server is ready' in this_start

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL; even if it was SIGSTOPped) and remove
        its data."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            try:
                process.wait(5.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5.0)
        shutil.rmtree(self.data, ignore_errors=True)
