"""Synthetic slides: OpenSlide reads both formats back, the images pass the tissue rule like
H&E, the class motif is where (and only where) it should be, and cohorts are deterministic."""

import collections
import csv
import dataclasses
import pathlib
import tracemalloc

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image
from skimage.measure import label

from pathjax.slides import slide_writer, synthetic, synthetic_cohort, synthetic_mosaic

VENDORS = {'tiff': 'generic-tiff', 'svs': 'aperio'}


def make_spec(positive=True, mpp=0.5, fmt='tiff', width=1536, height=1024, seed=7):
    return synthetic.SyntheticSlideSpec(
        slide_id='s', case_id='c', label='positive' if positive else 'negative', positive=positive,
        mpp=mpp, fmt=fmt, width=width, height=height, seed=seed)


def dilate(mask, radius):
    """Square dilation of a bool mask [h, w] by `radius` pixels (moving-window sums per axis)."""
    for axis in (0, 1):
        padded = np.pad(mask, [(radius + 1, radius) if a == axis else (0, 0) for a in (0, 1)])
        sums = np.cumsum(padded, axis=axis, dtype=np.int32)
        n = sums.shape[axis] - 2 * radius - 1
        ahead = np.take(sums, np.arange(n) + 2 * radius + 1, axis=axis)
        mask = ahead > np.take(sums, np.arange(n), axis=axis)
    return mask


@pytest.mark.parametrize('fmt', slide_writer.FORMATS)
@pytest.mark.parametrize('mpp', synthetic_cohort.MPPS)
def test_written_slide_reads_back_in_openslide(tmp_path, fmt, mpp):
    image = synthetic.render_slide(make_spec(mpp=mpp, fmt=fmt))
    path = tmp_path / f'slide.{fmt}'
    slide_writer.write_slide(path, image, mpp, fmt)
    assert sorted(tmp_path.iterdir()) == [path]  # no temporary file left behind
    with openslide.OpenSlide(path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == VENDORS[fmt]
        assert slide.level_dimensions == ((1536, 1024), (384, 256))
        np.testing.assert_allclose(slide.level_downsamples, [1.0, 4.0])
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(mpp)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(mpp)
        region = np.asarray(slide.read_region((256, 128), 0, (768, 640)).convert('RGB'))
        assert np.abs(region.astype(int) - image[128:768, 256:1024]).mean() < 4
        level1 = np.asarray(slide.read_region((0, 0), 1, (384, 256)).convert('RGB'))
        reduced = np.asarray(Image.fromarray(image).reduce(4))
        assert np.abs(level1.astype(int) - reduced).mean() < 4
        if fmt == 'svs':
            assert slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER] == str(round(10 / mpp))
            assert 'thumbnail' in slide.associated_images


def test_pyramid_levels_down_to_below_two_tiles(tmp_path):
    image = np.zeros((3072, 4096, 3), np.uint8)
    image[..., 0] = np.arange(4096, dtype=np.uint8)  # wraps: a sawtooth
    image[..., 1] = np.arange(3072, dtype=np.uint8)[:, None]
    for fmt in slide_writer.FORMATS:
        path = tmp_path / f'big.{fmt}'
        slide_writer.write_slide(path, image, 0.25, fmt)
        with openslide.OpenSlide(path) as slide:
            assert slide.level_dimensions == ((4096, 3072), (1024, 768), (256, 192))
            np.testing.assert_allclose(slide.level_downsamples, [1.0, 4.0, 16.0])
    with pytest.raises(ValueError):
        slide_writer.write_slide(tmp_path / 'x.tiff', image[..., 0], 0.25, 'tiff')


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('mpp', synthetic_cohort.MPPS)
def test_tissue_follows_the_background_rule(mpp, seed):
    spec = make_spec(mpp=mpp, seed=seed, width=1024, height=768)
    image, masks = synthetic.render_slide(spec, return_masks=True)
    tissue = masks['tissue']
    assert sorted(masks) == ['motif', 'tissue']  # no artifacts asked, none drawn
    assert image.dtype == np.uint8 and image.shape == (768, 1024, 3)
    assert 0.3 <= tissue.mean() <= 0.55
    kept = (image <= 200).all(-1)  # tissue by "background when any channel > 200"
    assert kept[tissue].mean() > 0.4
    assert kept[tissue].mean() < 0.98  # pale eosin: some tissue has a channel above 200
    assert kept[~tissue].mean() < 0.01
    assert 225 < image[~tissue].mean() < 250


@pytest.mark.parametrize('seed', [1, 2, 3])
def test_motif_only_on_positive_slides_and_only_in_its_region(seed):
    mpp = 0.5
    positive, masks = synthetic.render_slide(make_spec(True, mpp, seed=seed), return_masks=True)
    negative, masks_neg = synthetic.render_slide(make_spec(False, mpp, seed=seed),
                                                 return_masks=True)
    tissue, motif = masks['tissue'], masks['motif']
    tissue_neg, motif_neg = masks_neg['tissue'], masks_neg['motif']
    np.testing.assert_array_equal(tissue, tissue_neg)
    assert not motif_neg.any()
    assert not (motif & ~tissue).any()
    assert 0.14 <= motif.sum() / tissue.sum() <= 0.26  # 15-25% on the 8-um grid
    # Outside the motif region (plus a gland's reach) the positive slide is the negative one.
    differs = (positive != negative).any(-1)
    assert not differs[~dilate(motif, int(60 / mpp))].any()
    assert differs[motif].mean() > 0.5
    # The motif is crowded dark nuclei: many more nuclear pixels than in the same area of the
    # negative slide.
    nuclear = lambda image: image.max(-1) < 120  # noqa: E731
    assert nuclear(positive)[motif].mean() > 2 * nuclear(negative)[motif].mean()


def test_nuclei_are_sized_in_microns():
    def median_nucleus_area(mpp):  # pixels, over three slides
        sizes = []
        for seed in range(3):
            spec = make_spec(False, mpp, width=1024, height=1024, seed=seed)
            image = synthetic.render_slide(spec)
            counts = np.bincount(label(image.max(-1) < 140).ravel())[1:]
            sizes.append(counts[counts >= 4])
        return np.median(np.concatenate(sizes))

    ratio = median_nucleus_area(0.25) / median_nucleus_area(0.5)
    assert 2.5 < ratio < 6  # 4 for areas twice as wide; merged neighbours blur it


def test_cohort_specs_balance_classes_formats_and_cases():
    for n in range(2, 9):
        assert {s.label for s in synthetic_cohort.cohort_specs(n)} == {'negative', 'positive'}
    specs = synthetic_cohort.cohort_specs(40, ('wt', 'mut'), seed=5)
    assert len({s.slide_id for s in specs}) == 40
    by_class = collections.defaultdict(list)
    for s in specs:
        by_class[s.label].append(s)
        assert s.positive == (s.label == 'mut')
    assert abs(len(by_class['wt']) - len(by_class['mut'])) <= 2
    for members in by_class.values():  # format and mpp do not tell the class
        assert collections.Counter(s.fmt for s in members).keys() == {'tiff', 'svs'}
        assert collections.Counter(s.mpp for s in members).keys() == {0.25, 0.5}
        assert max(collections.Counter((s.fmt, s.mpp) for s in members).values()) <= 6
    cases = collections.defaultdict(list)
    for s in specs:
        cases[s.case_id].append(s)
    pairs = [c for c in cases.values() if len(c) == 2]
    assert 0.15 < len(pairs) / len(cases) < 0.35
    assert all(len({s.label for s in c}) == 1 for c in cases.values())
    assert {c[0].label for c in pairs} == {'wt', 'mut'}
    with pytest.raises(ValueError):
        synthetic_cohort.cohort_specs(4, ('a', 'b', 'c'))


def read_manifest(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def level0(path):
    return tifffile.imread(path, key=0)


def test_make_cohort_is_deterministic_and_skips_existing(tmp_path):
    kwargs = dict(classes=('wt', 'mut'), width=640, height=512)
    manifest = synthetic_cohort.make_cohort(tmp_path / 'a', 6, seed=3, **kwargs)
    assert manifest == (tmp_path / 'a' / 'manifest.csv').resolve()
    rows = read_manifest(manifest)
    assert list(rows[0]) == ['slide_id', 'path', 'label', 'case_id']
    assert len(rows) == 6 and {r['label'] for r in rows} == {'wt', 'mut'}
    assert max(collections.Counter(r['case_id'] for r in rows).values()) == 2
    for row in rows:
        path = pathlib.Path(row['path'])
        assert path.is_absolute() and path.parent == manifest.parent
        with openslide.OpenSlide(path) as slide:
            assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == VENDORS[path.suffix[1:]]
    assert sorted(p.name for p in manifest.parent.iterdir()) == sorted(
        [pathlib.Path(r['path']).name for r in rows] + ['manifest.csv'])

    same = read_manifest(synthetic_cohort.make_cohort(tmp_path / 'b', 6, seed=3, **kwargs))
    other = read_manifest(synthetic_cohort.make_cohort(tmp_path / 'c', 6, seed=4, **kwargs))
    strip = lambda rows: [{k: v for k, v in r.items() if k != 'path'} for r in rows]  # noqa: E731
    assert strip(same) == strip(rows)
    for a, b, c in zip(rows, same, other):
        np.testing.assert_array_equal(level0(a['path']), level0(b['path']))
        assert not np.array_equal(level0(a['path']), level0(c['path']))

    # A second run skips the slides already written and rewrites a missing one identically.
    stamps = {r['path']: pathlib.Path(r['path']).stat().st_mtime_ns for r in rows}
    missing = pathlib.Path(rows[1]['path'])
    kept_pixels = level0(missing)
    missing.unlink()
    assert read_manifest(synthetic_cohort.make_cohort(tmp_path / 'a', 6, seed=3, **kwargs)) == rows
    for path, stamp in stamps.items():
        if pathlib.Path(path) != missing:
            assert pathlib.Path(path).stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(level0(missing), kept_pixels)


def gradient_image(height, width):
    yy, xx = np.mgrid[:height, :width]
    return np.stack([(7 * xx + yy) % 256, (3 * yy) % 256, (xx ^ yy) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize('fmt', slide_writer.FORMATS)
def test_streamed_slide_has_the_pages_of_write_slide(tmp_path, fmt):
    image = gradient_image(1100, 1500)  # edge tiles on both axes, 2 levels
    slide_writer.write_slide(tmp_path / f'whole.{fmt}', image, 0.5, fmt, jpeg_quality=80)
    asked = []

    def rows(top, height):
        asked.append((top, height))
        return image[top:top + height]

    path = tmp_path / f'streamed.{fmt}'
    slide_writer.write_streamed_slide(path, rows, (1500, 1100), 0.5, fmt, jpeg_quality=80)
    assert asked == [(top, min(256, 1100 - top)) for top in range(0, 1100, 256)]
    assert sorted(tmp_path.iterdir()) == sorted([path, tmp_path / f'whole.{fmt}'])
    with tifffile.TiffFile(tmp_path / f'whole.{fmt}') as whole, tifffile.TiffFile(path) as streamed:
        assert len(streamed.pages) == len(whole.pages)
        for a, b in zip(whole.pages, streamed.pages):
            if a.is_tiled:  # the levels: the same tiles, bit for bit
                assert b.is_tiled and a.description == b.description
                np.testing.assert_array_equal(a.asarray(), b.asarray())
            else:  # the SVS thumbnail: level 0 reduced by 4 (a whole factor), 768 px at most
                np.testing.assert_array_equal(b.shape, (275, 375, 3))
    with openslide.OpenSlide(path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == VENDORS[fmt]
        assert slide.level_dimensions == ((1500, 1100), (375, 275))
    with pytest.raises(ValueError, match='rows'):
        slide_writer.write_streamed_slide(tmp_path / 'bad.svs', lambda top, h: image[:h, :100],
                                          (1500, 1100), 0.5)


def test_mosaic_slide_reads_back_in_openslide(tmp_path):
    spec = synthetic.SyntheticSlideSpec('m', 'c', 'positive', True, 0.5, 'svs', 6000, 4000, seed=4)
    mosaic = synthetic_mosaic.MosaicSlide(spec, blocks=2, block_size=1024, cell_size=512)
    path = tmp_path / 'm.svs'
    slide_writer.write_streamed_slide(path, mosaic.rows, (6000, 4000), 0.5)
    assert mosaic.tissue_fraction == pytest.approx(0.6, abs=0.01)
    with openslide.OpenSlide(path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == 'aperio'
        assert slide.level_dimensions == ((6000, 4000), (1500, 1000), (375, 250))
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        assert 'thumbnail' in slide.associated_images
        for x, y in [(0, 0), (2900, 1700), (5500, 3600)]:
            region = np.asarray(slide.read_region((x, y), 0, (500, 400)).convert('RGB'))
            expected = mosaic.rows(y, 400)[:, x:x + 500]
            assert np.abs(region.astype(int) - expected).mean() < 4
        level1 = np.asarray(slide.read_region((0, 2048), 1, (1500, 256)).convert('RGB'))
        expected = np.asarray(Image.fromarray(mosaic.rows(2048, 1024)).reduce(4))
        assert np.abs(level1.astype(int) - expected).mean() < 7  # denser detail: more JPEG error
    image, tissue = mosaic.rows(0, 4000), mosaic.tissue(0, 4000, 0, 6000)
    assert tissue.mean() == pytest.approx(mosaic.tissue_fraction, abs=0.02)
    kept = (image <= 200).all(-1)  # the tile stage's rule: H&E inside the mask, glass outside
    assert 0.4 < kept[tissue].mean() < 0.98 and kept[~tissue].mean() < 0.01
    assert 225 < image[~tissue].mean() < 250
    np.testing.assert_array_equal(image[1000:1300], mosaic.rows(1000, 300))


def test_streamed_writer_holds_a_few_bands_not_the_slide(tmp_path):
    """Arrays and bytes the writer allocates (tracemalloc sees numpy and Python objects; PIL's
    one-band temporaries are outside its view) stay at a few bands for a slide 128 bands tall."""
    width, height = 2048, 32768  # 192 MiB of level-0 pixels; a band of 256 rows is 1.5 MiB
    band_bytes = 256 * width * 3
    bands = [np.full((256, width, 3), (40 * k, 120, 160), np.uint8) for k in range(4)]

    def rows(top, count):
        return bands[top // 256 % 4][:count]

    tracemalloc.start()
    try:
        slide_writer.write_streamed_slide(tmp_path / 'tall.svs', rows, (width, height), 0.25)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * band_bytes < width * height * 3 / 16
    with openslide.OpenSlide(tmp_path / 'tall.svs') as slide:
        assert slide.level_dimensions == ((2048, 32768), (512, 8192), (128, 2048))
        pixel = np.asarray(slide.read_region((100, 256 * 126 + 9), 0, (8, 8)))[0, 0, :3]
        np.testing.assert_allclose(pixel, (80, 120, 160), atol=3)


@pytest.mark.parametrize('low, high', [(0.02, 0.05), (0.15, 0.25), (0.4, 0.5)])
def test_motif_fraction_sets_the_share_of_tissue_the_motif_covers(low, high):
    """A harder cohort (`data.synthetic.motif_fraction`): the same slide outside the motif, a
    motif covering the asked share of its tissue (on the 8-um grid), nested as the share grows."""
    spec = make_spec(True, 0.5, seed=2)
    _, masks = synthetic.render_slide(dataclasses.replace(spec, motif_fraction=(low, high)),
                                      return_masks=True)
    _, default = synthetic.render_slide(spec, return_masks=True)
    tissue, motif = masks['tissue'], masks['motif']
    default_tissue, default_motif = default['tissue'], default['motif']
    np.testing.assert_array_equal(tissue, default_tissue)
    assert low - 0.01 <= motif.sum() / tissue.sum() <= high + 0.01
    smaller, larger = sorted((motif, default_motif), key=np.sum)
    assert not (smaller & ~larger).any()
