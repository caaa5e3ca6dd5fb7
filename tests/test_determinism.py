"""config.deterministic: XLA's deterministic-ops flag is set before the backend starts, or a
clear error when it started already. Flag-setting runs in subprocesses, so this process's
backend keeps its own flags."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from pathjax import determinism, pipeline
from pathjax.errors import UsageError
from tests.conftest import REPO, make_config


def run_python(code: str, **environment) -> subprocess.CompletedProcess:
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **environment}
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('flags, expected', [
    ('', False),
    ('--xla_force_host_platform_device_count=8', False),
    ('--xla_gpu_deterministic_ops', True),
    ('--xla_gpu_deterministic_ops=true', True),
    ('--xla_gpu_deterministic_ops=True --xla_force_host_platform_device_count=8', True),
    ('--xla_gpu_deterministic_ops=1', True),
    ('--xla_gpu_deterministic_ops=false', False),
    ('--xla_gpu_deterministic_ops=true --xla_gpu_deterministic_ops=false', False),
    ('--xla_gpu_exclude_nondeterministic_ops=true', True),
    ('--xla_gpu_deterministic_ops_extra=true', False),
])
def test_deterministic_ops_enabled_reads_xla_flags(monkeypatch, flags, expected):
    monkeypatch.setenv('XLA_FLAGS', flags)
    assert determinism.deterministic_ops_enabled() is expected


def test_enable_sets_the_flag_before_the_backend_starts():
    result = run_python("""
        import os
        import jax
        from jax._src import xla_bridge
        from pathjax import determinism
        assert not determinism.deterministic_ops_enabled()
        determinism.enable_deterministic_ops()
        assert not xla_bridge.backends_are_initialized()
        print(os.environ['XLA_FLAGS'])
        assert determinism.deterministic_ops_enabled()
        determinism.enable_deterministic_ops()  # again: nothing to do, no error
        print(len(jax.devices()), float(jax.jit(lambda x: x.sum())(jax.numpy.ones(3))))
        determinism.enable_deterministic_ops()  # the backend runs with the flag: no error
        print(os.environ['XLA_FLAGS'])
    """, XLA_FLAGS='--xla_force_host_platform_device_count=2')
    assert result.returncode == 0, result.stderr
    flags_set, devices_and_sum, flags_after = result.stdout.splitlines()
    # The flag is appended, the earlier flags kept (and in effect: 2 devices), once.
    assert flags_set == ('--xla_force_host_platform_device_count=2 '
                         '--xla_gpu_deterministic_ops=true')
    assert devices_and_sum == '2 3.0'
    assert flags_after == flags_set


def test_a_started_backend_without_the_flag_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
    jax.devices()  # this process's backend has started
    with pytest.raises(UsageError, match='XLA_FLAGS="--xla_gpu_deterministic_ops=true".*'
                                         'before importing jax'):
        determinism.enable_deterministic_ops()
    assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=8'
    workdir = tmp_path / 'run'
    with pytest.raises(UsageError, match='deterministic=True'):
        pipeline.run(make_config(deterministic=True), workdir, ['tile'])
    assert not workdir.exists()  # stopped before any work


def test_launch_with_deterministic_sets_the_flag_and_tiles(tmp_path):
    command = [sys.executable, str(REPO / 'launch.py'), '--config', str(REPO / 'configs/test.py'),
               '--workdir', str(tmp_path), '--stages=tile', '--config.deterministic=True',
               '--config.data.synthetic.num_slides=4', '--verbosity=0']  # the INFO records
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'})
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'deterministic ops: XLA_FLAGS=--xla_gpu_deterministic_ops=true' in result.stderr
    assert len(list((tmp_path / 'tiles').glob('*.npz'))) == 4
