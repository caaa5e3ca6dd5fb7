"""Reinhard stain normalization (Reinhard et al. 2001) as torchstain's numpy backend does it.

Pixels go to CIE L*a*b* (sRGB primaries, D65 white; L in [0, 100]), each channel is standardized
by the slide's mean and standard deviation (population, ddof 0) and rescaled to the reference's:
lab' = (lab - mean) std_ref / std + mean_ref = lab * scale + shift, then back to sRGB, clipped to
[0, 255] and rounded (torchstain truncates).

Lab is OpenCV's float conversion from linear RGB, the sRGB decoding done exactly by a 256-entry
table (OpenCV's direct float sRGB -> Lab interpolates a coarse table: up to 0.5 off in a*). It is
torchstain's (and scikit-image's) formula with OpenCV's rounded white point (0.950456, 1, 1.088754
instead of 0.95047, 1, 1.08883): a* within 0.0025 and b* within 0.0047 of theirs. The way back is
OpenCV's float Lab -> sRGB (its sRGB encoding a spline, within 0.02 grey levels): within 0.1 grey
level of torchstain's for saturated colours, 0.01 for H&E ones.
"""

import cv2
import numpy as np

from pathjax.slides.stain import opencv_pixels

MIN_STD = 1e-3  # Lab units; a channel with less spread cannot be rescaled
_VALUES = np.arange(256) / 255.0
SRGB_TO_LINEAR = np.where(_VALUES > 0.04045, ((_VALUES + 0.055) / 1.055) ** 2.4,
                          _VALUES / 12.92).astype(np.float32)  # [256]


def lab(pixels: np.ndarray) -> np.ndarray:
    """uint8 [R, C, 3] RGB -> float32 [R, C, 3] Lab."""
    return cv2.cvtColor(cv2.LUT(pixels, SRGB_TO_LINEAR), cv2.COLOR_LRGB2Lab)


def slide_statistics(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Lab channel means and standard deviations of one slide's tissue pixels (or a template's).

    pixels: uint8 [N, 3] RGB -> {'lab_mean': float64 [3], 'lab_std': float64 [3]}. Pixels with no
    spread in a channel (e.g. all white) are a ValueError."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 or not len(pixels):
        raise ValueError(f'Reinhard statistics need uint8 [N, 3] RGB pixels, N > 0, got '
                         f'{pixels.dtype} {list(pixels.shape)}')
    values = lab(np.ascontiguousarray(pixels)[:, None]).reshape(-1, 3).astype(np.float64)
    return checked_statistics({'lab_mean': values.mean(axis=0), 'lab_std': values.std(axis=0)})


def checked_statistics(statistics, what: str = 'Reinhard statistics') -> dict[str, np.ndarray]:
    """`statistics` as float64 arrays, or a ValueError saying what is wrong (they may come from a
    damaged file, or from pixels of one colour)."""
    try:
        mean, std = np.asarray(statistics['lab_mean']), np.asarray(statistics['lab_std'])
    except (KeyError, TypeError, IndexError):
        raise ValueError(f'{what} need lab_mean and lab_std') from None
    for name, array in (('lab_mean', mean), ('lab_std', std)):
        if array.shape != (3,) or array.dtype.kind != 'f' or not np.isfinite(array).all():
            raise ValueError(f'{what}: {name} must be finite floats [3], got {array.dtype} '
                             f'{list(array.shape)}')
    if not (std >= MIN_STD).all():
        raise ValueError(f'{what}: lab_std {std} (L, a, b) must be at least {MIN_STD}: the '
                         'pixels have no spread to rescale')
    return {'lab_mean': mean.astype(np.float64), 'lab_std': std.astype(np.float64)}


def reference(statistics: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A cohort reference, every slide weighing the same: the mean of the slides' means and the
    pooled standard deviation sqrt(mean of their variances)."""
    if not statistics:
        raise ValueError('no slide statistics to build a Reinhard stain reference from')
    checked = [checked_statistics(s) for s in statistics]
    return {'lab_mean': np.mean([s['lab_mean'] for s in checked], axis=0),
            'lab_std': np.sqrt(np.mean([s['lab_std'] ** 2 for s in checked], axis=0))}


def fit(slide: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The slide's Lab map onto the reference, lab' = lab * scale + shift:
    {'stain_lab_scale': float32 [3] std_ref / std, 'stain_lab_shift': float32 [3]
    mean_ref - mean * scale}."""
    slide = checked_statistics(slide, 'Reinhard slide statistics')
    reference = checked_statistics(reference, 'Reinhard reference statistics')
    scale = reference['lab_std'] / slide['lab_std']
    shift = reference['lab_mean'] - slide['lab_mean'] * scale
    return {'stain_lab_scale': scale.astype(np.float32),
            'stain_lab_shift': shift.astype(np.float32)}


def apply(images: np.ndarray, transform: dict[str, np.ndarray]) -> np.ndarray:
    """uint8 [..., 3] -> uint8 [..., 3]: sRGB -> Lab -> lab * scale + shift -> sRGB per pixel,
    clipped and rounded, all float32 in OpenCV. `transform` may come from an npz file: scale and
    shift must be finite floats [3]."""
    try:
        scale = np.asarray(transform['stain_lab_scale'])
        shift = np.asarray(transform['stain_lab_shift'])
    except (KeyError, TypeError, IndexError):
        raise ValueError('a Reinhard transform needs stain_lab_scale and stain_lab_shift') from None
    for name, array in (('stain_lab_scale', scale), ('stain_lab_shift', shift)):
        if array.shape != (3,) or array.dtype.kind != 'f' or not np.isfinite(array).all():
            raise ValueError(f'{name} must be finite floats [3], got {array.dtype} '
                             f'{list(array.shape)}')
    pixels = opencv_pixels(images, 'Reinhard')
    if not pixels.size:
        return pixels.reshape(np.shape(images)).copy()
    affine = np.concatenate([np.diag(scale), shift[:, None]], axis=1).astype(np.float32)
    rgb = cv2.cvtColor(cv2.transform(lab(pixels), affine), cv2.COLOR_Lab2RGB)
    return cv2.convertScaleAbs(rgb, alpha=255.0).reshape(np.shape(images))
