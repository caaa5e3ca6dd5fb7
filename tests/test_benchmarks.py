"""The benchmark runner (`python -m benchmarks`) and the GPU script (`benchmarks/gpu.sh --cpu`)."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / 'benchmarks'


def load(name: str):
    """benchmarks/<name>.py as a module (the scripts import their siblings by plain name)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f'benchmark_{name}', BENCHMARKS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clean_env(**extra) -> dict:
    """This environment without the test session's 8 virtual CPU devices."""
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    return env | {'JAX_PLATFORMS': 'cpu'} | extra


def good_row(**changes) -> dict:
    rows = load('rows')
    return {'benchmark': 'x', **rows.row('reading', 'patches/s', 300.0, 100.0, 'naive loop', True,
                                         'JPEG decode'), **changes}


def test_row_orients_its_ratio():
    rows = load('rows')
    assert rows.row('rate', 'patches/s', 300, 100, 'r', True, 'b')['ratio'] == 3.0
    assert rows.row('time', 's', 2.0, 6.0, 'r', False, 'b')['ratio'] == 3.0


def test_valid_row_passes():
    assert load('rows').problems(good_row()) == []


@pytest.mark.parametrize('changes, message', [
    ({'ratio': None}, "no 'ratio'"),
    ({'reference': float('nan')}, "'reference' is not finite"),
    ({'ratio': 1 / 3}, 'not the oriented quotient'),
    ({'higher_is_better': 'yes'}, "'higher_is_better' is not a bool"),
    ({'pathjax': '300'}, "'pathjax' is not a number"),
])
def test_invalid_rows_are_rejected(changes, message):
    row = good_row(**changes)
    if changes.get('ratio', 0) is None:
        del row['ratio']
    found = load('rows').problems(row)
    assert any(message in problem for problem in found), found


def test_a_failing_script_makes_a_failed_row():
    runner = load('__main__')
    found, took = runner.run_script('no_such_benchmark', quick=True)
    assert took['returncode'] != 0
    assert [r['name'] for r in found] == ['FAILED']
    assert 'no_such_benchmark' in found[0]['error']


def test_runner_writes_its_json(tmp_path):
    done = subprocess.run([sys.executable, '-m', 'benchmarks', '--quick', '--only',
                           'patch_reading', '--out', str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, env=clean_env(), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = tmp_path.glob('*.json')
    report = json.loads(path.read_text())
    assert report['quick'] and report['machine']['cores'] >= 1
    assert len(report['load_average_before']) == 3 and report['command'][-4:-2] == [
        '--only', 'patch_reading']
    assert report['rows'] and all(load('rows').problems(r) == [] for r in report['rows'])
    assert '| patch_reading |' in done.stdout


def numbers(value):
    """Every number in a JSON value."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def test_gpu_script_runs_on_cpu(tmp_path):
    done = subprocess.run(['bash', 'benchmarks/gpu.sh', '--cpu'], cwd=REPO, capture_output=True,
                          text=True, env=clean_env(OUT=str(tmp_path), PYTHON=sys.executable),
                          timeout=900)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    (path,) = tmp_path.glob('gpu-*.json')
    report = json.loads(path.read_text())
    found = report['rows']
    assert not [r for r in found if r.get('failed')]
    assert {r['section'] for r in found} == {'launch', 'vgg', 'vit', 'knn', 'slide', 'extraction'}
    assert all(math.isfinite(n) for r in found for n in numbers(r))
    slide = [r for r in found if r['section'] == 'slide' and r['unit'] == 'steps/s']
    assert {('dense' in r['name'], 'float32' in r['name']) for r in slide} == {
        (True, False), (False, False), (True, True)}


def test_slide_baselines_runs_at_smoke_size(tmp_path):
    """Each baseline's train step, pathjax vs the authors' PyTorch code, through the runner at
    --quick sizes: parity and the no-N^2 check pass, and every model has a steps/s row."""
    done = subprocess.run([sys.executable, '-m', 'benchmarks', '--quick', '--only',
                           'slide_baselines', '--out', str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, env=clean_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    (path,) = tmp_path.glob('*.json')
    found = json.loads(path.read_text())['rows']
    assert all(load('rows').problems(r) == [] for r in found)
    speed = {r['name'].split()[0]: r for r in found if r['unit'] == 'steps/s'}
    assert set(speed) == {'abmil', 'transmil', 'clam_sb', 'mean'}
    assert all(math.isfinite(r['ratio']) and r['ratio'] > 0 for r in speed.values())
