"""Broker addresses: their syntax, read and written. Below the settings, which check
``BROKER_ADDRESS`` with it; listening and connecting are :mod:`channels.connection`'s.

An address is a Unix socket path or ``host:port`` (TCP). Text that contains ``/``, or
no ``:``, is a path; anything else must be ``host:port``, an IPv6 host in brackets.
"""

from __future__ import annotations

import os
import re

from .errors import ConfigurationError

__all__ = ['Address', 'parse_address', 'format_address']

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
