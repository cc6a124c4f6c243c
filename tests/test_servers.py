"""Real servers under ``channels-broker -- ...``: gunicorn (forked workers, with and
without ``--preload``) and ``uvicorn --workers`` (spawned workers).

Each test starts ``scripts/channels-broker --address A -- <server>`` with the chat app of
``tests/apps``, waits until the server answers HTTP and every worker is subscribed at the
broker, publishes messages through HTTP requests (each on a new connection, so they land
on whatever worker accepts it), and checks that every worker's channel received every
message exactly once: each sender's messages in publish order, and all of them in the
same order in every worker (see ``publish_and_check`` for why that is not necessarily
the HTTP order across senders). The launcher is always stopped with SIGTERM
(which it forwards to the server), and whatever of its process tree is left is killed.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from brokers import ROOT
from servers import Launched, free_port, http_get, stats_or_error
from support import wait_until

APPS = ROOT / 'tests' / 'apps'
MESSAGES = 200


@contextmanager
def launched(address: str, command: list[str], port: int, workers: int,
             tmp_path: Path) -> Iterator[Launched]:
    """A launched server, stopped (and its process tree killed) whatever happens."""
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    server = Launched(address, command, port, workers, out_dir, tmp_path)
    try:
        server.wait_listening()
        server.wait_http()
        yield server
    finally:
        server.stop()


def read_received(out_dir: Path, pid: int) -> list[dict]:
    """The complete JSON lines that worker *pid* wrote so far."""
    path = out_dir / f'{pid}.jsonl'
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith('\n')]


def publish_and_check(server: Launched, workers: set[int]) -> list[int]:
    """Publish MESSAGES messages over HTTP; every worker gets each once, in order.
    Returns the pid that served each publish."""
    senders = []
    for n in range(MESSAGES):
        senders.append(int(http_get(server.port, f'/publish?n={n}')))
    assert set(senders) <= workers, f'publishes served by {set(senders) - workers}, not ' \
                                    f'by a worker {sorted(workers)}'
    assert len(set(senders)) >= 2, f'every publish landed on pid {senders[0]}'

    def complete() -> bool:
        return all(len(read_received(server.out_dir, pid)) >= MESSAGES for pid in workers)
    try:
        wait_until(complete, 20, interval=0.05, what=f'{MESSAGES} messages in every worker')
    except AssertionError as exc:
        counts = {pid: len(read_received(server.out_dir, pid)) for pid in workers}
        raise AssertionError(f'{exc}: received {counts}; broker: '
                             f'{stats_or_error(server.address)}\n{server.log}') from None

    # One broker routing thread: a single global order, the same in every worker.
    # Each sender's messages keep its publish order. Across senders the order is the
    # broker's arrival order, which need not be the HTTP order: send() returns (and the
    # response goes out) before the link's sender thread has written the frame.
    sent_by: dict[int, list[int]] = {}
    for n, sender in enumerate(senders):
        sent_by.setdefault(sender, []).append(n)
    sequences = {}
    for pid in sorted(workers):
        lines = read_received(server.out_dir, pid)
        assert all(line['pid'] == pid for line in lines), lines
        assert all(line['sender'] == senders[line['n']] for line in lines), \
            f'worker {pid} received a message with the wrong sender: {lines}'
        ns = [line['n'] for line in lines]
        assert sorted(ns) == list(range(MESSAGES)), \
            f'worker {pid} did not receive each message exactly once: {ns}'
        for sender, published in sent_by.items():
            got = [n for n in ns if senders[n] == sender]
            assert got == published, \
                f'worker {pid} received the messages of sender {sender} out of order: {got}'
        sequences[pid] = ns
    first = sequences[min(sequences)]
    for pid, ns in sequences.items():
        assert ns == first, f'workers {min(sequences)} and {pid} received the messages in ' \
                            f'different orders:\n{first}\n{ns}'
    return senders


def run_server_test(broker_address: str, tmp_path: Path, command: list[str], port: int,
                    workers: int) -> None:
    with launched(broker_address, command, port, workers, tmp_path) as server:
        started = time.monotonic()
        pids = server.wait_workers()
        senders = publish_and_check(server, pids)
        elapsed = time.monotonic() - started
        status = server.stop()
        assert status == 0, f'the launcher exited with status {status} after SIGTERM ' \
                            f'(left behind: {server.left_behind})\n{server.log}'
        assert not server.left_behind, f'processes outlived the launcher: ' \
                                       f'{server.left_behind}\n{server.log}'
        # nothing more arrived while the workers shut down (no late duplicate)
        for pid in pids:
            assert len(read_received(server.out_dir, pid)) == MESSAGES, pid
        served = {pid: senders.count(pid) for pid in sorted(pids)}
        print(f'{workers} workers, {MESSAGES} messages (served {served}): {elapsed:.2f}s')


def _gunicorn_has_control_socket() -> bool:
    from gunicorn.config import KNOWN_SETTINGS
    return any(setting.name == 'control_socket_disable' for setting in KNOWN_SETTINGS)


def gunicorn_command(port: int, *extra: str) -> list[str]:
    # --no-control-socket: gunicorn 27 otherwise creates ~/.gunicorn/gunicorn.ctl, one
    # path shared by every gunicorn of the user (older versions have no such option)
    quiet = ['--no-control-socket'] if _gunicorn_has_control_socket() else []
    return [sys.executable, '-m', 'gunicorn', '-w', '4', '-b', f'127.0.0.1:{port}',
            '--chdir', str(APPS), *quiet, *extra, 'wsgi_chat:app']


@pytest.mark.timeout(120)
def test_gunicorn_workers_each_receive_every_message(broker_address, tmp_path):
    port = free_port()
    run_server_test(broker_address, tmp_path, gunicorn_command(port), port, workers=4)


@pytest.mark.timeout(120)
def test_gunicorn_preload_workers_inherit_the_subscription(broker_address, tmp_path):
    port = free_port()
    run_server_test(broker_address, tmp_path, gunicorn_command(port, '--preload'), port,
                    workers=4)


@pytest.mark.timeout(120)
def test_uvicorn_spawned_workers_each_receive_every_message(broker_address, tmp_path):
    port = free_port()
    command = [sys.executable, '-m', 'uvicorn', 'asgi_chat:app', '--workers', '2',
               '--host', '127.0.0.1', '--port', str(port), '--app-dir', str(APPS),
               '--no-access-log']
    run_server_test(broker_address, tmp_path, command, port, workers=2)
