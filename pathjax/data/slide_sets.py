"""The slides of a split as the slide model reads them: ids, labels and graph files, without
their features (each batch reads its slides' graphs from the files; see `graph_batches`)."""

import dataclasses
import pathlib

import numpy as np
from absl import logging

from pathjax.cohort import Cohort, SlideRecord
from pathjax.data.feature_sources import Sources
from pathjax.data.features import GraphSettings, slide_graph
from pathjax.errors import StageError
from pathjax.interop.h5_features import FeatureFileError
from pathjax.runtime import sharding


UNLABELLED = -1  # the label of a slide to predict whose class is not known


@dataclasses.dataclass
class SlideSet:
    """The slides of one split that have features, without their features: slide and case ids,
    labels int [S] (UNLABELLED for a new slide of unknown class), graph files [S] (see
    `features.slide_graph`), their node and edge counts int [S], the level-0 (x, y) coordinates
    [n_s, 2] of each graph's nodes, and the feature size D (0 when empty)."""

    slide_ids: list[str]
    case_ids: list[str]
    labels: np.ndarray
    paths: list[pathlib.Path]
    num_nodes: np.ndarray
    num_edges: np.ndarray
    coords: list[np.ndarray]
    feature_dim: int

    def __len__(self) -> int:
        return len(self.slide_ids)


def load_slides(workdir, records: list[SlideRecord], classes: tuple[str, ...],
                settings: GraphSettings, stage: str, sources: Sources) -> SlideSet:
    """The records whose features exist and read (others are skipped with a warning naming
    `stage`), their graph files built or checked one slide at a time; no features are kept."""
    ids, cases, labels, files = [], [], [], []
    for record in records:
        source = sources.of(record)
        if not source.available():
            logging.warning('%s: slide %s has no features (see the %s report); left out', stage,
                            record.slide_id, 'extract' if sources.import_dir == '' else 'import')
            continue
        try:
            files.append(slide_graph(workdir, source, settings))
        except FeatureFileError as error:
            logging.warning('%s: slide %s left out: %s', stage, record.slide_id, error)
            continue
        ids.append(record.slide_id)
        cases.append(record.case_id)
        labels.append(classes.index(record.label) if record.label else UNLABELLED)
    first_of = {}
    for slide_id, file in zip(ids, files):
        first_of.setdefault(file.feature_dim, slide_id)
    if len(first_of) > 1:
        (dim_a, slide_a), (dim_b, slide_b) = list(first_of.items())[:2]
        raise StageError(f'{stage}: the slides have features of different sizes: {slide_a} has '
                         f'{dim_a}, {slide_b} has {dim_b} ({len(first_of)} sizes in all); '
                         f'{sources.of(records[0]).redo_hint}')
    dims = sorted(first_of)
    return SlideSet(ids, cases, np.asarray(labels, np.int32), [f.path for f in files],
                    np.asarray([f.num_nodes for f in files], np.int64),
                    np.asarray([f.num_edges for f in files], np.int64),
                    [f.coords for f in files], dims[0] if dims else 0)


def node_rows(slides: SlideSet, indices: np.ndarray, values: np.ndarray) -> list[np.ndarray]:
    """Rows [n_s] of per-node values [B, N] for the batch's slides, padding cut off."""
    return [np.asarray(values[row][:slides.num_nodes[i]]) for row, i in enumerate(indices)]


def load_splits(workdir, cohort: Cohort, names, classes: tuple[str, ...],
                settings: GraphSettings, stage: str, sources: Sources) -> dict[str, SlideSet]:
    """{split: SlideSet} of the named splits. The leader builds the slides' missing graph caches
    first; the other processes then read them instead of searching neighbours too."""
    def load():
        return {name: load_slides(workdir, list(cohort.split(name)), classes, settings, stage,
                                  sources)
                for name in names}
    splits = load() if sharding.is_leader() else None
    sharding.barrier('pathjax slide graphs')
    splits = splits if splits is not None else load()
    loaded = {i for slides in splits.values() for i in slides.slide_ids}
    check_one_network([sources.of(r) for r in cohort.slides if r.slide_id in loaded], stage)
    return splits


def check_one_network(sources: list, stage: str) -> None:
    """Raises StageError when the slides' features came from more than one feature network
    (a retrained network and an extract stage that has not been rerun since; imported files of
    two encoders)."""
    networks = {}
    for source in sources:
        networks.setdefault(source.network(), []).append(source.slide_id)
    if len(networks) > 1:
        groups = '; '.join(f'{len(ids)} slide(s) (e.g. {ids[0]}) by '
                           f'{network or "an unrecorded network"}'
                           for network, ids in networks.items())
        raise StageError(f'{stage}: the features come from {len(networks)} different feature '
                         f'networks ({groups}); {sources[0].redo_hint}' +
                         (', which redoes the slides made by another network than the current '
                          'one' if sources[0].redo_hint.startswith('rerun') else ''))


def feature_dim(splits: list[SlideSet], stage: str) -> int:
    """The patch feature size D of the loaded slides."""
    for slides in splits:
        if len(slides):
            return slides.feature_dim
    raise StageError(f'{stage}: no slide has features; run the extract stage first')
