"""SIGTERM stops real servers at once while clients hold 50 SSE streams open.

``channels-broker -- uvicorn --workers 4`` with ``EndStreamsOnShutdown`` as middleware,
and ``channels-broker -- gunicorn -k uvicorn_worker.UvicornWorker -w 4`` with
``end_streams_on_shutdown()`` in the lifespan (``tests/apps/asgi_streams.py``). 50 raw
sockets each hold a ``GET /events`` stream, open once it said ``ready`` (its
subscription in force); then the launcher gets SIGTERM, and it must exit, status 0, with
the server and the broker, within 2 s, every stream ended by a complete response (the
chunked body's last chunk), not cut off.

Without the helper (``MPCH_STREAMS_APP=app_without``) this test fails: uvicorn waits
for the open responses with no end, gunicorn for its ``--graceful-timeout`` (30 s).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import Launched, SSEStreams, ended, free_port

APPS = Path(__file__).resolve().parent / 'apps'
STREAMS = 50
WORKERS = 4
STOP_WITHIN = 2.0


SERVERS = {
    'uvicorn': ('app_with_middleware', lambda port, app: [
        sys.executable, '-m', 'uvicorn', f'asgi_streams:{app}', '--workers', str(WORKERS),
        '--host', '127.0.0.1', '--port', str(port), '--app-dir', str(APPS),
        '--no-access-log']),
    'gunicorn': ('app_with_lifespan', lambda port, app: [
        sys.executable, '-m', 'gunicorn', '-k', 'uvicorn_worker.UvicornWorker',
        '-w', str(WORKERS), '-b', f'127.0.0.1:{port}', '--chdir', str(APPS),
        '--no-control-socket', f'asgi_streams:{app}']),
}


@pytest.fixture(params=sorted(SERVERS))
def server(request, broker_address: str, tmp_path: Path) -> Iterator[Launched]:
    """The server named by the parameter under ``channels-broker``, every worker up;
    always stopped."""
    app, command = SERVERS[request.param]
    app = os.environ.get('MPCH_STREAMS_APP', app)
    port = free_port()
    launched = Launched(broker_address, command(port, app), port, WORKERS,
                        out_dir=tmp_path, log_dir=tmp_path)
    try:
        launched.wait_listening()
        launched.wait_http()
        launched.wait_workers()
        yield launched
    finally:
        launched.stop()


@pytest.mark.timeout(90)
def test_sigterm_stops_the_server_within_2s_while_50_streams_are_open(server):
    streams = SSEStreams(server.port, STREAMS)
    try:
        streams.read(lambda data: b'event: ready\n' in data, timeout=20)
        assert len(streams.open) == STREAMS, 'a stream closed before it was ready'
        holders = set(streams.ready_pids())
        status, took = server.sigterm_timed()
        streams.read(ended, timeout=5)
        print(f'SIGTERM to exit with {STREAMS} streams in {len(holders)} workers: '
              f'{took:.2f}s')
        assert status == 0, f'the launcher exited with {status} after {took:.1f}s\n' \
                            f'{server.log}'
        assert took < STOP_WITHIN, f'stopping took {took:.2f}s\n{server.log}'
        cut = [data[-80:] for data in streams.received.values() if not ended(data)]
        assert not cut, f'{len(cut)} streams were cut off, not ended: {cut[0]!r}'
    finally:
        streams.close()
