"""The tile stage's pictures: the QC picture (thumbnail, tissue mask, kept patches) and a plain
thumbnail for heatmaps."""

import numpy as np
from PIL import Image, ImageDraw

MAX_SIDE = 2048
MASK_SIDE = 1024
BACKGROUND_TINT = np.array([70, 110, 200], np.float32)  # background shaded blue
PATCH_OUTLINE = (0, 170, 60)
SHADE_ROWS = 256  # overview rows shaded at once


def thumbnail(overview: np.ndarray) -> np.ndarray:
    """The overview [h, w, 3] shrunk so its long side is at most MAX_SIDE (for heatmaps)."""
    image = Image.fromarray(overview)
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BOX)
    return np.asarray(image)


def shrink_mask(mask: np.ndarray) -> np.ndarray:
    """A bool mask [h, w] shrunk (area average, then >= half) so its long side is at most
    MASK_SIDE: the tissue region kept in a slide's tiles file, for its GeoJSON annotation."""
    if max(mask.shape) <= MASK_SIDE:
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    image.thumbnail((MASK_SIDE, MASK_SIDE), Image.Resampling.BOX)
    return np.asarray(image) >= 128


def qc_picture(overview: np.ndarray, background: np.ndarray, slide_size: tuple[int, int],
               coords: np.ndarray, extent: float) -> np.ndarray:
    """The overview with background shaded and kept patches outlined.

    Args:
      overview: uint8 [h, w, 3], the whole slide at low resolution.
      background: bool [h, w], the background mask on the overview.
      slide_size: level-0 (width, height).
      coords: int [N, 2], level-0 (x, y) of the kept patches.
      extent: patch side in level-0 pixels.
    Returns:
      uint8 [h', w', 3] with max(h', w') <= MAX_SIDE.
    """
    shaded = overview.copy()
    for top in range(0, len(shaded), SHADE_ROWS):  # float32 temporaries of a band at a time
        band, mask = shaded[top:top + SHADE_ROWS], background[top:top + SHADE_ROWS]
        band[mask] = (0.6 * band[mask].astype(np.float32) + 0.4 * BACKGROUND_TINT).astype(np.uint8)
    image = Image.fromarray(thumbnail(shaded))
    scale_x, scale_y = image.width / slide_size[0], image.height / slide_size[1]
    draw = ImageDraw.Draw(image)
    for x, y in coords:
        draw.rectangle((x * scale_x, y * scale_y, (x + extent) * scale_x - 1,
                        (y + extent) * scale_y - 1), outline=PATCH_OUTLINE)
    return np.asarray(image)
