"""Settings: their defaults, the environment, and :func:`configure`.

Each setting is read, in this order, from

1. :func:`configure` (``channels.configure(MAX_CHANNEL_TASK_WORKER_THREADS=8)``),
2. the environment, as ``CHANNELS_<NAME>`` (``CHANNELS_CHANNEL_WORKER_TIMEOUT=0.5``),
3. the default below.

Read a setting as an attribute of this module: ``channels.settings.CHANNEL_WORKER_TIMEOUT``.
Values are validated when set (``configure``) and when read from the environment, and a
bad one raises :class:`~channels.errors.ConfigurationError` naming the setting, the
value and what is allowed. The machinery reads settings when it starts, so
``configure()`` is refused while it runs: call ``channels.shutdown()`` first.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .address import parse_address
from .errors import ConfigurationError

__all__ = ['configure', 'reset', 'names', 'ENV_PREFIX']

ENV_PREFIX = 'CHANNELS_'


@dataclass(frozen=True)
class _Setting:
    default: Any
    parse: Callable[[str, Any], Any]   # (name, value) -> validated value
    doc: str


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f'{name} must be an int >= 1, got {value!r}')
    return value


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or value == float('inf'):
        raise ConfigurationError(f'{name} must be a finite number > 0 (seconds), got {value!r}')
    return float(value)


def _import_string(name: str, value: Any) -> type:
    """Accept a class or a dotted import string ``'package.module.ClassName'``."""
    if isinstance(value, type):
        return value
    if not isinstance(value, str) or '.' not in value:
        raise ConfigurationError(
            f"{name} must be a class or an import string like 'package.module.ClassName', "
            f'got {value!r}')
    module_name, _, class_name = value.strip().rpartition('.')
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f'{name}: cannot import module {module_name!r} named in {value!r}: {exc}') from exc
    try:
        cls = getattr(module, class_name)
    except AttributeError:
        raise ConfigurationError(
            f'{name}: module {module_name!r} has no attribute {class_name!r} '
            f'(from {value!r})') from None
    if not isinstance(cls, type):
        raise ConfigurationError(f'{name}: {value!r} is not a class, got {cls!r}')
    return cls


_required_bases: dict[str, type] = {}
"""Base class name (``'MessageBroker'``) -> the class; filled by the module that defines
the base classes (``channels.workers``), so that this module imports nothing of ours."""


def require_subclass(base: type) -> None:
    """Make the class settings that name *base* accept only its subclasses (called by
    the module that defines *base*, when it is imported)."""
    _required_bases[base.__name__] = base


def _worker_class(base_name: str) -> Callable[[str, Any], type]:
    def parse(name: str, value: Any) -> type:
        """A class (or import string) naming a subclass of channels.<base_name>."""
        cls = _import_string(name, value)
        base = _required_bases[base_name]   # registered: the package imports workers
        if not issubclass(cls, base):
            raise ConfigurationError(
                f'{name} must name a subclass of channels.{base_name}, got {cls!r}')
        return cls
    return parse


_SETTINGS: dict[str, _Setting] = {
    'MAX_CHANNEL_MESSAGE_BROKER_THREADS': _Setting(
        1, _positive_int, 'threads that route messages to channels (spec name)'),
    'MAX_CHANNEL_TASK_WORKER_THREADS': _Setting(
        4, _positive_int, 'threads that run handlers (spec name)'),
    'CHANNEL_MESSAGE_BROKER_CLASS': _Setting(
        'channels.workers.MessageBroker', _worker_class('MessageBroker'),
        'the MessageBroker subclass, as a class or an import string'),
    'CHANNEL_TASK_WORKER_CLASS': _Setting(
        'channels.workers.TaskWorker', _worker_class('TaskWorker'),
        'the TaskWorker subclass, as a class or an import string'),
    'CHANNEL_WORKER_TIMEOUT': _Setting(
        1.0, _positive_float, 'seconds a worker waits for work before run() returns'),
    'CHANNEL_SHUTDOWN_TIMEOUT': _Setting(
        5.0, _positive_float, 'seconds the shutdown at interpreter exit may take'),
}

def _optional_text(name: str, value: Any) -> str | None:
    if value is None or value == '':
        return None
    if not isinstance(value, str):
        raise ConfigurationError(f'{name} must be a str or None, got {value!r}')
    return value


def _authkey(name: str, value: Any) -> bytes | None:
    if value is None or value == '' or value == b'':
        return None
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes):
        raise ConfigurationError(f'{name} must be str or bytes, got {type(value).__name__}')
    return value


def _broker_address(name: str, value: Any) -> str | None:
    value = _optional_text(name, value)
    if value is not None:
        try:
            parse_address(value)
        except ConfigurationError as exc:
            raise ConfigurationError(f'{name}: {exc}') from None
    return value


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def parse(name: str, value: Any) -> str:
        """One of *choices*, in any case."""
        text = value.strip().lower() if isinstance(value, str) else value
        if text not in choices:
            raise ConfigurationError(f'{name} must be one of {", ".join(choices)}, got '
                                     f'{value!r}')
        return text
    return parse


def _topic_length(name: str, value: Any) -> int:
    value = _positive_int(name, value)
    if value > 0xFFFF:
        raise ConfigurationError(f'{name} must be at most 65535 (bytes: the wire format '
                                 f'carries no longer topic), got {value!r}')
    return value


_SETTINGS.update({
    'BROKER_ADDRESS': _Setting(
        None, _broker_address,
        "the broker's socket path or host:port; None runs the embedded default"),
    'AUTHKEY': _Setting(None, _authkey, 'the shared secret of broker and processes'),
    'AUTHKEY_FILE': _Setting(None, _optional_text, 'a file holding the authkey'),
    'MAX_BUFFER_BYTES': _Setting(
        64 * 1024 * 1024, _positive_int,
        'bytes a process buffers for the broker while it is unreachable or slow'),
    'MAX_CONNECTIONS': _Setting(
        1024, _positive_int,
        'app processes the broker serves at once; more are refused with a notice'),
    'MAX_PENDING_BYTES': _Setting(
        64 * 1024 * 1024, _positive_int,
        'bytes the broker holds for one process that reads too slowly; past half of it '
        'its droppable messages are dropped, past all of it it is cut off'),
    'MAX_PENDING_TASKS': _Setting(
        100_000, _positive_int,
        'tasks a process holds before its reader stops reading from the broker '
        '(backpressure)'),
    'REJOIN_TIMEOUT': _Setting(
        5.0, _positive_float,
        'seconds a restarted broker holds messages back until the processes that were '
        'connected before are back'),
    'MAX_FRAME_BYTES': _Setting(
        64 * 1024 * 1024, _positive_int,
        'the largest message, in bytes on the wire; larger ones raise at send()'),
    'HANDSHAKE_TIMEOUT': _Setting(
        5.0, _positive_float,
        'seconds either side gives a new connection to authenticate and say HELLO; the '
        'broker also closes a stats connection idle that long'),
    'MAX_HANDSHAKES': _Setting(
        256, _positive_int,
        '(broker) connections in their handshake (or stats connections) at once; a new '
        'one past it makes the broker drop the oldest of them'),
    'PARTIAL_FRAME_TIMEOUT': _Setting(
        10.0, _positive_float,
        '(broker) seconds a process may leave a frame half-sent before the broker drops '
        'its connection'),
    'BROKER_STATE_FILE': _Setting(
        None, _optional_text,
        "(broker) the file of the pids connected to it, read after a restart; None: "
        "ADDR.peers next to a Unix socket, tcp-HOST-PORT.peers in the per-user private "
        "directory for TCP"),
    'MAX_TOPIC_LENGTH': _Setting(
        4096, _topic_length,
        'the longest topic, in UTF-8 bytes: a longer one raises ValueError at Channel(), '
        'listen(), subscribe() and send(), and the broker drops a process that uses one'),
    'MAX_SUBSCRIPTIONS': _Setting(
        250_000, _positive_int,
        'distinct topics one process may subscribe: past it subscribe() raises '
        'SubscriptionLimitError, and the broker drops a process that subscribes more'),
    'MAX_PATTERNS': _Setting(
        10_000, _positive_int,
        'distinct patterns (topics with *, ? or [...]) one process may subscribe: a message '
        'is tried against those whose literal start and end fit its topic, so they bound '
        'what one message can cost. Past it subscribe() raises SubscriptionLimitError, and '
        'the broker drops a process that subscribes more'),
    'MAX_UNANCHORED_PATTERNS': _Setting(
        1000, _positive_int,
        'distinct patterns with neither a literal prefix nor a literal suffix (such as '
        '*x*) one process may subscribe: each is tried for every message. Past it '
        'subscribe() raises SubscriptionLimitError, and the broker drops a process that '
        'subscribes more'),
    'STALL_TIMEOUT': _Setting(
        2.0, _positive_float,
        'seconds a process may leave what was written to it unread before the broker '
        'cuts it off (so that the confirmations of other processes do not wait for it)'),
    'BRIDGE_URL': _Setting(
        None, _optional_text,
        "(broker) the engine that links this machine's broker with other machines': "
        'redis://[user:password@]host:port/db, rediss://..., nats://host:port or tls://...; '
        'None: this machine only (--bridge)'),
    'BRIDGE_NAMESPACE': _Setting(
        'mpchannels', _optional_text,
        '(broker) names the stream (Redis) or stream and subjects (NATS) on the engine, so '
        'that several apps can share one (--bridge-namespace)'),
    'BRIDGE_ORDER': _Setting(
        'local', _choice('local', 'engine'),
        "(broker) 'local': this machine's processes get its messages at once, the other "
        "machines through the engine; 'engine': every message is routed when it comes "
        'back from the engine, so every channel on every machine sees one order '
        '(--bridge-order)'),
    'BRIDGE_MAX_PENDING_BYTES': _Setting(
        64 * 1024 * 1024, _positive_int,
        '(broker) bytes of messages waiting for the engine to acknowledge them; past it '
        "the excess is dropped, logged, counted (stats: dropped) and reported as lost by "
        "the other machines' brokers to their processes"),
    'BRIDGE_RETENTION_ENTRIES': _Setting(
        100_000, _positive_int,
        '(broker) entries the engine keeps of the stream (Redis MAXLEN ~, JetStream '
        'max_msgs); a broker away for longer than that misses what was trimmed, and is '
        'told'),
    'BRIDGE_RETENTION_SECONDS': _Setting(
        3600.0, _positive_float,
        '(broker) the age past which the engine drops entries (JetStream max_age, Redis '
        'XTRIM MINID)'),
})

_overrides: dict[str, Any] = {}
_is_running: Callable[[], bool] = lambda: False   # set by the runtime


def names() -> list[str]:
    """The names of every setting, in the order they are documented."""
    return list(_SETTINGS)


def _check_name(name: str) -> _Setting:
    try:
        return _SETTINGS[name]
    except KeyError:
        raise ConfigurationError(
            f'unknown setting {name!r}; the settings are: {", ".join(_SETTINGS)}') from None


def get(name: str) -> Any:
    """The current value of setting *name*: configured, else from the environment, else default."""
    spec = _check_name(name)
    if name in _overrides:
        return _overrides[name]
    env_name = ENV_PREFIX + name
    raw = os.environ.get(env_name)
    if raw is not None:
        return spec.parse(env_name, raw)
    return spec.parse(name, spec.default)


def configure(**settings: Any) -> None:
    """Set one or more settings for this process; validated before any is applied.

    Raises :class:`ConfigurationError` for an unknown name or a bad value, and while
    the machinery runs (call ``channels.shutdown()`` first).
    """
    if _is_running():
        raise ConfigurationError(
            'configure() was called while channels is running; its threads read settings '
            'when they start. Call channels.shutdown() first, then configure().')
    parsed = {name: _check_name(name).parse(name, value) for name, value in settings.items()}
    _overrides.update(parsed)


def reset() -> None:
    """Forget every value set by :func:`configure` (the environment and defaults remain)."""
    if _is_running():
        raise ConfigurationError('reset() was called while channels is running; '
                                 'call channels.shutdown() first.')
    _overrides.clear()


def __getattr__(name: str) -> Any:
    if name in _SETTINGS:
        return get(name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
