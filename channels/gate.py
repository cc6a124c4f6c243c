"""The broker's front door: accepting, handshakes and stats requests, on one thread.

::

    listener --accept--> pending connection (non-blocking, in one selector)
        handshake (connection.ServerHandshake), then the first batch: HELLO
          -> an app process: handed to the broker (on_hello), which gives it a reader
             and a writer thread once it is admitted
          -> a stats client: served here, one STATS request at a time (on_stats)
    wake-up pipe -> stop()

No connection holds a thread before it has authenticated and said HELLO: a stalled
handshake costs a descriptor and a few hundred bytes, for at most ``timeout`` seconds
(``HANDSHAKE_TIMEOUT``), after which it is closed; a stats connection is closed once
it has been idle that long. At most ``max_pending`` connections (``MAX_HANDSHAKES``,
stats connections included) are kept here at once. A new connection past that evicts
the oldest pending one rather than being refused: an honest process finishes its
handshake within a round trip or two, so a flood of silent connections pushes out only
each other, never a process that came after them and talks.

The gate reads exactly what each step needs (the answer to the challenge, the length
of the first batch, the batch), so nothing is read ahead of what it hands over.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from . import wire
from .connection import ANSWER_BYTES, REFUSAL, AuthenticationError, ServerHandshake
from .errors import ProtocolError

__all__ = ['Gate', 'HELLO_LIMIT']

logger = logging.getLogger(__name__)

HELLO_LIMIT = 64 * 1024
"""Bytes the first batch of a connection (HELLO, and what a client puts with it) may have."""

_STATS_LIMIT = 64 * 1024
_ACCEPTS_PER_WAKE = 64

_REPORT_BURST = 10
"""Log lines about one kind of dropped connection per interval; the rest are counted."""

_REPORT_INTERVAL = 5.0
"""Seconds of that interval."""

_ANSWER, _LENGTH, _BATCH = 'answer', 'length', 'batch'


class _Pending:
    """A connection in the gate: its socket, the step it is at and its deadline."""

    __slots__ = ('sock', 'handshake', 'step', 'want', 'inbox', 'outbox', 'deadline',
                 'received', 'stats')

    def __init__(self, sock: socket.socket, handshake: ServerHandshake, deadline: float
                 ) -> None:
        self.sock = sock
        self.handshake = handshake
        self.step = _LENGTH if handshake.done else _ANSWER
        self.want = 4 if handshake.done else ANSWER_BYTES
        self.inbox = bytearray()
        self.outbox = bytearray(handshake.greeting)
        self.deadline = deadline
        self.received = 0           # bytes received so far (0: a probe, if it closes)
        self.stats = False          # a stats client, past its HELLO


class _Reports:
    """Log lines about dropped connections, at most a few per kind every few seconds: a
    flood of them must not flood the log too. Counts what it held back, and says so."""

    def __init__(self) -> None:
        self._window: dict[str, tuple[float, int]] = {}     # kind -> (start, lines logged)
        self._held: dict[str, tuple[int, str, tuple[Any, ...]]] = {}

    def warn(self, kind: str, text: str, *args: Any) -> None:
        now = time.monotonic()
        start, logged = self._window.get(kind, (-_REPORT_INTERVAL, 0))
        if now - start >= _REPORT_INTERVAL:
            start, logged = now, 0
        if logged < _REPORT_BURST:
            self._window[kind] = (start, logged + 1)
            held = self._held.pop(kind, None)
            more = f' (and {held[0]} more like it in the last {_REPORT_INTERVAL:.0f}s)' \
                if held else ''
            logger.warning(text + more, *args)
        else:
            count = self._held.get(kind, (0, '', ()))[0]
            self._held[kind] = (count + 1, text, args)

    def flush(self) -> None:
        """Say what was held back."""
        for kind, (count, text, args) in self._held.items():
            logger.warning(text + ' (%d more like it)', *args, count)
        self._held.clear()


class Gate:
    """Accepts connections on *listener* and runs their handshakes on one thread.

    *on_hello(sock, batch)* gets each authenticated connection's socket (blocking again)
    and first batch; it returns True if it took the socket (an app process, admitted or
    refused), False for a stats client, which the gate serves with *on_stats()* (the
    reply's JSON object). It may raise :class:`ProtocolError` for a bad HELLO.
    ``start()`` starts the thread; ``stop()`` wakes it, closes every pending connection
    and the listener, and joins it.
    """

    def __init__(self, listener: socket.socket, authkey: bytes | None, *,
                 max_pending: int, timeout: float,
                 on_hello: Callable[[socket.socket, bytes], bool],
                 on_stats: Callable[[], dict[str, Any]]) -> None:
        self.listener = listener
        self.authkey = authkey
        self.max_pending = max_pending
        self.timeout = timeout
        self.on_hello = on_hello
        self.on_stats = on_stats
        self.tcp = listener.family in (socket.AF_INET, socket.AF_INET6)
        self._pending: dict[socket.socket, _Pending] = {}    # oldest deadline first
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = os.pipe()
        self._stopping = False
        self._paused_until = 0.0
        self._reports = _Reports()
        self._thread = threading.Thread(target=self._loop, name='channels-accept',
                                        daemon=True)

    def __repr__(self) -> str:
        return f'<Gate pending={len(self._pending)} max={self.max_pending}>'

    @property
    def thread(self) -> threading.Thread:
        """The gate's thread."""
        return self._thread

    def start(self) -> None:
        """Start accepting."""
        self.listener.setblocking(False)
        os.set_blocking(self._wake_read, False)
        self._selector.register(self.listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop accepting, close what is pending; True if the thread ended in time.
        Idempotent."""
        self._stopping = True
        if self._wake_write >= 0:
            os.write(self._wake_write, b'x')
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        if self._wake_write >= 0:
            os.close(self._wake_read)
            os.close(self._wake_write)
            self._wake_read = self._wake_write = -1
        return True

    # the thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopping:
                try:
                    self._turn()
                except Exception:
                    logger.exception('the gate failed; it goes on')
                    time.sleep(0.01)
        finally:
            for pending in list(self._pending.values()):
                self._close(pending)
            self._reports.flush()
            self._selector.close()
            self.listener.close()

    def _turn(self) -> None:
        now = time.monotonic()
        timeout = None
        if self._pending:
            timeout = max(next(iter(self._pending.values())).deadline - now, 0)
        if self._paused_until:
            pause = self._paused_until - now
            if pause <= 0:
                self._paused_until = 0.0
                self._selector.register(self.listener, selectors.EVENT_READ, None)
            else:
                timeout = pause if timeout is None else min(timeout, pause)
        for key, events in self._selector.select(timeout):
            if key.fileobj is self.listener:
                self._accept()
            elif key.fileobj == self._wake_read:
                return
            else:
                pending = key.data
                if pending.sock not in self._pending:
                    continue            # evicted by an accept of this same turn
                try:
                    if events & selectors.EVENT_WRITE:
                        self._write(pending)
                    if events & selectors.EVENT_READ and pending.sock in self._pending:
                        self._read(pending)
                except (ProtocolError, AuthenticationError, OSError) as exc:
                    self._failed(pending, exc)
                except Exception:
                    logger.exception('a connection in its handshake failed; it is closed')
                    self._close(pending)
        now = time.monotonic()
        while self._pending:
            pending = next(iter(self._pending.values()))
            if pending.deadline > now:
                break
            if pending.stats:
                logger.debug('closed an idle stats connection')
            else:
                self._reports.warn('timeout', 'a connection did not finish its handshake '
                                   'within %.3gs (HANDSHAKE_TIMEOUT); dropped', self.timeout)
            self._close(pending)

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_WAKE):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._reports.warn('accept', 'accept() failed: %s; closing the oldest '
                                       'pending connection, or pausing accepts', exc)
                    if self._pending:
                        self._close(next(iter(self._pending.values())))
                    else:
                        self._selector.unregister(self.listener)
                        self._paused_until = time.monotonic() + 0.1
                        return
                continue                 # e.g. ECONNABORTED: that one is gone
            if len(self._pending) >= self.max_pending:
                oldest = next(iter(self._pending.values()))
                self._reports.warn('evicted', 'dropped the oldest connection still in its '
                                   'handshake: %d are (MAX_HANDSHAKES)', self.max_pending)
                self._close(oldest)
            sock.setblocking(False)
            if self.tcp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pending = _Pending(sock, ServerHandshake(self.authkey),
                               time.monotonic() + self.timeout)
            self._pending[sock] = pending
            self._selector.register(sock, selectors.EVENT_READ, pending)
            try:
                self._write(pending)
            except OSError as exc:
                self._failed(pending, exc)

    def _write(self, pending: _Pending) -> None:
        """Send what the outbox holds, as far as the socket takes it now."""
        if pending.outbox:
            sent = pending.sock.send(pending.outbox)
            del pending.outbox[:sent]
        # while a reply is unsent, read nothing more: a client that asks and does not
        # read holds one reply here, not many
        events = selectors.EVENT_WRITE if pending.outbox else selectors.EVENT_READ
        if self._selector.get_key(pending.sock).events != events:
            self._selector.modify(pending.sock, events, pending)

    def _read(self, pending: _Pending) -> None:
        data = pending.sock.recv(pending.want - len(pending.inbox))
        if not data:
            self._ended(pending)
            return
        pending.received += len(data)
        pending.inbox += data
        while len(pending.inbox) == pending.want:
            if not self._step(pending):
                return

    def _step(self, pending: _Pending) -> bool:
        """The inbox holds what the current step wants: take it; False once the
        connection has left the gate (or waits to write)."""
        inbox, pending.inbox = bytes(pending.inbox), bytearray()
        if pending.step == _ANSWER:
            try:
                reply = pending.handshake.answer(inbox)
            except AuthenticationError:
                try:
                    pending.sock.send(REFUSAL)
                except OSError:
                    pass
                raise
            pending.outbox += reply
            pending.step, pending.want = _LENGTH, 4
            self._write(pending)
            return True
        if pending.step == _LENGTH:
            length = wire._CONNECTION_LENGTH.unpack(inbox)[0]
            limit = _STATS_LIMIT if pending.stats else HELLO_LIMIT
            if not 0 <= length <= limit:
                what = 'a stats request' if pending.stats else 'the first batch (HELLO)'
                raise ProtocolError(f'{what} announced {length} bytes; the limit is {limit}')
            pending.step, pending.want = _BATCH, length
            if length:
                return True
            inbox = b''
        pending.step, pending.want = _LENGTH, 4
        if pending.stats:
            self._serve_stats(pending, inbox)
            return not pending.outbox
        self._forget(pending)
        sock = pending.sock
        sock.setblocking(True)
        try:
            taken = self.on_hello(sock, inbox)
        except BaseException:
            sock.close()
            raise
        if taken:
            return False
        sock.setblocking(False)           # a stats client: it stays here
        pending.stats = True
        self._keep(pending)
        return True

    def _serve_stats(self, pending: _Pending, batch: bytes) -> None:
        for kind, _, _ in wire.iter_frames(batch, _STATS_LIMIT):
            if kind != wire.STATS:
                raise ProtocolError(f'a stats connection may only send STATS, not '
                                    f'{wire.KIND_NAMES[kind]}')
            pending.outbox += wire.connection_bytes(
                wire.encode_json(wire.STATS, self.on_stats()))
        self._forget(pending)
        self._keep(pending)         # idle from now: a fresh deadline, last in line
        self._write(pending)

    def _keep(self, pending: _Pending) -> None:
        pending.deadline = time.monotonic() + self.timeout
        self._pending[pending.sock] = pending
        self._selector.register(pending.sock, selectors.EVENT_READ, pending)

    def _ended(self, pending: _Pending) -> None:
        if pending.stats:
            pass
        elif not pending.received:
            # probing the address (as a second broker does before it gives up) is no fault
            logger.debug('a connection closed before it sent anything')
        else:
            self._reports.warn('ended', 'a connection closed during its handshake')
        self._close(pending)

    def _failed(self, pending: _Pending, exc: BaseException) -> None:
        if isinstance(exc, AuthenticationError):
            self._reports.warn('key', 'refused a connection: wrong authkey (%s)', exc)
        elif isinstance(exc, ProtocolError):
            # one line per kind of fault, e.g. each bad HELLO field (the text up to 'got')
            kind = 'protocol: ' + str(exc).partition(', got')[0][:60]
            self._reports.warn(kind, 'dropped a connection in its handshake: %s', exc)
        elif not self._stopping:
            logger.debug('a connection in its handshake failed: %r', exc)
        self._close(pending)

    def _forget(self, pending: _Pending) -> None:
        if self._pending.pop(pending.sock, None) is not None:
            self._selector.unregister(pending.sock)

    def _close(self, pending: _Pending) -> None:
        self._forget(pending)
        pending.sock.close()
