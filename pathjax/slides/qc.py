"""The tile stage's pictures: the QC picture (thumbnail, tissue mask, kept patches) and a plain
thumbnail for heatmaps."""

import numpy as np
from PIL import Image, ImageDraw

MAX_SIDE = 2048
MASK_SIDE = 1024
BACKGROUND_TINT = np.array([70, 110, 200], np.float32)  # background shaded blue
PEN_TINT = np.array([230, 40, 230], np.float32)  # ink shaded magenta
FOLD_TINT = np.array([250, 150, 0], np.float32)  # folds shaded orange
BLUR_OUTLINE = (240, 200, 0)  # blurred patches outlined and crossed in yellow
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
               coords: np.ndarray, extent: float, pen: np.ndarray | None = None,
               fold: np.ndarray | None = None, blurred=()) -> np.ndarray:
    """The overview with background shaded blue, ink magenta, folds orange, kept patches
    outlined green and blurred (dropped) patches crossed yellow.

    Args:
      overview: uint8 [h, w, 3], the whole slide at low resolution.
      background, pen, fold: bool [h, w] masks on the overview (pen, fold: optional).
      slide_size: level-0 (width, height).
      coords: int [N, 2], level-0 (x, y) of the kept patches.
      extent: patch side in level-0 pixels.
      blurred: int [M, 2], level-0 (x, y) of the patches dropped as blurred.
    Returns:
      uint8 [h', w', 3] with max(h', w') <= MAX_SIDE.
    """
    shaded = overview.copy()
    for mask, tint in ((background, BACKGROUND_TINT), (pen, PEN_TINT), (fold, FOLD_TINT)):
        if mask is None:
            continue
        for top in range(0, len(shaded), SHADE_ROWS):  # float32 temporaries of a band at a time
            band, part = shaded[top:top + SHADE_ROWS], mask[top:top + SHADE_ROWS]
            band[part] = (0.6 * band[part].astype(np.float32) + 0.4 * tint).astype(np.uint8)
    image = Image.fromarray(thumbnail(shaded))
    scale_x, scale_y = image.width / slide_size[0], image.height / slide_size[1]
    draw = ImageDraw.Draw(image)
    for boxes, colour in ((coords, PATCH_OUTLINE), (blurred, BLUR_OUTLINE)):
        for x, y in boxes:
            box = (x * scale_x, y * scale_y, (x + extent) * scale_x - 1, (y + extent) * scale_y - 1)
            draw.rectangle(box, outline=colour)
            if colour == BLUR_OUTLINE:
                draw.line(box, fill=colour)
    return np.asarray(image)
