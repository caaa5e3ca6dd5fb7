"""kNN graphs vs brute force, symmetrization, padding and buckets."""

import jax
import numpy as np
import pytest

from pathjax.data import graphs


def brute_force_knn(features, k):
    distances = ((features[:, None, :].astype(np.float64) - features[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    return distances, np.argsort(distances, axis=1, kind='stable')[:, :k]


@pytest.mark.parametrize('count, chunk', [(300, 1024), (300, 64), (70, 16)])
def test_knn_matches_brute_force(count, chunk):
    rng = np.random.default_rng(count + chunk)
    features = rng.normal(size=(count, 12)).astype(np.float32)
    found = graphs.knn_indices(features, k=8, chunk=chunk)
    distances, expected = brute_force_knn(features, 8)
    assert found.shape == (count, 8)
    assert not (found == np.arange(count)[:, None]).any()  # never itself
    # Same neighbour sets (compared through distances, so float ties cannot flip the test).
    np.testing.assert_allclose(np.sort(np.take_along_axis(distances, found, 1), axis=1),
                               np.take_along_axis(distances, expected, 1), rtol=1e-4)


def dot_generals(jaxpr):
    """Every dot_general equation of a jaxpr, nested jaxprs (jit, ...) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'dot_general':
            yield eqn
        for param in eqn.params.values():
            inner = getattr(param, 'jaxpr', param)  # a ClosedJaxpr's Jaxpr
            if hasattr(inner, 'eqns'):
                yield from dot_generals(inner)


@pytest.mark.parametrize('lowered', ['tensorfloat32', 'bfloat16'])
def test_distance_matmul_is_full_precision_whatever_the_default(lowered):
    """A lowered default matmul precision (TF32 is JAX's default on Ampere/Hopper) must not reach
    the distance matmul, whose |q|^2 + |p|^2 - 2 q.p cancels."""
    points, valid = np.zeros((32, 8), np.float32), np.ones(32, bool)
    with jax.default_matmul_precision(lowered):
        jaxpr = jax.make_jaxpr(graphs._chunk_neighbours, static_argnums=(3, 4))(
            points, valid, 0, 4, 16)
    found = list(dot_generals(jaxpr.jaxpr))
    assert found
    for eqn in found:
        assert eqn.params['precision'] == (jax.lax.Precision.HIGHEST,) * 2, eqn


def test_knn_exact_for_features_far_from_the_origin():
    """Features with a large common offset: float32 |q|^2 + |p|^2 - 2 q.p loses the distances
    (|q|^2 ~ 1.6e7, spacing 2) unless the points are centred first."""
    rng = np.random.default_rng(1)
    features = (rng.normal(size=(200, 16)) + 1000.0).astype(np.float32)
    k = 8
    found = graphs.knn_indices(features, k=k, chunk=64)
    distances, expected = brute_force_knn(features, k)
    ordered = np.sort(distances, axis=1)
    # No near-ties: the k-th and (k+1)-th distances differ by far more than float32 rounding.
    assert (ordered[:, k] - ordered[:, k - 1] > 1e-5 * ordered[:, k]).all()
    np.testing.assert_array_equal(np.sort(found, axis=1), np.sort(expected, axis=1))


def test_tiny_slides():
    assert graphs.knn_indices(np.zeros((1, 4), np.float32), 8).shape == (1, 0)
    two = graphs.knn_indices(np.array([[0.0], [1.0]], np.float32), 8)
    np.testing.assert_array_equal(two, [[1], [0]])


def test_symmetric_edges_are_max_of_a_and_its_transpose():
    rng = np.random.default_rng(0)
    neighbours = graphs.knn_indices(rng.normal(size=(50, 5)).astype(np.float32), 4)
    senders, receivers = graphs.symmetric_edges(neighbours)
    directed = np.zeros((50, 50), bool)
    directed[np.repeat(np.arange(50), 4), neighbours.ravel()] = True
    expected = directed | directed.T
    got = np.zeros((50, 50), bool)
    got[receivers, senders] = True
    np.testing.assert_array_equal(got, expected)
    assert len(senders) == expected.sum()  # each directed edge once
    assert len(senders) <= graphs.edge_budget(50, 4)


def test_buckets_and_padding():
    assert [graphs.bucket_size(n) for n in (1, 64, 65, 1000, 4096)] == [64, 64, 128, 1024, 4096]
    graph = graphs.slide_graph(np.ones((3, 2), np.float32), np.zeros((3, 2)), np.array([0, 1]),
                               np.array([1, 0]))
    padded = graphs.pad_graph(graph, 64, 10)
    assert padded.nodes['features'].shape == (64, 2) and padded.senders.shape == (10,)
    assert padded.nodes['mask'].sum() == 3 and padded.edges['mask'].sum() == 2
    with pytest.raises(ValueError, match='exceeds'):
        graphs.pad_graph(graph, 2, 10)
    batch = graphs.stack_graphs([padded, padded])
    assert batch.nodes['features'].shape == (2, 64, 2) and batch.receivers.shape == (2, 10)
