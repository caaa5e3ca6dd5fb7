"""Tissue by Otsu's threshold on saturation, as CLAM and TRIDENT segment it (numpy + OpenCV).

On a low-resolution RGB image: HSV saturation, median filter (MEDIAN_KERNEL, CLAM's 7), Otsu's
threshold (not below MIN_SATURATION, so an empty slide's JPEG noise is not tissue), then a
closing (CLOSING_UM), pieces of tissue smaller than a tissue.neighbourhood window removed, and
holes smaller than HOLE_WINDOWS such window filled (small lumens, fat), both 8-connected: a
larger white area (a vessel, a tear) stays background, as the method's rule keeps it.
"""

import cv2
import numpy as np

MEDIAN_KERNEL = 7
MIN_SATURATION = 15  # the threshold never goes below: glass is under 10
CLOSING_PIXELS = 2  # closing radius, overview pixels
HOLE_WINDOWS = 1  # holes smaller than this many neighbourhood windows are filled


def otsu_threshold(saturation: np.ndarray) -> int:
    """Otsu's threshold of uint8 [...] values (a value above it is tissue), at least
    MIN_SATURATION."""
    if not saturation.size:
        return MIN_SATURATION
    threshold, _ = cv2.threshold(saturation.reshape(-1, 1), 0, 255,
                                 cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return max(int(threshold), MIN_SATURATION)


def drop_small_components(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """bool [H, W] without its 8-connected components of fewer than min_pixels pixels."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
    keep[0] = False  # label 0: the other value
    return keep[labels]


def fill_small_holes(mask: np.ndarray, max_pixels: int) -> np.ndarray:
    """bool [H, W] with its holes (8-connected components of ~mask not touching the border) of
    fewer than max_pixels pixels filled."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).view(np.uint8),
                                                               connectivity=8)
    left, top = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    right = left + stats[:, cv2.CC_STAT_WIDTH]
    bottom = top + stats[:, cv2.CC_STAT_HEIGHT]
    inside = (left > 0) & (top > 0) & (right < mask.shape[1]) & (bottom < mask.shape[0])
    fill = inside & (stats[:, cv2.CC_STAT_AREA] < max_pixels)
    fill[0] = False  # label 0: the tissue itself
    return mask | fill[labels]


def otsu_tissue(rgb: np.ndarray, downsample: float, neighbourhood: int,
                ink: np.ndarray | None = None) -> np.ndarray:
    """rgb: uint8 [H, W, 3] at `downsample` x level 0 -> tissue, bool [H, W]. neighbourhood:
    tissue.neighbourhood, in level-0 pixels; ink (bool [H, W]): pixels left out of the threshold
    (marker ink is more saturated than tissue and would pull it up)."""
    saturation = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 1]
    smoothed = cv2.medianBlur(saturation, MEDIAN_KERNEL)
    tissue = smoothed > otsu_threshold(smoothed if ink is None else smoothed[~ink])
    side = 2 * CLOSING_PIXELS + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    tissue = cv2.morphologyEx(tissue.view(np.uint8), cv2.MORPH_CLOSE, kernel).view(bool)
    window = max(1, int(round((neighbourhood / downsample) ** 2)))
    tissue = drop_small_components(tissue, window)
    return fill_small_holes(tissue, HOLE_WINDOWS * window)
