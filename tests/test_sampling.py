"""The seeded per-slide patch subsets."""

import numpy as np

from pathjax.sampling import seeded_subset


def test_subset_is_seeded_by_slide_sorted_and_without_repeats():
    kept = seeded_subset('slide', 1000, 100, seed=0)
    assert len(kept) == 100 and len(set(kept)) == 100 and (np.diff(kept) > 0).all()
    np.testing.assert_array_equal(kept, seeded_subset('slide', 1000, 100, seed=0))
    assert not np.array_equal(kept, seeded_subset('other', 1000, 100, seed=0))
    assert not np.array_equal(kept, seeded_subset('slide', 1000, 100, seed=1))
    np.testing.assert_array_equal(seeded_subset('slide', 50, 100, seed=0), np.arange(50))
    np.testing.assert_array_equal(seeded_subset('slide', 50, 0, seed=0), np.arange(50))
