"""A short run of scripts/soak.py: churn, restarts and exactly-once, for a few seconds."""

from __future__ import annotations

import subprocess
import sys

import pytest
from brokers import ROOT


@pytest.mark.timeout(120)
def test_a_short_soak_loses_and_repeats_nothing():
    result = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'soak.py'),
                             '--duration', '5', '--processes', '4', '--rate', '2000',
                             '--restart-every', '1.5'], capture_output=True, text=True,
                            timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'losses 0, duplicates or reorders 0' in result.stdout
    assert ' restarts' in result.stdout and ', 0 restarts' not in result.stdout
