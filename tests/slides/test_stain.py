"""Histogram-matching lookup tables vs scikit-image, and applying them."""

import numpy as np
import pytest
from PIL import Image
from skimage.exposure import match_histograms

from pathjax.slides import stain


def test_matches_skimage_on_real_pair(shared_data):
    source = np.asarray(Image.open(shared_data / 'tiles/torchstain/source.png').convert('RGB'))
    target = np.asarray(Image.open(shared_data / 'tiles/torchstain/target.png').convert('RGB'))
    lut = stain.fit_lut(stain.channel_histograms(source), stain.channel_histograms(target))
    ours = stain.apply_lut(source, lut).astype(np.float64)
    theirs = match_histograms(source.astype(np.float64), target.astype(np.float64), channel_axis=-1)
    assert np.abs(ours - theirs).mean() < 1.0
    assert np.abs(ours - theirs).max() <= 0.5 + 1e-9  # rounding only
    # The mapping moved the source towards the target (the pair is stained differently).
    before = np.abs(source.mean(axis=(0, 1)) - target.mean(axis=(0, 1))).sum()
    after = np.abs(ours.mean(axis=(0, 1)) - target.mean(axis=(0, 1))).sum()
    assert after < 0.2 * before


def test_matches_skimage_on_random_images():
    rng = np.random.default_rng(1)
    source = rng.normal(120, 30, (64, 64, 3)).clip(0, 255).astype(np.uint8)
    target = rng.gamma(4, 30, (50, 70, 3)).clip(0, 255).astype(np.uint8)
    lut = stain.fit_lut(stain.channel_histograms(source), stain.channel_histograms(target))
    theirs = match_histograms(source.astype(float), target.astype(float), channel_axis=-1)
    assert np.abs(stain.apply_lut(source, lut) - theirs).max() <= 0.5 + 1e-9


def test_apply_lut_matches_indexing_and_skips_the_identity():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    lut = rng.integers(0, 256, (3, 256), dtype=np.uint8)
    expected = np.stack([lut[c][images[..., c]] for c in range(3)], axis=-1)
    np.testing.assert_array_equal(stain.apply_lut(images, lut), expected)
    np.testing.assert_array_equal(stain.apply_lut(images[:, ::2], lut), expected[:, ::2])
    assert stain.apply_lut(images, stain.IDENTITY_LUT) is images  # no work, no copy
    strided = stain.apply_lut(images[:, ::2], stain.IDENTITY_LUT)
    np.testing.assert_array_equal(strided, images[:, ::2])
    assert strided.flags.c_contiguous
    for damaged in (lut[:, :255], lut.astype(np.int64), lut[:2]):
        with pytest.raises(ValueError, match=r'uint8 \[3, 256\]'):
            stain.apply_lut(images, damaged)


def test_self_match_is_identity():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    histograms = stain.channel_histograms(image)
    lut = stain.fit_lut(histograms, histograms)
    np.testing.assert_array_equal(stain.apply_lut(image, lut), image)


def test_cohort_reference_weighs_slides_equally():
    small = stain.channel_histograms(np.zeros((2, 2, 3), np.uint8))
    large = stain.channel_histograms(np.full((100, 100, 3), 255, np.uint8))
    reference = stain.cohort_reference([small, large])
    np.testing.assert_allclose(reference[:, 0], 0.5)
    np.testing.assert_allclose(reference[:, 255], 0.5)
