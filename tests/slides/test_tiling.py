"""Patch grid and tissue fractions vs brute force."""

import tracemalloc

import numpy as np
import pytest

from pathjax.slides.tiling import grid_positions, patch_tissue_fractions


def test_grid_covers_the_slide_with_whole_patches():
    coords, grid = grid_positions(1000, 700, 256.0)
    assert len(coords) == 3 * 2
    np.testing.assert_array_equal(grid[:, 0], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(coords[:, 0], grid[:, 1] * 256)
    np.testing.assert_array_equal(coords[:, 1], grid[:, 0] * 256)
    assert (coords + 256 <= [1000, 700]).all()
    assert len(grid_positions(100, 100, 256.0)[0]) == 0


def test_tissue_fraction_vs_brute_force():
    rng = np.random.default_rng(0)
    mask = rng.random((60, 80)) < 0.4
    slide_size, extent = (800, 600), 100.0  # mask at 10x level 0: a patch is 10x10 mask px
    coords, _ = grid_positions(*slide_size, extent)
    got = patch_tissue_fractions(mask, slide_size, coords, extent)
    expected = [mask[y // 10:y // 10 + 10, x // 10:x // 10 + 10].mean() for x, y in coords]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize('extent', [100.0, 130.0, 370.0, 2990.0])
def test_tissue_fraction_across_row_blocks(extent):
    """A mask taller than a row block (patches straddle the blocks' borders), patches of odd
    footprints and one as tall as the mask."""
    rng = np.random.default_rng(int(extent))
    mask = rng.random((700, 30)) < 0.4
    slide_size = (300, 7000)  # mask at 10x level 0
    coords, _ = grid_positions(*slide_size, extent)
    got = patch_tissue_fractions(mask, slide_size, coords, extent)
    corners = np.rint(coords / 10).astype(int)
    ends = np.rint((coords + extent) / 10).astype(int)
    expected = [mask[y0:y1, x0:x1].mean() for (x0, y0), (x1, y1) in zip(corners, ends)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_tissue_fraction_memory_is_bounded():
    """On the mask of a 150,000-px-wide slide (6000 x 4000 at 25x), every numpy allocation
    together peaks under the mask's own size (the int64 integral image took 16x)."""
    mask = np.zeros((4000, 6000), bool)
    mask[1000:3000, 2000:4000] = True
    slide_size, extent = (150_000, 100_000), 1000.0
    coords, _ = grid_positions(*slide_size, extent)
    tracemalloc.start()
    try:
        got = patch_tissue_fractions(mask, slide_size, coords, extent)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < mask.nbytes, f'{peak / 2**20:.0f} MiB for {mask.nbytes / 2**20:.0f} MiB'
    inside = ((coords >= [50_000, 25_000]) & (coords + extent <= [100_000, 75_000])).all(axis=1)
    assert (got[inside] == 1).all() and got.sum() == inside.sum()
