"""The method's background rule, on a low-resolution RGB image of the slide (numpy only).

A pixel is background if (1) its value in any channel (or all channels, `channel_rule='all'`)
exceeds `threshold`, or (2) at least `neighbourhood_fraction` of the pixels in its
`neighbourhood` x `neighbourhood` level-0 window are background by (1). Tissue is the rest.
Windows are centred on the pixel and clipped at the image border (the fraction is taken over the
pixels inside the image).
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TissueRule:
    """Settings of the background rule (`config.tissue`)."""

    channel_rule: str = 'any'
    threshold: int = 200
    neighbourhood: int = 200  # window side, in level-0 pixels
    neighbourhood_fraction: float = 0.9
    min_fraction: float = 0.25  # a patch is kept when its tissue fraction reaches this

    def __post_init__(self):
        if self.channel_rule not in ('any', 'all'):
            raise ValueError(f"tissue.channel_rule must be 'any' or 'all', got {self.channel_rule!r}")
        if not 0 <= self.threshold <= 255:
            raise ValueError(f'tissue.threshold must be in [0, 255], got {self.threshold}')
        if self.neighbourhood < 1:
            raise ValueError(f'tissue.neighbourhood must be >= 1, got {self.neighbourhood}')
        if not 0 < self.neighbourhood_fraction <= 1:
            raise ValueError(
                f'tissue.neighbourhood_fraction must be in (0, 1], got {self.neighbourhood_fraction}')
        if not 0 <= self.min_fraction <= 1:
            raise ValueError(f'tissue.min_fraction must be in [0, 1], got {self.min_fraction}')


def pixel_background(rgb: np.ndarray, rule: TissueRule) -> np.ndarray:
    """Rule (1). rgb: uint8 [H, W, 3] -> bool [H, W]."""
    bright = rgb > rule.threshold
    return bright.any(axis=-1) if rule.channel_rule == 'any' else bright.all(axis=-1)


def integral_image(values: np.ndarray) -> np.ndarray:
    """Summed-area table int64 [H + 1, W + 1] of values [H, W]: entry (i, j) sums values[:i, :j]."""
    integral = np.zeros((values.shape[0] + 1, values.shape[1] + 1), np.int64)
    np.cumsum(np.cumsum(values, axis=0, dtype=np.int64), axis=1, out=integral[1:, 1:])
    return integral


def window_sum(values: np.ndarray, window: int) -> np.ndarray:
    """Sum of `values` [H, W] over the centred window x window box of each pixel, clipped at the
    border (rows i - window//2 .. i + window - 1 - window//2). Exact, via an integral image."""
    height, width = values.shape
    integral = integral_image(values)
    before, after = window // 2, window - 1 - window // 2
    rows, cols = np.arange(height), np.arange(width)
    r0, r1 = np.clip(rows - before, 0, height), np.clip(rows + after + 1, 0, height)
    c0, c1 = np.clip(cols - before, 0, width), np.clip(cols + after + 1, 0, width)
    return (integral[r1][:, c1] - integral[r0][:, c1] - integral[r1][:, c0] + integral[r0][:, c0])


def background_mask(rgb: np.ndarray, downsample: float, rule: TissueRule) -> np.ndarray:
    """Both rules on an image at `downsample` x level 0. rgb: uint8 [H, W, 3] -> bool [H, W]."""
    background = pixel_background(rgb, rule)
    window = max(1, int(round(rule.neighbourhood / downsample)))
    ones = np.ones(background.shape, np.int64)
    fraction = window_sum(background, window) / window_sum(ones, window)
    return background | (fraction >= rule.neighbourhood_fraction)

