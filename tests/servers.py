"""Real servers launched by ``channels-broker --address A -- COMMAND`` for the tests:
starting them, waiting for them, and always stopping their whole process tree; and the
headless Chromium that opens their pages."""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from brokers import BROKER_SCRIPT, ROOT
from support import wait_until

from channels.cli import fetch_stats
from channels.errors import ChannelsError

SUBSCRIPTION = 'chat.*'
"""The topic the test apps subscribe to in every worker."""

CHROMIUM = Path('/usr/bin/chromium')
"""Debian's Chromium, which Playwright drives (``apt-get install -y chromium``)."""
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
                 '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync']


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
    """``channels-broker --address A [BROKER_ARGS] -- COMMAND`` running, with its output in
    files; *env* adds to the environment it inherits (less any ``CHANNELS_`` variable)."""

    def __init__(self, address: str, command: list[str], port: int, workers: int,
                 out_dir: Path, log_dir: Path, broker_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.address = address
        self.port = port
        self.workers = workers
        self.out_dir = out_dir
        self.stdout_path = log_dir / 'launcher.stdout'
        self.stderr_path = log_dir / 'launcher.stderr'
        self.known: dict[int, psutil.Process] = {}    # every process seen in the tree
        environment = {name: value for name, value in os.environ.items()
                       if not name.startswith('CHANNELS_')}
        environment['MPCH_OUT_DIR'] = str(out_dir)
        environment['PYTHONUNBUFFERED'] = '1'
        environment.update(env or {})
        with open(self.stdout_path, 'wb') as stdout, open(self.stderr_path, 'wb') as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(BROKER_SCRIPT), '--address', address, *broker_args,
                 '--', *command],
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=environment,
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

    def wait_http(self, timeout: float = 20.0, path: str = '/pid') -> None:
        """Wait until the server answers ``GET path``."""
        def answers() -> bool:
            self._alive()
            try:
                http_get(self.port, path, timeout=1.0)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                return False
            return True
        try:
            wait_until(answers, timeout, what=f'the server to answer on port {self.port}',
                       interval=0.05)
        except AssertionError as exc:
            raise AssertionError(f'{exc}\n{self.log}') from None

    def wait_forked(self, timeout: float = 20.0) -> None:
        """Wait until the server's master has all ``self.workers`` children (gunicorn
        forks its workers a random tenth of a second apart, so one may answer HTTP well
        before the last exists)."""
        def forked() -> bool:
            self._alive()
            return len(self.server().children()) >= self.workers
        try:
            wait_until(forked, timeout, interval=0.02,
                       what=f'the server to have {self.workers} workers')
        except AssertionError as exc:
            raise AssertionError(f'{exc}\n{self.log}') from None

    def subscribed_workers(self, topic: str = SUBSCRIPTION) -> set[int]:
        """The server's worker processes that the broker lists as subscribed to *topic*."""
        self.tree()
        workers = {child.pid for child in self.server().children()}
        try:
            stats = fetch_stats(self.address)
        except ChannelsError:
            return set()
        return {line['pid'] for line in stats['processes']
                if line['pid'] in workers and topic in line['subscriptions']}

    def wait_workers(self, timeout: float = 20.0, topic: str = SUBSCRIPTION) -> set[int]:
        """Wait until ``self.workers`` workers are connected and subscribed to *topic*;
        their pids."""
        found: set[int] = set()

        def ready() -> bool:
            nonlocal found
            self._alive()
            found = self.subscribed_workers(topic)
            return len(found) >= self.workers
        try:
            wait_until(ready, timeout, interval=0.05,
                       what=f'{self.workers} workers subscribed to {topic!r} at the '
                            f'broker')
        except AssertionError as exc:
            raise AssertionError(f'{exc}; subscribed workers: {sorted(found)}; broker: '
                                 f'{stats_or_error(self.address)}\n{self.log}') from None
        assert len(found) == self.workers, (found, self.log)
        return found

    # stopping -------------------------------------------------------------------------

    def sigterm_timed(self, timeout: float = 30.0) -> tuple[int | None, float]:
        """SIGTERM to the launcher; its exit status (None if it had not exited within
        *timeout*: ``stop()`` cleans up) and the seconds until it exited."""
        self.tree()                          # every process, for the clean-up
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            status = None
        return status, time.monotonic() - started

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


def stats_or_error(address: str) -> object:
    """The broker's stats, or the error that fetching them raised (for failure messages)."""
    try:
        return fetch_stats(address)
    except ChannelsError as exc:
        return exc


class SSEStreams:
    """*count* raw HTTP/1.1 ``GET path`` streams (Server-Sent Events) on *port*, read
    together without blocking; ``received`` holds each one's bytes so far."""

    def __init__(self, port: int, count: int, path: str = '/events') -> None:
        self.selector = selectors.DefaultSelector()
        self.received: dict[socket.socket, bytes] = {}
        for _ in range(count):
            sock = socket.create_connection(('127.0.0.1', port), timeout=5)
            sock.sendall(f'GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n'.encode())
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)
            self.received[sock] = b''
        self.open = set(self.received)

    def read(self, until, timeout: float) -> None:
        """Read until ``until(data)`` holds for the bytes of every stream (or it closed)."""
        deadline = time.monotonic() + timeout
        waiting = {s for s in self.received if s in self.open and not until(self.received[s])}
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f'{len(waiting)} of {len(self.received)} streams not '
                                     f'done in {timeout}s; one of them got '
                                     f'{self.received[next(iter(waiting))][-300:]!r}')
            for key, _ in self.selector.select(min(left, 0.2)):
                sock = key.fileobj
                try:
                    chunk = sock.recv(65536)
                except ConnectionError:
                    chunk = b''
                if chunk:
                    self.received[sock] += chunk
                else:
                    self.open.discard(sock)
                    self.selector.unregister(sock)
                if not chunk or until(self.received[sock]):
                    waiting.discard(sock)

    def events(self) -> list[list[tuple[str, object]]]:
        """Each stream's events so far, in order: (name, JSON data)."""
        return [sse_events_in(data) for data in self.received.values()]

    def ready_pids(self) -> list[int]:
        """The pid in each stream's ``event: ready`` (``{"pid": ...}``), in order."""
        return [next(data['pid'] for name, data in events if name == 'ready')
                for events in self.events()]

    def close(self) -> None:
        for sock in self.received:
            sock.close()
        self.selector.close()


def ended(data: bytes) -> bool:
    """Whether *data* is a whole chunked response: it ends with the last chunk."""
    return data.endswith(b'\r\n0\r\n\r\n')


def sse_events_in(response: bytes) -> list[tuple[str, object]]:
    """The events (name, JSON data) of a chunked HTTP response holding Server-Sent Events,
    as far as it arrived; comments and incomplete events are left out."""
    body, rest = b'', response.partition(b'\r\n\r\n')[2]
    while rest:
        size, sep, rest = rest.partition(b'\r\n')
        if not sep or not size:
            break
        length = int(size, 16)
        if length == 0:
            break
        body, rest = body + rest[:length], rest[length + 2:]
    events = []
    for block in body.decode().split('\n\n')[:-1]:
        fields = dict(line.split(': ', 1) for line in block.splitlines()
                      if line and not line.startswith(':'))
        if 'data' in fields:
            events.append((fields.get('event', 'message'), json.loads(fields['data'])))
    return events


@contextmanager
def chromium() -> Iterator[object]:
    """Headless Chromium driven by Playwright (a ``Browser``); always closed."""
    assert CHROMIUM.exists(), f'{CHROMIUM} is missing: apt-get install -y chromium'
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser, timeout: float, **context: object) -> object:
    """A page of *browser* in a browser context of its own (*context*: the arguments of
    ``new_context``, such as ``viewport``), waiting *timeout* s at most by default."""
    page = browser.new_context(**context).new_page()
    page.set_default_timeout(timeout * 1000)
    return page


def open_page(browser, url: str, ready: str, timeout: float, **context: object) -> object:
    """:func:`new_page` at *url*, once the selector *ready* matches."""
    page = new_page(browser, timeout, **context)
    page.goto(url)
    page.wait_for_selector(ready)
    return page
