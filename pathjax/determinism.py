"""Deterministic XLA ops (`config.deterministic`): bit-identical reruns and resumes on GPU too.

On GPU, XLA's scatter-adds (`jax.ops.segment_sum` in the GCN and graph attention) use atomics
and cuDNN's fused attention backward may accumulate in any order, so two runs differ in the last
bits. `--xla_gpu_deterministic_ops=true` makes XLA compile deterministic versions (and skips
timing-based autotuning choices). XLA reads `XLA_FLAGS` once, when JAX starts its backend, so the
flag has to be in the environment before the first device use in the process.
"""

import os

from absl import logging
from jax._src import xla_bridge

from pathjax.errors import UsageError

FLAG = '--xla_gpu_deterministic_ops'
# Also makes XLA:GPU choose deterministic implementations (a subset of FLAG's effect).
_SUBSET_FLAG = '--xla_gpu_exclude_nondeterministic_ops'


def _flag_value(flags: list[str], name: str) -> bool:
    """The last setting of a boolean XLA flag in `flags` (False when absent)."""
    value = False
    for flag in flags:
        key, _, setting = flag.partition('=')
        if key == name:
            value = setting.lower() in ('', 'true', '1')
    return value


def deterministic_ops_enabled() -> bool:
    """Whether XLA compiles deterministic GPU ops in this process: the flags in `XLA_FLAGS`,
    which XLA read when the backend started (`enable_deterministic_ops` never changes them
    afterwards)."""
    flags = os.environ.get('XLA_FLAGS', '').split()
    return _flag_value(flags, FLAG) or _flag_value(flags, _SUBSET_FLAG)


def enable_deterministic_ops() -> None:
    """Adds `--xla_gpu_deterministic_ops=true` to `XLA_FLAGS`.

    Raises:
      UsageError: the backend already started in this process without the flag, so XLA would
        ignore it.
    """
    if deterministic_ops_enabled():
        return
    if xla_bridge.backends_are_initialized():
        raise UsageError(
            'deterministic=True, but JAX already started its backend in this process without '
            f'{FLAG}, and XLA reads XLA_FLAGS only once, at that start: set '
            f'XLA_FLAGS="{FLAG}=true" in the environment before importing jax, or run the '
            'pipeline before any other JAX use')
    os.environ['XLA_FLAGS'] = ' '.join(os.environ.get('XLA_FLAGS', '').split() + [f'{FLAG}=true'])
    logging.info('deterministic ops: XLA_FLAGS=%s', os.environ['XLA_FLAGS'])
