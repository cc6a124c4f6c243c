"""Every test starts with no subscriptions and default settings, and leaks no thread."""

from __future__ import annotations

import os
import threading

import psutil
import pytest

import channels
from channels import settings
from channels.runtime import runtime


def _channel_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith('channels-')]


@pytest.fixture(autouse=True)
def clean_channels(monkeypatch):
    """Reset the process's channels before the test and stop everything after it."""
    for name in list(os.environ):
        if name.startswith(settings.ENV_PREFIX):
            monkeypatch.delenv(name)
    channels.shutdown(timeout=10)
    settings.reset()
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    with runtime.registry_lock:
        subscribed = [c for topic in list(runtime.registry.topics())
                      for c in runtime.registry.items(topic)]
    for channel in subscribed:
        channel.unsubscribe()
    channels.shutdown(timeout=10)
    settings.reset()
    leaked = [t for t in _channel_threads() if t.is_alive()]
    for thread in leaked:
        thread.join(5)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f'threads left running after the test: {still}'
    left = [p for p in psutil.Process().children(recursive=True)
            if p.pid not in children_before and not _is_multiprocessing_helper(p)]
    gone, alive = psutil.wait_procs(left, timeout=5)
    assert not alive, f'processes left running after the test: {alive}'


def _is_multiprocessing_helper(process: psutil.Process) -> bool:
    """The forkserver and resource tracker of multiprocessing outlive a test by design."""
    try:
        cmdline = ' '.join(process.cmdline())
    except psutil.Error:
        return True
    return 'forkserver' in cmdline or 'resource_tracker' in cmdline


@pytest.fixture
def broker_address(tmp_path):
    """A fresh Unix socket path for a broker (short: socket paths are limited to ~100 bytes)."""
    import tempfile
    directory = tempfile.mkdtemp(prefix='mpch-')
    yield os.path.join(directory, 'b.sock')
    import shutil
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def broker(broker_address):
    """A real broker started by scripts/channels-broker; always stopped."""
    from brokers import BrokerProcess
    process = BrokerProcess(broker_address)
    try:
        yield process.start()
    finally:
        process.stop()
