"""``channels-broker``: serve, launch a server under the broker, or print its stats.

::

    channels-broker [--address ADDR] [--authkey-file F] [--broker-threads N]
                    [--broker-class DOTTED] [--max-connections N]
                    [--log-level L] [--stop-timeout S]                   # serve
    channels-broker [options] -- COMMAND ARGS...                         # launcher
    channels-broker stats [--address ADDR] [--authkey-file F] [--json]   # live state

Also ``python -m channels``. The broker prints ``channels-broker: listening on ADDR``
once it listens (after its signal handlers are installed), and exits 0 after a
graceful stop on SIGTERM or SIGINT. The launcher runs COMMAND with
``CHANNELS_BROKER_ADDRESS`` (and the authkey file, if any) in its environment,
forwards SIGTERM/SIGINT to it, stops the broker once it exits and exits with its status.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

__all__ = ['main', 'fetch_stats']

logger = logging.getLogger('channels.cli')


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--address', help='socket path or host:port (default: '
                        '$CHANNELS_BROKER_ADDRESS, else a socket in a private directory)')
    parser.add_argument('--authkey-file', help='file holding the shared secret '
                        '(default: $CHANNELS_AUTHKEY_FILE or $CHANNELS_AUTHKEY); required '
                        'for a TCP address')


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='channels-broker',
        description='Route mpchannels messages between the processes of one machine.',
        epilog='channels-broker [options] -- COMMAND runs COMMAND (e.g. gunicorn -w 4 '
               'app:app) with CHANNELS_BROKER_ADDRESS set, and stops when it exits. '
               "'channels-broker stats --help' for the live state.")
    _common(parser)
    parser.add_argument('--broker-threads', type=int, default=1, metavar='N',
                        help='routing threads (default 1: one global order)')
    parser.add_argument('--broker-class', metavar='DOTTED',
                        help='a channels.MessageBroker subclass, package.module.Class')
    parser.add_argument('--max-connections', type=int, metavar='N',
                        help='app processes served at once; more are refused with a '
                             'notice (default: $CHANNELS_MAX_CONNECTIONS or 1024)')
    parser.add_argument('--log-level', default='INFO',
                        choices=['DEBUG', 'INFO', 'WARNING', 'ERROR'])
    parser.add_argument('--stop-timeout', type=float, default=10.0, metavar='S',
                        help='seconds a graceful stop may take (default 10)')
    return parser


def _stats_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='channels-broker stats',
                                     description="Print a running broker's live state.")
    _common(parser)
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    return parser


def _resolve(args: argparse.Namespace) -> tuple[Any, bytes | None]:
    from . import settings
    from .connection import default_address, load_authkey, parse_address
    if args.authkey_file:
        settings.configure(AUTHKEY_FILE=args.authkey_file, AUTHKEY=None)
    address_text = args.address or settings.get('BROKER_ADDRESS') or default_address()
    return parse_address(address_text), load_authkey()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['stats']:
        return _stats(_stats_parser().parse_args(argv[1:]))
    command: list[str] = []
    if '--' in argv:
        at = argv.index('--')
        argv, command = argv[:at], argv[at + 1:]
        if not command:
            _serve_parser().error("'--' must be followed by the command to run")
    return _serve(_serve_parser().parse_args(argv), command)


def _serve(args: argparse.Namespace, command: list[str]) -> int:
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format='channels-broker[%(process)d] %(levelname)s %(name)s: '
                               '%(message)s')
    from .broker import Broker
    from .errors import ChannelsError
    from .settings import _worker_class
    if args.broker_threads < 1:
        print('channels-broker: --broker-threads must be >= 1', file=sys.stderr)
        return 2
    try:
        address, authkey = _resolve(args)
        broker_class = _worker_class('MessageBroker')('--broker-class', args.broker_class) \
            if args.broker_class else None
        from . import settings
        if args.max_connections is not None:
            settings.configure(MAX_CONNECTIONS=args.max_connections)
        broker = Broker(address, authkey, broker_threads=args.broker_threads,
                        max_frame=settings.get('MAX_FRAME_BYTES'),
                        max_connections=settings.get('MAX_CONNECTIONS'),
                        rejoin_timeout=settings.get('REJOIN_TIMEOUT'),
                        max_pending=settings.get('MAX_PENDING_BYTES'),
                        stall_timeout=settings.get('STALL_TIMEOUT'),
                        **({'broker_class': broker_class} if broker_class else {}))
    except ChannelsError as exc:
        print(f'channels-broker: {exc}', file=sys.stderr)
        return 2

    stop = threading.Event()
    stop_signal = [signal.SIGTERM]
    child: list[subprocess.Popen] = []

    def on_signal(signum: int, frame: Any) -> None:
        """Forward to the command if there is one, else stop serving."""
        if child:
            child[0].send_signal(signum)     # the command decides; we stop when it exits
        else:
            stop_signal[0] = signum
            stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        broker.start()
    except OSError as exc:
        print(f'channels-broker: cannot listen on {broker.address_text}: '
              f'{exc.strerror or exc}', file=sys.stderr)
        return 1
    print(f'channels-broker: listening on {broker.address_text}', flush=True)
    status = 0
    try:
        if command and stop.is_set():
            status = 128 + stop_signal[0]       # stopped before the command could start
        elif command:
            status = _launch(command, broker, args, child, stop, stop_signal)
        else:
            while not stop.wait(3600):
                pass
    finally:
        clean = broker.stop(args.stop_timeout)
    return status if command else (0 if clean else 1)


def _launch(command: list[str], broker: Any, args: argparse.Namespace,
            child: list[subprocess.Popen], stop: threading.Event, stop_signal: list[int]
            ) -> int:
    env = dict(os.environ, CHANNELS_BROKER_ADDRESS=broker.address_text)
    if args.authkey_file:
        env['CHANNELS_AUTHKEY_FILE'] = os.path.abspath(args.authkey_file)
        env.pop('CHANNELS_AUTHKEY', None)
    try:
        process = subprocess.Popen(command, env=env)
    except OSError as exc:
        print(f'channels-broker: cannot run {command[0]!r}: {exc.strerror or exc}',
              file=sys.stderr)
        return 127
    child.append(process)
    if stop.is_set():                        # a signal came before the command existed
        process.send_signal(stop_signal[0])
    status = process.wait()
    return 128 - status if status < 0 else status


def _stats(args: argparse.Namespace) -> int:
    from .connection import format_address
    from .errors import ChannelsError
    try:
        address, authkey = _resolve(args)
        stats = fetch_stats(format_address(address), authkey)
    except ChannelsError as exc:
        print(f'channels-broker stats: {exc}', file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(stats))
        return 0
    print(f"broker on {stats['address']} (pid {stats['pid']}), up {stats['uptime_s']:.0f}s, "
          f"{len(stats['processes'])} processes, {stats['topics']} topics")
    print(f"{'pid':>8} {'in':>10} {'out':>10} {'pending':>8} {'dropped':>8}  subscriptions")
    for p in stats['processes']:
        subs = ', '.join(p['subscriptions'][:5]) + (' ...' if len(p['subscriptions']) > 5
                                                     else '')
        print(f"{p['pid']:>8} {p['messages_in']:>10} {p['messages_out']:>10} "
              f"{p['pending']:>8} {p['dropped']:>8}  {subs}")
    t = stats['totals']
    print(f"{'total':>8} {t['messages_in']:>10} {t['messages_out']:>10} {t['pending']:>8} "
          f"{t['dropped']:>8}")
    return 0


def fetch_stats(address: str, authkey: bytes | None = None, timeout: float = 5.0
                ) -> dict[str, Any]:
    """The live state of the broker on *address* (what ``stats --json`` prints)."""
    from . import wire
    from .connection import connect, parse_address
    from .errors import BrokerUnavailableError
    connection = connect(parse_address(address), authkey, timeout)
    try:
        connection.send_bytes(wire.encode_json(wire.HELLO, {'pid': os.getpid(),
                                                           'role': 'stats'}))
        connection.send_bytes(wire.encode(wire.STATS))
        if not connection.poll(timeout):
            raise BrokerUnavailableError(f'the broker on {address} did not answer within '
                                         f'{timeout}s')
        reply = connection.recv_bytes(64 * 1024 * 1024)
    except (OSError, EOFError) as exc:
        raise BrokerUnavailableError(f'the broker on {address} closed the connection: '
                                     f'{exc}') from exc
    finally:
        connection.close()
    return wire.decode_json(reply[wire.HEADER.size:])
