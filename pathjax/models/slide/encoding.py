"""The 2-D sinusoidal encoding of a patch's grid position (row, col).

The first half of the d_model dimensions encodes the row, the second half the column. Within an
axis of d_a = d_model / 2 dimensions, dimension 2i holds sin(p / 10000^(2i / d_a)) and dimension
2i + 1 holds cos(p / 10000^(2i / d_a)), p being the row or column index (the transformer's
encoding applied per axis, as in DETR).
"""

import jax
import jax.numpy as jnp

BASE = 10000.0


def axis_encoding(positions: jax.Array, dims: int) -> jax.Array:
    """positions [N] -> [N, dims] (dims even)."""
    i = jnp.arange(dims // 2, dtype=jnp.float32)
    angles = positions.astype(jnp.float32)[:, None] / BASE ** (2.0 * i / dims)  # [N, dims/2]
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(len(positions), dims)


def grid_encoding(grid: jax.Array, d_model: int) -> jax.Array:
    """grid int [N, 2] (row, col) -> [N, d_model]; d_model must be divisible by 4."""
    if d_model % 4:
        raise ValueError(f'the position encoding needs d_model divisible by 4, got {d_model}')
    half = d_model // 2
    return jnp.concatenate([axis_encoding(grid[:, 0], half), axis_encoding(grid[:, 1], half)],
                           axis=-1)
