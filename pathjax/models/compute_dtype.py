"""The networks' compute dtype from `config.dtype`: parameters stay float32 either way.

'auto' is bfloat16 on GPU and TPU (tensor cores, cuDNN's fused attention) and float32 on CPU, where
XLA's convolutions get no faster in bfloat16 (BENCHMARKS.md, feature network).
"""

import jax
import jax.numpy as jnp

CHOICES = ('auto', 'float32', 'bfloat16')


def compute_dtype(config) -> jnp.dtype:
    """jnp.float32 or jnp.bfloat16 for `config.dtype` on this process's default backend."""
    if config.dtype == 'auto':
        return jnp.dtype(jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16)
    return jnp.dtype(config.dtype)
