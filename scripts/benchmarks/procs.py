"""The benchmark's processes: start them, talk to them, and always stop them.

Two levels, each of which stops everything it started, whatever happens:

* the parent (``scripts/bench.py``) runs every measured run as a fresh subprocess of
  that script (:func:`run_child`), in a process group of its own, and stops that whole
  group when the run ends, fails, times out or is interrupted (:func:`stop_group`);
* a cross-process run (that subprocess) starts the broker with its script and forks
  the other processes (:class:`Cluster`); ``Cluster.close()`` stops every one of them,
  and :func:`kill_descendants` kills whatever is left (psutil: a last resort).

Every forked process (a *role*) talks to the runner over a Pipe: it sends ('ready', pid)
once set up, then answers commands. A subscriber reports ('mark', n, time.time()) when
it has handled its n-th message for each n in *marks*, ('latency', [seconds, ...]) in
the latency case, and ('final', count, drained) at the end; any role reports ('error',
text) if it fails.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from collections.abc import Callable
from typing import Any

from .cases import BROKER_SCRIPT, ROOT
from .engines import Engine

BENCH_SCRIPT = ROOT / 'scripts' / 'bench.py'
"""The command that measures one run: ``bench.py --one LIB.CASE`` prints its result."""


def child_main(role: Any, conn: Connection, *args: Any) -> None:
    """The entry point of every forked process: run *role*, report its failure."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)    # the runner's handler is inherited
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the runner decides when we stop
    try:
        role(conn, *args)
    except BaseException as exc:
        try:
            conn.send(('error', f'{role.__module__}.{role.__name__}: {type(exc).__name__}: '
                                f'{exc}'))
        except (OSError, ValueError):
            pass
        raise


def serve_publisher(conn: Connection, send: Callable[[int], None],
                    pace: Callable[[int, float, float], None], end: Callable[[], bool],
                    hello: Callable[[Connection], None] | None = None) -> None:
    """The command loop of every system's publisher process; the loops are the system's.

    ('send', n): ``send(n)`` sends n messages in a loop; answers ('sent', t0, t1).
    ('pace', n, rate): ``pace(n, rate, t0)`` sends them to a schedule that starts at
    t0, each with its send time; answers ('sent', t0, t1). ('hello',) (ZeroMQ):
    ``hello(conn)`` sends hellos until the next command arrives. ('end',): ``end()``
    ends the stream (ours: ``shutdown()``, which flushes to the broker; Queue: None;
    ZeroMQ: END) and returns whether it drained; answers ('ended', drained). ('exit',)
    returns.
    """
    conn.send(('ready', os.getpid()))
    while True:
        command = conn.recv()
        kind = command[0]
        if kind == 'send':
            started = time.time()
            send(command[1])
            conn.send(('sent', started, time.time()))
        elif kind == 'pace':
            started = time.time() + 0.001
            pace(command[1], command[2], started)
            conn.send(('sent', started, time.time()))
        elif kind == 'hello' and hello is not None:
            hello(conn)
        elif kind == 'end':
            conn.send(('ended', end()))
        elif kind == 'exit':
            return


class Child:
    """A forked process of a cross-process run and its end of the Pipe."""

    def __init__(self, name: str, process: Any, conn: Connection) -> None:
        self.name = name
        self.process = process
        self.conn = conn
        self.pid = process.pid
        self.listens = True          # False: it reads no command (zmq.proxy): terminate it

    def send(self, *command: Any) -> None:
        """Send a command."""
        self.conn.send(command)

    def expect(self, kind: str, timeout: float) -> tuple:
        """The next report, which must be of *kind*; raises if it fails or is late."""
        if not self.conn.poll(timeout):
            raise TimeoutError(f'{self.name} (pid {self.pid}) sent no {kind!r} within '
                               f'{timeout:.3g} s')
        try:
            report = self.conn.recv()
        except EOFError:
            self.process.join(1.0)
            raise RuntimeError(f'{self.name} (pid {self.pid}) exited with status '
                               f'{self.process.exitcode} before sending {kind!r}') from None
        if report[0] == 'error':
            raise RuntimeError(f'{self.name} failed: {report[1]}')
        if report[0] != kind:
            raise RuntimeError(f'{self.name} sent {report[0]!r}, expected {kind!r}')
        return report

    def stop(self) -> None:
        """exit -> join -> terminate -> join -> kill -> join."""
        process = self.process
        if process.is_alive() and self.listens:
            try:
                self.conn.send(('exit',))
            except (OSError, ValueError):
                pass
            process.join(3.0)
        if process.is_alive():
            process.terminate()
            process.join(3.0)
        if process.is_alive():
            process.kill()
            process.join(5.0)
        self.conn.close()


class Cluster:
    """The processes of one cross-process run; ``close()`` stops every one of them.

    The brokers are started with their script (one, ``broker``, for the cross-process
    cases; one per machine, bridged, for the bridged ones), the engines of the bridged
    cases as servers of their own (:class:`benchmarks.engines.Engine`); the other
    processes are forked from this one (as a pre-forking server does), with
    ``CHANNELS_BROKER_ADDRESS`` set to their machine's broker.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.dir = tempfile.mkdtemp(prefix='mpch-bench-')
        self.address = self.address_of('broker')
        self.context = multiprocessing.get_context('fork')
        self.children: list[Child] = []
        self.brokers: dict[str, subprocess.Popen] = {}
        self.engines: list[Engine] = []
        self.warnings: list[str] = []    # anything odd, for the result (see run_cross_case)
        self._psutil: dict[int, Any] = {}
        CLUSTERS.append(self)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def address_of(self, name: str) -> str:
        """The socket of the broker called *name* (``broker``, ``A``, ``B``, ...)."""
        return os.path.join(self.dir, f'{name}.sock')

    def _log_of(self, name: str) -> str:
        return os.path.join(self.dir, f'{name}.log')

    def start_engine(self, kind: str) -> Engine:
        """Start a ``redis-server`` or ``nats-server -js`` of this run's own; it is ready."""
        engine = Engine(kind)
        self.engines.append(engine)
        return engine.start(self.timeout)

    def start_broker(self, name: str = 'broker', bridge: str | None = None) -> int:
        """Start ``channels-broker`` (bridged through *bridge*, a URL, if given) and wait
        for its "listening" line; its pid. The broker called ``broker`` is the one the
        forked processes connect to unless ``start()`` says otherwise."""
        address = self.address_of(name)
        command = [sys.executable, str(BROKER_SCRIPT), '--address', address,
                   '--log-level', 'WARNING']
        if bridge is not None:
            command += ['--bridge', bridge, '--bridge-namespace', 'bench']
        with open(self._log_of(name), 'ab') as log:
            broker = self.brokers[name] = subprocess.Popen(command, stdout=subprocess.PIPE,
                                                           stderr=log)
        assert broker.stdout is not None
        ready = [None]
        reader = threading.Thread(target=lambda: ready.__setitem__(
            0, broker.stdout.readline()), daemon=True)
        reader.start()
        reader.join(self.timeout)
        line = (ready[0] or b'').decode().strip()
        if line != f'channels-broker: listening on {address}':
            raise RuntimeError(f'broker {name} did not start: {line!r}; '
                               f'{self.broker_tail(name)}')
        if name == 'broker':
            os.environ['CHANNELS_BROKER_ADDRESS'] = address     # for the forked processes
        return broker.pid

    def broker_tail(self, name: str = 'broker') -> str:
        """The last line the broker called *name* logged, if any."""
        try:
            lines = Path(self._log_of(name)).read_text(errors='replace').strip().splitlines()
        except OSError:
            return 'no broker log'
        return f'broker log: {lines[-1]}' if lines else 'broker log empty'

    def start(self, name: str, role: Any, *args: Any, broker: str | None = None) -> Child:
        """Fork a process that runs *role*; wait for its ('ready', pid). With *broker*
        (a broker's name), the process connects to that broker."""
        conn, child_conn = self.context.Pipe()
        process = self.context.Process(target=child_main, args=(role, child_conn, *args),
                                       name=name, daemon=True)
        saved = os.environ.get('CHANNELS_BROKER_ADDRESS')
        if broker is not None:
            os.environ['CHANNELS_BROKER_ADDRESS'] = self.address_of(broker)
        try:
            process.start()
        finally:
            if broker is not None:
                if saved is None:
                    os.environ.pop('CHANNELS_BROKER_ADDRESS', None)
                else:
                    os.environ['CHANNELS_BROKER_ADDRESS'] = saved
        child_conn.close()
        child = Child(name, process, conn)
        self.children.append(child)
        child.expect('ready', self.timeout)
        return child

    def cpu(self, pids: list[int]) -> dict[int, float]:
        """CPU seconds (user + system) each process in *pids* has used so far."""
        import psutil
        seconds = {}
        for pid in pids:
            process = self._psutil.get(pid) or self._psutil.setdefault(pid, psutil.Process(pid))
            times = process.cpu_times()
            seconds[pid] = times.user + times.system
        return seconds

    def close(self) -> None:
        """Stop the forked processes, then the brokers, then the engines; kill whatever
        is left."""
        for child in reversed(self.children):
            try:
                child.stop()
            except Exception as exc:      # go on: the others must stop too
                print(f'bench: stopping {child.name}: {exc!r}', file=sys.stderr)
        for broker in self.brokers.values():
            if broker.poll() is None:
                broker.terminate()
        for broker in self.brokers.values():
            try:
                broker.wait(10.0)
            except subprocess.TimeoutExpired:
                broker.kill()
                broker.wait(10.0)
            if broker.stdout is not None:
                broker.stdout.close()
        for engine in self.engines:
            try:
                engine.stop()
            except Exception as exc:
                print(f'bench: stopping the {engine.kind} server: {exc!r}', file=sys.stderr)
        kill_descendants()
        os.environ.pop('CHANNELS_BROKER_ADDRESS', None)
        for name in self.brokers:
            try:
                logged = Path(self._log_of(name)).read_text(errors='replace').splitlines()
            except OSError:
                logged = []
            label = 'broker log' if name == 'broker' else f'broker {name} log'
            self.warnings.extend(f'{label}: {line}' for line in logged[:5])
        shutil.rmtree(self.dir, ignore_errors=True)


CLUSTERS: list[Cluster] = []
"""Every Cluster of this process (one per run): run_cross_case reports their warnings."""


def kill_descendants() -> list[int]:
    """Kill every process this one started and that still runs (psutil: a last resort)."""
    import psutil
    try:
        left = [p for p in psutil.Process().children(recursive=True) if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []
    for process in left:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5.0)
    if left:
        print(f'bench: killed leftover processes {[p.pid for p in left]}', file=sys.stderr)
    return [p.pid for p in left]



def run_child(lib: str, case: str, quick: bool, timeout: float) -> dict:
    """Run ``--one LIB.CASE`` in a fresh subprocess; return its JSON result.

    On a failure or a timeout the result holds ``error``. The child runs in a process
    group of its own, with whatever it starts (broker, publisher, subscribers): when
    this returns, for whatever reason (Ctrl-C too), that whole group is stopped.
    """
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [str(ROOT)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    for name in [name for name in env if name.startswith('CHANNELS_')]:
        del env[name]                 # the defaults: no broker, no authkey, ...
    command = [sys.executable, str(BENCH_SCRIPT), '--one', f'{lib}.{case}']
    if quick:
        command.append('--quick')
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=str(ROOT), start_new_session=True)
    result: dict = {}
    try:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            result = {'error': f'timed out after {timeout:.3g} s'}
            return result
        if process.returncode != 0:
            last = (err.strip().splitlines() or ['?'])[-1]
            result = {'error': f'exit {process.returncode}: {last}'}
        else:
            result = json.loads(out.strip().splitlines()[-1])
            if err.strip():
                result.setdefault('warnings', []).append(
                    'stderr: ' + ' | '.join(err.strip().splitlines()[-3:]))
        return result
    finally:
        left = stop_group(process)
        if left and 'error' not in result:
            result['error'] = f'left {left} process(es) running; killed them'


def stop_group(process: subprocess.Popen, grace: float = 5.0) -> int:
    """Stop *process* and every process of its group (it leads one: start_new_session).

    SIGTERM to the group (the child then stops what it started), SIGKILL after *grace*
    seconds, then psutil kills any descendant that left the group. Returns how many
    processes were still running once the child itself had ended on its own.
    """
    import psutil
    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        family = []
    ended = process.poll() is not None
    left = 0
    if not ended:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    elif _signal_group(process.pid, 0):
        left = sum(1 for p in psutil.process_iter(['pid'])
                   if _group_of(p.info['pid']) == process.pid)
    _signal_group(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.kill()
    process.communicate()
    alive = []
    for member in family:
        try:
            if member.is_running() and member.status() != psutil.STATUS_ZOMBIE:
                member.kill()
                alive.append(member)
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5.0)
    return left


def _signal_group(pgid: int, signum: int) -> bool:
    """Send *signum* to process group *pgid*; False if the group is empty."""
    try:
        os.killpg(pgid, signum)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _group_of(pid: int) -> int | None:
    """The process group of *pid*, or None if it is gone."""
    try:
        return os.getpgid(pid)
    except OSError:
        return None

