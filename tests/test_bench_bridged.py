"""The benchmark's cases across machines: the table from made-up runs, and a real short run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import psutil
import pytest
from brokers import ROOT


def _load_bench() -> None:
    """Import ``scripts/bench.py``, which puts ``scripts/`` on the path for ``benchmarks``."""
    spec = importlib.util.spec_from_file_location('mpch_bench', ROOT / 'scripts' / 'bench.py')
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


_load_bench()
from benchmarks import bridged_report, cases  # noqa: E402

CPU_OURS = {'publisher': 3.0, 'broker A': 2.0, 'broker B': 2.5, 'engine': 1.0, 'subscriber': 4.0}
CPU_PATTERN = {'publisher': 80.0, 'engine': 20.0, 'subscriber': 40.0}


def _run(rate: float, ours: bool) -> dict:
    return {'value': rate, 'delivered': rate, 'cpu_us': CPU_OURS if ours else CPU_PATTERN}


def _latency(p50: float, p99: float, ours: bool) -> dict:
    return {'value': p50, 'p50_us': p50, 'p99_us': p99,
            'cpu_us': CPU_OURS if ours else CPU_PATTERN}


def _results() -> dict:
    rates = {'ours_redis': 120_000.0, 'ours_nats': 90_000.0, 'socketio': 20_000.0,
             'broadcaster': 3_000.0, 'nats_core': 100_000.0}
    results = {}
    for lib, rate in rates.items():
        ours = lib.startswith('ours')
        results[lib, 'bridged_1to1'] = [_run(rate, ours), {'error': 'timed out'}]
        results[lib, 'bridged_1to2'] = [_run(rate * 1.5, ours)]
        results[lib, 'bridged_latency'] = [_latency(800.0 if ours else 300.0, 6_000.0, ours)]
    return results


def _by_name(rows: list[list[str]]) -> dict[str, list[str]]:
    return {row[0]: row for row in rows}


def test_the_table_across_machines_puts_each_system_in_its_column_with_ours_goals():
    rows, notes = bridged_report.build_bridged_rows(_results(), cases.FULL)
    header = bridged_report.HEADER
    assert all(len(row) == len(header) for row in rows)
    assert header[1:6] == [bridged_report.HEADER[1 + cases.BRIDGED_SYSTEMS.index(lib)]
                           for lib in cases.BRIDGED_SYSTEMS]
    rows = _by_name(rows)
    one = rows['1 -> 1 machine: throughput']
    assert one[1:6] == ['120,000 msg/s', '90,000 msg/s', '20,000 msg/s', '3,000 msg/s',
                        '100,000 msg/s']                    # the failed run is left out
    assert one[6:] == ['>= 100,000 msg/s', 'yes / NO']      # via Redis / via NATS
    vs_socketio = rows['  ours vs RedisManager pattern']
    assert vs_socketio[1:3] + vs_socketio[6:] == ['6.00x', '4.50x', '>= 5x', 'yes / NO']
    assert rows['  ours vs nats-py core'][1:3] == ['1.20x', '0.90x']
    assert rows['latency at 2,000 msg/s, 1 -> 1: p50'][1:] == \
        ['800 µs', '800 µs', '300 µs', '300 µs', '300 µs', '< 1.00 ms', 'yes / yes']
    assert rows['latency at 2,000 msg/s, 1 -> 1: p99'][-1] == 'NO / NO'
    assert rows['broker CPU per bridged message, 1 -> 1 (A + B)'][1:4] == \
        ['4.5 µs (2.0 + 2.5)', '4.5 µs (2.0 + 2.5)', '-']
    cpu = rows['  CPU/msg: publisher / brokers A + B / engine / subscriber']
    assert cpu[1] == '3.0 / 2.0 + 2.5 / 1.0 / 4.0 µs'
    assert cpu[3] == '80.0 / none / 20.0 / 40.0 µs'
    assert rows['1 -> 2 machines: delivered/s'][5] == '150,000 msg/s'
    assert any(note.startswith('ERROR ours_redis bridged_1to1: timed out') for note in notes)


def test_a_system_not_measured_shows_dashes_and_undecided_goals():
    results = {key: runs for key, runs in _results().items() if key[0] == 'nats_core'}
    rows = _by_name(bridged_report.build_bridged_rows(results, cases.QUICK)[0])
    one = rows['1 -> 1 machine: throughput']
    assert one[1:3] == ['-', '-'] and one[5] == '100,000 msg/s' and one[7] == '? / ?'
    assert rows['  ours vs nats-py core'][1:3] == ['-', '-']


def _bench_servers() -> list[psutil.Process]:
    """redis-server and nats-server processes the benchmark started (data in its temp dirs)."""
    found = []
    for process in psutil.process_iter(['cmdline']):
        cmdline = ' '.join(process.info['cmdline'] or ())
        if 'mpch-bench-' in cmdline and ('redis-server' in cmdline or 'nats-server' in cmdline):
            found.append(process)
    return found


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_quick_bridged_run_through_nats_prints_the_table_across_machines(tmp_path):
    """``bench.py --quick --bridged --engine nats``: ours via NATS and nats-py core, measured
    through their own nats-server, which is stopped after every run (about 15 s)."""
    before = {p.pid for p in _bench_servers()}
    env = {name: value for name, value in os.environ.items()
           if not name.startswith('CHANNELS_')}
    env['PYTHONPATH'] = str(ROOT)
    result = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'bench.py'), '--quick',
                             '--bridged', '--engine', 'nats', '--markdown'],
                            capture_output=True, text=True, timeout=110, env=env,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'ERROR' not in result.stdout, result.stdout
    lines = result.stdout.splitlines()
    at = lines.index('| ' + ' | '.join(bridged_report.HEADER) + ' |')
    table = []
    for line in lines[at + 2:]:
        if not line.startswith('|'):
            break
        table.append([cell.strip() for cell in line.strip('|').split(' | ')])
    assert lines[at - 2].startswith('Across machines, brokers bridged through Redis')
    assert all(len(row) == len(bridged_report.HEADER) for row in table), table
    rows = {row[0].removeprefix('↳ '): row for row in table}
    for name in ('1 -> 1 machine: throughput', '1 -> 2 machines: delivered/s',
                 'latency at 2,000 msg/s, 1 -> 1: p50', 'latency at 2,000 msg/s, 1 -> 1: p99'):
        row = rows[name]
        assert row[2] != '-' and row[5] != '-', row             # ours via NATS, nats-py core
        assert row[1] == row[3] == row[4] == '-', row           # the Redis systems: not run
    broker = rows['broker CPU per bridged message, 1 -> 1 (A + B)'][2]
    assert broker.endswith(')') and ' + ' in broker, broker
    assert rows['ours vs nats-py core'][2].endswith('x')
    assert {p.pid for p in _bench_servers()} <= before, 'an engine server was left running'
