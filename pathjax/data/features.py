"""The feature store: each slide's patch features, and its graph file.

`features/<slide_id>.npz` holds features float [N, D], coords int [N, 2] (level-0 x, y), grid
int [N, 2] (row, col) and `network`, the identity of the feature network that made them (JSON).
`graphs/<slide_id>.npz` holds all that the slide model reads of a slide, written once: its kNN graph
for given (k, max_patches, seed) (the kept patch indices `kept` [n], `senders` and `receivers` int32
[E]) and the kept patches' `features` float32 [n, D], `grid` int32 [n, 2] and `coords` [n, 2]. A
training step reads one graph file per slide, never the features file; a rerun or the evaluation
does not search neighbours again. A slide's features come from a `FeatureSource`: its features
file from the extract stage (`NativeFeatures`), or another tool's file
(`feature_sources.ImportedFeatures`). The graph file is keyed by the settings, by how the source
is read (`FeatureSource.reading`) and by the source file: its size, mtime and inode, and when those
differ (a copied workdir) its digest (`FeatureSource.digest`), so rebuilt or replaced features
always get a new graph.
"""

import dataclasses
import hashlib
import pathlib
import struct
import threading
import zipfile
from typing import Protocol

import numpy as np

from pathjax import artifacts
from pathjax.data import graphs
from pathjax.sampling import seeded_subset
from pathjax.slide_paths import slide_file

# An .npy header is parsed with `ast.literal_eval`, and CPython 3.11's AST constructor keeps its
# recursion depth in state shared by every thread: when a garbage collection run during parsing
# lets another thread parse too, one of them raises "SystemError: AST constructor recursion depth
# mismatch" (cpython#106905). Graph files are read by a pool of threads, so headers are parsed
# one at a time.
_HEADER_LOCK = threading.Lock()
GRAPH_FORMAT = 3  # bump when the graph file's contents change: older files are rebuilt
_ZIP_LOCAL_HEADER = struct.Struct('<IHHHHHIIIHH')  # ... file name length, extra field length


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


@dataclasses.dataclass(frozen=True)
class StoredArray:
    """Where one array of an uncompressed npz file lies: the byte offset of its data."""

    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class GraphFile:
    """A slide's graph file and its sizes; coords [n, 2] (level-0 x, y) of its nodes."""

    path: pathlib.Path
    num_nodes: int
    num_edges: int
    feature_dim: int
    coords: np.ndarray


class FeatureSource(Protocol):
    """Where one slide's patch features come from."""

    slide_id: str
    path: pathlib.Path  # the file the features are read from

    def available(self) -> bool:
        """True when the slide's features can be used (its file exists and passed its checks)."""

    def reading(self) -> str:
        """How the file is read (settings beyond the file's bytes), '' for none."""

    def digest(self) -> np.ndarray:
        """uint8 [n]: a digest of the file's contents."""

    def load(self) -> SlideBag:
        """The slide's features, coords and grid."""

    def network(self) -> str:
        """The identity of the network that made the features ('' if not recorded)."""


@dataclasses.dataclass(frozen=True)
class NativeFeatures:
    """A slide's features file from the extract stage (`features/<slide_id>.npz`)."""

    workdir: pathlib.Path
    slide_id: str
    redo_hint = 'rerun the extract stage'

    @property
    def path(self) -> pathlib.Path:
        return features_path(self.workdir, self.slide_id)

    def available(self) -> bool:
        return self.path.exists()

    def reading(self) -> str:
        return ''

    def digest(self) -> np.ndarray:
        """The BLAKE2b digest of the whole file."""
        with open(self.path, 'rb') as f:
            return np.frombuffer(hashlib.file_digest(f, 'blake2b').digest(), np.uint8)

    def load(self) -> SlideBag:
        return load_bag(self.workdir, self.slide_id)

    def network(self) -> str:
        return features_network(self.path)


def features_path(workdir, slide_id: str) -> pathlib.Path:
    return slide_file(workdir, 'features', slide_id, '.npz')


def features_network(path) -> str:
    """The identity of the network that made a features file ('' if it was not recorded)."""
    with np.load(path, allow_pickle=False) as data:
        return str(data['network']) if 'network' in data.files else ''


def graph_path(workdir, slide_id: str) -> pathlib.Path:
    return slide_file(workdir, 'graphs', slide_id, '.npz')


def load_bag(workdir, slide_id: str) -> SlideBag:
    data = artifacts.load_npz(features_path(workdir, slide_id))
    return SlideBag(slide_id, data['features'].astype(np.float32, copy=False), data['coords'],
                    data['grid'])


def build_graph(bag: SlideBag, settings: GraphSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept patch indices [N'], senders [E], receivers [E]) of a slide's kNN graph."""
    kept = seeded_subset(bag.slide_id, len(bag.features), settings.max_patches, settings.seed)
    senders, receivers = graphs.symmetric_edges(graphs.knn_indices(bag.features[kept], settings.k))
    return kept, senders, receivers


def stored_arrays(path) -> dict[str, StoredArray]:
    """{name: where its data lies} for an npz file written by `artifacts.save_npz`, from the
    headers alone."""
    stored = {}
    with zipfile.ZipFile(path) as archive, open(path, 'rb') as raw:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f'{path}: {info.filename} is compressed')
            raw.seek(info.header_offset)
            *_, name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(
                raw.read(_ZIP_LOCAL_HEADER.size))
            raw.seek(info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length)
            version = np.lib.format.read_magic(raw)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            with _HEADER_LOCK:
                shape, fortran_order, dtype = read_header(raw)
            if fortran_order:
                raise ValueError(f'{path}: {info.filename} is in Fortran order')
            stored[info.filename.removesuffix('.npy')] = StoredArray(raw.tell(), shape, dtype)
    return stored


def _source_stat(path: pathlib.Path) -> np.ndarray:
    """int64 [3]: the features file's size, mtime (ns) and inode (atomic rewrites change it)."""
    stat = path.stat()
    return np.asarray([stat.st_size, stat.st_mtime_ns, stat.st_ino], np.int64)


def _cached_key(path: pathlib.Path) -> dict[str, np.ndarray] | None:
    """The key arrays of a graph file; None when there is none or it is of an older format."""
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        if not {'settings', 'source', 'digest', 'features'} <= set(data.files):
            return None
        return {key: data[key] for key in ('settings', 'source', 'digest')}


def _graph_file(path: pathlib.Path) -> GraphFile:
    stored = stored_arrays(path)
    features, senders = stored['features'].shape, stored['senders'].shape
    return GraphFile(path, features[0], senders[0], features[1],
                     artifacts.load_npz(path, ('coords',))['coords'])


def _reading_key(reading: str) -> int:
    """A source's `reading` as one int64 of the graph key (0 for '')."""
    if not reading:
        return 0
    digest = hashlib.blake2b(reading.encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little', signed=True)


def slide_graph(workdir, source: FeatureSource, settings: GraphSettings) -> GraphFile:
    """The slide's graph file, built (one slide in memory at a time) unless the cached one was
    built with the same settings from the same source file, read the same way."""
    slide_id = source.slide_id
    path = graph_path(workdir, slide_id)
    key = np.asarray([GRAPH_FORMAT, settings.k, settings.max_patches, settings.seed,
                      _reading_key(source.reading())], np.int64)
    stat = _source_stat(source.path)
    cached = _cached_key(path)
    same_settings = cached is not None and np.array_equal(cached['settings'], key)
    if same_settings and np.array_equal(cached['source'], stat):
        return _graph_file(path)
    digest = source.digest()
    if same_settings and np.array_equal(cached['digest'], digest):  # same features, copied
        artifacts.save_npz(path, **{**artifacts.load_npz(path), 'source': stat})
        return _graph_file(path)
    bag = source.load()
    kept, senders, receivers = build_graph(bag, settings)
    artifacts.save_npz(path, kept=kept, senders=senders, receivers=receivers,
                       features=bag.features[kept], grid=bag.grid[kept].astype(np.int32),
                       coords=bag.coords[kept], settings=key, source=stat, digest=digest)
    return _graph_file(path)
