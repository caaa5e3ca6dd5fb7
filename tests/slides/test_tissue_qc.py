"""Tissue QC: Otsu tissue against scikit-image, ink and folds by optical density on real and
drawn pixels, the focus measure against scipy, and each patch's drop cause."""

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage import filters, morphology

from pathjax.slides import artifact_masks, focus, synthetic, tissue_otsu, tissue_qc
from pathjax.slides.tissue import TissueRule
from tests.conftest import SHARED_DATA

HISTOLAB = SHARED_DATA / 'tiles' / 'histolab'
needs_tiles = pytest.mark.skipif(not HISTOLAB.is_dir(), reason='shared real tiles absent')


def tile(name: str) -> np.ndarray:
    return np.asarray(Image.open(HISTOLAB / name).convert('RGB'))


def rendered(width=768, height=576, seed=3) -> np.ndarray:
    spec = synthetic.SyntheticSlideSpec('s', 'c', 'negative', False, 2.0, 'tiff', width, height,
                                        seed)
    return synthetic.render_slide(spec)


def test_otsu_tissue_is_scikit_images_pipeline():
    """Saturation (max - min) / max, a 7x7 median (edges replicated), Otsu's threshold, a closing
    with the same 5x5 ellipse, small objects removed and small holes filled (8-connected), all
    by scikit-image and scipy: the same mask."""
    rgb = rendered()
    downsample, neighbourhood = 4.0, 40  # windows of 10 x 10 overview pixels
    got = tissue_otsu.otsu_tissue(rgb, downsample, neighbourhood)

    high, low = rgb.max(axis=-1).astype(np.float64), rgb.min(axis=-1)
    saturation = np.where(high > 0, np.rint(255 * (high - low) / np.maximum(high, 1)), 0)
    smoothed = ndimage.median_filter(saturation.astype(np.uint8), size=7, mode='nearest')
    threshold = max(filters.threshold_otsu(smoothed), tissue_otsu.MIN_SATURATION)
    assert abs(threshold - tissue_otsu.otsu_threshold(smoothed)) <= 1
    mask = smoothed > tissue_otsu.otsu_threshold(smoothed)
    ellipse = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)).astype(bool)
    mask = ndimage.binary_erosion(ndimage.binary_dilation(mask, ellipse), ellipse, border_value=1)
    window = int((neighbourhood / downsample) ** 2)
    mask = morphology.remove_small_objects(mask, max_size=window - 1, connectivity=2)
    expected = morphology.remove_small_holes(mask, max_size=tissue_otsu.HOLE_WINDOWS * window - 1,
                                             connectivity=2)
    assert 0.1 < expected.mean() < 0.9
    np.testing.assert_array_equal(got, expected)


def test_otsu_finds_no_tissue_on_glass_and_ignores_ink_for_its_threshold():
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(238, 3, (200, 300, 3)), 0, 255).astype(np.uint8)
    assert not tissue_otsu.otsu_tissue(glass, 1.0, 4).any()
    rgb = rendered()
    ink = np.zeros(rgb.shape[:2], bool)
    ink[:, :60] = True
    inked = rgb.copy()
    inked[ink] = (20, 60, 200)  # saturated marker would pull the threshold up
    plain = tissue_otsu.otsu_tissue(rgb, 4.0, 40)
    ignoring_ink = tissue_otsu.otsu_tissue(inked, 4.0, 40, ink)
    np.testing.assert_array_equal(ignoring_ink[:, 70:], plain[:, 70:])


@needs_tiles
@pytest.mark.parametrize('name, least', [('no-tissue-green-pen.png', 0.3),
                                         ('wsi-blue-pen.png', 0.03),
                                         ('diagnostic-slide-thumb-rgb.png', 0.08)])
def test_pen_is_found_on_real_marked_tiles(name, least):
    assert artifact_masks.pen_mask(tile(name)).mean() >= least


@needs_tiles
@pytest.mark.parametrize('name', ['tissue-level0-4302-10273-4814-10785.png',
                                  'tissue-level0-7352-11762-7864-12274.png',
                                  'tissue-level2-1784-6289-5880-10386.png',
                                  'tissue-level2-4640-4649-8736-8746.png',
                                  'medium-nuclei-score-level2.png', 'tcga-lung-rgb.png',
                                  'high-nuclei-score-level2.png', 'almost-white-2.png'])
def test_clean_real_tissue_has_no_pen_and_no_fold(name):
    rgb = np.asarray(Image.fromarray(tile(name)).reduce(4))  # about an overview's scale
    assert artifact_masks.pen_mask(rgb).mean() <= 0.01
    tissue = ~(rgb.max(axis=-1) > 200)
    assert artifact_masks.fold_mask(rgb, tissue).mean() <= 0.02


def test_drawn_ink_is_found_where_it_was_drawn():
    """Blue, green and black marker by Beer-Lambert over rendered tissue and glass."""
    rgb = rendered().astype(np.float64)
    stroke = np.zeros(rgb.shape[:2], bool)
    for k, od in enumerate(((0.9, 0.45, 0.1), (0.8, 0.2, 0.6), (1.5, 1.5, 1.4))):
        band = np.zeros_like(stroke)
        band[80 + 150 * k:120 + 150 * k, 50:700] = True
        rgb[band] *= 10 ** -np.array(od)
        stroke |= band
    mask = artifact_masks.pen_mask(rgb.astype(np.uint8))
    assert mask[stroke].mean() > 0.97
    away = ~ndimage.binary_dilation(stroke, iterations=artifact_masks.INK_MARGIN + 1)
    assert mask[away].mean() < 0.005


def test_doubled_tissue_is_a_fold_and_crowded_nuclei_are_not():
    """A band where the tissue lies twice (transmittance squared) is mostly found (not where its
    own stain mix is far from the slide's median: the direction test), the rest is not; a band as
    dark but darkened by haematoxylin alone (crowded nuclei) is not a fold."""
    rgb = rendered()
    tissue = rgb.max(axis=-1) <= 200
    fold = np.zeros(tissue.shape, bool)
    fold[200:260, :] = True
    fold &= tissue
    doubled = rgb.astype(np.float64)
    doubled[fold] = 256 * ((doubled[fold] + 1) / 256) ** 2 - 1
    nuclei = np.zeros(tissue.shape, bool)
    nuclei[400:460, :] = True
    nuclei &= tissue
    haematoxylin = np.array([0.65, 0.70, 0.29])  # Ruifrok's optical density vector
    doubled[nuclei] *= 10 ** -(0.5 * haematoxylin)  # as much darker as a fold, all of it H
    mask = artifact_masks.fold_mask(np.clip(np.rint(doubled), 0, 255).astype(np.uint8), tissue)
    reach = artifact_masks.FOLD_SMOOTHING // 2 + 1  # the smoothing mixes in this far
    inner = ndimage.binary_erosion(fold, iterations=reach)
    assert mask[inner].mean() > 0.7
    assert mask[ndimage.binary_erosion(nuclei, iterations=reach)].mean() < 0.05
    away = tissue & ~ndimage.binary_dilation(fold | nuclei, iterations=reach)
    assert mask[away].mean() < 0.01


@needs_tiles
def test_focus_is_the_variance_of_scipys_laplacian_and_falls_with_blur():
    patch = tile('tissue-level0-7352-11762-7864-12274.png')
    grey = patch.astype(np.float64).mean(axis=-1)
    expected = ndimage.laplace(grey, mode='mirror').var()
    assert focus.laplacian_variance(patch) == pytest.approx(expected, rel=1e-4)
    blurred = cv2.GaussianBlur(patch, (0, 0), 3)
    assert focus.laplacian_variance(blurred) < 0.1 * focus.laplacian_variance(patch)


def test_each_dropped_patch_has_one_cause_in_order():
    """On a 4 x 4 grid of 100-px patches (masks at 10x): background first, then pen, then fold,
    then blur on what is left."""
    shape = (40, 40)
    background, pen, fold = (np.zeros(shape, bool) for _ in range(3))
    background[:10] = True  # row 0: glass
    pen[10:20, :10] = True  # (1, 0): all ink
    pen[10:11, 10:20] = True  # (1, 1): 10% ink, not more than 0.1: kept
    fold[20:30, :20] = True  # (2, 0), (2, 1): folds
    pen[20:30, 0:10] = True  # (2, 0): ink too, so its cause is pen
    masks = tissue_qc.OverviewMasks(background, pen, fold)
    rule = TissueRule(max_artifact_fraction=0.1)
    tiles, dropped = tissue_qc.select_patches(masks, (400, 400), 100.0, rule)
    assert dropped['background'].tolist() == [[0, 0], [100, 0], [200, 0], [300, 0]]
    assert dropped['pen'].tolist() == [[0, 100], [0, 200]]
    assert dropped['fold'].tolist() == [[100, 200]] and dropped['blur'].shape == (0, 2)
    assert len(tiles) == 16 - 7 and [100, 100] in tiles.coords.tolist()
    focus_values = np.arange(len(tiles), dtype=np.float32)
    sharp, kept_focus, blurred = tissue_qc.drop_blurred(tiles, focus_values, 3.0)
    np.testing.assert_array_equal(blurred, tiles.coords[:3])
    np.testing.assert_array_equal(sharp.coords, tiles.coords[3:])
    np.testing.assert_array_equal(kept_focus, focus_values[3:])


def test_a_bad_tissue_setting_is_named():
    with pytest.raises(ValueError, match='tissue.method'):
        TissueRule(method='triangle')
    with pytest.raises(ValueError, match='tissue.max_blur'):
        TissueRule(max_blur=-1)
    with pytest.raises(ValueError, match='tissue.max_artifact_fraction'):
        TissueRule(max_artifact_fraction=2)
