"""Stain normalization by per-channel histogram matching, as 256-entry lookup tables (numpy).

A slide's lookup table (LUT) maps each uint8 value v of channel c to the reference value at the
same quantile: LUT[c, v] = interp(CDF_slide_c(v), CDF_ref_c, ref values), the CDF mapping of
`skimage.exposure.match_histograms` for uint8 images, rounded to uint8. Like skimage, a source
value takes the reference value at the upper end of its quantile range, which shifts means up by
a few grey levels when histograms have heavy bins (e.g. a white background peak).
"""

import cv2
import numpy as np
from PIL import Image

IDENTITY_LUT = np.tile(np.arange(256, dtype=np.uint8), (3, 1))  # [3, 256]


def channel_histograms(pixels: np.ndarray) -> np.ndarray:
    """Counts of each value per channel. pixels: uint8 [..., 3] -> int64 [3, 256]."""
    flat = pixels.reshape(-1, 3)
    return np.stack([np.bincount(flat[:, c], minlength=256) for c in range(3)]).astype(np.int64)


def fit_lut(source_histograms: np.ndarray, reference_histograms: np.ndarray) -> np.ndarray:
    """LUT mapping the source histograms onto the reference ones.

    Args:
      source_histograms: [3, 256] counts (or weights) of the slide's pixels.
      reference_histograms: [3, 256] counts (or weights) of the reference.
    Returns:
      uint8 [3, 256].
    """
    lut = np.empty((3, 256), np.uint8)
    for c in range(3):
        source, reference = source_histograms[c].astype(np.float64), reference_histograms[c]
        if source.sum() <= 0 or reference.sum() <= 0:
            raise ValueError('cannot fit a stain lookup table to an empty histogram')
        source_quantiles = np.cumsum(source) / source.sum()
        values = np.nonzero(reference)[0]
        reference_quantiles = np.cumsum(reference[values]) / reference.sum()
        mapped = np.interp(source_quantiles, reference_quantiles, values)
        lut[c] = np.clip(np.rint(mapped), 0, 255).astype(np.uint8)
    return lut


def checked_lut(lut) -> np.ndarray:
    """`lut` as uint8 [3, 256]; anything else (a damaged tiles file) is a ValueError."""
    lut = np.asarray(lut)
    if lut.shape != (3, 256) or lut.dtype != np.uint8:
        raise ValueError(f'a stain lookup table must be uint8 [3, 256], got {lut.dtype} '
                         f'{list(lut.shape)}')
    return lut


def opencv_pixels(images: np.ndarray, method: str) -> np.ndarray:
    """uint8 images [..., 3] as one contiguous OpenCV 3-channel image [rows, width, 3] (a view
    when they already are contiguous; reshape the result back to images.shape). Anything but
    uint8 RGB is a ValueError naming the `method` it was given to."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 2 or images.shape[-1] != 3:
        raise ValueError(f'{method} normalization needs uint8 [..., 3] RGB images, got '
                         f'{images.dtype} {list(images.shape)}')
    width = images.shape[-2] if images.ndim >= 3 else 1
    return np.ascontiguousarray(images).reshape(-1, width, 3)


def opencv_lut(lut: np.ndarray) -> np.ndarray:
    """A checked uint8 [3, 256] table in OpenCV's form for `cv2.LUT`: uint8 [1, 256, 3]."""
    return np.ascontiguousarray(checked_lut(lut).T[None])


def copy_through_lut(pixels: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    """out[..., c] = lut[c, pixels[..., c]], written into `out` in one pass (no intermediate).
    pixels, out: uint8 [h, w, 3], each row contiguous (views into larger images will do);
    table: `opencv_lut(lut)`."""
    written = cv2.LUT(pixels, table, dst=out)
    if written is not out:  # OpenCV could not write into this view: it returned a new image
        out[...] = written


def apply_lut(images: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """out[..., c] = lut[c, images[..., c]]. images: uint8 [..., 3]; lut: uint8 [3, 256].

    Runs as OpenCV's LUT on the pixels viewed as one 3-channel image: one pass, the GIL
    released (PIL's `point` converts to and from 4-byte pixels around its lookup: 2-3x the time
    in the patch reader). The identity (stain.method 'none') returns the images as they are,
    made contiguous. A table that is not uint8 [3, 256] (a damaged tiles file) is a ValueError."""
    lut = checked_lut(lut)
    pixels = np.ascontiguousarray(images, dtype=np.uint8)
    if np.array_equal(lut, IDENTITY_LUT) or not pixels.size:
        return pixels
    return cv2.LUT(opencv_pixels(pixels, 'histogram'), opencv_lut(lut)).reshape(pixels.shape)


def normalize_histograms(histograms: np.ndarray) -> np.ndarray:
    """[..., 3, 256] counts -> the same as per-channel probabilities (each channel sums to 1)."""
    histograms = np.asarray(histograms, np.float64)
    return histograms / np.maximum(histograms.sum(axis=-1, keepdims=True), 1e-12)


def cohort_reference(slide_histograms: list[np.ndarray]) -> np.ndarray:
    """Reference histograms of a cohort: the mean of its slides' normalized histograms, so every
    slide weighs the same whatever its size. [3, 256] float64."""
    if not slide_histograms:
        raise ValueError('no slide histograms to build a cohort stain reference from')
    return normalize_histograms(np.stack(slide_histograms)).mean(axis=0)


def slide_statistics(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """A slide's tissue pixels (or a template's), uint8 [N, 3] -> {'histograms': int64 [3, 256]};
    no pixel is a ValueError."""
    if not len(pixels):
        raise ValueError('no tissue pixel to take a histogram of')
    return {'histograms': channel_histograms(pixels)}


def reference(statistics: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A cohort reference: {'histograms': float64 [3, 256]}, `cohort_reference`."""
    return {'histograms': cohort_reference([s['histograms'] for s in statistics])}


def fit(slide: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{'stain_lut': uint8 [3, 256]} taking the slide's histograms onto the reference's."""
    return {'stain_lut': fit_lut(slide['histograms'], reference['histograms'])}


def apply(images: np.ndarray, transform: dict[str, np.ndarray]) -> np.ndarray:
    """`apply_lut` with transform['stain_lut']."""
    return apply_lut(images, transform['stain_lut'])


def read_template(path: str) -> np.ndarray:
    """The RGB pixels uint8 [H, W, 3] of a stain template image; ValueError naming the file when
    it cannot be read."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert('RGB'))
    except (OSError, ValueError) as error:
        raise ValueError(f'stain.reference: cannot read template image {path!r} ({error})') from None
