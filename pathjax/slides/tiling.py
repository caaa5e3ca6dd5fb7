"""The patch grid of a slide and each patch's tissue fraction (numpy only).

Patches tile level 0 on a regular grid with step `extent` (a patch's side in level-0 pixels) from
the top-left corner; only patches wholly inside the slide are considered. A patch's tissue
fraction is the mean of the tissue mask over its footprint on the mask.
"""

import dataclasses

import numpy as np

from pathjax.slides.tissue import BLOCK_ROWS


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Kept patches of one slide, in row-major grid order.

    Attributes:
      coords: int64 [N, 2], level-0 (x, y) of each patch's top-left corner.
      grid: int64 [N, 2], (row, col) of each patch on the grid.
      tissue: float32 [N], tissue fraction of each patch.
    """

    coords: np.ndarray
    grid: np.ndarray
    tissue: np.ndarray

    def __len__(self) -> int:
        return len(self.coords)


def grid_positions(width: int, height: int, extent: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid of patches wholly inside a `width` x `height` level-0 slide.

    Returns:
      (coords int64 [M, 2] level-0 (x, y), grid int64 [M, 2] (row, col)), row-major.
    """
    cols = np.arange(int(np.floor(width / extent + 1e-9)))
    rows = np.arange(int(np.floor(height / extent + 1e-9)))
    row_index, col_index = np.meshgrid(rows, cols, indexing='ij')
    grid = np.stack([row_index.ravel(), col_index.ravel()], axis=1).astype(np.int64)
    coords = np.rint(grid[:, ::-1] * extent).astype(np.int64)
    return coords.reshape(-1, 2), grid.reshape(-1, 2)


def box_sums(values: np.ndarray, top: np.ndarray, left: np.ndarray, bottom: np.ndarray,
             right: np.ndarray) -> np.ndarray:
    """Sums of values (bool [h, w]) over boxes [top, bottom) x [left, right) (int [M] each, inside
    [0, h] x [0, w]): int64 [M]. Band by band of BLOCK_ROWS rows, each band's summed-area table
    int32 [BLOCK_ROWS + 1, w + 1]: temporaries O(BLOCK_ROWS x w + M), not O(h x w)."""
    height, width = values.shape
    sums = np.zeros(len(top), np.int64)
    for start in range(0, height, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, height)
        table = np.zeros((stop - start + 1, width + 1), np.int32)  # [band + 1, w + 1]
        np.cumsum(np.cumsum(values[start:stop], axis=0, dtype=np.int32), axis=1,
                  out=table[1:, 1:])
        y0, y1 = np.clip(top - start, 0, stop - start), np.clip(bottom - start, 0, stop - start)
        sums += table[y1, right] - table[y0, right] - table[y1, left] + table[y0, left]
    return sums


def patch_tissue_fractions(tissue_mask: np.ndarray, slide_size: tuple[int, int],
                           coords: np.ndarray, extent: float) -> np.ndarray:
    """Mean of `tissue_mask` (bool [h, w], covering the whole slide) over each patch's footprint.

    Args:
      tissue_mask: bool [h, w], the slide at (width / w, height / h) x level 0.
      slide_size: level-0 (width, height).
      coords: int [M, 2] level-0 (x, y) of patch corners.
      extent: patch side in level-0 pixels.
    Returns:
      float32 [M].
    """
    height, width = tissue_mask.shape
    scale_x, scale_y = width / slide_size[0], height / slide_size[1]
    x0 = np.clip(np.rint(coords[:, 0] * scale_x).astype(np.int64), 0, width)
    y0 = np.clip(np.rint(coords[:, 1] * scale_y).astype(np.int64), 0, height)
    x1 = np.clip(np.rint((coords[:, 0] + extent) * scale_x).astype(np.int64), 0, width)
    y1 = np.clip(np.rint((coords[:, 1] + extent) * scale_y).astype(np.int64), 0, height)
    x1, y1 = np.maximum(x1, x0 + 1).clip(max=width), np.maximum(y1, y0 + 1).clip(max=height)
    inside = box_sums(tissue_mask, y0, x0, y1, x1)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return (inside / area).astype(np.float32)

