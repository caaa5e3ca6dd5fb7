"""The D4 augmentation: every output is one of the 8 symmetries, all 8 occur, per sample."""

import jax
import numpy as np

from pathjax.data.augment import random_d4


def symmetries(image):
    """The 8 symmetries of a square image via numpy rot90 and flips (independent reference)."""
    rotations = [np.rot90(image, k) for k in range(4)]
    return rotations + [np.fliplr(r) for r in rotations]


def test_outputs_are_symmetries_and_all_occur():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 5, 5, 3), dtype=np.uint8)
    out = np.asarray(jax.jit(random_d4)(jax.random.key(0), images))
    seen = set()
    for image, augmented in zip(images, out):
        matches = [k for k, s in enumerate(symmetries(image)) if np.array_equal(s, augmented)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(8))


def test_each_sample_draws_its_own_symmetry():
    image = np.arange(4 * 4 * 1, dtype=np.float32).reshape(4, 4, 1)
    out = np.asarray(random_d4(jax.random.key(1), np.repeat(image[None], 32, axis=0)))
    assert len({o.tobytes() for o in out}) > 1
    again = np.asarray(random_d4(jax.random.key(1), np.repeat(image[None], 32, axis=0)))
    np.testing.assert_array_equal(out, again)
