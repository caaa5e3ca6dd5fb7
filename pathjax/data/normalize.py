"""Stain normalization on device: each patch through its slide's 256-entry lookup tables.

Same mapping as `pathjax.slides.stain.apply_lut` (numpy), so host and device agree exactly.
"""

import jax
import jax.numpy as jnp


def apply_lut(images: jax.Array, luts: jax.Array) -> jax.Array:
    """images: uint8 [B, H, W, 3]; luts: uint8 [B, 3, 256] (one per image) -> uint8 [B, H, W, 3]."""
    channels = jnp.arange(3)

    def one(image, lut):
        return lut[channels, image.astype(jnp.int32)]

    return jax.vmap(one)(images, luts)
