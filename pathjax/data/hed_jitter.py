"""HED colour jitter (Tellez et al. 2019) as a per-sample random augmentation. Jittable; on device.

Colour deconvolution (Ruifrok & Johnston 2001) with scikit-image's stain matrix and
conventions: rgb in [0, 1] clamped below at 1e-6, optical density od = log(rgb) / log(1e-6),
stains = od @ HED_FROM_RGB; each stain channel c of sample b becomes
stains * alpha[b, c] + beta[b, c]; back, rgb = exp(log(1e-6) * stains @ RGB_FROM_HED) clipped to
[0, 1] (skimage.color.rgb2hed / hed2rgb). Per sample and channel, alpha ~ U(1 - sigma,
1 + sigma) and the shift is U(-sigma, sigma) in optical density (log10) units, that is
beta = that x OD_SHIFT in skimage's stain units (sigma 0.05: HED-light, 0.2: HED-strong).

One deliberate difference from scikit-image >= 0.19: rgb2hed there clamps the stains at >= 0,
which makes rgb2hed -> hed2rgb lossy wherever a pixel's optical density lies outside the cone of
the three stain vectors (on real H&E tiles 3% to 98% of the pixels, by up to 117 grey levels:
mostly a slightly negative DAB). Here the stains are not clamped, so the transform is an affine
map of log(rgb), alpha = 1 and beta = 0 is the identity, and the training images differ from the
unaugmented ones seen at evaluation only by the jitter. Where skimage's clamp is inactive the two
agree to float32 rounding (tests/data/test_hed_jitter.py).

Why the shift is drawn in optical density: in skimage's units a stain of 1 is a natural-log
optical density of 13.8, so a shift of 0.05 there moves log(rgb) by 0.69 along the stain's vector
(white becomes (163, 157, 209); on a real 256 px H&E tile 77% of the pixels reach 255 in some
channel). Tellez et al.'s code ran on scikit-image < 0.19, whose stains were -log(rgb + 2) @
HED_FROM_RGB, several times weaker per unit near white. A shift of sigma in log10 optical density
(0.05: at most an 11% change of the light, 0.2: 37%) keeps HED-light a light jitter whatever
scikit-image's convention.

Everything is elementwise float32 (the 3 x 3 products are written out, not `dot`s, which on GPU
and TPU may run in TF32 or bfloat16 at default precision).
"""

import jax
import jax.numpy as jnp
import numpy as np

# skimage.color.colorconv.rgb_from_hed (rows: the haematoxylin, eosin and DAB stain vectors).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
LOG_FLOOR = float(np.log(1e-6))  # rgb is clamped below at 1e-6; od = log(rgb) / LOG_FLOOR
OD_SHIFT = float(np.log(10) / -LOG_FLOOR)  # a log10 optical density of 1 in skimage's stain units


def _mix(x: jax.Array, matrix: jax.Array) -> jax.Array:
    """x [B, ..., 3] @ matrix [B, 3, 3] per sample, as float32 multiply-adds."""
    rows = matrix.reshape(matrix.shape[:1] + (1,) * (x.ndim - 2) + matrix.shape[1:])
    return sum(x[..., k, None] * rows[..., k, :] for k in range(3))


def jitter_rgb(rgb: jax.Array, alpha: jax.Array, beta: jax.Array) -> jax.Array:
    """rgb float [B, ..., 3] in [0, 1] -> float32 [B, ..., 3] in [0, 1] with each sample's stains
    scaled by alpha [B, 3] and shifted by beta [B, 3] (H, E, DAB order)."""
    alpha = jnp.asarray(alpha, jnp.float32)
    beta = jnp.asarray(beta, jnp.float32)
    hed_from_rgb = jnp.asarray(HED_FROM_RGB, jnp.float32)
    rgb_from_hed = jnp.asarray(RGB_FROM_HED, jnp.float32)
    # od @ H diag(alpha) R + beta @ R, in log(rgb) units: log_out = log_in @ M + LOG_FLOOR beta @ R
    scaled = hed_from_rgb[None] * alpha[:, None, :]  # [B, 3, 3]
    mixing = _mix(scaled, jnp.broadcast_to(rgb_from_hed, scaled.shape))
    offset = LOG_FLOOR * _mix(beta, jnp.broadcast_to(rgb_from_hed, scaled.shape))  # [B, 3]
    offset = offset.reshape(offset.shape[:1] + (1,) * (rgb.ndim - 2) + (3,))
    log_rgb = jnp.log(jnp.maximum(rgb.astype(jnp.float32), 1e-6))
    return jnp.minimum(jnp.exp(_mix(log_rgb, mixing) + offset), 1.0)


def hed_jitter(images: jax.Array, alpha: jax.Array, beta: jax.Array) -> jax.Array:
    """The deterministic jitter of uint8 RGB images [B, H, W, 3] -> uint8 [B, H, W, 3] (rounded to
    nearest) with stain scales alpha [B, 3] and shifts beta [B, 3]."""
    rgb = images.astype(jnp.float32) / 255.0
    return jnp.round(jitter_rgb(rgb, alpha, beta) * 255.0).astype(jnp.uint8)


def draw_jitter(rng: jax.Array, batch: int, sigma: float) -> tuple[jax.Array, jax.Array]:
    """(alpha ~ U(1 - sigma, 1 + sigma), beta ~ U(-sigma, sigma) x OD_SHIFT), each float32
    [batch, 3] (beta in skimage's stain units)."""
    scale_key, shift_key = jax.random.split(rng)
    sigma = jnp.float32(sigma)  # a Python float would be a float64 bound with 64-bit types on
    alpha = jax.random.uniform(scale_key, (batch, 3), jnp.float32, 1 - sigma, 1 + sigma)
    beta = jax.random.uniform(shift_key, (batch, 3), jnp.float32, -sigma, sigma) * OD_SHIFT
    return alpha, beta


def random_hed_jitter(rng: jax.Array, images: jax.Array, sigma: float) -> jax.Array:
    """An independent random HED jitter per sample of uint8 images [B, H, W, 3]."""
    return hed_jitter(images, *draw_jitter(rng, images.shape[0], sigma))
