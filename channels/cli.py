"""``channels-broker``: serve, launch a server under the broker, or print its stats.

::

    channels-broker [--address ADDR] [--authkey-file F] [--broker-threads N]
                    [--broker-class DOTTED] [--max-connections N]
                    [--log-level L] [--stop-timeout S] [--state-file PATH]  # serve
    channels-broker [options] -- COMMAND ARGS...                         # launcher
    channels-broker stats [--address ADDR] [--authkey-file F] [--json]   # live state

Also ``python -m channels``. The broker prints ``channels-broker: listening on ADDR``
once it listens (after its signal handlers are installed), and exits 0 after a
graceful stop on SIGTERM or SIGINT. The launcher runs COMMAND with
``CHANNELS_BROKER_ADDRESS`` (and the authkey file, if any) in its environment,
forwards SIGTERM/SIGINT to it, stops the broker once it exits and exits with its status.
If the launcher dies, even by SIGKILL, the command gets SIGTERM (PR_SET_PDEATHSIG on
Linux, a watchdog process elsewhere), and the broker, which runs in the launcher, is gone.
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

from . import settings, wire
from .broker import Broker
from .connection import connect, default_address, format_address, load_authkey, parse_address
from .errors import BrokerUnavailableError, ChannelsError, ConfigurationError, ProtocolError
from .settings import _worker_class

__all__ = ['main', 'fetch_stats']

logger = logging.getLogger('channels.cli')


_USAGE = '''%(prog)s [--address ADDR] [--authkey-file F] [--broker-threads N]
                       [--broker-class DOTTED] [--max-connections N] [--log-level L]
                       [--stop-timeout S] [--state-file PATH] [--bridge URL]
                       [--bridge-namespace NAME] [--bridge-order local|engine]
                       [-- COMMAND ARGS...]
       %(prog)s stats [--address ADDR] [--authkey-file F] [--json]'''


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--address', metavar='ADDR', help='socket path or host:port (default: '
                        '$CHANNELS_BROKER_ADDRESS, else a socket in a private directory)')
    parser.add_argument('--authkey-file', metavar='F', help='file holding the shared secret '
                        '(default: $CHANNELS_AUTHKEY_FILE or $CHANNELS_AUTHKEY); required '
                        'for a TCP address')


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='channels-broker', usage=_USAGE,
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
    parser.add_argument('--log-level', default='INFO', type=str.upper,
                        choices=['DEBUG', 'INFO', 'WARNING', 'ERROR'],
                        help='DEBUG, INFO, WARNING or ERROR, in any case (default INFO)')
    parser.add_argument('--stop-timeout', type=float, default=10.0, metavar='S',
                        help='seconds a graceful stop may take (default 10)')
    parser.add_argument('--state-file', metavar='PATH',
                        help='the file of the connected processes (their origins) that a '
                             'restart reads (default: $CHANNELS_BROKER_STATE_FILE, else '
                             'ADDR.peers next to a socket, else one in the per-user private '
                             'directory)')
    parser.add_argument('--bridge', metavar='URL',
                        help="link this machine's broker with other machines' through an "
                             'engine: redis://[user:password@]host:port/db, rediss://..., '
                             'nats://host:port, tls://... (default: $CHANNELS_BRIDGE_URL)')
    parser.add_argument('--bridge-namespace', metavar='NAME',
                        help='names the stream on the engine, so that apps can share one '
                             '(default: $CHANNELS_BRIDGE_NAMESPACE or mpchannels)')
    parser.add_argument('--bridge-order', type=str.lower, choices=['local', 'engine'],
                        help="local: this machine's processes first (default); engine: "
                             'every message in the engine\'s one order, on every machine')
    return parser


def _stats_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='channels-broker stats',
                                     description="Print a running broker's live state.")
    _common(parser)
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    return parser


def _resolve(args: argparse.Namespace) -> tuple[Any, bytes | None]:
    if args.authkey_file:
        settings.configure(AUTHKEY_FILE=args.authkey_file, AUTHKEY=None)
    # an --address given explicitly is used as given: --address '' is an error, not
    # the default
    address_text = args.address if args.address is not None else \
        settings.get('BROKER_ADDRESS') or default_address()
    return parse_address(address_text), load_authkey()


def _state_file(args: argparse.Namespace) -> str | None:
    """--state-file, else BROKER_STATE_FILE, as an absolute path; None: the default."""
    path = args.state_file if args.state_file is not None else \
        settings.get('BROKER_STATE_FILE')
    if path is not None and not path.strip():
        raise ConfigurationError("--state-file '' names no file; give a path or leave it "
                                 "out for the default")
    return os.path.abspath(os.path.expanduser(path)) if path is not None else None


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


_HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT}
"""What the launcher handles (forwarded to the command, or a graceful stop)."""


def _serve(args: argparse.Namespace, command: list[str]) -> int:
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format='channels-broker[%(process)d] %(levelname)s %(name)s: '
                               '%(message)s')
    if args.broker_threads < 1:
        print('channels-broker: --broker-threads must be >= 1', file=sys.stderr)
        return 2
    try:
        address, authkey = _resolve(args)
        broker_class = _worker_class('MessageBroker')('--broker-class', args.broker_class) \
            if args.broker_class else None
        if args.max_connections is not None:
            settings.configure(MAX_CONNECTIONS=args.max_connections)
        for option, name in (('bridge', 'BRIDGE_URL'), ('bridge_namespace', 'BRIDGE_NAMESPACE'),
                             ('bridge_order', 'BRIDGE_ORDER')):
            if getattr(args, option) is not None:
                settings.configure(**{name: getattr(args, option)})
        broker = Broker.from_settings(
            address, authkey, broker_threads=args.broker_threads,
            state_file=_state_file(args),
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
    # The kernel gives a signal sent to the process to any of its threads that does not
    # block it; Python runs the handler in the main thread, but only once that thread
    # wakes. Asleep in a wait (for stop, for the command), it slept on: a SIGTERM was
    # seen only when the wait ended (for an hour, or until the command exited). So the
    # broker's threads, and the threads they start, block these two, and every signal
    # to the process interrupts the main thread's wait.
    signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
    try:
        broker.start()
    except ChannelsError as exc:          # the bridge: a bad URL, engine or extra
        print(f'channels-broker: {exc}', file=sys.stderr)
        return 2
    except OSError as exc:
        print(f'channels-broker: cannot listen on {broker.address_text}: '
              f'{exc.strerror or exc}', file=sys.stderr)
        return 1
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED_SIGNALS)
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


# The command must not outlive the launcher: the broker runs in the launcher, so a
# server left behind would buffer for a broker that is gone and keep its port. On Linux
# the kernel tells it: the child first runs this tiny Python (not a preexec_fn, which is
# unsafe while the broker's threads run), which sets PR_SET_PDEATHSIG to SIGTERM, gives
# up if the launcher already died before that, and execs the command in its place (the
# same pid; the setting survives exec). The signal fires when the forking *thread* ends: _launch
# runs in the main thread, which lives as long as the launcher.
_CHILD_GUARD = r"""
import ctypes, os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
launcher, command = int(sys.argv[1]), sys.argv[2:]
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:         # PR_SET_PDEATHSIG
    sys.stderr.write('channels-broker: cannot tie the command to the launcher: '
                     'prctl(PR_SET_PDEATHSIG): %s\n' % os.strerror(ctypes.get_errno()))
    sys.exit(126)
if os.getppid() != launcher:              # it died before prctl: no signal will come
    sys.exit(128 + signal.SIGTERM)
try:
    os.execvp(command[0], command)
except OSError as exc:
    sys.stderr.write('channels-broker: cannot run %r: %s\n' % (command[0], exc.strerror or exc))
    sys.exit(127)
"""

# Elsewhere a watchdog process reads a pipe whose write end only the launcher holds:
# end of file without the launcher's "done" byte means the launcher died, and the
# watchdog sends the command SIGTERM.
_WATCHDOG = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)        # a terminal's ^C is the launcher's
if not os.read(0, 1):
    try:
        os.kill(int(sys.argv[1]), signal.SIGTERM)
    except ProcessLookupError:
        pass
"""

_PDEATHSIG = sys.platform.startswith('linux')


def _launch(command: list[str], broker: Any, args: argparse.Namespace,
            child: list[subprocess.Popen], stop: threading.Event, stop_signal: list[int]
            ) -> int:
    env = dict(os.environ, CHANNELS_BROKER_ADDRESS=broker.address_text)
    if args.authkey_file:
        env['CHANNELS_AUTHKEY_FILE'] = os.path.abspath(args.authkey_file)
        env.pop('CHANNELS_AUTHKEY', None)
    argv = [sys.executable, '-I', '-S', '-c', _CHILD_GUARD, str(os.getpid()), *command] \
        if _PDEATHSIG else command
    try:
        process = subprocess.Popen(argv, env=env)
    except OSError as exc:
        print(f'channels-broker: cannot run {command[0]!r}: {exc.strerror or exc}',
              file=sys.stderr)
        return 127
    child.append(process)
    watchdog = None if _PDEATHSIG else _start_watchdog(process.pid)
    if stop.is_set():                        # a signal came before the command existed
        process.send_signal(stop_signal[0])
    if watchdog is not None:
        try:
            # learn of the exit without reaping it, so that its pid cannot be reused
            # before the watchdog is told to stand down
            if hasattr(os, 'waitid'):
                os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        finally:
            _stop_watchdog(*watchdog)
    status = process.wait()
    return 128 - status if status < 0 else status


def _start_watchdog(pid: int) -> tuple[subprocess.Popen, int] | None:
    """A process that SIGTERMs *pid* if this one dies; (it, the pipe's write end)."""
    read_end, write_end = os.pipe()
    try:
        watchdog = subprocess.Popen([sys.executable, '-I', '-S', '-c', _WATCHDOG, str(pid)],
                                    stdin=read_end)
    except OSError as exc:
        os.close(write_end)
        logger.warning('cannot start the watchdog that stops the command if the launcher '
                       'dies: %s', exc)
        return None
    finally:
        os.close(read_end)
    return watchdog, write_end


def _stop_watchdog(watchdog: subprocess.Popen, write_end: int) -> None:
    try:
        os.write(write_end, b'.')               # done: the command ended by itself
    except OSError:
        pass
    os.close(write_end)
    try:
        watchdog.wait(5)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


def _stats(args: argparse.Namespace) -> int:
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
    bridge = stats.get('bridge')
    if bridge:
        state = 'connected' if bridge['connected'] else \
            f"DISCONNECTED for {bridge.get('down_for_s') or 0:.0f}s ({bridge.get('last_error')})"
        print(f"bridge {bridge['url']} {state}: sent {bridge['sent']}, received "
              f"{bridge['received']}, lost {bridge['lost']}, not sent {bridge.get('dropped', 0)}, "
              f"position {bridge.get('position')}")
        for peer in bridge['peers']:
            print(f"  broker {peer['broker']}: last heard {peer['last_heard_s']:.1f}s ago")
        for kind in ('lost_reasons', 'dropped_reasons'):
            for reason, count in (bridge.get(kind) or {}).items():
                print(f"  {'lost' if kind == 'lost_reasons' else 'not sent'} {count}: {reason}")
    return 0


def fetch_stats(address: str, authkey: bytes | None = None, timeout: float = 5.0
                ) -> dict[str, Any]:
    """The live state of the broker on *address* (what ``stats --json`` prints).

    The handshake takes at most ``HANDSHAKE_TIMEOUT`` seconds, the reply at most
    *timeout*; raises :class:`~channels.errors.BrokerUnavailableError` saying why.
    """
    connection = connect(parse_address(address), authkey, settings.get('HANDSHAKE_TIMEOUT'))
    try:
        connection.send_bytes(wire.encode_json(wire.HELLO, {'pid': os.getpid(),
                                                           'role': 'stats'}))
        connection.send_bytes(wire.encode(wire.STATS))
        if not connection.poll(timeout):
            raise BrokerUnavailableError(f'the broker on {address} did not answer within '
                                         f'{timeout}s')
        batch = wire.BatchReader(connection.fileno(), 1 << 30, stall_timeout=timeout).read()[0]
        kind, start, end = next(wire.iter_frames(batch, 1 << 30))
    except (OSError, EOFError, ProtocolError, StopIteration) as exc:
        raise BrokerUnavailableError(f'the broker on {address} closed the connection: '
                                     f'{exc or type(exc).__name__}') from exc
    finally:
        connection.close()
    body = wire.decode_json(batch[start + wire.HEADER.size:end])
    if kind != wire.STATS:
        raise BrokerUnavailableError(f'the broker on {address} did not give its stats: '
                                     f'{body!r:.300}')
    return body
