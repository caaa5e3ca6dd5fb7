"""The patches that scored highest in a slide's prediction, read back from the slide at full
resolution, so a pathologist can see what the model looked at.

A slide's scores are those of its heatmap (attention weights, or contributions to the predicted
class). Its `count` highest-scoring patches are read at the tile stage's resolution, passed
through the slide's stain lookup table (the pixels the feature network saw) and written as
`<folder>/top_patches/<slide_id>/<rank>.png` (rank 1 first), each image patch_size x
patch_size.
"""

import pathlib

import numpy as np

from pathjax import artifacts
from pathjax.slide_paths import slide_file
from pathjax.slides.stain_transform import SlideStain
from pathjax.slides.reader import ReadPlan, Slide


def top_patches_dir(folder, slide_id: str) -> pathlib.Path:
    """`<folder>/top_patches/<slide_id>`: the slide's top patches, `<rank>.png`."""
    return slide_file(folder, 'top_patches', slide_id)


def top_indices(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` highest scores [n], highest first (ties: lower index first)."""
    order = np.argsort(-np.asarray(scores, np.float64), kind='stable')
    return order[:max(count, 0)]


def save_top_patches(folder: pathlib.Path, slide_id: str, slide_path: str, tiles: dict,
                     coords: np.ndarray, scores: np.ndarray, count: int) -> list[pathlib.Path]:
    """Writes the slide's top `count` patches (coords int [n, 2] level-0, scores [n]) and returns
    their files, best first. `tiles`: the slide's tiles file (read plan and stain transform).

    Raises SlideError when the slide cannot be read.
    """
    plan = ReadPlan(level=int(tiles['level']), read_size=int(tiles['read_size']),
                    patch_size=int(tiles['patch_size']), extent=float(tiles['extent']), mpp=None)
    files, slide_stain = [], SlideStain.from_tiles(tiles)
    with Slide(slide_path) as slide:
        for rank, index in enumerate(top_indices(scores, count), start=1):
            x, y = (int(v) for v in coords[index])
            patch = slide_stain.apply(slide.read_patch(x, y, plan))
            path = top_patches_dir(folder, slide_id) / f'{rank}.png'
            artifacts.save_png(path, patch)
            files.append(path)
    return files
