"""The benchmark's picture: drawn from plain data, and drawn by a real short run."""

from __future__ import annotations

import importlib.util
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from brokers import ROOT
from PIL import Image

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _load(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` (the scripts directory is no package)."""
    spec = importlib.util.spec_from_file_location(f'mpch_{name}', ROOT / 'scripts' / f'{name}.py')
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchplot = _load('benchplot')
bench = _load('bench')          # puts scripts/ on sys.path, as running it does
from benchmarks import cases, report  # noqa: E402  (scripts/benchmarks/, found through it)


def _assert_png(path: Path, min_size: tuple[int, int] = (800, 400)) -> Image.Image:
    """*path* is a PNG that decodes, of a sane size, and not blank; the image."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        assert image.format == 'PNG'
        image.load()                                  # decodes every byte: not truncated
        width, height = image.size
        assert min_size[0] <= width <= 4000 and min_size[1] <= height <= 3000, image.size
        colors = image.convert('RGB').getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 50, 'the picture is (nearly) blank'
        return image.copy()


def _synthetic(seed: int = 7) -> tuple[dict, dict]:
    rng = random.Random(seed)
    throughput = {
        'mpchannels': {1: [107e3, 120e3, 98e3], 2: [170e3], 4: [242e3, 250e3], 8: [260e3]},
        'Queue relay': {1: [64e3, 60e3], 2: [75e3, 80e3], 4: [85e3], 8: []},   # 8: all failed
        'ZeroMQ proxy': {1: [140e3], 2: [200e3], 4: [300e3], 8: [320e3]},
    }
    latency = {'mpchannels': [[rng.lognormvariate(5.4, s) for _ in range(2000)]
                              for s in (0.4, 0.5, 0.9)],
               'ZeroMQ proxy': [[rng.lognormvariate(5.3, 0.7) for _ in range(2000)]]}
    return throughput, latency


def test_plot_of_synthetic_data_is_a_valid_png(tmp_path):
    throughput, latency = _synthetic()
    out = tmp_path / 'bench.png'
    benchplot.plot_cross(out, throughput, latency, title='a title',
                         caption='line one\nline two', latency_title='Latency')
    _assert_png(out)


def test_plot_copes_with_missing_figures(tmp_path):
    """No latency at all, one system with no runs, a single count: still a picture."""
    out = tmp_path / 'sparse.png'
    benchplot.plot_cross(out, {'a': {1: [5e4]}, 'b': {1: []}},
                         {'a': [], 'b': [[]], 'c': [[120.0]]}, title='sparse')
    _assert_png(out)
    empty = tmp_path / 'empty.png'
    benchplot.plot_cross(empty, {}, {}, title='nothing measured')
    assert empty.read_bytes()[:8] == PNG_SIGNATURE


def test_percentile_matches_the_tables_quantiles():
    samples = [random.Random(3).expovariate(1 / 200) for _ in range(1001)]
    cuts = statistics.quantiles(samples, n=100, method='inclusive')
    for p in (1, 50, 90, 99):
        assert benchplot.percentile(samples, p) == pytest.approx(cuts[p - 1])
    assert benchplot.percentile(samples, 0) == min(samples)
    assert benchplot.percentile(samples, 100) == max(samples)
    assert benchplot.percentile([42.0], 99) == 42.0
    runs = [[1.0, 9.0], [1.0, 5.0], [1.0, 2.0]]
    assert benchplot.median_run(runs) is runs[1]
    assert benchplot.median_run(runs[:2]) is runs[1]       # even: the lower middle one


def test_plot_data_takes_the_successful_runs_of_each_system():
    results = {
        ('ours', 'cross_1to1'): [{'delivered': 100.0}, {'error': 'timed out'},
                                 {'delivered': 120.0}],
        ('ours', 'cross_1to2'): [{'delivered': 180.0}],
        ('zmq', 'cross_1to1'): [{'delivered': 150.0}],
        ('ours', 'cross_latency'): [{'samples_us': [100.0, 200.0, 300.0]},
                                    {'samples_us': [200.0, 300.0, 400.0]}],
        ('queue', 'cross_latency'): [{'error': 'exit 1: boom'}],
    }
    throughput, latency = report.plot_data(results, (1, 2))
    assert throughput['mpchannels'] == {1: [100.0, 120.0], 2: [180.0]}
    assert throughput['ZeroMQ proxy'] == {1: [150.0], 2: []}
    assert throughput['Queue relay'] == {1: [], 2: []}
    assert latency == {'mpchannels': [[100.0, 200.0, 300.0], [200.0, 300.0, 400.0]],
                       'Queue relay': [], 'ZeroMQ proxy': []}
    rows, header, notes = report.build_sweep_rows(results, cases.QUICK, (1, 2))
    assert header == ['system', '1 -> 1', '1 -> 2', 'latency p50', 'latency p99']
    assert rows[0] == ['mpchannels', '110', '180', '250 µs', '348 µs']   # medians of runs
    assert rows[1] == ['Queue relay', '-', '-', '-', '-']
    assert cases.fanout_of('cross_1to8') == 8 and cases.fanout_of('cross_latency') is None
    assert cases.cross_systems('cross_1to8') == ('ours', 'queue', 'zmq')
    assert cases.cross_systems('cross_1toX') == ()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_quick_benchmark_run_draws_the_picture(tmp_path):
    """``bench.py --quick --only plot --plot out.png --sweep 1,2``: about 15 s."""
    out = tmp_path / 'out.png'
    env = {name: value for name, value in os.environ.items()
           if not name.startswith('CHANNELS_')}
    env['PYTHONPATH'] = str(ROOT)
    result = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'bench.py'), '--quick',
                             '--only', 'plot', '--plot', str(out), '--sweep', '1,2'],
                            capture_output=True, text=True, timeout=170, env=env,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in ('mpchannels', 'Queue relay', 'ZeroMQ proxy'):
        row = next(line for line in lines if line.startswith(name))
        assert ' µs' in row and ' - ' not in row, row       # every figure measured
    assert 'ERROR' not in result.stdout
    _assert_png(out)


def _local_results(star_many_count: int) -> dict:
    """One successful made-up run of every in-process case, for both libraries."""
    results = {(lib, case): [{'value': 1.0, 'count': cases.QUICK['messages']}]
               for lib in cases.LIBS for case in cases.CASES}
    results['ours', 'wild_star_few'] = [{'value': 20.0, 'count': cases.QUICK['messages']}]
    results['ours', 'wild_star_many'] = [{'value': 9000.0, 'count': star_many_count}]
    return results


def test_the_table_prints_the_cost_of_empty_prefix_patterns_next_to_few():
    few, many = cases.QUICK['wildcards']
    rows, notes = report.build_rows(_local_results(star_many_count=42), cases.QUICK)
    by_name = {row[0]: row for row in rows}
    assert by_name[f'{few:,} empty-prefix wildcard subs + 1 plain: time per message'][1] \
        == '20.0 µs/msg'
    assert by_name[f'{many:,} empty-prefix wildcard subs + 1 plain: time per message'][1] \
        == '9,000.0 µs/msg (42 msgs)'              # fewer than the other cases: said so
    ratio = by_name[f'  {many:,} vs {few:,} empty-prefix wildcard subs']
    assert ratio[1] == '450x' and ratio[4:] == ['printed', 'yes']
    assert any('*a*a*a*b<i>' in note for note in notes)


def test_empty_prefix_patterns_have_no_literal_prefix_and_miss_the_topic_sent_to():
    from channels.topics import literal_prefix, matches
    patterns = {cases.wildcard(i, star=True) for i in range(1000)}
    assert len(patterns) == 1000
    for pattern in patterns:
        assert literal_prefix(pattern) == ''
        assert not matches(pattern, cases.WILD_TARGET)
    prefixed = cases.wildcard(7, star=False)
    assert literal_prefix(prefixed) and not matches(prefixed, cases.WILD_TARGET)


def test_the_fanout_picture_of_synthetic_data_is_a_valid_png(tmp_path):
    runs = lambda *rates: [{'delivered': rate, 'p50_us': 20e6 / rate} for rate in rates]  # noqa: E731
    series = {'listen()': {1000: runs(9e5, 1e6), 10000: runs(5e5)},
              'by hand': {1000: runs(1.1e6), 10000: runs(3e5, 2.9e5)},
              'coroutine handlers': {1000: runs(8e5)},
              'plain handlers (plain, threads)': {1000: [{'delivered': 5e4, 'p50_us': None}]},
              'nothing measured': {1000: []}}
    out = tmp_path / 'fanout.png'
    benchplot.plot_fanout(out, series, title='fan-out', caption='one\ntwo')
    _assert_png(out)

