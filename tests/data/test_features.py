"""The graph file: it holds the kept patches' features, grid and coords with the kNN graph;
rebuilt features (same patch count, other values) get a new graph, while the same features copied
elsewhere keep theirs."""

import os
import shutil

import numpy as np
import pytest

from pathjax import artifacts
from pathjax.data import features as feature_store
from pathjax.data.features import (GraphSettings, NativeFeatures, features_path, graph_path,
                                   slide_graph, stored_arrays)

SETTINGS = GraphSettings(k=4, max_patches=60, seed=3)


def write_features(workdir, seed, count=90, dim=5, slide_id='s'):
    rng = np.random.default_rng(seed)
    values = {'features': rng.normal(size=(count, dim)).astype(np.float32),
              'coords': rng.integers(0, 10_000, (count, 2)),
              'grid': rng.integers(0, 40, (count, 2))}
    artifacts.save_npz(features_path(workdir, slide_id), **values)
    return values


def reference_edges(features, k):
    """Both directions of every kNN pair (brute force, float64), sorted by (receiver, sender)."""
    distances = ((features[:, None].astype(np.float64) - features[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    neighbours = np.argsort(distances, axis=1)[:, :k]
    pairs = {(int(i), int(j)) for i, row in enumerate(neighbours) for j in row}
    pairs |= {(j, i) for i, j in pairs}
    receivers, senders = np.array(sorted((r, s) for s, r in pairs)).T
    return senders, receivers


def assert_graph_of(workdir, values, slide_id='s'):
    stored = artifacts.load_npz(graph_path(workdir, slide_id))
    kept = stored['kept']
    assert len(kept) == SETTINGS.max_patches and np.all(np.diff(kept) > 0)
    np.testing.assert_array_equal(stored['features'], values['features'][kept])
    np.testing.assert_array_equal(stored['grid'], values['grid'][kept])
    np.testing.assert_array_equal(stored['coords'], values['coords'][kept])
    senders, receivers = reference_edges(values['features'][kept], SETTINGS.k)
    np.testing.assert_array_equal(stored['senders'], senders)
    np.testing.assert_array_equal(stored['receivers'], receivers)


def test_graph_file_holds_what_the_model_reads(tmp_path):
    values = write_features(tmp_path, seed=0)
    found = slide_graph(tmp_path, NativeFeatures(tmp_path, 's'), SETTINGS)
    assert_graph_of(tmp_path, values)
    assert (found.path, found.num_nodes, found.feature_dim) == (graph_path(tmp_path, 's'), 60, 5)
    assert found.num_edges == len(artifacts.load_npz(found.path, ('senders',))['senders'])
    np.testing.assert_array_equal(found.coords, values['coords'][artifacts.load_npz(
        found.path, ('kept',))['kept']])


def test_rebuilt_features_get_a_new_graph(tmp_path):
    write_features(tmp_path, seed=0)
    slide_graph(tmp_path, NativeFeatures(tmp_path, 's'), SETTINGS)
    size = features_path(tmp_path, 's').stat().st_size
    rebuilt = write_features(tmp_path, seed=1)  # the same patch count and size, other values
    assert features_path(tmp_path, 's').stat().st_size == size
    slide_graph(tmp_path, NativeFeatures(tmp_path, 's'), SETTINGS)
    assert_graph_of(tmp_path, rebuilt)


def test_other_settings_get_a_new_graph(tmp_path):
    values = write_features(tmp_path, seed=0)
    slide_graph(tmp_path, NativeFeatures(tmp_path, 's'), SETTINGS)
    slide_graph(tmp_path, NativeFeatures(tmp_path, 's'), GraphSettings(k=2, max_patches=0, seed=3))
    stored = artifacts.load_npz(graph_path(tmp_path, 's'))
    np.testing.assert_array_equal(stored['features'], values['features'])
    senders, _ = reference_edges(values['features'], 2)
    np.testing.assert_array_equal(stored['senders'], senders)


def test_copied_features_keep_their_graph(tmp_path, monkeypatch):
    values = write_features(tmp_path / 'a', seed=0)
    slide_graph(tmp_path / 'a', NativeFeatures(tmp_path / 'a', 's'), SETTINGS)
    shutil.copytree(tmp_path / 'a', tmp_path / 'b')  # new inodes and times, the same bytes
    source = features_path(tmp_path / 'b', 's')
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))

    def no_build(*args):
        raise AssertionError('the graph was rebuilt')

    monkeypatch.setattr(feature_store, 'build_graph', no_build)
    slide_graph(tmp_path / 'b', NativeFeatures(tmp_path / 'b', 's'), SETTINGS)
    assert_graph_of(tmp_path / 'b', values)
    monkeypatch.setattr(NativeFeatures, 'digest', no_build)  # now known by its stat
    assert slide_graph(tmp_path / 'b', NativeFeatures(tmp_path / 'b', 's'), SETTINGS).num_nodes == 60


def test_a_graph_file_of_the_older_format_is_rebuilt(tmp_path):
    values = write_features(tmp_path, seed=0)
    kept = np.sort(np.random.default_rng(0).choice(90, 60, replace=False))
    artifacts.save_npz(graph_path(tmp_path, 's'), kept=kept, senders=np.zeros(4, np.int32),
                       receivers=np.zeros(4, np.int32), signature=np.array([4, 60, 3, 90]))
    slide_graph(tmp_path, NativeFeatures(tmp_path, 's'), SETTINGS)
    assert_graph_of(tmp_path, values)


def test_stored_arrays_locate_each_array(tmp_path):
    arrays = {'a': np.arange(12, dtype=np.float32).reshape(3, 4), 'b': np.array([7, 8], np.int64)}
    artifacts.save_npz(tmp_path / 'x.npz', **arrays)
    raw = (tmp_path / 'x.npz').read_bytes()
    for name, where in feature_store.stored_arrays(tmp_path / 'x.npz').items():
        expected = arrays[name]
        assert (where.shape, where.dtype) == (expected.shape, expected.dtype)
        found = np.frombuffer(raw, expected.dtype, expected.size, where.offset)
        np.testing.assert_array_equal(found.reshape(expected.shape), expected)
    np.savez_compressed(tmp_path / 'y.npz', **arrays)
    with pytest.raises(ValueError, match='compressed'):
        feature_store.stored_arrays(tmp_path / 'y.npz')


def test_headers_read_by_many_threads_at_once(tmp_path):
    """Graph files are read by a pool of threads. CPython 3.11 parses .npy headers with shared
    AST state: with garbage collections running finalizers during parsing (as JAX's objects do),
    four threads reading headers at once failed within seconds with 'SystemError: AST
    constructor recursion depth mismatch' until the parsing was serialized."""
    import gc
    import sys
    import threading
    path = tmp_path / 'graph.npz'
    artifacts.save_npz(path, features=np.zeros((5, 8), np.float32), senders=np.zeros(9, np.int32))

    class Cycle:  # garbage only a collection frees, with a finalizer that runs Python code
        def __init__(self):
            self.me = self

        def __del__(self):
            sum(range(50))

    errors, shapes = [], []

    def read_headers():
        for _ in range(3000):
            Cycle()
            try:
                shapes.append(stored_arrays(path)['features'].shape)
            except Exception as error:  # noqa: BLE001 (collected for the assert)
                errors.append(error)
                return

    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(1e-6)
    gc.set_threshold(50, 1, 1)
    try:
        threads = [threading.Thread(target=read_headers) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
        gc.set_threshold(*thresholds)
    assert not errors, errors
    assert shapes == [(5, 8)] * 12000
