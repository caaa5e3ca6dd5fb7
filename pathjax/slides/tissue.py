"""The method's background rule, on a low-resolution RGB image of the slide (numpy only).

A pixel is background if (1) its value in any channel (or all channels, `channel_rule='all'`)
exceeds `threshold`, or (2) at least `neighbourhood_fraction` of the pixels in its
`neighbourhood` x `neighbourhood` level-0 window are background by (1). Tissue is the rest.
Windows are centred on the pixel and clipped at the image border (the fraction is taken over the
pixels inside the image).
"""

import dataclasses

import numpy as np

METHODS = ('seed', 'otsu')
BLOCK_ROWS = 256  # rows per block of window sums: bounds the temporaries at O(BLOCK_ROWS x W)


@dataclasses.dataclass(frozen=True)
class TissueRule:
    """Settings of tissue detection and patch QC (`config.tissue`)."""

    method: str = 'seed'  # 'seed' (the method's rule) or 'otsu' (tissue_otsu)
    channel_rule: str = 'any'
    threshold: int = 200
    neighbourhood: int = 200  # window side, in level-0 pixels
    neighbourhood_fraction: float = 0.9
    min_fraction: float = 0.25  # a patch is kept when its tissue fraction reaches this
    remove_pen: bool = False
    remove_folds: bool = False
    max_artifact_fraction: float = 0.1  # more pen or fold than this in a patch drops it
    max_blur: float = 0.0  # > 0: a patch whose variance of the Laplacian is below this is dropped

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"tissue.method must be one of {', '.join(METHODS)}, got "
                             f'{self.method!r}')
        if not 0 <= self.max_artifact_fraction <= 1:
            raise ValueError(f'tissue.max_artifact_fraction must be in [0, 1], got '
                             f'{self.max_artifact_fraction}')
        if self.max_blur < 0:
            raise ValueError(f'tissue.max_blur must be >= 0 (0: off), got {self.max_blur}')
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
    """Rule (1). rgb: uint8 [H, W, 3] -> bool [H, W]. Any (all) channel above the threshold is
    the channels' maximum (minimum) above it; pairwise on channel views, 10x a reduction."""
    combine = np.maximum if rule.channel_rule == 'any' else np.minimum
    extreme = combine(rgb[..., 0], rgb[..., 1])  # uint8 [H, W]
    combine(extreme, rgb[..., 2], out=extreme)
    return extreme > rule.threshold


def _sliding_sum(values: np.ndarray, window: int, pad_before: int, pad_after: int,
                 axis: int) -> np.ndarray:
    """Sums of each `window` consecutive entries along `axis` of values zero-padded by pad_before
    and pad_after entries there: int32, that axis padded length - window + 1 long."""
    widths = [(0, 0)] * values.ndim
    widths[axis] = (pad_before + 1, pad_after)  # + 1: the cumulative sums' leading zero
    totals = np.moveaxis(np.cumsum(np.pad(values, widths), axis=axis, dtype=np.int32), axis, 0)
    return np.moveaxis(totals[window:] - totals[:-window], 0, axis)


def window_sum(values: np.ndarray, window: int, start: int = 0, stop: int | None = None
               ) -> np.ndarray:
    """Sums of `values` (bool or 0/1 [H, W], H x W < 2^31) over the centred window x window box
    of each pixel of rows start..stop, clipped at the border (rows i - window//2 .. i + window - 1
    - window//2): int32 [stop - start, W]. Exact, by separable cumulative sums over those rows
    and window - 1 more: temporaries O((stop - start + window) x W)."""
    height = len(values)
    stop = height if stop is None else stop
    before, after = window // 2, window - 1 - window // 2
    top, bottom = max(start - before, 0), min(stop + after, height)
    columns = _sliding_sum(values[top:bottom], window, top - (start - before),
                           stop + after - bottom, axis=0)  # [stop - start, W]
    return _sliding_sum(columns, window, before, after, axis=1)


def window_counts(length: int, window: int) -> np.ndarray:
    """int64 [length]: how many of each position's centred window lie inside [0, length)."""
    positions = np.arange(length)
    before, after = window // 2, window - 1 - window // 2
    return np.minimum(positions + after + 1, length) - np.maximum(positions - before, 0)


def least_sums(counts: np.ndarray, fraction: float) -> np.ndarray:
    """The least window sums s with s / count >= fraction as float64 division decides it (so 9 of
    10 reaches 0.9, though the double 0.9 exceeds 9/10), for int counts >= 1 [...] -> int64 [...].
    The float64 ceil(count * fraction) is within 1 of it, and s / count is monotonic in s."""
    counts = np.asarray(counts, np.int64)
    low = np.maximum(np.ceil(counts * fraction).astype(np.int64) - 2, 0)
    return low + sum(((low + k) / counts < fraction).astype(np.int64) for k in range(4))


def neighbourhood_background(background: np.ndarray, window: int, fraction: float) -> np.ndarray:
    """Rule (2) on rule (1)'s bool [H, W]: bool [H, W], True where at least `fraction` of the
    pixel's clipped window is background. Integer comparisons, BLOCK_ROWS rows at a time; pixel
    (i, j)'s window holds rows[i] x cols[j] pixels, a few distinct counts: a small table of least
    sums."""
    height, width = background.shape
    row_counts, row_kind = np.unique(window_counts(height, window), return_inverse=True)
    col_counts, col_kind = np.unique(window_counts(width, window), return_inverse=True)
    needed = least_sums(np.multiply.outer(row_counts, col_counts), fraction).astype(np.int32)
    crowded = np.empty((height, width), bool)
    for start in range(0, height, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, height)
        block_needed = needed[row_kind[start:stop]][:, col_kind]  # [b, W]
        crowded[start:stop] = window_sum(background, window, start, stop) >= block_needed
    return crowded


def background_mask(rgb: np.ndarray, downsample: float, rule: TissueRule) -> np.ndarray:
    """Both rules on an image at `downsample` x level 0. rgb: uint8 [H, W, 3] -> bool [H, W].
    Temporaries beyond the two masks are O(BLOCK_ROWS x W)."""
    background = pixel_background(rgb, rule)
    window = max(1, int(round(rule.neighbourhood / downsample)))
    mask = neighbourhood_background(background, window, rule.neighbourhood_fraction)
    mask |= background
    return mask
