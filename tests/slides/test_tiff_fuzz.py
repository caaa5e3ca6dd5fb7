"""Slides are hostile input: small valid tiled TIFF pyramids, mutated (bytes flipped in the tag
area or in tile data, truncated, tag values altered), go through the tile stage's reader calls
(open, plan, a patch from each level, an overview); every outcome is pixels or SlideError, in
bounded memory. Derandomized: the same few hundred files on every run."""

import resource
import struct
import tracemalloc
from unittest import mock

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, event, given, settings, strategies as st

from pathjax.slides import reader, slide_writer
from pathjax.slides.reader import Slide, SlideError

MUTATIONS = ('tag bytes', 'tile bytes', 'truncated', 'tag value')
# Tags whose values are altered: ImageWidth, ImageLength, TileWidth, TileLength, StripOffsets,
# StripByteCounts (the SVS thumbnail page), TileOffsets, TileByteCounts.
TAGS = (256, 257, 322, 323, 273, 279, 324, 325)
VALUES = (0, 1, 15, 16, 17, 31, 32, 33, 255, 256, 4096, 65535, 65536, 1 << 20, (1 << 31) - 1,
          (1 << 32) - 1)
TYPE_FORMATS = {3: '<H', 4: '<I'}  # SHORT, LONG: what tifffile writes these tags as
TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}
# Level 0 of the bases is 49 Kpx: a mutant declaring levels over SOURCE_PIXELS (1 Mpx) gets no
# overview read from them, as a real slide's levels over reader.OVERVIEW_SOURCE_PIXELS do not
# (reading one took up to 20 s per mutant, and covers nothing more).
SOURCE_PIXELS = 1 << 20
MAX_TRACED_BYTES = 128 << 20  # per mutant, Python and numpy allocations
MAX_RSS_GROWTH_KB = 1 << 20  # per mutant, the process's peak resident memory (C libraries too)


def write_bases(folder) -> dict:
    """{name: (file bytes, layout)} of three 2-level pyramids of 256 x 192 px in 32-px tiles
    (levels as separate pages, as pathjax's synthetic slides): JPEG generic TIFF, JPEG SVS (with
    its stripped thumbnail page) and uncompressed generic TIFF."""
    rng = np.random.default_rng(0)
    image = np.repeat(np.repeat(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), 16, 0), 16, 1)
    paths = {'jpeg-tiff': folder / 'jpeg.tiff', 'jpeg-svs': folder / 'jpeg.svs',
             'raw-tiff': folder / 'raw.tiff'}
    slide_writer.write_slide(paths['jpeg-tiff'], image, 0.5, 'tiff', tile_size=32)
    slide_writer.write_slide(paths['jpeg-svs'], image, 0.5, 'svs', tile_size=32)
    with tifffile.TiffWriter(paths['raw-tiff']) as tif:
        for index, level in enumerate([image, image[::4, ::4]]):
            per_cm = 1e4 / (0.5 * 4 ** index)
            tif.write(level, tile=(32, 32), photometric='rgb', resolution=(per_cm, per_cm),
                      resolutionunit='CENTIMETER', subfiletype=int(index > 0), metadata=None)
    for path in paths.values():
        with Slide(path) as slide:
            assert slide._tiles is not None  # mutants exercise the direct tile path too
    return {name: (path.read_bytes(), layout(path)) for name, path in paths.items()}


def layout(path) -> dict:
    """Where a TIFF's parts are: 'tags' and 'data' (lists of byte ranges [start, stop): IFDs
    with their out-of-line values; tile and strip bytes) and 'values' ([(type, offset)], where
    each value of the TAGS lies)."""
    tags, data, values = [], [], []
    with tifffile.TiffFile(path) as tiff:
        for page in tiff.pages:
            tags.append((page.offset, page.offset + 2 + 12 * len(page.tags) + 4))
            for tag in page.tags:
                size = TYPE_SIZES[int(tag.dtype)] * tag.count
                if size > 4:
                    tags.append((tag.valueoffset, tag.valueoffset + size))
                if tag.code in TAGS:
                    kind, step = int(tag.dtype), TYPE_SIZES[int(tag.dtype)]
                    values += [(kind, tag.valueoffset + i * step) for i in range(tag.count)]
            data += [(o, o + n) for o, n in zip(page.dataoffsets, page.databytecounts) if n]
    return {'tags': tags, 'data': data, 'values': values}


@pytest.fixture(scope='module')
def bases(tmp_path_factory):
    return write_bases(tmp_path_factory.mktemp('fuzz_bases'))


@st.composite
def mutants(draw, content: bytes, parts: dict, mutation: str) -> tuple[str, bytes]:
    """(a description, `content` mutated as `mutation` says)."""
    data = bytearray(content)
    if mutation in ('tag bytes', 'tile bytes'):
        ranges = parts['tags' if mutation == 'tag bytes' else 'data']
        flips = [(draw(st.sampled_from(ranges)), draw(st.integers(1, 255)))
                 for _ in range(draw(st.integers(1, 4)))]
        for (start, stop), mask in flips:
            data[draw(st.integers(start, stop - 1))] ^= mask
        return f'{len(flips)} bytes flipped', bytes(data)
    if mutation == 'truncated':
        size = draw(st.integers(0, len(data) - 1))
        return f'truncated to {size} bytes', bytes(data[:size])
    kind, offset = draw(st.sampled_from(parts['values']))
    form = TYPE_FORMATS[kind]
    value = draw(st.sampled_from(VALUES) | st.integers(0, (1 << 32) - 1))
    struct.pack_into(form, data, offset, value % (1 << 8 * struct.calcsize(form)))
    return f'tag value at byte {offset} set to {value}', bytes(data)


def read_like_the_tile_stage(path) -> None:
    """Open, plan, read a patch from the middle of each level, read an overview."""
    with Slide(path) as slide:
        width, height = slide.dimensions
        for mpp, size in ((0.5, 64), (2.0, 32)):  # levels 0 and 1 of the bases
            slide.read_patch(width // 2, height // 2, slide.plan(mpp, size))
        slide.read_overview(slide.overview_downsample(4.0))


@pytest.fixture(scope='module')
def huge_means_small():
    with mock.patch.object(reader, 'OVERVIEW_SOURCE_PIXELS', SOURCE_PIXELS):
        yield


@pytest.mark.parametrize('mutation', MUTATIONS)
@pytest.mark.parametrize('base', ['jpeg-tiff', 'jpeg-svs', 'raw-tiff'])
@settings(max_examples=40, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_tiffs_give_pixels_or_slide_errors_in_bounded_memory(
        bases, huge_means_small, tmp_path_factory, base, mutation, data):
    """40 mutants per base and kind of mutation: pixels or a SlideError naming the file."""
    content, parts = bases[base]
    description, mutant = data.draw(mutants(content, parts, mutation))
    path = tmp_path_factory.getbasetemp() / 'mutant.tiff'
    path.write_bytes(mutant)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        read_like_the_tile_stage(path)
        event('pixels')
    except SlideError as error:
        assert 'mutant.tiff' in str(error), description
        event('SlideError')
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MAX_TRACED_BYTES, (description, peak)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < MAX_RSS_GROWTH_KB, \
        description
