"""The background rule vs a direct numpy transcription, and on real tiles."""

import numpy as np
import pytest
from PIL import Image

from pathjax.slides.tissue import TissueRule, background_mask, window_sum


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


def test_window_sum_even_and_odd_windows():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2, (9, 11))
    for window in (1, 2, 3, 4, 7, 30):
        expected = np.array([[values[max(0, i - window // 2):i - window // 2 + window,
                                     max(0, j - window // 2):j - window // 2 + window].sum()
                              for j in range(11)] for i in range(9)])
        np.testing.assert_array_equal(window_sum(values, window), expected)


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
