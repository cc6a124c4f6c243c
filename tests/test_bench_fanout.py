"""The benchmark's fan-out cases: the table from made-up runs, the command's wiring, and a
real short run of one case through a real broker (the picture: ``test_bench_plot.py``)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import ModuleType

import pytest
from brokers import ROOT
from PIL import Image


def _load_bench() -> ModuleType:
    """Import ``scripts/bench.py``, which puts ``scripts/`` on the path for ``benchmarks``."""
    spec = importlib.util.spec_from_file_location('mpch_bench_fanout',
                                                  ROOT / 'scripts' / 'bench.py')
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
from benchmarks import cases, fanout_report  # noqa: E402

RATES = {   # case: (ours, by hand) delivered/s of each round
    'fanout_listen_few': ((900_000, 1_000_000), (1_000_000, 1_000_000)),
    'fanout_listen_many': ((400_000, 450_000), (500_000, 500_000)),
    'fanout_listen_few_broker': ((700_000, 700_000), (1_000_000, 1_000_000)),
    'fanout_listen_many_broker': ((500_000, 600_000), (1_000_000, 1_000_000)),
    'fanout_coroutine': ((700_000, 800_000), (1_000_000, 1_000_000)),
    'fanout_plain': ((50_000, 60_000), (55_000, 50_000)),
}


def _results() -> dict:
    results = {}
    for case, (ours, hand) in RATES.items():
        for lib, rates in (('ours', ours), ('hand', hand)):
            results[lib, case] = [{'value': rate, 'delivered': rate, 'p50_us': 2_000.0 + n}
                                  for n, rate in enumerate(rates)]
    return results


def _by_name(rows: list[list[str]]) -> dict[str, list[str]]:
    return {row[0]: row for row in rows}


def test_the_fanout_table_gives_each_case_ours_by_hand_their_ratio_and_the_goal():
    rows, notes = fanout_report.build_fanout_rows(_results(), cases.FULL)
    assert all(len(row) == len(fanout_report.HEADER) for row in rows)
    rows = _by_name(rows)
    few = rows['listen(), 1,000 consumers, no broker']
    # the ratio is the median of each round's ratio: 0.9 and 1.0
    assert few[1:] == ['950,000 msg/s', '1,000,000 msg/s', '0.95x', '2.0 ms', '2.0 ms',
                       '>= 0.8x by hand', 'yes']
    many = rows['listen(), 10,000 consumers, no broker']
    assert many[3] == '0.85x' and many[-1] == 'yes'           # 0.8 and 0.9
    flat = [row for name, row in rows.items() if name.startswith('  ratio at 10,000')]
    assert [row[1] for row in flat] == ['0.89x', '0.79x']     # no broker, through it
    assert [row[-1] for row in flat] == ['NO', 'NO']
    assert rows['listen(), 1,000 consumers, through the broker'][3] == '0.70x'
    assert rows['listen(), 1,000 consumers, through the broker'][-1] == 'NO'
    assert rows['coroutine handlers, 1,000 channels, no broker'][3:4] + \
        rows['coroutine handlers, 1,000 channels, no broker'][-1:] == ['0.75x', 'NO']
    plain = rows['plain handlers into a queue.Queue each, 1,000 channels, no broker']
    assert plain[3] == '1.05x' and plain[-2:] == ['printed', 'yes']
    assert not any(note.startswith('ERROR') for note in notes)


def test_a_ratio_no_worse_at_many_consumers_within_the_slack_meets_the_goal():
    results = _results()
    results['ours', 'fanout_listen_many'] = [{'value': 970_000, 'p50_us': 1.0}] * 2
    results['hand', 'fanout_listen_many'] = [{'value': 1_000_000, 'p50_us': 1.0}] * 2
    rows = fanout_report.build_fanout_rows(results, cases.FULL)[0]
    flat = next(row for row in rows if row[0].startswith('  ratio at 10,000'))
    assert flat[1] == '1.02x' and flat[-1] == 'yes'


def test_a_failed_run_is_left_out_and_named_in_the_notes():
    results = _results()
    results['ours', 'fanout_coroutine'] = [{'error': 'timed out after 75 s'}]
    results['hand', 'fanout_plain'] = []
    rows, notes = fanout_report.build_fanout_rows(results, cases.QUICK)
    rows = _by_name(rows)
    coroutine = rows['coroutine handlers, 50 channels, no broker']
    assert coroutine[1] == '-' and coroutine[3] == '-' and coroutine[-1] == '?'
    plain = rows['plain handlers into a queue.Queue each, 50 channels, no broker']
    assert plain[2] == '-' and plain[-1] == ''
    assert 'ERROR ours fanout_coroutine: timed out after 75 s' in notes


def test_the_pictures_figures_are_each_systems_successful_runs_by_consumers():
    results = _results()
    results['ours', 'fanout_listen_many'].append({'error': 'exit 1: boom'})
    series = fanout_report.fanout_plot_data(results, cases.FULL)
    assert [run['delivered'] for run in series['listen()'][10_000]] == [400_000, 450_000]
    assert set(series['listen(), through the broker']) == {1_000, 10_000}
    # the same fan-out by hand serves the listen and the coroutine cases
    assert len(series['by hand'][1_000]) == 4 and len(series['by hand'][10_000]) == 2
    assert set(series['coroutine handlers']) == {1_000}


def test_only_fanout_measures_each_case_for_both_systems_and_draws_only_its_picture(
        tmp_path, monkeypatch, capsys):
    asked = []

    def run_child(lib, case, quick, timeout):
        asked.append((lib, case))
        return {'value': 1e6 if lib == 'ours' else 9e5, 'delivered': 1e6, 'p50_us': 900.0,
                'consumers': 50}

    monkeypatch.setattr(bench, 'run_child', run_child)
    out = tmp_path / 'out.png'
    assert bench.main(['--quick', '--only', 'fanout', '--markdown', '--plot', str(out)]) == 0
    assert asked == [(lib, case) for case in cases.FANOUT_CASES for lib in ('ours', 'hand')]
    printed = capsys.readouterr().out
    assert '| ' + ' | '.join(fanout_report.HEADER) + ' |' in printed
    assert '| listen(), 50 consumers, no broker | 1,000,000 msg/s | 900,000 msg/s | 1.11x |' \
        in printed
    assert not out.exists()                      # no cross-process runs were asked for
    with Image.open(tmp_path / 'out-fanout.png') as image:
        assert image.format == 'PNG' and image.size[0] >= 800


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_quick_run_of_a_case_through_a_real_broker_measures_both_systems(tmp_path):
    """``bench.py --quick --one SYSTEM.fanout_listen_many_broker``, each a few tenths of a
    second: its own channels-broker, every consumer's every message, both figures."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith('CHANNELS_')}
    env['PYTHONPATH'] = str(ROOT)
    consumers = cases.QUICK['fan_consumers'][1]
    for system in cases.FANOUT_SYSTEMS:
        result = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'bench.py'), '--quick',
                                 '--one', f'{system}.fanout_listen_many_broker'],
                                capture_output=True, text=True, timeout=50, env=env,
                                cwd=str(tmp_path))
        assert result.returncode == 0, result.stdout + result.stderr
        run = json.loads(result.stdout.splitlines()[-1])
        assert run['consumers'] == consumers and run['broker'] is True
        assert run['deliveries'] == run['count'] * consumers and run['delivered'] > 0
        assert 0 < run['p50_us'] < run['p99_us'] and 'warnings' not in run, run
