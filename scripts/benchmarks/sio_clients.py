"""Socket.IO clients of the benchmark: ``sio_clients.py URL CLIENTS`` (one process for each
worker's clients).

Each client is a bare Engine.IO 4 / Socket.IO 5 websocket client on the ``websockets``
library (open, connect to the default namespace, answer pings, decode each event's
JSON), so that the clients' own cost stays small beside the servers' and the carrier's
(python-socketio's ``AsyncClient`` costs several times more per event, and on a shared
machine that would measure the clients). Connects CLIENTS of them to URL, prints
``ready``, then, for each phase of ``m`` events (see ``sio_app``), once every client has
all n of them exactly once and in order, prints one JSON line: ``{"phase": p, "last":
<time.time() of the last arrival>, "latency": [seconds from emit to arrival, ...]}``.
Stops on EOF of stdin. A client that misses or repeats an event prints ``{"error": ...}``
and exits 1.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import websockets


class Phase:
    """What one phase's events did in this process's clients."""

    def __init__(self, clients: int) -> None:
        self.waiting = clients
        self.last = 0.0
        self.latency: list[float] = []


async def _open(url: str) -> websockets.ClientConnection:
    address = url.replace('http://', 'ws://', 1).rstrip('/')
    ws = await websockets.connect(f'{address}/socket.io/?EIO=4&transport=websocket',
                                  max_size=None, compression=None)
    opened = await ws.recv()
    if not opened.startswith('0'):
        raise RuntimeError(f'expected the Engine.IO open packet, got {opened[:80]!r}')
    await ws.send('40')
    while True:
        connected = await ws.recv()
        if connected.startswith('40'):
            return ws
        if connected == '2':
            await ws.send('3')
        else:
            raise RuntimeError(f'expected the namespace connect, got {connected[:80]!r}')


async def main(url: str, clients: int) -> None:
    phases: dict[int, Phase] = {}
    failure: list[str] = []
    loads = json.loads

    async def client(ws: websockets.ClientConnection) -> None:
        expected: dict[int, int] = {}
        async for frame in ws:
            if frame == '2':
                await ws.send('3')
                continue
            if not frame.startswith('42'):
                continue
            now = time.time()
            event, data = loads(frame[2:])
            phase_id, i, n = data['p'], data['i'], data['n']
            if expected.get(phase_id, 0) != i:
                failure.append(f'a client got event {i} of phase {phase_id}, expected '
                               f'{expected.get(phase_id, 0)}')
                return
            expected[phase_id] = i + 1
            phase = phases.get(phase_id) or phases.setdefault(phase_id, Phase(clients))
            phase.latency.append(now - data['t'])
            if i == n - 1:
                phase.last = max(phase.last, now)
                phase.waiting -= 1
                if not phase.waiting:
                    print(json.dumps({'phase': phase_id, 'last': phase.last,
                                      'latency': phase.latency}), flush=True)
                    del phases[phase_id]

    sockets = [await _open(url) for _ in range(clients)]
    tasks = [asyncio.ensure_future(client(ws)) for ws in sockets]
    print('ready', flush=True)
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    await asyncio.wait([stdin_closed, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for ws in sockets:
        await ws.close()
    for task in tasks:
        task.cancel()
    if failure:
        print(json.dumps({'error': failure[0]}), flush=True)
        raise SystemExit(1)


if __name__ == '__main__':
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
