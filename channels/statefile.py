"""The broker's state file: the origins of the app processes connected to it.

An origin (``message.origin_of``: ``'<pid>-<digest of the secret>-'``) names a process as
only it can prove to be, with the secret of its HELLO: a process that merely says HELLO
with another's pid is not the one awaited. A restarted broker reads the file to know
which processes to wait for before it routes again
(see ``Broker`` in :mod:`channels.broker`). It lives next to a Unix socket
(``ADDR.peers``), in the per-user private directory for a TCP address
(``tcp-HOST-PORT.peers``), or where ``--state-file`` / ``BROKER_STATE_FILE`` says.

It is written as a new 0600 file in the same directory (``mkstemp``: ``O_EXCL``, so no
planted link is followed) renamed over the old one, and read only if it is a regular
file of this user that others cannot write, no larger than :data:`MAX_BYTES`, holding a
JSON list of origins (or of bare pids, which any HELLO with that pid answers). Anything else raises :class:`StateFileError`, which the broker
logs and ignores: a bad state file costs the rejoin hold of one start, never the start.

A bridged broker (``--bridge``) keeps a second file beside it, ``ADDR.bridge`` (the
state file's name with ``.bridge`` for ``.peers``): the bridge's position in the
engine's stream and the last number it had from each other broker
(``Bridge.state()``), so that a restarted broker reads on where it had routed, and
tells its processes of a gap instead of missing it. It is written and read under the
same rules, and holds a JSON object of that shape (:func:`read_bridge_state`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile

from .connection import Address, private_directory

__all__ = ['StateFileError', 'MAX_BYTES', 'default_path', 'pid_of', 'read_pids', 'write_pids',
           'bridge_path', 'read_bridge_state', 'write_bridge_state']

MAX_BYTES = 1024 * 1024
"""The largest state file read (about 100,000 pids)."""

_MAX_PID = 2 ** 31 - 1      # pid_t is a signed 32-bit int
_ORIGIN = re.compile(r'([1-9][0-9]{0,9})-[0-9a-f]{16}-\Z')

Entry = int | str
"""A process in the state file: its origin, or (in a file written by hand) its pid."""


def pid_of(entry: Entry) -> int:
    """The pid of a state file entry."""
    return entry if type(entry) is int else int(entry.partition('-')[0])


class StateFileError(ValueError):
    """A state file that is not one a broker of this user wrote."""


def default_path(address: Address) -> str:
    """Where the broker on *address* keeps its state file by default.

    Raises :class:`~channels.errors.ConfigurationError` if a TCP address's per-user
    directory is not private.
    """
    if isinstance(address, str):
        return address + '.peers'
    host, port = address
    return os.path.join(private_directory(),
                        f"tcp-{re.sub(r'[^A-Za-z0-9_.-]', '_', host)}-{port}.peers")


def read_pids(path: str) -> list[Entry]:
    """The processes in the state file *path*: origins (str), or pids (int).

    Raises :class:`FileNotFoundError` if there is none, :class:`StateFileError` saying
    what is wrong with one that is not trustworthy, and :class:`OSError` if it cannot
    be read.
    """
    pids = _read_json(path)
    if not isinstance(pids, list):
        raise StateFileError(f'it holds a {type(pids).__name__}, not a list of process ids')
    for pid in pids:
        if type(pid) is str:
            found = _ORIGIN.match(pid)
            if found is None or int(found.group(1)) > _MAX_PID:
                raise StateFileError(f'{pid[:100]!r} is not the origin of a process')
        elif type(pid) is not int or not 0 < pid <= _MAX_PID:
            raise StateFileError(f'{pid!r} is not a process id')
    return pids


def _read_json(path: str) -> object:
    """What the file *path* holds, if it is a regular file of this user that others
    cannot write, no larger than MAX_BYTES, holding JSON (else StateFileError)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
            raise StateFileError('it is a symbolic link') from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StateFileError('it is not a regular file')
        if info.st_uid != os.geteuid():
            raise StateFileError(f'it belongs to uid {info.st_uid}, not to this user '
                                 f'(uid {os.geteuid()})')
        if info.st_mode & 0o022:
            raise StateFileError(f'others may write it (mode {stat.S_IMODE(info.st_mode):o})')
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, 'rb') as file:
        data = file.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise StateFileError(f'it is larger than {MAX_BYTES} bytes')
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise StateFileError(f'it is not JSON: {exc}') from None


def write_pids(path: str, pids: list[Entry]) -> None:
    """Replace the state file *path* by one (0600) listing *pids* (origins, or pids);
    raises ``OSError``."""
    _write_json(path, pids)


def bridge_path(state_file: str) -> str:
    """The bridge's state file beside the broker's *state_file*."""
    base = state_file[:-len('.peers')] if state_file.endswith('.peers') else state_file
    return base + '.bridge'


_SCALAR = (str, int, type(None))


def read_bridge_state(path: str) -> dict:
    """The bridge state in *path* (what ``Bridge.state()`` returned), checked for its
    shape: ``{"engine": str, "namespace": str, "position": {str: str|int|null},
    "origins": {str: [incarnation, last]}}`` with numbers in range. Raises as
    :func:`read_pids` does.
    """
    state = _read_json(path)
    if not isinstance(state, dict):
        raise StateFileError(f'it holds a {type(state).__name__}, not a bridge state')
    if not isinstance(state.get('engine'), str) or not isinstance(state.get('namespace'), str):
        raise StateFileError('it names no engine and namespace')
    position = state.get('position')
    if not isinstance(position, dict) or not all(
            isinstance(key, str) and type(value) in _SCALAR
            and (type(value) is not str or len(value) <= 200)
            and (type(value) is not int or 0 <= value < 2 ** 64)
            for key, value in position.items()):
        raise StateFileError(f'its position {str(position)[:100]} is not one a bridge saves')
    origins = state.get('origins')
    if not isinstance(origins, dict):
        raise StateFileError('it lists no origins')
    for name, numbers in origins.items():
        if not (isinstance(numbers, list) and len(numbers) == 2
                and all(type(n) is int and 0 <= n < 2 ** 64 for n in numbers)):
            raise StateFileError(f'origin {name[:100]!r} has {str(numbers)[:100]}, not '
                                 f'[incarnation, last number]')
    return state


def write_bridge_state(path: str, state: dict) -> None:
    """Replace the bridge state file *path* by one (0600) holding *state*; raises
    ``OSError``."""
    _write_json(path, state)


def _write_json(path: str, value: object) -> None:
    directory, name = os.path.split(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp', dir=directory)
    try:
        with os.fdopen(fd, 'w') as file:
            json.dump(value, file)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
