"""Smooth random fields shared by the synthetic-slide modules: correlated noise, bilinear
upsampling of a coarse grid to level 0, and a slide's tissue as 1-3 blobs."""

import math

import numpy as np
from PIL import Image


def noise(rng, shape, cell) -> np.ndarray:
    """Smooth noise [h, w], zero mean, unit variance, correlation length `cell` px (or (cy, cx))."""
    h, w = shape
    cy, cx = (cell, cell) if np.isscalar(cell) else cell
    cy, cx = max(cy, 1.0), max(cx, 1.0)
    coarse = rng.standard_normal((int(h / cy) + 3, int(w / cx) + 3), dtype=np.float32)
    size = (math.ceil(coarse.shape[1] * cx), math.ceil(coarse.shape[0] * cy))
    out = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC))[:h, :w]
    sample = out[::5, ::5]
    return (out - sample.mean()) / (sample.std() + 1e-6)


def upsample(grid, shape) -> np.ndarray:
    """Bilinear resize of a float grid [gh, gw] to float32 [h, w]."""
    image = Image.fromarray(grid.astype(np.float32))
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def tissue_field(rng, gh, gw) -> np.ndarray:
    """1-3 irregular blobs along the long side [gh, gw]: high inside, falling outward."""
    transpose = gh > gw
    long_side, short_side = (gh, gw) if transpose else (gw, gh)
    k = int(rng.integers(1, 4))
    u = np.arange(long_side, dtype=np.float32)[None, :]
    v = np.arange(short_side, dtype=np.float32)[:, None]
    field = np.full((short_side, long_side), -np.inf, np.float32)
    for i in range(k):
        du = u - (i + 0.5 + rng.uniform(-0.1, 0.1)) * long_side / k
        dv = v - short_side * (0.5 + rng.uniform(-0.12, 0.12))
        ru = 0.5 * long_side / k * rng.uniform(0.7, 0.95)
        rv = 0.5 * short_side * rng.uniform(0.55, 0.85)
        angle = rng.uniform(-0.4, 0.4)
        c, s = math.cos(angle), math.sin(angle)
        field = np.maximum(field, 1.0 - np.hypot((du * c + dv * s) / ru, (dv * c - du * s) / rv))
    field += 0.25 * noise(rng, field.shape, long_side / 5)
    field += 0.08 * noise(rng, field.shape, long_side / 20)
    return field.T if transpose else field
