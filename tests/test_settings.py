"""Settings: the spec's names and defaults, the environment, configure(), and bad values."""

from __future__ import annotations

import pytest
from support import Recorder

import channels
from channels import Channel, ConfigurationError, settings
from channels.runtime import runtime


def test_defaults_follow_the_spec():
    assert settings.MAX_CHANNEL_MESSAGE_BROKER_THREADS == 1
    assert settings.MAX_CHANNEL_TASK_WORKER_THREADS == 4
    assert settings.CHANNEL_WORKER_TIMEOUT == 1.0
    assert settings.CHANNEL_MESSAGE_BROKER_CLASS is channels.MessageBroker
    assert settings.CHANNEL_TASK_WORKER_CLASS is channels.TaskWorker


def test_configure_sets_a_value():
    channels.configure(MAX_CHANNEL_TASK_WORKER_THREADS=8, CHANNEL_WORKER_TIMEOUT=0.5)
    assert settings.MAX_CHANNEL_TASK_WORKER_THREADS == 8
    assert settings.CHANNEL_WORKER_TIMEOUT == 0.5


def test_environment_sets_a_value(monkeypatch):
    monkeypatch.setenv('CHANNELS_MAX_CHANNEL_TASK_WORKER_THREADS', '6')
    assert settings.MAX_CHANNEL_TASK_WORKER_THREADS == 6


def test_configure_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv('CHANNELS_CHANNEL_WORKER_TIMEOUT', '3')
    channels.configure(CHANNEL_WORKER_TIMEOUT=0.25)
    assert settings.CHANNEL_WORKER_TIMEOUT == 0.25


@pytest.mark.parametrize('name, value, allowed', [
    ('MAX_CHANNEL_TASK_WORKER_THREADS', 0, 'an int >= 1'),
    ('MAX_CHANNEL_TASK_WORKER_THREADS', 2.5, 'an int >= 1'),
    ('MAX_CHANNEL_TASK_WORKER_THREADS', True, 'an int >= 1'),
    ('MAX_CHANNEL_MESSAGE_BROKER_THREADS', -1, 'an int >= 1'),
    ('CHANNEL_WORKER_TIMEOUT', 0, 'a finite number > 0'),
    ('CHANNEL_WORKER_TIMEOUT', 'soon', 'a finite number > 0'),
    ('CHANNEL_WORKER_TIMEOUT', float('inf'), 'a finite number > 0'),
    ('CHANNEL_MESSAGE_BROKER_CLASS', 'NoDots', 'import string'),
    ('CHANNEL_MESSAGE_BROKER_CLASS', 'no_such_module.Broker', 'cannot import module'),
    ('CHANNEL_MESSAGE_BROKER_CLASS', 'channels.NoSuchBroker', 'has no attribute'),
    ('CHANNEL_MESSAGE_BROKER_CLASS', 'channels.TaskWorker', 'subclass of channels.MessageBroker'),
    ('CHANNEL_TASK_WORKER_CLASS', 'channels.shutdown', 'is not a class'),
])
def test_bad_value_raises_naming_the_setting_the_value_and_what_is_allowed(name, value,
                                                                           allowed):
    with pytest.raises(ConfigurationError, match=allowed) as info:
        channels.configure(**{name: value})
    assert name in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_value_applies_nothing():
    with pytest.raises(ConfigurationError):
        channels.configure(MAX_CHANNEL_TASK_WORKER_THREADS=3, CHANNEL_WORKER_TIMEOUT=-1)
    assert settings.MAX_CHANNEL_TASK_WORKER_THREADS == 4


def test_unknown_setting_raises_listing_the_known_ones():
    with pytest.raises(ConfigurationError, match='unknown setting .*MAX_CHANNEL_TASK'):
        channels.configure(MAX_THREADS=3)


def test_bad_environment_value_raises_naming_the_variable(monkeypatch):
    monkeypatch.setenv('CHANNELS_MAX_CHANNEL_TASK_WORKER_THREADS', 'many')
    with pytest.raises(ConfigurationError, match="CHANNELS_MAX_CHANNEL_TASK_WORKER_THREADS.*'many'"):
        Channel('chat', Recorder())


def test_configure_while_running_raises_and_says_to_shut_down_first():
    Channel('chat', Recorder())
    with pytest.raises(ConfigurationError, match=r'channels.shutdown\(\) first'):
        channels.configure(MAX_CHANNEL_TASK_WORKER_THREADS=2)


def test_restart_after_shutdown_uses_the_new_settings():
    received = Recorder()
    Channel('chat', received)
    assert len(runtime.machinery.task_workers) == 4
    channels.shutdown()
    channels.configure(MAX_CHANNEL_TASK_WORKER_THREADS=2)
    Channel('chat').send({'n': 1})
    received.wait_for(1)
    assert len(runtime.machinery.task_workers) == 2


def _readme_settings_table() -> list[tuple[str, str]]:
    """(name, default) of each row of the README's settings table."""
    from pathlib import Path
    lines = (Path(__file__).resolve().parent.parent / 'README.md').read_text().splitlines()
    start = lines.index('| setting | default | meaning |') + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith('|'):
            break
        name, default = [cell.strip().strip('`') for cell in line.split('|')[1:3]]
        rows.append((name, default))
    return rows


def test_the_readme_settings_table_gives_what_reading_each_setting_returns():
    import importlib
    rows = _readme_settings_table()
    assert sorted(name for name, _ in rows) == sorted(settings.names())
    for name, default in rows:
        value = settings.get(name)
        if isinstance(value, type):
            module, _, attribute = default.rpartition('.')
            assert getattr(importlib.import_module(module), attribute) is value, name
        else:
            assert default == repr(value), name
