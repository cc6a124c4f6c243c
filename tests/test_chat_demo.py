"""The chat demo of the README, in a real browser, across real worker processes.

Starts the demo as the README does, ``channels-broker -- uvicorn examples.chat.app:app
--workers 4`` (on a free port, with a broker address of its own), and drives headless
Chromium (Debian's ``/usr/bin/chromium``) with Playwright: one browser context per page,
so no two pages share a connection, and pages are opened until their streams sit in at
least two different workers. One page then sends a few messages through the form, each
once the previous one has come back on its stream (as a person types), and every page
must show each of them exactly once, in the order sent, with the pid of the worker that
took it. One message is HTML, which must show as text. A screenshot of a page that
received them through another worker goes to ``test-artifacts/chat-demo.png``.

The launcher and its whole process tree are always stopped (SIGTERM, then SIGKILL of
whatever is left), and the browser is always closed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import ROOT
from servers import Launched, chromium, free_port, open_page

logger = logging.getLogger(__name__)

WORKERS = 4
ROOM = 'lobby'
SCOPE_TOPIC = 'chat.rooms.*'          # each worker's Scope subscribes to it at startup
MIN_PAGES, MAX_PAGES = 3, 10
SCREENSHOT = ROOT / 'test-artifacts' / 'chat-demo.png'
MESSAGES = [
    'hello from the first tab',
    '<b>not bold</b> & <script>window.pwned = 1</script>',
    'a third one',
    'ünïcödé ✓ and "quotes"',
    'the last one',
]
NAME = 'alice <&>'
VIEWPORT = {'width': 860, 'height': 600}


def _demo_command(port: int) -> list[str]:
    """The README's command, on *port* (``channels-broker --`` is added by Launched)."""
    return [sys.executable, '-m', 'uvicorn', 'examples.chat.app:app',
            '--workers', str(WORKERS), '--host', '127.0.0.1', '--port', str(port)]


def wait_demo(server: Launched, timeout: float = 30.0) -> None:
    """Wait until the demo's launcher is listening, the demo answers ``GET /stats``, and
    every worker's Scope is subscribed to ``chat.rooms.*`` at the broker."""
    server.wait_listening()
    server.wait_http(timeout, path='/stats')
    server.wait_workers(timeout, topic=SCOPE_TOPIC)


@pytest.fixture
def demo(broker_address: str, tmp_path: Path) -> Iterator[Launched]:
    """The demo under ``channels-broker``, every worker up and subscribed; always stopped."""
    port = free_port()
    server = Launched(broker_address, _demo_command(port), port, WORKERS,
                      out_dir=tmp_path, log_dir=tmp_path)
    try:
        wait_demo(server)
        yield server
    finally:
        server.stop()


@pytest.fixture
def browser() -> Iterator[object]:
    """Headless Chromium driven by Playwright; always closed."""
    with chromium() as launched:
        yield launched


def _shown(page) -> list[dict]:
    """The messages a page shows, in order: id, sender pid, name and text."""
    return page.eval_on_selector_all('#messages li[data-id]', '''items => items.map(li => ({
        id: li.dataset.id, pid: Number(li.dataset.pid),
        name: li.querySelector('.name').textContent,
        text: li.querySelector('.text').textContent}))''')


@pytest.mark.timeout(120)
def test_every_page_shows_each_message_once_in_order_across_workers(demo, browser):
    url = f'http://127.0.0.1:{demo.port}/?room={ROOM}'
    pages, stream_pids = [], []
    while len(pages) < MIN_PAGES or len(set(stream_pids)) < 2:
        assert len(pages) < MAX_PAGES, \
            f'{MAX_PAGES} pages, every stream in worker {stream_pids[0]}\n{demo.log}'
        page = open_page(browser, url, '#status[data-state=connected]', 10,
                         viewport=VIEWPORT)
        pages.append(page)
        stream_pids.append(int(page.evaluate('document.body.dataset.streamPid')))
    page_pids = [int(page.text_content('#page-pid')) for page in pages]
    workers = {child.pid for child in demo.server().children()}
    assert set(stream_pids) | set(page_pids) <= workers, (stream_pids, page_pids, workers)
    print(f'page pids {page_pids}, stream pids {stream_pids}')

    sender = pages[0]
    sender.fill('input[name=name]', NAME)
    sent_through = []
    for count, text in enumerate(MESSAGES, 1):
        sender.fill('input[name=text]', text)
        sender.click('button[type=submit]')
        # as a person would: the next one once this one is back on the page's stream
        sender.wait_for_function(
            'n => document.querySelectorAll("#messages li[data-id]").length >= n', arg=count,
            timeout=5_000)
        # the stream may bring it back before the POST's answer: wait for that too
        sender.wait_for_function(
            '() => document.querySelector("input[name=text]").value === ""', timeout=5_000)
        note = sender.text_content('#note')
        assert note.startswith('sent through worker pid '), note
        sent_through.append(int(note.rsplit(' ', 1)[1]))
        assert sender.input_value('input[name=text]') == ''
    assert set(sent_through) <= workers, (sent_through, workers)

    for page in pages:
        page.wait_for_function(
            'n => document.querySelectorAll("#messages li[data-id]").length >= n',
            arg=len(MESSAGES), timeout=5_000)

    # the picture: another page than the sender, whose stream is in a worker that took
    # none of the messages if there is one (the messages crossed workers to reach it)
    others = list(zip(pages, stream_pids))[1:]
    shot = next((page for page, pid in others if pid not in sent_through), others[0][0])
    SCREENSHOT.parent.mkdir(exist_ok=True)
    shot.screenshot(path=str(SCREENSHOT))
    print(f'screenshot: {SCREENSHOT}')
    logger.info('screenshot: %s', SCREENSHOT)

    expected = [{'pid': pid, 'name': NAME, 'text': text}
                for pid, text in zip(sent_through, MESSAGES)]
    first_ids = None
    for page, stream_pid in zip(pages, stream_pids):
        shown = _shown(page)
        where = f'the page whose stream is in worker {stream_pid}'
        assert [{k: m[k] for k in ('pid', 'name', 'text')} for m in shown] == expected, \
            f'{where} shows {shown}'
        ids = [m['id'] for m in shown]
        assert len(set(ids)) == len(ids), f'{where} shows an id twice: {ids}'
        first_ids = first_ids or ids
        assert ids == first_ids, f'{where} shows other messages: {ids} != {first_ids}'
        # every message event its stream carried, duplicates included
        assert page.get_attribute('#messages', 'data-received') == str(len(MESSAGES)), where
        # the HTML message is text: no element of it, no script run
        assert page.locator('#messages .text b, #messages script').count() == 0, where
        assert page.evaluate('window.pwned') is None, where

    status = demo.stop()
    assert status == 0, f'the launcher exited with {status}\n{demo.log}'
    assert not demo.left_behind, f'processes outlived the launcher: {demo.left_behind}'
    # the app ended its streams itself: uvicorn did not have to wait them out
    assert 'Waiting for connections to close' not in demo.log, demo.log
