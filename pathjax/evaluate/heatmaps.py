"""Per-patch heatmaps of a slide prediction, drawn over the slide's thumbnail.

With gated-attention pooling a patch's score is its attention weight. With mean pooling it is
the patch's contribution to the predicted class's logit (`SlidePredictor.contributions`:
positive where the patch pushes towards the predicted class).
"""

import pathlib

import numpy as np
from matplotlib import colormaps

from pathjax.evaluate import figures
from pathjax.slide_paths import slide_file


def heatmap_path(folder, slide_id: str) -> pathlib.Path:
    """`<folder>/heatmaps/<slide_id>.png` (folder: an evaluated split's, or predict/)."""
    return slide_file(folder, 'heatmaps', slide_id, '.png')


def draw_heatmap(path, thumbnail: np.ndarray, slide_size: tuple[int, int], coords: np.ndarray,
                 extent: float, scores: np.ndarray, signed: bool, title: str) -> None:
    """Writes a PNG: the thumbnail with each patch coloured by its score, and a colour bar.

    Args:
      thumbnail: uint8 [h, w, 3] of the whole slide.
      slide_size: level-0 (width, height).
      coords: int [n, 2] level-0 (x, y) of the scored patches; extent: patch side (level 0).
      scores: [n]; signed scores use a diverging map centred on 0, others a sequential map.
    """
    height, width = thumbnail.shape[:2]
    scale_x, scale_y = width / slide_size[0], height / slide_size[1]
    grid = np.full((height, width), np.nan, np.float32)
    for (x, y), score in zip(coords, scores):
        x0, y0 = int(x * scale_x), int(y * scale_y)
        x1, y1 = max(x0 + 1, int((x + extent) * scale_x)), max(y0 + 1, int((y + extent) * scale_y))
        grid[y0:y1, x0:x1] = score
    limit = float(np.nanmax(np.abs(scores))) if len(scores) else 1.0
    limit = limit if limit > 0 else 1.0
    low, high, cmap = (-limit, limit, 'RdBu_r') if signed else (0.0, limit, 'inferno')
    fig = figures.new(figsize=(8, 8 * height / max(width, 1) + 0.6), dpi=100)
    axes = fig.add_subplot()
    axes.imshow(thumbnail)
    shown = axes.imshow(np.ma.masked_invalid(grid), cmap=colormaps[cmap], vmin=low, vmax=high,
                        alpha=0.55, interpolation='nearest')
    axes.set_axis_off()
    axes.set_title(title, fontsize=9)
    fig.colorbar(shown, ax=axes, fraction=0.035, pad=0.02)
    figures.save(fig, path, bbox_inches='tight')
