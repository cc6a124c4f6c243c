"""python-socketio across four workers: ours (``channels.socketio.AsyncManager``) against
python-socketio's own ``AsyncRedisManager`` on a local Redis.

One run (``--one sio_ours.sio_broadcast`` or ``sio_redis.sio_broadcast``) starts the
carrier (``channels-broker`` by its script, or this run's own ``redis-server``), four
uvicorn workers of ``sio_app`` (one process each, on ports of their own, so that the
clients are spread over the four exactly), and one process of ``sio_clients`` per worker
with ``sio_clients`` websocket clients each. A client of worker 0 then asks that worker
to emit to everyone: first a warm-up, then ``sio_messages`` events as fast as it can
(throughput: from the first emit to the last client's arrival of the last event), then
``sio_rate`` events a second for ``sio_latency_seconds`` (latency: emit to arrival, every
event at every client). Every client must get every event once and in order, else the
run is an error. Everything started is stopped, whatever happens.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .cases import ROOT
from .engines import free_port
from .procs import Cluster
from .stats import percentiles

HERE = Path(__file__).resolve().parent
SYSTEMS = {'sio_ours': 'ours', 'sio_redis': 'redis'}
"""The systems of the Socket.IO case, and the ``SIO_BENCH_MANAGER`` of each."""


class _Lines:
    """The stdout lines of a process, read by a thread of their own (to wait with a timeout)."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self.cond:
                self.lines.append(line.decode().strip())
                self.cond.notify_all()
        with self.cond:
            self.lines.append('')          # EOF
            self.cond.notify_all()

    def next(self, timeout: float) -> str:
        """The next line; RuntimeError on EOF or after *timeout*."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.lines, timeout):
                raise RuntimeError(f'pid {self.process.pid}: no line within {timeout:.0f}s')
            line = self.lines.pop(0)
        if not line:
            raise RuntimeError(f'pid {self.process.pid} ended (exit {self.process.poll()})')
        return line


def _wait_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f'the worker on port {port} exited ({process.returncode})')
        try:
            socket.create_connection(('127.0.0.1', port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f'the worker on port {port} did not listen within {timeout:.0f}s')


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(10.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10.0)


def run_socketio_case(lib: str, case: str, sizes: dict) -> dict:
    """Measure one system once; the throughput (events/s), latencies and CPU per event."""
    manager = SYSTEMS[lib]
    timeout = sizes['timeout']
    workers = sizes['sio_workers']
    processes: list[subprocess.Popen] = []
    with Cluster(timeout) as cluster:
        env = dict(os.environ, SIO_BENCH_MANAGER=manager,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                            os.environ.get('PYTHONPATH')])))
        if manager == 'ours':
            cluster.start_broker()
            env['CHANNELS_BROKER_ADDRESS'] = cluster.address
            carrier = [cluster.brokers['broker'].pid]
        else:
            engine = cluster.start_engine('redis')
            env['SIO_BENCH_REDIS_URL'] = engine.url
            carrier = [engine.pid]
        try:
            ports = [free_port() for _ in range(workers)]
            for port in ports:
                processes.append(subprocess.Popen(
                    [sys.executable, '-m', 'uvicorn', 'sio_app:app', '--app-dir', str(HERE),
                     '--port', str(port), '--log-level', 'warning', '--ws', 'websockets-sansio'],
                    env=env, stdin=subprocess.DEVNULL))
            for port, process in zip(ports, processes):
                _wait_port(port, process, timeout)
            servers = list(processes)
            clients = []
            for port in ports:
                process = subprocess.Popen(
                    [sys.executable, str(HERE / 'sio_clients.py'), f'http://127.0.0.1:{port}',
                     str(sizes['sio_clients'])], env=env, stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE)
                processes.append(process)
                clients.append(_Lines(process))
            for lines in clients:
                if lines.next(timeout) != 'ready':
                    raise RuntimeError('a client process did not get ready')
            return asyncio.run(_measure(ports[0], clients, servers, carrier, cluster, sizes))
        finally:
            _stop(processes)


def _phase(clients: list[_Lines], timeout: float) -> list[dict]:
    results = []
    for lines in clients:
        result = json.loads(lines.next(timeout))
        if 'error' in result:
            raise RuntimeError(result['error'])
        results.append(result)
    return results


async def _measure(port: int, clients: list[_Lines], servers: list[subprocess.Popen],
                   carrier: list[int], cluster: Cluster, sizes: dict) -> dict:
    import socketio
    timeout = sizes['timeout']
    emitter = socketio.AsyncClient(reconnection=False)
    await emitter.connect(f'http://127.0.0.1:{port}', transports=['websocket'])
    loop = asyncio.get_running_loop()

    async def phase(number: int, count: int, rate: float) -> tuple[float, list[dict]]:
        started = await emitter.call('blast', {'count': count, 'rate': rate,
                                               'phase': number}, timeout=timeout)
        return started, await loop.run_in_executor(None, _phase, clients, timeout)

    try:
        await phase(0, sizes['sio_warmup'], 0)
        pids = [p.pid for p in servers] + carrier
        before = cluster.cpu(pids)
        count = sizes['sio_messages']
        started, results = await phase(1, count, 0)
        after = cluster.cpu(pids)
        elapsed = max(result['last'] for result in results) - started
        rate = sizes['sio_rate']
        _, paced = await phase(2, int(rate * sizes['sio_latency_seconds']), rate)
    finally:
        await emitter.disconnect()
    samples = [s for result in paced for s in result['latency']]
    cuts = percentiles(samples)
    p50, p99 = cuts[49], cuts[98]
    cpu = {pid: after[pid] - before[pid] for pid in pids}
    return {
        'value': count / elapsed,
        'delivered': count * len(clients) * sizes['sio_clients'] / elapsed,
        'p50': p50, 'p99': p99,
        'cpu_workers_us': sum(cpu[p.pid] for p in servers) / count * 1e6,
        'cpu_carrier_us': sum(cpu[pid] for pid in carrier) / count * 1e6,
    }
