"""The seeded per-slide subsets of patches (stain fitting, the patch dataset, graph caps).

A slide's subset depends only on (seed, slide id), not on the cohort or the order of the slides,
so reruns and other hosts draw the same patches.
"""

import zlib

import numpy as np


def seeded_subset(slide_id: str, count: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of `size` of a slide's `count` patches, drawn without replacement; all of
    them (np.arange(count)) when size <= 0 or count <= size."""
    if size <= 0 or count <= size:
        return np.arange(count)
    rng = np.random.default_rng([seed, zlib.crc32(slide_id.encode())])
    return np.sort(rng.choice(count, size, replace=False))
