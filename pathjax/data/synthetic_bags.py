"""Synthetic feature bags: slides as patch features, with the label carried by a minority of patches.

Each slide is a blob of patches on a grid. Every patch has Gaussian features around a tissue-type
centre (a few types shared by all slides) plus a per-slide offset (a batch effect unrelated to
the label). On a positive slide a spatially contiguous minority of the patches (`motif_fraction`)
is moved along a fixed "motif" direction, as a mutation's morphology would appear in a few
regions. Bag sizes, types and offsets do not depend on the label, so a model that learns anything
without the motif is learning a leak.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Bag:
    """features float32 [N, D]; grid int [N, 2] (row, col); motif bool [N]."""

    slide_id: str
    label: int
    features: np.ndarray
    grid: np.ndarray
    motif: np.ndarray


def blob_grid(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` distinct grid cells forming one connected blob, grown from the origin. int [N, 2]."""
    cells, frontier, seen = [], [(0, 0)], {(0, 0)}
    while len(cells) < count:
        cell = frontier.pop(rng.integers(len(frontier)))
        cells.append(cell)
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            neighbour = (cell[0] + dr, cell[1] + dc)
            if neighbour not in seen:
                seen.add(neighbour)
                frontier.append(neighbour)
    grid = np.array(cells)
    return grid - grid.min(axis=0)


def make_bags(num_slides: int, *, dim: int = 32, patches: tuple[int, int] = (60, 300),
              motif_fraction: float = 0.1, signal: float = 2.0, tissue_types: int = 4,
              seed: int = 0) -> list[Bag]:
    """Alternately negative and positive bags, deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.5, (tissue_types, dim))
    motif_direction = rng.normal(size=dim)
    motif_direction /= np.linalg.norm(motif_direction)
    bags = []
    for i in range(num_slides):
        count = int(rng.integers(*patches))
        grid = blob_grid(rng, count)
        types = rng.integers(tissue_types, size=count)
        features = centres[types] + rng.normal(0, 1.0, (count, dim)) + rng.normal(0, 0.5, dim)
        label = i % 2
        motif = np.zeros(count, bool)
        if label:
            # The motif: the patches nearest (on the grid) to a random patch.
            centre = grid[rng.integers(count)]
            order = np.argsort(np.abs(grid - centre).sum(axis=1), kind='stable')
            motif[order[:max(1, int(round(motif_fraction * count)))]] = True
            features[motif] += signal * motif_direction * np.sqrt(dim) / 2
        bags.append(Bag(f'bag{seed}_{i:04d}', label, features.astype(np.float32), grid, motif))
    return bags
