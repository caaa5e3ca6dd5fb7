"""The feature store: each slide's patch features from the extract stage, and its cached graph.

`features/<slide_id>.npz` holds features float [N, D], coords int [N, 2] (level-0 x, y) and grid
int [N, 2] (row, col). `graphs/<slide_id>.npz` caches the slide's kNN graph for given (k,
max_patches, seed): the kept patch indices and the symmetric edge list, so a rerun or the
evaluation does not search neighbours again.
"""

import dataclasses
import pathlib

import jraph
import numpy as np

from pathjax import artifacts
from pathjax.data import graphs
from pathjax.sampling import seeded_subset


@dataclasses.dataclass(frozen=True)
class SlideBag:
    """One slide's patches. features float32 [N, D]; coords, grid int [N, 2]."""

    slide_id: str
    features: np.ndarray
    coords: np.ndarray
    grid: np.ndarray


@dataclasses.dataclass(frozen=True)
class GraphSettings:
    """What a slide's graph depends on (`config.graph` and the seed)."""

    k: int
    max_patches: int
    seed: int

    @classmethod
    def from_config(cls, config) -> 'GraphSettings':
        return cls(config.graph.k, config.graph.max_patches, config.seed)


def features_path(workdir, slide_id: str) -> pathlib.Path:
    return pathlib.Path(workdir) / 'features' / f'{slide_id}.npz'


def graph_path(workdir, slide_id: str) -> pathlib.Path:
    return pathlib.Path(workdir) / 'graphs' / f'{slide_id}.npz'


def load_bag(workdir, slide_id: str) -> SlideBag:
    data = artifacts.load_npz(features_path(workdir, slide_id))
    return SlideBag(slide_id, data['features'].astype(np.float32), data['coords'], data['grid'])


def build_graph(bag: SlideBag, settings: GraphSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept patch indices [N'], senders [E], receivers [E]) of a slide's kNN graph."""
    kept = seeded_subset(bag.slide_id, len(bag.features), settings.max_patches, settings.seed)
    senders, receivers = graphs.symmetric_edges(graphs.knn_indices(bag.features[kept], settings.k))
    return kept, senders, receivers


def slide_graph(workdir, bag: SlideBag,
                settings: GraphSettings) -> tuple[jraph.GraphsTuple, np.ndarray]:
    """(the slide's unpadded graph, indices [N'] of the bag's patches that are its nodes), from
    the cache when it was built with the same settings."""
    path = graph_path(workdir, bag.slide_id)
    signature = np.asarray([settings.k, settings.max_patches, settings.seed, len(bag.features)])
    cached = artifacts.load_npz(path) if path.exists() else None
    if cached is not None and np.array_equal(cached['signature'], signature):
        kept, senders, receivers = cached['kept'], cached['senders'], cached['receivers']
    else:
        kept, senders, receivers = build_graph(bag, settings)
        artifacts.save_npz(path, kept=kept, senders=senders, receivers=receivers,
                           signature=signature)
    return graphs.slide_graph(bag.features[kept], bag.grid[kept], senders, receivers), kept
