"""Addresses, listening, connecting and authenticating: what client and broker share.

An address is a filesystem path (a Unix socket) or ``host:port`` (TCP). Connections
are :class:`multiprocessing.connection.Connection` objects over those sockets: their
length-prefixed messages carry the batches of :mod:`channels.wire`, and their HMAC
challenge authenticates both ends when an authkey is set. A TCP address requires an
authkey; a Unix socket lives in a private directory (0700) and is itself 0600.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import stat
import tempfile
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

from . import settings
from .errors import BrokerUnavailableError, ConfigurationError

__all__ = ['Address', 'parse_address', 'format_address', 'default_address',
           'private_directory', 'load_authkey',
           'connect', 'listen', 'server_handshake', 'AuthenticationError']

logger = logging.getLogger(__name__)

Address = str | tuple[str, int]

_TCP = re.compile(r'^(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$')
_ADDRESS_FORMS = ('an address is a Unix socket path (one that contains ":" must contain '
                  '"/" too, e.g. ./a:b.sock) or host:port, e.g. 127.0.0.1:5555 or '
                  '[::1]:5555')


def parse_address(text: str) -> Address:
    """``'host:port'`` -> ``(host, port)``; a path -> its absolute form.

    Text that contains ``/``, or no ``:``, is a Unix socket path; anything else must be
    ``host:port`` (an IPv6 host in brackets). Raises :class:`ConfigurationError` for
    empty text and for a malformed ``host:port``, saying what a valid address looks like.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigurationError(f'the broker address is empty ({text!r}); {_ADDRESS_FORMS}')
    text = text.strip()
    if '/' in text or ':' not in text:
        return os.path.abspath(os.path.expanduser(text))
    found = _TCP.match(text)
    if found is None:
        raise ConfigurationError(f'broker address {text!r} is not valid: '
                                 f'{_tcp_problem(text)}; {_ADDRESS_FORMS}')
    port = int(found['port'])
    if not 0 < port < 65536:
        raise ConfigurationError(f'port must be 1..65535 in broker address {text!r}; '
                                 f'{_ADDRESS_FORMS}')
    return found['host'].strip('[]'), port


def _tcp_problem(text: str) -> str:
    """What is wrong with *text* as ``host:port`` (which ``_TCP`` did not match)."""
    host, _, port = text.rpartition(':')
    if not host:
        return 'there is no host before the ":"'
    if not port:
        return 'there is no port after the ":"'
    if not port.isdigit() or len(port) > 5:
        return f'the port {port!r} is not a number 1..65535'
    if ':' in host and not host.startswith('['):
        return 'an IPv6 host must be in brackets'
    return f'{host!r} is not a host name or IP address'


def format_address(address: Address) -> str:
    """The text form of *address*, as ``parse_address`` reads it."""
    if isinstance(address, tuple):
        host, port = address
        return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'
    return address


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


def connect(address: Address, authkey: bytes | None, timeout: float = 5.0) -> Connection:
    """Connect and authenticate; raises :class:`BrokerUnavailableError` if nobody listens."""
    sock = _socket_for(address)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.settimeout(None)
        if isinstance(address, tuple):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        sock.close()
        text = format_address(address)
        raise BrokerUnavailableError(
            f"no broker is listening on {text} ({exc.strerror or exc}); start one with "
            f"'channels-broker --address {text}'") from exc
    connection = Connection(sock.detach())
    if authkey is not None:
        try:
            answer_challenge(connection, authkey)
            deliver_challenge(connection, authkey)
        except (AuthenticationError, OSError, EOFError) as exc:
            connection.close()
            raise BrokerUnavailableError(
                f'the broker on {format_address(address)} refused this process: {exc!r}; '
                f'is the authkey (CHANNELS_AUTHKEY / CHANNELS_AUTHKEY_FILE) the broker\'s?'
            ) from exc
    return connection


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


def server_handshake(connection: Connection, authkey: bytes | None) -> None:
    """The broker's side of authentication (raises ``AuthenticationError`` if it fails)."""
    if authkey is not None:
        deliver_challenge(connection, authkey)
        answer_challenge(connection, authkey)
