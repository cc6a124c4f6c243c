"""The chat demo on two "machines" bridged through a real Redis or NATS JetStream server,
in a real browser.

Each machine is a launcher of its own, as the README's "Across machines" runs it::

    channels-broker --address A1 --bridge URL -- uvicorn examples.chat.app:app --workers 2 --port P1
    channels-broker --address A2 --bridge URL -- uvicorn examples.chat.app:app --workers 2 --port P2

against a ``redis-server`` or ``nats-server -js`` of the test's (``tests/engines.py``: a
free port, data in a temp dir; never the machine's own). Headless Chromium opens pages on
both ports, one browser context per page, until on each machine the pages' streams sit in
both of its workers. One page of machine A then sends three messages through its form,
each once the previous one came back on its stream (as a person types); one page of
machine B answers with two once it shows A's three. Every page of both machines must show
the five exactly once, in that order, each with the worker pid and the machine
(``host:port``) that took it; one is HTML and must show as text. A screenshot of a page
of machine B goes to ``test-artifacts/chat-demo-two-machines-ENGINE.png``.

Both launchers with their whole process trees and the engine are always stopped, and the
browser is always closed.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import ROOT
from engines import EngineServer, free_port
from servers import Launched, new_page, stats_or_error
from support import wait_until
from test_chat_demo import (MESSAGES, NAME, ROOM, SCOPE_TOPIC, VIEWPORT, browser,  # noqa: F401
                            wait_demo)

from channels.cli import fetch_stats
from channels.errors import ChannelsError

logger = logging.getLogger(__name__)

WORKERS = 2                      # per machine
MAX_PAGES = 12                   # per machine, to find pages whose streams are in both
BATCH = 3                        # pages whose navigations start together
FROM_A, FROM_B = MESSAGES[:3], MESSAGES[3:]
NAME_B = 'bob'
ARTIFACTS = ROOT / 'test-artifacts'


class Machine:
    """One launcher: a broker bridged through the engine, and its uvicorn workers."""

    def __init__(self, label: str, engine: EngineServer, directory: str, log_dir: Path
                 ) -> None:
        self.label = label
        self.port = free_port()
        self.host = f'{socket.gethostname()}:{self.port}'     # what the page shows
        log_dir.mkdir()
        command = [sys.executable, '-m', 'uvicorn', 'examples.chat.app:app',
                   '--workers', str(WORKERS), '--host', '127.0.0.1', '--port', str(self.port)]
        self.server = Launched(f'{directory}/{label}.sock', command, self.port, WORKERS,
                               out_dir=log_dir, log_dir=log_dir,
                               broker_args=('--bridge', engine.url))

    @property
    def address(self) -> str:
        return self.server.address

    def wait_ready(self) -> None:
        """Until it answers HTTP and both workers are subscribed at the broker."""
        wait_demo(self.server)

    def workers(self) -> set[int]:
        """The pids of its uvicorn workers (the master's children that the broker lists as
        subscribed to the rooms; the master has other children too)."""
        return self.server.subscribed_workers(SCOPE_TOPIC)

    def bridge(self) -> dict | None:
        """The broker's ``stats`` ``"bridge"`` object, or None while it does not answer."""
        try:
            return fetch_stats(self.address)['bridge']
        except ChannelsError:
            return None


@pytest.fixture(params=['redis', 'nats'])
def engine(request) -> Iterator[EngineServer]:
    """A Redis or NATS JetStream server of this test's own; always stopped."""
    server = EngineServer(request.param)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def machines(engine: EngineServer, tmp_path: Path) -> Iterator[tuple[Machine, Machine]]:
    """Machines A and B, bridged and ready; both always stopped, even if one failed to
    start."""
    directory = tempfile.mkdtemp(prefix='mpch-')      # short: socket paths are limited
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        pair = []
        for label in ('a', 'b'):
            machine = Machine(label, engine, directory, tmp_path / label)
            stack.callback(machine.server.stop)
            pair.append(machine)
        for machine in pair:
            machine.wait_ready()

        def bridged() -> bool:
            for machine in pair:
                machine.server._alive()
                bridge = machine.bridge()
                if not bridge or not bridge['connected'] or not bridge['peers']:
                    return False
            return True
        try:
            wait_until(bridged, 20, interval=0.05, what='both bridges connected and '
                                                        'hearing each other')
        except AssertionError as exc:
            raise AssertionError(f'{exc}: {[stats_or_error(m.address) for m in pair]}'
                                 f'\n{pair[0].server.log}\n{pair[1].server.log}') from None
        yield pair[0], pair[1]


def _open_pages(browser, machine: Machine) -> tuple[list, list[int]]:
    """Pages of *machine*, one browser context each, until their streams are in all of
    its workers; the pages and their stream pids.

    Pages are opened ``BATCH`` at a time, their navigations started together: opened one
    by one, each finds both workers idle on the shared listening socket, and the same one
    tends to win every accept (seen: 8 pages in a row), so the other might never get a
    stream.
    """
    url = f'http://127.0.0.1:{machine.port}/?room={ROOM}'
    pages, stream_pids = [], []
    while len(set(stream_pids)) < WORKERS:
        assert len(pages) < MAX_PAGES, (f'{len(pages)} pages on machine {machine.label}, '
                                        f'streams in workers {set(stream_pids)} only')
        batch = []
        for _ in range(BATCH):
            batch.append(new_page(browser, 10, viewport=VIEWPORT))
        for page in batch:          # start each navigation, wait for none of them yet
            page.evaluate('url => { setTimeout(() => { location.href = url; }, 0); }', url)
        for page in batch:
            page.wait_for_selector('#status[data-state=connected]')
            assert page.text_content('#machine') == machine.host
            pages.append(page)
            stream_pids.append(int(page.evaluate('document.body.dataset.streamPid')))
    workers = machine.workers()
    assert set(stream_pids) == workers, (stream_pids, workers)
    return pages, stream_pids


def _shown(page) -> list[dict]:
    """The messages a page shows, in order: id, sender pid and machine, name and text."""
    return page.eval_on_selector_all('#messages li[data-id]', '''items => items.map(li => ({
        id: li.dataset.id, pid: Number(li.dataset.pid), machine: li.dataset.machine,
        name: li.querySelector('.name').textContent,
        text: li.querySelector('.text').textContent}))''')


def _type(page, name: str, texts: list[str], already: int) -> list[int]:
    """Send *texts* through *page*'s form, each once the previous one is back on the
    page's stream (the page showed *already* messages before); the pids that took them."""
    page.fill('input[name=name]', name)
    took = []
    for count, text in enumerate(texts, already + 1):
        page.fill('input[name=text]', text)
        page.click('button[type=submit]')
        page.wait_for_function(
            'n => document.querySelectorAll("#messages li[data-id]").length >= n',
            arg=count, timeout=10_000)
        # the stream may bring it back before the POST's answer: wait for that too
        page.wait_for_function(
            '() => document.querySelector("input[name=text]").value === ""', timeout=10_000)
        note = page.text_content('#note')
        assert note.startswith('sent through worker pid '), note
        took.append(int(note.rsplit(' ', 1)[1]))
        assert page.input_value('input[name=text]') == ''
    return took


@pytest.mark.timeout(150)
def test_every_page_of_both_machines_shows_each_message_once_in_order(machines, browser,
                                                                      engine):
    a, b = machines
    pages_a, streams_a = _open_pages(browser, a)
    pages_b, streams_b = _open_pages(browser, b)
    print(f'machine A {a.host} streams {streams_a}, machine B {b.host} streams {streams_b}')

    took_a = _type(pages_a[0], NAME, FROM_A, 0)
    assert set(took_a) <= a.workers(), took_a
    # a person on machine B answers once A's messages are on the page
    pages_b[0].wait_for_function(
        'n => document.querySelectorAll("#messages li[data-id]").length >= n',
        arg=len(FROM_A), timeout=10_000)
    took_b = _type(pages_b[0], NAME_B, FROM_B, len(FROM_A))
    assert set(took_b) <= b.workers(), took_b

    pages = pages_a + pages_b
    for page in pages:
        page.wait_for_function(
            'n => document.querySelectorAll("#messages li[data-id]").length >= n',
            arg=len(MESSAGES), timeout=10_000)

    # the picture: a page of machine B that did not send, showing what A sent
    shot = pages_b[1]
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f'chat-demo-two-machines-{engine.kind}.png'
    shot.screenshot(path=str(path))
    print(f'screenshot: {path}')
    logger.info('screenshot: %s', path)

    expected = ([{'pid': pid, 'machine': a.host, 'name': NAME, 'text': text}
                 for pid, text in zip(took_a, FROM_A)]
                + [{'pid': pid, 'machine': b.host, 'name': NAME_B, 'text': text}
                   for pid, text in zip(took_b, FROM_B)])
    first_ids = None
    for page, machine, stream in ([(p, a, s) for p, s in zip(pages_a, streams_a)]
                                  + [(p, b, s) for p, s in zip(pages_b, streams_b)]):
        shown = _shown(page)
        where = f'the page of machine {machine.label} whose stream is in worker {stream}'
        assert [{k: m[k] for k in ('pid', 'machine', 'name', 'text')} for m in shown] \
            == expected, f'{where} shows {shown}'
        ids = [m['id'] for m in shown]
        assert len(set(ids)) == len(ids), f'{where} shows an id twice: {ids}'
        first_ids = first_ids or ids
        assert ids == first_ids, f'{where} shows other messages: {ids} != {first_ids}'
        # every message event its stream carried, duplicates included
        assert page.get_attribute('#messages', 'data-received') == str(len(MESSAGES)), where
        assert page.locator('#messages .text b, #messages script').count() == 0, where
        assert page.evaluate('window.pwned') is None, where

    for machine, sent in ((a, len(FROM_A)), (b, len(FROM_B))):
        bridge = machine.bridge()
        assert bridge['connected'] and bridge['lost'] == 0, bridge
        assert bridge['sent'] == sent and bridge['received'] == len(MESSAGES) - sent, bridge
    for machine in (a, b):
        status = machine.server.stop()
        assert status == 0, f'machine {machine.label} exited with {status}\n' \
                            f'{machine.server.log}'
        assert not machine.server.left_behind, machine.server.left_behind
