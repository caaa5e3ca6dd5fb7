"""The background rule vs a direct numpy transcription, and on real tiles."""

import tracemalloc

import numpy as np
import pytest
from PIL import Image

from pathjax.slides.tissue import TissueRule, background_mask, least_sums, window_sum


def transcribed_background(rgb, downsample, rule):
    """The rule written out pixel by pixel (slow, obvious)."""
    if rule.channel_rule == 'any':
        pixel = (rgb > rule.threshold).any(axis=-1)
    else:
        pixel = (rgb > rule.threshold).all(axis=-1)
    window = max(1, int(round(rule.neighbourhood / downsample)))
    height, width = pixel.shape
    out = np.zeros_like(pixel)
    for i in range(height):
        for j in range(width):
            box = pixel[max(0, i - window // 2):i - window // 2 + window,
                        max(0, j - window // 2):j - window // 2 + window]
            out[i, j] = pixel[i, j] or box.mean() >= rule.neighbourhood_fraction
    return out


@pytest.mark.parametrize('channel_rule', ['any', 'all'])
@pytest.mark.parametrize('downsample', [20.0, 33.0, 50.0])
def test_background_matches_transcription(channel_rule, downsample):
    rng = np.random.default_rng(int(downsample))
    # Blocky images so both rules and the neighbourhood rule all fire somewhere.
    blocks = rng.integers(150, 256, (6, 7, 3), dtype=np.uint8)
    rgb = np.repeat(np.repeat(blocks, 5, axis=0), 5, axis=1)
    rgb = np.clip(rgb.astype(int) + rng.integers(-30, 30, rgb.shape), 0, 255).astype(np.uint8)
    rule = TissueRule(channel_rule=channel_rule, threshold=200, neighbourhood=200,
                      neighbourhood_fraction=0.6)
    expected = transcribed_background(rgb, downsample, rule)
    got = background_mask(rgb, downsample, rule)
    np.testing.assert_array_equal(got, expected)
    assert 0 < expected.mean() < 1


def brute_window_sum(values, window):
    """Each pixel's clipped window sum, box by box."""
    height, width = values.shape
    return np.array([[values[max(0, i - window // 2):i - window // 2 + window,
                             max(0, j - window // 2):j - window // 2 + window].sum()
                      for j in range(width)] for i in range(height)]).reshape(height, width)


@pytest.mark.parametrize('shape', [(9, 11), (1, 1), (1, 9), (9, 1), (40, 3)])
@pytest.mark.parametrize('window', [1, 2, 3, 4, 7, 30, 81])
def test_window_sum_vs_brute_force(shape, window):
    """Odd and even windows, windows larger than the image, 1-px images, and row ranges (the
    blocks background_mask works in) that start and stop anywhere."""
    values = np.random.default_rng(window).integers(0, 2, shape).astype(bool)
    expected = brute_window_sum(values, window)
    np.testing.assert_array_equal(window_sum(values, window), expected)
    height = shape[0]
    for start, stop in [(0, 1), (height - 1, height), (height // 3, height // 3 + 5)]:
        stop = min(stop, height)
        got = window_sum(values, window, start, stop)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, expected[start:stop])


@pytest.mark.parametrize('shape, neighbourhood', [((1, 1), 200), ((1, 12), 10), ((12, 1), 10),
                                                  ((5, 4), 200), ((700, 6), 5), ((700, 6), 6)])
def test_background_matches_transcription_on_edge_shapes(shape, neighbourhood):
    """1-px images, windows larger than the image, images taller than a row block, and windows
    of 10 or 20 pixels, where 0.9 is a whole count."""
    rng = np.random.default_rng(shape[0] * neighbourhood)
    rgb = np.where(rng.random(shape + (1,)) < 0.85, 230, 120).astype(np.uint8).repeat(3, axis=-1)
    rule = TissueRule(neighbourhood=neighbourhood, neighbourhood_fraction=0.9)
    expected = transcribed_background(rgb, 1.0, rule)
    np.testing.assert_array_equal(background_mask(rgb, 1.0, rule), expected)


@pytest.mark.parametrize('fraction', [0.9, 0.55, 0.1, 0.25, 1 / 3, 0.7, 0.95, 1.0])
def test_least_sums_vs_float64_division(fraction):
    """The least sum s of each count with s / count >= fraction, as the float64 quotient decides."""
    counts = np.arange(1, 3000)
    sums = np.arange(3001)
    reaches = sums[None, :] / counts[:, None] >= fraction  # [counts, sums]
    np.testing.assert_array_equal(least_sums(counts, fraction), reaches.argmax(axis=1))


def test_background_at_exactly_the_fraction():
    """55 of 100 background reaches 0.55 (as 55 / 100 == 0.55 decides), though the float64
    0.55 x 100 is 55.00000000000001: the rule compares integers without that rounding."""
    rgb = np.full((10, 10, 3), 230, np.uint8)
    rgb.reshape(100, 3)[11:56] = 120  # 45 tissue pixels, among them (5, 5), whose window
    # (rows and columns 0..9) is the whole image
    for fraction, background in [(0.55, True), (0.56, False)]:
        rule = TissueRule(neighbourhood=10, neighbourhood_fraction=fraction)
        assert background_mask(rgb, 1.0, rule)[5, 5] == background


def test_background_mask_memory_is_bounded():
    """On the overview of a 150,000-px-wide slide (6000 x 4000 at 25x), every numpy allocation
    together peaks under 1.5x the RGB overview (the integral images took over 1 GB)."""
    rgb = np.full((4000, 6000, 3), 235, np.uint8)
    rgb[500:3500, 1000:5000] = 150
    rgb[::97, ::89] = 90  # specks, removed by the neighbourhood rule
    tracemalloc.start()
    try:
        mask = background_mask(rgb, 25.0, TissueRule())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * rgb.nbytes, f'{peak / 2**20:.0f} MiB for {rgb.nbytes / 2**20:.0f} MiB'
    assert mask[0, 0] and mask[97, 89] and not mask[2000, 3000]  # a speck in background


def test_neighbourhood_rule_removes_specks():
    """An isolated dark speck in white is background (its window is >= 90% background)."""
    rgb = np.full((40, 40, 3), 240, np.uint8)
    rgb[20, 20] = 100
    rule = TissueRule()
    assert background_mask(rgb, 200 / 10, rule).all()
    rgb[10:30, 10:30] = 120  # a tissue block survives
    assert not background_mask(rgb, 200 / 10, rule)[20, 20]


def tissue_fraction(rgb, rule):
    """Fraction of a tile's pixels that are tissue under the rule (the tile at level 0)."""
    return float(1.0 - background_mask(rgb, 1.0, rule).mean())


def test_real_tiles_scored_by_label(shared_data):
    rule = TissueRule()
    folder = shared_data / 'tiles' / 'histolab'
    tissue = sorted(folder.glob('tissue-*.png'))
    empty = [folder / n for n in ('no-tissue.png', 'no-tissue2.png', 'no-tissue-line.png')]
    empty += sorted(folder.glob('almost-white-*.png'))
    assert len(tissue) >= 4 and len(empty) >= 5
    for path in tissue:
        rgb = np.asarray(Image.open(path).convert('RGB'))
        assert tissue_fraction(rgb, rule) >= rule.min_fraction, path.name
    for path in empty:
        rgb = np.asarray(Image.open(path).convert('RGB'))
        assert tissue_fraction(rgb, rule) < rule.min_fraction, path.name


def test_bad_rule_values_are_named():
    with pytest.raises(ValueError, match='channel_rule'):
        TissueRule(channel_rule='most')
    with pytest.raises(ValueError, match='neighbourhood_fraction'):
        TissueRule(neighbourhood_fraction=1.5)
