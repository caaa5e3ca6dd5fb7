"""The histogram stain's lookup table applied on the device, fused into the network's input.

The extractor's patch reader leaves a histogram-normalized slide's table to the device
(`PatchReader(defer_lut=True)`): a gather from the table's 768 entries takes the place of the
uint8 -> float32 conversion the network's normalization starts with, and XLA fuses both. On the
2-core Zen 5 VM the gather adds 8% to that conversion (0.8 ms per 64 patches of 224 px), where
OpenCV's lookup on the reader threads costs 0.3 ms per 512-px patch (BENCHMARKS.md, patch
reading); on a GPU the reader threads are the bottleneck and the gather is free. Each image
has its own table, as the extractor's batches run on from one slide into the next; the
per-image gather costs what one shared table's does (within 1% on that VM).
"""

import jax
import jax.numpy as jnp


def lut_pixels(images: jax.Array, luts: jax.Array) -> jax.Array:
    """uint8 images [B, P, P, 3] each through its own lookup table, luts uint8 [B, 3, 256] (a
    batch can span slides) -> float32 [B, P, P, 3], out[b, ..., c] = luts[b, c, images[b, ..., c]]
    (RGB in [0, 255], as the networks take it)."""
    return jax.vmap(_one_image)(images, luts)


def _one_image(image: jax.Array, lut: jax.Array) -> jax.Array:
    table = lut.astype(jnp.float32).reshape(-1)  # [768]: channel c at c * 256
    return table[image.astype(jnp.int32) + 256 * jnp.arange(3, dtype=jnp.int32)]
