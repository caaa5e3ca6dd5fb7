"""The 8 symmetries of the square (dihedral group D4) as a per-sample random augmentation.

Each element of D4 is (optional transpose) then (optional vertical flip) then (optional horizontal
flip); index k in [0, 8) encodes the three bits (transpose = k & 4, vertical = k & 2,
horizontal = k & 1). Rotations by 90, 180 and 270 degrees are among them. Jittable; runs on device.
"""

import jax
import jax.numpy as jnp


def d4_transform(image: jax.Array, k: jax.Array) -> jax.Array:
    """Applies symmetry k (int scalar in [0, 8)) to one square image [H, W, C]."""
    image = jnp.where(k & 4, jnp.swapaxes(image, 0, 1), image)
    image = jnp.where(k & 2, image[::-1], image)
    return jnp.where(k & 1, image[:, ::-1], image)


def random_d4(rng: jax.Array, images: jax.Array) -> jax.Array:
    """An independent uniformly random symmetry per sample. images: [B, H, W, C], H == W."""
    if images.shape[1] != images.shape[2]:
        raise ValueError(f'D4 augmentation needs square images, got {images.shape}')
    k = jax.random.randint(rng, (images.shape[0],), 0, 8)
    return jax.vmap(d4_transform)(images, k)
