"""The benchmark runner (`python -m benchmarks`) and the GPU script (`benchmarks/gpu.sh --cpu`)."""

import importlib.util
import json
import math
import os
import pathlib
import re
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


# Rows every script must give at --quick sizes (a regular expression per row; names may say more).
EXPECTED_ROWS = {
    'patch_reading': [r'^PatchReader, 1 thread: ', r'^PatchReader, 1 thread, share of decode-only',
                      r'^PatchReader, 1 thread, stain lookup left to the device',
                      r'^PatchReader, \d+ threads: '],
    'tile_stage': [r'^tile: \d+ slides', r'^tile: kept patches/s', r'^tile: peak RSS'],
    'feature_net': [r'^train, 128 px', r'^infer, 128 px'],
    'vit_encoders': [r'inference, .*, 1 thread$', r'inference, .*, \d+ threads?$'],
    'extraction': [r'^extract vs network alone', r'^extract vs naive loop', r'^extract: peak RSS'],
    'trident_pipeline': [r'^end to end extract: ', r'^end to end tile\+extract: ',
                         r'^end to end extract, rerun: ',
                         r'^end to end extract: .* biopsy-sized'],
    'patch_input': [r'^learn_features input, 1 thread, share of decode-only',
                    r'^learn_features input, 1 thread vs TFDS',
                    r'^learn_features input, \d+ threads vs DataLoader'],
    'slide_model': [r'dense attention$', r'vs padded PyTorch$', r'graph attention$',
                    r'^dense attention forward \+ backward', r'^dense attention training temp',
                    r'^kNN graph'],
    'slide_input': [r'^host wait per batch', r'^input alone', r'^peak RSS growth',
                    r'^tracemalloc peak'],
    'slide_baselines': [f'^{m} train step{kind}, ' for m in ('abmil', 'transmil', 'clam_sb', 'mean')
                        for kind in ('', ' peak memory')],
}


def test_every_benchmark_gives_its_rows_at_quick_size(tmp_path):
    """`python -m benchmarks --quick`: every script runs (a refactor cannot break one unnoticed),
    gives each expected row with a valid oriented ratio, and the JSON records the machine."""
    runner = load('__main__')
    assert set(EXPECTED_ROWS) == set(runner.SCRIPTS)
    done = subprocess.run([sys.executable, '-m', 'benchmarks', '--quick', '--out', str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, env=clean_env(), timeout=900)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    (path,) = tmp_path.glob('*.json')
    report = json.loads(path.read_text())
    rows = report['rows']
    assert not [r for r in rows if r['name'] == 'FAILED']
    assert all(load('rows').problems(r) == [] for r in rows)
    assert all(math.isfinite(r['ratio']) and r['ratio'] > 0 for r in rows)
    # The TRIDENT-style pipeline computed the same features (the script also refuses otherwise).
    assert all(r['max_abs_difference'] <= 1e-4 for r in rows
               if r['benchmark'] == 'trident_pipeline')
    for script, patterns in EXPECTED_ROWS.items():
        names = [r['name'] for r in rows if r['benchmark'] == script]
        for pattern in patterns:
            assert any(re.search(pattern, name) for name in names), (script, pattern, names)
    machine = report['machine']
    assert machine['cpu_detail']['fp32_peak_flops'] > 0 and machine['cpu_detail']['isa'] != []
    assert {'jax', 'jaxlib', 'torch', 'timm'} <= set(machine['packages'])
    assert set(machine['libraries']) == {'openslide', 'libjpeg_turbo_pillow',
                                         'libjpeg_turbo_imagecodecs'}
    assert len(report['load_average_before']) == len(report['load_average_after']) == 3
    assert isinstance(report['above_peak'], list)


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
    assert {r['section'] for r in found} == {'launch', 'vgg', 'vit', 'knn', 'slide', 'reading',
                                             'extraction', 'trident', 'input'}
    (trident,) = [r for r in found if r['section'] == 'trident'
                  and r['name'].startswith('end to end extract: ')]
    assert trident['max_abs_difference'] <= 1e-4 and trident['ratio'] > 0
    assert all(math.isfinite(n) for r in found for n in numbers(r))
    slide = [r for r in found if r['section'] == 'slide' and r['unit'] == 'steps/s']
    assert {('dense' in r['name'], 'float32' in r['name']) for r in slide} == {
        (True, False), (False, False), (True, True)}


def test_machine_record_and_peak_flag():
    """The CPU record's float32 bound per microarchitecture, and the flag on a figure above the
    bound of the cores the row used (its `threads`)."""
    info = load('machine_info')
    assert info.fp32_flops_per_cycle('AuthenticAMD', 26, 2, {'avx2', 'fma', 'avx512f'}) == 64
    assert info.fp32_flops_per_cycle('AuthenticAMD', 25, 17, {'avx2', 'fma', 'avx512f'}) == 32
    assert info.fp32_flops_per_cycle('AuthenticAMD', 23, 1, {'avx2', 'fma'}) == 16
    assert info.fp32_flops_per_cycle('GenuineIntel', 6, 143, {'avx2', 'fma', 'avx512f'}) == 64
    assert info.fp32_flops_per_cycle('GenuineIntel', 6, 60, {'avx2', 'fma'}) == 32
    assert info.microarchitecture('AuthenticAMD', 26, 2, set()) == 'Zen 5'
    machine = {'accelerator': {'platform': 'cpu'}, 'cores_usable': 2,
               'cpu_detail': {'fp32_flops_per_cycle_per_core': 32, 'clock_mhz': 2000.0}}
    # 64 GFLOP/s per core at 2 GHz: 100 GFLOP/s is above one core's bound, not two cores'.
    one, two = {'name': 'one', 'threads': 1, 'flops_per_s': 100e9}, {'name': 'two',
                                                                     'flops_per_s': 100e9}
    (flag,) = info.above_peak([one, two], machine)
    assert flag.startswith('None: one: 100 GFLOP/s')
    assert '3.12 GHz' in flag  # 100e9 / 32 FLOP per cycle
    gpu = dict(machine, accelerator={'platform': 'gpu'})
    assert info.above_peak([one], gpu) == []


def test_tissue_qc_measures_kept_artifacts_at_smoke_size():
    """benchmarks/tissue_qc.py on two small synthetic slides with pen, blur and folds: every
    setting's shares are measured, and pen and fold removal keep fewer inked patches."""
    result = load('tissue_qc').run(quick=True)
    shares = result['synthetic']
    assert set(shares) == set(load('tissue_qc').SETTINGS)
    for figures in shares.values():
        assert figures['kept'] > 0
        assert all(0 <= figures[k] <= 1 for k in ('pen share', 'fold share', 'blur share',
                                                   'true tissue of kept', 'clean patches lost'))
    for rule in ('seed', 'otsu'):
        plain, checked = shares[f'{rule}, no QC'], shares[f'{rule} + pen, fold, blur QC']
        assert checked['kept'] < plain['kept'] and plain['pen share'] > 0
        assert checked['pen share'] < plain['pen share']
