"""Slide reading: resolution plans, direct tile decoding vs OpenSlide, bad files."""

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import openslide
import pytest
import tifffile

from pathjax.slides import reader, slide_writer, synthetic_cohort, tile_stage
from pathjax.slides.reader import Slide, SlideError, resize, rgba_to_rgb
from tests.conftest import REPO, make_config


@pytest.fixture(scope='module')
def synthetic_slides(tmp_path_factory):
    """One small synthetic slide per format and mpp."""
    folder = tmp_path_factory.mktemp('slides')
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (1536 // 32, 2048 // 32, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(blocks, 32, axis=0), 32, axis=1)  # survives JPEG at every level
    paths = {}
    for fmt in slide_writer.FORMATS:
        for mpp in synthetic_cohort.MPPS:
            paths[fmt, mpp] = folder / f'slide_{mpp}.{fmt}'
            slide_writer.write_slide(paths[fmt, mpp], image, mpp, fmt)
    return paths


def openslide_region(path, x, y, level, width, height):
    region = openslide.OpenSlide(str(path)).read_region((x, y), level, (width, height))
    return rgba_to_rgb(np.asarray(region))


@pytest.mark.parametrize('fmt', slide_writer.FORMATS)
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


def empty_tiled_tiff(path, levels):
    """Writes a classic TIFF by hand: one RGB page per (width, height, tile side) in `levels` (the
    later ones flagged as reduced images), every tile empty (TileByteCounts 0), so a file of a
    few hundred KB declares as many pixels as wanted. tifffile would write the pixels."""
    out = bytearray(b'II*\x00\x00\x00\x00\x00')
    next_ifd = 4  # where the offset of the next IFD goes
    for index, (width, height, tile) in enumerate(levels):
        count = -(-width // tile) * -(-height // tile)
        table = bytes(4 * count)  # offsets and byte counts, all zero
        entries = [(254, 4, 1, int(index > 0)), (256, 4, 1, width), (257, 4, 1, height),
                   (258, 3, 3, b'\x08\x00' * 3), (259, 3, 1, 1), (262, 3, 1, 2), (277, 3, 1, 3),
                   (284, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile), (324, 4, count, table),
                   (325, 4, count, table)]
        ifd = len(out)
        struct.pack_into('<I', out, next_ifd, ifd)
        values = ifd + 2 + 12 * len(entries) + 4  # out-of-line values follow the IFD
        out += struct.pack('<H', len(entries))
        extra = bytearray()
        for tag, kind, number, value in entries:
            if isinstance(value, bytes) and len(value) > 4:
                field = struct.pack('<I', values + len(extra))
                extra += value
            elif isinstance(value, bytes):
                field = value.ljust(4, b'\x00')
            else:
                field = struct.pack('<HH', value, 0) if kind == 3 else struct.pack('<I', value)
            out += struct.pack('<HHI', tag, kind, number) + field
        next_ifd = len(out)
        out += bytes(4) + extra
    path.write_bytes(bytes(out))


@contextlib.contextmanager
def time_limit(seconds):
    """Raises TimeoutError in the block after `seconds` (the old behaviour was hours, not an
    exception)."""
    def expire(*_):
        raise TimeoutError(f'still running after {seconds} s')
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def default_settings():
    return tile_stage.TileSettings.from_config(make_config('default'))


def test_a_huge_slide_without_a_pyramid_is_refused_quickly(tmp_path):
    """Issue 17, item 4a: a 524 KB TIFF declaring 1,048,576 x 1,048,576 px (empty tiles, one
    level, no mpp). OpenSlide opens it; the tile stage's overview of it was 4.9 GiB, read for
    about 2 h. Now the scan is a SlideError naming the size, in well under a second and a few MB."""
    path = tmp_path / 'huge.tiff'
    empty_tiled_tiff(path, [(1 << 20, 1 << 20, 4096)])
    assert path.stat().st_size < 600_000
    assert openslide.OpenSlide(str(path)).level_dimensions == ((1 << 20, 1 << 20),)
    settings = default_settings()
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with time_limit(30), Slide(path) as slide:
            with pytest.raises(SlideError, match=r'huge.tiff: level 0 is 1048576x1048576 px.*'
                               r'1,099.5 Gpx.*needs a pyramid'):
                tile_stage._scan(slide, 'huge', settings)
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 5 and peak < 64 << 20


def test_a_huge_slide_is_masked_on_its_largest_level_within_bounds(tmp_path):
    """Level 0 of 4.3 Gpx (over OVERVIEW_SOURCE_PIXELS) and a 64x level: the mask the method
    wants (25x level 0) would be read from level 0, so it is read from the 64x level instead,
    and the scan says the mask is coarser than the neighbourhood window wants."""
    path = tmp_path / 'pyramid.tiff'
    empty_tiled_tiff(path, [(1 << 16, 1 << 16, 4096), (1 << 10, 1 << 10, 1024)])
    tracemalloc.start()
    try:
        with time_limit(30), Slide(path) as slide:
            assert slide.overview_downsample(25.0) == 64.0
            scan, _, thumbnail = tile_stage._scan(slide, 'pyramid', default_settings())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert thumbnail.shape == (1024, 1024, 3) and peak < 256 << 20
    warnings = list(scan['warnings'])
    assert any('tissue mask is at 64x level 0' in w for w in warnings), warnings


def test_overview_fits_the_pixel_budget(synthetic_slides, monkeypatch):
    """A slide whose overview at the wanted downsample exceeds OVERVIEW_PIXELS is read coarser:
    the same overview as asked for at that coarser downsample. The tile stage warns when that is
    coarser than its neighbourhood window wants (200 level-0 px over 8 mask pixels: 25x)."""
    path = synthetic_slides['tiff', 0.5]  # 2048 x 1536
    with Slide(path) as slide:
        expected, _ = slide.read_overview(32.0)
        monkeypatch.setattr(reader, 'OVERVIEW_PIXELS', 64 * 48)
        assert slide.overview_downsample(2.0) == 32.0
        overview, downsample = slide.read_overview(2.0)
        np.testing.assert_array_equal(overview, expected)
        assert downsample == 32.0
        scan, _, _ = tile_stage._scan(slide, 'budget', default_settings())
    assert any('tissue mask is at 32x level 0' in w for w in scan['warnings']), scan['warnings']


@pytest.mark.parametrize('tag, value', [('TileWidth', 16), ('ImageLength', 1024)])
def test_tags_that_disagree_with_the_tiles_fall_back_to_openslide(synthetic_slides, tmp_path,
                                                                    tag, value):
    """Issue 17, item 5: a TileWidth tag (16) that disagrees with the tile data (256 px) made the
    fast path's probe raise IndexError, and the slide failed as 'unexpected'; an ImageLength
    beyond the tile table (found by the fuzz test) made reads raise IndexError once the probe
    had passed. Now a page whose tile table does not match its tags is not read directly: the
    slide is read through OpenSlide, which gives pixels or SlideError."""
    path = tmp_path / 'disagrees.tiff'
    shutil.copy(synthetic_slides['tiff', 0.5], path)  # 1024 x 768 px in 256-px tiles
    with tifffile.TiffFile(path) as tiff:
        field = tiff.pages[0].tags[tag]
        offset, kind = field.valueoffset, {3: '<H', 4: '<I'}[int(field.dtype)]
    with open(path, 'r+b') as f:
        f.seek(offset)
        f.write(struct.pack(kind, value))
    with Slide(path) as slide:
        assert slide._tiles is None
        for y in (0, 700):
            try:
                slide.read_region(0, y, 0, 1024, 68)
            except SlideError as error:
                assert 'disagrees.tiff' in str(error)


def test_any_probe_failure_falls_back_to_openslide_with_one_warning(synthetic_slides, caplog,
                                                                     monkeypatch):
    """Whatever the fast path's probe raises, the slide is read through OpenSlide, and one
    warning names it."""
    from pathjax.slides import tiff_tiles

    def fail(self, handle):
        raise IndexError('tuple index out of range')

    monkeypatch.setattr(tiff_tiles.TiffTiles, '_agrees_with', fail)
    monkeypatch.setattr(tiff_tiles, '_PROBED', {})  # forget this module's earlier verdicts
    path = synthetic_slides['tiff', 0.5]
    with caplog.at_level('WARNING'), Slide(path) as slide:
        assert slide._tiles is None
        np.testing.assert_array_equal(slide.read_region(300, 200, 0, 64, 64),
                                      openslide_region(path, 300, 200, 0, 64, 64))
    warnings = [r for r in caplog.records if r.levelname == 'WARNING']
    assert len(warnings) == 1 and 'slide_0.5.tiff' in warnings[0].getMessage()
    assert 'IndexError' in warnings[0].getMessage()


def test_the_probe_runs_once_per_file_until_it_changes(synthetic_slides, tmp_path, monkeypatch):
    """Every reader thread opens every slide: the fast path's probe (10 ms) runs on the first
    open of a file only, and again once the file is replaced or touched."""
    from pathjax.slides import tiff_tiles
    probes = []
    real = tiff_tiles.TiffTiles._agrees_with

    def counted(self, handle):
        probes.append(handle)
        return real(self, handle)

    monkeypatch.setattr(tiff_tiles.TiffTiles, '_agrees_with', counted)
    monkeypatch.setattr(tiff_tiles, '_PROBED', {})
    path = tmp_path / 'copy.svs'
    path.write_bytes(synthetic_slides['svs', 0.5].read_bytes())
    for _ in range(3):
        with Slide(path) as slide:
            assert slide._tiles is not None
    assert len(probes) == 1
    os.utime(path, ns=(0, 0))
    with Slide(path) as slide:
        assert slide._tiles is not None
    assert len(probes) == 2


def test_the_decode_buffer_is_off_libjpeg_turbos_aligned_path():
    """libjpeg-turbo writes a 16- or 32-byte aligned output with non-temporal stores (slow to
    read back): the reused buffer starts DECODE_MISALIGNMENT bytes past a 32-byte boundary."""
    from pathjax.slides import tiff_tiles
    for shape in [(256, 256, 3), (240, 240, 4), (1, 1, 3)]:
        buffer = tiff_tiles.misaligned_buffer(shape)
        assert buffer.shape == shape and buffer.flags.writeable
        assert buffer.ctypes.data % 32 == tiff_tiles.DECODE_MISALIGNMENT
        assert buffer.ctypes.data % 16 != 0


def test_huge_declared_tiles_are_refused_before_openslide_reads_them(synthetic_slides, tmp_path):
    """A TileLength of 891,986,582 px (found by the fuzz test): OpenSlide opens the slide and
    its first read allocates the whole tile, 114 GB, and aborts the process (GLib-ERROR). Now
    the slide is a SlideError before any read. Run in a child process: the old code kills it."""
    path = tmp_path / 'tall_tiles.tiff'
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.zeros((64, 64, 3), np.uint8), tile=(32, 32), photometric='rgb')
    with tifffile.TiffFile(path) as tiff:
        field = tiff.pages[0].tags['TileLength']
        assert field.dtype == 4  # LONG
    with open(path, 'r+b') as f:
        f.seek(field.valueoffset)
        f.write(struct.pack('<I', 891986582))
    code = ('from pathjax.slides.reader import Slide, SlideError\n'
            'try:\n'
            f'    with Slide({str(path)!r}) as slide:\n'
            '        slide.read_region(0, 0, 0, 32, 32)\n'
            'except SlideError as error:\n'
            '    print(error)\n')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'tall_tiles.tiff' in result.stdout and 'tiles of 32x891986582 px' in result.stdout


def test_rgba_to_rgb_blends_over_white():
    """Opaque pixels keep their colour, transparent ones are white, partly transparent ones are
    blended as round((rgb * a + 255 * (255 - a)) / 255)."""
    rgba = np.random.default_rng(0).integers(0, 256, (40, 30, 4), dtype=np.uint8)
    rgba[:10, ..., 3], rgba[10:20, ..., 3] = 255, 0
    a = rgba[..., 3:].astype(np.int64)
    expected = np.rint((rgba[..., :3] * a + 255 * (255 - a)) / 255).astype(np.uint8)
    np.testing.assert_array_equal(rgba_to_rgb(rgba), expected)
    np.testing.assert_array_equal(rgba_to_rgb(rgba[:10]), rgba[:10, ..., :3])


@pytest.mark.parametrize('source', [1024, 1014, 768, 600])
def test_shrinking_is_the_exact_area_average(source):
    """`resize` down to 512 px equals the area-weighted mean of the source pixels each output
    pixel covers (fractional coverage at ratios that are not whole numbers), rounded."""
    def area_weights(old, new):  # [new, old]: the share of each source pixel in each output one
        scale = old / new
        weights = np.zeros((new, old))
        for i in range(new):
            for j in range(int(i * scale), min(int(np.ceil((i + 1) * scale)), old)):
                weights[i, j] = min((i + 1) * scale, j + 1) - max(i * scale, j)
        return weights / scale

    image = np.random.default_rng(source).integers(0, 256, (source, source, 3), np.uint8)
    weights = area_weights(source, 512)
    exact = np.stack([weights @ image[..., c] @ weights.T for c in range(3)], axis=-1)
    assert np.abs(resize(image, 512) - exact).max() <= 0.5 + 1e-3  # OpenCV sums in float32
