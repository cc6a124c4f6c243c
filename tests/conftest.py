"""Every test starts with no subscriptions and default settings, and leaks no thread."""

from __future__ import annotations

import threading

import pytest

import channels
from channels import settings
from channels.runtime import runtime


def _channel_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith('channels-')]


@pytest.fixture(autouse=True)
def clean_channels(monkeypatch):
    """Reset the process's channels before the test and stop everything after it."""
    for name in list(__import__('os').environ):
        if name.startswith(settings.ENV_PREFIX):
            monkeypatch.delenv(name)
    channels.shutdown(timeout=10)
    settings.reset()
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
