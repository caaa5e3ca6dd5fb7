"""Which grid patches of a slide are kept, and why the others are dropped (numpy + OpenCV).

Causes, in the order they are decided: `background` (the patch's tissue fraction, by
tissue.method, is under tissue.min_fraction), `pen` and `fold` (more than
tissue.max_artifact_fraction of the patch is ink or fold on the overview: artifact_masks), then
`blur` (tissue.max_blur: the patch, read at its level, is less sharp than that: focus).
"""

import dataclasses

import numpy as np

from pathjax.slides.artifact_masks import fold_mask, pen_mask
from pathjax.slides.tiling import Tiles, grid_positions, patch_tissue_fractions
from pathjax.slides.tissue import TissueRule, background_mask
from pathjax.slides.tissue_otsu import otsu_tissue

CAUSES = ('background', 'pen', 'fold', 'blur')


@dataclasses.dataclass(frozen=True)
class OverviewMasks:
    """bool [h, w] masks on a slide's overview: background (not tissue), ink, folds."""

    background: np.ndarray
    pen: np.ndarray
    fold: np.ndarray


def overview_masks(overview: np.ndarray, downsample: float, rule: TissueRule,
                   inside: np.ndarray | None = None) -> OverviewMasks:
    """The masks of an overview (uint8 [h, w, 3] at `downsample` x level 0); outside `inside`
    (bool [h, w], a region of interest) is background."""
    none = np.zeros(overview.shape[:2], bool)
    pen = pen_mask(overview) if rule.remove_pen else none
    if rule.method == 'otsu':
        background = ~otsu_tissue(overview, downsample, rule.neighbourhood, pen)
    else:
        background = background_mask(overview, downsample, rule)
    if inside is not None:
        background |= ~inside
        pen = pen & inside
    fold = fold_mask(overview, ~background & ~pen) if rule.remove_folds else none
    return OverviewMasks(background, pen, fold)


def select_patches(masks: OverviewMasks, slide_size: tuple[int, int], extent: float,
                   rule: TissueRule) -> tuple[Tiles, dict[str, np.ndarray]]:
    """(the kept patches, {cause: int64 [M, 2] level-0 (x, y) of the patches it dropped}) for
    background, pen and fold; blur (none yet) is decided on the kept patches (`drop_blurred`)."""
    coords, grid = grid_positions(*slide_size, extent)
    tissue = patch_tissue_fractions(~masks.background, slide_size, coords, extent)
    keep = tissue >= rule.min_fraction
    dropped = {'background': coords[~keep]}
    for cause, mask in (('pen', masks.pen), ('fold', masks.fold)):
        bad = np.zeros(len(coords), bool)
        if mask.any():
            bad = keep & (patch_tissue_fractions(mask, slide_size, coords, extent)
                          > rule.max_artifact_fraction)
        dropped[cause] = coords[bad]
        keep &= ~bad
    dropped['blur'] = coords[:0]
    return Tiles(coords=coords[keep], grid=grid[keep], tissue=tissue[keep]), dropped


def drop_blurred(tiles: Tiles, focus: np.ndarray, max_blur: float
                 ) -> tuple[Tiles, np.ndarray, np.ndarray]:
    """(the tiles whose focus (float [N]) reaches max_blur, their focus, the dropped coords)."""
    sharp = focus >= max_blur
    return (Tiles(coords=tiles.coords[sharp], grid=tiles.grid[sharp], tissue=tiles.tissue[sharp]),
            focus[sharp], tiles.coords[~sharp])
