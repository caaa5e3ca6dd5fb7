"""CPU device count: the auto rule, XLA_FLAGS handling, and the config check."""

import os
import subprocess
import sys

import pytest

from configs import default
from pathjax import cpu_devices, pipeline


@pytest.mark.parametrize('cores,globals_,per_process,processes,expected', [
    (2, (32, 8), (64,), 1, 2),    # the defaults on 2 cores
    (16, (32, 8), (64,), 1, 8),   # at most the slides of a step
    (6, (32, 8), (64,), 1, 4),    # a divisor of every batch, not every core
    (16, (32, 8), (64,), 2, 4),   # two hosts share the global batches
    (4, (30, 6), (64,), 1, 2),
    (4, (7, 8), (64,), 1, 1),     # nothing splits 7: one device
    (4, (32, 8), (64,), 3, 1),    # 3 processes cannot split 8 slides evenly
])
def test_auto_count_splits_every_batch_evenly(cores, globals_, per_process, processes, expected):
    assert cpu_devices.auto_count(cores, globals_, per_process, processes) == expected


def run_python(code: str, xla_flags: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    if xla_flags is not None:
        env['XLA_FLAGS'] = xla_flags
    return subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                          check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout


EXPOSE = '''
from configs import default
from pathjax import cpu_devices
config = default.get_config()
config.cpu_devices = {count}
print(cpu_devices.expose(config))
import jax
print(len(jax.devices('cpu')))
'''


def test_expose_sets_the_count_before_jax_starts_and_keeps_a_given_one():
    assert run_python(EXPOSE.format(count=4), None).split() == ['4', '4']
    assert run_python(EXPOSE.format(count=4), '--xla_force_host_platform_device_count=3').split() \
        == ['None', '3']
    auto = run_python(EXPOSE.format(count=0), None).split()
    expected = cpu_devices.auto_count(cpu_devices.usable_cores(), (32, 8), (64,), 1)
    assert auto == [str(expected)] * 2


def test_a_count_that_does_not_split_the_batches_is_a_config_error():
    config = default.get_config()
    config.data.synthetic.num_slides = 4
    config.cpu_devices = 3
    problems = pipeline.check_config(config)
    assert any('cpu_devices=3' in p and 'learn.batch_size=32' in p for p in problems), problems
    config.cpu_devices = -1
    assert any('cpu_devices must be >= 0' in p for p in pipeline.check_config(config))
    config.cpu_devices = 4
    assert not [p for p in pipeline.check_config(config) if 'cpu_devices' in p]


RUN_WITH_VIT_WEIGHTS = '''
import sys
from configs import default
from pathjax import pipeline
config = default.get_config()
config.feature_net.backbone = 'vit_small_patch16_224'
config.feature_net.weights = sys.argv[1]
config.feature_net.learn = False
config.cpu_devices = 2
pipeline.set_backend_flags(config)
problems = pipeline.check_config(config)  # checks the weights file through JAX
import jax
print(len(jax.devices('cpu')), any('weights' in p for p in problems))
'''


def test_the_device_count_is_set_before_a_weights_check_starts_jax(tmp_path):
    """Checking a ViT weights file traces the preset's parameters, which starts JAX's backend;
    the run sets its XLA flags first, so the CPU device count (and deterministic ops) still
    apply (they were silently lost: extraction ran on one device, 16% slower on 2 cores)."""
    pytest.importorskip('torch')
    timm = pytest.importorskip('timm')
    from safetensors.torch import save_file
    from pathjax.models.patch import vit_presets
    preset = vit_presets.get_preset('vit_small_patch16_224')
    weights = tmp_path / 'vit_s.safetensors'
    save_file(timm.create_model(preset.timm_name, pretrained=False,
                                **vit_presets.timm_kwargs(preset)).state_dict(), weights)
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    out = subprocess.run([sys.executable, '-c', RUN_WITH_VIT_WEIGHTS, str(weights)], env=env,
                         capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__))).stdout
    assert out.split() == ['2', 'False']
