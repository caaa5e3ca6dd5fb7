"""The batch loader: batches read from graph files equal a np.pad / np.stack reference; reading
runs ahead of a blocked consumer, no further than its depth; a failing read names the slide; the
thread never outlives the consumer."""

import dataclasses
import threading
import time

import numpy as np
import pytest

from pathjax import artifacts
from pathjax.data import graphs
from pathjax.data.features import GraphSettings, NativeFeatures, features_path, slide_graph
from pathjax.data.graph_batches import GraphBatches
from pathjax.errors import StageError

K, DIM = 3, 6
COUNTS = (30, 70, 50, 150, 100, 40, 200, 64, 65)  # buckets 64, 128 and 256; 9 = 2 x 4 + 1


def write_slides(workdir, counts=COUNTS, seed=0):
    """Features files for slides of `counts` patches and their graph files; returns the graph
    files and each slide's unpadded arrays (from the features file and the stored edges)."""
    rng = np.random.default_rng(seed)
    files, unpadded = [], []
    for i, count in enumerate(counts):
        slide_id = f'slide{i}'
        features = rng.normal(size=(count, DIM)).astype(np.float32)
        grid = rng.integers(0, 50, (count, 2))
        artifacts.save_npz(features_path(workdir, slide_id), features=features, coords=grid * 256,
                           grid=grid)
        files.append(slide_graph(workdir, NativeFeatures(workdir, slide_id), GraphSettings(K, 0, 0)))
        edges = artifacts.load_npz(files[-1].path, ('senders', 'receivers'))
        unpadded.append({'features': features, 'grid': grid, 'senders': edges['senders'],
                         'receivers': edges['receivers']})
    return files, unpadded


def reader(files, labels, rows=slice(None), batch_size=4, workers=1):
    return GraphBatches([f.path for f in files], [f.num_nodes for f in files],
                        [f.num_edges for f in files], {'label': labels}, batch_size=batch_size,
                        k=K, feature_dim=DIM, rows=rows, workers=workers)


def reference_batch(unpadded, labels, indices, batch_size):
    """The batch as np.pad and np.stack of whole graphs make it (the former make_batch)."""
    fill = np.resize(indices, batch_size)
    nodes = graphs.bucket_size(max(len(unpadded[i]['features']) for i in fill))
    edges = 2 * K * nodes

    def padded(i, name, size):
        array = unpadded[i][name]
        return np.pad(array, [(0, size - len(array))] + [(0, 0)] * (array.ndim - 1))

    def stacked(name, size):
        return np.stack([padded(i, name, size) for i in fill])

    return {'features': stacked('features', nodes), 'grid': stacked('grid', nodes),
            'node_mask': np.stack([np.arange(nodes) < len(unpadded[i]['features']) for i in fill]),
            'senders': stacked('senders', edges), 'receivers': stacked('receivers', edges),
            'edge_mask': np.stack([np.arange(edges) < len(unpadded[i]['senders']) for i in fill]),
            'label': labels[fill], 'mask': np.arange(batch_size) < len(indices)}


def assert_batch_equal(batch, expected, rows=slice(None)):
    graph = batch['graph']
    found = {'features': graph.nodes['features'], 'grid': graph.nodes['grid'],
             'node_mask': graph.nodes['mask'], 'senders': graph.senders,
             'receivers': graph.receivers, 'edge_mask': graph.edges['mask'],
             'label': batch['label'], 'mask': batch['mask']}
    for name, value in found.items():
        np.testing.assert_array_equal(value, expected[name][rows], err_msg=name)
    assert [found[name].dtype for name in ('features', 'grid', 'senders', 'receivers')] == [
        np.float32, np.int32, np.int32, np.int32]
    nodes, edges = expected['features'].shape[1], expected['senders'].shape[1]
    np.testing.assert_array_equal(graph.n_node, np.full((len(graph.senders), 1), nodes))
    np.testing.assert_array_equal(graph.n_edge, np.full((len(graph.senders), 1), edges))


@pytest.fixture(scope='module')
def slides(tmp_path_factory):
    return write_slides(tmp_path_factory.mktemp('graphs'))


@pytest.mark.parametrize('workers', [1, 3])
def test_batches_equal_a_padded_and_stacked_reference(slides, workers):
    files, unpadded = slides
    labels = np.arange(len(files), dtype=np.int32) % 2
    order = np.random.default_rng(1).permutation(len(files))
    batches = [order[:4], order[4:8], order[8:]]  # the last one short: filled with repeats
    with reader(files, labels, workers=workers).prefetch(batches) as loaded:
        loaded = list(loaded)
    assert [list(indices) for indices, _ in loaded] == [list(b) for b in batches]
    for indices, batch in loaded:
        assert_batch_equal(batch, reference_batch(unpadded, labels, indices, 4))
        graph = batch['graph']
        for array in (graph.nodes['features'], graph.nodes['grid'], graph.senders):
            assert array.ctypes.data % 64 == 0  # a CPU device takes it without a copy
    assert loaded[-1][1]['mask'].tolist() == [True, False, False, False]
    assert {b['graph'].nodes['features'].shape[1] for _, b in loaded} <= {64, 128, 256}


def test_each_process_reads_only_its_rows(slides, tmp_path):
    files, unpadded = slides
    labels = np.arange(len(files), dtype=np.int32)
    indices = np.array([3, 0, 6])  # filled to [3, 0, 6, 3]: rows 2 and 3 are slides 6 and 3
    only_rows = [f if i in (3, 6) else dataclasses.replace(f, path=tmp_path / 'absent.npz')
                 for i, f in enumerate(files)]
    batch = reader(only_rows, labels, rows=slice(2, 4)).read(indices)
    assert_batch_equal(batch, reference_batch(unpadded, labels, indices, 4), slice(2, 4))


def test_reading_runs_ahead_of_a_blocked_step_and_no_further(slides):
    files, _ = slides
    placed = []
    condition = threading.Condition()

    def place(batch):
        with condition:
            placed.append(batch)
            condition.notify_all()
        return batch

    batches = [np.array([i]) for i in range(len(files))]
    with reader(files, np.zeros(len(files), np.int32), batch_size=1).prefetch(
            batches, place, depth=2) as loaded:
        next(loaded)
        with condition:  # the device step of batch 0 runs; the loader reads the next two
            assert condition.wait_for(lambda: len(placed) == 3, timeout=30)
        time.sleep(0.3)
        assert len(placed) == 3  # not further than depth ahead
        next(loaded)
        with condition:
            assert condition.wait_for(lambda: len(placed) == 4, timeout=30)
        assert len(list(loaded)) == len(files) - 2


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == 'pathjax-prefetch' and t.is_alive()]


def test_a_failing_read_names_the_slide_and_leaves_no_thread(tmp_path):
    files, _ = write_slides(tmp_path, counts=(30, 40, 50))
    path = files[1].path
    path.write_bytes(path.read_bytes()[:-100])  # truncated after the split was loaded
    batches = [np.array([0]), np.array([1]), np.array([2])]
    loaded = reader(files, np.zeros(3, np.int32), batch_size=1).prefetch(batches)
    with pytest.raises(StageError, match='slide slide1: cannot read its graph file'), loaded:
        for _ in loaded:
            pass
    assert not prefetch_threads()
    with reader(files, np.zeros(3, np.int32), batch_size=1).prefetch(batches) as loaded:
        next(loaded)  # the consumer stops early
    assert not prefetch_threads()
