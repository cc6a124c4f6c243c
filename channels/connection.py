"""Addresses, listening, connecting and authenticating: what client and broker share.

An address is a filesystem path (a Unix socket) or ``host:port`` (TCP). Connections
are :class:`multiprocessing.connection.Connection` objects over those sockets: their
length-prefixed messages (a signed 32-bit length, then the bytes) carry the batches of
:mod:`channels.wire`. A TCP address requires an authkey; a Unix socket lives in a
private directory (0700) and is itself 0600.

The handshake, in the same length-prefixed messages, the broker speaking first::

    broker  -> process   b'mpchannels-1 open'                  (the broker has no authkey)
                         b'mpchannels-1 hmac-sha256 ' + Nb     (Nb: 32 random bytes)
    process -> broker    Np + HMAC-SHA256(key, b'process' + Nb + Np)      (Np: 32 bytes)
    broker  -> process   b'welcome ' + HMAC-SHA256(key, b'broker' + Np + Nb)
                         or b'refused' (wrong key), and the broker closes
    process -> broker    HELLO, the first batch of channels.wire, then frames

Both ends prove they hold the key without sending it; fresh nonces on both sides make a
recorded handshake useless. The broker's side is :class:`ServerHandshake`, a state
machine fed bytes as they arrive, so that one thread can run every pending handshake
without blocking on any (see :mod:`channels.gate`); the process's side,
:func:`connect`, blocks, for at most its *timeout*. Each side's error says what went
wrong: nobody listening, a program that is not a broker or never answers, a key missing
on either side, a wrong key.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection

from . import settings
from .address import Address, format_address, parse_address
from .errors import BrokerUnavailableError, ConfigurationError

__all__ = ['Address', 'parse_address', 'format_address', 'default_address',
           'private_directory', 'load_authkey', 'connect', 'listen', 'ServerHandshake',
           'ANSWER_BYTES', 'REFUSAL', 'AuthenticationError']

logger = logging.getLogger(__name__)

def private_directory() -> str:
    """The per-user private directory (``$XDG_RUNTIME_DIR/mpchannels-UID``, else
    ``/tmp/mpchannels-UID``; created 0700 if missing) for the default socket and the
    state files of TCP brokers. Raises :class:`ConfigurationError` if it is not private."""
    base = os.environ.get('XDG_RUNTIME_DIR') or tempfile.gettempdir()
    directory = os.path.join(base, f'mpchannels-{os.getuid()}')
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() \
            or stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigurationError(f'{directory} must be a directory owned by you and private '
                                 f'(0700) to hold the broker socket; fix it or pass --address')
    return directory


def default_address() -> str:
    """A socket in the per-user private directory (see :func:`private_directory`)."""
    return os.path.join(private_directory(), 'broker.sock')


def load_authkey() -> bytes | None:
    """The authkey from ``AUTHKEY`` or ``AUTHKEY_FILE`` (a file's bytes, trailing newline cut)."""
    key = settings.get('AUTHKEY')
    path = settings.get('AUTHKEY_FILE')
    if key is not None and path is not None:
        raise ConfigurationError('set AUTHKEY or AUTHKEY_FILE, not both')
    if path is not None:
        try:
            with open(path, 'rb') as file:
                key = file.read().rstrip(b'\r\n')
        except OSError as exc:
            raise ConfigurationError(f'cannot read the authkey file {path!r}: {exc}') from exc
        if not key:
            raise ConfigurationError(f'the authkey file {path!r} is empty')
    if isinstance(key, str):
        key = key.encode()
    return key


def _socket_for(address: Address) -> socket.socket:
    family = socket.AF_INET6 if isinstance(address, tuple) and ':' in address[0] else \
        socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX
    return socket.socket(family, socket.SOCK_STREAM)


def connect(address: Address, authkey: bytes | None, timeout: float = 5.0, *,
            opened: Callable[[socket.socket], None] | None = None) -> Connection:
    """Connect and authenticate, in at most *timeout* seconds for each of the two.

    Raises :class:`BrokerUnavailableError` saying why: nobody listens, the program there
    is not a broker or does not answer, the key is missing on either side or wrong.
    *opened*, if given, is called with the socket before it connects: another thread
    may shut it down to cancel.
    """
    sock = _socket_for(address)
    text = format_address(address)
    try:
        if opened is not None:
            opened(sock)
    except BaseException:
        sock.close()
        raise
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        if isinstance(address, tuple):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        sock.close()
        raise BrokerUnavailableError(
            f"no broker is listening on {text} ({exc.strerror or exc}); start one with "
            f"'channels-broker --address {text}'") from exc
    try:
        _client_handshake(sock, authkey, text, time.monotonic() + timeout, timeout)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return Connection(sock.detach())


_MAGIC = b'mpchannels-1 '
_OPEN = _MAGIC + b'open'
_KEYED = _MAGIC + b'hmac-sha256 '
_NONCE = 32
_DIGEST = hashlib.sha256().digest_size
_WELCOME = b'welcome '
_REFUSED = b'refused'
_LENGTH = struct.Struct('!i')
ANSWER_BYTES = _LENGTH.size + _NONCE + _DIGEST
"""Bytes of the process's answer to the broker's challenge, as framed on the wire."""
_KEY_HELP = ('CHANNELS_AUTHKEY_FILE or CHANNELS_AUTHKEY in the environment, or '
             '--authkey-file FILE for channels-broker stats')


def _mac(key: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(key, label + first + second, hashlib.sha256).digest()


def _framed(message: bytes) -> bytes:
    return _LENGTH.pack(len(message)) + message


REFUSAL = _framed(_REFUSED)
"""What the broker sends a process whose key is wrong, before it closes."""


def _client_handshake(sock: socket.socket, authkey: bytes | None, text: str,
                      deadline: float, timeout: float) -> None:
    greeting = _receive(sock, text, deadline, timeout, len(_KEYED) + _NONCE)
    if greeting == _OPEN:
        if authkey is not None:
            raise BrokerUnavailableError(
                f'the broker on {text} does not use an authkey, but this process has one '
                f'({_KEY_HELP}): it could not prove it is the broker you meant. Start the '
                f'broker with the same --authkey-file, or give this process no key')
        return
    if not (greeting.startswith(_KEYED) and len(greeting) == len(_KEYED) + _NONCE):
        raise BrokerUnavailableError(
            f'the program on {text} is not an mpchannels broker of this version: its '
            f'handshake began with {greeting[:40]!r}; check the address')
    if authkey is None:
        raise BrokerUnavailableError(
            f'the broker on {text} requires an authkey, and this process has none: give it '
            f"the broker's key with {_KEY_HELP}")
    nonce = greeting[len(_KEYED):]
    mine = os.urandom(_NONCE)
    try:
        sock.sendall(_framed(mine + _mac(authkey, b'process', nonce, mine)))
    except OSError as exc:
        raise BrokerUnavailableError(f'the broker on {text} closed the connection during '
                                     f'the handshake ({exc})') from exc
    verdict = _receive(sock, text, deadline, timeout, len(_WELCOME) + _DIGEST)
    if verdict == _REFUSED:
        raise BrokerUnavailableError(
            f"the broker on {text} refused this process's authkey; is the authkey "
            f"({_KEY_HELP}) the broker's?")
    if not (verdict.startswith(_WELCOME) and hmac.compare_digest(
            verdict[len(_WELCOME):], _mac(authkey, b'broker', mine, nonce))):
        raise BrokerUnavailableError(
            f'the program on {text} could not prove that it holds the authkey: it is not '
            f'the broker you meant (or its key differs; is the authkey the broker\'s?)')


def _receive(sock: socket.socket, text: str, deadline: float, timeout: float,
             limit: int) -> bytes:
    """One length-prefixed handshake message of at most *limit* bytes."""
    header = _receive_exactly(sock, _LENGTH.size, text, deadline, timeout)
    length = _LENGTH.unpack(header)[0]
    if not 0 <= length <= limit:
        raise BrokerUnavailableError(
            f'the program on {text} is not an mpchannels broker of this version: it sent '
            f'{header!r} where the handshake begins; check the address')
    return _receive_exactly(sock, length, text, deadline, timeout)


def _receive_exactly(sock: socket.socket, size: int, text: str, deadline: float,
                     timeout: float) -> bytes:
    data = b''
    while len(data) < size:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(size - len(data))
        except TimeoutError:
            raise BrokerUnavailableError(
                f'the program on {text} accepted the connection but did not finish the '
                f'handshake within {timeout:.3g}s; is a channels broker listening there, '
                f'and is it overloaded? (HANDSHAKE_TIMEOUT)') from None
        except OSError as exc:
            raise BrokerUnavailableError(f'the broker on {text} closed the connection '
                                         f'during the handshake ({exc})') from exc
        if not chunk:
            raise BrokerUnavailableError(
                f'the broker on {text} closed the connection during the handshake (it drops '
                f'handshakes past MAX_HANDSHAKES or slower than HANDSHAKE_TIMEOUT: see its '
                f'log)')
        data += chunk
    return data


class ServerHandshake:
    """The broker's side of the handshake, without I/O: send :attr:`greeting`, then, if
    :attr:`done` is False, feed :meth:`answer` the process's answer (the first
    :data:`ANSWER_BYTES` bytes it sends) and send what it returns.
    """

    __slots__ = ('authkey', 'nonce', 'greeting', 'done')

    def __init__(self, authkey: bytes | None) -> None:
        self.authkey = authkey
        self.nonce = b'' if authkey is None else os.urandom(_NONCE)
        self.greeting = _framed(_OPEN if authkey is None else _KEYED + self.nonce)
        self.done = authkey is None
        """True once the process is authenticated (at once without an authkey)."""

    def answer(self, data: bytes) -> bytes:
        """Check the process's answer (:data:`ANSWER_BYTES` bytes); the reply to send.

        Raises :class:`AuthenticationError` for a wrong key or a malformed answer; send
        :data:`REFUSAL` then, and close.
        """
        if self.done or self.authkey is None or len(data) != ANSWER_BYTES:
            raise AuthenticationError('a handshake answer out of turn or of the wrong size')
        length = _LENGTH.unpack_from(data)[0]
        theirs, mac = data[4:4 + _NONCE], data[4 + _NONCE:]
        if length != _NONCE + _DIGEST or not hmac.compare_digest(
                bytes(mac), _mac(self.authkey, b'process', self.nonce, bytes(theirs))):
            raise AuthenticationError('the answer to the challenge does not match the key')
        self.done = True
        return _framed(_WELCOME + _mac(self.authkey, b'broker', theirs, self.nonce))


def listen(address: Address, backlog: int = 128) -> socket.socket:
    """A listening socket on *address*; a stale Unix socket file is replaced.

    Raises :class:`OSError`: ``EADDRINUSE`` if a live broker listens there already,
    ``EEXIST`` if the path is anything but a socket (a file, a directory, a symlink):
    only a socket is ever replaced.
    """
    if isinstance(address, str):
        _replace_stale_socket(address)
    sock = _socket_for(address)
    try:
        if isinstance(address, tuple):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        else:
            old_umask = os.umask(0o177)          # the socket is created 0600
            try:
                sock.bind(address)
            finally:
                os.umask(old_umask)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _replace_stale_socket(path: str) -> None:
    """Remove *path* if it is a socket nobody listens on; refuse anything else there."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        kind = ('a symbolic link' if stat.S_ISLNK(info.st_mode) else
                'a directory' if stat.S_ISDIR(info.st_mode) else
                'a regular file' if stat.S_ISREG(info.st_mode) else 'a special file')
        raise OSError(errno.EEXIST, f'{path} exists and is {kind}, not a socket; only a '
                      f"stale broker socket is replaced: remove it or choose another "
                      f"--address", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)                          # stale: its broker is gone
    except OSError as exc:
        raise OSError(exc.errno, f'{path} exists and is not a broker socket: '
                      f'{exc.strerror}', path) from exc
    else:
        raise OSError(errno.EADDRINUSE, f'a broker is already listening on {path}', path)
    finally:
        probe.close()
