"""The two processes of the subscribe-then-send race (tests/test_flush.py).

In each round the receiver subscribes a channel on a topic of its own for the round,
makes sure the subscription is in force (``flush()``, or by entering ``listen()``),
then tells the sender, over a pipe of their own, to send one message to that topic and
one to ``marker``, a topic the receiver subscribed at the start. The sender's two
messages keep their order through the broker, so once the marker has come the round's
message has either been routed to the receiver or missed it for good; a short grace
covers the two channels' handlers running on different task threads.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

MARKER = 'marker'
MARKER_TIMEOUT = 20.0     # the marker itself must come: else the run is broken, not racy
GRACE = 3.0               # after the marker, for the round's handler to have run
MAX_MISSES = 5            # a run stops after this many (each costs GRACE seconds)


def run_sender(conn: Any, settings: dict[str, Any]) -> None:
    """Send round N's message, then the marker, for every N received; None ends."""
    import channels
    from channels import Channel
    channels.shutdown()
    channels.configure(**settings)
    marker = Channel(MARKER)
    marker.send({'n': -1})           # connect now, not in the first round
    try:
        while True:
            n = conn.recv()
            if n is None:
                break
            Channel(f'round.{n}').send({'n': n})
            marker.send({'n': n})
    finally:
        conn.send(channels.shutdown(10))


def run_receiver(to_sender: Any, results: Any, settings: dict[str, Any], mode: str,
                 rounds: int) -> None:
    """Play *rounds* rounds (*mode* 'flush' or 'listen'); send back the missed ones."""
    import channels
    channels.shutdown()
    channels.configure(**settings)
    try:
        if mode == 'listen':
            missed = asyncio.run(_listen_rounds(to_sender, rounds))
        else:
            missed = _flush_rounds(to_sender, rounds, mode == 'flush')
        results.send(('ok', missed))
    except Exception as exc:
        results.send(('error', repr(exc)))
    finally:
        to_sender.send(None)
        channels.shutdown(10)


class _Markers:
    """The marker numbers seen so far, awaited from a thread."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.cond = threading.Condition()

    def __call__(self, message) -> None:
        with self.cond:
            self.seen.add(message.data['n'])
            self.cond.notify_all()

    def wait(self, n: int) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: n in self.seen, MARKER_TIMEOUT):
                raise AssertionError(f'marker {n} did not come within {MARKER_TIMEOUT}s')


def _flush_rounds(to_sender: Any, rounds: int, fence: bool) -> list[int]:
    import channels
    from channels import Channel
    markers = _Markers()
    Channel(MARKER, markers)
    assert channels.flush(MARKER_TIMEOUT), 'the broker did not answer the first flush'
    missed: list[int] = []
    for n in range(rounds):
        got = threading.Event()
        channel = Channel(f'round.{n}', lambda message, got=got: got.set())
        if fence:
            assert channels.flush(MARKER_TIMEOUT), f'flush() timed out in round {n}'
        to_sender.send(n)
        markers.wait(n)
        if not got.wait(GRACE):
            missed.append(n)
        channel.unsubscribe()
        if len(missed) >= MAX_MISSES:
            break
    return missed


async def _listen_rounds(to_sender: Any, rounds: int) -> list[int]:
    import channels
    missed: list[int] = []
    async with channels.listen(MARKER) as markers:
        for n in range(rounds):
            async with channels.listen(f'round.{n}') as inbox:
                to_sender.send(n)
                deadline = time.monotonic() + MARKER_TIMEOUT
                while (await asyncio.wait_for(markers.get(), deadline - time.monotonic())
                       ).data['n'] != n:
                    pass
                try:
                    await asyncio.wait_for(inbox.get(), GRACE)
                except TimeoutError:
                    missed.append(n)
            if len(missed) >= MAX_MISSES:
                break
    return missed
