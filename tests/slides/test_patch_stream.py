"""The patch stream: same patches as one read per patch, in order, in batches, in parallel."""

import os

import numpy as np
import openslide
import pytest

from pathjax.slides import slide_writer, stain, synthetic
from pathjax.slides.stain_transform import SlideStain
from pathjax.slides.patch_stream import MAX_RUN, PatchReader, SlidePatches, plan_runs
from pathjax.slides.reader import Slide, SlideError, rgba_to_rgb


def test_runs_merge_row_neighbours_only():
    coords = np.array([[0, 0], [100, 0], [200, 0], [400, 0], [0, 100], [100, 100],
                       [200, 100], [300, 100], [400, 100]])
    assert plan_runs(coords, 100, 1.0, max_run=4) == [(0, 3), (3, 4), (4, 8), (8, 9)]
    assert plan_runs(coords, 25, 4.0, max_run=2) == [(0, 2), (2, 3), (3, 4), (4, 6), (6, 8), (8, 9)]
    assert plan_runs(coords[:0], 100, 1.0) == []


@pytest.fixture(scope='module')
def slide_file(tmp_path_factory):
    spec = synthetic.SyntheticSlideSpec('s', 'c', 'positive', True, 0.25, 'svs', 2048, 1536, 7)
    path = tmp_path_factory.mktemp('stream') / 's.svs'
    slide_writer.write_slide(path, synthetic.render_slide(spec), spec.mpp, spec.fmt)
    return path


@pytest.mark.parametrize('workers, batch_size', [(1, 5), (3, 4), (2, 64)])
def test_stream_equals_one_read_per_patch(slide_file, workers, batch_size):
    rng = np.random.default_rng(0)
    with Slide(slide_file) as slide:
        plan = slide.plan(target_mpp=0.5, patch_size=48)  # level 0, 96 px reads resized to 48
        assert plan.read_size == 96
        grid = np.array([(r, c) for r in range(15) for c in range(20)])
        grid = grid[np.sort(rng.choice(len(grid), 70, replace=False))]  # gaps and neighbours
        coords = grid[:, ::-1] * int(plan.extent)
        lut = rng.permutation(256).astype(np.uint8)[None].repeat(3, axis=0)
        expected = np.stack([stain.apply_lut(slide.read_patch(x, y, plan), lut) for x, y in coords])
    patches = SlidePatches('s', str(slide_file), coords, plan.level, plan.read_size,
                           plan.patch_size, SlideStain('histogram', {'stain_lut': lut}),
                           plan.extent / plan.read_size)
    open_files = len(os.listdir('/proc/self/fd'))
    with PatchReader(batch_size=batch_size, workers=workers, prefetch=3) as reader:
        batches = list(reader.batches(patches))
    assert len(os.listdir('/proc/self/fd')) == open_files  # the threads' handles are closed
    assert [len(b.indices) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    np.testing.assert_array_equal(np.concatenate([b.indices for b in batches]), np.arange(70))
    np.testing.assert_array_equal(np.concatenate([b.images for b in batches]), expected)


@pytest.mark.parametrize('defer_lut', [False, True])
def test_stream_without_resizing_equals_openslide_across_tile_borders(slide_file, defer_lut):
    """Patches read at their level's size (no resize) are written tile by tile into the batch
    through the stain's lookup: patches off the tile grid, runs of neighbours, a patch hanging
    over the slide's edge (white, looked up like any pixel) all equal OpenSlide's region with
    the lookup applied. With defer_lut the batches hold the pixels and carry the table."""
    size = 100  # level 0, not a multiple of the 256-px tiles: every patch straddles tiles
    coords = np.array([[37, 11], [137, 11], [237, 11], [337, 11], [437, 11], [900, 300],
                       [1000, 300], [2000, 1480], [1990, 700]])  # the last two cross the edge
    rng = np.random.default_rng(1)
    lut = np.stack([rng.permutation(256) for _ in range(3)]).astype(np.uint8)
    slide = openslide.OpenSlide(str(slide_file))
    expected = np.stack([rgba_to_rgb(np.asarray(slide.read_region((int(x), int(y)), 0,
                                                                  (size, size))))
                         for x, y in coords])
    slide.close()
    patches = SlidePatches('s', str(slide_file), coords, 0, size, size,
                           SlideStain('histogram', {'stain_lut': lut}), 1.0)
    with PatchReader(batch_size=4, workers=2, defer_lut=defer_lut) as reader:
        batches = list(reader.batches(patches))
    images = np.concatenate([b.images for b in batches])
    if defer_lut:
        assert all(np.array_equal(b.lut, lut) for b in batches)
        np.testing.assert_array_equal(images, expected)
    else:
        assert all(np.array_equal(b.lut, stain.IDENTITY_LUT) for b in batches)
        np.testing.assert_array_equal(images, stain.apply_lut(expected, lut))


def test_a_stream_runs_on_from_slide_to_slide_and_a_failed_slide_costs_only_itself(
        slide_file, tmp_path):
    """Batches of a stream over several slides are full up to the last one, hold each slide's
    patches in order (equal to that slide read alone), and name a slide whose reading fails (a
    file gone since tiling) in `failed`, lay out none of its later patches, and go on with the
    next slide."""
    grid = np.array([(r, c) for r in range(6) for c in range(10)])
    coords = grid[:, ::-1] * 64
    lut = np.stack([np.random.default_rng(2).permutation(256) for _ in range(3)]).astype(np.uint8)

    def patches(slide_id, path, count):
        return SlidePatches(slide_id, str(path), coords[:count], 0, 64, 64,
                            SlideStain('histogram', {'stain_lut': lut}), 1.0)

    slides = [patches('a', slide_file, 7), patches('gone', tmp_path / 'gone.svs', 60),
              patches('b', slide_file, 13)]
    with PatchReader(batch_size=4, workers=2, prefetch=3) as reader:
        batches = list(reader.stream(slides))
        alone = {s.slide_id: np.concatenate([b.images for b in reader.batches(s)])
                 for s in (slides[0], slides[2])}
        with pytest.raises(SlideError, match='gone.svs'):
            list(reader.batches(slides[1]))
    assert all(len(b.images) == 4 for b in batches[:-1])
    failed = {slide: why for b in batches for slide, why in b.failed.items()}
    assert list(failed) == ['gone'] and 'gone.svs: file not found' in failed['gone']
    rows = {}  # slide id -> [(start, stop, images)] in stream order
    for batch in batches:
        for piece in batch.pieces:
            rows.setdefault(piece.slide.slide_id, []).append(
                (piece.start, piece.stop,
                 batch.images[piece.row:piece.row + piece.stop - piece.start]))
    for slide_id, count in (('a', 7), ('b', 13)):
        assert [start for start, _, _ in rows[slide_id]] == [0] + [
            stop for _, stop, _ in rows[slide_id][:-1]]
        assert rows[slide_id][-1][1] == count
        np.testing.assert_array_equal(np.concatenate([i for _, _, i in rows[slide_id]]),
                                      alone[slide_id])
    # Only the gone slide's patches laid out before its failure was found take rows: its first
    # batch's, and at most `prefetch` runs of MAX_RUN patches read ahead.
    laid_out = sum(stop - start for start, stop, _ in rows['gone'])
    assert laid_out <= 4 + 3 * MAX_RUN < 60
