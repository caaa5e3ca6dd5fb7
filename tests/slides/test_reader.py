"""Slide reading: resolution plans, direct tile decoding vs OpenSlide, bad files."""

import os
import shutil

import numpy as np
import openslide
import pytest
import tifffile

from pathjax.slides import synthetic
from pathjax.slides.reader import Slide, SlideError, rgba_to_rgb


@pytest.fixture(scope='module')
def synthetic_slides(tmp_path_factory):
    """One small synthetic slide per format and mpp."""
    folder = tmp_path_factory.mktemp('slides')
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (1536 // 32, 2048 // 32, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(blocks, 32, axis=0), 32, axis=1)  # survives JPEG at every level
    paths = {}
    for fmt in synthetic.FORMATS:
        for mpp in synthetic.MPPS:
            paths[fmt, mpp] = folder / f'slide_{mpp}.{fmt}'
            synthetic.write_slide(paths[fmt, mpp], image, mpp, fmt)
    return paths


def openslide_region(path, x, y, level, width, height):
    region = openslide.OpenSlide(str(path)).read_region((x, y), level, (width, height))
    return rgba_to_rgb(np.asarray(region))


@pytest.mark.parametrize('fmt', synthetic.FORMATS)
def test_direct_decoding_equals_openslide(synthetic_slides, fmt):
    path = synthetic_slides[fmt, 0.25]
    with Slide(path) as slide:
        assert slide._tiles is not None  # the fast path is in use for these formats
        for level, (x, y, w, h) in [(0, (300, 200, 700, 500)), (0, (1900, 1400, 300, 300)),
                                    (1, (400, 800, 200, 100))]:
            np.testing.assert_array_equal(slide.read_region(x, y, level, w, h),
                                          openslide_region(path, x, y, level, w, h))


def test_direct_decoding_of_real_jpeg2000_slide(shared_data):
    path = shared_data / 'slides' / 'tcga-cr-7395-01a-01-ts1.svs'
    with Slide(path) as slide:
        assert slide._tiles is not None
        ours = slide.read_region(1000, 1200, 0, 600, 400).astype(int)
    assert np.abs(ours - openslide_region(path, 1000, 1200, 0, 600, 400)).max() <= 1


@pytest.mark.parametrize('mpp, level, read_size', [(0.25, 1, 128), (0.5, 1, 64)])
def test_plan_picks_the_coarsest_sufficient_level(synthetic_slides, mpp, level, read_size):
    with Slide(synthetic_slides['svs', mpp]) as slide:
        assert slide.mpp == pytest.approx(mpp)
        plan = slide.plan(target_mpp=2.0, patch_size=64)
        assert (plan.level, plan.read_size, plan.mpp, plan.warnings) == (level, read_size, 2.0, ())
        assert plan.extent == pytest.approx(64 * 2.0 / mpp)
        assert slide.read_patch(0, 0, plan).shape == (64, 64, 3)
        upsampled = slide.plan(target_mpp=0.1, patch_size=64)
        assert upsampled.level == 0 and 'upsampled' in upsampled.warnings[0]


def test_plan_falls_back_without_usable_mpp(shared_data):
    with Slide(shared_data / 'slides' / 'tcga-cr-7395-01a-01-ts1.svs') as slide:
        assert slide.mpp is None
        plan = slide.plan(0.5, 512, fallback_level=1)
        assert (plan.level, plan.read_size, plan.mpp) == (1, 512, None)
        assert 'no mpp metadata' in plan.warnings[0]
    with Slide(shared_data / 'slides' / 'boxes.tiff') as slide:  # 72 dpi: 352.8 um/px
        assert slide.mpp is None and 'implausible' in slide.plan(0.5, 512).warnings[0]


def test_overview_is_the_slide_at_low_resolution(synthetic_slides):
    path = synthetic_slides['tiff', 0.5]
    with Slide(path) as slide:
        overview, downsample = slide.read_overview(16.0, strip_pixels=50_000)  # many strips
        level1 = slide.read_region(0, 0, 1, 512, 384)  # the overview is read from level 1
    assert overview.shape == (96, 128, 3) and downsample == pytest.approx(16.0)
    expected = level1.reshape(96, 4, 128, 4, 3).mean(axis=(1, 3))
    assert np.abs(overview - expected).max() <= 1


def test_bad_files_raise_slide_error_naming_the_file(tmp_path):
    with pytest.raises(SlideError, match='file not found'):
        Slide(tmp_path / 'missing.svs')
    fake = tmp_path / 'fake.svs'
    fake.write_text('this is not a slide')
    with pytest.raises(SlideError, match='fake.svs: not a slide'):
        Slide(fake)


def test_a_damaged_tile_gives_slide_errors_and_leaks_no_file(synthetic_slides, tmp_path):
    """The fast path's probe (the centre tile of level 0) overwritten with garbage: opening the
    slide and reading that tile give SlideError or pixels, never another exception, and no file
    descriptor stays open."""
    path = tmp_path / 'damaged.svs'
    shutil.copy(synthetic_slides['svs', 0.25], path)
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]
        across = -(-page.imagewidth // page.tilewidth)
        row, col = page.imagelength // 2 // page.tilelength, page.imagewidth // 2 // page.tilewidth
        offset = page.dataoffsets[row * across + col]
        length = page.databytecounts[row * across + col]
    with open(path, 'r+b') as f:
        f.seek(offset + 64)
        f.write(bytes(np.random.default_rng(0).integers(0, 256, length - 64, dtype=np.uint8)))
    before = len(os.listdir('/proc/self/fd'))
    for _ in range(3):
        try:
            with Slide(path) as slide:
                slide.read_region(col * page.tilewidth, row * page.tilelength, 0, 64, 64)
        except SlideError as error:
            assert 'damaged.svs' in str(error)
    assert len(os.listdir('/proc/self/fd')) == before


def test_a_read_error_is_retried_then_a_slide_error(synthetic_slides, monkeypatch):
    """os.pread failing (EIO, as on a network filesystem): a transient failure is retried and
    the region is read as usual; a lasting one is a SlideError naming the slide, which the
    stages handle per slide, not an OSError that stops the stage."""
    from pathjax.slides import tiff_tiles
    monkeypatch.setattr(tiff_tiles, 'RETRY_SECONDS', 0.0)
    path = synthetic_slides['svs', 0.25]
    real_pread, failures, failures_wanted = os.pread, [], 0

    def flaky_pread(fd, count, offset):
        if len(failures) < failures_wanted:
            failures.append(offset)
            raise OSError(5, 'Input/output error')
        return real_pread(fd, count, offset)

    monkeypatch.setattr(tiff_tiles.os, 'pread', flaky_pread)
    with Slide(path) as slide:
        failures_wanted = 1
        region = slide.read_region(300, 200, 0, 700, 500)
        assert len(failures) == 1
        np.testing.assert_array_equal(region, openslide_region(path, 300, 200, 0, 700, 500))
        failures.clear()
        failures_wanted = 1000
        with pytest.raises(SlideError, match=r'slide_0.25.svs.*Input/output error'):
            slide.read_region(300, 200, 0, 700, 500)
        assert len(failures) == tiff_tiles.READ_ATTEMPTS
