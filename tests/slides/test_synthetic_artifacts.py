"""Synthetic artifacts (pen, blur, fold) with known masks, and staining sites that can follow the
label: masks where the artifacts are and nothing changed outside them, each artifact drawn as it
says (ink by Beer-Lambert, blur by a Gaussian, a fold as two layers), sites and splits as asked,
and a slide without either rendered exactly as before they existed."""

import collections
import csv
import dataclasses
import importlib.util
import math
import subprocess

import cv2
import numpy as np
import openslide
import pytest

from pathjax import cohort as cohort_lib
from pathjax.slides import synthetic, synthetic_artifacts, synthetic_cohort, synthetic_mosaic

# The last commit before artifacts and sites: slides rendered with its code are the reference a
# default slide must equal, pixel for pixel.
REFERENCE_COMMIT = '562469e'


def make_spec(artifacts=(), positive=True, mpp=0.5, seed=7, width=1024, height=768):
    return synthetic.SyntheticSlideSpec(
        slide_id='s', case_id='c', label='positive' if positive else 'negative', positive=positive,
        mpp=mpp, fmt='tiff', width=width, height=height, seed=seed, artifacts=tuple(artifacts))


def dilate(mask, radius):
    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * radius + 1,) * 2, np.uint8)) > 0


def optical_density(image):
    return -np.log10(np.maximum(np.asarray(image, np.float64), 0.5) / 255)


@pytest.fixture(scope='module')
def reference_module(tmp_path_factory):
    """synthetic.py as it was at REFERENCE_COMMIT, imported from a temporary file."""
    try:
        source = subprocess.run(['git', 'show', f'{REFERENCE_COMMIT}:pathjax/slides/synthetic.py'],
                                capture_output=True, check=True, text=True,
                                cwd=synthetic.__file__.rsplit('/pathjax/', 1)[0]).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f'the reference commit {REFERENCE_COMMIT} is not available: {error}')
    path = tmp_path_factory.mktemp('reference') / 'reference_synthetic.py'
    path.write_text(source)
    spec = importlib.util.spec_from_file_location('reference_synthetic', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_streams_are_prefix_stable():
    """The 8 streams slides were always rendered from are the first 8 of the 12 now spawned."""
    for seed in (0, 12345, 2**32 - 1):
        old = np.random.SeedSequence(seed).spawn(8)
        new = np.random.SeedSequence(seed).spawn(12)
        for a, b in zip(old, new):
            np.testing.assert_array_equal(a.generate_state(8), b.generate_state(8))
        assert not np.array_equal(new[8].generate_state(8), new[0].generate_state(8))


@pytest.mark.parametrize('positive, mpp, seed',
                         [(True, 0.5, 3), (False, 0.25, 4), (True, 0.25, 11)])
def test_default_slide_renders_as_before_artifacts_and_sites(reference_module, positive, mpp,
                                                             seed):
    """No artifacts, no site: the image and masks of the reference commit's code, bit for bit,
    and the cohort's specs are the same slides."""
    old = reference_module.SyntheticSlideSpec('s', 'c', 'x', positive, mpp, 'tiff', 1024, 768, seed)
    image_old, tissue_old, motif_old = reference_module.render_slide(old, return_masks=True)
    image, masks = synthetic.render_slide(make_spec(positive=positive, mpp=mpp, seed=seed),
                                          return_masks=True)
    np.testing.assert_array_equal(image, image_old)
    np.testing.assert_array_equal(masks['tissue'], tissue_old)
    np.testing.assert_array_equal(masks['motif'], motif_old)
    for a, b in zip(reference_module.cohort_specs(12, seed=seed),
                    synthetic_cohort.cohort_specs(12, seed=seed)):
        assert dataclasses.asdict(a) == {k: v for k, v in dataclasses.asdict(b).items()
                                         if k not in ('artifacts', 'site', 'site_stain', 'split')}
        assert (b.artifacts, b.site, b.site_stain, b.split) == ((), -1, (), '')


@pytest.fixture(scope='module', params=[(0.5, 1), (0.25, 2), (0.5, 5)], ids=lambda p: f'{p}')
def rendered(request):
    """(spec with all three artifacts, its image and masks, the artifact-free image)."""
    mpp, seed = request.param
    spec = make_spec(synthetic_artifacts.ARTIFACTS, mpp=mpp, seed=seed)
    image, masks = synthetic.render_slide(spec, return_masks=True)
    plain = synthetic.render_slide(dataclasses.replace(spec, artifacts=()))
    return spec, image, masks, plain


def test_masks_cover_the_stated_shares(rendered):
    spec, _, masks, _ = rendered
    assert sorted(masks) == ['blur', 'fold', 'motif', 'pen', 'tissue']
    tissue = masks['tissue']
    assert 0.03 - 0.01 <= masks['pen'].mean() <= 0.08 + 0.02  # of the slide: strokes overlap
    assert 0.1 <= (masks['pen'] & tissue).sum() / masks['pen'].sum() <= 0.9  # tissue and glass
    assert 0.10 - 0.02 <= (masks['blur'] & tissue).sum() / tissue.sum() <= 0.20 + 0.02
    assert 0.03 - 0.01 <= masks['fold'].sum() / tissue.sum() <= 0.08 + 0.01
    assert not (masks['fold'] & ~tissue).any()
    layout = synthetic.artifact_layout(spec)
    assert 1 <= len(layout.pen) <= 3 and 1 <= len(layout.folds) <= 2
    assert 3 <= layout.blur.sigma * spec.mpp <= 6
    for fold in layout.folds:
        assert fold.width * spec.mpp <= 300 and fold.length > 5 * fold.width
    # The masks without rendering are the rendered ones.
    cheap = synthetic.artifact_masks(spec)
    assert sorted(cheap) == sorted(masks)
    for name, mask in masks.items():
        np.testing.assert_array_equal(cheap[name], mask, err_msg=name)


def test_nothing_changes_outside_the_masks(rendered):
    """Pixels outside every mask equal the artifact-free render; the blur's soft edge (sigma
    below half its maximum) reaches only a few microns beyond its mask."""
    spec, image, masks, plain = rendered
    edge = int(math.ceil(4 * synthetic_artifacts._BLUR_EDGE_UM / spec.mpp)) + 1
    inside = masks['pen'] | masks['fold'] | dilate(masks['blur'], edge)
    differs = (image != plain).any(-1)
    assert differs[masks['pen'] | masks['fold']].mean() > 0.5
    assert not differs[~inside].any()
    # and the tissue and motif masks do not depend on the artifacts
    _, plain_masks = synthetic.render_slide(dataclasses.replace(spec, artifacts=()),
                                            return_masks=True)
    np.testing.assert_array_equal(plain_masks['tissue'], masks['tissue'])


def test_each_artifact_is_drawn_alone_from_its_own_stream():
    """One artifact at a time gives the same mask as all three together: each has its own
    seed stream."""
    spec = make_spec(synthetic_artifacts.ARTIFACTS, seed=3)
    together = synthetic.artifact_masks(spec)
    for name in synthetic_artifacts.ARTIFACTS:
        alone = synthetic.artifact_masks(dataclasses.replace(spec, artifacts=(name,)))
        assert sorted(alone) == sorted(['tissue', 'motif', name])
        np.testing.assert_array_equal(alone[name], together[name])


def strokes_by_colour(mpp=0.5):
    """(spec, stroke index) of a pen-only slide for each ink colour, from the first seeds."""
    found = {}
    for seed in range(40):
        spec = make_spec(['pen'], mpp=mpp, seed=seed)
        for i, stroke in enumerate(synthetic.artifact_layout(spec).pen):
            found.setdefault(stroke.colour, (spec, i))
        if len(found) == 3:
            return found
    raise AssertionError(f'40 seeds drew only {sorted(found)} ink')


def test_pen_is_translucent_ink_of_its_colour():
    """Under a stroke the light is the light below times 10^-(density * ink OD): on glass the
    OD the ink added has the ink's hue (its channel ratios), over tissue the tissue shows
    through (darker than on glass), and blue ink turns pixels blue (B - R up)."""
    for colour, (spec, index) in strokes_by_colour().items():
        image, masks = synthetic.render_slide(spec, return_masks=True)
        plain = synthetic.render_slide(dataclasses.replace(spec, artifacts=()))
        strokes = synthetic.artifact_layout(spec).pen
        stroke = strokes[index]
        alpha = np.zeros(image.shape[:2], np.float32)
        others = np.zeros(image.shape[:2], bool)
        for i, s in enumerate(strokes):
            y0, y1, x0, x1, a, _ = synthetic_artifacts._stroke_alpha(s, image.shape[:2])
            if i == index:
                alpha[y0:y1, x0:x1] = a
            else:
                others[y0:y1, x0:x1] |= a > 0
        assert not ((alpha > 0) & ~masks['pen']).any()
        core = (alpha == 1) & ~others
        glass = core & ~dilate(masks['tissue'], 2)
        on_tissue = core & masks['tissue']
        assert glass.sum() > 200 and on_tissue.sum() > 200, colour
        added = optical_density(image[glass]) - optical_density(plain[glass])  # [N, 3]
        density = added / np.asarray(stroke.ink_od)
        np.testing.assert_allclose(np.median(density, 0), stroke.density, rtol=0.2)
        ratio = np.median(density, 0)
        assert ratio.max() / ratio.min() < 1.12, (colour, ratio)  # the ink's own hue
        if colour == 'black':
            assert optical_density(image[glass]).mean() > 1.1
        gain = image[on_tissue].astype(int) - plain[on_tissue]
        assert (gain <= 0).all()  # a dye only takes light away
        shift = ((image[..., 2].astype(int) - image[..., 0]) - (plain[..., 2].astype(int)
                                                              - plain[..., 0]))[core]
        if colour == 'blue':
            assert shift.mean() > 40
        if colour == 'green':
            green_lead = image[core][:, 1].astype(int) - image[core][:, [0, 2]].max(1)
            assert green_lead.mean() > 15
        if colour != 'black':  # the tissue shows through the ink: darker than glass under it
            assert image[on_tissue].mean() < image[glass].mean() - 10


def laplacian_variance(image, mask):
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return cv2.Laplacian(grey, cv2.CV_64F)[mask].var()


@pytest.mark.parametrize('mpp, seed', [(0.5, 4), (0.25, 6)])
def test_blur_is_a_gaussian_of_the_sharp_slide(mpp, seed):
    spec = make_spec(['blur'], mpp=mpp, seed=seed)
    image, masks = synthetic.render_slide(spec, return_masks=True)
    plain = synthetic.render_slide(dataclasses.replace(spec, artifacts=()))
    region = synthetic.artifact_layout(spec).blur
    blurred = masks['blur'] & masks['tissue']
    assert laplacian_variance(image, blurred) < 0.2 * laplacian_variance(plain, blurred)
    outside = masks['tissue'] & ~dilate(masks['blur'], int(8 / mpp))
    assert laplacian_variance(image, outside) == laplacian_variance(plain, outside)
    # Inside, away from the edge, the slide is the sharp one blurred with the region's sigma.
    core = ~dilate(~masks['blur'], int(math.ceil(6 * synthetic_artifacts._BLUR_EDGE_UM / mpp)))
    assert core.sum() > 1000
    expected = cv2.GaussianBlur(plain, (0, 0), region.sigma)
    assert np.abs(image[core].astype(int) - expected[core]).max() <= 1


@pytest.mark.parametrize('mpp, seed', [(0.5, 2), (0.25, 9)])
def test_fold_adds_the_optical_density_of_the_mirrored_layer(mpp, seed):
    """Doubled pixels: intensity = white * (I / white) * (I_mirror / white), I from the
    artifact-free render (quantisation only: within one level); about twice the OD."""
    spec = make_spec(['fold'], mpp=mpp, seed=seed)
    image, masks = synthetic.render_slide(spec, return_masks=True)
    plain = synthetic.render_slide(dataclasses.replace(spec, artifacts=()))
    _, white = synthetic.slide_stain(spec)
    folds = synthetic.artifact_layout(spec).folds
    count = np.zeros(image.shape[:2], int)
    found = [fold.pixels(masks['tissue']) for fold in folds]
    for y0, y1, x0, x1, doubled, _, _ in found:
        count[y0:y1, x0:x1] += doubled
    np.testing.assert_array_equal(count > 0, masks['fold'])
    checked = 0
    for y0, y1, x0, x1, doubled, rows, cols in found:
        alone = doubled & (count[y0:y1, x0:x1] == 1)
        own = plain[y0:y1, x0:x1][alone].astype(np.float64)
        mirror = plain[rows[alone], cols[alone]].astype(np.float64)
        expected = white * (own / white) * (mirror / white)
        got = image[y0:y1, x0:x1][alone]
        assert np.abs(got - expected).max() <= 0.5 + 1e-3
        checked += alone.sum()
        # in OD: the sum of the two layers' (against the white level)
        od = lambda x: -np.log10(np.maximum(x, 1) / white)  # noqa: E731
        np.testing.assert_allclose(od(got).mean(0), (od(own) + od(mirror)).mean(0), atol=0.01)
        assert 1.6 < od(got).mean() / od(own).mean() < 2.5
    assert checked > 0.9 * masks['fold'].sum()


def test_unknown_artifact_and_mosaic_are_refused():
    with pytest.raises(ValueError, match='unknown artifact'):
        synthetic.render_slide(make_spec(['smudge']))
    with pytest.raises(ValueError, match='unknown artifact'):
        synthetic_cohort.cohort_specs(4, artifacts=('pen', 'coffee'))
    with pytest.raises(ValueError, match='sites'):
        synthetic_cohort.cohort_specs(4, sites=1)
    spec = synthetic.SyntheticSlideSpec('m', 'c', 'positive', True, 0.5, 'svs', 6000, 4000, seed=4,
                                        artifacts=('pen',))
    with pytest.raises(ValueError, match='mosaic'):
        synthetic_mosaic.MosaicSlide(spec, blocks=1, block_size=512, cell_size=512)
    with pytest.raises(ValueError, match='mosaic'):
        synthetic_mosaic.MosaicSlide(dataclasses.replace(spec, artifacts=(), site=0),
                                     blocks=1, block_size=512, cell_size=512)


# Sites -------------------------------------------------------------------------------------------


def at_home(specs, sites, classes=('negative', 'positive')):
    """Per case: whether it is at its label's site."""
    home = {}
    for s in specs:
        home.setdefault(s.case_id, s.site == classes.index(s.label) % sites)
    return home


@pytest.mark.parametrize('sites, seed', [(2, 0), (3, 1), (5, 2)])
def test_sites_follow_the_label_as_often_as_asked(sites, seed):
    specs = synthetic_cohort.cohort_specs(1000, seed=seed, sites=sites,
                                          site_follows_label=(0.8, 0.5))
    assert {s.split for s in specs} == set(cohort_lib.SPLITS)
    assert {s.site for s in specs} == set(range(sites))
    by_case = collections.defaultdict(set)
    for s in specs:
        by_case[s.case_id].add((s.split, s.site))
    assert all(len(v) == 1 for v in by_case.values())  # a case: one split, one site
    split_of = {s.case_id: s.split for s in specs}
    home = at_home(specs, sites)
    for splits, chance in ((('train', 'val'), 0.8), (('test',), 0.5)):
        cases = [c for c in home if split_of[c] in splits]
        share = np.mean([home[c] for c in cases])
        assert abs(share - chance) < 4 * math.sqrt(chance * (1 - chance) / len(cases)), (
            splits, share, len(cases))
    # the splits: fractions of cases per label, as cohort.split_by_case deals them
    for label in ('negative', 'positive'):
        cases = {s.case_id for s in specs if s.label == label}
        counts = collections.Counter(split_of[c] for c in cases)
        total = sum(counts.values())
        for name, fraction in zip(cohort_lib.SPLITS, synthetic_cohort.SPLIT_FRACTIONS):
            assert abs(counts[name] - fraction * total) <= 1


def test_site_placement_extremes_and_other_sites_uniform():
    specs = synthetic_cohort.cohort_specs(400, seed=3, sites=4, site_follows_label=(1.0, 0.0))
    split_of = {s.case_id: s.split for s in specs}
    home = at_home(specs, 4)
    assert all(home[c] == (split_of[c] != 'test') for c in home)
    away = synthetic_cohort.cohort_specs(2000, seed=3, sites=4, site_follows_label=(0.0, 0.0))
    label_sites = collections.Counter((s.label, s.site) for s in away)  # slides
    for label, home_site in (('negative', 0), ('positive', 1)):
        counts = [label_sites[label, k] for k in range(4) if k != home_site]
        assert label_sites[label, home_site] == 0
        assert max(counts) < 1.3 * min(counts), counts  # uniform over the other three


def test_site_stains_differ_between_sites_more_than_within():
    specs = synthetic_cohort.cohort_specs(120, seed=5, sites=3)
    colours = collections.defaultdict(list)
    for s in specs:
        assert len(s.site_stain) == 9
        colours[s.site].append(synthetic.stain_colours(*synthetic.slide_stain(s)))
    means = {k: np.mean(v, 0) for k, v in colours.items()}
    within = max(np.linalg.norm(np.array(v) - means[k], axis=-1).max() for k, v in colours.items())
    between = min(np.linalg.norm(means[a] - means[b], axis=-1).max()
                  for a in means for b in means if a < b)
    assert within < 10 and between > 2 * within, (within, between)
    # a site's stain is the site's, whichever cohort size or site count
    np.testing.assert_array_equal(synthetic.site_stains(5, 3), synthetic.site_stains(5, 6)[:3])
    # and without sites the stain is the slide's own, as before
    plain = synthetic_cohort.cohort_specs(4, seed=5)[0]
    assert plain.site == -1 and plain.site_stain == ()


def read_manifest(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_cohort_with_sites_and_artifacts_writes_site_and_split_and_opens(tmp_path):
    kwargs = dict(classes=('wt', 'mut'), width=768, height=512, seed=4, sites=2,
                  artifacts=('fold', 'pen', 'blur'), split_fractions=(0.5, 0.25, 0.25))
    manifest = synthetic_cohort.make_cohort(tmp_path / 'a', 8, **kwargs)
    rows = read_manifest(manifest)
    assert list(rows[0]) == list(synthetic_cohort.MANIFEST_COLUMNS + synthetic_cohort.SITE_COLUMNS)
    specs = synthetic_cohort.cohort_specs(8, **kwargs)
    for row, spec in zip(rows, specs):
        assert row['site'] == f'site{spec.site}' and row['split'] == spec.split
        assert row['path'].endswith(f'{spec.slide_id}-pen-blur-fold-site{spec.site}.{spec.fmt}')
    cohort = cohort_lib.load_cohort(manifest, ('wt', 'mut'), fractions=(0.7, 0.15, 0.15),
                                    folds=0, fold=0, seed=0)
    assert [(r.site, r.split) for r in cohort.slides] == [(r['site'], r['split']) for r in rows]
    assert not cohort.skipped
    # an artifact-bearing slide opens in OpenSlide and reads back as rendered
    spec, path = specs[0], rows[0]['path']
    image = synthetic.render_slide(spec)
    with openslide.OpenSlide(path) as slide:
        assert slide.dimensions == (768, 512)
        region = np.asarray(slide.read_region((0, 0), 0, (768, 512)).convert('RGB'))
    assert np.abs(region.astype(int) - image).mean() < 4
    # the same cohort without sites keeps today's names and columns
    plain = read_manifest(synthetic_cohort.make_cohort(tmp_path / 'b', 2, classes=('wt', 'mut'),
                                                       width=256, height=256, seed=4))
    assert list(plain[0]) == list(synthetic_cohort.MANIFEST_COLUMNS)
    assert [r['path'].rsplit('/', 1)[1] for r in plain] == ['syn4_0000.tiff', 'syn4_0001.tiff']
